"""Read a pickle file in one pass, its big byte payloads straight into their final memory.

Pickle protocol 5 writes a numpy array's memory in-band as one opcode (``BYTEARRAY8``,
or ``BINBYTES`` for a read-only array) *outside* any frame, right where the array's
reconstruction call needs it; RLlib reads such a ``state.pkl`` with a plain
``pickle.load``. Verifying before decoding used to mean reading a big file twice (once
for the checksum, once for pickle). This module walks the file's top-level opcodes
instead: everything outside the big payloads (the *skeleton*: a few KiB of frames) is
kept, each big payload is read with ``readinto`` directly into memory of its own that
becomes the array's memory (page-aligned, kept between restores: ``_payload_pool``; or,
for a file an object store's prefetch fetched whole, a view of that download), and the
whole file is checksummed on the way. Once the
checksum matched, ``pickle.loads(skeleton, buffers=payloads)`` builds the state, with
``NEXT_BUFFER`` opcodes in the places of the payloads: one read, no second copy, and no
pickle opcode is run before the file is known to be intact.

The same walk, with seeks instead of reads, maps the payloads from the file
(``mmap=True``) and computes the skeleton's own checksum, which the manifest records at
save time so that a mapped restore can still verify everything pickle will run.

The walk itself is in :mod:`ckptable._pickle_walk`: it checks every length field it
reads against what is left of the file before anything is allocated or read for it, so
a damaged length is a :class:`ScanError` (here a ``CorruptCheckpointError`` naming the
file), never a ``MemoryError``. This module gives the walk the memory for the payloads
(:func:`scan_pickle`) and holds the reads the restore and the save use. Files are opened
with :func:`~ckptable._manifest.open_regular`: never a FIFO or device.
"""

from __future__ import annotations

import dataclasses
import io
import mmap
import os
import stat
from typing import IO, Any

from ckptable._checksums import Checksum, new_checksum
from ckptable._manifest import open_regular, read_verified
from ckptable._payload_pool import payload_memory
from ckptable._pickle_walk import (
    PAYLOAD_MIN_BYTES,
    Mode,
    OrderedChecksum,
    PastTheEnd,
    ScanError,
    Walk,
    drain,
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


@dataclasses.dataclass
class ScannedPickle:
    """A pickle file split into its skeleton and its big payloads, ready to decode."""

    #: The pickle stream with each big payload replaced by a ``NEXT_BUFFER`` opcode,
    #: in the pieces it was read in (joining them would copy it once more).
    skeleton: list[bytes]
    #: The payloads, in stream order: writable ``memoryview`` (read: of memory kept
    #: between restores, ``_payload_pool``, or of a file fetched whole,
    #: ``_storage_filebuffer``) or read-only ``memoryview`` (mapped).
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


#: Where payloads are read into (a name looked up at each scan, so a test can watch it):
#: memory kept between restores (``_payload_pool``).
_new_payload_buffer = payload_memory


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
    ordered = OrderedChecksum(checksum)
    # The payload buffers come from _new_payload_buffer, looked up here at each call.
    walk = Walk(
        stream, mode, ordered, skeleton_checksum, mapped, skeleton_limit, size, _new_payload_buffer
    )
    try:
        try:
            complete = walk.run()
        except (ScanError, OSError, MemoryError):
            raise
        except Exception as exc:  # pickletools' readers, a damaged stream: any of them
            raise ScanError(f"malformed pickle ({type(exc).__name__}: {exc})") from exc
        if not complete:
            drain(stream, ordered)
            return None
    finally:
        ordered.wait()
    if not walk.keep and mode != "skeleton":
        return None
    return ScannedPickle(walk.parts, walk.buffers, walk.position)


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
        if isinstance(failure, PastTheEnd):
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


#: Unverified pickle files smaller than this are read whole first, in one read, and
#: walked in memory: no payload of theirs gets a buffer of its own (``PAYLOAD_MIN_BYTES``),
#: and the walk's many small reads of the file cost more than the file (a 0.2 MiB PPO
#: checkpoint's eight state files: 0.23 ms read whole, walked and decoded from memory,
#: against 0.31 ms walked on the file and decoded from its skeleton's pieces).
SMALL_FILE_BYTES = PAYLOAD_MIN_BYTES


def read_pickle_unverified(
    storage: Storage, path: str, *, skeleton_limit: int | None
) -> ScannedPickle | bytes | None:
    """Scan a pickle file no manifest verifies (``verify=False``, a level RLlib wrote),
    its big payloads read into their own buffers, for decoding with them.

    Every length field outside the frames of a framed pickle (protocol 4 and later) is
    checked against the file's own size before anything is allocated for it
    (``pickle.load`` allocates what a length says, then finds the file shorter). What is
    read counts in the progress bar. Returns None where the file is not a framed pickle
    or its skeleton is over ``skeleton_limit`` bytes (its lengths still checked; the
    payloads then passed over unread): the decoder reads it the ordinary way.

    A file under ``SMALL_FILE_BYTES`` (no payload of it gets a buffer of its own) is read
    whole, walked in memory the same way, and its bytes are returned, to decode from
    memory: never None.

    Raises:
        CorruptCheckpointError: a length runs past the end of the file, the file is
            truncated, not a pickle, or cannot be read.
        UnsafeCheckpointError: a symlink or special file is at ``path``.
    """
    shown = storage.display(path)
    start = mark()
    try:
        with open_regular(storage, path) as stream:
            size = _stream_size(stream)
            if size is not None and size < SMALL_FILE_BYTES:
                return _read_small_unverified(stream, size)
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


def _read_small_unverified(stream: IO[bytes], size: int) -> bytes:
    """:func:`read_pickle_unverified` for a small file: its bytes (at most ``size``: what
    ``fstat`` said, read before anything else is), every length outside the frames of a
    framed pickle checked by the walk over them in memory, which keeps nothing (the
    bytes themselves are decoded). A pickle older than protocol 4 is returned unwalked,
    as the ordinary decoder would read it from the file.

    Raises:
        ScanError: a length runs past the end of what was read, or the pickle is
            truncated or malformed.
    """
    pieces = []
    left = size
    while left:
        piece = stream.read(left)
        if not piece:
            break  # shorter than fstat said (cut meanwhile): the walk judges what is here
        pieces.append(piece)
        left -= len(piece)
    data = b"".join(pieces) if len(pieces) != 1 else pieces[0]
    advance(len(data))
    scan_pickle(io.BytesIO(data), "skeleton", size=len(data))
    return data


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
    """Map the open file (its size checked against ``size``) and walk it in ``map`` mode,
    every length checked against the file's size; None for an empty file.

    The mapping is private and copy-on-write (``ACCESS_COPY``): a write to its pages never
    reaches the file. The payloads are handed out as read-only views (NumPy arrays stay
    read-only, as before), and torch tensors, which have no read-only form, are built on
    writable views of the same pages instead of copies."""
    actual = os.fstat(stream.fileno()).st_size
    if size is not None and actual != size:
        raise _corrupt(shown, f"{actual} bytes; the manifest records {size}")
    if actual == 0:
        return None
    mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        return scan_pickle(
            stream, "map", skeleton_checksum=skeleton_checksum, mapped=mapped,
            skeleton_limit=skeleton_limit, size=actual,
        )  # fmt: skip
    except ScanError as exc:
        raise _corrupt(shown, f"unreadable ({exc})") from exc


def _corrupt(shown: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{shown} is corrupt: {what}.", path=shown)
