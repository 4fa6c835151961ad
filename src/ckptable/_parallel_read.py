"""Reading one big payload of a local file with more than one ``pread`` in flight.

On the page cache a single ``read(2)`` stream is bound by one core: the kernel copies
each page into the new buffer and takes the buffer's page faults on the way. Two threads
reading alternate chunks of the same payload use both cores for that (``pread`` releases
the GIL): measured 1.9x faster than one stream for 1 GiB on a 2-core VM, which is what
brings a verified restore level with ``safetensors.load_file`` followed by a copy (which
copies with torch's threads). The checksum still sees the chunks in file order: the
caller hashes each one as :func:`pread_chunks` yields it, so they are 4 MiB
(``PARALLEL_READ_CHUNK``); a read nothing consumes in order takes bigger ones
(:func:`unordered_chunk`).

Only for regular local files (what has a ``fileno`` that ``fstat`` calls regular);
object stores and other streams are read as before.

The memory a pickle's payload is read into comes from ``_payload_pool`` (kept between
restores, page-aligned); a safetensors tensor's from :func:`new_payload_buffer`:
uninitialised (not zero-filled) and 64-byte aligned; see there why both matter.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import mmap
import os
import stat
import sys
import threading
from collections.abc import Callable, Generator
from typing import IO, Any

from ckptable._progress import advance

__all__ = [
    "PARALLEL_READ_CHUNK",
    "PARALLEL_READ_MIN_BYTES",
    "new_payload_buffer",
    "pread_chunks",
    "readinto_parallel",
    "regular_fileno",
    "unordered_chunk",
]

#: Payloads from this size on are read with :func:`pread_chunks` (a 2048x2048 float32
#: weight matrix is 16 MiB), in chunks of this size.
PARALLEL_READ_MIN_BYTES = 8 << 20
PARALLEL_READ_CHUNK = 4 << 20
#: Reads in flight (the threads of the pool).
READ_THREADS = 2
#: The most one piece of a read nothing consumes in order takes: the progress bar moves
#: and a stopped read ends at least this often (64 MiB: a few milliseconds of copying).
UNORDERED_CHUNK_MAX = 64 << 20
_PAGE = mmap.PAGESIZE

#: Where a payload buffer starts: a multiple of this (a cache line, as torch's allocator).
PAYLOAD_ALIGNMENT = 64


def _uninitialised_bytearray_factory() -> Any:
    """CPython's ``PyByteArray_FromStringAndSize(NULL, n)``, or None where ctypes cannot
    reach it (another interpreter): a ``bytearray`` whose memory is not zero-filled."""
    try:
        new = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except (AttributeError, OSError):
        return None
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    return new


_NEW_BYTEARRAY = _uninitialised_bytearray_factory()
#: The largest size allocated aligned (ctypes would wrap a bigger one silently).
_MAX_ALIGNED = sys.maxsize - PAYLOAD_ALIGNMENT


def new_payload_buffer(n: int) -> bytearray:
    """A ``bytearray`` of ``n`` bytes for a payload that is read over all of it at once,
    its bytes starting at a multiple of :data:`PAYLOAD_ALIGNMENT` (from twice that size).

    Uninitialised: ``bytearray(n)`` zero-fills its memory, touching every page before the
    read touches it again: for 1 GiB of arrays that made a verified restore 1.2x a plain
    read. Nothing sees the buffer before the read filled every byte (or it is dropped).

    Aligned: a ``bytearray``'s bytes start 16 bytes into a page (the allocator's header),
    and the kernel's copy of page-cache pages into such a destination (``pread``) measured
    1.37x slower than into a 64-byte aligned one (296 against 216 ms for 512 MiB on the
    2-core VM, whatever the file offset): most of what separated a restore from
    safetensors' ``load_file`` plus a copy (torch's allocator aligns to 64 bytes). The
    alignment costs no copy: deleting a ``bytearray``'s first bytes only moves its start.

    Advising huge pages for it was tried twice and measured slower and erratic (2-4x,
    direct compaction on a VM whose memory is page cache) on a 2-core VM, so the kernel's
    default is kept (numpy's ``empty`` advises them for big arrays: not used here).
    """
    if _NEW_BYTEARRAY is None or not 0 <= n <= _MAX_ALIGNED:
        return bytearray(n)  # (beyond the C size: bytearray's own error)
    if n < 2 * PAYLOAD_ALIGNMENT:  # (trimming would reallocate it: left where it is)
        small: bytearray = _NEW_BYTEARRAY(None, n)
        return small
    buffer: bytearray = _NEW_BYTEARRAY(None, n + PAYLOAD_ALIGNMENT)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(buffer)) % PAYLOAD_ALIGNMENT
    try:
        del buffer[:offset]  # (moves the start: no copy)
        del buffer[n:]
    except BufferError:  # (still exported: cannot happen in CPython's refcounting)
        return buffer[:n]
    return buffer


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_pid = -1
_executor_lock = threading.Lock()


def _read_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The reading threads (recreated after a fork)."""
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=READ_THREADS, thread_name_prefix="ckptable-read"
            )
            _executor_pid = os.getpid()
        return _executor


def unordered_chunk(n: int) -> int:
    """The chunk size for a read of ``n`` bytes that nothing consumes chunk by chunk (no
    checksum to keep in order): one piece per reading thread, page-aligned, between
    ``PARALLEL_READ_CHUNK`` and ``UNORDERED_CHUNK_MAX``.

    Each chunk is a hand-over between threads; without a consumer to keep busy, small
    chunks only add hand-overs. Reading four 16 MiB payloads into memory read into before
    (``_payload_pool``'s kept blocks) took 3.6-4.7 ms in two halves each against
    4.2-5.1 ms in 4 MiB chunks and 4.8-5.2 ms in one ``pread`` (medians of 40, 2-core
    VM): the two threads still share the copying, with fewer hand-overs.
    """
    per_thread = -(-n // READ_THREADS)
    return min(UNORDERED_CHUNK_MAX, max(PARALLEL_READ_CHUNK, -(-per_thread // _PAGE) * _PAGE))


def regular_fileno(stream: IO[bytes] | Any) -> int | None:
    """The file descriptor under ``stream`` if it is a regular file, else None."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return fd if isinstance(fd, int) and stat.S_ISREG(mode) else None


def _fill(fd: int, view: memoryview, offset: int) -> int:
    """``pread`` until ``view`` is full or the file ends; returns the bytes read."""
    filled = 0
    while filled < len(view):
        got = os.preadv(fd, [view[filled:]], offset + filled)
        if got == 0:
            break
        filled += got
    return filled


def pread_chunks(
    fd: int, view: memoryview, offset: int, chunk: int
) -> Generator[memoryview, None, None]:
    """Fill ``view`` from ``fd`` at ``offset``, ``chunk`` bytes per ``pread``, with up to
    :data:`READ_THREADS` in flight; yield each chunk, in order, once it is filled.

    Raises:
        EOFError: the file ends before ``view`` is full.
        OSError: a read failed.
    Whatever happens, no read is still writing into ``view`` when this returns.
    """
    executor = _read_executor()
    starts = range(0, len(view), chunk)
    futures = [executor.submit(_fill, fd, view[s : s + chunk], offset + s) for s in starts]
    try:
        for start, future in zip(starts, futures, strict=True):
            part = view[start : start + chunk]
            if future.result() < len(part):
                raise EOFError(f"the file ends inside a payload at offset {offset + start}")
            yield part
    finally:
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)


def readinto_parallel(
    stream: IO[bytes] | Any,
    view: memoryview,
    on_chunk: Callable[[int, memoryview], None] | None = None,
) -> int | None:
    """``stream.readinto(view)`` for a big ``view`` over a regular file: the bytes from
    the stream's position are read with :func:`pread_chunks`, ``on_chunk(offset, chunk)``
    sees each chunk in file order, and the stream is moved past what was read. Returns
    the bytes read (fewer than ``len(view)`` only where the file ends first, also if it
    shrinks meanwhile), or None where ``stream`` is no regular file or ``view`` is too
    small to gain: the caller reads as before.

    The reads go around ``stream`` to its file descriptor: a stream that counts what is
    read through it into the progress bar (``_progress.counted``) says so with
    ``counts_reads = True``, and the chunks are counted here instead.
    """
    if len(view) < PARALLEL_READ_MIN_BYTES:
        return None
    fd = regular_fileno(stream)
    if fd is None:
        return None
    counts = getattr(stream, "counts_reads", False) is True
    start = int(stream.tell())
    n = max(0, min(len(view), os.fstat(fd).st_size - start))
    done = 0
    try:
        size = PARALLEL_READ_CHUNK if on_chunk is not None else unordered_chunk(n)
        with contextlib.closing(pread_chunks(fd, view[:n], start, size)) as chunks:
            for chunk in chunks:
                if on_chunk is not None:
                    on_chunk(start + done, chunk)
                if counts:
                    advance(len(chunk))
                done += len(chunk)
    except EOFError:
        pass  # the file shrank since fstat: what was read whole, the caller sees the end
    finally:
        stream.seek(start + done)
    return done
