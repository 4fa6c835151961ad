"""CheckpointManager: numbered checkpoints, retention, listing that survives restarts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable import CheckpointManager, StateEncodingError
from ckptable._manifest import MANIFEST_FILE
from ckptable.manager import RECORD_FILE
from helpers import reseal
from test_remote_storage import S3_BACKENDS, Backend, make_backend
from trees import Model


def model_at(step: int) -> Model:
    model = Model(layers=2, width=8)
    model.epoch = step
    for i, leaf in enumerate(model.layers.values()):
        leaf.weights = np.full(8, step * 10 + i, dtype=np.float32)
    return model


def saved_epoch(path: str, **kw: Any) -> int:
    return Model.from_checkpoint(path, **kw).epoch


# --------------------------------------------------------------------------- saving, listing


def test_save_writes_a_numbered_checkpoint_that_restores_on_its_own(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run")

    path = manager.save(model_at(7), 7, {"reward": 1.5})

    assert path == str(tmp_path / "run" / "checkpoint_000007")
    assert saved_epoch(path) == 7
    assert manager.steps() == [7]
    assert manager.latest() == path and manager.latest_step() == 7
    assert manager.metrics(7) == {"reward": 1.5}
    # The manager's record is part of the checkpoint: listed in the manifest, verified.
    report = ckptable.verify_checkpoint(path)
    assert report.files >= 4
    manifest = json.loads((Path(path) / MANIFEST_FILE).read_text())["ckptable_manifest"]
    assert RECORD_FILE in manifest["files"]
    record = json.loads((Path(path) / RECORD_FILE).read_text())
    assert record["step"] == 7 and record["metrics"] == {"reward": 1.5}


def test_steps_wider_than_the_padding_and_step_zero(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(0), 0)
    manager.save(model_at(1), 1_234_567)

    assert manager.steps() == [0, 1_234_567]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000000", "checkpoint_1234567"]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 5, {"loss": 1.0})
    manager.save(model_at(2), 5, {"loss": 0.5}, overwrite=True)

    assert manager.steps() == [5]
    assert saved_epoch(manager.path(5)) == 2
    assert manager.metrics(5) == {"loss": 0.5}


def test_numpy_metrics_are_stored_as_numbers(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_best=1, metric="score", mode="max")
    manager.save(model_at(1), 1, {"score": np.float32(2.5), "n": np.int64(3)})

    assert CheckpointManager(tmp_path).metrics(1) == {"score": 2.5, "n": 3}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_last": True}, "keep_last"),
        ({"keep_best": 2}, "metric"),
        ({"keep_best": -1, "metric": "x"}, "keep_best"),
        ({"mode": "maximum"}, "mode"),
        ({"max_in_flight": 0}, "max_in_flight"),
    ],
)
def test_invalid_settings_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CheckpointManager(tmp_path, **kwargs)


@pytest.mark.parametrize("step", [-1, 1.0, True, "3", None])
def test_invalid_steps_are_refused_before_anything_is_written(tmp_path: Path, step: Any) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="step"):
        manager.save(model_at(1), step)
    assert os.listdir(tmp_path) == []


def test_metrics_that_json_cannot_hold_are_refused_before_saving(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="step 3 cannot be saved as JSON"):
        manager.save(model_at(1), 3, {"model": object()})
    with pytest.raises(TypeError, match="mapping"):
        manager.save(model_at(1), 3, [("a", 1)])  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_best_needs_a_metric(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metric"):
        CheckpointManager(tmp_path).best()


# --------------------------------------------------------------------------- retention


def test_keep_last_deletes_the_oldest_after_each_save(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        manager.save(model_at(step), step)
        assert manager.steps() == list(range(max(1, step - 1), step + 1))

    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000004", "checkpoint_000005"]
    assert [saved_epoch(manager.path(s)) for s in manager.steps()] == [4, 5]


@pytest.mark.parametrize(
    ("mode", "best_steps"),
    [("max", {2, 4}), ("min", {3, 1})],
)
def test_keep_best_keeps_the_best_by_metric_and_the_newest(
    tmp_path: Path, mode: str, best_steps: set[int]
) -> None:
    scores = {1: 2.0, 2: 9.0, 3: 0.5, 4: 7.0, 5: 3.0}
    manager = CheckpointManager(tmp_path, keep_best=2, metric="score", mode=mode)  # type: ignore[arg-type]
    for step, score in scores.items():
        manager.save(model_at(step), step, {"score": score})

    assert set(manager.steps()) == best_steps | {5}  # 5: the newest, always kept
    best = (
        max(best_steps, key=scores.__getitem__)
        if mode == "max"
        else min(best_steps, key=scores.__getitem__)
    )
    assert manager.best() == manager.path(best)


def test_keep_last_and_keep_best_together(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="acc", mode="max")
    for step, acc in [(1, 0.9), (2, 0.1), (3, 0.2), (4, 0.3), (5, 0.4)]:
        manager.save(model_at(step), step, {"acc": acc})

    assert manager.steps() == [1, 4, 5]
    assert manager.best() == manager.path(1)


def test_ties_rank_the_newest_first(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_best=1, metric="acc", mode="max")
    for step in (1, 2, 3):
        manager.save(model_at(step), step, {"acc": 0.5})
    assert manager.best() == manager.path(3)
    assert manager.steps() == [3]


def test_checkpoints_without_the_metric_are_not_ranked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path, keep_best=1, metric="acc", mode="max")
    manager.save(model_at(1), 1, {"acc": 0.5})
    with caplog.at_level(logging.WARNING, logger="ckptable"):
        manager.save(model_at(2), 2, {"loss": 3.0})
        manager.save(model_at(3), 3, {"acc": float("nan")})
    assert "saved without the metric 'acc'" in caplog.text
    manager.save(model_at(4), 4, {"acc": 0.1})

    assert manager.steps() == [1, 4]  # 2 and 3 had no usable metric: not kept for it
    assert manager.best() == manager.path(1)


def test_keep_last_one_always_keeps_the_newest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2, 3):
        manager.save(model_at(step), step)
        assert manager.steps() == [step]


def test_nothing_is_deleted_when_the_new_save_fails(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(model_at(1), 1)
    broken = model_at(2)
    broken.epoch = threading.Lock()  # type: ignore[assignment]  # cannot be pickled

    with pytest.raises(StateEncodingError):
        manager.save(broken, 2)

    assert manager.steps() == [1]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000001"]
    assert saved_epoch(manager.path(1)) == 1


def test_without_limits_nothing_is_deleted(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    for step in range(5):
        manager.save(model_at(step), step, {"x": step})
    assert manager.steps() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- invalid dirs


def test_incomplete_and_corrupt_directories_are_reported_not_listed_nor_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(model_at(1), 1)
    # A save that never finished (or still runs elsewhere): no manifest.
    incomplete = tmp_path / "checkpoint_000009"
    shutil.copytree(manager.path(1), incomplete)
    (incomplete / MANIFEST_FILE).unlink()
    # A damaged manifest.
    damaged = tmp_path / "checkpoint_000008"
    shutil.copytree(manager.path(1), damaged)
    (damaged / MANIFEST_FILE).write_bytes(b"garbage")
    # A file added after the save.
    extra = tmp_path / "checkpoint_000007"
    shutil.copytree(manager.path(1), extra)
    (extra / "notes.txt").write_text("x")
    # Another step's checkpoint copied under this name: its record says step 1.
    renamed = tmp_path / "checkpoint_000006"
    shutil.copytree(manager.path(1), renamed)
    # Not ours: ignored silently.
    (tmp_path / "checkpoint_5").mkdir()
    (tmp_path / "notes").mkdir()

    with caplog.at_level(logging.WARNING, logger="ckptable"):
        reopened = CheckpointManager(tmp_path, keep_last=1)

    assert reopened.steps() == [1]
    invalid = reopened.invalid_checkpoints()
    assert set(invalid) == {str(p) for p in (incomplete, damaged, extra, renamed)}
    assert "has no manifest" in invalid[str(incomplete)]
    assert "unreadable" in invalid[str(damaged)]
    assert "notes.txt" in invalid[str(extra)]
    assert "not the record of step 6" in invalid[str(renamed)]
    assert str(incomplete) in caplog.text
    # Retention never touches them (a save may be running elsewhere).
    reopened.save(model_at(2), 2)
    assert reopened.steps() == [2]
    assert all(p.is_dir() for p in (incomplete, damaged, extra, renamed))


def test_a_checkpoint_saved_without_the_manager_is_listed_without_metrics(tmp_path: Path) -> None:
    model_at(3).save_to_path(tmp_path / "checkpoint_000003")
    manager = CheckpointManager(tmp_path)
    assert manager.steps() == [3]
    assert manager.metrics(3) is None


# --------------------------------------------------------------------------- restarts


def test_steps_and_metrics_survive_a_new_manager(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path, keep_best=2, metric="score", mode="max")
    for step, score in [(1, 1.0), (2, 5.0), (3, 2.0)]:
        first.save(model_at(step), step, {"score": score})

    second = CheckpointManager(tmp_path, keep_best=2, metric="score", mode="max")

    assert second.steps() == [2, 3]
    assert second.metrics(2) == {"score": 5.0}
    assert second.best() == second.path(2)
    second.save(model_at(4), 4, {"score": 3.0})
    assert second.steps() == [2, 4]


def test_restore_latest(tmp_path: Path, states_equal: Any) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.restore_latest(Model(layers=2, width=8)) is None
    for step in (1, 2):
        manager.save(model_at(step), step)

    fresh = Model(layers=2, width=8)
    assert CheckpointManager(tmp_path).restore_latest(fresh) == 2
    states_equal(fresh.get_state(), model_at(2).get_state())


def test_restore_latest_of_one_component(tmp_path: Path, states_equal: Any) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(4), 4)
    fresh = Model(layers=2, width=8)
    before = fresh.get_state()

    assert manager.restore_latest(fresh, component="layer1") == 4
    after = fresh.get_state()
    states_equal(after["layer1"], model_at(4).get_state()["layer1"])
    states_equal(after["layer0"], before["layer0"])
    assert after["epoch"] == before["epoch"]


def test_restore_latest_skips_a_damaged_checkpoint_and_reports_it(
    tmp_path: Path, states_equal: Any, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 1)
    manager.save(model_at(2), 2)
    state_file = Path(manager.path(2)) / "layer0" / "state.pkl"
    data = bytearray(state_file.read_bytes())
    data[-5] ^= 0xFF
    state_file.write_bytes(bytes(data))
    fresh = Model(layers=2, width=8)

    with caplog.at_level(logging.WARNING, logger="ckptable"):
        assert manager.restore_latest(fresh) == 1

    states_equal(fresh.get_state(), model_at(1).get_state())
    assert "corrupt" in manager.invalid_checkpoints()[manager.path(2)]
    assert manager.steps() == [1]
    assert "Not restoring" in caplog.text


def test_restore_latest_raises_other_errors(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 1)
    with pytest.raises(ckptable.CheckpointNotFoundError, match="nope"):
        manager.restore_latest(Model(layers=2, width=8), component="nope")


def test_a_deletion_interrupted_after_its_first_step_is_finished_by_the_next_manager(
    tmp_path: Path,
) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 1)
    manager.save(model_at(2), 2)
    # The first step of a local deletion: renamed out of the listing.
    os.rename(manager.path(1), tmp_path / ".checkpoint_000001.ckptable-deleting-abc")

    reopened = CheckpointManager(tmp_path)

    assert reopened.steps() == [2]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000002"]
    assert reopened.invalid_checkpoints() == {}


# --------------------------------------------------------------------------- object stores


@pytest.fixture(params=S3_BACKENDS)
def s3_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param, request)


def test_retention_and_restart_on_an_object_store(s3_backend: Backend, states_equal: Any) -> None:
    directory = s3_backend.path("run")
    manager = CheckpointManager(directory, keep_last=2, **s3_backend.kw)
    for step in (1, 2, 3):
        manager.save(model_at(step), step, {"step": step})

    assert manager.steps() == [2, 3]
    assert manager.latest() == s3_backend.path("run", "checkpoint_000003")
    assert not s3_backend.files("run", "checkpoint_000001")
    reopened = CheckpointManager(directory, keep_last=2, **s3_backend.kw)
    assert reopened.steps() == [2, 3]
    assert reopened.metrics(3) == {"step": 3}
    fresh = Model(layers=2, width=8)
    assert reopened.restore_latest(fresh) == 3
    states_equal(fresh.get_state(), model_at(3).get_state())


def test_an_object_store_deletion_interrupted_midway_is_finished_later(
    s3_backend: Backend,
) -> None:
    directory = s3_backend.path("run")
    manager = CheckpointManager(directory, **s3_backend.kw)
    manager.save(model_at(1), 1)
    manager.save(model_at(2), 2)
    # What _delete does first on an object store: the marker, then the manifest.
    storage, root = ckptable._storage.resolve_storage(directory, s3_backend.filesystem)
    first = storage.join(root, "checkpoint_000001")
    storage.write_bytes(storage.join(first, ".ckptable-deleting"), b"")
    storage.remove_tree(storage.join(first, MANIFEST_FILE))

    reopened = CheckpointManager(directory, **s3_backend.kw)

    assert reopened.steps() == [2]
    assert reopened.invalid_checkpoints() == {}
    assert not s3_backend.files("run", "checkpoint_000001")


def test_an_incomplete_object_store_checkpoint_is_reported(s3_backend: Backend) -> None:
    directory = s3_backend.path("run")
    manager = CheckpointManager(directory, **s3_backend.kw)
    manager.save(model_at(1), 1)
    storage, root = ckptable._storage.resolve_storage(directory, s3_backend.filesystem)
    storage.write_bytes(storage.join(root, "checkpoint_000002", "state.pkl"), b"partial")

    reopened = CheckpointManager(directory, **s3_backend.kw)

    assert reopened.steps() == [1]
    assert list(reopened.invalid_checkpoints()) == [s3_backend.path("run", "checkpoint_000002")]


def test_a_checkpoint_edited_then_resealed_is_listed_again(tmp_path: Path) -> None:
    """A checkpoint a test reseals after editing is listed again (the listing checks the
    manifest, not how the files came to be)."""
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 1)
    (Path(manager.path(1)) / "notes.txt").write_text("x")
    assert CheckpointManager(tmp_path).steps() == []
    reseal(manager.path(1))
    assert CheckpointManager(tmp_path).steps() == [1]


def test_leftovers_of_killed_saves_are_repaired_before_the_listing(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(model_at(1), 1)
    manager.save(model_at(2), 2)
    # A two-step publish of step 2 killed between its renames: the old tree aside, no
    # target. And an abandoned staging tree of step 3 (no process holds its lock).
    os.rename(manager.path(2), tmp_path / ".checkpoint_000002.ckptable-old-abc")
    (tmp_path / ".checkpoint_000003.ckptable-staging-def").mkdir()

    reopened = CheckpointManager(tmp_path)

    assert reopened.steps() == [1, 2]
    assert saved_epoch(reopened.path(2)) == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000001", "checkpoint_000002"]
