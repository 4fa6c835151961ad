"""Stores without directory rename (object stores): the root manifest is the commit record.

The store here is the local disk seen through ``pyarrow.fs.PyFileSystem`` over fsspec,
which ckptable treats like S3: no atomic directory rename, so a save writes in place and
its root manifest, written last, decides whether the directory is a checkpoint.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem, SubTreeFileSystem

from ckptable import CheckpointError, CorruptCheckpointError, verify_checkpoint
from ckptable._manifest import MANIFEST_FILE
from ckptable._storage import LocalStorage, PyArrowStorage, resolve_storage
from helpers import same_state
from trees import blank_three_level_tree, states_of, three_level_tree


@pytest.fixture
def store(tmp_path: Path) -> Any:
    fs = SubTreeFileSystem(str(tmp_path), PyFileSystem(FSSpecHandler(fsspec.filesystem("file"))))
    storage, _ = resolve_storage("ckpt", fs)
    assert isinstance(storage, PyArrowStorage) and not storage.can_rename_dirs
    return fs


def test_in_place_saves_have_manifests_and_verify(tmp_path: Path, store: Any) -> None:
    tree = three_level_tree()
    tree.save_to_path("ckpt", filesystem=store)
    assert (tmp_path / "ckpt" / MANIFEST_FILE).is_file()
    assert verify_checkpoint("ckpt", filesystem=store).levels == 5
    restored = blank_three_level_tree()
    restored.restore_from_path("ckpt", filesystem=store)
    assert same_state(states_of(restored), states_of(tree))
    # Saving over it replaces it whole, in place: no staging directory beside it.
    tree.children["head"].steps = 77  # type: ignore[attr-defined]
    tree.save_to_path("ckpt", filesystem=store)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    restored.restore_from_path("ckpt", filesystem=store)
    assert restored.children["head"].steps == 77  # type: ignore[attr-defined]


def test_a_save_cut_off_before_its_root_manifest_is_not_a_checkpoint(
    tmp_path: Path, store: Any
) -> None:
    """What a crash leaves on an object store: every level but no root manifest."""
    three_level_tree().save_to_path("ckpt", filesystem=store)
    (tmp_path / "ckpt" / MANIFEST_FILE).unlink()
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        blank_three_level_tree().restore_from_path("ckpt", filesystem=store)
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        verify_checkpoint(str(tmp_path / "ckpt"))


def test_a_failed_in_place_save_leaves_no_partial_checkpoint(
    tmp_path: Path, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    three_level_tree().save_to_path("ckpt", filesystem=store)
    calls = {"n": 0}
    real = PyArrowStorage.write_bytes

    def failing(self: PyArrowStorage, path: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self, path, data)

    monkeypatch.setattr(PyArrowStorage, "write_bytes", failing)
    with pytest.raises(CheckpointError, match="Input/output error"):
        three_level_tree().save_to_path("ckpt", filesystem=store)
    # The old checkpoint was invalidated first and the partial new one removed: there
    # is nothing that could be taken for a checkpoint.
    assert not (tmp_path / "ckpt").exists()
    monkeypatch.undo()
    three_level_tree().save_to_path("ckpt", filesystem=store)
    verify_checkpoint("ckpt", filesystem=store)


def test_the_old_manifest_goes_first(
    tmp_path: Path, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first thing an in-place save deletes is the old root manifest, so a crash
    anywhere after it leaves no directory that verifies as the old checkpoint."""
    three_level_tree().save_to_path("ckpt", filesystem=store)
    removed: list[str] = []
    real = PyArrowStorage.remove_tree

    def recording(self: PyArrowStorage, path: str) -> None:
        removed.append(path)
        real(self, path)

    monkeypatch.setattr(PyArrowStorage, "remove_tree", recording)
    three_level_tree().save_to_path("ckpt", filesystem=store)
    assert removed[0] == f"ckpt/{MANIFEST_FILE}"
    assert isinstance(resolve_storage(str(tmp_path))[0], LocalStorage)
