"""Helpers of ``test_manager_policies.py`` that run in child processes.

- ``Trainer``: the object of the resume-after-preemption loop in
  ``docs/checkpoint-manager.md`` (importable, so that its class is pickled by reference).
  ``CKPTABLE_KILL_AT=<step>`` makes it kill its own process with SIGKILL when it reaches
  that step: a preemption at a known point.
- ``main``: a training loop in the Orbax style (``save`` called at every step; the
  manager's ``save_interval_steps`` skips the odd ones) with every keep policy on,
  printing ``published <step> <saved_at>`` for each checkpoint written, until killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ckptable import Checkpointable, CheckpointManager
from ckptable.manager import RECORD_FILE
from manager_child import model_at

#: The policies of ``main``'s manager (``keep_every_seconds`` comes from the command line).
KEEP_LAST = 2
KEEP_PERIOD = 4
SAVE_INTERVAL_STEPS = 2


class Trainer(Checkpointable):
    """A training loop's state: the step reached and a running total that depends on every
    step trained once, in order (a resumed run that skipped or repeated one differs)."""

    def __init__(self) -> None:
        self.step = 0
        self.total = 0
        kill_at = os.environ.get("CKPTABLE_KILL_AT")
        self._kill_at = int(kill_at) if kill_at else None

    def train_step(self) -> float:
        self.step += 1
        self.total = (self.total * 31 + self.step) % 1_000_000_007
        if self.step == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return 1.0 / self.step

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"step": self.step, "total": self.total}

    def set_state(self, state: Any) -> None:
        self.step, self.total = state["step"], state["total"]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (), {}


def expected_total(steps: int) -> int:
    """``Trainer.total`` after ``steps`` steps trained once each, in order."""
    total = 0
    for step in range(1, steps + 1):
        total = (total * 31 + step) % 1_000_000_007
    return total


def make_manager(directory: str, keep_every_seconds: float) -> CheckpointManager:
    return CheckpointManager(
        directory,
        keep_last=KEEP_LAST,
        keep_period=KEEP_PERIOD,
        keep_every_seconds=keep_every_seconds,
        save_interval_steps=SAVE_INTERVAL_STEPS,
        metric="score",
        mode="max",
    )


def main() -> None:
    directory, seconds = sys.argv[1], float(sys.argv[2])
    manager = make_manager(directory, seconds)
    step = (manager.latest_step() or 0) + 1
    print("ready", flush=True)
    while True:
        path = manager.save(model_at(step, 64), step, {"score": -float(step)})
        if path is not None:
            record = json.loads((Path(path) / RECORD_FILE).read_text())
            print(f"published {step} {record['saved_at']!r}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
