"""Checking a checkpoint level against its manifest, and reading its files verified.

A level is checked before anything in it is decoded: its listing holds no symlink or
special file (:func:`refuse_special_entries`), a level ckptable wrote still has its
manifest (:func:`require_manifest_unless_foreign`), the manifest is intact and is the one
the parent level pins (:func:`read_manifest`), the level holds exactly what the manifest
lists (:func:`check_listing`), and each file has the recorded size and checksum
(:func:`read_verified`). Nothing of a checkpoint is opened before it is known to be a
regular file (:func:`open_regular`): a FIFO would block the open forever.

The manifest's format is in :mod:`ckptable._manifest_format`, the checksums in
:mod:`ckptable._checksums`, building and writing manifests in :mod:`ckptable._seal`.
Their names are importable from here too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import IO, Any

from ckptable._checksums import (
    Checksum,
    HashingWriter,
    checksum_of,
    hash_file,
    new_checksum,
    preferred_algorithm,
    read_checksummed,
)
from ckptable._layout import read_metadata_file, record_of
from ckptable._manifest_format import MANIFEST_FILE, MANIFEST_VERSION, LevelManifest
from ckptable._progress import advance
from ckptable._seal import build_manifest, seal_directory
from ckptable._storage import EntryKind, LocalStorage, Storage
from ckptable.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "Checksum",
    "HashingWriter",
    "LevelManifest",
    "build_manifest",
    "check_listing",
    "checksum_of",
    "hash_file",
    "manifest_tree_bytes",
    "new_checksum",
    "open_regular",
    "preferred_algorithm",
    "read_manifest",
    "read_verified",
    "read_verified_view",
    "refuse_special_entries",
    "require_manifest_unless_foreign",
    "seal_directory",
]

#: Files up to this size are read in one call when verified.
_SMALL_FILE_BYTES = 1 << 20


def refuse_special_entries(storage: Storage, directory: str, entries: dict[str, EntryKind]) -> None:
    """Symlinks, FIFOs, sockets and devices have no place in a checkpoint: refuse the
    level before anything in it is opened (a symlink could point anywhere)."""
    special = sorted(name for name, kind in entries.items() if kind == "other")
    if special:
        raise _special_file(storage.display(storage.join(directory, special[0])))


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
    the body is compact JSON with sorted keys, so its own key comes right before the
    last one, ``"version"``; no name inside can look like that, because JSON escapes the
    quotes of names. (Manifests written before the compact form were indented: the body's own key
    was the only line that starts with one space and ``"tree_bytes"``.) The restore
    verifies the manifest anyway.

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
    found = _TREE_BYTES.search(data) or _TREE_BYTES_INDENTED.search(data)
    if found is None:
        return None
    try:
        return int(found.group(1))
    except ValueError:  # more digits than int() converts: a crafted count, no total
        return None


_TREE_BYTES = re.compile(rb',"tree_bytes":(\d+),"version":\d+\}')
_TREE_BYTES_INDENTED = re.compile(rb'\n "tree_bytes": (\d+),?\n')


def open_regular(storage: Storage, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    """Open the checkpoint file at ``path`` for reading, only once it is known to be a
    regular file.

    Opening a FIFO blocks until somebody writes to it (forever, in a checkpoint), and
    opening a device can have effects of its own, so nothing of a checkpoint is opened
    before its kind is known. On the local disk, :meth:`LocalStorage.open_read
    <ckptable._storage.LocalStorage.open_read>` sees to it: its open neither blocks nor
    follows a symlink, and it refuses what it opened unless that is a regular file.
    Elsewhere the storage's ``kind`` decides first (one metadata request).

    Raises:
        UnsafeCheckpointError: ``path`` is a symlink, FIFO, socket or device.
        FileNotFoundError: nothing is at ``path``.
        IsADirectoryError: a directory is at ``path``.
        OSError: the file cannot be opened.
    """
    shown = storage.display(path)
    if isinstance(storage, LocalStorage):
        try:
            return storage.open_read(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW refused a symlink
                raise _special_file(shown) from exc
            raise
    kind = storage.kind(path)
    if kind == "other":
        raise _special_file(shown)
    if kind is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), shown)
    if kind == "dir":
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), shown)
    return storage.open_read(path)


def _special_file(shown: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{shown} is a symlink or special file (FIFO, socket or device); a checkpoint "
        "holds only regular files and directories, so it is refused without being read.",
        path=shown,
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
    kept = _read_checked(storage, path, expected, algorithm, keep, as_view=False)
    assert not isinstance(kept, memoryview)
    return kept


def read_verified_view(
    storage: Storage, path: str, expected: tuple[int, str], algorithm: str
) -> bytes | memoryview:
    """:func:`read_verified` keeping the file: a big file that the storage holds in
    memory already (one an object store's prefetch fetched whole:
    ``_storage_filebuffer``) is checksummed where it lies and returned as a read-only
    ``memoryview`` of that memory, not copied; any other file as its bytes."""
    kept = _read_checked(storage, path, expected, algorithm, True, as_view=True)
    assert kept is not None
    return kept


def _read_checked(
    storage: Storage,
    path: str,
    expected: tuple[int, str],
    algorithm: str,
    keep: bool,
    *,
    as_view: bool,
) -> bytes | memoryview | None:
    """:func:`read_verified` and :func:`read_verified_view`."""
    size, digest = expected
    shown = storage.display(path)
    checksum = new_checksum(algorithm, path=shown)
    chunks: list[bytes] = []
    held: memoryview | None = None
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
                rest_view = getattr(stream, "rest_view", None)
                held = rest_view(keep and as_view) if callable(rest_view) else None
                if held is not None:
                    # Checksummed where it lies: no copy to read it, none to keep it.
                    read = len(held)
                    checksum.update(held)
                    advance(read)
                    if keep and not as_view:
                        chunks.append(bytes(held))
                else:
                    read = read_checksummed(stream, checksum, size, chunks if keep else None)
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
    if keep and as_view and held is not None:
        return held
    return b"".join(chunks) if keep else None
