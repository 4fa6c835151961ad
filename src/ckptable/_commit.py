"""Staging, durability and publishing: how a save becomes visible, all at once or not at all.

The outermost ``save_to_path`` writes the whole tree into a staging directory beside the
target (``.<name>.ckptable-staging-<token>``: same filesystem, so a rename moves it), with
every level's manifest and the root's last. Then:

1. **durable** (the default): the files and directories are flushed to disk — one
   ``syncfs(2)`` for many files (an ``fsync`` each would cost a journal commit each), an
   ``fsync`` per file and directory for few. An fsync error is final: the save fails.
2. **publish**: no target yet: one ``rename``. An existing checkpoint:
   ``renameat2(RENAME_EXCHANGE)`` swaps the two directories in one step, so a reader sees
   the old tree or the new one, never a mix and never nothing. Where the OS cannot swap,
   a two-step move (``target`` → ``.<name>.ckptable-old-<token>``, staging → ``target``)
   that the next access repairs if it was interrupted between the steps.
3. **durable**: the parent directory is flushed, so the rename itself survives a crash.
4. the old tree is removed.

A failed save removes its staging directory; the old checkpoint is untouched. A failure
after step 2 (an fsync error of the parent directory) is reported as what it is: the new
checkpoint is in place but not known to be durable.

**What may be replaced.** Only a missing path, an empty directory or a directory that
really is a checkpoint, judged from its whole listing (``check_target``): a directory
with one file of the user's in it is refused, nothing deleted.

**Leftovers.** A save holds an exclusive ``flock`` on its staging directory until it
ends; the kernel drops it when the process dies. (The directory is created under a
``.ckptable-creating-`` name, locked, then renamed, so it never shows unlocked under its
staging name.) The next save of the same target (and a
restore that finds the target missing) removes staging and creating directories nobody
holds, and moves an old tree back where a two-step publish died between its steps.
Removal never follows symlinks.

**Object stores** have no directory rename: the old checkpoint's manifest is deleted
first, the new tree is written in place, and its root manifest, written last, is the
commit record: a directory without a valid one is never restored as a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ckptable._layout import DEFAULT_CLASS_FILE, DEFAULT_METADATA_FILE
from ckptable._manifest import MANIFEST_FILE
from ckptable._storage import EntryKind, Storage
from ckptable._storage_concurrent import io_concurrency
from ckptable._storage_prefetch import TreeListing
from ckptable.errors import CheckpointError

if TYPE_CHECKING:
    from ckptable._formats import Codec

__all__ = [
    "OLD_MARKER",
    "STAGING_MARKER",
    "Staging",
    "StagingSession",
    "check_target",
    "recover_leftovers",
    "staged_directory",
]

logger = logging.getLogger("ckptable")

#: Part of the name of every staging directory.
STAGING_MARKER = ".ckptable-staging-"
#: Part of the name of an old tree moved aside by a two-step publish.
OLD_MARKER = ".ckptable-old-"
#: A staging directory for the instant between its creation and its lock.
CREATING_MARKER = ".ckptable-creating-"
#: Age after which a directory left between creation and lock counts as abandoned.
CREATING_MAX_AGE_SECONDS = 600.0
#: Above this many files, one ``syncfs`` beats an ``fsync`` per file.
SYNCFS_MIN_FILES = 32


@dataclasses.dataclass
class Staging:
    """The directory a save writes into, and what it wrote there."""

    root: str
    #: Path → (size, checksum) of every file written (filled by the save pipeline).
    files: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    #: Path → checksum of a big pickle file's skeleton (see ``_pickle_scan``).
    skeletons: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Directory → bytes of the files in its tree, once sealed (None: unknown).
    trees: dict[str, int | None] = dataclasses.field(default_factory=dict)


class StagingSession(Protocol):
    """What code outside the save pipeline (the actor layer, :mod:`ckptable.ray`) needs of
    a save in progress: where it stages, how it encodes and seals, how it names things.
    The save pipeline's session implements it; the actor layer depends only on this."""

    @property
    def storage(self) -> Storage: ...
    @property
    def staging(self) -> Staging: ...
    @property
    def codec(self) -> Codec: ...
    @property
    def target(self) -> str:
        """The checkpoint path being written, as the user will see it."""
        ...

    @property
    def algorithm(self) -> str:
        """The checksum algorithm of the manifests."""
        ...

    @property
    def transfer(self) -> Any:
        """The transfer hook for actor components (None: the default one)."""
        ...

    def describe(self, path: str) -> str:
        """Where ``path`` is, for messages: the checkpoint and the component path."""
        ...

    def component_path(self, path: str) -> str | None:
        """``"a/b"`` for a component directory in the staging tree; None for the root."""
        ...

    def seal(self, directory: str, *, rebuild: bool = False) -> None:
        """Write the manifest of a finished level."""
        ...


def check_target(storage: Storage, target: str, checkpoint_files: Iterable[str]) -> EntryKind:
    """Refuse to replace anything but a missing path, an empty directory or a checkpoint;
    returns what is there (None: nothing).

    A save replaces the whole directory, so it must really be a checkpoint, judged from
    its whole listing (``_foreign_entry``): one file of the user's beside a
    ``metadata.json`` is enough to refuse. ``checkpoint_files`` are the file names the
    saving object's levels use (metadata, class and state files).
    """
    kind = storage.kind(target)
    if kind is None:
        return None
    shown = storage.display(target)
    if kind != "dir":
        raise CheckpointError(
            f"Cannot save a checkpoint to {shown}: it exists and is not a directory.",
            path=shown,
        )
    listdir = _tree_lister(storage, target)
    entries = listdir(target)
    if not entries:
        return kind
    foreign = _foreign_entry(storage, target, entries, set(checkpoint_files), listdir)
    if foreign is not None:
        raise CheckpointError(
            f"Cannot save a checkpoint to {shown}: it is not a checkpoint "
            f"({foreign}), and saving replaces the whole directory. Nothing was changed; "
            "choose an empty or new path, or an existing checkpoint.",
            path=shown,
        )
    return kind


#: Files a checkpoint level may hold besides its class's own metadata, class and state
#: files: ckptable's manifest and manager record, and what RLlib, Tune and Ray Train
#: write beside a level.
_SIDE_FILES = frozenset(
    {
        MANIFEST_FILE,
        "checkpoint_manager.json",
        "rllib_checkpoint.json",
        ".is_checkpoint",
        ".tune_metadata",
        ".metadata.pkl",
    }
)
#: Base names of state files (any codec's suffix): ckptable's and RLlib's.
_STATE_BASES = ("state.", "algorithm_state.", "policy_state.")


def _tree_lister(storage: Storage, target: str) -> Callable[[str], dict[str, EntryKind]]:
    """``listdir`` for the tree at ``target``: on an object store (a storage that runs
    concurrent requests and lists a tree in one call), answered from one recursive
    listing, not a request per level (100 levels: 3 s at 20 ms round trip); else the
    storage's own."""
    list_tree = getattr(storage, "list_tree", None)
    if io_concurrency(storage) <= 1 or not callable(list_tree):
        return storage.listdir
    root = target.rstrip("/")
    tree = TreeListing(storage, root, list_tree(root))
    return lambda path: dict(tree.dirs.get(path.rstrip("/"), {}))


def _foreign_entry(
    storage: Storage,
    target: str,
    entries: dict[str, EntryKind],
    own_files: set[str],
    listdir: Callable[[str], dict[str, EntryKind]],
) -> str | None:
    """Why the directory ``target`` is not a checkpoint (ckptable's or RLlib's), or None.

    The top level may hold only checkpoint files (at least one class or state file, or
    a manifest) and component directories; each component directory must be a
    checkpoint level itself (it has a class or state file, or a manifest), or hold only
    such levels (RLlib's ``policies/``). Symlinks and special files are never part of a
    checkpoint. Walked without recursion: trees can be deep.
    """
    markers = own_files | {DEFAULT_CLASS_FILE}
    pending: list[tuple[str, dict[str, EntryKind], bool]] = [(target, entries, True)]
    while pending:
        directory, listing, top = pending.pop()
        files = {name for name, kind in listing.items() if kind == "file"}
        is_level = any(
            name in markers or name == MANIFEST_FILE or name.startswith(_STATE_BASES)
            for name in files
        )
        for name, kind in sorted(listing.items()):
            path = storage.join(directory, name)
            if kind not in ("file", "dir"):
                return f"{storage.display(path)} is a symlink or special file"
            if kind == "file" and top and not _checkpoint_file(name, own_files):
                return f"{storage.display(path)} is not a checkpoint file"
            if kind == "file" and not is_level:
                return f"{storage.display(path)} is in a directory that is not a checkpoint level"
        if top and not is_level:
            return "no class, state or manifest file at its top"
        for name, kind in sorted(listing.items()):
            if kind == "dir":
                path = storage.join(directory, name)
                sub = listdir(path)
                if not sub:
                    continue
                pending.append((path, sub, False))
    return None


def _checkpoint_file(name: str, own_files: set[str]) -> bool:
    return (
        name in own_files
        or name in _SIDE_FILES
        or name in (DEFAULT_METADATA_FILE, DEFAULT_CLASS_FILE)
        or name.startswith(_STATE_BASES)
    )


@contextlib.contextmanager
def staged_directory(
    storage: Storage, target: str, checkpoint_files: Iterable[str], *, durable: bool
) -> Iterator[Staging]:
    """Yield where to write the checkpoint; make it durable and publish it at ``target``
    when the body returns.

    If anything fails, the staging directory is removed and ``target`` is untouched.
    """
    found = check_target(storage, target, checkpoint_files)
    if not storage.can_rename_dirs:
        yield from _in_place(storage, target, existed=found is not None)
        return
    recover_leftovers(storage, target)
    parent, name = storage.split(target)
    if parent and storage.kind(parent, follow_symlinks=True) != "dir":
        storage.makedirs(parent)
    token, staging, lock = _create_staging(storage, parent, name)
    try:
        try:
            yield staging
            if durable:
                _make_durable(storage, staging)
            _publish(storage, staging.root, target, token, durable=durable)
        except _PublishedNotDurable as published:
            if published.replaced is not None:
                _remove_quietly(storage, published.replaced)
            shown = storage.display(target)
            before = (
                "it replaced the checkpoint that was there"
                if published.replaced is not None
                else "nothing was there before"
            )
            raise CheckpointError(
                f"The new checkpoint is published at {shown} ({before}), but flushing its "
                f"directory to disk failed ({published.error}): it is not known to survive "
                "a crash or power loss. Save again (or check the disk) before relying on it.",
                path=shown,
            ) from published.error
        except BaseException:
            with contextlib.suppress(OSError):
                storage.remove_tree(staging.root)
            raise
    finally:
        storage.unlock(lock)


class _PublishedNotDurable(Exception):
    """The new tree is at the target, but the flush of the rename failed; ``replaced``:
    where the tree it replaced is now (None: it replaced nothing)."""

    def __init__(self, error: OSError, replaced: str | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.replaced = replaced


def _in_place(storage: Storage, target: str, *, existed: bool) -> Iterator[Staging]:
    """Object stores: invalidate the old checkpoint (its manifest first), write in place.
    The root manifest the save writes last is the commit record.

    ``existed``: whether ``check_target`` found anything at ``target``; a new path has
    nothing to remove (each check there is a request or two: 50 ms at 20 ms round trip).
    The old checkpoint is gone from the start, so an error says so (not that what was
    there is unchanged)."""
    if existed:
        with contextlib.suppress(FileNotFoundError):
            storage.remove_tree(storage.join(target, MANIFEST_FILE))
        storage.remove_tree(target)
    storage.makedirs(target)
    try:
        yield Staging(target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            storage.remove_tree(target)
        if not existed or not isinstance(exc, (OSError, CheckpointError)):
            raise
        shown = storage.display(target)
        note = (
            f"The checkpoint that was at {shown} before was removed when this save began "
            "(object stores are written in place), so none is there now."
        )
        if isinstance(exc, CheckpointError):
            exc.args = (f"{exc.args[0] if exc.args else ''} {note}".strip(), *exc.args[1:])
            raise
        raise CheckpointError(
            f"Saving the checkpoint {shown} failed: {exc}. {note}", path=shown
        ) from exc


def _make_durable(storage: Storage, staging: Staging) -> None:
    """Flush every file and directory of the staged tree to disk before it is published."""
    files = list(staging.files)
    if len(files) >= SYNCFS_MIN_FILES and storage.syncfs(staging.root):
        return
    directories = {storage.split(path)[0] for path in files} | {staging.root}
    for path in files:
        storage.fsync(path)
    # Deepest first: a directory's entry in its parent is flushed after its contents.
    for path in sorted(directories, key=lambda p: p.count("/"), reverse=True):
        storage.fsync(path)


def _publish(storage: Storage, staging: str, target: str, token: str, *, durable: bool) -> None:
    """Move the finished ``staging`` tree to ``target``, replacing what is there.

    Once the new tree is in place, a failure to flush the parent directory raises
    ``_PublishedNotDurable`` (the caller says so: the save is visible, not durable).
    """
    parent, name = storage.split(target)
    kind = storage.kind(target)
    if kind is None or (kind == "dir" and not storage.listdir(target)):
        try:
            storage.rename(staging, target)
        except OSError:
            if storage.kind(target) is None:
                raise
            # Somebody created the target meanwhile: replace it like an old checkpoint,
            # if it is one.
            check_target(storage, target, ())
        else:
            _flush_published(storage, parent, None, durable=durable)
            return
    if storage.exchange(staging, target):
        replaced = staging  # it holds the old checkpoint now
    else:
        replaced = storage.join(parent, f".{name}{OLD_MARKER}{token}")
        storage.rename(target, replaced)
        try:
            storage.rename(staging, target)
        except BaseException as exc:
            try:
                storage.rename(replaced, target)
            except OSError:
                shown = storage.display(target)
                raise CheckpointError(
                    f"Publishing the checkpoint {shown} failed ({exc}) after the old one was "
                    f"moved aside to {storage.display(replaced)}, and moving it back failed "
                    "too: the next save or restore of this path moves it back.",
                    path=shown,
                ) from exc
            raise
    _flush_published(storage, parent, replaced, durable=durable)
    _remove_quietly(storage, replaced)


def _flush_published(storage: Storage, parent: str, replaced: str | None, *, durable: bool) -> None:
    if not durable:
        return
    try:
        storage.fsync(parent)
    except OSError as exc:
        raise _PublishedNotDurable(exc, replaced) from exc


def _remove_quietly(storage: Storage, path: str) -> None:
    """Remove a tree nobody needs any more; a failure leaves a leftover the next save
    cleans, never an error (the checkpoint is published)."""
    try:
        storage.remove_tree(path)
    except FileNotFoundError:
        pass  # a concurrent save's leftover scan removed it first
    except OSError as exc:
        logger.warning("Could not remove %s (%s); the next save will.", path, exc)


#: A new staging directory is tried this often if concurrent leftover scans keep
#: removing it before it is locked (each scan removes only unlocked, empty ones).
_CREATE_ATTEMPTS = 5


def _create_staging(storage: Storage, parent: str, name: str) -> tuple[str, Staging, object]:
    """Create, lock and rename into place a new staging directory: its token, the
    staging and the lock.

    It is created as ``.<name>.ckptable-creating-<token>``, locked, then renamed, so a
    leftover scan never sees a staging directory before its lock (the lock belongs to
    the directory, not the name). A scan removes creating directories nobody holds
    (a save killed between mkdir and lock leaves one); if it removes ours in the
    instant before we locked it, the rename fails and a new one is made.
    """
    for attempt in range(_CREATE_ATTEMPTS):
        token = uuid.uuid4().hex[:16]
        staging = Staging(storage.join(parent, f".{name}{STAGING_MARKER}{token}"))
        creating = storage.join(parent, f".{name}{CREATING_MARKER}{token}")
        storage.mkdir(creating)
        lock = None
        try:
            lock = _lock_if_supported(storage, creating)
            storage.rename(creating, staging.root)
        except FileNotFoundError:
            storage.unlock(lock)
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
            continue
        except BaseException:
            storage.unlock(lock)
            with contextlib.suppress(OSError):
                storage.remove_tree(creating)
            raise
        return token, staging, lock
    raise AssertionError("unreachable")


def _lock_if_supported(storage: Storage, path: str) -> object:
    """Lock ``path``. Where the filesystem has no locks (ENOLCK, ENOTSUP, ...), the save
    goes on without one: its leftovers are then never taken for abandoned ones, only
    those of crashed saves that had a lock."""
    try:
        return storage.lock_directory(path)
    except FileNotFoundError:
        raise  # removed by a leftover scan before we locked it: the caller retries
    except OSError:
        return None


def recover_leftovers(storage: Storage, target: str) -> None:
    """Repair and clean what crashed saves of ``target`` left beside it.

    - ``.<name>.ckptable-old-<token>`` with no ``target``: a two-step publish died between
      its steps; the old checkpoint is moved back. With a ``target``, it is garbage.
    - ``.<name>.ckptable-staging-<token>`` that no process holds: removed.

    Directories of a save still in progress (its staging lock is held) are left alone.
    """
    parent, name = storage.split(target)
    try:
        entries = storage.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    staging_prefix, old_prefix = f".{name}{STAGING_MARKER}", f".{name}{OLD_MARKER}"
    creating_prefix = f".{name}{CREATING_MARKER}"
    prefixes = (staging_prefix, old_prefix, creating_prefix)
    if not any(e.startswith(prefixes) for e in entries):
        return
    for entry in sorted(e for e in entries if e.startswith(old_prefix)):
        old = storage.join(parent, entry)
        sibling = staging_prefix + entry[len(old_prefix) :]
        if sibling in entries and not storage.is_abandoned(storage.join(parent, sibling)):
            continue  # its save is between the two renames right now
        if storage.kind(target) is None and entries[entry] == "dir":
            logger.warning("Repairing %s from an interrupted save.", storage.display(target))
            with contextlib.suppress(FileNotFoundError):  # another process repaired it
                storage.rename(old, target)
        else:
            _remove_quietly(storage, old)
    for entry in sorted(e for e in entries if e.startswith(staging_prefix)):
        path = storage.join(parent, entry)
        if storage.is_abandoned(path):
            _remove_quietly(storage, path)
    for entry in sorted(e for e in entries if e.startswith(creating_prefix)):
        # Empty by construction (a save writes only after the rename to staging):
        # removed if nobody holds it, or, where locks do not exist, once it is old.
        path = storage.join(parent, entry)
        if storage.is_abandoned(path) or storage.age_seconds(path) > CREATING_MAX_AGE_SECONDS:
            _remove_quietly(storage, path)
