"""Sealing a level: building its manifest from the directory as it is, and writing it.

A save checksums what ckptable itself writes while writing it (:class:`~ckptable.
_checksums.HashingWriter`); what a component's own code wrote is read back here and
checksummed. Sealing works bottom-up: a subdirectory gets its manifest before its parent,
whose manifest then records the checksum of the subdirectory's manifest file (see
:mod:`ckptable._manifest_format`). The caller writes the root's manifest last: it is the
commit record of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptable._checksums import checksum_of, hash_file
from ckptable._manifest_format import MANIFEST_FILE, LevelManifest
from ckptable._progress import advance
from ckptable._storage import EntryKind, Storage
from ckptable.errors import CheckpointError

__all__ = ["build_manifest", "seal_directory"]


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
    entries: dict[str, EntryKind] | None = None,
) -> LevelManifest:
    """The manifest of a finished level, as the directory is now.

    ``known`` maps the paths ckptable wrote itself (checksummed while writing, manifests
    of finished sub-levels included) to size and checksum. Anything else was written by a
    component's own code and is read back to checksum it; a subdirectory without a
    manifest (a component that saved itself without ckptable) is sealed first, so that
    every directory of the tree gets one. ``rebuild`` rebuilds the manifests of all
    subdirectories too (a component's own code may have written after ckptable sealed).
    ``trees`` maps the directories sealed so far to their ``tree_bytes``.
    ``entries``: what the directory holds, where the caller wrote all of it itself and
    so knows (saves a listing: a request per level on an object store); None: listed.
    """
    skeletons = {} if skeletons is None else skeletons
    trees = {} if trees is None else trees
    files: dict[str, tuple[int, str]] = {}
    dirs: dict[str, str] = {}
    level_skeletons: dict[str, str] = {}
    tree_bytes: int | None = 0
    listing = storage.listdir(directory) if entries is None or rebuild else entries
    for name, kind in sorted(listing.items()):
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
    entries: dict[str, EntryKind] | None = None,
) -> None:
    """Write ``directory``'s manifest (building those of its subdirectories as needed) and
    record the manifest's own size and checksum in ``known``, its ``tree_bytes`` in
    ``trees``. ``entries``: see :func:`build_manifest`."""
    trees = {} if trees is None else trees
    manifest = build_manifest(
        storage,
        directory,
        algorithm,
        known,
        shown,
        rebuild,
        skeletons,
        trees,
        nested=nested,
        entries=entries,
    )
    trees[directory] = manifest.tree_bytes
    data = manifest.to_bytes()
    path = storage.join(directory, MANIFEST_FILE)
    stale = known.pop(path, None) is not None
    if stale or ((entries is None or rebuild) and storage.kind(path) is not None):
        storage.remove_tree(path)  # a stale one: a component wrote after it was sealed
    storage.write_bytes(path, data)
    known[path] = (len(data), checksum_of(algorithm, data))
