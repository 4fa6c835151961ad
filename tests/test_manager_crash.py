"""A process saving through a CheckpointManager, killed (SIGKILL) at random moments:
the next manager lists only whole checkpoints, each of which restores and verifies,
never loses the newest published one, and finishes what retention had started."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ckptable
from ckptable import CheckpointManager
from manager_child import model_at
from trees import Model

TESTS_DIR = Path(__file__).resolve().parent
ROUNDS = int(os.environ.get("CKPTABLE_MANAGER_CRASH_ROUNDS", "6"))
KEEP_LAST = 2
WIDTH = 1 << 20  # 4 MiB per layer: saves take tens of milliseconds


def run_and_kill(directory: Path, mode: str, rng: random.Random) -> int:
    """Start the child, let it publish a few steps, kill it at a random moment; return
    the last step it reported published (0: none)."""
    child = subprocess.Popen(
        [
            sys.executable,
            str(TESTS_DIR / "manager_child.py"),
            str(directory),
            mode,
            str(KEEP_LAST),
            str(WIDTH),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
    )
    published = 0
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")))
    reader.start()
    deadline = time.monotonic() + 60
    while not any(line.startswith("published") for line in lines):
        assert child.poll() is None, "the child died on its own"
        assert time.monotonic() < deadline, "the child published nothing"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.4))
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    reader.join(timeout=30)
    for line in lines:
        if line.startswith("published"):
            published = int(line.split()[1])
    return published


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_saves_leave_only_whole_checkpoints(tmp_path: Path, mode: str) -> None:
    rng = random.Random(int(os.environ.get("CKPTABLE_CRASH_SEED", "7")))
    directory = tmp_path / "run"
    newest_published = 0
    for _ in range(ROUNDS):
        newest_published = max(newest_published, run_and_kill(directory, mode, rng))

        manager = CheckpointManager(
            directory, keep_last=KEEP_LAST, keep_best=1, metric="score", mode="max"
        )

        steps = manager.steps()
        assert steps and steps[-1] >= newest_published
        # Retention may not have run for the last save: one more than keep_last, plus
        # the best; never fewer than what retention keeps.
        assert len(steps) <= KEEP_LAST + 2
        assert manager.invalid_checkpoints() == {}
        for step in steps:
            path = manager.path(step)
            ckptable.verify_checkpoint(path)
            restored = Model.from_checkpoint(path)
            assert restored.epoch == step
            assert restored.get_state()["layer0"]["weights"][0] == step * 10
        fresh = Model(layers=3, width=WIDTH)
        assert manager.restore_latest(fresh) == steps[-1]
        # Nothing but checkpoints is left once the next save ran.
        manager.save(model_at(steps[-1] + 1, 8), steps[-1] + 1, {"score": -100.0})
        leftovers = [n for n in os.listdir(directory) if not n.startswith("checkpoint_")]
        assert leftovers == []
        newest_published = steps[-1] + 1
