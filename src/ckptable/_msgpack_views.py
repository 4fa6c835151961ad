"""msgpack decoded from the memory a file was fetched into: big arrays are views of it.

msgpack's C unpacker copies every ``bin`` into a new ``bytes``, and msgpack-numpy builds
each array over that copy. For a file an object store's restore fetched whole, that is a
second pass over every byte, on the decoding thread, into fresh memory (a quarter of a
4 x 64 MiB restore's time). :func:`unpack_with_views` decodes such a file in Python
instead, with msgpack's rules (``raw=False``, ``strict_map_key=False``, lists for arrays,
``ExtType`` and ``Timestamp`` for extensions, the ``object_hook`` called on every map),
except that the data of a big array (a map msgpack-numpy wrote: ``nd`` true, a ``kind``
other than ``O``, a ``bin`` of at least ``view_min`` bytes) is handed to the hook as a
writable view of the buffer, at a ``PAYLOAD_ALIGNMENT`` boundary a few bytes below
where the file has it: msgpack-numpy's ``np.ndarray(buffer=...)`` is then the downloaded
memory itself, aligned, as a pickle's arrays are (:mod:`ckptable._storage_filebuffer`).
Any other ``bin`` is ``bytes``, as msgpack gives it.

The moves are made once the whole file has decoded, in file order, each over bytes
already decoded (a ``memmove`` without the GIL); until then the buffer is unchanged (the
hook only builds arrays over those views; it reads no array's data). So anything that
stops the decoding (malformed data, nesting deeper than ``MAX_DEPTH``, more items than
the budget: Python is slower than C per item) raises :class:`Unsuited` with the buffer as
it was, and the caller runs msgpack itself, with its exact results and errors (the
hook then runs again on the maps decoded before the fall-back). The file
was checksummed before (the pipeline's verification), or is decoded unverified as
msgpack would be. Only a writable buffer of at least ``PAYLOAD_MIN_BYTES`` is decoded
here.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from ckptable._parallel_read import PAYLOAD_ALIGNMENT
from ckptable._pickle_walk import PAYLOAD_MIN_BYTES

__all__ = ["Unsuited", "item_budget", "unpack_with_views"]

#: Deeper nesting than this is left to msgpack (two Python frames per level, within
#: the default recursion limit).
MAX_DEPTH = 256

_unpack_from = struct.unpack_from


class Unsuited(Exception):
    """Decode this buffer with msgpack itself; nothing in it was changed."""


class _Malformed(Exception):
    """The data is not msgpack (an internal signal; see :func:`unpack_with_views`)."""


def item_budget(size: int) -> int:
    """How many items a file of ``size`` bytes may have before msgpack's C decoder is
    the better choice: arrays are about a dozen items each, so thousands of them fit."""
    return 65536 + size // 1024


def unpack_with_views(
    data: memoryview,
    object_hook: Callable[[dict[Any, Any]], Any],
    *,
    view_min: int = PAYLOAD_MIN_BYTES,
    budget: int | None = None,
) -> Any:
    """``msgpack.unpackb(data, object_hook=object_hook, strict_map_key=False,
    raw=False)``, with the data of big arrays handed to ``object_hook`` as aligned
    writable views of ``data`` (see the module).

    Raises:
        Unsuited: ``data`` is better (or only) decoded by msgpack; it is unchanged.
    """
    if data.readonly or len(data) < view_min:
        raise Unsuited("a read-only or small buffer")
    limit = item_budget(len(data)) if budget is None else budget
    decoder = _Decoder(data, object_hook, view_min, limit)
    try:
        value = decoder.value(0)
        if decoder.pos != len(data):
            raise _Malformed(f"extra data after the document, at byte {decoder.pos}")
    except Unsuited:
        raise
    except Exception as exc:
        if not decoder.in_structure or not isinstance(exc, _DECODING_ERRORS):
            raise  # the hook's own error, or no decoding error
        raise Unsuited(str(exc)) from exc
    decoder.move_views()
    return value


#: What malformed data raises here (an unhashable key: ``TypeError``; nesting deeper
#: than Python's recursion limit allows: ``RecursionError``).
_DECODING_ERRORS = (
    _Malformed,
    struct.error,
    UnicodeDecodeError,
    IndexError,
    TypeError,
    RecursionError,
)


class _BigBin:
    """A big ``bin`` found as a map's value: ``n`` bytes at ``at`` in the file."""

    __slots__ = ("at", "n")

    def __init__(self, at: int, n: int) -> None:
        self.at = at
        self.n = n


class _Decoder:
    """One pass over ``data``; ``pos`` is where the next item starts."""

    def __init__(
        self,
        data: memoryview,
        hook: Callable[[dict[Any, Any]], Any],
        view_min: int,
        budget: int,
    ) -> None:
        self.data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        self.hook = hook
        self.view_min = view_min
        self.budget = budget
        self.pos = 0
        #: ``(at, to, n)`` per view handed out: its ``n`` bytes are at ``at`` in the
        #: file and go to ``to``, where the view is (see :meth:`move_views`).
        self._moves: list[tuple[int, int, int]] = []
        #: True while decoding (not while the hook runs): tells our TypeErrors (an
        #: unhashable key) from the hook's.
        self.in_structure = True
        #: The first index no handed-out view owns.
        self._floor = 0
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self.data))

    def value(self, depth: int, as_map_value: bool = False) -> Any:
        data = self.data
        pos = self.pos
        b = data[pos]
        pos += 1
        self.budget -= 1
        if self.budget < 0:
            raise Unsuited("too many items for Python")
        if b <= 0x7F:
            self.pos = pos
            return b
        if b >= 0xE0:
            self.pos = pos
            return b - 0x100
        if 0xA0 <= b <= 0xBF:
            return self._str(pos, b & 0x1F)
        if 0x90 <= b <= 0x9F:
            self.pos = pos
            return self._array(b & 0x0F, depth)
        if 0x80 <= b <= 0x8F:
            self.pos = pos
            return self._map(b & 0x0F, depth)
        if b == 0xC0:
            self.pos = pos
            return None
        if b == 0xC2:
            self.pos = pos
            return False
        if b == 0xC3:
            self.pos = pos
            return True
        if 0xD4 <= b <= 0xD8:  # fixext 1, 2, 4, 8, 16
            return self._ext(pos, 1 << (b - 0xD4))
        fixed = _FIXED.get(b)
        if fixed is not None:
            fmt, size = fixed
            (result,) = _unpack_from(fmt, data, pos)
            self.pos = pos + size
            return result
        sized = _SIZED.get(b)
        if sized is None:
            raise _Malformed(f"byte 0x{b:02x} at {pos - 1} starts no msgpack item")
        kind, fmt, size = sized
        (n,) = _unpack_from(fmt, data, pos)
        pos += size
        if kind == "str":
            return self._str(pos, n)
        if kind == "bin":
            return self._bin(pos, n, as_map_value)
        if kind == "array":
            self.pos = pos
            return self._array(n, depth)
        if kind == "map":
            self.pos = pos
            return self._map(n, depth)
        return self._ext(pos, n)  # kind == "ext": n is the length of the data

    def _take(self, pos: int, n: int) -> int:
        end = pos + n
        if end > len(self.data):
            raise _Malformed(f"an item at {pos} runs {end - len(self.data)} bytes past the end")
        self.pos = end
        return end

    def _str(self, pos: int, n: int) -> str:
        end = self._take(pos, n)
        return str(self.data[pos:end], "utf-8")

    def _bin(self, pos: int, n: int, as_map_value: bool) -> bytes | _BigBin:
        end = self._take(pos, n)
        if as_map_value and n >= self.view_min:
            return _BigBin(pos, n)  # its map decides: a view, or bytes
        return bytes(self.data[pos:end])

    def _array_data(self, big: _BigBin) -> memoryview | bytes:
        """The view an array's data will be, once moved (see :meth:`move_views`); bytes
        where it cannot be moved to an aligned place above the views before it."""
        at, n = big.at, big.n
        to = at - (self._address + at) % PAYLOAD_ALIGNMENT
        if to < self._floor:
            return bytes(self.data[at : at + n])
        self._floor = to + n
        if to != at:
            self._moves.append((at, to, n))
        return self.data[to : to + n]

    def move_views(self) -> None:
        """Move the views' bytes to where the views are, in file order: each over bytes
        already decoded, below the next one's (a foreign call: runs without the GIL)."""
        for at, to, n in self._moves:
            ctypes.memmove(self._address + to, self._address + at, n)
        self._moves.clear()

    def _ext(self, pos: int, n: int) -> Any:
        import msgpack

        (code,) = _unpack_from("b", self.data, pos)
        end = self._take(pos + 1, n)
        payload = bytes(self.data[pos + 1 : end])
        if code == -1:
            return msgpack.Timestamp.from_bytes(payload)
        return msgpack.ExtType(code, payload)

    def _room(self, n: int) -> None:
        # Each item takes a byte at least: a length past the end is malformed, and is
        # refused before a list of that length is made.
        if n > len(self.data) - self.pos:
            raise _Malformed(f"a container at {self.pos} claims {n} items, past the end")

    def _array(self, n: int, depth: int) -> list[Any]:
        if depth >= MAX_DEPTH:
            raise _Malformed("nested too deep")
        self._room(n)
        value = self.value
        return [value(depth + 1) for _ in range(n)]

    def _map(self, n: int, depth: int) -> Any:
        if depth >= MAX_DEPTH:
            raise _Malformed("nested too deep")
        self._room(2 * n)
        value = self.value
        result: dict[Any, Any] = {}
        big = False
        for _ in range(n):
            key = value(depth + 1)
            item = value(depth + 1, True)
            big = big or type(item) is _BigBin
            result[key] = item
        if big:
            self._settle(result)
        self.in_structure = False
        decoded = self.hook(result)
        self.in_structure = True
        return decoded

    def _settle(self, result: dict[Any, Any]) -> None:
        """A map's big ``bin`` values: an array's data becomes its view, the others
        ``bytes`` (read now, before any move)."""
        data = result.get(b"data")
        is_array = (
            type(data) is _BigBin
            and result.get(b"nd") is True
            and result.get(b"kind") != b"O"  # a pickle: read by the hook at once
        )
        for key, item in result.items():
            if type(item) is not _BigBin:
                continue
            big: _BigBin = item
            if is_array and big is data:
                result[key] = self._array_data(big)
            else:
                result[key] = bytes(self.data[big.at : big.at + big.n])


#: Fixed-size scalars: the struct format of the bytes after the type byte, their size.
_FIXED: dict[int, tuple[str, int]] = {
    0xCA: (">f", 4),
    0xCB: (">d", 8),
    0xCC: (">B", 1),
    0xCD: (">H", 2),
    0xCE: (">I", 4),
    0xCF: (">Q", 8),
    0xD0: (">b", 1),
    0xD1: (">h", 2),
    0xD2: (">i", 4),
    0xD3: (">q", 8),
}

#: Items with a length: kind, the struct format of the length, its size.
_SIZED: dict[int, tuple[str, str, int]] = {
    0xC4: ("bin", ">B", 1),
    0xC5: ("bin", ">H", 2),
    0xC6: ("bin", ">I", 4),
    0xC7: ("ext", ">B", 1),
    0xC8: ("ext", ">H", 2),
    0xC9: ("ext", ">I", 4),
    0xD9: ("str", ">B", 1),
    0xDA: ("str", ">H", 2),
    0xDB: ("str", ">I", 4),
    0xDC: ("array", ">H", 2),
    0xDD: ("array", ">I", 4),
    0xDE: ("map", ">H", 2),
    0xDF: ("map", ">I", 4),
}
