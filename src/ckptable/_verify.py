"""``verify_checkpoint``: check a checkpoint against its manifests without loading it.

Every file of every level is read and compared (size and checksum) with the level's
manifest, and every listing must match it exactly; levels without a manifest (RLlib's)
are read and reported as unverified. ``verify_tree`` is the same walk on a resolved
storage path, which restores and ``convert`` run before reading a checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ckptable._commit import recover_leftovers
from ckptable._info import counted_files, refuse_non_checkpoint
from ckptable._manifest import (
    MANIFEST_FILE,
    LevelManifest,
    check_listing,
    hash_file,
    manifest_tree_bytes,
    read_manifest,
    read_verified,
    refuse_special_entries,
    require_manifest_unless_foreign,
)
from ckptable._progress import progress_bar
from ckptable._storage import Storage, resolve_storage
from ckptable._storage_prefetch import reading_ahead
from ckptable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["VerifyReport", "verify_checkpoint", "verify_tree"]


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What ``verify_checkpoint`` checked."""

    #: The checkpoint, as given (URIs kept).
    path: str
    #: Directories (the root and every component level) checked.
    levels: int
    #: Files read and checked, manifests not counted.
    files: int
    #: Bytes in those files.
    bytes: int
    #: Checksum algorithms the manifests use (empty if none had one).
    algorithms: tuple[str, ...]
    #: Levels without a manifest (written by RLlib or another tool): read, not verified.
    unverified: tuple[str, ...]

    @property
    def verified(self) -> bool:
        """True if every level had a manifest and matched it."""
        return not self.unverified


def verify_checkpoint(
    path: Any, filesystem: Any = None, *, progress: bool | None = None
) -> VerifyReport:
    """Check the checkpoint at ``path`` against its manifests without loading anything.

    Every file of every level is read and its size and checksum compared; listings must
    match exactly (no missing, extra or swapped files or component directories); nothing
    is decoded or unpickled. Levels RLlib wrote have no manifest: they are read (so an
    unreadable file still fails) and listed in ``report.unverified``.

    Args:
        path: The checkpoint directory (or URI).
        filesystem: A ``pyarrow.fs.FileSystem`` or an fsspec filesystem to read with.
        progress: Show a progress bar (bytes read, rate, percentage), as
            ``Checkpointable.save_to_path`` does: None when stderr is a terminal.

    Raises:
        CheckpointNotFoundError: no directory at ``path`` (a file: the message names
            the directory to pass).
        CorruptCheckpointError: anything differs from the manifests, or a level ckptable
            wrote lacks its manifest (an unfinished save).
        UnsafeCheckpointError: the checkpoint holds a symlink or special file.
    """
    storage, root = resolve_storage(path, filesystem)
    try:
        with reading_ahead(storage, root) as storage:
            return _verify_root(storage, root, progress)
    except CheckpointError:
        raise  # CheckpointNotFoundError is an OSError too: keep it as it is
    except OSError as exc:
        shown = storage.display(root)
        raise CorruptCheckpointError(
            f"Cannot read the checkpoint {shown}: {exc}", path=shown
        ) from exc


def _verify_root(storage: Storage, root: str, progress: bool | None) -> VerifyReport:
    """``verify_checkpoint`` on a resolved path (an object store's listed once and read
    concurrently: :mod:`ckptable._storage_prefetch`)."""
    refuse_non_checkpoint(storage, root)
    with progress_bar(progress, "Verifying") as bar:
        if bar is not None:
            bar.set_total(manifest_tree_bytes(storage, root))
        return verify_tree(storage, root)


def verify_tree(
    storage: Storage,
    root: str,
    expected_manifest: tuple[str, str] | None = None,
    *,
    read_unverified: bool = True,
) -> VerifyReport:
    """``verify_checkpoint`` on a resolved storage path; ``expected_manifest``: the
    parent manifest's ``(algorithm, checksum)`` of the root's manifest.
    ``read_unverified=False`` lists levels without a manifest but does not read their
    files (a restore reads them anyway; their byte count is then 0).

    The tree is walked with an explicit stack, in sorted order, so a chain of thousands
    of nested components neither exhausts the recursion limit nor changes which damage
    is reported first. A file is opened only once its listing shows a regular file.
    """
    if storage.kind(root, follow_symlinks=True) != "dir":
        recover_leftovers(storage, root)
        if storage.kind(root, follow_symlinks=True) != "dir":
            shown = storage.display(root)
            raise CheckpointNotFoundError(f"No checkpoint directory at {shown}.", path=shown)
    levels = files = size = 0
    algorithms: set[str] = set()
    unverified: list[str] = []

    pending: list[tuple[str, tuple[str, str] | None]] = [(root, expected_manifest)]
    while pending:
        directory, expected = pending.pop()
        entries = storage.listdir(directory)
        refuse_special_entries(storage, directory, entries)
        levels += 1
        below: list[tuple[str, tuple[str, str] | None]] = []
        if MANIFEST_FILE in entries or expected is not None:
            manifest = _read_level_manifest(storage, directory, expected)
            check_listing(storage, directory, manifest, entries)
            algorithms.add(manifest.algorithm)
            for name in counted_files(entries):  # exactly the manifest's files, listed above
                size_digest = manifest.files[name]
                path = storage.join(directory, name)
                read_verified(storage, path, size_digest, manifest.algorithm, keep=False)
                files += 1
                size += size_digest[0]
            below = [
                (storage.join(directory, name), (manifest.algorithm, digest))
                for name, digest in sorted(manifest.dirs.items())
            ]
        else:
            require_manifest_unless_foreign(storage, directory, None, entries)
            unverified.append(storage.display(directory))
            for name in counted_files(entries):
                files += 1
                if read_unverified:
                    path = storage.join(directory, name)
                    try:
                        read, _ = hash_file(storage, path, "crc32")
                    except OSError as exc:
                        shown = storage.display(path)
                        raise CorruptCheckpointError(
                            f"Cannot read {shown}: {exc}", path=shown
                        ) from exc
                    size += read
            below = [
                (storage.join(directory, name), None)
                for name, kind in sorted(entries.items())
                if kind == "dir"
            ]
        pending.extend(reversed(below))  # depth first, in sorted order
    return VerifyReport(
        storage.display(root),
        levels,
        files,
        size,
        tuple(sorted(algorithms)),
        tuple(unverified),
    )


def _read_level_manifest(
    storage: Storage, directory: str, expected: tuple[str, str] | None
) -> LevelManifest:
    """``read_manifest``, with a crafted manifest that breaks its parser (JSON nested too
    deeply, a size of ``1e400``) reported as a corrupt manifest naming the file."""
    try:
        return read_manifest(storage, directory, expected)
    except CheckpointError:
        raise
    except (RecursionError, OverflowError, ValueError, TypeError, KeyError, AttributeError) as exc:
        shown = storage.display(storage.join(directory, MANIFEST_FILE))
        raise CorruptCheckpointError(
            f"The manifest {shown} is malformed ({type(exc).__name__}: {exc}).", path=shown
        ) from exc
