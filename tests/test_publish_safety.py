"""What a save may replace, and what its errors say about the disk after it.

A save replaces the whole target directory, so only a real checkpoint (judged from its
whole listing) may be replaced. After any error, what is on disk is what the message
says: nothing published, or published but not known to be durable.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from tests.trees import Leaf, Node, blank_three_level_tree, three_level_tree

from ckptable import CheckpointError, CheckpointManager
from ckptable._manifest import MANIFEST_FILE
from ckptable._storage import LocalStorage


def _listing(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# --------------------------------------------------------------------------- what is replaced


@pytest.mark.parametrize(
    "checkpoint_name", ["metadata.json", "state.pkl", "class_and_ctor_args.pkl", MANIFEST_FILE]
)
def test_a_users_directory_with_a_checkpoint_file_name_in_it_is_refused(
    tmp_path: Path, checkpoint_name: str
) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    (target / "data").mkdir()
    (target / "data" / "table.csv").write_text("1,2,3")
    (target / checkpoint_name).write_text("{}")
    before = _listing(target)

    with pytest.raises(CheckpointError, match=r"notes\.txt is not a checkpoint file"):
        Leaf().save_to_path(target)

    assert _listing(target) == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no staging left behind


def test_a_checkpoint_with_a_users_file_added_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    three_level_tree().save_to_path(target)
    (target / "my_results.json").write_text("[1, 2]")
    before = _listing(target)

    with pytest.raises(CheckpointError, match=r"my_results\.json"):
        three_level_tree().save_to_path(target)

    assert _listing(target) == before


def test_a_users_subdirectory_inside_a_checkpoint_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    three_level_tree().save_to_path(target)
    (target / "plots").mkdir()
    (target / "plots" / "loss.png").write_bytes(b"\x89PNG")

    with pytest.raises(CheckpointError, match=r"loss\.png"):
        three_level_tree().save_to_path(target)

    assert (target / "plots" / "loss.png").read_bytes() == b"\x89PNG"


def test_a_symlink_in_the_target_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    three_level_tree().save_to_path(target)
    (tmp_path / "elsewhere.txt").write_text("x")
    os.symlink(tmp_path / "elsewhere.txt", target / "link")

    with pytest.raises(CheckpointError, match="symlink"):
        three_level_tree().save_to_path(target)

    assert os.path.islink(target / "link")


def test_a_managers_directory_is_not_replaced_by_a_save(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run")
    manager.save(Leaf(), 1)
    manager.save(Leaf(), 2)

    with pytest.raises(CheckpointError, match="not a checkpoint"):
        Leaf().save_to_path(tmp_path / "run")

    assert CheckpointManager(tmp_path / "run").steps() == [1, 2]


def test_ckptable_and_rllib_layout_checkpoints_are_replaced(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    three_level_tree().save_to_path(target)
    tree = three_level_tree()
    tree.children["head"].steps = 99
    tree.save_to_path(target)  # a ckptable checkpoint
    for manifest in target.rglob(MANIFEST_FILE):
        manifest.unlink()  # now RLlib's layout
    tree.children["head"].steps = 100
    tree.save_to_path(target)
    restored = blank_three_level_tree()
    restored.restore_from_path(target)
    assert restored.children["head"].steps == 100


# --------------------------------------------------------------------------- after the publish


def _failing_parent_fsync(monkeypatch: pytest.MonkeyPatch, parent: Path) -> list[str]:
    """Make the flush of ``parent`` (the publish's last step) fail with EIO."""
    calls: list[str] = []
    real_fsync = LocalStorage.fsync

    def fsync(self: LocalStorage, path: str) -> None:
        if os.path.realpath(path) == os.path.realpath(parent):
            calls.append(path)
            raise OSError(errno.EIO, "Input/output error (injected)", path)
        real_fsync(self, path)

    monkeypatch.setattr(LocalStorage, "fsync", fsync)
    return calls


@pytest.mark.parametrize("leaves", [2, 40], ids=["fsync-per-file", "syncfs-batch"])
def test_a_failed_flush_after_the_swap_says_the_new_checkpoint_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leaves: int
) -> None:
    target = tmp_path / "ckpt"
    old = Node({f"l{i}": Leaf(3) for i in range(leaves)}, name="old")
    old.save_to_path(target)
    calls = _failing_parent_fsync(monkeypatch, tmp_path)
    new = Node({f"l{i}": Leaf(3, scale=5.0) for i in range(leaves)}, name="new")

    with pytest.raises(CheckpointError) as caught:
        new.save_to_path(target)

    assert calls, "the injected fault was not reached"
    message = str(caught.value)
    assert "published" in message and "not known to survive" in message
    assert "Nothing was published" not in message
    assert isinstance(caught.value.__cause__, OSError)
    # And it is true: the new checkpoint is there, whole and verified.
    monkeypatch.undo()
    restored = Node({f"l{i}": Leaf(3) for i in range(leaves)}, name="?")
    restored.restore_from_path(target)
    assert restored.name == "new"
    np.testing.assert_array_equal(restored.children["l0"].weights, new.children["l0"].weights)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # the old tree went


def test_a_failed_flush_of_a_first_save_says_it_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_parent_fsync(monkeypatch, tmp_path)
    with pytest.raises(CheckpointError, match="published.*nothing was there before"):
        Leaf().save_to_path(tmp_path / "ckpt")
    monkeypatch.undo()
    Leaf().restore_from_path(tmp_path / "ckpt")


def test_a_failure_before_the_swap_leaves_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt"
    three_level_tree().save_to_path(target)
    before = _listing(target)

    def no_space(self: LocalStorage, path: str) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path)

    monkeypatch.setattr(LocalStorage, "syncfs", no_space)
    monkeypatch.setattr(LocalStorage, "fsync", no_space)
    with pytest.raises(CheckpointError, match="Nothing was published"):
        Node({f"l{i}": Leaf(3) for i in range(40)}).save_to_path(target)
    assert _listing(target) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_an_object_store_save_that_fails_says_the_old_checkpoint_is_gone() -> None:
    uri = f"memory://publish-safety/{threading.get_ident()}/{os.getpid()}/ckpt"
    Leaf().save_to_path(uri)

    class Unpicklable(Leaf):
        def get_state(self, *args: object, **kwargs: object) -> dict:
            return {"lock": threading.Lock(), "steps": 1}

    with pytest.raises(CheckpointError, match="was removed when this save began"):
        Unpicklable().save_to_path(uri)
    with pytest.raises(CheckpointError):
        Leaf().restore_from_path(uri)
