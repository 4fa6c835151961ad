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

So payload memory comes from blocks of anonymous memory that this module keeps:

- :func:`payload_memory` lends a block (a private anonymous ``mmap``, page-aligned) of
  the payload's size, an idle one where one of that size is free, as a writable
  ``memoryview``; the arrays decoded from it keep it (through that view).
- A lent block is idle again once nothing outside this module refers to it (its
  reference count: every view, and every array or tensor made from one, holds a
  reference). Blocks become idle at the next request and are reused as they are.
- At most ``MAX_IDLE_BYTES`` are kept idle; beyond that, blocks are unmapped. Of those,
  ``MAX_HOT_BYTES`` are kept as they are, as glibc keeps the top of its heap; the kernel
  may take back the pages of the rest meanwhile (``MADV_FREE``), which costs nothing
  unless memory runs short, and then only the fresh pages a new block would have cost
  anyway. A process forked from this one starts without the pool.

A ``bytearray`` value of a state must come back a ``bytearray``: views handed to the
decoder are checked (``_buffer_views``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading

__all__ = ["MAX_IDLE_BYTES", "idle_bytes", "payload_memory", "release_idle"]

#: Idle memory kept for the next restore, at most ...
MAX_IDLE_BYTES = 1 << 30
#: ... of which this much is kept as it is; the rest is marked ``MADV_FREE`` (the
#: kernel may take its pages back), which costs its next writer a minor fault per page:
#: 5 ms per 96 MiB reused, a fifth of a PPO restore.
MAX_HOT_BYTES = 256 << 20
#: A block serves a payload at most this much smaller than itself (the rest is unused).
_SLACK_FACTOR = 1.25

_PAGE = mmap.PAGESIZE
_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_MADV_FREE = getattr(mmap, "MADV_FREE", None)

_lock = threading.Lock()
#: Blocks lent out, and idle ones by size.
_lent: list[mmap.mmap] = []
_idle: dict[int, list[mmap.mmap]] = {}
_idle_total = 0
#: Of the idle blocks, the bytes of those not marked ``MADV_FREE``, and their ids.
_hot_total = 0
_hot: set[int] = set()
#: An object held the way a lent block is held and by nothing else: its reference
#: count, taken the same way, is what a block's is once nothing outside refers to it
#: (how many references the interpreter itself adds differs between versions).
_probe: list[object] = [object()]


def _forget() -> None:
    global _lock, _idle_total, _hot_total
    _lock = threading.Lock()
    _lent.clear()
    _idle.clear()
    _hot.clear()
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
        _collect()
        block = _take_idle(size)
        if block is None:
            try:
                block = mmap.mmap(-1, size, flags=_FLAGS) if _FLAGS else mmap.mmap(-1, size)
            except (OSError, OverflowError, ValueError) as exc:
                raise MemoryError(f"cannot map {n} bytes for a payload ({exc})") from None
        _lent.append(block)
    return memoryview(block)[:n]


def idle_bytes() -> int:
    """Bytes of idle blocks the pool keeps now (after taking back those no longer used)."""
    with _lock:
        _collect()
        return _idle_total


def release_idle() -> int:
    """Unmap every idle block (those still in use stay); returns the bytes released."""
    global _idle_total, _hot_total
    with _lock:
        _collect()
        released = _idle_total
        for blocks in _idle.values():
            for block in blocks:
                block.close()
        _idle.clear()
        _hot.clear()
        _idle_total = _hot_total = 0
    return released


def _collect() -> None:
    """Move the lent blocks nothing refers to any more to the idle ones (lock held)."""
    global _idle_total, _hot_total
    unreferenced = min(_reference_count(thing) for thing in _probe)
    still: list[mmap.mmap] = []
    for block in _lent:
        if _reference_count(block) > unreferenced:
            still.append(block)
            continue
        size = len(block)
        if _idle_total + size > MAX_IDLE_BYTES:
            block.close()
            continue
        if _hot_total + size <= MAX_HOT_BYTES:
            _hot.add(id(block))
            _hot_total += size
        elif _MADV_FREE is not None:
            with contextlib.suppress(OSError):
                block.madvise(_MADV_FREE)  # the kernel may take the pages meanwhile
        _idle.setdefault(size, []).append(block)
        _idle_total += size
    _lent[:] = still


def _reference_count(thing: object) -> int:
    """``sys.getrefcount`` of ``thing``, called the same way for a block and the probe."""
    return sys.getrefcount(thing)


def _take_idle(size: int) -> mmap.mmap | None:
    """An idle block of ``size`` bytes, or the smallest one a little bigger (lock held)."""
    global _idle_total, _hot_total
    fits = [s for s in _idle if size <= s <= size * _SLACK_FACTOR and _idle[s]]
    if not fits:
        return None
    chosen = min(fits)
    block = _idle[chosen].pop()
    if not _idle[chosen]:
        del _idle[chosen]
    _idle_total -= chosen
    if id(block) in _hot:
        _hot.discard(id(block))
        _hot_total -= chosen
    return block
