"""A read-only binary stream with a position of its own over a known length: what the
readers of a file in memory or in ranges share (``_storage_filebuffer``,
``_storage_ranged``); and :class:`MemoryReader`, one over bytes in memory (the verified
bytes ``_restore_decode`` holds, an upload's body in ``_storage_s3fs``)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

__all__ = ["MemoryReader", "PositionedReader", "read_fully"]


def read_fully(readinto: Callable[[Any], int | None], view: memoryview) -> int:
    """Fill ``view`` by calls of ``readinto`` until it is full or a call reads nothing
    (the end); returns the bytes filled."""
    filled = 0
    while filled < len(view):
        got = readinto(view[filled:])
        if not got:
            break
        filled += got
    return filled


class PositionedReader(io.RawIOBase):
    """``readable``, ``seekable``, ``tell``, ``seek``, ``read`` and ``readall`` over
    ``self._pos``, :meth:`_length` and the subclass's ``readinto``: a seek only moves the
    position (to anywhere from 0 on; a read past the end finds nothing)."""

    _pos = 0

    def _length(self) -> int:
        """The stream's length in bytes (where ``SEEK_END`` is)."""
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            raise ValueError(f"invalid whence {whence}")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length()}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return super().read(size) or b""

    def readall(self) -> bytes:
        buffer = bytearray(max(0, self._length() - self._pos))
        n = read_fully(self.readinto, memoryview(buffer))
        return bytes(buffer) if n == len(buffer) else bytes(buffer[:n])


class MemoryReader(PositionedReader):
    """A :class:`PositionedReader` over bytes held in memory (a ``memoryview``); ``read``
    copies each piece once."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data = data
        self._pos = 0

    def _length(self) -> int:
        return len(self._data)

    def read(self, size: int | None = -1) -> bytes:
        start = min(self._pos, len(self._data))
        end = len(self._data) if size is None or size < 0 else min(start + size, len(self._data))
        self._pos = max(self._pos, end)
        return bytes(self._data[start:end])

    def readall(self) -> bytes:
        return self.read(-1)  # one copy (the base class's reads into a bytearray first)

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        start = min(self._pos, len(self._data))
        n = min(len(target), len(self._data) - start)
        target[:n] = self._data[start : start + n]
        self._pos += n
        return n
