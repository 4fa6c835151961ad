"""Batched writes for the save pipeline on the local disk.

The local disk is written in the caller's thread (threads measured slower there, see
:func:`ckptable._storage_concurrent.io_concurrency`), but not one file at a time as the
pipeline produces them: :class:`BatchedLocalWrites` keeps the small writes of a save
(``mkdir`` and whole-file ``write_bytes``) in order in a queue and runs them together,
a few hundred at a time. A wide tree's save alternates a few microseconds of Python per
file with a few microseconds in the kernel; run apart, each keeps its code and data in
the CPU's caches, which made the save of a 1,000-leaf tree on tmpfs 10-20% faster on
this project's 2-core machine (``benchmarks/bench_wide_local.py``).

The order is the pipeline's: the queue runs in order, and every other call on the
storage (a listing, a read, a stream, a rename, a flush...) runs the queue first, so
the pipeline sees the tree as if each write had been done when it was called.
:func:`ckptable._storage_concurrent.barrier` runs it too: the save calls it before the
root manifest, before code other than the pipeline's own writes in the tree (a
component's own ``save_to_path``), and when a nested save returns to such code.

A write that fails stops the queue: the writes after it are dropped, and the error is
raised by the call that ran the queue and again by every later call and barrier, so a
caller that catches ``OSError`` for its own reasons cannot hide it from the save.
"""

from __future__ import annotations

import contextlib
from typing import IO, TYPE_CHECKING, Any

from ckptable._storage_local import LocalStorage

if TYPE_CHECKING:
    from ckptable._storage import EntryKind

__all__ = ["BatchedLocalWrites"]

#: The queue runs once it holds this many writes...
MAX_QUEUED_WRITES = 256
#: ...or this many bytes (a bigger file is written at once, after the queue).
MAX_QUEUED_BYTES = 4 << 20


class BatchedLocalWrites(LocalStorage):
    """The local disk, with ``mkdir`` and ``write_bytes`` queued (module docstring).

    A :class:`LocalStorage` (the pipeline's fast paths for the local disk apply); it
    pickles as a plain one."""

    def __init__(self) -> None:
        self._queue: list[tuple[str, bytes | None]] = []  # (path, data); None: mkdir
        self._queued_bytes = 0
        self._failure: OSError | None = None

    # ----------------------------------------------------------------- queued

    def mkdir(self, path: str) -> None:
        self._enqueue(path, None)

    def write_bytes(self, path: str, data: bytes) -> None:
        if len(data) > MAX_QUEUED_BYTES:
            self.barrier()
            super().write_bytes(path, data)
            return
        self._enqueue(path, bytes(data))

    def _enqueue(self, path: str, data: bytes | None) -> None:
        if self._failure is not None:
            raise self._failure
        self._queue.append((path, data))
        if data is not None:
            self._queued_bytes += len(data)
        if len(self._queue) >= MAX_QUEUED_WRITES or self._queued_bytes >= MAX_QUEUED_BYTES:
            self.barrier()

    # ----------------------------------------------------------------- the queue

    def barrier(self) -> None:
        """Run the queued writes, in order; raise the first failure (now and later)."""
        if self._failure is not None:
            raise self._failure
        queue, self._queue, self._queued_bytes = self._queue, [], 0
        mkdir, write_bytes = super().mkdir, super().write_bytes
        try:
            for path, data in queue:
                if data is None:
                    mkdir(path)
                else:
                    write_bytes(path, data)
        except OSError as exc:
            self._failure = exc
            raise

    def discard(self) -> None:
        """Drop the queued writes (the save failed; its staging tree is removed)."""
        self._queue, self._queued_bytes = [], 0

    # ----------------------------------------------------------------- everything else

    def kind(self, path: str, *, follow_symlinks: bool = False) -> EntryKind:
        self.barrier()
        return super().kind(path, follow_symlinks=follow_symlinks)

    def size(self, path: str) -> int:
        self.barrier()
        return super().size(path)

    def listdir(self, path: str) -> dict[str, EntryKind]:
        self.barrier()
        return super().listdir(path)

    def makedirs(self, path: str) -> None:
        self.barrier()
        super().makedirs(path)

    def read_bytes(self, path: str) -> bytes:
        self.barrier()
        return super().read_bytes(path)

    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        self.barrier()
        return super().open_write(path)

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        self.barrier()
        return super().open_read(path)

    def remove_tree(self, path: str) -> None:
        self.barrier()
        super().remove_tree(path)

    def rename(self, src: str, dst: str) -> None:
        self.barrier()
        super().rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        self.barrier()
        return super().exchange(a, b)

    def fsync(self, path: str) -> None:
        self.barrier()
        super().fsync(path)

    def age_seconds(self, path: str) -> float:
        self.barrier()
        return super().age_seconds(path)

    def identity(self, path: str) -> Any:
        self.barrier()
        return super().identity(path)

    def syncfs(self, path: str) -> bool:
        self.barrier()
        return super().syncfs(path)

    def lock_directory(self, path: str, *, blocking: bool = False) -> Any:
        self.barrier()
        return super().lock_directory(path, blocking=blocking)

    def unlock(self, handle: Any) -> None:
        super().unlock(handle)  # closes a descriptor: nothing queued depends on it

    def is_abandoned(self, path: str) -> bool:
        self.barrier()
        return super().is_abandoned(path)

    def user_filesystem(self) -> Any:
        # Code other than the pipeline's writes with it: the pipeline calls barrier()
        # before that code runs (as with ConcurrentWrites).
        return super().user_filesystem()


#: The calls that neither touch the disk nor need the queue run first.
PURE_CALLS = frozenset({"join", "split", "display", "user_filesystem", "unlock"})
