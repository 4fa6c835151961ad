"""Reading one big payload of a local file with more than one ``pread`` in flight.

On the page cache a single ``read(2)`` stream is bound by one core: the kernel copies
each page into the new buffer and takes the buffer's page faults on the way. Two threads
reading alternate 4 MiB chunks of the same payload use both cores for that (``pread`` releases
the GIL): measured 1.9x faster than one stream for 1 GiB on a 2-core VM, which is what
brings a verified restore level with ``safetensors.load_file`` followed by a copy (which
copies with torch's threads). The checksum still sees the chunks in file order: the
caller hashes each one as :func:`pread_chunks` yields it.

Only for regular local files (what has a ``fileno`` that ``fstat`` calls regular);
object stores and other streams are read as before.
"""

from __future__ import annotations

import concurrent.futures
import os
import stat
import threading
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["PARALLEL_READ_CHUNK", "PARALLEL_READ_MIN_BYTES", "pread_chunks", "regular_fileno"]

#: Payloads from this size on are read with :func:`pread_chunks` (a 2048x2048 float32
#: weight matrix is 16 MiB), in chunks of this size.
PARALLEL_READ_MIN_BYTES = 8 << 20
PARALLEL_READ_CHUNK = 4 << 20
#: Reads in flight (the threads of the pool).
READ_THREADS = 2

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


def pread_chunks(fd: int, view: memoryview, offset: int, chunk: int) -> Iterator[memoryview]:
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
