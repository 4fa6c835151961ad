"""The big files of a restore from an object store: read front to back (and seeking)
through ranged reads that run ahead in the pool of a
:class:`~ckptable._storage_prefetch.PrefetchedReads`, whose window may have started the
first ranges already.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
from typing import TYPE_CHECKING, Any

from ckptable._positioned import PositionedReader

if TYPE_CHECKING:
    from ckptable._storage_prefetch import PrefetchedReads

__all__ = ["RANGES_AHEAD", "RangedReader"]

#: Ranges requested ahead of the reader.
RANGES_AHEAD = 2


class RangedReader(PositionedReader):
    """A file read through ranged reads that run ahead in the pool (``RANGES_AHEAD`` of
    them; the first ones may have been started by the prefetch).

    A big ``readinto`` (a payload's final memory, see ``_pickle_walk``) is filled by the
    pool: each range is copied into its part of the target by the thread that fetched
    it, with the GIL released (numpy's copy), so that the first touch of fresh memory
    (page faults) and the copies run on every core while more ranges arrive, not one
    after another in the caller's thread; at most ``RANGES_AHEAD`` copies wait at once,
    so memory stays a few ranges.

    It seeks (a decoder that reads a header, then the data; a check that looks at the
    file's end): the position moves at once, the ranges follow at the next read."""

    def __init__(
        self,
        owner: PrefetchedReads,
        path: str,
        size: int,
        heads: collections.deque[concurrent.futures.Future[bytes]],
        keep: bool,
    ) -> None:
        super().__init__()
        self._owner = owner
        self._path = path
        self._size = size
        self._ahead: collections.deque[tuple[concurrent.futures.Future[bytes], int]] = (
            collections.deque()
        )
        self._next = 0  # offset of the next range to request
        for future in heads:  # the heads are the first ranges
            length = owner._range_length(self._next, size)
            self._ahead.append((future, length))
            self._next += length
        #: The heads hold the prefetch's budget until they are taken.
        self._budgeted = len(heads)
        self._current = memoryview(b"")
        #: File offset of ``_current``'s first byte, and where the reader is.
        self._at = 0
        self._pos = 0
        self._keep = keep
        #: The ranges taken, in order from the start (kept for a second read).
        self.chunks: list[bytes] = []
        self._taken = 0
        self._short = False

    def _length(self) -> int:
        return self._size

    def complete(self) -> bool:
        """Whether the whole file was taken, in order, as listed."""
        return self._keep and not self._short and self._taken == self._size

    def _reposition(self) -> None:
        """Move the ranges to the reader's position (after a seek)."""
        self._drop_ahead()
        self._current = memoryview(b"")
        self._next = self._at = self._pos
        self._keep = False  # not read in order from the start: nothing to keep
        self.chunks = []

    def _drop_ahead(self) -> None:
        for future, length in self._ahead:
            future.cancel()
            if self._budgeted:
                self._budgeted -= 1
                self._owner._release(length)
        self._ahead.clear()

    def _fill(self, ranges: int = RANGES_AHEAD) -> None:
        owner = self._owner
        while len(self._ahead) < ranges and self._next < self._size:
            length = owner._range_length(self._next, self._size)
            future = owner._pool.submit(owner._read_range, self._path, self._next, length)
            self._ahead.append((future, length))
            self._next += length

    def _got(self, chunk: bytes, length: int) -> bytes | None:
        """Record a range's bytes (kept for a second read); None if the file ended."""
        if self._budgeted:
            self._budgeted -= 1
            self._owner._release(length)
        if self._keep:
            self.chunks.append(chunk)
            self._taken += len(chunk)
        if len(chunk) != length:
            self._short = True  # shorter than listed: the reader sees the size
            return chunk if chunk else None
        return chunk

    def _take(self) -> bytes | None:
        """The next range's bytes (None at the end)."""
        self._fill()
        if not self._ahead:
            return None
        future, length = self._ahead.popleft()
        chunk = self._got(future.result(), length)
        self._fill()
        return chunk

    def _advance(self, n: int) -> int:
        self._current = self._current[n:]
        self._at += n
        self._pos += n
        return n

    def readinto(self, buffer: Any) -> int:
        if self._pos != self._at and not (self._at <= self._pos < self._at + len(self._current)):
            self._reposition()
        elif self._pos != self._at:  # forward, inside the current range
            self._advance_current(self._pos - self._at)
        target = memoryview(buffer).cast("B")
        filled = 0
        if self._current:
            filled = self._advance(_copy(target, self._current))
            if filled == len(target) or self._short:
                return filled
        if len(target) - filled >= self._owner._range and "numpy" in sys.modules:
            return filled + self._fill_in_pool(target[filled:])
        if filled:
            return filled
        chunk = self._take()
        if chunk is None:
            return 0
        self._current = memoryview(chunk)
        return self._advance(_copy(target, self._current))

    def _advance_current(self, n: int) -> None:
        self._current = self._current[n:]
        self._at += n

    def _fill_in_pool(self, target: memoryview) -> int:
        """Fill ``target`` with the next ranges, each copied in by the pool; the part of
        a range past its end becomes the current chunk. Returns the bytes filled (fewer
        if the file is shorter than listed: the caller then sees it is truncated)."""
        pool = self._owner._pool
        copies: collections.deque[
            tuple[int, int, concurrent.futures.Future[bytes], concurrent.futures.Future[None]]
        ] = collections.deque()
        filled = 0
        try:
            while filled < len(target):
                self._fill()
                if not self._ahead:
                    break
                future, length = self._ahead[0]
                if filled + length > len(target):
                    break
                self._ahead.popleft()
                part = target[filled : filled + length]
                copies.append((filled, length, future, pool.submit(_copy_when_read, future, part)))
                filled += length
                while len(copies) > RANGES_AHEAD:  # memory: a few ranges at once
                    short = self._finish_copy(copies.popleft())
                    if short is not None:
                        return self._done(short)
            while copies:
                short = self._finish_copy(copies.popleft())
                if short is not None:
                    return self._done(short)
        finally:
            for _, length, future, copied in copies:  # left by an error or a short file
                copied.cancel()
                future.cancel()
                if self._budgeted:
                    self._budgeted -= 1
                    self._owner._release(length)
        self._done(filled)
        if filled < len(target):
            chunk = self._take()  # the rest comes from the start of the next range
            if chunk is not None:
                self._current = memoryview(chunk)
                filled += self._advance(_copy(target[filled:], self._current))
        return filled

    def _finish_copy(
        self,
        copy: tuple[int, int, concurrent.futures.Future[bytes], concurrent.futures.Future[None]],
    ) -> int | None:
        """Wait for one range's copy; the bytes filled up to its end if the file ended
        there (shorter than listed), else None."""
        offset, length, future, copied = copy
        copied.result()
        chunk = self._got(future.result(), length)
        return offset + (len(chunk) if chunk else 0) if self._short else None

    def _done(self, filled: int) -> int:
        """Count ``filled`` bytes read by the pool into the reader's position."""
        self._at += filled
        self._pos += filled
        return filled

    def close(self) -> None:
        self._drop_ahead()
        super().close()


def _copy(target: memoryview, source: memoryview) -> int:
    """Copy the start of ``source`` into the start of ``target``; returns the bytes."""
    n = min(len(target), len(source))
    target[:n] = source[:n]
    return n


_Copy = concurrent.futures.Future[None]


def _copy_when_read(future: concurrent.futures.Future[bytes], part: memoryview) -> None:
    """In the pool: wait for a range, copy it into its part of the target (numpy's copy
    releases the GIL). A short range copies what there is; the reader sees the length."""
    import numpy

    chunk = future.result()
    n = min(len(part), len(chunk))
    numpy.copyto(
        numpy.frombuffer(part, dtype=numpy.uint8, count=n),
        numpy.frombuffer(chunk, dtype=numpy.uint8, count=n),
    )
