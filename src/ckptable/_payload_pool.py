"""Memory for big payloads, kept between restores.

A restore reads each big array of a pickle into memory of its own, which becomes the
restored array. Memory fresh from the kernel costs a page fault and a zero-fill per page
the first time it is written: on this project's 2-core VM, filling 96 MiB of new memory
took 79 ms and filling the same memory again 10 ms. RLlib's restore of a PPO checkpoint
(``pickle.load``) gets its memory back from glibc's heap on the next restore; a
transactional restore holds all of a tree's arrays at once before it applies any, which
is past glibc's trim threshold, so glibc hands that memory back to the kernel when the
arrays are freed and the next restore faults all of it in again (1.5-1.8x RLlib's
restore time, for the page faults alone).

So payload memory comes from blocks of anonymous memory (private ``mmap``s,
page-aligned) that this module keeps:

- :func:`payload_memory` lends a block of the payload's size, an idle one where one of
  that size is free, as a writable ``memoryview`` of a ``ctypes`` array over the block.
  The arrays decoded from it keep that view, so the ``ctypes`` array lives as long as
  anything made from the block does.
- When the ``ctypes`` array dies (nothing refers to the block's memory any more), a
  ``weakref.finalize`` callback gives the block back: it is kept idle for the next
  restore, or unmapped at once where ``MAX_IDLE_BYTES`` are idle already. So memory a
  program drops is never held for longer than that bound.
- Of the idle blocks, ``MAX_HOT_BYTES`` are kept as they are, as glibc keeps the top of
  its heap; the kernel may take back the pages of the rest (``MADV_FREE``), which costs
  nothing unless memory runs short, and then only the fresh pages a new block would
  have cost anyway (a marked page faults once more when it is reused: 5 ms per 96 MiB,
  a fifth of a PPO restore, which is why not all of it is marked).
- A process forked from this one starts without the idle blocks.

A ``bytearray`` value of a state must come back a ``bytearray``: views handed to the
decoder are checked (``_buffer_views``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import mmap
import os
import threading
import weakref

__all__ = ["MAX_HOT_BYTES", "MAX_IDLE_BYTES", "idle_bytes", "payload_memory", "release_idle"]

#: Idle memory kept for the next restore, at most ...
MAX_IDLE_BYTES = 1 << 30
#: ... of which this much is kept as it is; the rest is marked ``MADV_FREE``.
MAX_HOT_BYTES = 256 << 20
#: A block serves a payload at most this much smaller than itself (the rest is unused).
_SLACK_FACTOR = 1.25

_PAGE = mmap.PAGESIZE
_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_MADV_FREE = getattr(mmap, "MADV_FREE", None)

_lock = threading.Lock()
#: Idle blocks by size, and what they add up to (the hot part: not marked MADV_FREE).
_idle: dict[int, list[tuple[mmap.mmap, bool]]] = {}
_idle_total = 0
_hot_total = 0
#: Blocks given back by finalizers, not sorted into the idle ones yet: a finalizer runs
#: wherever the last reference goes (another thread, or this one inside the lock), so
#: it only queues the block and sorts the queue if the lock is free.
_returned: collections.deque[mmap.mmap] = collections.deque()


def _forget() -> None:
    global _lock, _idle_total, _hot_total
    _lock = threading.Lock()
    _idle.clear()
    _returned.clear()
    _idle_total = _hot_total = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def payload_memory(n: int) -> memoryview:
    """``n`` bytes of writable, page-aligned memory for one payload, uninitialised; a
    view of a block lent by the pool (see the module docstring).

    Raises:
        MemoryError: no memory of that size can be mapped.
    """
    size = max(_PAGE, -(-n // _PAGE) * _PAGE)
    with _lock:
        _sort_returned()
        block = _take_idle(size)
    if block is None:
        try:
            block = mmap.mmap(-1, size, flags=_FLAGS) if _FLAGS else mmap.mmap(-1, size)
        except (OSError, OverflowError, ValueError) as exc:
            raise MemoryError(f"cannot map {n} bytes for a payload ({exc})") from None
    # (An array type per block size, not per payload size: ctypes keeps each type made.)
    lent = (ctypes.c_char * len(block)).from_buffer(block)
    weakref.finalize(lent, _give_back, block).atexit = False
    return memoryview(lent).cast("B")[:n]


def idle_bytes() -> int:
    """Bytes of idle blocks the pool keeps now."""
    with _lock:
        _sort_returned()
        return _idle_total


def release_idle() -> int:
    """Unmap every idle block (those lent out stay); returns the bytes released."""
    global _idle_total, _hot_total
    with _lock:
        _sort_returned()
        released = _idle_total
        _idle.clear()  # (nothing else refers to an idle block: dropping it unmaps it)
        _idle_total = _hot_total = 0
    return released


def _give_back(block: mmap.mmap) -> None:
    """A lent block's last user is gone (a ``weakref.finalize`` callback)."""
    _returned.append(block)
    if _lock.acquire(blocking=False):
        try:
            _sort_returned()
        finally:
            _lock.release()


def _sort_returned() -> None:
    """Keep the blocks given back as idle ones, within the bounds (lock held)."""
    global _idle_total, _hot_total
    while _returned:
        try:
            block = _returned.popleft()
        except IndexError:
            return
        size = len(block)
        if _idle_total + size > MAX_IDLE_BYTES:
            continue  # dropped: unmapped once the lending array is gone
        hot = _hot_total + size <= MAX_HOT_BYTES
        if hot:
            _hot_total += size
        elif _MADV_FREE is not None:
            with contextlib.suppress(OSError, ValueError):
                block.madvise(_MADV_FREE)  # the kernel may take the pages meanwhile
        _idle.setdefault(size, []).append((block, hot))
        _idle_total += size


def _take_idle(size: int) -> mmap.mmap | None:
    """An idle block of ``size`` bytes, or the smallest one a little bigger (lock held)."""
    global _idle_total, _hot_total
    fits = [s for s, blocks in _idle.items() if size <= s <= size * _SLACK_FACTOR and blocks]
    if not fits:
        return None
    chosen = min(fits)
    block, hot = _idle[chosen].pop()
    if not _idle[chosen]:
        del _idle[chosen]
    _idle_total -= chosen
    if hot:
        _hot_total -= chosen
    return block
