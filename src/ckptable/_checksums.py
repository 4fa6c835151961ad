"""Checksums: the algorithms manifests record, and checksumming bytes as they pass.

Checksums are xxh3-64 when the ``xxhash`` package is installed (``ckptable[fast]``, about
17 GB/s here) and CRC-32 from the standard library otherwise (about 3.4 GB/s). sha256
would cost more than the write itself. The algorithm is recorded in the manifest (see
:mod:`ckptable._manifest_format`), so a reader knows which one to use.

Checksums detect accidents (torn writes, bit rot, truncation, files mixed from two
checkpoints), not tampering: anybody who can write the files can rewrite the manifest.
Use ``safe=True`` on restore for checkpoints you do not trust.

Big buffers are checksummed on a small pool of helper threads while the calling thread
writes (:class:`HashingWriter`) or reads (:func:`read_checksummed`) the next chunk: both
xxhash and zlib release the GIL, so the checksum costs next to nothing on the page cache.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import zlib
from collections.abc import Callable
from typing import IO, Any, Protocol

from ckptable._parallel_read import readinto_parallel
from ckptable._progress import advance
from ckptable._storage import Storage
from ckptable.errors import IncompatibleCheckpointError

__all__ = [
    "Checksum",
    "HashingWriter",
    "checksum_executor",
    "checksum_of",
    "hash_file",
    "new_checksum",
    "preferred_algorithm",
    "read_checksummed",
]


# --------------------------------------------------------------------------- the algorithms


class Checksum(Protocol):
    """A running checksum (the subset of the ``hashlib`` interface ckptable uses)."""

    def update(self, data: Any, /) -> None: ...
    def hexdigest(self) -> str: ...


class _Crc32:
    """CRC-32 (zlib) behind the hashlib-style interface."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: Any, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def _xxh3_64() -> Checksum:
    import xxhash

    return xxhash.xxh3_64()


_ALGORITHMS: dict[str, Callable[[], Checksum]] = {"xxh3_64": _xxh3_64, "crc32": _Crc32}


@functools.cache
def _has_xxhash() -> bool:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return False
    return True


def preferred_algorithm() -> str:
    """The checksum new manifests use: xxh3-64 (``xxhash`` is a dependency of ckptable;
    CRC-32 only where an install lacks it against its metadata)."""
    return "xxh3_64" if _has_xxhash() else "crc32"


def new_checksum(algorithm: str, *, path: str | None = None) -> Checksum:
    """A fresh checksum of ``algorithm``; a clear error if this Python cannot compute it."""
    factory = _ALGORITHMS.get(algorithm)
    if factory is None:
        raise IncompatibleCheckpointError(
            f"The manifest of {path} uses checksum {algorithm!r}, which this version of "
            f"ckptable does not know (known: {', '.join(sorted(_ALGORITHMS))}).",
            path=path,
        )
    if algorithm == "xxh3_64" and not _has_xxhash():
        raise IncompatibleCheckpointError(
            f"The checkpoint at {path} was written with xxh3 checksums; verifying it needs "
            "the xxhash package, a dependency of ckptable missing from this install: "
            "pip install xxhash (or reinstall ckptable).",
            path=path,
        )
    return factory()


def checksum_of(algorithm: str, data: Any) -> str:
    """The checksum of one in-memory buffer."""
    if algorithm == "xxh3_64" and _has_xxhash():
        return _xxh3_hexdigest()(data)  # one call: the common case on wide trees
    checksum = new_checksum(algorithm)
    checksum.update(data)
    return checksum.hexdigest()


@functools.cache
def _xxh3_hexdigest() -> Callable[[Any], str]:
    import xxhash

    return xxhash.xxh3_64_hexdigest


# --------------------------------------------------------------------------- the helper threads

#: Buffers at least this big are checksummed on a helper thread while they are written.
_PARALLEL_BYTES = 4 << 20
#: Chunk size of that pipeline: small enough that hash and write overlap well.
_PIPELINE_CHUNK = 8 << 20

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_pid = -1
_executor_lock = threading.Lock()


def checksum_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The helper threads that checksum big buffers (recreated after a fork)."""
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="ckptable-checksum"
            )
            _executor_pid = os.getpid()
        return _executor


class HashingWriter:
    """A write-only binary stream that checksums and counts what passes through.

    A big buffer (pickle hands over each numpy array's memory whole) is cut into 8 MiB
    chunks; each chunk is checksummed on a helper thread while the calling thread writes
    it, one chunk after another so the checksum sees the bytes in order. Both xxhash and
    zlib release the GIL, so on the page cache the checksum costs next to nothing instead
    of a pass over the data of its own. Each write, and each chunk of a big one, counts
    in the operation's progress bar.

    ``write`` always writes the whole buffer: an unbuffered ``FileIO`` may write less
    than asked (Linux caps one ``write(2)`` at about 2 GiB), and pickle ignores the count.
    Big ``bytes`` (an encoder's output: msgpack's ``packb``) go whole to a stream that has
    ``write_owned``, which keeps them without copying.
    """

    def __init__(self, raw: IO[bytes], algorithm: str) -> None:
        self._raw = raw
        self._checksum = new_checksum(algorithm)
        self.size = 0

    def write(self, data: Any) -> int:
        if type(data) is bytes and len(data) >= _PARALLEL_BYTES:
            keep = getattr(self._raw, "write_owned", None)
            if keep is not None:
                # An encoder's own bytes, to a stream that keeps them without a copy
                # (the concurrent writes of an object store's save): checksummed whole,
                # handed over whole.
                self._checksum.update(data)
                keep(data)
                advance(len(data))
                self.size += len(data)
                return len(data)
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        total = len(view)
        if total < _PARALLEL_BYTES:
            self._checksum.update(view)
            self._write_all(view)
            advance(total)
        else:
            executor = checksum_executor()
            for start in range(0, total, _PIPELINE_CHUNK):
                chunk = view[start : start + _PIPELINE_CHUNK]
                pending = executor.submit(self._checksum.update, chunk)
                try:
                    self._write_all(chunk)
                finally:
                    pending.result()
                advance(len(chunk))
        self.size += total
        return total

    def _write_all(self, view: memoryview) -> None:
        while view:
            written = self._raw.write(view)
            if written is None or written <= 0:
                raise OSError(f"Short write: the stream accepted {written} bytes.")
            view = view[written:]

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._checksum.hexdigest()


# --------------------------------------------------------------------------- reading

#: Read size of :func:`read_checksummed`.
_CHUNK = 8 << 20


def hash_file(storage: Storage, path: str, algorithm: str) -> tuple[int, str]:
    """Size and checksum of a file written by code other than ckptable's own writers."""
    checksum = new_checksum(algorithm)
    with storage.open_read(path) as stream:
        size = read_checksummed(stream, checksum, None, None)
    return size, checksum.hexdigest()


def read_checksummed(
    stream: IO[bytes], checksum: Checksum, limit: int | None, keep: list[bytes] | None
) -> int:
    """Read ``stream`` to its end (or just past ``limit`` bytes) into ``checksum``;
    returns the bytes read. The checksum of one chunk runs on a helper thread while the
    next chunk is read (both release the GIL). Each chunk counts in the progress bar."""
    read = 0
    pending: concurrent.futures.Future[None] | None = None
    try:
        while chunk := stream.read(_CHUNK):
            read += len(chunk)
            if limit is not None and read > limit:
                break
            if pending is not None:
                pending.result()
            if len(chunk) >= _PARALLEL_BYTES:
                pending = checksum_executor().submit(checksum.update, chunk)
            else:
                pending = None
                checksum.update(chunk)
            if keep is not None:
                keep.append(chunk)
            advance(len(chunk))
    finally:
        if pending is not None:
            pending.result()
    return read


class VerifyingReader:
    """A read-only binary stream over ``raw`` (a file at its start) that checksums what
    its reader reads, in file order; :meth:`finish` then reads whatever the reader left
    and compares the size and checksum with the manifest's.

    For a big file whose decoder is safe on unverified bytes (see
    ``_formats.decodes_untrusted``): the file is read once, by the decoder, instead of
    once to verify it and once to decode it. Nothing decoded from it is applied before
    :meth:`finish` passed (the restore applies only after every file decoded). A reader
    that seeks away from where the checksum is (other than to look at the file's end and
    come back) makes :meth:`finish` fall back to reading the file whole again.
    """

    def __init__(
        self,
        raw: Any,
        expected: tuple[int, str],
        algorithm: str,
        shown: str,
        reread: Callable[[], None],
    ) -> None:
        self._raw = raw
        self._expected = expected
        self._algorithm = algorithm
        self._shown = shown
        self._reread = reread
        self._checksum = new_checksum(algorithm, path=shown)
        self._pending: concurrent.futures.Future[None] | None = None
        #: Bytes checksummed so far (the file offset the next read must start at).
        self._hashed = 0
        self._out_of_order = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return int(self._raw.tell())

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return int(self._raw.seek(offset, whence))

    def read(self, size: int | None = -1) -> bytes:
        start = self._raw.tell()
        data: bytes = self._raw.read(size)
        self._update(start, data)
        return data

    def readinto(self, buffer: Any) -> int | None:
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        # A big read of a local file: parallel preads, each chunk checksummed in order
        # as it arrives, on this thread (which only waits for the reading threads).
        here = functools.partial(self._update, behind=False)
        n: int | None = readinto_parallel(self._raw, view, here)
        if n is not None:
            return n
        start = self._raw.tell()
        n = self._raw.readinto(view)
        if n:
            self._update(start, view[:n])
        return n

    def _update(self, start: int, data: Any, *, behind: bool = True) -> None:
        """Checksum ``data``, read at ``start``; big data on a helper thread while the
        reader reads on, unless ``behind`` is False (a thread that only waits anyway)."""
        if not len(data) or self._out_of_order:
            return
        if start != self._hashed:
            self._out_of_order = True
            return
        self._wait()
        if behind and len(data) >= _PARALLEL_BYTES:
            # The reader does not change what it just read (it is the final memory of
            # an array, or bytes): checksummed on a helper thread while it reads on.
            self._pending = checksum_executor().submit(self._checksum.update, data)
        else:
            self._checksum.update(data)
        self._hashed += len(data)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def finish(self) -> None:
        """Read what the reader left, then check size and checksum.

        Raises:
            CorruptCheckpointError: the file differs from the manifest's record.
        """
        from ckptable.errors import CorruptCheckpointError

        self._wait()
        if self._out_of_order:
            self._reread()  # read_verified: raises if the file is damaged
            return
        size, digest = self._expected
        end = int(self._raw.seek(0, os.SEEK_END))
        if end != size:
            state = "truncated" if end < size else "altered"
            raise CorruptCheckpointError(
                f"{self._shown} has {end} bytes; the manifest records {size}: the file is {state}.",
                path=self._shown,
            )
        self._raw.seek(self._hashed)
        while self._hashed < size:  # what the reader left (nothing, for safetensors)
            chunk = self._raw.read(min(_CHUNK, size - self._hashed))
            if not chunk:
                break
            self._update(self._hashed, chunk)
        self._wait()
        if self._checksum.hexdigest() != digest:
            raise CorruptCheckpointError(
                f"{self._shown} is corrupt: its {self._algorithm} checksum "
                f"{self._checksum.hexdigest()} differs from the manifest's {digest}.",
                path=self._shown,
            )
