"""Read a pickle file in one pass, its big byte payloads straight into their final memory.

Pickle protocol 5 writes a numpy array's memory in-band as one opcode (``BYTEARRAY8``,
or ``BINBYTES`` for a read-only array) *outside* any frame, right where the array's
reconstruction call needs it; RLlib reads such a ``state.pkl`` with a plain
``pickle.load``. Verifying before decoding used to mean reading a big file twice (once
for the checksum, once for pickle). This module walks the file's top-level opcodes
instead: everything outside the big payloads (the *skeleton*: a few KiB of frames) is
kept, each big payload is read with ``readinto`` directly into the ``bytearray`` that
becomes the array's memory, and the whole file is checksummed on the way. Once the
checksum matched, ``pickle.loads(skeleton, buffers=payloads)`` builds the state, with
``NEXT_BUFFER`` opcodes in the places of the payloads: one read, no second copy, and no
pickle opcode is run before the file is known to be intact.

The same walk, with seeks instead of reads, maps the payloads from the file
(``mmap=True``) and computes the skeleton's own checksum, which the manifest records at
save time so that a mapped restore can still verify everything pickle will run.

Nothing read from the file is trusted before it is checked: every length field (a
payload's, a frame's, an opcode argument's) is compared with what is left of the file
(its size from the manifest, or from the open file when it is not verified) *before*
anything is allocated or read for it, so a flipped bit in a length is a
:class:`ScanError` (then a ``CorruptCheckpointError`` naming the file), never a
``MemoryError`` or ``SystemError``. Files are opened with
:func:`~ckptable._manifest.open_regular`: never a FIFO or device.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import io
import mmap
import os
import pickle
import pickletools
import stat
from typing import IO, Any, Literal

from ckptable._manifest import (
    Checksum,
    _checksum_executor,
    new_checksum,
    open_regular,
    read_verified,
)
from ckptable._progress import advance, counted, mark, rewind
from ckptable._storage import LocalStorage, Storage
from ckptable.errors import CheckpointError, CorruptCheckpointError

__all__ = [
    "PAYLOAD_MIN_BYTES",
    "ScanError",
    "ScannedPickle",
    "map_pickle",
    "read_pickle_unverified",
    "read_pickle_verified",
    "scan_pickle",
    "skeleton_checksum",
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
#: writes for a writable array's memory (the buffer *is* the ``bytearray`` pickle would
#: make, or, mapped, a read-only ``memoryview``). Byte strings stay in the skeleton:
#: ``bytes`` values, read-only arrays and arrays pickled by copy (non-contiguous ones,
#: whose ``__setstate__`` takes only ``bytes``) need a real ``bytes`` object.
_AS_BUFFER = {pickle.BYTEARRAY8[0]}

Mode = Literal["read", "map", "skeleton"]


class ScanError(ValueError):
    """The file is not a pickle the walk understands (truncated, or not a pickle)."""


class _PastTheEnd(ScanError):
    """A length field claims more bytes than the file has left: the pickle is damaged
    (a flipped bit in a length, say), whatever its checksum says, and decoding it the
    ordinary way would allocate what the length claims."""


@dataclasses.dataclass
class ScannedPickle:
    """A pickle file split into its skeleton and its big payloads, ready to decode."""

    #: The pickle stream with each big payload replaced by a ``NEXT_BUFFER`` opcode,
    #: in the pieces it was read in (joining them would copy it once more).
    skeleton: list[bytes]
    #: The payloads, in stream order: ``bytearray`` (read) or ``memoryview`` (mapped).
    buffers: list[Any]
    #: Bytes of the whole file the walk covered.
    size: int

    def open(self) -> io.RawIOBase:
        """The skeleton as a binary stream, for ``load(stream, buffers=self.buffers)``."""
        return _PiecesReader(self.skeleton)


class _PiecesReader(io.RawIOBase):
    """A read-only stream over a list of byte strings, without joining them."""

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__()
        self._pieces = pieces
        self._index = 0
        self._offset = 0
        #: Bytes not read yet.
        self._left = sum(len(piece) for piece in pieces)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view) and self._index < len(self._pieces):
            piece = self._pieces[self._index]
            n = min(len(piece) - self._offset, len(view) - filled)
            view[filled : filled + n] = piece[self._offset : self._offset + n]
            filled += n
            self._offset += n
            if self._offset == len(piece):
                self._index, self._offset = self._index + 1, 0
        self._left -= filled
        return filled

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            rest = self._pieces[self._index :]
            if rest:
                rest[0] = rest[0][self._offset :]
            self._index, self._offset, self._left = len(self._pieces), 0, 0
            return b"".join(rest)
        if self._index < len(self._pieces) and self._offset == 0:
            piece = self._pieces[self._index]
            if len(piece) == size:  # the common case: pickle asks for a frame, whole
                self._index += 1
                self._left -= size
                return piece
        # At most what is left: pickle asks for what a length field in the skeleton says
        # before it knows whether that much follows.
        buffer = bytearray(min(size, self._left))
        return bytes(buffer[: self.readinto(buffer)])


class _OrderedChecksum:
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
        self._pending = _checksum_executor().submit(self._checksum.update, data)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


class _Walk:
    """State of one walk over a pickle stream (see :func:`scan_pickle`)."""

    def __init__(
        self,
        stream: IO[bytes],
        mode: Mode,
        checksum: _OrderedChecksum,
        skeleton_checksum: Checksum | None,
        mapped: mmap.mmap | None,
        skeleton_limit: int | None,
        size: int | None,
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
            raise _PastTheEnd(
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
        """Read ``n`` payload bytes into a new ``bytearray`` (checksummed behind)."""
        if self.size is None:
            self.buffers.append(self.payload_unsized(n))
            return
        buffer = _new_payload_buffer(n)
        view = memoryview(buffer)
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
            self.buffers.append(memoryview(self.mapped)[self.position : self.position + n])
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


def _uninitialised_bytearray_factory() -> Any:
    """CPython's ``PyByteArray_FromStringAndSize(NULL, n)``, or None where ctypes cannot
    reach it (another interpreter): a ``bytearray`` whose memory is not zero-filled."""
    try:
        new = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except (AttributeError, OSError):
        return None
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    return new


_NEW_BYTEARRAY = _uninitialised_bytearray_factory()


def _new_payload_buffer(n: int) -> bytearray:
    """A ``bytearray`` of ``n`` bytes for a payload that is read over all of it at once.

    ``bytearray(n)`` zero-fills its memory, touching every page before the read touches
    it again: for 1 GiB of arrays that made a verified restore 1.2x a plain read. The
    buffer is allocated uninitialised instead; nothing sees it before the read filled
    every byte (or it is dropped). Advising huge pages for it was tried and measured
    slower and erratic (2-4x) on a 2-core VM, so the kernel's default is kept.
    """
    if _NEW_BYTEARRAY is None:
        return bytearray(n)
    buffer: bytearray = _NEW_BYTEARRAY(None, n)
    return buffer


class _Reader:
    """What pickletools' argument readers need (``read``, ``readline``), on the walk."""

    def __init__(self, walk: _Walk) -> None:
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


def _stream_size(stream: IO[bytes]) -> int | None:
    """Bytes from the stream's position to its end, if it can tell: a regular file's size
    (``fstat``), else a seekable stream's end. None otherwise."""
    try:
        here = stream.tell()
    except (AttributeError, OSError, ValueError):
        here = 0
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no descriptor (BytesIO, pyarrow, ...)
        pass
    else:
        if stat.S_ISREG(status.st_mode):
            return max(status.st_size - here, 0)
    try:
        if stream.seekable():
            end = stream.seek(0, io.SEEK_END)
            stream.seek(here)
            return max(int(end) - here, 0)
    except (AttributeError, OSError, ValueError):
        pass
    return None


def scan_pickle(
    stream: IO[bytes],
    mode: Mode,
    *,
    checksum: Checksum | None = None,
    skeleton_checksum: Checksum | None = None,
    mapped: mmap.mmap | None = None,
    skeleton_limit: int | None = None,
    size: int | None = None,
) -> ScannedPickle | None:
    """Walk the pickle in ``stream`` (at its start) once.

    Modes:
        ``read``: big ``BYTEARRAY8`` payloads are read into buffers; ``checksum`` sees
            every byte of the file in order.
        ``map``: big byte payloads become slices of ``mapped`` (the file mapped) and are
            seeked over, unread; only the skeleton is checksummed.
        ``skeleton``: like ``map`` without keeping anything: for ``skeleton_checksum``.

    ``size``: the bytes the file should have (the manifest's record); without it, what
    the stream says it has. Every length field is checked against what is left of that
    before anything is allocated or read for it.

    Returns None if the stream is not a framed pickle (protocol 4 or later) or if (in
    ``read`` and ``map`` modes) its skeleton grew past ``skeleton_limit`` bytes (then
    the checksum still covers the whole file, and every length was still checked): the
    caller decodes the file the ordinary way.

    Raises:
        ScanError: the stream is truncated, not a pickle, or a length in it runs past
            the end of the file (any failure of the walk other than the two below).
        OSError: the stream cannot be read.
        MemoryError: a payload that fits in the file does not fit in memory.
    """
    if size is None:
        size = _stream_size(stream)
    ordered = _OrderedChecksum(checksum)
    walk = _Walk(stream, mode, ordered, skeleton_checksum, mapped, skeleton_limit, size)
    try:
        try:
            complete = walk.run()
        except (ScanError, OSError, MemoryError):
            raise
        except Exception as exc:  # pickletools' readers, a damaged stream: any of them
            raise ScanError(f"malformed pickle ({type(exc).__name__}: {exc})") from exc
        if not complete:
            _drain(stream, ordered)
            return None
    finally:
        ordered.wait()
    if not walk.keep and mode != "skeleton":
        return None
    return ScannedPickle(walk.parts, walk.buffers, walk.position)


def _drain(stream: IO[bytes], checksum: _OrderedChecksum) -> None:
    """Checksum the rest of a stream the walk does not understand."""
    if checksum.inactive:
        return
    while chunk := stream.read(_CHUNK):
        checksum.update(chunk)


def skeleton_checksum(storage: Storage, path: str, algorithm: str) -> str | None:
    """The checksum of the skeleton of the pickle file at ``path`` (seeks over the big
    payloads: a few small reads). None if the file is not a framed pickle."""
    checksum = new_checksum(algorithm)
    with open_regular(storage, path) as stream:
        try:
            walked = scan_pickle(stream, "skeleton", skeleton_checksum=checksum)
        except ScanError:
            return None
    return None if walked is None else checksum.hexdigest()


def read_pickle_verified(
    storage: Storage,
    path: str,
    expected: tuple[int, str],
    algorithm: str,
    *,
    skeleton: str | None,
    mmap: bool,
    skeleton_limit: int,
) -> ScannedPickle | None:
    """Verify the pickle file at ``path`` against its manifest entry, and scan it.

    With ``mmap`` (and a recorded ``skeleton`` checksum, on the local disk) only the
    skeleton is read and verified and the payloads are mapped, unread. Otherwise the whole
    file is read once and checked, its big payloads into their own buffers (counted in
    the progress bar as they are read; a mapped file counts whole). Returns None
    if the file is verified but could not be scanned (not a framed pickle, or a skeleton
    over ``skeleton_limit`` bytes): the decoder then reads it the ordinary way.

    Every length in the file is checked against the manifest's size before anything is
    allocated for it; the file is opened only as a regular file.

    Raises:
        CorruptCheckpointError: the file's size or checksum differs from the manifest's,
            a length in it runs past its end, or it cannot be read.
        UnsafeCheckpointError: a symlink or special file (a FIFO, ...) is at ``path``.
        MemoryError: the file is intact, but its arrays do not fit in memory.
    """
    shown = storage.display(path)
    try:
        if mmap and skeleton is not None and isinstance(storage, LocalStorage):
            return _read_mapped_verified(storage, path, expected, algorithm, skeleton,
                                         skeleton_limit)  # fmt: skip
        return _read_scanned_verified(storage, path, expected, algorithm, skeleton_limit)
    except (CheckpointError, MemoryError):
        raise
    except OSError as exc:
        raise _corrupt(shown, f"unreadable ({exc})") from exc
    except Exception as exc:
        raise _corrupt(shown, f"unreadable ({type(exc).__name__}: {exc})") from exc


def _read_mapped_verified(
    storage: Storage,
    path: str,
    expected: tuple[int, str],
    algorithm: str,
    skeleton: str,
    skeleton_limit: int,
) -> ScannedPickle | None:
    """:func:`read_pickle_verified` with ``mmap``: the skeleton read and verified, the
    payloads mapped."""
    size = expected[0]
    shown = storage.display(path)
    checksum = new_checksum(algorithm, path=shown)
    with open_regular(storage, path) as stream:
        scanned = _scan_mapped(stream, size, shown, checksum, skeleton_limit)
    if checksum.hexdigest() != skeleton:
        raise _corrupt(shown, f"its pickle skeleton's {algorithm} checksum differs")
    advance(size)
    return scanned


def _read_scanned_verified(
    storage: Storage,
    path: str,
    expected: tuple[int, str],
    algorithm: str,
    skeleton_limit: int,
) -> ScannedPickle | None:
    """:func:`read_pickle_verified` reading the whole file, payloads into buffers."""
    size, digest = expected
    shown = storage.display(path)
    checksum = new_checksum(algorithm, path=shown)
    start = mark()
    failure: ScanError | MemoryError | None = None
    try:
        with open_regular(storage, path) as stream:
            scanned = scan_pickle(
                counted(stream), "read", checksum=checksum, skeleton_limit=skeleton_limit,
                size=size,
            )  # fmt: skip
    except (ScanError, MemoryError) as exc:
        # Kept without its traceback, whose frames hold the buffers read so far.
        failure = exc.with_traceback(None)
    if failure is not None:
        # Not what the walk expects, or too big for memory: the checksum decides whether
        # the file is damaged (read in small chunks: nothing big is allocated).
        rewind(start)
        read_verified(storage, path, expected, algorithm, keep=False)
        if isinstance(failure, _PastTheEnd):
            # As the manifest records it, yet no pickle: decoding it the ordinary way
            # would allocate what the damaged length claims.
            raise _corrupt(shown, str(failure)) from failure
        if isinstance(failure, MemoryError):
            raise failure  # intact: the machine lacks the memory, the file is fine
        return None
    if scanned is not None and scanned.size != size:
        raise _corrupt(shown, f"{scanned.size} bytes; the manifest records {size}")
    if checksum.hexdigest() != digest:
        # Also a file the walk stopped early in: compare sizes for the message.
        read_verified(storage, path, expected, algorithm, keep=False)
        raise _corrupt(shown, f"its {algorithm} checksum differs from the manifest's")
    return scanned


def read_pickle_unverified(
    storage: Storage, path: str, *, skeleton_limit: int | None
) -> ScannedPickle | None:
    """Scan a pickle file no manifest verifies (``verify=False``, a level RLlib wrote),
    its big payloads read into their own buffers, for decoding with them.

    Every length field outside the frames is checked against the file's own size before
    anything is allocated for it (``pickle.load`` allocates what a length says, then
    finds the file shorter). What is read counts in the progress bar. Returns None where
    the file is not a framed pickle or its skeleton is over ``skeleton_limit`` bytes (its
    lengths still checked; the payloads then passed over unread): the decoder reads it
    the ordinary way.

    Raises:
        CorruptCheckpointError: a length runs past the end of the file, the file is
            truncated, not a pickle, or cannot be read.
        UnsafeCheckpointError: a symlink or special file is at ``path``.
    """
    shown = storage.display(path)
    start = mark()
    try:
        with open_regular(storage, path) as stream:
            scanned = scan_pickle(counted(stream), "read", skeleton_limit=skeleton_limit)
    except CheckpointError:
        raise
    except ScanError as exc:
        raise _corrupt(shown, f"unreadable ({exc})") from exc
    except Exception as exc:  # OSError, MemoryError: as decoding it would report them
        raise _corrupt(shown, f"unreadable ({type(exc).__name__}: {exc})") from exc
    if scanned is None:
        rewind(start)  # read again by the decoder, which counts it then
    return scanned


def map_pickle(storage: Storage, path: str) -> ScannedPickle | None:
    """Scan an unverified pickle file for ``mmap=True``: big payloads mapped, unread.
    None where mapping is not possible (not on the local disk, not a framed pickle).

    Raises:
        CorruptCheckpointError: a length runs past the end of the file, the file is
            truncated, not a pickle, or cannot be read.
        UnsafeCheckpointError: a symlink or special file is at ``path``.
    """
    if not isinstance(storage, LocalStorage):
        return None
    shown = storage.display(path)
    try:
        with open_regular(storage, path) as stream:
            return _scan_mapped(stream, None, shown, None, None)
    except CheckpointError:
        raise
    except Exception as exc:  # OSError, MemoryError (a skeleton bigger than memory), ...
        raise _corrupt(shown, f"unreadable ({type(exc).__name__}: {exc})") from exc


def _scan_mapped(
    stream: IO[bytes],
    size: int | None,
    shown: str,
    skeleton_checksum: Checksum | None,
    skeleton_limit: int | None,
) -> ScannedPickle | None:
    """Map the open file read-only (its size checked against ``size``) and walk it in
    ``map`` mode, every length checked against the file's size; None for an empty file."""
    actual = os.fstat(stream.fileno()).st_size
    if size is not None and actual != size:
        raise _corrupt(shown, f"{actual} bytes; the manifest records {size}")
    if actual == 0:
        return None
    mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return scan_pickle(
            stream, "map", skeleton_checksum=skeleton_checksum, mapped=mapped,
            skeleton_limit=skeleton_limit, size=actual,
        )  # fmt: skip
    except ScanError as exc:
        raise _corrupt(shown, f"unreadable ({exc})") from exc


def _corrupt(shown: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{shown} is corrupt: {what}.", path=shown)
