"""The default transfer hook: :class:`RayObjectStoreTransfer`, the tree streamed from a
reader task on the source node to a writer task on the destination node: the listing
and the records through Ray's object store, the file contents over a direct connection
between the two tasks (``_transfer_direct``) or, where none can be made, through the
object store too, in bounded chunks."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import ray

from ckptable._manifest import preferred_algorithm
from ckptable._progress import advance, current, progress_bar
from ckptable.errors import TransferError
from ckptable.ray._nodes import current_node_id, pinned_to
from ckptable.ray._transfer_direct import (
    SEND_BYTES,
    Listener,
    Peer,
    direct_allowed,
    receive_over,
    send_over,
)
from ckptable.ray._transfer_direct import connect as connect_to_writer
from ckptable.ray._transfer_fetch import END_GRACE_S, Deadline, Fetcher
from ckptable.ray._transfer_hook import TransferReceipt
from ckptable.ray._transfer_job import _Job, _reason, _receive_tree, _remove_tree_quietly
from ckptable.ray._transfer_progress import (
    _await_writer,
    _checked_progress,
    _counting,
    _ProgressReporter,
    _ProgressWatch,
)
from ckptable.ray._transfer_read import _stream_tree
from ckptable.ray._transfer_write import _write_tree

__all__ = ["RayObjectStoreTransfer"]

_MiB = 1 << 20


class RayObjectStoreTransfer:
    """Stream the tree from node to node: records through Ray's object store, file
    contents over a direct connection between two Ray tasks (or through the object store
    too, in chunks, where no connection can be made).

    The driver starts a *writer* task pinned to the destination node; the writer starts
    a streaming-generator *reader* task pinned to the source node and writes what it
    yields. So the source path is only touched on the source node and the destination
    path only on the destination node, and the bytes never pass through the driver.
    Two shortcuts, both decided by node id (so right on any cluster): when the
    destination is the caller's own node (a save moving an actor's directory in), the
    caller's thread is the writer, so no task has to start there; when source and
    destination are one node, the writer reads the source itself, with no reader task.

    The reader yields the listing (relative paths as bytes, kinds, sizes), then the
    contents of all files back to back in chunks of at most ``chunk_bytes`` (small files
    share a chunk), then each file's checksum (xxh3-64, or CRC-32 without ``xxhash``).

    With ``direct`` (the default), the writer listens on its node's IP for the reader,
    who connects after the listing, proves itself with a one-time token that came through
    Ray, and sends the chunks over that one TCP connection: each is copied into the
    socket on the source node and out of it on the destination node, where the object
    store would copy it into the source node's store, push it to the destination node's
    store and map it there (on a two-core VM: 1.1-2.3 GB/s against 0.4-0.9 GB/s). If the
    reader cannot connect within a few seconds (a firewall between the nodes), or Ray's
    traffic is encrypted (``RAY_USE_TLS``: the connection is not), the chunks go through
    the object store as with ``direct=False``: Ray's generator backpressure pauses the
    reader while ``max_chunks_in_flight`` items wait unconsumed, so each process holds
    about one chunk and each node's object store a few; a chunk travels as a pickle-5
    out-of-band buffer, and the writer writes straight from the object store. Either way:
    no size limit, and a few chunks of extra memory whatever the tree's size.

    The writer validates every member path before it creates anything (relative, no
    ``..``, no empty, ``.`` or backslash parts, no NUL, each directory listed before its
    contents, no duplicates), writes into the temporary sibling, checksums every file as
    it writes it and compares its size and checksum with the reader's, and renames the
    sibling into place (never over an existing path). It returns a
    :class:`~ckptable.ray._transfer_hook.TransferReceipt` of those checksums, so that a
    save can check the tree against the actor's manifest without reading it again.
    Nothing is fsynced: the caller makes the result durable when it publishes, once for
    the whole checkpoint. The source must not change meanwhile: the listing is taken
    first, and a file whose size changes after it is an error.

    Every task needs no CPU (``num_cpus=0``), so transfers run on nodes whose CPUs are
    all held by actors, and on a head node with none. No task is retried: a half-read
    stream cannot be resumed, and a failed transfer is reported as such. A task that
    raises, a worker or node that dies (also mid-stream on the direct connection), and
    ``timeout_s`` running out are all a :class:`~ckptable.errors.TransferError`; the
    writer removes its temporary directory, or, if the writer task itself died or ran
    out of time, a small task on the destination node does.

    With a progress bar, the writer reports the bytes it received and the listing's
    total to the driver a few times a second (through Ray's internal key-value store:
    small values, no data), and the driver updates the bar while it waits.

    Args:
        chunk_bytes: The largest chunk of file data read (and sent) at once.
        max_chunks_in_flight: How many items the reader may be ahead of the writer.
        timeout_s: Give up (and clean up) after this many seconds; None: no limit.
        progress: A progress bar for transfers called directly, as in
            ``Checkpointable.save_to_path`` (None: when stderr is a terminal). Inside a
            save or restore, the transfer counts in that operation's bar instead.
        direct: Send the file contents over a direct connection between the two tasks
            when one can be made (False: always through the object store).
    """

    #: When the writer stops early, how long a reader that failed or is ending may take
    #: to end by itself before it is cancelled (``_transfer_fetch.Fetcher``).
    reader_end_grace_s: float = END_GRACE_S

    def __init__(
        self,
        chunk_bytes: int = 8 * _MiB,
        max_chunks_in_flight: int = 4,
        timeout_s: float | None = None,
        progress: bool | None = None,
        direct: bool = True,
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
        if not isinstance(direct, bool):
            raise TypeError(f"direct must be True or False, not {direct!r}")
        self.chunk_bytes = chunk_bytes
        self.max_chunks_in_flight = max_chunks_in_flight
        self.timeout_s = timeout_s
        self.progress = _checked_progress(progress)
        self.direct = direct

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(chunk_bytes={self.chunk_bytes}, "
            f"max_chunks_in_flight={self.max_chunks_in_flight}, timeout_s={self.timeout_s}, "
            f"progress={self.progress}, direct={self.direct})"
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return bool(vars(self) == vars(other))

    def __hash__(self) -> int:
        return hash(
            (
                type(self),
                self.chunk_bytes,
                self.max_chunks_in_flight,
                self.timeout_s,
                self.progress,
                self.direct,
            )
        )

    def transfer(
        self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str
    ) -> TransferReceipt | None:
        """Copy the tree ``src_path`` on ``src_node_id`` to ``dst_path`` on
        ``dst_node_id``; return the receipt of what was written."""
        job = _Job.checked(src_node_id, src_path, dst_node_id, dst_path)
        if not ray.is_initialized():
            raise job.error("Ray is not initialized (call ray.init() first)")
        with progress_bar(self.progress, "Transferring", total=0):
            if job.dst_node_id == current_node_id():
                return self._receive_here(job)
            bar = current()
            watch = None if bar is None else _ProgressWatch(bar)
            if watch is not None:
                job = dataclasses.replace(job, progress_key=watch.key)
            try:
                return self._run_writer(job, watch)
            finally:
                if watch is not None:
                    watch.close()

    def _receive_here(self, job: _Job) -> TransferReceipt | None:
        """The destination is this process's node: the writer runs here, in this thread.
        No task to start: on a node without CPUs (a head node, often), Ray starts a new
        worker process for a task after its last one idled a second, which took 0.7 s on
        a two-core VM, half the time of moving 1 GiB. The bytes still come from the
        source node's reader task; ``timeout_s`` is kept by the waits for them."""
        bar = current()

        def counted(items: Iterator[Any]) -> Iterator[Any]:
            return items if bar is None else _counting(items, bar.add_to_total, advance)

        deadline = None if self.timeout_s is None else Deadline(self.timeout_s)
        receipt, _ = self._receive(job, counted=counted, deadline=deadline)
        return receipt

    def _run_writer(self, job: _Job, watch: _ProgressWatch | None) -> TransferReceipt | None:
        """Start the writer task on the destination node and wait for it (updating the
        progress bar meanwhile, if there is one); any failure is a TransferError."""
        try:
            writer = _writer_task.options(scheduling_strategy=pinned_to(job.dst_node_id)).remote(
                self, job
            )
        except Exception as exc:  # an invalid node id, ...
            raise job.error(_reason(exc)) from exc
        try:
            receipt, written = _await_writer(writer, self.timeout_s, watch)
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
        return receipt if isinstance(receipt, TransferReceipt) else None

    # The two halves, each run in a task on its node, and how the reader connects to
    # the writer. Tests override them to observe or inject faults (they are the only
    # seams; nothing else is meant to change).

    def _read_source(self, src_path: str, algorithm: str) -> Iterator[Any]:
        """The reader's stream (runs on the source node)."""
        return _stream_tree(src_path, self.chunk_bytes, algorithm)

    def _write_destination(
        self, items: Iterator[Any], tmp_path: str, algorithm: str
    ) -> TransferReceipt | None:
        """Write the reader's stream into ``tmp_path`` (runs on the destination node)."""
        return _write_tree(items, tmp_path, algorithm)

    def _connect(self, peer: Peer) -> Any:
        """The reader's connection to the writer (``sendall``, ``close``), or None to
        send through the object store (runs on the source node)."""
        return connect_to_writer(peer)

    def _receive(
        self,
        job: _Job,
        counted: Callable[[Iterator[Any]], Iterator[Any]] | None = None,
        deadline: Deadline | None = None,
    ) -> tuple[TransferReceipt | None, int | None]:
        """The writer's part (a task's body, or run by :meth:`_receive_here`): start the
        reader, write its stream, publish. Returns the receipt, and the bytes written if
        the driver asked for progress reports. ``counted``: counts the stream in a bar
        (default: reports to the driver if it asked); ``deadline``: waits past it fail.

        Between two paths of one node the reader's stream is read right here, in this
        process: no reader task, nothing through Ray.
        """
        algorithm = preferred_algorithm()
        reporter = None
        if counted is None:
            reporter = _ProgressReporter(job.progress_key) if job.progress_key else None
            counted = (lambda items: items) if reporter is None else reporter.counting

        def write_from_this_node(tmp_path: str) -> TransferReceipt | None:
            items = iter(self._read_source(job.src_path, algorithm))
            try:
                checked = items if deadline is None else deadline.items(items)
                return self._write_destination(counted(checked), tmp_path, algorithm)
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()

        def write_from_the_source_node(tmp_path: str) -> TransferReceipt | None:
            # Items read and not yet written: unconsumed ones (Ray's backpressure pauses
            # the reader at this many), those fetched ahead, and the one being written.
            prefetch = max(1, self.max_chunks_in_flight // 2)
            backpressure = max(1, self.max_chunks_in_flight - prefetch)
            listener = _listen() if self.direct and direct_allowed() else None
            try:
                reader = _reader_task.options(
                    scheduling_strategy=pinned_to(job.src_node_id),
                    _generator_backpressure_num_objects=backpressure,
                ).remote(self, job.src_path, algorithm, None if listener is None else listener.peer)
                fetcher = Fetcher(reader, prefetch, deadline, self.reader_end_grace_s)
                items = receive_over(iter(fetcher), listener, fetcher.reader_failure)
                try:
                    return self._write_destination(counted(items), tmp_path, algorithm)
                finally:
                    # Close the direct connection (or the listener, where the reader's
                    # connection waits unaccepted): a reader still sending fails at its
                    # next send, and ends by itself within the Fetcher's grace.
                    items.close()
                    if listener is not None:
                        listener.close()
                    fetcher.close()
            finally:
                if listener is not None:
                    listener.close()

        if job.src_node_id == job.dst_node_id:
            receipt = _receive_tree(job, write_from_this_node)
        else:
            receipt = _receive_tree(job, write_from_the_source_node)
        return receipt, None if reporter is None else reporter.written


#: Larger chunks would not fit one ``os.write`` / ``readv`` call everywhere.
_MAX_CHUNK_BYTES = 1 << 30


def _listen() -> Listener | None:
    """A listener for the reader's direct connection, or None if this node cannot make
    one (the contents then come through the object store)."""
    try:
        return Listener()
    except OSError:
        return None


def _reader_body(
    hook: RayObjectStoreTransfer, src_path: str, algorithm: str, peer: Peer | None
) -> Iterator[Any]:
    connection = None if peer is None else hook._connect(peer)
    try:
        if connection is not None and hook.chunk_bytes > SEND_BYTES:
            hook = copy.copy(hook)  # this task's copy, read in chunks that suit a socket
            hook.chunk_bytes = SEND_BYTES
        items = iter(hook._read_source(src_path, algorithm))
    except BaseException:
        if connection is not None:
            connection.close()
        raise
    # A plain loop, not ``yield from``: Ray's executor resumes the generator with
    # ``send()``, which ``yield from`` would pass on to whatever iterator a hook returns.
    for item in send_over(items, connection):  # noqa: UP028
        yield item


def _writer_body(
    hook: RayObjectStoreTransfer, job: _Job
) -> tuple[TransferReceipt | None, int | None]:
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
