"""msgpack written without copying big arrays: their data goes from their own memory.

``packb(state, default=msgpack_numpy.encode, use_bin_type=True)`` copies every array
twice before the file gets it: msgpack-numpy hands the array's memory to msgpack, whose
packer copies it into its growing buffer, and ``packb`` copies that buffer into the
``bytes`` it returns, both into fresh memory (three passes over a 64 MiB array, where a
pickle's writer makes none). :func:`pack_to` writes the same bytes, to the byte, with
the big arrays' data written straight from the arrays:

- msgpack's own packer encodes the state, with msgpack-numpy's ``encode`` as the
  ``default`` for everything except a big array (C-contiguous, a ``kind`` other than
  ``V`` or ``O``, ``PAYLOAD_MIN_BYTES`` or more): that becomes the same map
  msgpack-numpy makes, with an empty ``bin`` as its data, and the hook notes where in
  the packer's buffer the map starts (msgpack writes a value where ``default`` was
  called for it) and the array.
- The buffer is then written in pieces, each noted map's empty ``bin`` replaced by the
  ``bin`` header of the array's length and the array's memory itself.

Before anything is written, each noted place is checked to hold exactly the encoding
of its map; if one does not (a packer that wrote differently), or the packer ran out
of stack a few levels earlier than ``packb`` would (the hook's frames), the state is
written by ``packb`` as before. A state without big arrays is ``packb``'s bytes, one
piece. The arrays must not change while the state is written (as for
every other format, whose writers read the arrays' memory as they write it).
"""

from __future__ import annotations

import struct
import types
from collections.abc import Iterator
from typing import IO, Any

from ckptable._pickle_walk import PAYLOAD_MIN_BYTES

__all__ = ["pack_to"]

#: msgpack's empty ``bin`` (``bin 8``, length 0): the data of each noted map.
_EMPTY_BIN = b"\xc4\x00"
#: A ``bin`` holds less than 4 GiB (msgpack refuses more: left to it, to say so).
_BIN32_LIMIT = 1 << 32


def pack_to(
    stream: IO[bytes],
    state: Any,
    impl: types.ModuleType,
    msgpack_numpy: types.ModuleType,
    *,
    min_bytes: int = PAYLOAD_MIN_BYTES,
) -> None:
    """Write ``packb(state, default=msgpack_numpy.encode, use_bin_type=True)`` to
    ``stream``, big arrays' data from their own memory (see the module).

    ``impl``: msgpack's implementation module (``msgpack._cmsgpack`` or
    ``msgpack.fallback``), whose ``Packer`` is used.
    """
    #: Per big array: where its map starts in the packer's buffer, the map's encoding
    #: (with an empty ``bin`` as its data) and the array's memory.
    noted: list[tuple[int, bytes, memoryview]] = []
    encode = msgpack_numpy.encode

    def default(obj: Any) -> Any:
        data = _big_array_memory(obj, min_bytes)
        if data is None:
            return encode(obj)
        mapped = {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": obj.shape}
        mapped[b"data"] = b""
        with packer.getbuffer() as done:
            start = done.nbytes
        noted.append((start, impl.Packer(use_bin_type=True).pack(mapped), data))
        return mapped

    packer = impl.Packer(default=default, use_bin_type=True, autoreset=False)
    try:
        pieces = _packed_pieces(packer, state, noted)
        if pieces is None:
            pieces = [impl.Packer(default=encode, use_bin_type=True).pack(state)]
        for piece in pieces:
            stream.write(piece)
    finally:
        # The hook and the packer refer to each other: without this, the arrays (and
        # the packer's buffer) would live until the cyclic garbage collector ran.
        noted.clear()
        packer = None


def _big_array_memory(obj: Any, min_bytes: int) -> memoryview | None:
    """The bytes msgpack-numpy would hand msgpack as ``obj``'s data, where ``obj`` is an
    array this module writes itself (see the module); else None: msgpack-numpy encodes
    it, and raises what it raises (a datetime array's data is no buffer)."""
    import numpy as np

    if not (
        isinstance(obj, np.ndarray)
        and min_bytes <= obj.nbytes < _BIN32_LIMIT
        and obj.dtype.kind not in "VO"
        and obj.flags.c_contiguous
    ):
        return None
    try:
        data = obj.data
    except ValueError:
        return None
    # (A masked array's data is an array, which msgpack-numpy encodes again.)
    return data.cast("B") if type(data) is memoryview else None


def _packed_pieces(
    packer: Any, state: Any, noted: list[tuple[int, bytes, memoryview]]
) -> list[Any] | None:
    """The file's bytes in pieces, from ``packer`` packing ``state`` (the hook noting
    the big arrays); None where ``packb`` must write it instead."""
    try:
        packer.pack(state)
    except RecursionError:
        return None  # (the hook's own frames: nested within a few levels of the limit)
    with packer.getbuffer() as packed:
        if not noted:
            return [bytes(packed)]
        if not all(_holds(packed, start, encoded) for start, encoded, _ in noted):
            return None
        return list(_pieces(packed, noted))


def _holds(packed: memoryview, start: int, encoded: bytes) -> bool:
    """Whether ``packed`` has ``encoded`` (a noted map, its data an empty ``bin`` at
    its end) at ``start``."""
    return encoded.endswith(_EMPTY_BIN) and packed[start : start + len(encoded)] == encoded


def _pieces(packed: memoryview, noted: list[tuple[int, bytes, memoryview]]) -> Iterator[Any]:
    """The file's bytes in order: runs of ``packed`` (copied: the packer's buffer is
    its own, freed with it), and for each noted array the ``bin`` header of its length
    and its memory."""
    written = 0
    for start, encoded, data in noted:
        yield bytes(packed[written : start + len(encoded) - len(_EMPTY_BIN)])
        yield _bin_header(data.nbytes)
        yield data
        written = start + len(encoded)
    yield bytes(packed[written:])


def _bin_header(n: int) -> bytes:
    """msgpack's header of a ``bin`` of ``n`` bytes (its shortest, as msgpack writes)."""
    if n < 1 << 8:
        return b"\xc4" + struct.pack(">B", n)
    if n < 1 << 16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)
