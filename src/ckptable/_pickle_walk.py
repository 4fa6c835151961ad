"""The walk over a pickle stream's top-level opcodes, every length in it checked first.

Pickle protocol 5 writes a big byte payload (a numpy array's memory) outside any frame,
as one opcode whose argument is the payload. The walk reads the stream opcode by opcode
without running any of them: frames are kept whole, unparsed; each big payload is read
into a buffer of its own, mapped, or passed over, as the caller's mode asks; all the rest
is the *skeleton*, kept for decoding with ``NEXT_BUFFER`` opcodes in the places of the
payloads. A checksum sees every byte of the file in order on the way. What the walk
builds, and the public reads around it, are in :mod:`ckptable._pickle_scan`.

Nothing read from the file is trusted before it is checked: every length field (a
payload's, a frame's, an opcode argument's) is compared with what is left of the file
(its size from the manifest, or from the open file when it is not verified) *before*
anything is allocated or read for it, so a flipped bit in a length is a
:class:`ScanError`, never a ``MemoryError`` or ``SystemError``; bytes are read in pieces
of at most 8 MiB, since a stream's ``read(n)`` allocates ``n`` bytes first.
"""

from __future__ import annotations

import concurrent.futures
import io
import mmap
import pickle
import pickletools
from collections.abc import Callable
from typing import IO, Any, Literal

from ckptable._checksums import Checksum, checksum_executor
from ckptable._parallel_read import (
    PARALLEL_READ_CHUNK,
    PARALLEL_READ_MIN_BYTES,
    pread_chunks,
    regular_fileno,
    unordered_chunk,
)
from ckptable._progress import advance

__all__ = [
    "PAYLOAD_MIN_BYTES",
    "Mode",
    "OrderedChecksum",
    "PastTheEnd",
    "ScanError",
    "Walk",
    "drain",
]

#: Payloads of at least this many bytes are read into (or mapped as) buffers of their
#: own; smaller ones stay in the skeleton (copying them costs nothing worth saving).
PAYLOAD_MIN_BYTES = 1 << 20

_CHUNK = 8 << 20
_PROTO = pickle.PROTO[0]
_FRAME = pickle.FRAME[0]
_STOP = pickle.STOP[0]
_NEXT_BUFFER = pickle.NEXT_BUFFER
#: Opcode → size of its length field, for the payload opcodes pickle writes unframed.
_PAYLOAD_OPS = {
    pickle.BYTEARRAY8[0]: 8,
    pickle.BINBYTES8[0]: 8,
    pickle.BINBYTES[0]: 4,
    pickle.BINUNICODE8[0]: 8,
    pickle.BINUNICODE[0]: 4,
}
#: Of those, the one whose payload becomes a buffer: ``BYTEARRAY8``, what protocol 5
#: writes for a writable array's memory (the buffer stands for the ``bytearray`` pickle
#: would make: a writable ``memoryview`` of memory of its own, which numpy's arrays keep
#: and a ``bytearray`` value gets copied from, see ``_buffer_views``; or, mapped, a
#: read-only ``memoryview``). Byte strings stay in the skeleton:
#: ``bytes`` values, read-only arrays and arrays pickled by copy (non-contiguous ones,
#: whose ``__setstate__`` takes only ``bytes``) need a real ``bytes`` object.
_AS_BUFFER = {pickle.BYTEARRAY8[0]}

Mode = Literal["read", "map", "skeleton"]


class ScanError(ValueError):
    """The file is not a pickle the walk understands (truncated, or not a pickle)."""


class PastTheEnd(ScanError):
    """A length field claims more bytes than the file has left: the pickle is damaged
    (a flipped bit in a length, say), whatever its checksum says, and decoding it the
    ordinary way would allocate what the length claims."""


class OrderedChecksum:
    """A checksum fed in file order, big chunks on a helper thread while the next is read."""

    def __init__(self, checksum: Checksum | None) -> None:
        self._checksum = checksum
        self._pending: concurrent.futures.Future[None] | None = None

    @property
    def inactive(self) -> bool:
        return self._checksum is None

    def update(self, data: Any) -> None:
        if self._checksum is None:
            return
        self.wait()
        self._checksum.update(data)

    def update_behind(self, data: Any) -> None:
        """Checksum ``data`` on a helper thread; the caller must not change it meanwhile."""
        if self._checksum is None:
            return
        self.wait()
        self._pending = checksum_executor().submit(self._checksum.update, data)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


class Walk:
    """State of one walk over a pickle stream (see ``_pickle_scan.scan_pickle``)."""

    def __init__(
        self,
        stream: IO[bytes],
        mode: Mode,
        checksum: OrderedChecksum,
        skeleton_checksum: Checksum | None,
        mapped: mmap.mmap | None,
        skeleton_limit: int | None,
        size: int | None,
        new_buffer: Callable[[int], Any],
    ) -> None:
        self.stream = stream
        self.mode = mode
        self.checksum = checksum
        self.skeleton_checksum = skeleton_checksum
        self.mapped = mapped
        self.skeleton_limit = skeleton_limit
        #: Bytes in the file (from its start): every length read is checked against what
        #: is left of them. None: unknown (a stream that cannot tell; payloads are then
        #: read piece by piece, never allocated ahead).
        self.size = size
        #: Allocates the writable memory a payload of ``n`` bytes is read into (a view of
        #: memory kept between restores: ``_payload_pool``).
        self.new_buffer = new_buffer
        self.keep = mode != "skeleton"
        self.parts: list[bytes] = []
        self.kept = 0
        self.buffers: list[Any] = []
        self.position = 0

    # -- reading -----------------------------------------------------------------------

    def check_length(self, n: int, what: str) -> None:
        """Refuse a length read from the file before anything is allocated or read for
        it: it must fit in what is left of the file."""
        if n < 0:
            raise ScanError(f"a negative {what} length ({n}) at offset {self.position}")
        if self.size is not None and n > self.size - self.position:
            left = max(self.size - self.position, 0)
            raise PastTheEnd(
                f"a {what} of {n} bytes at offset {self.position} runs past the end of "
                f"the file ({left} bytes left): its length field is damaged"
            )

    def read(self, n: int) -> bytes:
        """Exactly ``n`` skeleton bytes (checksummed, kept)."""
        self.check_length(n, "pickle argument")
        data = _read_exactly(self.stream, n)
        self.position += n
        self.skeleton(data)
        return data

    def readline(self) -> bytes:
        left = _CHUNK if self.size is None else max(self.size - self.position, 0)
        data = self.stream.readline(left)
        if not data.endswith(b"\n"):
            raise ScanError("the pickle ends inside a text argument")
        self.position += len(data)
        self.skeleton(data)
        return data

    def skeleton(self, data: bytes) -> None:
        self.checksum.update(data)
        if self.skeleton_checksum is not None:
            self.skeleton_checksum.update(data)
        if self.keep:
            self.kept += len(data)
            if self.skeleton_limit is not None and self.kept > self.skeleton_limit:
                self.keep = False  # too big to hold: checksum on, the caller reads again
                self.parts.clear()
                self.buffers.clear()
            else:
                self.parts.append(data)

    def payload_into_skeleton(self, n: int, what: str) -> None:
        self.check_length(n, what)
        if not self.keep and self.checksum.inactive and self.skeleton_checksum is None:
            self.skip(n)  # nothing needs these bytes: only their lengths are checked
            return
        while n:
            data = _read_exactly(self.stream, min(n, _CHUNK))
            self.position += len(data)
            n -= len(data)
            self.skeleton(data)

    def skip(self, n: int) -> None:
        """Pass over ``n`` bytes (already checked to be in the file) unread."""
        if self.size is not None:
            self.stream.seek(n, io.SEEK_CUR)
            self.position += n
            return
        while n:
            data = _read_exactly(self.stream, min(n, _CHUNK))
            self.position += len(data)
            n -= len(data)

    def payload_discarded(self, n: int) -> None:
        """Pass over a big payload nothing keeps (the skeleton grew too big): into the
        checksum if there is one, else unread."""
        if self.checksum.inactive:
            self.skip(n)
            return
        while n:
            data = _read_exactly(self.stream, min(n, _CHUNK))
            self.position += len(data)
            n -= len(data)
            self.checksum.update_behind(data)  # (bytes: nothing changes it meanwhile)

    def payload_into_buffer(self, n: int) -> None:
        """Read ``n`` payload bytes into memory of their own (checksummed behind)."""
        if self.size is None:
            self.buffers.append(self.payload_unsized(n))
            return
        viewing = getattr(self.stream, "payload_view", None)
        if callable(viewing):
            # Memory the stream already holds the payload in (a downloaded big file,
            # ``_storage_filebuffer``): the buffer is a writable view of it, not a copy.
            held: memoryview | None = viewing(n)
            if held is not None:
                self.checksum.update_behind(held)
                self.position += n
                self.buffers.append(held)
                return
        buffer = self.new_buffer(n)
        view = memoryview(buffer)
        fd = regular_fileno(self.stream) if n >= PARALLEL_READ_MIN_BYTES else None
        if fd is not None:
            self.payload_in_parallel(fd, view)
            self.buffers.append(buffer)
            return
        readinto = getattr(self.stream, "readinto", None)
        start = 0
        while start < n:
            chunk = view[start : start + _CHUNK]
            filled = 0
            while filled < len(chunk):
                if readinto is not None:
                    got = readinto(chunk[filled:])
                else:
                    data = self.stream.read(len(chunk) - filled)
                    got = len(data)
                    chunk[filled : filled + got] = data
                if not got:
                    raise ScanError("the pickle ends inside a byte payload")
                filled += got
            self.checksum.update_behind(chunk)
            start += len(chunk)
        self.position += n
        self.buffers.append(buffer)

    def payload_in_parallel(self, fd: int, view: memoryview) -> None:
        """Fill ``view`` from the regular file ``fd`` at the stream's position with
        parallel reads (see ``_parallel_read``), each chunk checksummed in order as it
        arrives and counted in the progress bar; then move the stream past it."""
        offset = self.stream.tell()
        # Chunks small enough to hash each while the next is read; without a checksum,
        # one per reading thread.
        size = unordered_chunk(len(view)) if self.checksum.inactive else PARALLEL_READ_CHUNK
        try:
            for chunk in pread_chunks(fd, view, offset, size):
                # Here, not behind: this thread only waits for the reading threads, and
                # the chunk is still in the cache (measured 1.12x faster for 1 GiB than
                # handing it to the checksum's helper thread on a 2-core VM).
                self.checksum.update(chunk)
                advance(len(chunk))
        except EOFError as exc:
            raise ScanError("the pickle ends inside a byte payload") from exc
        self.stream.seek(len(view), io.SEEK_CUR)
        self.position += len(view)

    def payload_unsized(self, n: int) -> bytearray:
        """A payload from a stream of unknown size: grown as it is read, so that a
        damaged length allocates no more than the stream really holds."""
        buffer = bytearray()
        while len(buffer) < n:
            data = _read_exactly(self.stream, min(n - len(buffer), _CHUNK))
            self.checksum.update(data)
            buffer += data
        self.position += n
        return buffer

    def payload_mapped(self, n: int) -> None:
        if self.mapped is not None:
            if self.position + n > len(self.mapped):
                raise ScanError("the pickle ends inside a byte payload")
            # Read-only views of the (copy-on-write) mapping: arrays stay read-only, as
            # mapped arrays always were; torch tensors get writable views of the same
            # pages (``_torch_placement.TensorPlacement.rebuild_from_numpy``).
            view = memoryview(self.mapped)[self.position : self.position + n]
            self.buffers.append(view.toreadonly())
        elif self.mode != "skeleton":
            raise ScanError("map mode needs the mapped file")  # (a caller's mistake)
        self.stream.seek(n, io.SEEK_CUR)
        self.position += n

    # -- the walk ----------------------------------------------------------------------

    def run(self) -> bool:
        """Walk to STOP or the end; False if the stream is not a framed (protocol 4+)
        pickle. Frames are kept whole, unparsed: pickle writes big payloads outside them."""
        head = self.read(2)
        if head[0] != _PROTO or head[1] < 4:
            return False
        # (BYTEARRAY8 exists from protocol 5 on, as NEXT_BUFFER does.)
        as_buffer = _AS_BUFFER
        while True:
            byte = self.stream.read(1)
            if not byte:
                break  # the STOP opcode was inside the last frame (pickle checks it)
            self.position += 1
            self.skeleton(byte)
            opcode = byte[0]
            if opcode == _FRAME:
                self.payload_into_skeleton(int.from_bytes(self.read(8), "little"), "frame")
            elif opcode in _PAYLOAD_OPS:
                self.payload(opcode, as_buffer)
            elif opcode == _STOP:
                break
            else:
                self.other(opcode)
        if self.stream.read(1):
            raise ScanError("bytes follow the pickle's STOP opcode")
        return True

    def payload(self, opcode: int, as_buffer: set[int]) -> None:
        length_field = _read_exactly(self.stream, _PAYLOAD_OPS[opcode])
        self.position += len(length_field)
        n = int.from_bytes(length_field, "little")
        # Checked before anything is allocated, read or mapped for it:
        self.check_length(n, "byte payload")
        if opcode not in as_buffer or n < PAYLOAD_MIN_BYTES:
            self.skeleton(length_field)
            self.payload_into_skeleton(n, "byte payload")
            return
        # The opcode and its length are part of the file's checksum, and of the
        # skeleton's; the skeleton kept for decoding holds NEXT_BUFFER in their place.
        self.checksum.update(length_field)
        if self.skeleton_checksum is not None:
            self.skeleton_checksum.update(length_field)
        if self.keep and self.parts:
            self.parts[-1] = _NEXT_BUFFER  # replaces the opcode byte just read
        if self.mode != "read":
            self.payload_mapped(n)
        elif self.keep:
            self.payload_into_buffer(n)
        else:
            self.payload_discarded(n)

    def other(self, opcode: int) -> None:
        """Any other opcode outside a frame: parse its argument with pickletools' readers
        (whose lengths go through :meth:`read`, so are checked too)."""
        try:
            op = pickletools.code2op[chr(opcode)]  # type: ignore[attr-defined]
        except KeyError:
            raise ScanError(f"unknown pickle opcode {opcode:#04x}") from None
        if op.arg is not None:
            op.arg.reader(_Reader(self))


class _Reader:
    """What pickletools' argument readers need (``read``, ``readline``), on the walk."""

    def __init__(self, walk: Walk) -> None:
        self._walk = walk

    def read(self, n: int) -> bytes:
        return self._walk.read(n)

    def readline(self) -> bytes:
        return self._walk.readline()


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    """Exactly ``n`` bytes, read in pieces of at most ``_CHUNK``: a stream's ``read(n)``
    allocates ``n`` bytes first, whatever it then finds."""
    data = stream.read(min(n, _CHUNK))
    if len(data) == n:
        return data
    pieces = [data]
    got = len(data)
    while got < n:
        more = stream.read(min(n - got, _CHUNK))
        if not more:
            raise ScanError("the pickle is truncated")
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)


def drain(stream: IO[bytes], checksum: OrderedChecksum) -> None:
    """Checksum the rest of a stream the walk does not understand."""
    if checksum.inactive:
        return
    while chunk := stream.read(_CHUNK):
        checksum.update(chunk)
