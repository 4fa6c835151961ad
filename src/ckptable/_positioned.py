"""A read-only binary stream with a position of its own over a known length: what the
readers of a file in memory or in ranges share (``_storage_filebuffer``,
``_storage_ranged``, and the verified bytes ``_restore_decode`` holds)."""

from __future__ import annotations

import io

__all__ = ["PositionedReader"]


class PositionedReader(io.RawIOBase):
    """``readable``, ``seekable``, ``tell`` and ``seek`` over ``self._pos`` and
    :meth:`_length`: a seek only moves the position (to anywhere from 0 on; a read past
    the end finds nothing), the subclass's ``readinto`` reads from there."""

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
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length()}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos
