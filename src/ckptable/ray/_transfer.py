"""Moving a directory tree from one Ray node to another: the transfer hook.

A save whose components are Ray actors has each actor write its part on its own node;
those directories then have to reach the node that publishes the checkpoint. A
*transfer hook* does that move. It is one method,
``transfer(src_node_id, src_path, dst_node_id, dst_path)``, so that a cluster with a
shared filesystem, rsync, or an object store can plug in its own (see
:class:`TransferHook`); :func:`check_transfer_hook` checks one the moment it is handed
over, not in the middle of a save.

Built-ins, all with the same contract (``dst_path`` must not exist; its parents are
created; the tree appears there complete or not at all, written under the temporary
sibling ``.<name>.ckptable-transfer-<token>`` and renamed in one step; any failure is a
:class:`~ckptable.errors.TransferError` that leaves neither ``dst_path`` nor the sibling
behind; only regular files and directories are moved, a symlink or special file is
refused):

- :class:`RayObjectStoreTransfer` (the default): streams the files through Ray's object
  store, in bounded chunks, from a task on the source node to a task on the destination
  node. No size limit and a few chunks of memory, where Ray's own
  ``sync_dir_between_nodes`` packs the whole directory in memory, refuses more than
  1 GiB and extracts tar members without a filter.
- :class:`LocalCopyTransfer`: plain file I/O in the calling process, for one node or
  nodes that share a filesystem.
- :class:`RecordingTransfer`: a test double that records the calls, then delegates or
  fails.

Nodes are told apart by Ray node id (hex), never by IP: every node of a
``ray.cluster_utils.Cluster`` (and of several containers on one host) shares one IP.

Progress: the built-ins count the bytes that arrive in the bar of the save or restore
that calls them, or, called directly, in a bar of their own (``progress=``, as in
``save_to_path``), its total from the source's listing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import inspect
import os
import pickle
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import ray

from ckptable._manifest import new_checksum, preferred_algorithm
from ckptable._progress import Bar, advance, current, progress_bar
from ckptable._storage import _libc_function
from ckptable.errors import TransferError
from ckptable.ray._nodes import pinned_to

__all__ = [
    "TRANSFER_MARKER",
    "LocalCopyTransfer",
    "RayObjectStoreTransfer",
    "RecordingTransfer",
    "TransferCall",
    "TransferHook",
    "check_transfer_hook",
    "get_default_transfer",
    "set_default_transfer",
]

#: Part of the name of the temporary sibling a transfer writes into before its rename
#: (``.<name>.ckptable-transfer-<token>``): a leftover scan can recognise one.
TRANSFER_MARKER = ".ckptable-transfer-"

_MiB = 1 << 20
_Hook = TypeVar("_Hook")


@runtime_checkable
class TransferHook(Protocol):
    """Moves a directory tree between Ray nodes.

    ``transfer`` copies the tree ``src_path`` on node ``src_node_id`` to ``dst_path`` on
    node ``dst_node_id`` (Ray node ids, hex, as ``ray.get_runtime_context().get_node_id()``
    gives them). ``dst_path`` must not exist yet; its parent directories are created.
    The tree must appear at ``dst_path`` complete or not at all, and any failure must
    raise :class:`~ckptable.errors.TransferError` and leave nothing at ``dst_path``.
    """

    def transfer(self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str) -> None:
        """Copy the tree ``src_path`` on ``src_node_id`` to ``dst_path`` on ``dst_node_id``."""
        ...


def check_transfer_hook(hook: _Hook) -> _Hook:
    """Return ``hook`` if it can serve as a :class:`TransferHook`, else raise TypeError.

    Checked when a hook is handed over (``set_default_transfer``, ``transfer=``), so
    that a wrong one fails there and not after a save has written its components.
    """
    expected = "transfer(src_node_id, src_path, dst_node_id, dst_path) -> None"
    if isinstance(hook, type):
        raise TypeError(
            f"{hook.__qualname__} is a class; a transfer hook is an instance with a method "
            f"{expected}: pass {hook.__qualname__}(...)."
        )
    method = getattr(hook, "transfer", None)
    if not callable(method):
        raise TypeError(f"{hook!r} is not a transfer hook: it has no callable method {expected}.")
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return hook  # no signature to inspect (a builtin): trust it
    try:
        signature.bind("src_node_id", "src_path", "dst_node_id", "dst_path")
    except TypeError as exc:
        raise TypeError(
            f"{hook!r} is not a transfer hook: its method transfer{signature} cannot be "
            f"called as {expected} ({exc})."
        ) from None
    return hook


_default_lock = threading.Lock()
_default_hook: TransferHook | None = None


def set_default_transfer(hook: TransferHook | None) -> None:
    """Make ``hook`` the process-wide default transfer hook (checked first);
    ``None`` goes back to a fresh :class:`RayObjectStoreTransfer`.

    Process-wide means this process only: Ray workers and actors keep their own.
    """
    global _default_hook
    new = RayObjectStoreTransfer() if hook is None else check_transfer_hook(hook)
    with _default_lock:
        _default_hook = new


def get_default_transfer() -> TransferHook:
    """The process-wide default transfer hook (a :class:`RayObjectStoreTransfer` unless
    :func:`set_default_transfer` said otherwise)."""
    global _default_hook
    with _default_lock:
        if _default_hook is None:
            _default_hook = RayObjectStoreTransfer()
        return _default_hook


# --------------------------------------------------------------------------------------
# The default: streamed through Ray's object store


class RayObjectStoreTransfer:
    """Stream the tree through Ray's object store, in chunks, from node to node.

    The driver starts a *writer* task pinned to the destination node; the writer starts
    a streaming-generator *reader* task pinned to the source node and writes what it
    yields. So the source path is only touched on the source node and the destination
    path only on the destination node, and the bytes never pass through the driver.

    The reader yields the listing (relative paths as bytes, kinds, sizes), then the
    contents of all files back to back in chunks of at most ``chunk_bytes`` (small files
    share a chunk), then each file's checksum (xxh3-64, or CRC-32 without ``xxhash``).
    Ray's generator backpressure pauses the reader while ``max_chunks_in_flight`` items
    wait unconsumed, so each process holds about one chunk and each node's object store
    a few: no size limit, and a few chunks of extra memory whatever the tree's size.
    A chunk travels as a pickle-5 out-of-band buffer: the reader reads into one reused
    buffer, Ray copies it into the object store once, and the writer writes straight from
    the object store (``ray.get`` maps it, no copy).

    The writer validates every member path before it creates anything (relative, no
    ``..``, no empty, ``.`` or backslash parts, no NUL, each directory listed before its
    contents, no duplicates), writes into the temporary sibling, compares every file's
    size and checksum with the reader's, and renames the sibling into place (never over
    an existing path). Nothing is fsynced: the caller makes the result durable when it
    publishes, once for the whole checkpoint. The source must not change meanwhile: the
    listing is taken first, and a file whose size changes after it is an error.

    Every task needs no CPU (``num_cpus=0``), so transfers run on nodes whose CPUs are
    all held by actors, and on a head node with none. No task is retried: a half-read
    stream cannot be resumed, and a failed transfer is reported as such. A task that
    raises, a worker or node that dies, and ``timeout_s`` running out are all a
    :class:`~ckptable.errors.TransferError`; the writer removes its temporary directory,
    or, if the writer itself died, a small task on the destination node does.

    With a progress bar, the writer reports the bytes it received and the listing's
    total to the driver a few times a second (through Ray's internal key-value store:
    small values, no data), and the driver updates the bar while it waits.

    Args:
        chunk_bytes: The largest chunk of file data in one object.
        max_chunks_in_flight: How many items the reader may be ahead of the writer.
        timeout_s: Give up (and clean up) after this many seconds; None: no limit.
        progress: A progress bar for transfers called directly, as in
            ``Checkpointable.save_to_path`` (None: when stderr is a terminal). Inside a
            save or restore, the transfer counts in that operation's bar instead.
    """

    def __init__(
        self,
        chunk_bytes: int = 8 * _MiB,
        max_chunks_in_flight: int = 4,
        timeout_s: float | None = None,
        progress: bool | None = None,
    ) -> None:
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, not {chunk_bytes!r}")
        if chunk_bytes > _MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be at most {_MAX_CHUNK_BYTES}, not {chunk_bytes}")
        if (
            isinstance(max_chunks_in_flight, bool)
            or not isinstance(max_chunks_in_flight, int)
            or max_chunks_in_flight < 1
        ):
            raise ValueError(
                f"max_chunks_in_flight must be a positive int, not {max_chunks_in_flight!r}"
            )
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive or None, not {timeout_s!r}")
        self.chunk_bytes = chunk_bytes
        self.max_chunks_in_flight = max_chunks_in_flight
        self.timeout_s = timeout_s
        self.progress = _checked_progress(progress)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(chunk_bytes={self.chunk_bytes}, "
            f"max_chunks_in_flight={self.max_chunks_in_flight}, timeout_s={self.timeout_s}, "
            f"progress={self.progress})"
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return bool(vars(self) == vars(other))

    def __hash__(self) -> int:
        return hash(
            (type(self), self.chunk_bytes, self.max_chunks_in_flight, self.timeout_s, self.progress)
        )

    def transfer(self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str) -> None:
        """Copy the tree ``src_path`` on ``src_node_id`` to ``dst_path`` on ``dst_node_id``."""
        job = _Job.checked(src_node_id, src_path, dst_node_id, dst_path)
        if not ray.is_initialized():
            raise job.error("Ray is not initialized (call ray.init() first)")
        with progress_bar(self.progress, "Transferring", total=0):
            bar = current()
            watch = None if bar is None else _ProgressWatch(bar)
            if watch is not None:
                job = dataclasses.replace(job, progress_key=watch.key)
            try:
                self._run_writer(job, watch)
            finally:
                if watch is not None:
                    watch.close()

    def _run_writer(self, job: _Job, watch: _ProgressWatch | None) -> None:
        """Start the writer task on the destination node and wait for it (updating the
        progress bar meanwhile, if there is one); any failure is a TransferError."""
        try:
            writer = _writer_task.options(scheduling_strategy=pinned_to(job.dst_node_id)).remote(
                self, job
            )
        except Exception as exc:  # an invalid node id, ...
            raise job.error(_reason(exc)) from exc
        try:
            written = _await_writer(writer, self.timeout_s, watch)
        except ray.exceptions.RayTaskError as exc:
            # The writer failed and removed its temporary directory itself.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TransferError):
                raise TransferError(str(cause), path=job.dst_path) from exc
            raise job.error(_reason(exc)) from exc
        except ray.exceptions.TaskUnschedulableError as exc:
            raise job.error(f"the destination node cannot run it: {_reason(exc)}") from exc
        except ray.exceptions.GetTimeoutError as exc:
            _cancel_quietly(writer)
            _remove_remote_quietly(job)
            raise job.error(f"it did not finish within {self.timeout_s} s") from exc
        except BaseException as exc:
            # The writer's worker or node died, or the caller was interrupted.
            _cancel_quietly(writer)
            _remove_remote_quietly(job)
            if isinstance(exc, Exception):
                raise job.error(f"on the destination node: {_reason(exc)}") from exc
            raise
        if watch is not None:
            watch.finish(written)

    # The two halves, each run in a task on its node. Tests override them to observe
    # or inject faults (they are the only seams; nothing else is meant to change).

    def _read_source(self, src_path: str, algorithm: str) -> Iterator[Any]:
        """The reader's stream (runs on the source node)."""
        return _stream_tree(src_path, self.chunk_bytes, algorithm)

    def _write_destination(self, items: Iterator[Any], tmp_path: str, algorithm: str) -> None:
        """Write the reader's stream into ``tmp_path`` (runs on the destination node)."""
        _write_tree(items, tmp_path, algorithm)

    def _receive(self, job: _Job) -> int | None:
        """The writer task's body: start the reader, write its stream, publish. Returns
        the bytes written if the driver asked for progress reports, else None."""
        algorithm = preferred_algorithm()
        reporter = _ProgressReporter(job.progress_key) if job.progress_key else None
        # Items read and not yet written: unconsumed ones (Ray's backpressure pauses the
        # reader at this many), those fetched ahead, and the one being written.
        prefetch = max(1, self.max_chunks_in_flight // 2)
        backpressure = max(1, self.max_chunks_in_flight - prefetch)

        def write(tmp_path: str) -> None:
            reader = _reader_task.options(
                scheduling_strategy=pinned_to(job.src_node_id),
                _generator_backpressure_num_objects=backpressure,
            ).remote(self, job.src_path, algorithm)
            items = _fetch(reader, prefetch)
            try:
                stream = items if reporter is None else reporter.counting(items)
                self._write_destination(stream, tmp_path, algorithm)
            finally:
                items.close()

        _receive_tree(job, write)
        return None if reporter is None else reporter.written


#: Larger chunks would not fit one ``os.write`` / ``readv`` call everywhere.
_MAX_CHUNK_BYTES = 1 << 30


def _reader_body(hook: RayObjectStoreTransfer, src_path: str, algorithm: str) -> Iterator[Any]:
    # A plain loop, not ``yield from``: Ray's executor resumes the generator with
    # ``send()``, which ``yield from`` would pass on to whatever iterator a hook returns.
    for item in hook._read_source(src_path, algorithm):  # noqa: UP028
        yield item


def _writer_body(hook: RayObjectStoreTransfer, job: _Job) -> int | None:
    return hook._receive(job)


def _remove_body(path: str) -> None:
    _remove_tree_quietly(path)


# No retries: a stream cannot resume half-way, and a failure must be reported, not
# replayed. No CPUs: worker nodes' CPUs are usually all held by actors, the head has none.
_reader_task: Any = ray.remote(num_cpus=0, max_retries=0)(_reader_body)
_writer_task: Any = ray.remote(num_cpus=0, max_retries=0)(_writer_body)
_remove_task: Any = ray.remote(num_cpus=0, max_retries=0)(_remove_body)

#: How long the driver waits for the cleanup task after the writer died.
_CLEANUP_TIMEOUT_S = 30.0


def _fetch(reader: Any, depth: int) -> Generator[Any, None, None]:
    """The reader's items, in order, each fetched to this node (``ray.get``).

    Up to ``depth`` items are fetched on helper threads, so that pulling the next chunk
    from the source node overlaps writing this one (one after the other, the pulls took
    about 60% of a transfer's time and the writes 30%). Only the items in that window and
    the one being written are referenced here; dropping a reference frees the item's
    object-store copies on both nodes. If the writer stops early, the reader is
    cancelled (a KeyboardInterrupt in its task, which ends it at once also while
    backpressure holds it; its worker process lives on) rather than left paused.
    """
    pool = concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="ckptable-fetch")
    window: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
    refs = iter(reader)
    exhausted = finished = False
    try:
        while True:
            while not exhausted and len(window) < depth:
                try:
                    ref = next(refs)
                except StopIteration:
                    exhausted = True
                except ray.exceptions.RayError as exc:
                    raise TransferError(f"on the source node: {_reason(exc)}") from exc
                else:
                    window.append(pool.submit(ray.get, ref))
                    del ref
            if not window:
                break
            try:
                item = window.popleft().result()
            except ray.exceptions.RayError as exc:
                raise TransferError(f"on the source node: {_reason(exc)}") from exc
            yield item
            del item
        finished = True
    finally:
        for future in window:
            future.cancel()
        window.clear()
        pool.shutdown(wait=False)
        if not finished:
            _cancel_quietly(reader, force=False)


def _cancel_quietly(task: Any, *, force: bool = True) -> None:
    """Best effort ``ray.cancel``; ``force`` kills the task's worker process."""
    with contextlib.suppress(Exception):
        ray.cancel(task, force=force)


def _remove_remote_quietly(job: _Job) -> None:
    """Best effort: remove the temporary directory of a writer that died, on its node."""
    with contextlib.suppress(Exception):
        cleanup = _remove_task.options(scheduling_strategy=pinned_to(job.dst_node_id)).remote(
            job.tmp_path
        )
        ray.get(cleanup, timeout=_CLEANUP_TIMEOUT_S)


# --------------------------------------------------------------------------------------
# Progress: the writer reports, the driver shows


#: How often the writer reports its progress, and the driver looks, at most (seconds).
_PROGRESS_INTERVAL_S = 0.2
#: Namespace of the progress reports in Ray's internal key-value store.
_PROGRESS_NAMESPACE = "ckptable-progress"


def _checked_progress(progress: Any) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, not {progress!r}")
    return progress


def _counting(
    items: Iterator[Any], on_total: Callable[[int], None], on_chunk: Callable[[int], None]
) -> Iterator[Any]:
    """Pass a transfer stream on unchanged, telling ``on_total`` the bytes its listing
    announces and ``on_chunk`` the size of each chunk as the writer takes it. Never
    raises for a malformed item: the writer refuses those."""
    for item in items:
        if isinstance(item, (tuple, list)):
            if len(item) == 4 and item[0] == "listing":
                on_total(_listed_bytes(item[3]))
        elif size := _chunk_bytes(item):
            on_chunk(size)
        yield item


def _chunk_bytes(item: Any) -> int:
    try:
        return memoryview(item).nbytes
    except TypeError:
        return 0


def _listed_bytes(entries: Any) -> int:
    try:
        return sum(
            size
            for _, kind, size in entries
            if kind == _FILE and isinstance(size, int) and size > 0
        )
    except (TypeError, ValueError):
        return 0


class _ProgressReporter:
    """In the writer task: counts the bytes that arrive and reports ``"<bytes> <total>"``
    under ``key`` in Ray's internal key-value store, at most every
    ``_PROGRESS_INTERVAL_S`` (a report is a few bytes; the data never leaves the two
    nodes). Best effort: a report that fails is skipped, never the transfer."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.written = 0
        self.total = 0
        self._reported_at = 0.0

    def counting(self, items: Iterator[Any]) -> Iterator[Any]:
        return _counting(items, self._on_total, self._on_chunk)

    def _on_total(self, total: int) -> None:
        self.total = total
        self._report()

    def _on_chunk(self, size: int) -> None:
        self.written += size
        if time.monotonic() - self._reported_at >= _PROGRESS_INTERVAL_S:
            self._report()

    def _report(self) -> None:
        self._reported_at = time.monotonic()
        with contextlib.suppress(Exception):
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(
                self.key, f"{self.written} {self.total}", namespace=_PROGRESS_NAMESPACE
            )


class _ProgressWatch:
    """In the driver: shows the writer's reports in ``bar`` (the total once, added to
    the bar's), and removes the report when the transfer ends."""

    def __init__(self, bar: Bar) -> None:
        self.key = f"transfer-{uuid.uuid4().hex}"
        self._bar = bar
        self._shown = 0
        self._total_added = False

    def poll(self) -> None:
        report = None
        with contextlib.suppress(Exception):
            from ray.experimental.internal_kv import _internal_kv_get

            report = _internal_kv_get(self.key, namespace=_PROGRESS_NAMESPACE)
        if not report:
            return
        try:
            written, total = (int(part) for part in report.split())
        except ValueError:
            return
        if not self._total_added:
            self._bar.add_to_total(total)
            self._total_added = True
        self._show(written)

    def finish(self, written: Any) -> None:
        """The writer's final count (its return value), exact where reports lagged."""
        if isinstance(written, int):
            if not self._total_added:
                self._bar.add_to_total(written)
                self._total_added = True
            self._show(written)

    def _show(self, written: int) -> None:
        self._bar.update(written - self._shown)
        self._shown = written

    def close(self) -> None:
        with contextlib.suppress(Exception):
            from ray.experimental.internal_kv import _internal_kv_del

            _internal_kv_del(self.key, namespace=_PROGRESS_NAMESPACE)


def _await_writer(writer: Any, timeout_s: float | None, watch: _ProgressWatch | None) -> Any:
    """The writer's result (``ray.get``); with a ``watch``, waited for in short steps
    that show its progress. Raises ``GetTimeoutError`` after ``timeout_s``."""
    if watch is None:
        return ray.get(writer, timeout=timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        step = _PROGRESS_INTERVAL_S
        if deadline is not None:
            step = max(0.0, min(step, deadline - time.monotonic()))
        ready, _ = ray.wait([writer], timeout=step)
        watch.poll()
        if ready:
            return ray.get(writer)
        if deadline is not None and time.monotonic() >= deadline:
            raise ray.exceptions.GetTimeoutError(f"the writer did not finish in {timeout_s} s")


# --------------------------------------------------------------------------------------
# Plain file I/O in this process


class LocalCopyTransfer:
    """Copy the tree with plain file I/O in the calling process.

    For transfers within one node, or between nodes that share a filesystem (NFS and
    the like), where ``src_path`` is readable and ``dst_path`` writable from here. The
    node ids are not compared: nodes that share a filesystem have different ids, and only
    the caller knows which paths they share. Same contract as the other built-ins
    (temporary sibling and rename, symlinks and special files refused, TransferError),
    and the same reader and writer as :class:`RayObjectStoreTransfer`, joined by a
    generator instead of the object store (no checksums: both ends see the same buffer).

    Args:
        progress: A progress bar for transfers called directly, as for
            :class:`RayObjectStoreTransfer`.
    """

    #: Size of the one buffer the copy goes through.
    chunk_bytes = 8 * _MiB

    def __init__(self, progress: bool | None = None) -> None:
        self.progress = _checked_progress(progress)

    def __repr__(self) -> str:
        shown = "" if self.progress is None else f"progress={self.progress}"
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return bool(self.progress == other.progress)

    def __hash__(self) -> int:
        return hash((type(self), self.progress))

    def transfer(self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str) -> None:
        """Copy ``src_path`` to ``dst_path``, both reachable from this process."""
        job = _Job.checked(src_node_id, src_path, dst_node_id, dst_path, one_filesystem=True)

        def write(tmp_path: str) -> None:
            items = _stream_tree(job.src_path, self.chunk_bytes, None)
            bar = current()
            if bar is not None:
                items = _counting(items, bar.add_to_total, advance)
            _write_tree(items, tmp_path, None)

        with progress_bar(self.progress, "Transferring", total=0):
            _receive_tree(job, write)


# --------------------------------------------------------------------------------------
# The test double


@dataclasses.dataclass(frozen=True)
class TransferCall:
    """One call of :meth:`RecordingTransfer.transfer`."""

    src_node_id: str
    src_path: str
    dst_node_id: str
    dst_path: str


class RecordingTransfer:
    """A transfer hook for tests: records every call in :attr:`calls`, then delegates to
    ``inner`` (default: a :class:`RayObjectStoreTransfer`) or, with ``fail``, raises it
    (as a :class:`~ckptable.errors.TransferError`, wrapping it if it is not one) without
    creating anything."""

    def __init__(
        self, inner: TransferHook | None = None, *, fail: BaseException | None = None
    ) -> None:
        self.inner: TransferHook = (
            RayObjectStoreTransfer() if inner is None else check_transfer_hook(inner)
        )
        self.fail = fail
        #: The calls so far, oldest first.
        self.calls: list[TransferCall] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner={self.inner!r}, fail={self.fail!r})"

    def transfer(self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str) -> None:
        """Record the call, then fail as told or delegate to ``inner``."""
        self.calls.append(TransferCall(src_node_id, src_path, dst_node_id, dst_path))
        if self.fail is None:
            self.inner.transfer(src_node_id, src_path, dst_node_id, dst_path)
            return
        if isinstance(self.fail, TransferError):
            raise self.fail
        job = _Job(src_node_id, src_path, dst_node_id, dst_path, "")
        raise job.error(_reason(self.fail)) from self.fail


# --------------------------------------------------------------------------------------
# What every built-in shares: the job, the receiving side, the stream


@dataclasses.dataclass(frozen=True)
class _Job:
    """One transfer's arguments, checked, and its temporary sibling of ``dst_path``."""

    src_node_id: str
    src_path: str
    dst_node_id: str
    dst_path: str
    tmp_path: str
    #: Where the writer reports its progress (empty: nobody watches).
    progress_key: str = ""

    @classmethod
    def checked(
        cls,
        src_node_id: Any,
        src_path: Any,
        dst_node_id: Any,
        dst_path: Any,
        *,
        one_filesystem: bool = False,
    ) -> _Job:
        """The job, or TypeError / TransferError for arguments no transfer can use.

        ``one_filesystem``: both paths are on one filesystem whatever the node ids say,
        so neither may contain the other (else the copy would copy itself).
        """
        for name, value in (("src_node_id", src_node_id), ("dst_node_id", dst_node_id)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a Ray node id (a hex str), not {value!r}")
        paths = []
        for name, value in (("src_path", src_path), ("dst_path", dst_path)):
            try:
                path = os.fspath(value)
            except TypeError:
                raise TypeError(f"{name} must be a str path, not {value!r}") from None
            if not isinstance(path, str):
                raise TypeError(f"{name} must be a str path, not {value!r}")
            paths.append(os.path.normpath(path))
        src, dst = paths
        job = cls(src_node_id, src, dst_node_id, dst, "")
        for path in paths:
            if not os.path.isabs(path):
                # Each task resolves a relative path against its own working directory.
                raise job.error(f"{path!r} is not an absolute path")
        parent, name = os.path.split(dst)
        if not name:
            raise job.error("the destination is a filesystem root")
        same_tree = os.path.commonpath([src, dst]) in (src, dst)
        if same_tree and (one_filesystem or src_node_id == dst_node_id):
            raise job.error("one path contains the other")
        token = uuid.uuid4().hex[:16]
        return dataclasses.replace(
            job, tmp_path=os.path.join(parent, f".{name}{TRANSFER_MARKER}{token}")
        )

    def error(self, reason: str) -> TransferError:
        return TransferError(
            f"Could not transfer {self.src_path} on node {self.src_node_id} to "
            f"{self.dst_path} on node {self.dst_node_id}: {reason}",
            path=self.dst_path,
        )


def _reason(exc: BaseException) -> str:
    """What went wrong, in a line or two, for a TransferError's message."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            return _reason(cause)
    if isinstance(exc, TransferError):
        return str(exc)
    text = str(exc).strip()
    if isinstance(exc, ray.exceptions.RayError):
        text = text.splitlines()[0] if text else ""
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename is not None:
            # The stream's paths are bytes: show them as the str paths they stand for.
            names = [os.fsdecode(exc.filename)]
            if exc.filename2 is not None:
                names.append(os.fsdecode(exc.filename2))
            return f"{exc.strerror}: {' -> '.join(names)}"
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _receive_tree(job: _Job, write: Callable[[str], None]) -> None:
    """On the destination: make ``job.tmp_path``, let ``write`` fill it, rename it to
    ``job.dst_path``; on any failure remove it and raise TransferError."""
    try:
        if os.path.lexists(job.dst_path):
            raise TransferError(f"{job.dst_path} already exists")
        os.makedirs(os.path.dirname(job.dst_path), exist_ok=True)
        os.mkdir(job.tmp_path, 0o755)
    except TransferError as exc:
        raise job.error(str(exc)) from None
    except OSError as exc:
        raise job.error(_reason(exc)) from exc
    try:
        write(job.tmp_path)
        try:
            _rename_no_replace(job.tmp_path, job.dst_path)
        except FileExistsError:
            raise TransferError(f"{job.dst_path} appeared meanwhile") from None
    except BaseException as exc:
        _remove_tree_quietly(job.tmp_path)
        if isinstance(exc, Exception):
            raise job.error(_reason(exc)) from exc
        raise


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_no_replace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists: with
    ``renameat2(RENAME_NOREPLACE)`` where the OS has it, else a check and a rename (which
    would only replace an empty directory created between the two)."""
    renameat2 = _libc_function(
        "renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    )
    if renameat2 is not None:
        flags = _RENAME_NOREPLACE
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), src, None, dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _remove_tree_quietly(path: str) -> None:
    """Remove a temporary directory (never following symlinks), ignoring failures."""
    if TRANSFER_MARKER not in os.path.basename(path):
        return  # only ever a transfer's own temporary directory
    shutil.rmtree(path, ignore_errors=True)


# The stream: ("listing", version, algorithm, entries), then chunks (buffers), then
# ("end", checksums, total_bytes). Paths are bytes (any name the OS allows, also those
# that are not UTF-8); a directory is listed before its contents.

_STREAM_VERSION = 1
_DIR, _FILE = "d", "f"
_OPEN_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_OPEN_WRITE = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def _stream_tree(root: str, chunk_bytes: int, algorithm: str | None) -> Iterator[Any]:
    """Yield the stream of the tree ``root``: listing, chunks, checksums.

    All files' contents go back to back through one reused buffer; a chunk is yielded
    when the buffer is full (so small files share one). Yielding the same buffer again
    is safe because each item is serialized (or written, locally) before the generator
    resumes; were it not, the checksums would tell. A file that changes size while it
    is read is an error.
    """
    root_b = os.fsencode(root)
    if not stat.S_ISDIR(os.stat(root_b).st_mode):
        raise TransferError(f"{root} is not a directory")
    entries = _list_tree(root_b)
    yield ("listing", _STREAM_VERSION, algorithm, entries)
    files = [(rel, size) for rel, kind, size in entries if kind == _FILE]
    total = sum(size for _, size in files)
    capacity = min(chunk_bytes, total) or 1
    view = memoryview(bytearray(capacity))
    used = 0
    checksums: list[str] = []
    for rel, size in files:
        path = root_b + b"/" + rel
        fd = os.open(path, _OPEN_READ)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                raise TransferError(f"{os.fsdecode(path)} changed while it was transferred")
            checksum = new_checksum(algorithm) if algorithm else None
            remaining = size
            while remaining:
                if used == capacity:
                    yield pickle.PickleBuffer(view)
                    used = 0
                piece = view[used : used + min(remaining, capacity - used)]
                count = os.readv(fd, [piece])
                if count == 0:
                    raise TransferError(f"{os.fsdecode(path)} shrank while it was transferred")
                if checksum is not None:
                    checksum.update(piece[:count])
                used += count
                remaining -= count
            if os.read(fd, 1):
                raise TransferError(f"{os.fsdecode(path)} grew while it was transferred")
        finally:
            os.close(fd)
        checksums.append(checksum.hexdigest() if checksum is not None else "")
    if used:
        yield pickle.PickleBuffer(view[:used])
    yield ("end", checksums, total)


def _list_tree(root: bytes) -> list[tuple[bytes, str, int]]:
    """``(relative path, kind, size)`` of everything under ``root``, each directory
    before its contents, names sorted; a symlink or special file is an error."""
    entries: list[tuple[bytes, str, int]] = []
    pending = [b""]
    while pending:
        directory = pending.pop()
        with os.scandir(root + b"/" + directory if directory else root) as scan:
            children = sorted(scan, key=lambda entry: entry.name)
        subdirectories = []
        for child in children:
            rel = directory + b"/" + child.name if directory else child.name
            mode = child.stat(follow_symlinks=False).st_mode
            if b"\\" in child.name:
                raise TransferError(
                    f"{os.fsdecode(child.path)}: names with a backslash are not transferred"
                )
            if stat.S_ISDIR(mode):
                entries.append((rel, _DIR, 0))
                subdirectories.append(rel)
            elif stat.S_ISREG(mode):
                entries.append((rel, _FILE, child.stat(follow_symlinks=False).st_size))
            else:
                raise TransferError(
                    f"{os.fsdecode(child.path)} is {_describe_mode(mode)}; only regular files "
                    "and directories are transferred"
                )
        pending.extend(reversed(subdirectories))
    return entries


def _describe_mode(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _write_tree(items: Iterator[Any], root: str, algorithm: str | None) -> None:
    """Write the stream ``items`` into the existing, empty directory ``root``.

    The listing is validated whole before anything is created; each file is opened with
    ``O_EXCL | O_NOFOLLOW`` inside directories this function created, so nothing is
    written outside ``root``. Every file's size and checksum are compared with the
    reader's.
    """
    header = next(items, None)
    if (
        not isinstance(header, (tuple, list))
        or len(header) != 4
        or header[0] != "listing"
        or header[1] != _STREAM_VERSION
    ):
        raise TransferError(f"the stream does not start with a listing: {_preview(header)}")
    if header[2] != algorithm:
        raise TransferError(f"the reader used checksum {header[2]!r}, not {algorithm!r}")
    root_b = os.fsencode(root)
    files: list[tuple[bytes, int]] = []
    for path, kind, size in _validated_members(header[3], root_b):
        if kind == _DIR:
            os.mkdir(path, 0o755)
        else:
            files.append((path, size))
    sink = _FileSink(files, algorithm)
    try:
        end: Any = None
        for item in items:
            if end is not None:
                raise TransferError(f"the stream goes on after its end: {_preview(item)}")
            if isinstance(item, (tuple, list)):
                end = item
                continue
            sink.write(_as_bytes_view(item))
        if (
            not isinstance(end, (tuple, list))
            or len(end) != 3
            or end[0] != "end"
            or not isinstance(end[1], (tuple, list))
        ):
            raise TransferError(f"the stream ended without its end record: {_preview(end)}")
        sink.finish(list(end[1]), end[2])
    finally:
        sink.close()


def _validated_members(entries: Any, root: bytes) -> list[tuple[bytes, str, int]]:
    """The listing as ``(absolute path, kind, size)``, after checking every entry; a bad
    one is an error, before anything is created."""
    if not isinstance(entries, (tuple, list)):
        raise TransferError(f"the listing is not a list: {_preview(entries)}")
    directories: set[bytes] = set()
    seen: set[bytes] = set()
    members: list[tuple[bytes, str, int]] = []
    prefix = root + b"/"
    for entry in entries:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise TransferError(f"bad listing entry {_preview(entry)}")
        rel, kind, size = entry
        problem = _member_problem(rel)
        if problem is None and rel in seen:
            problem = "listed twice"
        parent = rel.rpartition(b"/")[0] if problem is None else b""
        if problem is None and parent and parent not in directories:
            problem = "its directory is not listed before it"
        if problem is None and kind not in (_DIR, _FILE):
            problem = f"unknown kind {kind!r}"
        if (
            problem is None
            and kind == _FILE
            and (isinstance(size, bool) or not isinstance(size, int) or size < 0)
        ):
            problem = f"bad size {size!r}"
        path = prefix + rel if problem is None else b""
        if problem is None and not os.path.normpath(path).startswith(prefix):
            problem = "it leads outside the destination"
        if problem is not None:
            raise TransferError(f"refused member path {rel!r}: {problem}")
        seen.add(rel)
        if kind == _DIR:
            directories.add(rel)
        members.append((path, kind, size if kind == _FILE else 0))
    return members


def _member_problem(rel: Any) -> str | None:
    """Why ``rel`` is not a plain relative path inside the tree, or None if it is."""
    if not isinstance(rel, bytes):
        return "not bytes"
    if not rel:
        return "empty"
    if b"\x00" in rel:
        return "contains NUL"
    if b"\\" in rel:
        return "contains a backslash"
    if rel.startswith(b"/"):
        return "absolute"
    if any(part in (b"", b".", b"..") for part in rel.split(b"/")):
        return "an empty, '.' or '..' part"
    return None


class _FileSink:
    """Writes the back-to-back contents of ``files`` as chunks arrive, one file open at
    a time, and checks each file's size and checksum."""

    def __init__(self, files: list[tuple[bytes, int]], algorithm: str | None) -> None:
        self._files = files
        self._algorithm = algorithm
        self._next = 0
        self._fd = -1
        self._remaining = 0
        self._checksum: Any = None
        self._checksums: list[str] = []
        self._written = 0
        self._open_empty_files()

    def _open_next(self) -> None:
        path, size = self._files[self._next]
        self._next += 1
        self._fd = os.open(path, _OPEN_WRITE, 0o644)
        self._remaining = size
        self._checksum = new_checksum(self._algorithm) if self._algorithm else None
        if size == 0:
            self._close_current()

    def _close_current(self) -> None:
        os.close(self._fd)
        self._fd = -1
        checksum = self._checksum
        self._checksums.append(checksum.hexdigest() if checksum is not None else "")

    def _open_empty_files(self) -> None:
        """Create the files of size 0 that come next (they get no bytes)."""
        while self._fd < 0 and self._next < len(self._files) and self._files[self._next][1] == 0:
            self._open_next()

    def write(self, data: memoryview) -> None:
        while data:
            if self._fd < 0:
                if self._next == len(self._files):
                    raise TransferError("the stream holds more data than the listed files")
                self._open_next()
            piece = data[: self._remaining]
            if self._checksum is not None:
                self._checksum.update(piece)
            while piece:
                written = os.write(self._fd, piece)
                piece = piece[written:]
            taken = min(self._remaining, len(data))
            self._remaining -= taken
            self._written += taken
            data = data[taken:]
            if self._remaining == 0:
                self._close_current()
                self._open_empty_files()

    def finish(self, checksums: list[Any], total: Any) -> None:
        if self._fd >= 0 or self._next < len(self._files):
            raise TransferError(
                f"the stream ended early, after {self._written} bytes of {total} "
                f"(in file {self._next} of {len(self._files)})"
            )
        if total != self._written:
            raise TransferError(
                f"the reader sent {total} bytes, the writer received {self._written}"
            )
        if checksums != self._checksums:
            for (path, _), sent, got in zip(self._files, checksums, self._checksums, strict=False):
                if sent != got:
                    raise TransferError(
                        f"checksum mismatch for {os.fsdecode(path)}: sent {sent!r}, "
                        f"received {got!r}"
                    )
            raise TransferError(
                f"the reader sent {len(checksums)} checksums for {len(self._files)} files"
            )

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _as_bytes_view(item: Any) -> memoryview:
    """A chunk as a flat byte view, without copying."""
    try:
        view = memoryview(item)
    except TypeError:
        raise TransferError(f"the stream holds {_preview(item)} where a chunk belongs") from None
    if not view.c_contiguous:
        raise TransferError("the stream holds a non-contiguous chunk")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _preview(item: Any) -> str:
    text = (
        repr(item) if not isinstance(item, (bytes, bytearray, memoryview)) else type(item).__name__
    )
    return text if len(text) <= 200 else text[:200] + "..."
