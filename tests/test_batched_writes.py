"""The local disk's batched writes (``_storage_batched``): a save's small writes run
together, in order, and nothing can see (or hide) the difference: every other call runs
the queue first, a failure stays raised, and code other than the pipeline that works in
the tree (a save override) finds what the pipeline wrote."""

from __future__ import annotations

import errno
import inspect
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptable import Checkpointable, CheckpointError
from ckptable._storage_batched import (
    MAX_QUEUED_BYTES,
    MAX_QUEUED_WRITES,
    PURE_CALLS,
    BatchedLocalWrites,
)
from ckptable._storage_concurrent import barrier, writing_concurrently
from ckptable._storage_local import LocalStorage
from helpers import same_state
from trees import Leaf, Node, states_of


def test_every_call_of_the_local_disk_is_queued_run_after_the_queue_or_pure() -> None:
    """A new LocalStorage method that the batched one forgot would see a stale tree."""
    public = {
        name
        for name, member in inspect.getmembers(LocalStorage, callable)
        if not name.startswith("_")
    }
    own = {name for name in vars(BatchedLocalWrites) if not name.startswith("_")}
    assert public - PURE_CALLS <= own, public - PURE_CALLS - own


def test_writes_wait_in_the_queue_and_every_other_call_runs_it_first(tmp_path: Path) -> None:
    calls: dict[str, Any] = {
        "listdir": lambda s, d: sorted(s.listdir(d)),
        "kind": lambda s, d: s.kind(f"{d}/f"),
        "size": lambda s, d: s.size(f"{d}/f"),
        "read_bytes": lambda s, d: s.read_bytes(f"{d}/f"),
        "open_read": lambda s, d: s.open_read(f"{d}/f").read(),
        "rename": lambda s, d: s.rename(f"{d}/f", f"{d}/g"),
        "remove_tree": lambda s, d: s.remove_tree(f"{d}/f"),
        "fsync": lambda s, d: s.fsync(f"{d}/f"),
        "identity": lambda s, d: s.identity(f"{d}/f") is not None,
        "barrier": lambda s, d: barrier(s),
    }
    for name, call in calls.items():
        storage = BatchedLocalWrites()
        directory = str(tmp_path / name)
        storage.mkdir(directory)
        storage.write_bytes(f"{directory}/f", b"data")
        assert not os.path.exists(directory), name  # queued, not written yet
        call(storage, directory)
        assert os.path.isdir(directory), name
        present = os.listdir(directory)
        if name == "rename":
            assert present == ["g"]
        elif name == "remove_tree":
            assert present == []
        else:
            assert present == ["f"] and (tmp_path / name / "f").read_bytes() == b"data", name


def test_the_queue_runs_at_its_bounds(tmp_path: Path) -> None:
    storage = BatchedLocalWrites()
    for index in range(MAX_QUEUED_WRITES - 1):
        storage.write_bytes(str(tmp_path / f"f{index}"), b"x")
    assert os.listdir(tmp_path) == []
    storage.write_bytes(str(tmp_path / "last"), b"x")
    assert len(os.listdir(tmp_path)) == MAX_QUEUED_WRITES

    storage.write_bytes(str(tmp_path / "small"), b"s")
    big = os.urandom(MAX_QUEUED_BYTES + 1)
    storage.write_bytes(str(tmp_path / "big"), big)  # written at once, after the queue
    assert (tmp_path / "small").read_bytes() == b"s"
    assert (tmp_path / "big").read_bytes() == big


def test_a_failed_write_stops_the_queue_and_stays_raised(tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"old")
    storage = BatchedLocalWrites()
    storage.write_bytes(str(tmp_path / "before"), b"1")
    storage.write_bytes(str(tmp_path / "taken"), b"new")  # exists: O_EXCL refuses it
    storage.write_bytes(str(tmp_path / "after"), b"3")
    # A caller that catches OSError for its own reasons...
    with pytest.raises(FileExistsError) as first:
        storage.kind(str(tmp_path / "anything"))
    assert first.value.filename == str(tmp_path / "taken")
    # ...cannot hide the failure from the save: every later call raises it again.
    for call in (
        lambda: barrier(storage),
        lambda: storage.write_bytes(str(tmp_path / "later"), b"4"),
        lambda: storage.mkdir(str(tmp_path / "dir")),
        lambda: storage.listdir(str(tmp_path)),
    ):
        with pytest.raises(FileExistsError) as again:
            call()
        assert again.value is first.value
    assert sorted(os.listdir(tmp_path)) == ["before", "taken"]
    assert (tmp_path / "taken").read_bytes() == b"old"


def test_a_local_save_writes_in_the_callers_thread_and_drops_the_queue_on_failure(
    tmp_path: Path,
) -> None:
    threads = threading.active_count()
    with writing_concurrently(LocalStorage()) as writer:
        assert isinstance(writer, BatchedLocalWrites)
        writer.write_bytes(str(tmp_path / "kept"), b"k")
        assert threading.active_count() == threads
    assert (tmp_path / "kept").read_bytes() == b"k"

    def failing_save() -> None:
        with writing_concurrently(LocalStorage()) as writer:
            writer.write_bytes(str(tmp_path / "dropped"), b"d")
            raise RuntimeError("the save failed")

    with pytest.raises(RuntimeError):
        failing_save()
    assert not (tmp_path / "dropped").exists()


class ReadsBack(Checkpointable):
    """A save override that, after ``super()``, reads what the pipeline wrote and writes
    into a component's directory (as code written for RLlib may)."""

    def __init__(self) -> None:
        self.child = Leaf(3, scale=2.0)
        self.seen: bytes = b""

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("child", self.child)]

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        state: dict[str, Any] = {"n": 1}
        if self._check_component("child", components, not_components):
            state["child"] = self.child.get_state()
        return state

    def set_state(self, state: dict) -> None:
        if "child" in state:
            self.child.set_state(state["child"])

    def save_to_path(self, path: Any = None, **kwargs: Any) -> str:
        out = super().save_to_path(path, **kwargs)
        self.seen = Path(out, "child", "state.pkl").read_bytes()
        Path(out, "child", "notes.txt").write_text("written by the override")
        return out


class Manual(Node):
    """A save override that saves a plain component itself, then writes into its
    directory."""

    def save_to_path(self, path: Any = None, **kwargs: Any) -> str:
        out = super().save_to_path(path, **kwargs)
        extra = Leaf(2, scale=5.0)
        extra.save_to_path(os.path.join(out, "extra"))
        Path(out, "extra", "notes.txt").write_text("mine")
        return out


def test_a_save_override_finds_what_the_pipeline_wrote(tmp_path: Path) -> None:
    original = ReadsBack()
    path = original.save_to_path(str(tmp_path / "ck"))
    assert original.seen == Path(path, "child", "state.pkl").read_bytes() != b""
    assert Path(path, "child", "notes.txt").read_text() == "written by the override"
    restored = ReadsBack()
    restored.restore_from_path(path)  # verified: the override's file is in the manifest
    np.testing.assert_array_equal(restored.child.weights, original.child.weights)


def test_a_save_override_that_saves_a_component_itself_can_write_into_it(
    tmp_path: Path,
) -> None:
    root = Node({"a": Leaf(3, scale=1.5)})
    root.__class__ = Manual
    path = root.save_to_path(str(tmp_path / "ck"))
    assert Path(path, "extra", "notes.txt").read_text() == "mine"
    copy = Node({"a": Leaf(3)})
    copy.restore_from_path(path)
    assert same_state(states_of(copy), states_of(root))


def test_a_wide_save_that_fails_in_a_batch_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 150th file write fails (ENOSPC, injected in the one OS call): the error comes
    from the batch, names the file, and nothing is published or left behind."""
    root = Node({f"leaf{i:03d}": Leaf(2, scale=float(i)) for i in range(100)})
    real_open = os.open
    opened = {"n": 0}

    def failing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_WRONLY:
            opened["n"] += 1
            if opened["n"] == 150:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(CheckpointError, match="No space left on device") as caught:
        root.save_to_path(str(tmp_path / "ck"))
    assert "leaf" in str(caught.value)  # names the file that failed
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
