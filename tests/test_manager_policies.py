"""CheckpointManager's save and keep policies over many steps: ``save_interval_steps`` and
``should_save``, ``keep_period``, ``keep_every_seconds``, ``mode`` required with
``metric``; with restarts (new managers on the same directory, and processes killed with
SIGKILL), damaged checkpoints, and on object stores as on local disks.

Save times come from a fake clock (``ckptable._manager_steps.time``, the one clock the
manager records) except in the SIGKILL tests, which run on the real one.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptable
import ckptable._manager_steps
from ckptable import CheckpointManager
from ckptable._manifest import MANIFEST_FILE
from ckptable.manager import RECORD_FILE
from manager_policies_child import KEEP_LAST, KEEP_PERIOD, SAVE_INTERVAL_STEPS, expected_total
from test_docs import code_blocks
from test_manager import model_at, saved_epoch
from test_remote_storage import make_backend, memory_root  # noqa: F401 (a fixture)
from trees import Model

TESTS_DIR = Path(__file__).resolve().parent
DOCS = TESTS_DIR.parent / "docs"
#: A start time on a multiple of every interval the tests use.
T0 = 1_700_000_000.0


class Clock:
    """Stands in for the ``time`` module of ``ckptable._manager_steps``."""

    def __init__(self) -> None:
        self.now = T0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(ckptable._manager_steps, "time", fake)
    return fake


def saved_at(path: str | Path) -> float:
    return float(json.loads((Path(path) / RECORD_FILE).read_text())["saved_at"])


# --------------------------------------------------------------------------- mode


def test_metric_without_mode_is_refused_naming_both_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode=") as caught:
        CheckpointManager(tmp_path, keep_best=2, metric="loss")
    message = str(caught.value)
    assert "metric='loss'" in message
    assert '"max"' in message and '"min"' in message
    assert os.listdir(tmp_path) == []  # refused before anything is written
    with pytest.raises(ValueError, match="mode="):
        CheckpointManager(tmp_path, metric="reward")  # best() alone needs it too


def test_repr_shows_mode_and_every_policy(tmp_path: Path) -> None:
    manager = CheckpointManager(
        tmp_path,
        keep_last=3,
        keep_best=1,
        metric="loss",
        mode="min",
        keep_period=100,
        keep_every_seconds=datetime.timedelta(hours=1),
        save_interval_steps=10,
    )
    assert repr(manager) == (
        f"CheckpointManager({str(tmp_path)!r}, keep_last=3, keep_best=1, metric='loss', "
        "mode='min', keep_period=100, keep_every_seconds=3600.0, save_interval_steps=10)"
    )
    assert "mode=None" in repr(CheckpointManager(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_period": 0}, "keep_period"),
        ({"keep_period": 2.0}, "keep_period"),
        ({"save_interval_steps": 0}, "save_interval_steps"),
        ({"save_interval_steps": True}, "save_interval_steps"),
        ({"keep_every_seconds": 0}, "keep_every_seconds"),
        ({"keep_every_seconds": -5.0}, "keep_every_seconds"),
        ({"keep_every_seconds": math.nan}, "keep_every_seconds"),
        ({"keep_every_seconds": math.inf}, "keep_every_seconds"),
        ({"keep_every_seconds": "60"}, "keep_every_seconds"),
        ({"keep_every_seconds": True}, "keep_every_seconds"),
        ({"keep_every_seconds": datetime.timedelta(0)}, "keep_every_seconds"),
        ({"keep_period": 25, "save_interval_steps": 10}, "not a multiple"),
        ({"metric": "x", "mode": "lowest"}, "mode"),
    ],
)
def test_invalid_policies_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CheckpointManager(tmp_path, **kwargs)


def test_the_record_names_the_metric_and_mode(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, metric="loss", mode="min")
    path = manager.save(model_at(1), 1, {"loss": 0.5})
    assert path is not None
    record = json.loads((Path(path) / RECORD_FILE).read_text())
    assert (record["metric"], record["mode"], record["metrics"]) == ("loss", "min", {"loss": 0.5})


# --------------------------------------------------------------------------- save interval


def due(manager: CheckpointManager, steps: range) -> list[int]:
    return [step for step in steps if manager.should_save(step)]


def test_should_save_follows_the_interval_and_steps_only_move_forward(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, save_interval_steps=5)
    assert due(manager, range(21)) == [0, 5, 10, 15, 20]

    manager.save(model_at(10), 10)

    assert due(manager, range(21)) == [15, 20]
    restarted = CheckpointManager(tmp_path, save_interval_steps=5)
    assert due(restarted, range(21)) == [15, 20]  # the grid counts steps, not saves
    with pytest.raises(ValueError, match="step"):
        manager.should_save(-1)


def test_without_an_interval_should_save_only_asks_that_steps_move_forward(
    tmp_path: Path,
) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(3), 3)
    assert due(manager, range(6)) == [4, 5]


def test_should_save_counts_the_async_saves_in_flight(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, save_interval_steps=2)
    release = threading.Event()
    real_save_now = manager._save_now

    def slow_save_now(*args: Any, **kwargs: Any) -> str:
        release.wait(timeout=30)
        return real_save_now(*args, **kwargs)

    manager._save_now = slow_save_now  # type: ignore[method-assign]
    future = manager.save_async(model_at(4), 4)
    try:
        assert due(manager, range(8)) == [6]
    finally:
        release.set()
    assert future.result(timeout=60) == manager.path(4)


def test_a_step_off_the_interval_is_skipped_unless_forced(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, save_interval_steps=10)

    assert manager.save(model_at(7), 7) is None

    assert os.listdir(tmp_path) == []
    assert manager.steps() == []
    forced = manager.save(model_at(7), 7, force=True)
    assert forced == manager.path(7) and saved_epoch(forced) == 7
    assert manager.save(model_at(10), 10) == manager.path(10)
    assert manager.steps() == [7, 10]


def test_save_async_of_a_skipped_step_returns_a_finished_future_of_none(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, save_interval_steps=10)

    future = manager.save_async(model_at(3), 3)

    assert future.done() and future.result() is None
    assert os.listdir(tmp_path) == []
    assert manager.save_async(model_at(3), 3, force=True).result(timeout=60) == manager.path(3)
    manager.close()


def test_a_skipped_step_still_has_its_arguments_checked(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, save_interval_steps=10)
    with pytest.raises(ValueError, match="step"):
        manager.save(model_at(1), -3)
    with pytest.raises(ValueError, match="cannot be saved as JSON"):
        manager.save(model_at(1), 3, {"model": object()})


def test_an_orbax_style_loop_saves_on_the_grid_across_restarts(tmp_path: Path) -> None:
    """``save`` at every step; new managers (restarts) at steps 23 and 41."""
    settings: dict[str, Any] = {"keep_last": 2, "keep_period": 20, "save_interval_steps": 10}
    manager = CheckpointManager(tmp_path, **settings)
    returned = {}
    for step in range(1, 58):
        if step in (23, 41):
            manager = CheckpointManager(tmp_path, **settings)
        returned[step] = manager.save(model_at(step), step)

    assert [s for s, path in returned.items() if path is not None] == [10, 20, 30, 40, 50]
    assert manager.steps() == [20, 40, 50]  # 20, 40: keep_period; 40, 50: keep_last
    assert [saved_epoch(manager.path(s)) for s in manager.steps()] == [20, 40, 50]


# --------------------------------------------------------------------------- keep_period


def test_keep_period_keeps_every_nth_step_for_ever_across_restarts(tmp_path: Path) -> None:
    settings: dict[str, Any] = {"keep_last": 2, "keep_period": 10}
    manager = CheckpointManager(tmp_path, **settings)
    for step in range(1, 36):
        if step % 7 == 0:
            manager = CheckpointManager(tmp_path, **settings)
        manager.save(model_at(step), step)
        periodic = set(range(10, step + 1, 10))
        assert manager.steps() == sorted(periodic | {max(1, step - 1), step}), step

    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint_000010",
        "checkpoint_000020",
        "checkpoint_000030",
        "checkpoint_000034",
        "checkpoint_000035",
    ]


def test_keep_period_with_keep_best(tmp_path: Path) -> None:
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.7, 5: 0.8, 6: 0.6, 7: 0.3, 8: 0.4}
    manager = CheckpointManager(tmp_path, keep_best=1, metric="loss", mode="min", keep_period=3)
    for step, loss in losses.items():
        manager.save(model_at(step), step, {"loss": loss})

    assert manager.steps() == [2, 3, 6, 8]  # 2: best; 3, 6: period; 8: newest
    assert manager.best() == manager.path(2)


def test_keep_period_and_keep_every_seconds_alone_delete_nothing(
    tmp_path: Path, clock: Clock
) -> None:
    manager = CheckpointManager(tmp_path, keep_period=5, keep_every_seconds=60)
    for step in range(1, 8):
        clock.now = T0 + 10 * step
        manager.save(model_at(step), step)
    assert manager.steps() == list(range(1, 8))


# --------------------------------------------------------------------------- keep_every_seconds


def first_of_each_interval(times: dict[int, float], seconds: float) -> set[int]:
    """The expected keepers, computed plainly: the earliest step of each interval."""
    first: dict[int, int] = {}
    for step in sorted(times):
        first.setdefault(int(times[step] // seconds), step)
    return set(first.values())


def test_keep_every_seconds_keeps_the_first_checkpoint_of_each_interval_across_restarts(
    tmp_path: Path, clock: Clock
) -> None:
    """Saves 30 s apart, one kept per 100 s; a new manager every 4 steps, half of them
    configured with a timedelta."""
    times: dict[int, float] = {}
    manager = None
    for step in range(1, 31):
        if step % 4 == 1:
            every: Any = 100 if step % 8 == 1 else datetime.timedelta(seconds=100)
            manager = CheckpointManager(tmp_path, keep_last=1, keep_every_seconds=every)
        assert manager is not None
        clock.now = times[step] = T0 + 30 * (step - 1)
        manager.save(model_at(step), step)
        expected = first_of_each_interval(times, 100) | {step}
        assert manager.steps() == sorted(expected), step

    assert manager.steps() == [1, 5, 8, 11, 15, 18, 21, 25, 28, 30]
    for step in manager.steps():
        assert saved_at(manager.path(step)) == times[step]


def test_the_time_rule_reads_recorded_times_not_the_clock_of_a_restart(
    tmp_path: Path, clock: Clock
) -> None:
    first = CheckpointManager(tmp_path, keep_last=1, keep_every_seconds=3600)
    for step, offset in [(1, 0), (2, 600), (3, 3700), (4, 4000)]:
        clock.now = T0 + offset
        first.save(model_at(step), step)
    assert first.steps() == [1, 3, 4]

    clock.now = T0 + 10 * 86_400  # the restart happens ten days later
    restarted = CheckpointManager(tmp_path, keep_last=1, keep_every_seconds=3600)
    restarted.save(model_at(5), 5)

    assert restarted.steps() == [1, 3, 5]  # 5 is the first of its own hour, too
    clock.now += 60
    restarted.save(model_at(6), 6)
    assert restarted.steps() == [1, 3, 5, 6]
    clock.now += 60
    restarted.save(model_at(7), 7)
    assert restarted.steps() == [1, 3, 5, 7]


def test_a_checkpoint_without_a_recorded_time_is_not_kept_by_the_time_rule(
    tmp_path: Path, clock: Clock
) -> None:
    model_at(1).save_to_path(tmp_path / "checkpoint_000001")  # saved without a manager
    manager = CheckpointManager(tmp_path, keep_last=1, keep_every_seconds=100)
    clock.now = T0 + 10
    manager.save(model_at(2), 2)
    clock.now = T0 + 20
    manager.save(model_at(3), 3)

    assert manager.steps() == [2, 3]


# --------------------------------------------------------------------------- damage, newest


def test_damaged_checkpoints_are_never_deleted_nor_counted_by_any_rule(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    settings: dict[str, Any] = {"keep_last": 1, "keep_period": 10, "keep_every_seconds": 100}
    manager = CheckpointManager(tmp_path, **settings)
    for step in (1, 2, 3):
        clock.now = T0 + 10 * step
        manager.save(model_at(step), step)
    assert manager.steps() == [1, 3]  # 1: first of its interval; 3: newest
    # The first of the interval is damaged (its manifest lost), and a damaged copy sits
    # on a period step: neither keeps a place, neither is deleted.
    (Path(manager.path(1)) / MANIFEST_FILE).unlink()
    shutil.copytree(manager.path(3), tmp_path / "checkpoint_000010")
    (tmp_path / "checkpoint_000010" / "notes.txt").write_text("added")

    with caplog.at_level(logging.WARNING, logger="ckptable"):
        restarted = CheckpointManager(tmp_path, **settings)
    assert restarted.steps() == [3]
    clock.now = T0 + 40
    restarted.save(model_at(11), 11, overwrite=True)  # after the damaged step 10
    clock.now = T0 + 50
    restarted.save(model_at(12), 12)

    # 3: now the first valid checkpoint of its interval; 12: newest; 11 went.
    assert restarted.steps() == [3, 12]
    assert set(restarted.invalid_checkpoints()) == {manager.path(1), manager.path(10)}
    assert Path(manager.path(1)).is_dir() and (tmp_path / "checkpoint_000010").is_dir()


def test_the_checkpoint_just_written_is_kept_whatever_the_policies_say(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1, keep_period=10)
    for step in (10, 11, 12):
        manager.save(model_at(step), step)
    assert manager.steps() == [10, 12]

    older = manager.save(model_at(5), 5, overwrite=True)  # off the period, older than 12

    assert older == manager.path(5) and Path(older).is_dir()
    assert manager.steps() == [5, 10, 12]
    manager.save(model_at(13), 13)
    assert manager.steps() == [10, 13]


# --------------------------------------------------------------------------- local and URIs


PLACES = ["local", "fsspec-memory-uri", "pyarrow-s3-uri"]


@pytest.fixture(params=PLACES)
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict]]:
    """(directory, extra kwargs) of a manager's directory on each kind of storage."""
    if request.param == "local":
        yield str(tmp_path / "run"), {}
    else:
        backend = make_backend(request.param, request)
        yield backend.path("run"), backend.kw


def test_policies_latest_best_and_restore_latest_agree_on_local_paths_and_uris(
    place: tuple[str, dict], clock: Clock, states_equal: Any
) -> None:
    """The same loop (``save`` at every step, a restart midway) keeps the same
    checkpoints and answers the same on a local disk, fsspec's memory and S3."""
    directory, kw = place
    settings: dict[str, Any] = {
        "keep_last": 2,
        "keep_best": 1,
        "metric": "loss",
        "mode": "min",
        "keep_period": 8,
        "keep_every_seconds": 200,
        "save_interval_steps": 2,
        **kw,
    }
    manager = CheckpointManager(directory, **settings)
    for step in range(1, 26):
        if step == 13:
            manager = CheckpointManager(directory, **settings)
        clock.now = T0 + 20 * step
        manager.save(model_at(step), step, {"loss": abs(step - 14.0)})

    # 2, 10, 20: first of each 200 s; 8, 16, 24: period; 14: best; 22, 24: newest.
    expected = [2, 8, 10, 14, 16, 20, 22, 24]
    assert manager.steps() == expected
    reopened = CheckpointManager(directory, **settings)
    assert reopened.steps() == expected
    assert reopened.latest() == reopened.path(24)
    assert reopened.best() == reopened.path(14)
    assert reopened.should_save(26) and not reopened.should_save(24)
    fresh = Model(layers=2, width=8)
    assert reopened.restore_latest(fresh) == 24
    states_equal(fresh.get_state(), model_at(24).get_state())
    best = Model.from_checkpoint(reopened.best(), **kw)
    assert best.epoch == 14


# --------------------------------------------------------------------------- SIGKILL


def resume_loop_block() -> str:
    """The resume-after-preemption loop of docs/checkpoint-manager.md, as written."""
    page = DOCS / "checkpoint-manager.md"
    blocks = [
        b.code
        for b in code_blocks(page.read_text())
        if b.lang == "python" and "should_save" in b.code and "restore_latest" in b.code
    ]
    assert len(blocks) == 1, "the page shows one resume loop"
    assert len(blocks[0].strip().splitlines()) <= 13
    return blocks[0]


def run_resume_loop(workdir: Path, kill_at: int | None) -> subprocess.CompletedProcess[str]:
    script = "from manager_policies_child import Trainer\n" + resume_loop_block()
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
    if kill_at is not None:
        env["CKPTABLE_KILL_AT"] = str(kill_at)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_the_documented_resume_loop_survives_sigkill(tmp_path: Path) -> None:
    """The page's loop, killed with SIGKILL at two steps and run again each time, ends
    with the state of a run never interrupted and the checkpoints the page promises."""
    directory = tmp_path / "runs" / "ppo"
    for kill_at in (2351, 7777):
        result = run_resume_loop(tmp_path, kill_at)
        assert result.returncode == -9, result.stderr
        manager = CheckpointManager(directory, keep_last=3, metric="loss", mode="min")
        newest = manager.latest_step()
        assert newest is not None and newest % 100 == 0 and newest < kill_at
        assert manager.invalid_checkpoints() == {}
        assert set(range(1000, newest + 1, 1000)) <= set(manager.steps())

    result = run_resume_loop(tmp_path, None)

    assert result.returncode == 0, result.stderr
    manager = CheckpointManager(directory, keep_last=3, metric="loss", mode="min")
    assert manager.steps() == [*range(1000, 10_000, 1000), 9800, 9900, 10_000]
    from manager_policies_child import Trainer

    final = Trainer()
    assert manager.restore_latest(final) == 10_000
    assert (final.step, final.total) == (10_000, expected_total(10_000))
    assert manager.best() == manager.path(10_000)  # the loss falls at every step


def run_until_killed(
    directory: Path, seconds: float, rng: random.Random
) -> list[tuple[int, float]]:
    """Start ``manager_policies_child.main``, let it publish a few checkpoints, kill it
    with SIGKILL at a random moment; return the (step, saved_at) it reported."""
    child = subprocess.Popen(
        [
            sys.executable,
            str(TESTS_DIR / "manager_policies_child.py"),
            str(directory),
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
    )
    assert child.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")))
    reader.start()
    deadline = time.monotonic() + 60
    while sum(line.startswith("published") for line in lines) < 5:
        assert child.poll() is None, "the child died on its own"
        assert time.monotonic() < deadline, "the child published nothing"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 3 * seconds))
    child.kill()  # SIGKILL
    child.wait(timeout=30)
    reader.join(timeout=30)
    published = []
    for line in lines:
        if line.startswith("published"):
            _, step, when = line.split()
            published.append((int(step), float(when)))
    return published


@pytest.mark.slow
def test_keep_policies_hold_when_the_saving_process_is_killed(tmp_path: Path) -> None:
    """Every policy on at once, real clock, four SIGKILLs: after each, a new manager
    lists only whole checkpoints on the save grid, every period step up to the newest,
    a checkpoint in every time interval any published one fell in, and every checkpoint
    an earlier round found kept by time."""
    from manager_policies_child import make_manager

    seconds = 0.25
    rng = random.Random(int(os.environ.get("CKPTABLE_CRASH_SEED", "11")))
    directory = tmp_path / "run"
    published: list[tuple[int, float]] = []
    kept_by_time: set[int] = set()
    for _ in range(4):
        published += run_until_killed(directory, seconds, rng)

        manager = make_manager(str(directory), seconds)

        steps = manager.steps()
        assert manager.invalid_checkpoints() == {}
        assert steps[-1] >= max(step for step, _ in published)
        assert all(step % SAVE_INTERVAL_STEPS == 0 for step in steps)
        assert set(range(KEEP_PERIOD, steps[-1] + 1, KEEP_PERIOD)) <= set(steps)
        times = {step: saved_at(manager.path(step)) for step in steps}
        intervals = {math.floor(when / seconds) for when in times.values()}
        for step, when in published:
            assert math.floor(when / seconds) in intervals, (step, when)
        assert kept_by_time <= set(steps)
        kept_by_time = first_of_each_interval(times, seconds)
        assert len(set(steps) - kept_by_time - set(range(0, steps[-1] + 1, KEEP_PERIOD))) <= (
            KEEP_LAST + 1  # retention may not have run after the last save
        )
        for step in steps[-KEEP_LAST:]:
            ckptable.verify_checkpoint(manager.path(step))
            assert Model.from_checkpoint(manager.path(step)).epoch == step
