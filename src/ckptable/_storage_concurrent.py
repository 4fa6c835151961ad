"""Concurrent writes for the save pipeline: a storage whose writes run behind the caller.

On an object store every file is a request with tens of milliseconds of round trip, and
RLlib's layout has four files per level: written one after another, a wide tree's save
is all waiting. :class:`ConcurrentWrites` wraps a storage for the duration of one save
and sends its writes to a pool of threads, a bounded number in flight, while the
pipeline goes on encoding the next level. The order that matters is kept:

- a file is written only after the directory it goes into was made (``mkdir`` is a
  write too, and the writes below it wait for it);
- every other call (listing, ``kind``, reads, removal, rename) first waits for all the
  writes before it, so the pipeline sees the tree as if each write had been done when
  it was called;
- :meth:`ConcurrentWrites.barrier` waits for everything: the save calls it before the
  root manifest, the commit record, which is thus written strictly after every other
  file is stored, and again after it.

A failed write stops the others: the writes not yet started are cancelled, the running
ones finish, and the next call into the storage (or the barrier) raises
:class:`WriteFailed` naming the first file that failed. When the save ends with an
error, :meth:`ConcurrentWrites.abort` waits for the running writes, so that the commit
step's cleanup runs after the last of them and removes everything they wrote.

Memory is bounded: the bytes handed to the pool and not yet written are at most
``max_pending_bytes`` (a write waits for room; by default a quarter of the memory
available, see :func:`pending_budget`), and a stream (:meth:`open_write`) is
kept in memory up to ``spill_bytes`` (at most half the bound); beyond that it is written
through the storage's own stream (a multipart upload) by a pool thread, chunk by chunk as
the caller writes them, each chunk counted against the bound.

How many requests run at once is the storage's ``io_concurrency`` (object stores: 32),
or ``CKPTABLE_IO_CONCURRENCY``; the local disk is written in the caller's thread (see
:func:`io_concurrency` for the measurement behind that).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

from ckptable._memory_budget import memory_budget
from ckptable._storage_batched import BatchedLocalWrites
from ckptable._storage_local import LocalStorage
from ckptable._storage_wrapper import StorageWrapper
from ckptable._thread_pools import borrow_pool

if TYPE_CHECKING:
    from ckptable._storage import EntryKind, Storage

__all__ = [
    "DEFAULT_REMOTE_CONCURRENCY",
    "ConcurrentWrites",
    "WriteFailed",
    "barrier",
    "io_concurrency",
    "pending_budget",
    "writing_concurrently",
]

#: Requests in flight on an object store unless the storage or the environment says
#: otherwise (botocore's own pool holds 10 connections; pyarrow's and s3fs' more).
DEFAULT_REMOTE_CONCURRENCY = 32
#: The environment variable that overrides every storage's concurrency (1: none).
CONCURRENCY_VARIABLE = "CKPTABLE_IO_CONCURRENCY"
#: Bytes handed to the pool and not yet written: at least this (also where the memory
#: available is not known), else a quarter of the memory available, at most
#: ``MAX_PENDING_BYTES`` (see :func:`pending_budget`).
MIN_PENDING_BYTES = 256 << 20
MAX_PENDING_BYTES = 4 << 30
#: A stream kept in memory up to this size is written by the pool in one call; a longer
#: one is written through the storage's own stream as it comes (the library's multipart
#: upload). A storage may say otherwise (``stream_bytes``).
SPILL_BYTES = 16 << 20


def pending_budget() -> int:
    """The default bound on the bytes a save holds for its uploads: a quarter of the
    memory available, between ``MIN_PENDING_BYTES`` and ``MAX_PENDING_BYTES``.

    A bound smaller than the files of a save serializes its uploads: with 256 MiB, a
    fourth file of 64 MiB waited for the first one's upload to end before it could be
    handed over (on the S3 server at 20 ms, its upload started 2.1 s after the others).
    The bytes held are copies the save makes anyway; a restore's prefetch takes the same
    share (``_memory_budget``)."""
    return memory_budget(MIN_PENDING_BYTES, MAX_PENDING_BYTES)


def io_concurrency(storage: Storage) -> int:
    """How many requests to run at once on ``storage``: 1 for storages that have no
    ``io_concurrency`` of their own (the local disk); else ``CKPTABLE_IO_CONCURRENCY``
    if set, else the storage's ``io_concurrency``.

    The local disk stays in the caller's thread: writing a wide tree's small files from
    a pool measured 2.4-2.8x *slower* on tmpfs than writing them in order (a thousand
    levels, 2 cores: the threads contend for the GIL between system calls that take
    microseconds each), and the local paths of the pipeline (staging directory, locks,
    the Ray actor layer's node checks) rely on the plain :class:`LocalStorage`."""
    own = int(getattr(storage, "io_concurrency", 1))
    if own <= 1:
        return 1
    value = os.environ.get(CONCURRENCY_VARIABLE, "").strip()
    if not value:
        return own
    try:
        number = int(value)
    except ValueError:
        raise ValueError(
            f"{CONCURRENCY_VARIABLE}={value!r} is not a whole number of requests."
        ) from None
    if number < 1:
        raise ValueError(f"{CONCURRENCY_VARIABLE} must be at least 1, not {number}.")
    return number


class WriteFailed(OSError):
    """A write that ran behind the caller failed; ``path`` is the file (as shown)."""

    def __init__(self, shown: str, error: BaseException) -> None:
        super().__init__(f"writing {shown} failed: {type(error).__name__}: {error}")
        self.shown = shown
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        return (WriteFailed, (self.shown, self.error))


@contextlib.contextmanager
def writing_concurrently(storage: Storage, workers: int | None = None) -> Iterator[Storage]:
    """The storage a save writes through: a :class:`ConcurrentWrites` over ``storage``
    where it runs several requests at once (``workers``, else :func:`io_concurrency`);
    the local disk's writes batched in the caller's thread
    (:class:`~ckptable._storage_batched.BatchedLocalWrites`); else ``storage`` itself.
    What runs behind the caller is drained when the body returns, and dropped (the
    running writes waited for) when it raises."""
    if workers is None:
        workers = io_concurrency(storage)
    if workers <= 1:
        if type(storage) is not LocalStorage:
            yield storage
            return
        batched = BatchedLocalWrites()
        try:
            yield batched
            batched.barrier()
        finally:
            batched.discard()
        return
    writes = ConcurrentWrites(storage, workers)
    try:
        yield writes
        writes.barrier()
    finally:
        writes.abort()


class ConcurrentWrites(StorageWrapper):
    """A :class:`~ckptable._storage.Storage` whose ``write_bytes``, small ``open_write``
    streams and ``mkdir``/``makedirs`` run in a thread pool (see the module docstring).

    Reads, listings and removals wait for the writes before them. ``user_filesystem``
    does not (the pipeline asks for it per component): the save pipeline calls
    :func:`barrier` before code other than its own writes with that filesystem."""

    def __init__(
        self,
        storage: Storage,
        workers: int,
        *,
        max_pending_bytes: int | None = None,
        spill_bytes: int | None = None,
    ) -> None:
        super().__init__(storage)
        self.io_concurrency = workers
        self._pool = borrow_pool(workers, "ckptable-write")
        self._max_pending = pending_budget() if max_pending_bytes is None else max_pending_bytes
        if spill_bytes is None:
            spill_bytes = int(getattr(storage, "stream_bytes", SPILL_BYTES))
        # A stream held below the spill size counts as pending and nothing releases it
        # before it spills: the spill must stay well under the bound, or it waits forever.
        self._spill = max(1, min(spill_bytes, self._max_pending // 2))
        self._lock = threading.Condition()
        self._pending_bytes = 0
        self._futures: set[concurrent.futures.Future[None]] = set()
        #: Directories made (or being made) by this storage → their mkdir's future.
        self._dirs: dict[str, concurrent.futures.Future[None]] = {}
        self._failure: WriteFailed | None = None
        self._closed = False

    # ----------------------------------------------------------------- writes

    def write_bytes(self, path: str, data: bytes) -> None:
        self._submit(path, len(data), lambda: self.inner.write_bytes(path, data))

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        stream = _SpoolingWriter(self, path)
        try:
            yield stream  # type: ignore[misc]
        except BaseException:
            stream.discard()
            raise
        stream.finish()

    def mkdir(self, path: str) -> None:
        self._make_dir(path, self.inner.mkdir)

    def makedirs(self, path: str) -> None:
        self._make_dir(path, self.inner.makedirs)

    def _make_dir(self, path: str, make: Callable[[str], None]) -> None:
        self._raise_failure()
        parent = self._dirs.get(self.inner.split(path)[0])

        def run() -> None:
            if parent is not None:
                parent.result()
            make(path)

        future = self._start(path, 0, run)
        self._dirs[path] = future

    def _submit(
        self, path: str, size: int, write: Callable[[], None], *, reserved: bool = False
    ) -> None:
        """Write ``path`` in the pool; its ``size`` bytes count as pending until written
        (``reserved``: they already do, held by the caller, who hands them over)."""
        parent = self._dirs.get(self.inner.split(path)[0])

        def run() -> None:
            if parent is not None:
                parent.result()  # the directory first (its failure is reported there)
            write()

        self._start(path, size, run, reserved=reserved)

    def _start(
        self, path: str, size: int, run: Callable[[], None], *, reserved: bool = False
    ) -> concurrent.futures.Future[None]:
        if not reserved:
            self._reserve(size)  # (raises a failure, as below)
        else:
            try:
                self._raise_failure()
            except BaseException:
                self._release(size)  # the caller's count, given back with the write
                raise
        with self._lock:
            future = self._pool.submit(self._run, path, size, run)
            self._futures.add(future)
        return future

    def _reserve(self, size: int) -> None:
        """Count ``size`` bytes as pending, once there is room for them (at once if
        nothing is pending: one write bigger than the bound goes alone)."""
        with self._lock:
            while self._pending_bytes and self._pending_bytes + size > self._max_pending:
                if self._failure is not None:
                    break
                self._lock.wait()
            self._raise_failure_locked()
            self._pending_bytes += size

    def _release(self, size: int) -> None:
        with self._lock:
            self._pending_bytes -= size
            self._lock.notify_all()

    def _run(self, path: str, size: int, run: Callable[[], None]) -> None:
        try:
            if self._failure is None:
                run()
        except BaseException as exc:
            with self._lock:
                if self._failure is None:
                    error = exc.error if isinstance(exc, WriteFailed) else exc
                    self._failure = WriteFailed(self.inner.display(path), error)
                    for future in self._futures:
                        future.cancel()  # those not started yet
                self._lock.notify_all()
            raise
        finally:
            self._release(size)

    def _stream(self, path: str, chunks: queue.SimpleQueue[bytes | BaseException | None]) -> None:
        """Start writing ``path`` through the storage's own stream (multipart upload, on
        an object store) in the pool, from ``chunks`` as the caller queues them: None
        ends the file, an exception abandons it. Each chunk was reserved by the caller."""
        parent = self._dirs.get(self.inner.split(path)[0])

        def run() -> None:
            if parent is not None:
                parent.result()
            with self.inner.open_write(path) as stream:
                while True:
                    chunk = chunks.get()
                    if chunk is None:
                        return
                    if isinstance(chunk, BaseException):
                        raise chunk
                    try:
                        stream.write(chunk)
                    finally:
                        self._release(len(chunk))

        def drain_on_failure() -> None:
            # A failed stream still owes the caller's reservations back.
            while True:
                try:
                    chunk = chunks.get_nowait()
                except queue.Empty:
                    return
                if isinstance(chunk, bytes):
                    self._release(len(chunk))

        def run_and_drain() -> None:
            try:
                run()
            finally:
                drain_on_failure()

        self._raise_failure()
        with self._lock:
            future = self._pool.submit(self._run, path, 0, run_and_drain)
            self._futures.add(future)

    # ----------------------------------------------------------------- ordering

    def barrier(self) -> None:
        """Wait for every write so far; raise :class:`WriteFailed` if one failed."""
        with self._lock:
            futures = list(self._futures)
        self._wait(futures)
        with self._lock:
            self._futures.difference_update(futures)

    def abort(self) -> None:
        """Cancel the writes not started, wait for the running ones, stop the pool."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        self._pool.shutdown(wait=True)

    def _wait(self, futures: list[concurrent.futures.Future[None]]) -> None:
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        self._raise_failure()
        concurrent.futures.wait(futures)
        self._raise_failure()

    def _raise_failure(self) -> None:
        with self._lock:
            self._raise_failure_locked()

    def _raise_failure_locked(self) -> None:
        if self._failure is not None:
            raise WriteFailed(self._failure.shown, self._failure.error)
        if self._closed:
            raise RuntimeError("The save's concurrent writes are closed.")

    # ------------------------------------------ the rest waits for the writes before it

    def kind(self, path: str, *, follow_symlinks: bool = False) -> EntryKind:
        self.barrier()
        return self.inner.kind(path, follow_symlinks=follow_symlinks)

    def listdir(self, path: str) -> dict[str, EntryKind]:
        self.barrier()
        return self.inner.listdir(path)

    def size(self, path: str) -> int:
        self.barrier()
        return self.inner.size(path)

    def read_bytes(self, path: str) -> bytes:
        self.barrier()
        return self.inner.read_bytes(path)

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        self.barrier()
        return self.inner.open_read(path)

    def remove_tree(self, path: str) -> None:
        self.barrier()
        self.inner.remove_tree(path)
        prefix = self.inner.join(path, "")
        for directory in [d for d in self._dirs if d == path or d.startswith(prefix)]:
            del self._dirs[directory]

    def rename(self, src: str, dst: str) -> None:
        self.barrier()
        self.inner.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        self.barrier()
        return self.inner.exchange(a, b)

    def fsync(self, path: str) -> None:
        self.barrier()
        self.inner.fsync(path)

    def syncfs(self, path: str) -> bool:
        self.barrier()
        return self.inner.syncfs(path)


class _SpoolingWriter(io.RawIOBase):
    """A write stream kept in memory and handed to the pool on close; past
    ``spill_bytes`` it is written through the storage's own stream by a pool thread,
    fed chunk by chunk (each counted against the pending bytes), so that the caller
    goes on while the upload runs, and several big files upload at once. Each byte is
    copied once, into memory the pool owns (the caller may reuse its buffers): held in
    one ``bytearray`` (which grows without copying: big blocks are remapped), handed to
    the storage as it is; or, to a storage that ``takes_bytes``, as ``bytes`` (a second
    copy, where the client would make two or more of anything else)."""

    def __init__(self, owner: ConcurrentWrites, path: str) -> None:
        super().__init__()
        self._owner = owner
        self._path = path
        self._held = bytearray()
        #: The file's bytes so far when they are one ``bytes`` of the caller's, given by
        #: :meth:`write_owned` (kept as they are; counted as pending).
        self._owned: bytes | None = None
        self._chunks: queue.SimpleQueue[bytes | BaseException | None] | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._chunks is not None:
            self._send(bytes(view))
            return len(view)
        if self._owned is not None:  # not the file's only bytes: held with the rest
            self._held += self._owned
            self._owned = None
        self._owner._reserve(len(view))  # held until written: counted as pending
        self._held += view
        if len(self._held) >= self._owner._spill:
            held, self._held = self._held, bytearray()
            self._start_stream(held)
        return len(view)

    def write_owned(self, data: bytes) -> int:
        """``write`` of bytes the caller made and lets go of (an encoder's output, which
        nothing changes: ``bytes`` are immutable): kept as they are, not copied. A file
        that is one such write is handed to the storage as that object; a longer one
        streams it as one chunk."""
        if self._chunks is not None:
            self._send(data)
            return len(data)
        if self._held or self._owned is not None:
            return self.write(data)
        self._owner._reserve(len(data))  # held until written: counted as pending
        if len(data) >= self._owner._spill:
            self._start_stream(data)
        else:
            self._owned = data
        return len(data)

    def _start_stream(self, first: bytes | bytearray) -> None:
        """From now on the file streams through the storage's own stream, ``first`` (its
        bytes so far, counted as pending) its first chunk."""
        self._chunks = queue.SimpleQueue()
        self._owner._stream(self._path, self._chunks)
        self._chunks.put(first)  # type: ignore[arg-type]  # sent as it is

    def _send(self, chunk: bytes) -> None:
        if self._chunks is None:
            raise RuntimeError("not streaming")
        self._owner._reserve(len(chunk))
        self._chunks.put(chunk)

    def finish(self) -> None:
        if self._chunks is None:
            data: Any = self._owned if self._owned is not None else self._held
            self._owned, self._held = None, bytearray()
            size = len(data)
            if type(data) is not bytes and getattr(self._owner.inner, "takes_bytes", False):
                data = bytes(data)  # (the bytearray goes now: one copy held, not two)

            def write() -> None:
                self._owner.inner.write_bytes(self._path, data)

            # Already counted while held: the count goes over to the write as it is.
            self._owner._submit(self._path, size, write, reserved=True)
            return
        self._chunks.put(None)

    def discard(self) -> None:
        self._owner._release(len(self._held) + len(self._owned or b""))
        self._owned, self._held = None, bytearray()
        if self._chunks is not None:
            self._chunks.put(RuntimeError("the save failed while writing this file"))


def barrier(storage: Storage) -> None:
    """Wait for the writes ``storage`` runs behind its caller (none unless it is a
    :class:`ConcurrentWrites` or a :class:`~ckptable._storage_batched.
    BatchedLocalWrites`); raise the first failure."""
    if isinstance(storage, (ConcurrentWrites, BatchedLocalWrites)):
        storage.barrier()
