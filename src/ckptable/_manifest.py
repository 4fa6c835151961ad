"""Integrity manifests: what a checkpoint level holds, and the proof that it still does.

Every directory of a checkpoint ckptable writes holds a ``.ckptable-manifest.json``:

- ``files``: each file's name, size and checksum;
- ``dirs``: each subdirectory's name and the checksum of *its* manifest.

So the root manifest pins the whole tree (a Merkle tree: a swapped, added or deleted
component directory changes a checksum one level up), and every component directory
is verifiable on its own, as a partial restore or a copied-out component needs. The root
manifest is written last: on an object store, where there is no atomic rename, it is the
commit record, and a directory without one is never a complete checkpoint.

Checksums are xxh3-64 when the ``xxhash`` package is installed (``ckptable[fast]``, about
17 GB/s here) and CRC-32 from the standard library otherwise (about 3.4 GB/s). sha256
would cost more than the write itself. The algorithm is recorded in the manifest, so a
reader knows which one to use. A manifest carries a CRC-32 of its own body, so a damaged
manifest is reported as such and not as a damaged file.

Checksums detect accidents (torn writes, bit rot, truncation, files mixed from two
checkpoints), not tampering: anybody who can write the files can rewrite the manifest.
Use ``safe=True`` on restore for checkpoints you do not trust.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import stat
import threading
import zlib
from collections.abc import Callable
from typing import IO, Any, Protocol

from ckptable._layout import read_metadata_file, record_of
from ckptable._progress import advance
from ckptable._storage import EntryKind, LocalStorage, Storage
from ckptable.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
)

__all__ = [
    "MANIFEST_FILE",
    "Checksum",
    "HashingWriter",
    "LevelManifest",
    "checksum_of",
    "manifest_tree_bytes",
    "new_checksum",
    "preferred_algorithm",
    "refuse_special_entries",
    "require_manifest_unless_foreign",
]

#: The manifest's file name in every level (hidden, and under the reserved prefix, so it
#: can never clash with a component name; RLlib ignores files it does not know).
MANIFEST_FILE = ".ckptable-manifest.json"
MANIFEST_VERSION = 1

_CHUNK = 8 << 20
#: Files up to this size are read in one call when verified.
_SMALL_FILE_BYTES = 1 << 20


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
    checksum = new_checksum(algorithm)
    checksum.update(data)
    return checksum.hexdigest()


#: Buffers at least this big are checksummed on a helper thread while they are written.
_PARALLEL_BYTES = 4 << 20
#: Chunk size of that pipeline: small enough that hash and write overlap well.
_PIPELINE_CHUNK = 8 << 20
#: Files up to this size are read in one call when verified.
_SMALL_FILE_BYTES = 1 << 20

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_pid = -1
_executor_lock = threading.Lock()


def _checksum_executor() -> concurrent.futures.ThreadPoolExecutor:
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
    """

    def __init__(self, raw: IO[bytes], algorithm: str) -> None:
        self._raw = raw
        self._checksum = new_checksum(algorithm)
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        total = len(view)
        if total < _PARALLEL_BYTES:
            self._checksum.update(view)
            self._write_all(view)
            advance(total)
        else:
            executor = _checksum_executor()
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


# --------------------------------------------------------------------------- the record


@dataclasses.dataclass
class LevelManifest:
    """The parsed manifest of one level."""

    algorithm: str
    #: File name → (size in bytes, checksum).
    files: dict[str, tuple[int, str]]
    #: Subdirectory name → checksum of the subdirectory's manifest file.
    dirs: dict[str, str]
    #: Big pickle file name → checksum of its skeleton (every byte but the big byte
    #: payloads): what ``mmap=True`` verifies without reading the payloads.
    skeletons: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Bytes of the files this manifest and all manifests below it list (None: not
    #: recorded). Informational: the total of a progress bar, known from one file.
    tree_bytes: int | None = None
    #: Written inside the save of a parent level (whose manifest pins this one), not
    #: published on its own: a parent without a manifest then lost it.
    nested: bool = False

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "version": MANIFEST_VERSION,
            "algorithm": self.algorithm,
            "files": {name: [size, digest] for name, (size, digest) in sorted(self.files.items())},
            "dirs": dict(sorted(self.dirs.items())),
        }
        if self.skeletons:
            body["skeletons"] = dict(sorted(self.skeletons.items()))
        if self.tree_bytes is not None:
            body["tree_bytes"] = self.tree_bytes
        if self.nested:
            body["nested"] = True
        body_bytes = json.dumps(body, indent=1, sort_keys=True).encode("ascii")
        # One JSON document; the CRC covers the body's exact bytes, so checking it needs
        # no re-encoding. No trailing newline: any truncation breaks the document.
        return b"".join(
            (_PREFIX, body_bytes, _SUFFIX_START, b"%08x" % zlib.crc32(body_bytes), _SUFFIX_END)
        )

    @classmethod
    def from_bytes(cls, data: bytes, shown: str) -> LevelManifest:
        """Parse and self-check a manifest file's bytes (``shown`` names it in errors)."""
        suffix_length = len(_SUFFIX_START) + 8 + len(_SUFFIX_END)
        body_bytes = data[len(_PREFIX) : len(data) - suffix_length]
        stored_crc = data[len(data) - suffix_length + len(_SUFFIX_START) : -len(_SUFFIX_END)]
        if not (
            data.startswith(_PREFIX)
            and data.endswith(_SUFFIX_END)
            and data[len(data) - suffix_length :].startswith(_SUFFIX_START)
        ):
            raise CorruptCheckpointError(
                f"The manifest {shown} is unreadable (not a ckptable manifest, or truncated).",
                path=shown,
            )
        if b"%08x" % zlib.crc32(body_bytes) != stored_crc:
            raise CorruptCheckpointError(
                f"The manifest {shown} is damaged (its own checksum does not match).", path=shown
            )
        try:
            body = json.loads(body_bytes)
            if not isinstance(body, dict):
                raise TypeError("the manifest body is not an object")
        except (ValueError, TypeError) as exc:
            raise CorruptCheckpointError(
                f"The manifest {shown} is unreadable ({exc}).", path=shown
            ) from exc
        version = body.get("version")
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise IncompatibleCheckpointError(
                f"The manifest {shown} has version {version!r}; this ckptable reads "
                f"versions up to {MANIFEST_VERSION}. Upgrade ckptable.",
                path=shown,
            )
        try:
            files = {str(n): (int(s), str(d)) for n, (s, d) in body["files"].items()}
            dirs = {str(n): str(d) for n, d in body["dirs"].items()}
            algorithm = str(body["algorithm"])
            skeletons = {str(n): str(d) for n, d in body.get("skeletons", {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptCheckpointError(
                f"The manifest {shown} is malformed ({exc}).", path=shown
            ) from exc
        tree_bytes = body.get("tree_bytes")
        if isinstance(tree_bytes, bool) or not isinstance(tree_bytes, int) or tree_bytes < 0:
            tree_bytes = None  # absent (older manifests), or not a count: unknown
        skeletons = {n: d for n, d in skeletons.items() if n in files}
        return cls(algorithm, files, dirs, skeletons, tree_bytes, body.get("nested") is True)


#: A manifest file is ``{"ckptable_manifest": <body>, "crc32": "<crc of body bytes>"}``.
_PREFIX = b'{"ckptable_manifest": '
_SUFFIX_START = b', "crc32": "'
_SUFFIX_END = b'"}'


# --------------------------------------------------------------------------- checking a level


def refuse_special_entries(storage: Storage, directory: str, entries: dict[str, EntryKind]) -> None:
    """Symlinks, FIFOs, sockets and devices have no place in a checkpoint: refuse the
    level before anything in it is opened (a symlink could point anywhere)."""
    special = sorted(name for name, kind in entries.items() if kind == "other")
    if special:
        shown = storage.display(storage.join(directory, special[0]))
        raise UnsafeCheckpointError(
            f"{shown} is a symlink or special file (FIFO, socket or device); a checkpoint "
            "holds only regular files and directories, so it is refused without being read.",
            path=shown,
        )


def require_manifest_unless_foreign(
    storage: Storage,
    directory: str,
    record: dict[str, Any] | None,
    entries: dict[str, Any],
    read_already: str | None = None,
) -> None:
    """A level ckptable wrote has a manifest; without one, its save never finished.

    ``record``: ckptable's record from the level's metadata file ``read_already``, if
    the caller read it; without a record, the level's other JSON files are looked at (a
    class may rename its metadata file, as RLlib's Algorithm does).
    """
    if record is None:
        for name in sorted(entries):
            if name in (MANIFEST_FILE, read_already):
                continue
            if name.endswith(".json") and entries[name] == "file":
                try:
                    record = record_of(read_metadata_file(storage, storage.join(directory, name)))
                except CorruptCheckpointError:
                    continue  # not JSON: not ckptable's metadata
                if record is not None:
                    break
    if record is not None:
        shown = storage.display(directory)
        raise CorruptCheckpointError(
            f"The checkpoint level {shown} was written by ckptable but has no manifest "
            f"({MANIFEST_FILE}): its save did not finish, or the manifest was deleted. "
            "It is refused; pass verify=False to load it anyway.",
            path=shown,
        )
    _refuse_lost_parent_manifest(storage, directory, entries)


def _refuse_lost_parent_manifest(storage: Storage, directory: str, entries: dict[str, Any]) -> None:
    """A level without a manifest whose component directory holds a manifest written
    inside a parent's save (``nested``) was written by ckptable whole: its own
    manifest (and metadata) were deleted or lost. (A component that ckptable published
    on its own, under a parent another library wrote, has a manifest that is not
    ``nested``: that tree is RLlib's with a ckptable part, and is accepted.)"""
    for name in sorted(entries):
        if entries[name] != "dir":
            continue
        path = storage.join(directory, name, MANIFEST_FILE)
        if storage.kind(path) != "file":
            continue
        try:
            nested = LevelManifest.from_bytes(storage.read_bytes(path), storage.display(path))
        except (CheckpointError, OSError):
            continue  # damaged: found when that level is verified
        if nested.nested:
            shown = storage.display(directory)
            raise CorruptCheckpointError(
                f"The checkpoint level {shown} has no manifest ({MANIFEST_FILE}), but its "
                f"component {name!r} was saved as part of a ckptable checkpoint of it "
                f"({storage.display(path)} says so): the manifest of {shown} was deleted "
                "or lost. It is refused; pass verify=False to load it anyway.",
                path=shown,
            )


def read_manifest(
    storage: Storage, directory: str, expected_digest: tuple[str, str] | None = None
) -> LevelManifest:
    """Read and parse ``directory``'s manifest.

    ``expected_digest``: ``(algorithm, checksum)`` of the manifest file recorded one level
    up; a mismatch means the directory is not the one the parent was saved with.
    """
    path = storage.join(directory, MANIFEST_FILE)
    shown = storage.display(path)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(
            f"{shown} is missing: the checkpoint level {storage.display(directory)} is "
            "incomplete (its save did not finish) or was altered.",
            path=shown,
        ) from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"Cannot read {shown}: {exc}", path=shown) from exc
    if expected_digest is not None:
        algorithm, digest = expected_digest
        if checksum_of(algorithm, data) != digest:
            raise CorruptCheckpointError(
                f"The component directory {storage.display(directory)} is not the one its "
                "parent was saved with (its manifest's checksum differs from the parent's "
                "record): it was replaced, swapped or altered.",
                path=storage.display(directory),
            )
    return LevelManifest.from_bytes(data, shown)


def manifest_tree_bytes(storage: Storage, directory: str) -> int | None:
    """The bytes of the tree at ``directory`` as its manifest records them (the total of
    a progress bar); None if it records none, or has no readable manifest.

    Found without parsing the manifest (a root with 1,000 components has a 100 kB one):
    the body is written with an indent of one space per level, so the body's own key is
    the only line that starts with one space and ``"tree_bytes"``. The restore verifies
    the manifest anyway.

    It runs before anything else of a restore or verification, so it opens the manifest
    only once it is known to be a regular file (:func:`open_regular`): a FIFO in its
    place would block the open forever. Whatever is in the way (nothing, a directory, a
    symlink, a FIFO) gives None here; the listing that follows refuses it.
    """
    try:
        with open_regular(storage, storage.join(directory, MANIFEST_FILE)) as stream:
            data = stream.read()
    except (OSError, CheckpointError):
        return None
    found = _TREE_BYTES.search(data)
    return int(found.group(1)) if found else None


_TREE_BYTES = re.compile(rb'\n "tree_bytes": (\d+),?\n')


def open_regular(storage: Storage, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    """Open the checkpoint file at ``path`` for reading, only once it is known to be a
    regular file.

    Opening a FIFO blocks until somebody writes to it (forever, in a checkpoint), and
    opening a device can have effects of its own, so nothing of a checkpoint is opened
    before its kind is known. On the local disk the kind is checked before the open
    (``lstat``) and again on what was opened (``fstat``), and the open itself neither
    blocks (``O_NONBLOCK``, for a FIFO swapped in meanwhile) nor follows a symlink;
    elsewhere the storage's ``kind`` decides (one metadata request).

    Raises:
        UnsafeCheckpointError: ``path`` is a symlink, FIFO, socket or device.
        FileNotFoundError: nothing is at ``path``.
        IsADirectoryError: a directory is at ``path``.
        OSError: the file cannot be opened.
    """
    shown = storage.display(path)
    if isinstance(storage, LocalStorage):
        return _open_local_regular(path, shown)
    kind = storage.kind(path)
    if kind == "other":
        raise _special_file(shown)
    if kind is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), shown)
    if kind == "dir":
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), shown)
    return storage.open_read(path)


def _open_local_regular(path: str, shown: str) -> IO[bytes]:
    """:func:`open_regular` on the local disk: an unbuffered binary file."""
    _require_regular(os.stat(path, follow_symlinks=False).st_mode, path, shown)
    try:
        fd = os.open(path, _OPEN_REGULAR_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink swapped in after the stat
            raise _special_file(shown) from exc
        raise
    try:
        _require_regular(os.fstat(fd).st_mode, path, shown)
        if _NONBLOCK:
            os.set_blocking(fd, True)  # (no effect on regular files; as open_read makes them)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, path: str, shown: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    raise _special_file(shown)


def _special_file(shown: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{shown} is a symlink or special file (FIFO, socket or device); a checkpoint "
        "holds only regular files and directories, so it is refused without being read.",
        path=shown,
    )


_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
_OPEN_REGULAR_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | _NONBLOCK
)


def check_listing(
    storage: Storage, directory: str, manifest: LevelManifest, entries: dict[str, EntryKind]
) -> None:
    """The level holds exactly the files and directories its manifest lists."""
    for name, (_size, _digest) in manifest.files.items():
        if entries.get(name) != "file":
            _missing(storage, directory, name, "file")
    for name in manifest.dirs:
        if entries.get(name) != "dir":
            _missing(storage, directory, name, "component directory")
    listed = manifest.files.keys() | manifest.dirs.keys() | {MANIFEST_FILE}
    extra = sorted(set(entries) - listed)
    if extra:
        shown = storage.display(storage.join(directory, extra[0]))
        raise CorruptCheckpointError(
            f"{shown} is not part of the checkpoint (its manifest does not list it): "
            "something was added after the save.",
            path=shown,
        )


def _missing(storage: Storage, directory: str, name: str, what: str) -> None:
    shown = storage.display(storage.join(directory, name))
    raise CorruptCheckpointError(
        f"The {what} {shown} listed in the checkpoint's manifest is missing.",
        path=shown,
        component=name if what == "component directory" else None,
    )


def read_verified(
    storage: Storage, path: str, expected: tuple[int, str], algorithm: str, keep: bool
) -> bytes | None:
    """Read the file at ``path`` whole and check its size and checksum.

    Returns its bytes if ``keep`` (small files: decoded from memory later, saving a second
    read), else None (the decoder reads the file again; only its checksum was needed now).
    """
    size, digest = expected
    shown = storage.display(path)
    checksum = new_checksum(algorithm, path=shown)
    chunks: list[bytes] = []
    try:
        if size <= _SMALL_FILE_BYTES:
            # The common case on wide trees: one read, one checksum call.
            with storage.open_read(path) as stream:
                data = stream.read(size + 1)  # one byte more shows a longer file
            read = len(data)
            checksum.update(data)
            advance(read)
            chunks.append(data)
        else:
            with storage.open_read(path) as stream:
                read = _read_checksummed(stream, checksum, size, chunks if keep else None)
    except OSError as exc:
        raise CorruptCheckpointError(f"Cannot read {shown}: {exc}", path=shown) from exc
    if read != size:
        raise CorruptCheckpointError(
            f"{shown} has {'more than ' if read > size else ''}{read} bytes; the manifest "
            f"records {size}: the file is {'truncated' if read < size else 'altered'}.",
            path=shown,
        )
    if checksum.hexdigest() != digest:
        raise CorruptCheckpointError(
            f"{shown} is corrupt: its {algorithm} checksum {checksum.hexdigest()} differs "
            f"from the manifest's {digest}.",
            path=shown,
        )
    return b"".join(chunks) if keep else None


def hash_file(storage: Storage, path: str, algorithm: str) -> tuple[int, str]:
    """Size and checksum of a file written by code other than ckptable's own writers."""
    checksum = new_checksum(algorithm)
    with storage.open_read(path) as stream:
        size = _read_checksummed(stream, checksum, None, None)
    return size, checksum.hexdigest()


def _read_checksummed(
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
                pending = _checksum_executor().submit(checksum.update, chunk)
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


def build_manifest(
    storage: Storage,
    directory: str,
    algorithm: str,
    known: dict[str, tuple[int, str]],
    shown: Callable[[str], str],
    rebuild: bool = False,
    skeletons: dict[str, str] | None = None,
    trees: dict[str, int | None] | None = None,
    *,
    nested: bool = False,
) -> LevelManifest:
    """The manifest of a finished level, as the directory is now.

    ``known`` maps the paths ckptable wrote itself (checksummed while writing, manifests
    of finished sub-levels included) to size and checksum. Anything else was written by a
    component's own code and is read back to checksum it; a subdirectory without a
    manifest (a component that saved itself without ckptable) is sealed first, so that
    every directory of the tree gets one. ``rebuild`` rebuilds the manifests of all
    subdirectories too (a component's own code may have written after ckptable sealed).
    ``trees`` maps the directories sealed so far to their ``tree_bytes``.
    """
    skeletons = {} if skeletons is None else skeletons
    trees = {} if trees is None else trees
    files: dict[str, tuple[int, str]] = {}
    dirs: dict[str, str] = {}
    level_skeletons: dict[str, str] = {}
    tree_bytes: int | None = 0
    for name, kind in sorted(storage.listdir(directory).items()):
        path = storage.join(directory, name)
        if name == MANIFEST_FILE:
            continue
        if kind == "file":
            entry = known.get(path)
            if entry is None or (rebuild and not _unchanged(storage, path, entry)):
                if entry is not None:
                    advance(-entry[0])  # counted when written; hash_file counts it again
                entry = known[path] = hash_file(storage, path, algorithm)
                skeletons.pop(path, None)  # rewritten by a component's own code
            files[name] = entry
            if path in skeletons:
                level_skeletons[name] = skeletons[path]
            if tree_bytes is not None:
                tree_bytes += entry[0]
        elif kind == "dir":
            sub_manifest = storage.join(path, MANIFEST_FILE)
            if rebuild or sub_manifest not in known:
                seal_directory(
                    storage, path, algorithm, known, shown, rebuild, skeletons, trees, nested=True
                )
            dirs[name] = known[sub_manifest][1]
            below = trees.get(path)
            tree_bytes = None if tree_bytes is None or below is None else tree_bytes + below
        else:
            raise CheckpointError(
                f"A component's save created {shown(path)}, a symlink or special file; "
                "a checkpoint may hold only regular files and directories.",
                path=shown(path),
            )
    return LevelManifest(algorithm, files, dirs, level_skeletons, tree_bytes, nested)


#: On rebuilding, files ckptable wrote up to this size are checksummed again; larger
#: ones only if their size changed (a save override may rewrite a file after ckptable
#: checksummed it: small metadata files, typically).
_RECHECK_BYTES = 1 << 20


def _unchanged(storage: Storage, path: str, entry: tuple[int, str]) -> bool:
    """Whether a file ckptable wrote (and checksummed) can be taken as unchanged."""
    try:
        return entry[0] > _RECHECK_BYTES and storage.size(path) == entry[0]
    except OSError:
        return False


def seal_directory(
    storage: Storage,
    directory: str,
    algorithm: str,
    known: dict[str, tuple[int, str]],
    shown: Callable[[str], str],
    rebuild: bool = False,
    skeletons: dict[str, str] | None = None,
    trees: dict[str, int | None] | None = None,
    *,
    nested: bool = False,
) -> None:
    """Write ``directory``'s manifest (building those of its subdirectories as needed) and
    record the manifest's own size and checksum in ``known``, its ``tree_bytes`` in
    ``trees``."""
    trees = {} if trees is None else trees
    manifest = build_manifest(
        storage, directory, algorithm, known, shown, rebuild, skeletons, trees, nested=nested
    )
    trees[directory] = manifest.tree_bytes
    data = manifest.to_bytes()
    path = storage.join(directory, MANIFEST_FILE)
    if known.pop(path, None) is not None or storage.kind(path) is not None:
        storage.remove_tree(path)  # a stale one: a component wrote after it was sealed
    storage.write_bytes(path, data)
    known[path] = (len(data), checksum_of(algorithm, data))
