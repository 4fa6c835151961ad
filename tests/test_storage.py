"""Storage: the local fast path and pyarrow filesystems (as RLlib's ``filesystem=``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest

import ckptable
from ckptable._storage import LocalStorage, PyArrowStorage, resolve_storage
from trees import Leaf, Model, Node, trained_model


def test_a_pyarrow_local_filesystem_takes_the_local_fast_path(tmp_path: Path) -> None:
    storage, path = resolve_storage(str(tmp_path), pyarrow.fs.LocalFileSystem())

    assert isinstance(storage, LocalStorage) and path == str(tmp_path)


def test_save_and_restore_through_a_pyarrow_subtree_filesystem(
    tmp_path: Path, states_equal: Any
) -> None:
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    model = trained_model()

    returned = model.save_to_path("ckpts/one", filesystem=fs)

    assert returned == "ckpts/one"
    assert (tmp_path / "ckpts" / "one" / "optimizer" / "moments" / "state.pkl").is_file()
    restored = Model.from_checkpoint("ckpts/one", filesystem=fs)
    states_equal(restored.get_state(), model.get_state())
    fresh = Model()
    fresh.restore_from_path("ckpts/one/optimizer", component="optimizer", filesystem=fs)
    assert fresh.optimizer.config["lr"] == 0.01
    assert ckptable.get_checkpoint_info("ckpts/one", filesystem=fs)["class"] == "trees.Model"


def test_saving_over_a_checkpoint_through_pyarrow_replaces_it_whole(tmp_path: Path) -> None:
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    Node({"old": Leaf()}).save_to_path("ckpt", filesystem=fs, use_msgpack=True)

    Node({"new": Leaf()}).save_to_path("ckpt", filesystem=fs)

    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        ".ckptable-manifest.json", "class_and_ctor_args.pkl", "metadata.json", "new", "state.pkl"
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_pyarrow_storage_pickles_for_travel_to_workers(tmp_path: Path) -> None:
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    storage = PyArrowStorage(fs, "")

    copy = pickle.loads(pickle.dumps(storage))

    assert copy.filesystem.equals(fs)
    assert isinstance(pickle.loads(pickle.dumps(LocalStorage())), LocalStorage)


def test_a_filesystem_that_is_not_pyarrow_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ckptable.CheckpointError, match="not a pyarrow.fs.FileSystem"):
        Leaf().save_to_path(tmp_path, filesystem=object())


def test_an_unknown_uri_scheme_gives_a_clear_error() -> None:
    with pytest.raises(ckptable.CheckpointError, match="nosuchscheme://bucket/x"):
        Leaf().save_to_path("nosuchscheme://bucket/x")


def test_an_empty_path_is_refused() -> None:
    with pytest.raises(ckptable.CheckpointError, match="non-empty"):
        Leaf().restore_from_path("")


def test_home_relative_paths_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    returned = trained_model().save_to_path("~/ckpt")

    assert returned == str(tmp_path / "ckpt")
    assert Model.from_checkpoint("~/ckpt").epoch == 9


def test_pyarrow_filesystems_write_in_place_with_the_manifest_as_commit_record() -> None:
    """Only the local fast path stages and renames: it alone has the locks and
    O_NOFOLLOW that staging and leftover recovery rest on."""
    s3 = pyarrow.fs.S3FileSystem(anonymous=True, region="us-east-1")

    assert (
        PyArrowStorage(pyarrow.fs.SubTreeFileSystem("bucket/prefix", s3)).can_rename_dirs is False
    )
    assert PyArrowStorage(s3).can_rename_dirs is False
    local_subtree = pyarrow.fs.SubTreeFileSystem("/tmp", pyarrow.fs.LocalFileSystem())
    assert PyArrowStorage(local_subtree).can_rename_dirs is False
    assert LocalStorage.can_rename_dirs is True


def test_components_with_their_own_save_get_a_pyarrow_filesystem_as_from_rllib(
    tmp_path: Path,
) -> None:
    seen: list[Any] = []

    class Hooked(Leaf):
        def save_to_path(self, path: Any = None, *, filesystem: Any = None, **kw: Any) -> str:
            seen.append(filesystem)
            return super().save_to_path(path, filesystem=filesystem, **kw)

    Node({"hooked": Hooked(), "plain": Leaf()}).save_to_path(tmp_path / "ckpt")

    assert len(seen) == 1 and isinstance(seen[0], pyarrow.fs.LocalFileSystem)
