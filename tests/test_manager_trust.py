"""CheckpointManager can be trusted with its directory: a save never returns a path that
retention deleted (steps only move forward unless asked), damage is never taken for an
empty directory nor counted by retention in place of valid checkpoints, and several
processes can share one directory."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import ckptable
from ckptable import CheckpointError, CheckpointManager, CorruptCheckpointError
from ckptable._manifest import MANIFEST_FILE
from test_async import Held
from test_manager import model_at, saved_epoch
from test_remote_storage import S3_BACKENDS, Backend, make_backend
from trees import Model

TESTS_DIR = Path(__file__).resolve().parent
#: Children import the tests' helpers, and ckptable from where this process does.
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        path
        for path in (
            str(TESTS_DIR),
            str(Path(ckptable.__file__).parent.parent),
            os.environ.get("PYTHONPATH", ""),
        )
        if path
    ),
}


def checkpoint_names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def corrupt_payload(checkpoint: str) -> None:
    """Flip a byte of a state file: the listing (manifest, names, sizes) still passes, a
    restore's checksums do not."""
    state_file = Path(checkpoint) / "layer0" / "state.pkl"
    data = bytearray(state_file.read_bytes())
    data[-5] ^= 0xFF
    state_file.write_bytes(bytes(data))


# --------------------------------------------------------------------------- 2: step order


def test_a_step_older_than_the_newest_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (8, 9, 10):
        manager.save(model_at(step), step)
    before = checkpoint_names(tmp_path)

    with pytest.raises(CheckpointError) as info:
        manager.save(model_at(3), 3)

    error = info.value
    assert isinstance(error, ValueError)
    assert "Step 3" in str(error) and "step 10" in str(error)
    assert "overwrite=True" in str(error)
    assert type(error).__name__ == "StepConflictError"
    assert (error.step, error.newest_step) == (3, 10)  # type: ignore[attr-defined]
    assert error.path == manager.path(3)
    copy = pickle.loads(pickle.dumps(error))  # errors cross process boundaries
    assert (copy.step, copy.newest_step, copy.path, str(copy)) == (3, 10, error.path, str(error))
    assert checkpoint_names(tmp_path) == before
    assert manager.steps() == [9, 10]


def test_saving_the_same_step_again_needs_overwrite(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 5, {"loss": 1.0})

    with pytest.raises(ValueError, match=r"Step 5 has a checkpoint already .*checkpoint_000005"):
        manager.save(model_at(2), 5, {"loss": 0.5})
    assert saved_epoch(manager.path(5)) == 1

    path = manager.save(model_at(2), 5, {"loss": 0.5}, overwrite=True)
    assert path == manager.path(5)
    assert saved_epoch(path) == 2
    assert manager.metrics(5) == {"loss": 0.5}


def test_an_older_step_saved_with_overwrite_is_kept_by_its_own_retention(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (8, 9, 10):
        manager.save(model_at(step), step)

    path = manager.save(model_at(3), 3, overwrite=True)

    assert Path(path).is_dir() and saved_epoch(path) == 3
    assert manager.steps() == [3, 9, 10]
    manager.save(model_at(11), 11)  # counted by age at the next save
    assert manager.steps() == [10, 11]
    assert checkpoint_names(tmp_path) == ["checkpoint_000010", "checkpoint_000011"]


def test_keep_best_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_best=1, metric="score", mode="max")
    manager.save(model_at(5), 5, {"score": 9.0})
    manager.save(model_at(6), 6, {"score": 1.0})
    assert manager.steps() == [5, 6]  # the best, and the newest

    # Ranked last, not the newest: retention would have deleted it as it was written.
    path = manager.save(model_at(2), 2, {"score": 0.0}, overwrite=True)

    assert Path(path).is_dir() and saved_epoch(path) == 2
    assert manager.steps() == [2, 5, 6]
    assert CheckpointManager(tmp_path, keep_best=1, metric="score", mode="max").steps() == [2, 5, 6]
    manager.save(model_at(7), 7, {"score": 3.0})
    assert manager.steps() == [5, 7]


def test_save_async_refuses_an_older_step_in_the_caller(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (8, 9, 10):
        manager.save(model_at(step), step)
    with pytest.raises(CheckpointError, match="Step 3 is older than the newest checkpoint"):
        manager.save_async(model_at(3), 3)
    with pytest.raises(CheckpointError, match="Step 10 has a checkpoint already"):
        manager.save_async(model_at(10), 10)

    assert not any(t.name.startswith("ckptable-save-step") for t in threading.enumerate())
    manager.wait()  # nothing failed in the background either
    assert checkpoint_names(tmp_path) == ["checkpoint_000009", "checkpoint_000010"]
    future = manager.save_async(model_at(3), 3, overwrite=True)
    assert Path(future.result(timeout=60)).is_dir()
    assert manager.steps() == [3, 9, 10]


def test_save_async_refuses_a_step_below_one_still_in_flight(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1, max_in_flight=2)
    tree = Held(64)
    tree.hold()
    running = manager.save_async(tree, 5)
    assert tree.entered.wait(30)
    try:
        with pytest.raises(CheckpointError, match=r"Step 5 has a checkpoint already .*in flight"):
            manager.save_async(Held(64), 5)
        with pytest.raises(CheckpointError, match="Step 4 is older than the newest checkpoint"):
            manager.save_async(Held(64), 4)
    finally:
        tree.release.set()
    assert Path(running.result(timeout=60)).is_dir()
    with pytest.raises(CheckpointError, match="Step 4 is older"):
        manager.save(Held(64), 4)
    manager.wait()
    assert manager.steps() == [5]


# --------------------------------------------------------------------------- 3: damage


def test_restore_latest_raises_when_every_checkpoint_is_corrupt(
    tmp_path: Path, states_equal: Any
) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.restore_latest(Model(layers=2, width=8)) is None  # empty: a fresh start
    for step in (1, 2):
        manager.save(model_at(step), step)
        corrupt_payload(manager.path(step))
    fresh = Model(layers=2, width=8)
    before = fresh.get_state()

    with pytest.raises(CorruptCheckpointError, match="No checkpoint in .* restores") as info:
        CheckpointManager(tmp_path).restore_latest(fresh)

    message = str(info.value)
    assert manager.path(1) in message and manager.path(2) in message
    assert "corrupt" in message and "corrupt_ok=True" in message
    assert info.value.path == str(tmp_path)
    states_equal(fresh.get_state(), before)  # untouched
    assert checkpoint_names(tmp_path) == ["checkpoint_000001", "checkpoint_000002"]


def test_restore_latest_raises_when_no_checkpoint_even_lists(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 1)
    manager.save(model_at(2), 2)
    (Path(manager.path(1)) / MANIFEST_FILE).write_bytes(b"garbage")
    (Path(manager.path(2)) / MANIFEST_FILE).unlink()

    reopened = CheckpointManager(tmp_path)
    assert reopened.steps() == []
    with pytest.raises(CorruptCheckpointError) as info:
        reopened.restore_latest(Model(layers=2, width=8))

    assert f"{manager.path(1)}: " in str(info.value) and "unreadable" in str(info.value)
    assert f"{manager.path(2)}: " in str(info.value) and "has no manifest" in str(info.value)


def test_corrupt_ok_starts_over_with_a_warning_and_kwargs_pass_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 1)
    corrupt_payload(manager.path(1))
    calls: list[dict[str, Any]] = []

    class Recording(Model):
        def restore_from_path(self, path: Any, **kwargs: Any) -> None:
            calls.append(dict(kwargs))
            super().restore_from_path(path, **kwargs)

    with caplog.at_level(logging.WARNING, logger="ckptable"):
        step = manager.restore_latest(
            Recording(layers=2, width=8), corrupt_ok=True, rollback=False, safe=True
        )

    assert step is None
    assert "Starting over (corrupt_ok=True)" in caplog.text
    # The manager's own option is not passed on; everything else is, unchanged.
    assert calls == [{"filesystem": None, "rollback": False, "safe": True}]


def test_after_everything_was_corrupt_new_checkpoints_are_kept_not_the_corrupt_ones(
    tmp_path: Path,
) -> None:
    first = CheckpointManager(tmp_path)
    for step in (8, 9, 10):
        first.save(model_at(step), step)
        corrupt_payload(first.path(step))

    restarted = CheckpointManager(tmp_path, keep_last=2)
    assert restarted.restore_latest(Model(layers=2, width=8), corrupt_ok=True) is None
    paths = [restarted.save(model_at(step), step) for step in (1, 2, 3)]

    assert Path(paths[-1]).is_dir() and Path(paths[-2]).is_dir()
    assert restarted.steps() == [2, 3]
    assert sorted(restarted.invalid_checkpoints()) == [first.path(s) for s in (8, 9, 10)]
    # Left for the user, never deleted.
    assert checkpoint_names(tmp_path) == [
        "checkpoint_000002",
        "checkpoint_000003",
        "checkpoint_000008",
        "checkpoint_000009",
        "checkpoint_000010",
    ]

    # A manager that has not read them yet lists them (only a full read finds such damage)
    # and so refuses an older step rather than dropping it...
    again = CheckpointManager(tmp_path, keep_last=2)
    with pytest.raises(CheckpointError, match="step 10"):
        again.save(model_at(4), 4)
    # ...until its restore found them corrupt: it then falls back to the newest good one.
    assert again.restore_latest(Model(layers=2, width=8)) == 3
    again.save(model_at(4), 4)
    assert again.steps() == [3, 4]
    assert len(checkpoint_names(tmp_path)) == 5


def test_checkpoints_found_corrupt_stay_out_of_retention_after_a_reload(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        CheckpointManager(tmp_path).save(model_at(step), step)
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.steps() == [1, 2, 3, 4]
    corrupt_payload(manager.path(3))
    corrupt_payload(manager.path(4))

    assert manager.restore_latest(Model(layers=2, width=8)) == 2  # falls back past 4, 3
    manager.reload()  # the listing alone would take 3 and 4 for good ones
    assert manager.steps() == [1, 2]
    assert set(manager.invalid_checkpoints()) == {manager.path(3), manager.path(4)}

    path = manager.save(model_at(5), 5)

    assert Path(path).is_dir()
    assert manager.steps() == [2, 5]  # 2 is kept: 3 and 4 do not count in its place
    assert saved_epoch(manager.path(2)) == 2
    assert checkpoint_names(tmp_path) == [f"checkpoint_00000{s}" for s in (2, 3, 4, 5)]


def test_a_step_held_by_a_corrupt_checkpoint_is_replaced_only_with_overwrite(
    tmp_path: Path,
) -> None:
    manager = CheckpointManager(tmp_path)
    for step in (1, 2):
        manager.save(model_at(step), step)
    corrupt_payload(manager.path(2))
    assert manager.restore_latest(Model(layers=2, width=8)) == 1

    with pytest.raises(CheckpointError, match="is not a valid checkpoint"):
        manager.save(model_at(2), 2)
    assert manager.path(2) in manager.invalid_checkpoints()

    manager.save(model_at(2), 2, overwrite=True)
    assert manager.steps() == [1, 2] and manager.invalid_checkpoints() == {}
    fresh = Model(layers=2, width=8)
    assert manager.restore_latest(fresh) == 2 and fresh.epoch == 2


# --------------------------------------------------------------------------- 13: sharing


def run_writer(directory: Path, *args: str) -> list[str]:
    """Run ``manager_writer_child.py`` to the end; its output lines."""
    result = subprocess.run(
        [sys.executable, str(TESTS_DIR / "manager_writer_child.py"), str(directory), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=CHILD_ENV,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_step_check_sees_the_steps_another_process_saved(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    assert run_writer(tmp_path, "--first", "10") == ["saved 10 1"]

    with pytest.raises(CheckpointError, match="step 10"):
        manager.save(model_at(5), 5)
    assert manager.steps() == [10]
    assert checkpoint_names(tmp_path) == ["checkpoint_000010"]


def test_retention_counts_the_checkpoints_of_another_process(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(model_at(1), 1)
    lines = run_writer(tmp_path, "--keep-last", "2", "--first", "10", "--count", "2")
    assert lines == ["saved 10 1", "saved 11 1"]

    path = manager.save(model_at(12), 12)

    assert Path(path).is_dir()
    assert manager.steps() == [11, 12]
    assert checkpoint_names(tmp_path) == ["checkpoint_000011", "checkpoint_000012"]


@pytest.mark.parametrize(
    ("keep_best", "pause"),
    [(None, 0.02), (1, 0.02), (None, 0.0)],
    ids=["keep_last", "keep_last-keep_best", "keep_last-no-pause"],
)
def test_two_processes_saving_together_keep_exactly_what_retention_keeps(
    tmp_path: Path, keep_best: int | None, pause: float
) -> None:
    """Two processes save interleaved steps into one directory, one synchronously and
    one in the background. Each save sees the other's checkpoints: the directory ends
    with the keep_last newest of all the saves that returned (and the best one), and no
    save returned a path that was not there. (Without a pause between saves, one process
    mostly takes the lock again first, and the other's steps are refused as stale.)"""
    directory = tmp_path / "run"
    keep_last, count = 2, 12
    options = ["--keep-last", str(keep_last), "--count", str(count), "--stride", "2", "--wait"]
    options += ["--pause", str(pause)]
    if keep_best:
        options += ["--keep-best", str(keep_best)]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(TESTS_DIR / "manager_writer_child.py"),
                str(directory),
                *options,
                "--first",
                str(first),
                "--mode",
                mode,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
        )
        for first, mode in ((1, "sync"), (2, "async"))
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:  # both start saving at once
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (_, stderr) in zip(children, outputs, strict=True):
        assert child.returncode == 0, stderr

    lines = [line.split() for out, _ in outputs for line in out.splitlines()]
    saved = [int(step) for kind, step, _ in lines if kind == "saved"]
    assert all(ok == "1" for kind, _, ok in lines if kind == "saved"), lines
    assert {kind for kind, _, _ in lines} <= {"saved", "refused"}
    assert len(lines) == 2 * count
    assert len(saved) == len(set(saved)) >= keep_last

    expected = set(sorted(saved)[-keep_last:])
    if keep_best:
        expected.add(max(saved, key=lambda step: (-abs(step - 7.0), step)))
    manager = CheckpointManager(directory, keep_last=keep_last)
    assert set(manager.steps()) == expected
    assert manager.latest_step() == max(saved)
    assert manager.invalid_checkpoints() == {}
    # Nothing but checkpoints in the directory: no lock file, no leftovers.
    assert checkpoint_names(directory) == [f"checkpoint_{s:06d}" for s in sorted(expected)]
    for step in expected:
        ckptable.verify_checkpoint(manager.path(step))
        assert saved_epoch(manager.path(step)) == step


def test_restore_latest_lists_again_when_another_writer_deletes_what_it_restores(
    tmp_path: Path,
) -> None:
    CheckpointManager(tmp_path).save(model_at(2), 2)
    manager = CheckpointManager(tmp_path, keep_last=1)
    other = CheckpointManager(tmp_path, keep_last=1)  # another writer of the directory
    tried: list[str] = []

    class Racing(Model):
        def restore_from_path(self, path: Any, **kwargs: Any) -> None:
            tried.append(Path(path).name)
            if len(tried) == 1:
                other.save(model_at(3), 3)  # its retention deletes checkpoint 2 right now
            super().restore_from_path(path, **kwargs)

    fresh = Racing(layers=2, width=8)
    assert manager.restore_latest(fresh) == 3  # not an error, and not damage
    assert tried == ["checkpoint_000002", "checkpoint_000003"]
    assert fresh.epoch == 3
    assert manager.invalid_checkpoints() == {}


# --------------------------------------------------------------------------- object stores


@pytest.fixture(params=S3_BACKENDS)
def s3_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param, request)


def test_on_an_object_store_each_save_lists_the_directory_again(s3_backend: Backend) -> None:
    directory = s3_backend.path("run")
    first = CheckpointManager(directory, keep_last=2, **s3_backend.kw)
    second = CheckpointManager(directory, keep_last=2, **s3_backend.kw)
    first.save(model_at(1), 1)
    second.save(model_at(2), 2)
    second.save(model_at(3), 3)

    with pytest.raises(CheckpointError, match="older than the newest checkpoint, step 3"):
        first.save(model_at(1), 1)
    first.save(model_at(4), 4)

    assert first.steps() == [3, 4]
    assert not s3_backend.files("run", "checkpoint_000001")
    assert not s3_backend.files("run", "checkpoint_000002")
    assert CheckpointManager(directory, **s3_backend.kw).steps() == [3, 4]
