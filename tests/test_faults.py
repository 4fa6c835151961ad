"""Injected I/O errors at every step of a save: a clear error, the old checkpoint intact,
no leftovers, and a retry that succeeds.

The injector lets the k-th call of one OS operation fail with an ``OSError`` (ENOSPC,
EIO, EROFS, EACCES in turn), for every k up to the number of calls a save makes. The
files are real; only the one failing call is simulated.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ckptable import CheckpointError, _storage
from helpers import same_state
from trees import Leaf, Node, blank_three_level_tree, states_of, three_level_tree

ERRNOS = [errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES]


def wide_tree(steps: int) -> Node:
    """40 leaves: enough files that the durable step uses one syncfs."""
    root = Node({f"leaf{i:02d}": Leaf(3, scale=float(i)) for i in range(40)}, name="wide")
    for leaf in root.children.values():
        leaf.steps = steps  # type: ignore[attr-defined]
    return root


def blank_wide_tree() -> Node:
    return Node({f"leaf{i:02d}": Leaf(3) for i in range(40)}, name="wide")


class _FailingStream:
    """Wraps a writable stream so that the injector can fail its writes."""

    def __init__(self, raw: Any, hook: Callable[[], None]) -> None:
        self._raw, self._hook = raw, hook

    def write(self, data: Any) -> int:
        self._hook()
        return self._raw.write(data)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _FailingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()


class Injector:
    """Counts calls of the named operation; the ``fail_at``-th call raises."""

    def __init__(self, operation: str, fail_at: int | None, err: int) -> None:
        self.operation, self.fail_at, self.err, self.calls = operation, fail_at, err, 0

    def hit(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(self.err, os.strerror(self.err))

    @contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Injector]:
        with monkeypatch.context() as m:
            op = self.operation
            if op in ("mkdir", "open", "write", "fsync", "rename"):
                real = getattr(os, op)

                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    if op != "open" or args[1] & os.O_WRONLY:
                        self.hit()
                    return real(*args, **kwargs)

                m.setattr(os, op, wrapper)
            if op == "write":  # streamed state files write through FileIO, not os.write
                real_open_write = _storage.LocalStorage.open_write

                def open_write(storage: Any, path: str) -> Any:
                    return _FailingStream(real_open_write(storage, path), self.hit)

                m.setattr(_storage.LocalStorage, "open_write", open_write)
            if op == "exchange":
                real_exchange = _storage._renameat2_exchange

                def exchange(a: str, b: str) -> bool:
                    self.hit()
                    return real_exchange(a, b)

                m.setattr(_storage, "_renameat2_exchange", exchange)
            if op == "syncfs":
                real_syncfs = _storage.LocalStorage.syncfs

                def syncfs(storage: Any, path: str) -> bool:
                    self.hit()
                    return real_syncfs(storage, path)

                m.setattr(_storage.LocalStorage, "syncfs", syncfs)
            yield self


CASES = [
    ("mkdir", "three"),
    ("open", "three"),
    ("write", "three"),
    ("fsync", "three"),
    ("rename", "three"),
    ("exchange", "three"),
    ("syncfs", "wide"),
    ("fsync", "wide"),
    ("rename", "wide"),
]


@pytest.mark.parametrize(("operation", "shape"), CASES)
def test_a_failure_at_every_step_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str, shape: str
) -> None:
    make, blank = (
        (lambda: _three(steps=1), blank_three_level_tree)
        if shape == "three"
        else (lambda: wide_tree(1), blank_wide_tree)
    )
    new_tree = (lambda: _three(steps=2)) if shape == "three" else (lambda: wide_tree(2))
    if operation == "rename":  # over a checkpoint, renames happen in the two-step publish
        monkeypatch.setattr(_storage.LocalStorage, "exchange", lambda self, a, b: False)
    path = tmp_path / "ckpt"
    make().save_to_path(path)
    old_state, new_state = states_of(make()), states_of(new_tree())
    assert not same_state(old_state, new_state)

    # How many calls does a clean save over an existing checkpoint make?
    with Injector(operation, None, 0).installed(monkeypatch) as counter:
        new_tree().save_to_path(path)
    make().save_to_path(path)
    total = counter.calls
    assert total > 0, f"a save makes no {operation} calls: the injector is not wired"

    for k in range(1, total + 1):
        err = ERRNOS[k % len(ERRNOS)]
        with (
            Injector(operation, k, err).installed(monkeypatch) as injector,
            pytest.raises(CheckpointError) as info,
        ):
            new_tree().save_to_path(path)
        assert injector.calls >= k
        assert os.strerror(err) in str(info.value) and str(path) in str(info.value)
        assert isinstance(info.value.__cause__, OSError)

        restored = blank()
        restored.restore_from_path(path)
        found = states_of(restored)
        published = operation == "fsync" and k == total  # the parent's fsync, after rename
        assert same_state(found, new_state if published else old_state), (operation, k)
        assert sorted(os.listdir(tmp_path)) == ["ckpt"], (operation, k)

        new_tree().save_to_path(path)  # the retry succeeds
        restored = blank()
        restored.restore_from_path(path)
        assert same_state(states_of(restored), new_state)
        make().save_to_path(path)


def _three(steps: int) -> Node:
    tree = three_level_tree()
    tree.children["head"].steps = steps  # type: ignore[attr-defined]
    return tree


def test_two_step_publish_failures_keep_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where RENAME_EXCHANGE is missing: the first or the second rename fails."""
    monkeypatch.setattr(_storage.LocalStorage, "exchange", lambda self, a, b: False)
    path = tmp_path / "ckpt"
    _three(1).save_to_path(path)
    for k in (1, 2):
        with (
            Injector("rename", k, errno.EIO).installed(monkeypatch),
            pytest.raises(CheckpointError),
        ):
            _three(2).save_to_path(path)
        restored = blank_three_level_tree()
        restored.restore_from_path(path)
        assert same_state(states_of(restored), states_of(_three(1)))
        assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    _three(2).save_to_path(path)
    restored = blank_three_level_tree()
    restored.restore_from_path(path)
    assert same_state(states_of(restored), states_of(_three(2)))


def test_a_first_save_that_fails_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in range(1, 8):
        with (
            Injector("write", k, errno.ENOSPC).installed(monkeypatch),
            pytest.raises(CheckpointError, match="No space left"),
        ):
            three_level_tree().save_to_path(tmp_path / "ckpt")
        assert os.listdir(tmp_path) == []


def test_a_parent_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointError, match=str(tmp_path / "file")):
        three_level_tree().save_to_path(tmp_path / "file" / "ckpt")
    assert os.listdir(tmp_path) == ["file"]


def test_a_save_killed_between_mkdir_and_lock_leaves_nothing_after_the_next_save(
    tmp_path: Path,
) -> None:
    """A creating directory nobody holds (its save died before locking it) is removed
    by the next save at once; one that a running save holds is left alone."""
    import fcntl

    Leaf().save_to_path(tmp_path / "ckpt")
    abandoned = tmp_path / ".ckpt.ckptable-creating-0123456789abcdef"
    held = tmp_path / ".ckpt.ckptable-creating-fedcba9876543210"
    abandoned.mkdir()
    held.mkdir()
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        Leaf().save_to_path(tmp_path / "ckpt")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", held.name])
    finally:
        os.close(fd)
    Leaf().save_to_path(tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_save_whose_new_directory_a_concurrent_scan_removed_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instant between mkdir and lock: a concurrent save's leftover scan may remove
    the directory; the save makes a new one."""
    from ckptable._storage import LocalStorage

    real_lock = LocalStorage.lock_directory
    removed: list[str] = []

    def scan_in_between(self: Any, path: str, *, blocking: bool = False) -> Any:
        if "ckptable-creating-" in path and not removed:
            os.rmdir(path)  # what the other save's scan does
            removed.append(path)
        return real_lock(self, path, blocking=blocking)

    monkeypatch.setattr(LocalStorage, "lock_directory", scan_in_between)
    tree = three_level_tree()
    tree.save_to_path(tmp_path / "ckpt")

    assert removed
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    restored = blank_three_level_tree()
    restored.restore_from_path(tmp_path / "ckpt")
    assert same_state(states_of(restored), states_of(tree))
