"""A big file of a restore from an object store, fetched whole into memory its arrays
can keep.

Copying is what separated a verified restore of big files from a plain concurrent
download: each byte was downloaded into a range's ``bytes``, then copied by the decoder
into the array's own memory (the copy and the first touch of that fresh memory, on the
decoding thread, after the download). :class:`FileBuffer` downloads the file once, its
ranges in parallel straight into one aligned buffer (pyarrow's ``readinto`` writes what
the socket delivers into it; other clients copy each range in on the fetching thread,
with the GIL released), and :meth:`BufferReader.payload_view` hands a pickle's big
payload out as a writable view of that buffer: the array *is* the downloaded memory.

A payload keeps its arrays aligned: one whose place in the file is not a multiple of
``PAYLOAD_ALIGNMENT`` is moved down, within the buffer (which starts on a page), by the
few bytes that make it one, over bytes the reader has already consumed (a ``memmove`` of
warm memory, without the GIL). After that the buffer no longer holds the file as it is
at those places: it refuses to be read there, and once its reader is closed it is
dropped (a second open of the file reads from the store). A msgpack state is handed out
whole instead (``rest`` with ``take``: writable), and its decoder moves its big values
the same way (:mod:`ckptable._msgpack_views`).

Everything read is the file's bytes as downloaded, in file order; nothing here checks
them (the pipeline's checksum sees every byte, a view's too). A range that fails raises
its error where the reader reaches it; a range that comes back short ends the file there
(the manifest's size catches it).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import sys
from collections.abc import Callable
from typing import Any

from ckptable._parallel_read import PAYLOAD_ALIGNMENT
from ckptable._payload_pool import payload_memory
from ckptable._positioned import PositionedReader

__all__ = ["BufferReader", "FileBuffer", "copy_into"]


class FileBuffer:
    """One file of ``size`` bytes, its ranges (``ranges``: ``(offset, length)``)
    fetched by ``submit(offset, view)`` into one aligned buffer: ``submit`` starts a
    fetch that fills ``view`` with the file's bytes from ``offset`` and returns a future
    of the bytes it filled."""

    def __init__(
        self,
        size: int,
        ranges: list[tuple[int, int]],
        submit: Callable[[int, memoryview], concurrent.futures.Future[int]],
    ) -> None:
        self.size = size
        self._view = payload_memory(size)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._view))
        self._fetches: list[tuple[int, int, concurrent.futures.Future[int]]] = []
        try:
            for offset, length in ranges:
                future = submit(offset, self._view[offset : offset + length])
                self._fetches.append((offset, length, future))
        except BaseException:
            self.cancel()
            raise
        #: The first buffer index that no handed-out payload owns.
        self._floor = 0
        #: Whether payloads were handed out (and some maybe moved): then the buffer no
        #: longer holds the whole file, and is not read again.
        self.handed_out = False

    def cancel(self) -> None:
        """Cancel the fetches not started (those running finish into the buffer)."""
        for _, _, future in self._fetches:
            future.cancel()

    def available(self, start: int, end: int) -> int:
        """Wait for the file's bytes ``[start, end)``; returns where they end (before
        ``end`` if the file came back shorter than listed). Raises a fetch's error."""
        for offset, length, future in self._fetches:
            if offset + length <= start:
                continue
            if offset >= end:
                break
            got = future.result()
            if got < length:
                return max(start, min(end, offset + got))
        return min(end, self.size)

    def read(self, start: int, target: memoryview) -> int:
        """Copy the file's bytes from ``start`` into ``target``; returns how many."""
        self._check_intact(start)
        end = self.available(start, start + len(target))
        n = end - start
        if n > 0:
            target[:n] = self._view[start:end]
        return max(n, 0)

    def _check_intact(self, start: int) -> None:
        """Refuse to read where handed-out payloads were moved (the walk never goes
        back; anything that does must read the file from the store)."""
        if start < self._floor:
            raise OSError(
                f"bytes from {start} of a file fetched whole were handed out as arrays: "
                "read it again from the store"
            )

    def rest(self, start: int, take: bool) -> memoryview:
        """A view of the file's bytes from ``start`` to its end, once they are all there:
        read-only; or, with ``take``, writable: the view is kept as the file's bytes (a
        decoder's input, which may move big values within it to align them), so the
        buffer is handed out, never read again there."""
        self._check_intact(start)
        end = self.available(start, self.size)
        view = self._view[start:end]
        if not take:
            return view.toreadonly()
        self.handed_out = True
        self._floor = max(self._floor, end)
        return view

    def payload(self, start: int, n: int) -> memoryview | None:
        """The file's bytes ``[start, start + n)`` as a writable, aligned view of the
        buffer, or None (the file is shorter; or aligning it would move it over a payload
        handed out before: the caller copies it instead)."""
        if self.available(start, start + n) < start + n:
            return None
        self._check_intact(start)
        at = start
        to = at - (self._address + at) % PAYLOAD_ALIGNMENT
        if to < self._floor:
            return None
        if to != at:  # (a foreign call: runs without the GIL)
            ctypes.memmove(self._address + to, self._address + at, n)
        self._floor = to + n
        self.handed_out = True
        return self._view[to : to + n]


class BufferReader(PositionedReader):
    """A seekable binary stream over a :class:`FileBuffer`, read from position 0; see
    :meth:`payload_view`. It must not be read after ``payload_view`` moved bytes
    before its position (the walk never goes back)."""

    def __init__(self, buffer: FileBuffer) -> None:
        super().__init__()
        self._buffer = buffer
        self._pos = 0

    def _length(self) -> int:
        return self._buffer.size

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        if self._pos >= self._buffer.size or not len(target):
            return 0
        n = self._buffer.read(self._pos, target[: self._buffer.size - self._pos])
        self._pos += n
        return n

    def rest_view(self, take: bool) -> memoryview:
        """The rest of the file as a view of the downloaded memory (read-only; writable
        with ``take``), the position moved to its end (see :meth:`FileBuffer.rest`): read
        without a copy."""
        view = self._buffer.rest(self._pos, take)
        self._pos += len(view)
        return view

    def payload_view(self, n: int) -> memoryview | None:
        """The next ``n`` bytes as a writable view of the downloaded memory (aligned),
        the position moved past them; None where they cannot be (see
        :meth:`FileBuffer.payload`): then nothing moved."""
        view = self._buffer.payload(self._pos, n)
        if view is not None:
            self._pos += n
        return view


def copy_into(view: memoryview, data: Any) -> int:
    """Copy the start of ``data`` (bytes-like) into ``view``; returns the bytes copied.
    Big copies go through numpy where it is loaded, which releases the GIL for them."""
    source = memoryview(data).cast("B")
    n = min(len(view), len(source))
    numpy = sys.modules.get("numpy")
    if numpy is not None and n >= 1 << 20:
        numpy.copyto(
            numpy.frombuffer(view, dtype=numpy.uint8, count=n),
            numpy.frombuffer(source, dtype=numpy.uint8, count=n),
        )
    else:
        view[:n] = source[:n]
    return n
