"""Staging and publishing: how a save becomes visible.

The outermost ``save_to_path`` writes the whole tree into a staging directory beside
the target (``.<name>.ckptable-staging-<id>``, same filesystem, so a rename can move it)
and publishes it only when every level is written:

- no target yet (or an empty directory): one ``rename``;
- an existing checkpoint: ``renameat2(RENAME_EXCHANGE)`` swaps the two directories in one
  step, then the old tree (now in the staging path) is removed; where the OS cannot
  swap, the old tree is renamed aside first, then the new one into place.

A failed save removes its staging directory and leaves the old checkpoint as it was.
Stores that cannot rename directories (object stores) are written in place, after the
old tree is removed.

Because the new tree replaces the old one whole, a save never leaves stale component
directories or ``state.*`` files of an older checkpoint behind.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator

from ckptable._storage import Storage
from ckptable.errors import CheckpointError

__all__ = ["STAGING_MARKER", "check_target", "publish_staging_dir", "staged_directory"]

#: Part of the name of every staging directory (and of an old tree being replaced).
STAGING_MARKER = ".ckptable-staging-"
_OLD_MARKER = ".ckptable-old-"


def check_target(storage: Storage, target: str, checkpoint_files: Iterable[str]) -> None:
    """Refuse to replace anything but a missing path, an empty directory or a checkpoint.

    ``checkpoint_files`` are the file names that mark a checkpoint level (metadata, class
    and state files): a directory holding none of them is somebody else's data.
    """
    kind = storage.kind(target)
    if kind is None:
        return
    shown = storage.display(target)
    if kind != "dir":
        raise CheckpointError(
            f"Cannot save a checkpoint to {shown}: it exists and is not a directory.",
            path=shown,
        )
    entries = storage.listdir(target)
    if entries and not any(entries.get(name) == "file" for name in checkpoint_files):
        raise CheckpointError(
            f"Cannot save a checkpoint to {shown}: the directory holds other files and no "
            "checkpoint, and saving replaces the whole directory. Choose an empty or new "
            "path, or an existing checkpoint.",
            path=shown,
        )


@contextlib.contextmanager
def staged_directory(
    storage: Storage, target: str, checkpoint_files: Iterable[str]
) -> Iterator[str]:
    """Yield the directory to write the checkpoint into; publish it at ``target`` on exit.

    If the body raises, the staging directory is removed and ``target`` is untouched.
    """
    check_target(storage, target, checkpoint_files)
    parent, name = storage.split(target)
    if not storage.can_rename_dirs:
        storage.remove_tree(target)
        storage.makedirs(target)
        yield target
        return
    staging = storage.join(parent, f".{name}{STAGING_MARKER}{uuid.uuid4().hex[:12]}")
    storage.makedirs(staging)
    try:
        yield staging
    except BaseException:
        with contextlib.suppress(OSError):
            storage.remove_tree(staging)
        raise
    try:
        publish_staging_dir(storage, staging, target)
    except BaseException:
        with contextlib.suppress(OSError):
            storage.remove_tree(staging)
        raise


def publish_staging_dir(storage: Storage, staging: str, target: str) -> None:
    """Move the finished ``staging`` tree to ``target``, replacing what is there."""
    kind = storage.kind(target)
    if kind is None or (kind == "dir" and not storage.listdir(target)):
        try:
            storage.rename(staging, target)
            return
        except OSError:
            if storage.kind(target) is None:
                raise
            # Somebody created the target meanwhile: replace it like an old checkpoint.
    if storage.exchange(staging, target):
        storage.remove_tree(staging)  # it holds the old checkpoint now
        return
    parent, name = storage.split(target)
    old = storage.join(parent, f".{name}{_OLD_MARKER}{uuid.uuid4().hex[:12]}")
    storage.rename(target, old)
    try:
        storage.rename(staging, target)
    except BaseException:
        storage.rename(old, target)
        raise
    storage.remove_tree(old)
