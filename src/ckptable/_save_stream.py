"""The stream a save writes an encoded file through (a level's state, mostly).

Most levels' states are a few hundred bytes, and a wide tree has thousands of levels: on
the local disk the stream keeps what the encoder writes in memory and, at the end,
writes the file with one call and checksums it with one call (an ``io`` stream, a
checksum object and a context manager per file cost more than such a write). Past
``SMALL_BYTES`` it opens the file and writes through a :class:`~ckptable._checksums.
HashingWriter`, which checksums as it writes. Other storages get their own stream at once
(the concurrent writes of :mod:`ckptable._storage_concurrent` keep small files in memory
themselves).

:class:`RecordingStream` is a context manager: on a clean exit it finishes the file and
hands its size and checksum to the save's record (the manifest's), on an error it only
closes what it opened (the save's cleanup removes the staging tree).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import IO, Any

from ckptable._checksums import HashingWriter, checksum_of
from ckptable._progress import advance
from ckptable._storage import LocalStorage, Storage

__all__ = ["SMALL_BYTES", "RecordingStream"]

#: A file up to this size is encoded in memory and written with one call.
SMALL_BYTES = 1 << 20


class RecordingStream:
    """A write-only binary stream to ``path`` that records ``(size, checksum)`` through
    ``record`` once the ``with`` block ends without an error."""

    def __init__(
        self,
        storage: Storage,
        path: str,
        algorithm: str,
        record: Callable[[str, int, str], None],
    ) -> None:
        self._storage = storage
        self._path = path
        self._algorithm = algorithm
        self._record = record
        self._held: list[bytes] = []
        self._size = 0
        self._opened: AbstractContextManager[IO[bytes]] | None = None
        self._through: HashingWriter | None = None
        if not isinstance(storage, LocalStorage):
            self._open_through()

    def __enter__(self) -> RecordingStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._close_raw(exc_type, exc, tb)  # an upload is abandoned, not completed
            return
        if self._through is None:
            data = b"".join(self._held)
            self._held = []
            self._storage.write_bytes(self._path, data)
            advance(len(data))
            self._record(self._path, len(data), checksum_of(self._algorithm, data))
            return
        self._close_raw(None, None, None)  # a failing close (an upload's last part) fails the save
        self._record(self._path, self._through.size, self._through.hexdigest())

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def write(self, data: Any) -> int:
        if self._through is not None:
            return self._through.write(data)
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        if self._size + size <= SMALL_BYTES:
            # The encoder's own bytes are immutable and kept as they are; a caller's
            # buffer may change later, so it is copied.
            held = data if type(data) is bytes else bytes(memoryview(data).cast("B"))
            self._held.append(held)
            self._size += size
            return size
        through = self._open_through()
        for piece in self._held:
            through.write(piece)
        self._held = []
        return through.write(data)

    def _open_through(self) -> HashingWriter:
        opened = self._storage.open_write(self._path)
        self._through = HashingWriter(opened.__enter__(), self._algorithm)
        self._opened = opened
        return self._through

    def _close_raw(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leave the storage's stream as its own ``with`` block would."""
        if self._opened is not None:
            opened, self._opened = self._opened, None
            opened.__exit__(exc_type, exc, tb)
