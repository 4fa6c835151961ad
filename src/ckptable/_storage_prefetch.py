"""Concurrent reads for the restore pipeline: one listing and one fetch per file.

A restore reads level by level: list the level, read its manifest, verify and read each
file, then the levels below. On the local disk each of those calls takes microseconds;
on an object store each is a request with tens of milliseconds of round trip, and a
level costs ten of them one after another. :class:`PrefetchedReads` wraps the storage
for one restore of one checkpoint tree and changes that without changing the pipeline:

- the tree is **listed once** (one recursive listing: a ``LIST`` per thousand objects on
  S3), and every ``listdir``, ``kind`` and ``size`` inside it is answered from that;
- the small files of the tree are **fetched concurrently**, a bounded number of requests
  in flight, as soon as the restore first looks into the tree, and each is fetched
  **once**: the pipeline's verification and decoding read the same bytes from memory;
- a big file is **fetched whole**, its ranges in parallel, into memory its arrays keep
  (:mod:`ckptable._storage_filebuffer`), as far as the budget (:func:`prefetch_budget`)
  goes; a file bigger than that is read with **parallel ranged reads**, a few ranges
  ahead of the reader (memory bounded by those ranges). Either is kept for a second
  read where nothing was handed out of it and the budget allows.

Nothing here decides what is trusted: the pipeline verifies every byte it gets against
the manifests exactly as before, and applies nothing before everything verified. A fetch
that fails raises its error when the pipeline reads that file (and only then), so the
error names the file as before. Paths outside the tree, and every write, go to the
storage itself.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import io
import threading
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

from ckptable._memory_budget import memory_budget
from ckptable._storage_concurrent import io_concurrency
from ckptable._storage_filebuffer import BufferReader, FileBuffer
from ckptable._storage_ranged import RANGES_AHEAD, RangedReader
from ckptable._storage_wrapper import StorageWrapper
from ckptable._thread_pools import borrow_pool

if TYPE_CHECKING:
    from ckptable._storage import EntryKind, Storage

__all__ = ["PrefetchedReads", "TreeListing", "reading_ahead", "shared_prefetch"]

#: Files up to this size are fetched whole, ahead of the pipeline ...
SMALL_FILE_BYTES = 16 << 20
#: ... up to this much per restore in all (at least; see :func:`prefetch_budget`); the
#: rest is read when the pipeline asks.
PREFETCH_BYTES = 256 << 20
#: The most a restore fetches ahead, however much memory is free.
MAX_PREFETCH_BYTES = 4 << 30
#: A big file is read in ranges of this size, ...
RANGE_BYTES = 64 << 20

_current: contextvars.ContextVar[PrefetchedReads | None] = contextvars.ContextVar(
    "ckptable_prefetch", default=None
)


@contextlib.contextmanager
def reading_ahead(storage: Storage, root: str) -> Iterator[Storage]:
    """The storage for one restore of the tree at ``root``: ``storage`` itself where it
    runs one request at a time (the local disk) or cannot list a tree in one call;
    else the :class:`PrefetchedReads` over it that an enclosing call opened for the same
    tree (``from_checkpoint`` then the restore it runs), or a new one."""
    outer = _current.get()
    if outer is not None and outer.covers(storage, root):
        yield outer
        return
    workers = io_concurrency(storage)
    if workers <= 1 or not callable(getattr(storage, "list_tree", None)):
        yield storage
        return
    prefetch = PrefetchedReads(storage, root, workers)
    token = _current.set(prefetch)
    try:
        yield prefetch
    finally:
        _current.reset(token)
        prefetch.close()


def shared_prefetch() -> PrefetchedReads | None:
    """The prefetch of the restore running in this context, if any."""
    return _current.get()


class TreeListing:
    """One listing of a checkpoint tree: each directory's entries, each file's size."""

    def __init__(self, storage: Storage, root: str, listing: list[tuple[str, str, int]]) -> None:
        self.dirs: dict[str, dict[str, EntryKind]] = {}
        self.sizes: dict[str, int] = {}
        if not listing:
            return  # nothing there, or not a directory: the storage itself answers
        self.dirs[root] = {}
        for path, kind, size in sorted(listing):
            parent, name = storage.split(path)
            self._add_dir(storage, root, parent)
            if kind == "dir":
                self._add_dir(storage, root, path)
            else:
                self.dirs[parent][name] = "file" if kind == "file" else "other"
                if kind == "file":
                    self.sizes[path] = size

    def _add_dir(self, storage: Storage, root: str, path: str) -> None:
        while path not in self.dirs:
            self.dirs[path] = {}
            parent, name = storage.split(path)
            if len(parent) < len(root):
                return
            self._add_dir(storage, root, parent)
            self.dirs[parent][name] = "dir"


class PrefetchedReads(StorageWrapper):
    """A :class:`~ckptable._storage.Storage` that lists the tree at ``root`` once and
    fetches its files concurrently (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        root: str,
        workers: int,
        *,
        budget: int | None = None,
        small: int | None = None,
        range_bytes: int | None = None,
    ) -> None:
        super().__init__(storage)
        # pyarrow keeps a trailing slash that the listing's paths do not have.
        self.root = _norm(root)
        self.io_concurrency = workers
        self._prefix = storage.join(self.root, "")
        self._pool = borrow_pool(workers, "ckptable-read")
        self._budget = prefetch_budget() if budget is None else budget
        self._whole_budget = self._budget
        #: Every file of the tree in path order, and how many of them were started.
        self._plan: list[tuple[str, int]] = []
        self._planned = 0
        self._small = SMALL_FILE_BYTES if small is None else small
        self._range = RANGE_BYTES if range_bytes is None else range_bytes
        self._lock = threading.RLock()
        #: Files the pipeline read before their prefetch started: never fetched again.
        self._taken_early: set[str] = set()
        self._tree: TreeListing | None = None
        self._fetched: dict[str, concurrent.futures.Future[bytes]] = {}
        #: Big files: the first ranges, fetched ahead like the small files.
        self._heads: dict[str, collections.deque[concurrent.futures.Future[bytes]]] = {}
        #: Big files: the open handle their ranged reads share.
        self._handles: dict[str, tuple[Any, Callable[[int, int], bytes]]] = {}
        ranged = getattr(storage, "ranged", None)
        self._ranged: Callable[[str], Any] | None = ranged if callable(ranged) else None
        ranged_into = getattr(storage, "ranged_into", None)
        self._ranged_into: Callable[[str], Any] | None = (
            ranged_into if callable(ranged_into) else None
        )
        #: Big files fetched whole into memory their arrays can keep, and the open
        #: handles their ranges share (``_storage_filebuffer``).
        self._buffers: dict[str, FileBuffer] = {}
        self._into_handles: dict[str, tuple[Any, Callable[[int, memoryview], int]]] = {}
        #: Big files read whole once, kept (within the budget) for a second read.
        self._kept: dict[str, list[bytes]] = {}
        self._closed = False

    def covers(self, storage: Storage, root: str) -> bool:
        """Whether this prefetch serves ``root`` of ``storage``."""
        if self._closed or not (root == self.root or root.startswith(self._prefix)):
            return False
        inner = storage.inner if isinstance(storage, PrefetchedReads) else storage
        if inner is self.inner:
            return True
        mine, theirs = self.inner.user_filesystem(), inner.user_filesystem()
        equals = getattr(mine, "equals", None)
        return type(inner) is type(self.inner) and bool(
            equals(theirs) if callable(equals) else mine == theirs
        )

    def close(self) -> None:
        """Cancel the fetches not started, and drop what was fetched."""
        self._closed = True
        for future in self._fetched.values():
            future.cancel()
        for heads in self._heads.values():
            for future in heads:
                future.cancel()
        for buffer in self._buffers.values():
            buffer.cancel()
        self._pool.shutdown(wait=True)
        for opened, _ in [*self._handles.values(), *self._into_handles.values()]:
            with contextlib.suppress(Exception):
                opened.__exit__(None, None, None)
        self._handles.clear()
        self._into_handles.clear()
        self._buffers.clear()
        self._fetched.clear()
        self._heads.clear()
        self._kept.clear()

    # ----------------------------------------------------------------- the tree

    def _inside(self, path: str) -> bool:
        path = _norm(path)
        return path == self.root or path.startswith(self._prefix)

    def _listed(self) -> TreeListing:
        """The tree's listing, made (and its small files' fetches started) on first use."""
        with self._lock:
            if self._tree is None:
                list_tree: Callable[[str], list[tuple[str, str, int]]] = self.inner.list_tree  # type: ignore[attr-defined]
                self._tree = TreeListing(self.inner, self.root, list_tree(self.root))
                self._start_fetches(self._tree)
            return self._tree

    def _start_fetches(self, tree: TreeListing) -> None:
        """Plan the fetches: every file in the order the pipeline reads them (a level's
        own files before the levels below it: :func:`_pipeline_order`), and start as
        many as the budget holds (lock held)."""
        self._plan = sorted(tree.sizes.items(), key=lambda item: _pipeline_order(item[0]))
        self._schedule()

    def _schedule(self) -> None:
        """Start the planned fetches that fit the budget, in order (lock held): small
        files whole, the first ranges of big ones. A window: the budget a big file's
        first ranges hold comes back as the reader takes them, and the fetches go on."""
        read_sized = getattr(self.inner, "read_sized", None)
        while self._planned < len(self._plan):
            path, size = self._plan[self._planned]
            if path in self._taken_early:
                self._planned += 1
                continue
            if size <= self._small:
                if size > self._whole_budget:
                    self._planned += 1  # never fits: read when asked
                    continue
                if size > self._budget:
                    return
                self._budget -= size
                if callable(read_sized):
                    future = self._pool.submit(read_sized, path, size)
                else:
                    future = self._pool.submit(self.inner.read_bytes, path)
                self._fetched[path] = future
            elif self._ranged_into is not None and size <= self._whole_budget:
                if size > self._budget:
                    return
                try:
                    self._buffers[path] = self._fetch_whole(path, size)
                except (MemoryError, OSError, RuntimeError):
                    # No memory for it now (or the pool is shutting down): the file is
                    # streamed when the pipeline asks, as one over the budget is.
                    self._taken_early.add(path)
                else:
                    self._budget -= size
            elif self._ranged is not None:
                first = self._range_length(0, size)
                if first > self._whole_budget:
                    self._planned += 1
                    continue
                if first > self._budget:
                    return
                heads: collections.deque[concurrent.futures.Future[bytes]] = collections.deque()
                offset = 0
                while offset < size and len(heads) < RANGES_AHEAD:
                    length = self._range_length(offset, size)
                    if length > self._budget:
                        break
                    self._budget -= length
                    heads.append(self._pool.submit(self._read_range, path, offset, length))
                    offset += length
                self._heads[path] = heads
            self._planned += 1

    def _release(self, size: int) -> None:
        """Memory fetched ahead was taken by the pipeline (a big file's first range, or
        a file fetched whole): its budget goes to the next fetches."""
        with self._lock:
            self._budget += size
            if not self._closed:
                self._schedule()

    def _fetch_whole(self, path: str, size: int) -> FileBuffer:
        """Start fetching the big file at ``path`` whole, its ranges in parallel, into
        memory of its own (lock held)."""
        ranges = []
        offset = 0
        while offset < size:
            length = self._range_length(offset, size)
            ranges.append((offset, length))
            offset += length

        def submit(offset: int, view: memoryview) -> concurrent.futures.Future[int]:
            return self._pool.submit(self._read_into, path, offset, view)

        return FileBuffer(size, ranges, submit)

    def _read_into(self, path: str, offset: int, view: memoryview) -> int:
        """One range of a file fetched whole, through the handle its ranges share."""
        read_into = self._shared_handle(self._into_handles, self._ranged_into, path)
        return int(read_into(offset, view))

    def _shared_handle(
        self,
        handles: dict[str, tuple[Any, Any]],
        opener: Callable[[str], Any] | None,
        path: str,
    ) -> Any:
        """The file's handle (``ranged``/``ranged_into``) that its ranges share, opened on
        first use (outside the lock: a HEAD on S3; a second opener closes its own) and
        closed by ``close``."""
        handle = handles.get(path)
        if handle is None:
            opened = opener(path)  # type: ignore[misc]
            mine = (opened, opened.__enter__())
            with self._lock:
                handle = handles.setdefault(path, mine)
            if handle is not mine:
                opened.__exit__(None, None, None)
        return handle[1]

    def _range_length(self, offset: int, size: int) -> int:
        """The length of the range at ``offset``: the range size, or the rest of the file
        where less than a quarter range more would be left (one request, not two)."""
        rest = size - offset
        return rest if rest <= self._range + self._range // 4 else self._range

    def _read_range(self, path: str, offset: int, length: int) -> bytes:
        """One ranged read, through the handle the file's ranges share."""
        read_at = self._shared_handle(self._handles, self._ranged, path)
        data: bytes = read_at(offset, length)
        return data

    def _entry(self, path: str) -> tuple[TreeListing, bool]:
        """The tree, and whether it answers for ``path`` (inside it, and listed)."""
        if not self._inside(path):
            return _EMPTY, False
        tree = self._listed()
        return tree, bool(tree.dirs)

    # ----------------------------------------------------------------- reads

    def kind(self, path: str, *, follow_symlinks: bool = False) -> EntryKind:
        path = _norm(path)
        tree, answers = self._entry(path)
        if not answers:
            return self.inner.kind(path, follow_symlinks=follow_symlinks)
        if path in tree.dirs:
            return "dir"
        parent, name = self.inner.split(path)
        return tree.dirs.get(parent, {}).get(name)

    def listdir(self, path: str) -> dict[str, EntryKind]:
        path = _norm(path)
        tree, answers = self._entry(path)
        if answers and path in tree.dirs:
            return dict(tree.dirs[path])
        return self.inner.listdir(path)

    def size(self, path: str) -> int:
        path = _norm(path)
        tree, answers = self._entry(path)
        if answers and path in tree.sizes:
            return tree.sizes[path]
        return self.inner.size(path)

    def read_bytes(self, path: str) -> bytes:
        data = self._memory(path)
        if data is not None:
            return data
        with self.open_read(path) as stream:
            return stream.read()

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        path = _norm(path)
        if self._inside(path):
            self._listed()
            with self._lock:
                buffer = self._buffers.get(path)
            if buffer is not None and not buffer.handed_out:
                return self._open_buffer(path, buffer)
        data = self._memory(path)
        if data is not None:
            return contextlib.nullcontext(io.BytesIO(data))
        tree, answers = self._entry(path)
        size = tree.sizes.get(path) if answers else None
        if size is None or size <= self._small or self._ranged is None:
            return self.inner.open_read(path)
        return self._open_ranged(path, size)

    def _memory(self, path: str) -> bytes | None:
        """The file's bytes if fetched ahead or kept (raises the fetch's error); a miss
        is recorded, so that the prefetch does not fetch it again later."""
        path = _norm(path)
        if not self._inside(path):
            return None
        self._listed()
        with self._lock:
            future = self._fetched.get(path)
            kept = self._kept.get(path)
            buffer = self._buffers.get(path)
            if buffer is not None and buffer.handed_out:
                return None  # (read from the store again)
            if future is None and kept is None and buffer is None:
                self._taken_early.add(path)
                return None
        if future is not None:
            return future.result()
        if buffer is not None:
            with self._open_buffer(path, buffer) as whole:
                return whole.read()
        return b"".join(kept) if kept is not None else None

    @contextlib.contextmanager
    def _open_buffer(self, path: str, buffer: FileBuffer) -> Iterator[IO[bytes]]:
        """A reader over the file fetched whole. When it is closed, the buffer is
        dropped and its budget given back (its memory is the decoded state's now, or
        garbage), unless nothing was handed out of it and every fetch has started: then
        it stays, as a big file read in ranges does, for a codec that reads the file
        again after its verification."""
        reader = BufferReader(buffer)
        try:
            yield reader  # type: ignore[misc]
        finally:
            reader.close()
            with self._lock:
                keep = not buffer.handed_out and self._planned >= len(self._plan)
                dropped = not keep and self._buffers.get(path) is buffer
                if dropped:
                    del self._buffers[path]
            if dropped:
                buffer.cancel()
                self._release(buffer.size)

    @contextlib.contextmanager
    def _open_ranged(self, path: str, size: int) -> Iterator[IO[bytes]]:
        heads = self._heads.pop(path, collections.deque())
        keep = False
        with self._lock:
            # Kept for a second read (a codec that reads the file again after its
            # verification) only with budget to spare once every fetch has started:
            # the window of first ranges comes first.
            if self._planned >= len(self._plan) and size <= self._budget:
                self._budget -= size
                keep = True
        reader = RangedReader(self, path, size, heads, keep)
        completed = False
        try:
            yield reader  # type: ignore[misc]
            completed = reader.complete()
        finally:
            reader.close()
            if keep and completed:
                self._kept[path] = reader.chunks
            elif keep:
                with self._lock:
                    self._budget += size


_EMPTY = TreeListing.__new__(TreeListing)
_EMPTY.dirs, _EMPTY.sizes = {}, {}


def prefetch_budget() -> int:
    """How much a restore fetches ahead of its pipeline: a quarter of the memory
    available now, at least ``PREFETCH_BYTES`` and at most ``MAX_PREFETCH_BYTES``.

    Most of it is a restore's own memory anyway: a big pickle file fetched whole
    becomes its arrays (``_storage_filebuffer``), and a transactional restore holds every
    level's state before it applies any. A window smaller than the tree makes the files
    past it wait for the pipeline, one after another, where a download of all of them at
    once takes the time of the slowest (Orbax bounds the same thing by
    ``restore_concurrent_gb``, 96 GB by default)."""
    return memory_budget(PREFETCH_BYTES, MAX_PREFETCH_BYTES)


def _pipeline_order(path: str) -> list[tuple[int, str]]:
    """Sort key: a directory's files before what is in its subdirectories, each by name.

    Plain path order put ``ck/l0/state.pkl`` before ``ck/metadata.json``: when the big
    files' first ranges filled the window, the root level's own small files (the first
    the restore reads) were left out and fetched when asked, one request after another
    (two round trips each on pyarrow: HEAD, GET)."""
    *directories, name = path.split("/")
    return [(1, directory) for directory in directories] + [(0, name)]


def _norm(path: str) -> str:
    """``path`` without a trailing slash (the root of a filesystem keeps its own)."""
    return path.rstrip("/") or path
