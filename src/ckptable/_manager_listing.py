"""Reading a manager's directory: the step every save, restore and ``reload`` starts with.

The manager keeps no index: what it lists is what the directory holds, read again here
(see :mod:`ckptable.manager`). A reading

1. completes or clears what killed saves left beside their checkpoints
   (``ckptable._commit.recover_leftovers``),
2. lists each ``checkpoint_<step>`` directory that is complete (its root manifest reads
   and lists exactly what is there, and its record names its step) as an ``Entry``, and
   reports every other one as invalid, with the reason, never listing it,
3. finishes, when asked (``cleanup``), the deletions that a killed process left: hidden
   ``.checkpoint_<step>.ckptable-deleting-<token>`` trees and directories holding the
   deletion marker, which ``ckptable._manager_retention`` writes.

It also holds the names on disk (``Layout``) that the other steps spell paths with,
``survey_directory``: the same reading for ``ckptable info`` of a manager's directory,
which changes nothing on disk and says why each unlisted checkpoint is not listed, and
the one rule that tells a manager's directory from a checkpoint
(``looks_like_manager_directory``) with the error every reader of checkpoints raises for
one (``manager_directory_error``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping, Set
from typing import Any

from ckptable._commit import CREATING_MARKER, OLD_MARKER, STAGING_MARKER, recover_leftovers
from ckptable._layout import loads_json
from ckptable._manifest import MANIFEST_FILE, check_listing, read_manifest, read_verified
from ckptable._storage import EntryKind, Storage
from ckptable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

__all__ = [
    "CHECKPOINT_PREFIX",
    "DELETING_INFIX",
    "DELETING_MARKER",
    "RECORD_FILE",
    "Entry",
    "Layout",
    "Listing",
    "Survey",
    "Unlisted",
    "check_sizes",
    "empty_directory_error",
    "holds_checkpoint_files",
    "is_gone",
    "looks_like_manager_directory",
    "manager_directory_error",
    "read_directory",
    "survey_directory",
]

logger = logging.getLogger("ckptable")

#: Checkpoint directories are named ``checkpoint_<step>`` (zero-padded to 6 digits).
CHECKPOINT_PREFIX = "checkpoint_"
#: The manager's record inside each checkpoint: its step, metrics and save time.
RECORD_FILE = "checkpoint_manager.json"
_STEP_DIGITS = 6
_NAME_PATTERN = re.compile(r"checkpoint_(\d+)")
#: A checkpoint being deleted is renamed to ``.checkpoint_<step>.ckptable-deleting-<token>``
#: (local disks) or holds this marker file (object stores).
DELETING_MARKER = ".ckptable-deleting"
DELETING_INFIX = ".ckptable-deleting-"
#: What an interrupted save of ``checkpoint_<step>`` leaves beside it (see ``_commit``).
_LEFTOVER_PATTERN = re.compile(
    r"\.(checkpoint_\d+)(?:"
    + "|".join(re.escape(m) for m in (STAGING_MARKER, OLD_MARKER, CREATING_MARKER))
    + ")"
)


def _name_of(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:0{_STEP_DIGITS}d}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a manager's checkpoints are, and how their paths are spelled."""

    storage: Storage
    #: The directory, as ``storage`` spells it.
    root: str
    #: Paths given to the user are in their filesystem's terms (what ``save_to_path``
    #: returns then), not local paths or URIs.
    paths_in_filesystem: bool

    def name(self, step: int) -> str:
        """The directory name of ``step``'s checkpoint."""
        return _name_of(step)

    def location(self, step: int) -> str:
        """``step``'s checkpoint directory, as ``storage`` spells it."""
        return self.storage.join(self.root, self.name(step))

    def path(self, step: int, *component: str) -> str:
        """A checkpoint's path as the user spells it: with their filesystem, a path in
        its terms (what ``save_to_path`` returns then); else a local path or a URI."""
        path = self.storage.join(self.root, self.name(step), *component)
        return path if self.paths_in_filesystem else self.storage.display(path)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One listed checkpoint."""

    step: int
    metrics: dict[str, Any] | None
    saved_at: float | None
    #: ``Storage.identity`` of its directory when it was read (None: cannot tell), so that
    #: a later listing re-reads only checkpoints that changed.
    identity: Any = dataclasses.field(default=None, compare=False)
    #: The metric and mode of the manager that saved it (None: none recorded).
    metric: str | None = None
    mode: str | None = None


@dataclasses.dataclass
class Listing:
    """What a manager knows of its directory, from its last reading (and the restores
    since)."""

    #: The valid checkpoints by step.
    entries: dict[int, Entry] = dataclasses.field(default_factory=dict)
    #: Directories named like checkpoints that are not listed: path → reason.
    invalid: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Checkpoints that listed as valid but failed to restore: path → (identity of the
    #: directory then, reason). Not listed again until the directory changes.
    corrupt: dict[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)

    def mark_corrupt(self, step: int, path: str, identity: Any, reason: str) -> None:
        """Unlist a checkpoint that failed to restore, until its directory changes."""
        self.entries.pop(step, None)
        self.invalid[path] = reason
        self.corrupt[path] = (identity, reason)


class _BeingDeleted(Exception):
    """A checkpoint directory holding the deletion marker."""


def read_directory(
    layout: Layout, last: Listing, *, deleting: Set[str], cleanup: bool, reread: bool
) -> Listing:
    """Read the directory into a new listing (warning of each newly invalid checkpoint).

    Args:
        last: The previous listing: its entries are kept where their directory has not
            changed (unless ``reread``), and its corrupt checkpoints stay invalid.
        deleting: Hidden names of the deletions this manager is carrying out right now
            (left alone by ``cleanup``).
        cleanup: Also finish deletions that a killed process left (only while the
            directory lock is held, so as not to race a deletion in progress).
        reread: Read every checkpoint's record again; else a checkpoint read before
            whose directory has not changed keeps its entry.
    """
    storage = layout.storage
    listing = _recover_interrupted_saves(layout)
    entries: dict[int, Entry] = {}
    invalid: dict[str, str] = {}
    for name, kind in sorted(listing.items()):
        if name.startswith("." + CHECKPOINT_PREFIX) and DELETING_INFIX in name:
            if cleanup and name not in deleting:
                _remove_quietly(storage, storage.join(layout.root, name))
            continue
        match = _NAME_PATTERN.fullmatch(name)
        if match is None or kind != "dir":
            continue
        step = int(match.group(1))
        if name != layout.name(step):
            continue  # not a name this manager writes (checkpoint_5 for step 5)
        path, directory = layout.path(step), storage.join(layout.root, name)
        identity = storage.identity(directory)
        corrupt = last.corrupt.get(path)
        if corrupt is not None and corrupt[0] == identity:
            invalid[path] = corrupt[1]
            continue
        known = last.entries.get(step)
        if not reread and known is not None and known.identity == identity:
            entries[step] = known
            continue
        try:
            entries[step] = _read_entry(layout, step, identity)
        except _BeingDeleted:
            if cleanup:
                _remove_quietly(storage, directory)
        except (CheckpointError, OSError, ValueError) as exc:
            invalid[path] = str(exc)
    for path in sorted(set(invalid) - set(last.invalid)):
        logger.warning("Not listing %s: %s", path, invalid[path])
    return Listing(entries, invalid, {p: c for p, c in last.corrupt.items() if p in invalid})


def _recover_interrupted_saves(layout: Layout) -> dict[str, EntryKind]:
    """The directory's names, once what saves killed midway left is dealt with: a
    two-step publish is completed (or its old tree moved back) before the listing, and
    abandoned staging trees go. Safe beside saves in progress (their staging directories
    are locked)."""
    storage = layout.storage
    listing = _list_root(layout)
    leftovers = {_LEFTOVER_PATTERN.match(name) for name in listing} - {None}
    if leftovers:
        for target in sorted({m.group(1) for m in leftovers if m is not None}):
            recover_leftovers(storage, storage.join(layout.root, target))
        listing = _list_root(layout)
    return listing


def _list_root(layout: Layout) -> dict[str, EntryKind]:
    try:
        return dict(layout.storage.listdir(layout.root))
    except FileNotFoundError:  # an object store "directory" with nothing in it yet
        return {}


def _read_entry(layout: Layout, step: int, identity: Any, *, sizes: bool = False) -> Entry:
    """The listed form of ``checkpoint_<step>``, if it is complete (see the module doc).
    ``sizes``: also compare the size of every file of every level with its manifest
    (a stat a file: ``ckptable ls``; a manager's own listing does not, its restores
    verify)."""
    storage = layout.storage
    directory = layout.location(step)
    entries = storage.listdir(directory)
    if DELETING_MARKER in entries:
        raise _BeingDeleted
    if MANIFEST_FILE not in entries:
        raise CorruptCheckpointError(
            f"{storage.display(directory)} has no manifest: its save did not finish (or "
            "is still running elsewhere).",
            path=storage.display(directory),
        )
    manifest = read_manifest(storage, directory)
    check_listing(storage, directory, manifest, entries)
    if sizes:
        check_sizes(storage, directory, manifest)
    if RECORD_FILE not in manifest.files:
        return Entry(step, None, None, identity)  # saved into place by other means
    record_path = storage.join(directory, RECORD_FILE)
    raw = read_verified(
        storage, record_path, manifest.files[RECORD_FILE], manifest.algorithm, keep=True
    )
    record = loads_json(raw or b"")
    if not isinstance(record, dict) or record.get("step") != step:
        raise CorruptCheckpointError(
            f"{storage.display(record_path)} is not the record of step {step} "
            f"(it says {record.get('step') if isinstance(record, dict) else record!r}): "
            "the directory was renamed or copied from elsewhere.",
            path=storage.display(record_path),
        )
    metrics = record.get("metrics")
    saved_at = record.get("saved_at")
    metric, mode = record.get("metric"), record.get("mode")
    return Entry(
        step,
        metrics if isinstance(metrics, dict) else None,
        float(saved_at) if isinstance(saved_at, (int, float)) and _is_time(saved_at) else None,
        identity,
        metric if isinstance(metric, str) else None,
        mode if mode in ("max", "min") else None,
    )


def check_sizes(storage: Storage, directory: str, manifest: Any) -> None:
    """Every file of the checkpoint at ``directory`` (whose root ``manifest`` was read and
    whose root listing was checked) has the size its manifest records, and every level
    below lists what its manifest lists: a stat a file and one small read a level, no
    checksum (``ckptable verify`` reads everything).

    Raises:
        CorruptCheckpointError: naming the first file or level that differs.
    """
    pending: list[tuple[str, Any]] = [(directory, manifest)]
    while pending:
        level, record = pending.pop()
        for name, (size, _digest) in sorted(record.files.items()):
            path = storage.join(level, name)
            actual = storage.size(path)
            if actual != size:
                shown = storage.display(path)
                raise CorruptCheckpointError(
                    f"{shown} is {actual} bytes, but the checkpoint's manifest records "
                    f"{size}: it was changed (truncated, appended to or replaced) after "
                    "the save.",
                    path=shown,
                )
        for name, digest in sorted(record.dirs.items(), reverse=True):
            child = storage.join(level, name)
            child_manifest = read_manifest(storage, child, (record.algorithm, digest))
            check_listing(storage, child, child_manifest, storage.listdir(child))
            pending.append((child, child_manifest))


def _is_time(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _remove_quietly(storage: Storage, path: str) -> None:
    try:
        storage.remove_tree(path)
    except FileNotFoundError:
        pass  # another process finished it first
    except OSError as exc:
        logger.warning("Could not finish deleting %s: %s", storage.display(path), exc)


def is_gone(layout: Layout, step: int) -> bool:
    """Whether ``checkpoint_<step>`` has no directory any more."""
    try:
        return layout.storage.kind(layout.location(step)) != "dir"
    except OSError:
        return False


# --------------------------------------------------------------------------- survey

#: Files whose presence makes a directory a checkpoint level rather than a manager's
#: directory (``ckptable._layout``'s defaults, RLlib's metadata file and the manifest).
_CHECKPOINT_FILES = frozenset(
    {"metadata.json", "rllib_checkpoint.json", "class_and_ctor_args.pkl", MANIFEST_FILE}
)
_HIDDEN_PATTERN = re.compile(r"\.checkpoint_\d+\.ckptable-")


@dataclasses.dataclass(frozen=True)
class Unlisted:
    """A directory named like a checkpoint that a manager does not list."""

    step: int
    path: str
    #: ``"incomplete"`` (no manifest: its save did not finish, or still runs),
    #: ``"corrupt"`` (anything else wrong) or ``"deleting"`` (a deletion under way).
    status: str
    reason: str
    #: What its record says, where the record reads and names this step (else None).
    metrics: dict[str, Any] | None = None
    saved_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Survey:
    """A manager's directory as ``survey_directory`` read it."""

    #: The valid checkpoints by step (what a manager would list).
    entries: dict[int, Entry]
    #: The other directories named like checkpoints, by step.
    unlisted: dict[int, Unlisted]
    #: Hidden names that saves or deletions left (or are using right now).
    leftovers: list[str]


def holds_checkpoint_files(entries: Mapping[str, EntryKind]) -> bool:
    """Whether a directory listing is that of a checkpoint level (its metadata, class
    file or manifest is there)."""
    return any(entries.get(name) == "file" for name in _CHECKPOINT_FILES)


def looks_like_manager_directory(
    storage: Storage, root: str, entries: Mapping[str, EntryKind] | None = None
) -> bool:
    """Whether ``root`` is a ``CheckpointManager``'s directory: it holds no checkpoint
    files of its own, and at least one ``checkpoint_<step>`` directory (complete or
    not) or what a save or deletion of one leaves (``.checkpoint_<step>.ckptable-...``),
    named as a manager names them. ``entries``: ``root``'s listing, if read already.

    The one rule for every reader (restore, ``from_checkpoint``, ``ckptable info``,
    ``ls``, ``verify``, ``convert``, ``diff``). A manager writes nothing into its
    directory before its first save (its lock is a ``flock`` on the directory itself),
    so a new manager's directory is an empty directory: see ``empty_directory_error``.
    """
    if entries is None:
        try:
            entries = storage.listdir(root)
        except (FileNotFoundError, NotADirectoryError):
            return False
    if holds_checkpoint_files(entries):
        return False
    for name, kind in entries.items():
        match = _NAME_PATTERN.fullmatch(name)
        if match is not None and kind == "dir" and name == _name_of(int(match.group(1))):
            return True
        if _HIDDEN_PATTERN.match(name):
            return True
    return False


def survey_directory(layout: Layout) -> Survey:
    """Read a manager's directory as ``read_directory`` does, without changing anything
    (no recovery of interrupted saves, no deletion finished): what is listed, what is
    not and why, and what saves or deletions left. For ``ckptable info``: it may run
    beside a training process."""
    storage = layout.storage
    entries: dict[int, Entry] = {}
    unlisted: dict[int, Unlisted] = {}
    leftovers: list[str] = []
    for name, kind in sorted(_list_root(layout).items()):
        if _HIDDEN_PATTERN.match(name):
            leftovers.append(name)
            continue
        match = _NAME_PATTERN.fullmatch(name)
        if match is None or kind != "dir" or name != layout.name(int(match.group(1))):
            continue
        step = int(match.group(1))
        path, directory = layout.path(step), layout.location(step)
        try:
            entries[step] = _read_entry(layout, step, None, sizes=True)
        except _BeingDeleted:
            unlisted[step] = Unlisted(step, path, "deleting", "a deletion is under way")
        except (CheckpointError, OSError, ValueError) as exc:
            try:
                complete = MANIFEST_FILE in storage.listdir(directory)
            except OSError:
                complete = True
            metrics, saved_at = _unverified_record(storage, directory, step)
            unlisted[step] = Unlisted(
                step,
                path,
                "corrupt" if complete else "incomplete",
                str(exc),
                metrics,
                saved_at,
            )
    return Survey(entries, unlisted, leftovers)


#: A record file bigger than this is not read for ``ckptable ls``'s damaged entries.
_MAX_RECORD_BYTES = 1 << 20


def _unverified_record(
    storage: Storage, directory: str, step: int
) -> tuple[dict[str, Any] | None, float | None]:
    """The metrics and save time in the record of a damaged or unfinished checkpoint,
    read without its manifest; (None, None) unless it reads and names ``step``."""
    path = storage.join(directory, RECORD_FILE)
    try:
        if storage.kind(path) != "file" or storage.size(path) > _MAX_RECORD_BYTES:
            return None, None
        record = loads_json(storage.read_bytes(path))
    except (CheckpointError, OSError, ValueError):
        return None, None
    if not isinstance(record, dict) or record.get("step") != step:
        return None, None
    metrics, saved_at = record.get("metrics"), record.get("saved_at")
    return (
        metrics if isinstance(metrics, dict) else None,
        float(saved_at) if isinstance(saved_at, (int, float)) and _is_time(saved_at) else None,
    )


# --------------------------------------------------------------------------- refusals

#: How many of a manager's steps a message lists.
_STEPS_SHOWN = 5
#: How many checkpoints, newest first, a message checks for the newest sound one.
_STEPS_CHECKED = 20


def quick_check(storage: Storage, directory: str) -> str | None:
    """Why the checkpoint at ``directory`` is not known sound, or None: its root manifest
    is there and reads, and every level holds exactly the files its manifest lists, each
    of the recorded size (no checksums)."""
    try:
        entries = storage.listdir(directory)
        if DELETING_MARKER in entries:
            return "a deletion is under way"
        if MANIFEST_FILE not in entries:
            return (
                "no manifest: its save did not finish (or is still running, or it was "
                "not written by ckptable)"
            )
        manifest = read_manifest(storage, directory)
        check_listing(storage, directory, manifest, entries)
        check_sizes(storage, directory, manifest)
    except (CheckpointError, OSError, ValueError) as exc:
        return str(exc)
    return None


def manager_directory_error(
    storage: Storage,
    root: str,
    todo: Callable[[str | None], str],
    *,
    entries: Mapping[str, EntryKind] | None = None,
) -> CheckpointNotFoundError | None:
    """The error for a ``CheckpointManager``'s directory given where a checkpoint is
    expected, or None if ``root`` is not one (``looks_like_manager_directory``).

    It names the steps there and the newest checkpoint that is complete and not known
    damaged (``quick_check``), or says that none is complete yet.

    Args:
        todo: What the caller's user should do instead, given the newest sound
            checkpoint's path (None: none is sound).
        entries: ``root``'s listing, if read already.
    """
    try:
        if entries is None:
            entries = storage.listdir(root)
        if not looks_like_manager_directory(storage, root, entries):
            return None
    except OSError:
        return None
    shown = storage.display(root)
    steps = sorted(
        (int(match.group(1)), name)
        for name, kind in entries.items()
        if kind == "dir"
        and (match := _NAME_PATTERN.fullmatch(name)) is not None
        and name == _name_of(int(match.group(1)))
    )
    newest: str | None = None
    skipped: list[str] = []
    for _step, name in reversed(steps[-_STEPS_CHECKED:]):
        reason = quick_check(storage, storage.join(root, name))
        if reason is None:
            newest = storage.display(storage.join(root, name))
            break
        skipped.append(f"{name}: {' '.join(reason.split())}")
    listing = f"('ckptable ls {shown}' lists them with their status and metrics)"
    not_sound = ""
    if skipped:
        more = " (and more)" if len(skipped) > 2 else ""
        not_sound = f" Not complete or damaged: {'; '.join(skipped[:2])}{more}."
    if newest is None:
        if steps:
            held = f"{len(steps)} checkpoint_<step> director{'y' if len(steps) == 1 else 'ies'}"
            what = f"it holds {held} {listing} but none is a complete checkpoint."
        else:
            leftovers = sorted(name for name in entries if _HIDDEN_PATTERN.match(name))
            what = (
                f"it holds only what a save in progress or interrupted leaves "
                f"({', '.join(leftovers[:2])}{' ...' if len(leftovers) > 2 else ''})."
            )
        return CheckpointNotFoundError(
            f"{shown} is a CheckpointManager directory with no complete checkpoint yet, "
            f"not a checkpoint: {what}{not_sound} {todo(None)}".rstrip(),
            path=shown,
        )
    listed = ", ".join(str(step) for step, _ in steps[-_STEPS_SHOWN:])
    more = " (and older ones)" if len(steps) > _STEPS_SHOWN else ""
    return CheckpointNotFoundError(
        f"{shown} is a CheckpointManager directory, not a checkpoint: it holds "
        f"checkpoint_<step> directories of steps {listed}{more} {listing}; "
        f"the newest complete one is {newest}.{not_sound} {todo(newest)}".rstrip(),
        path=shown,
    )


def empty_directory_error(
    storage: Storage, root: str, entries: Mapping[str, EntryKind]
) -> CheckpointNotFoundError | None:
    """The error for an empty directory given where a checkpoint is expected (a new
    ``CheckpointManager``'s directory looks so too), or None if ``root`` holds
    anything."""
    if entries:
        return None
    shown = storage.display(root)
    return CheckpointNotFoundError(
        f"No checkpoint at {shown}: it is an empty directory (a CheckpointManager's "
        "directory is empty until its first save completes).",
        path=shown,
    )
