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

It also holds the names on disk (``Layout``) that the other steps spell paths with, and
``survey_directory``: the same reading for ``ckptable info`` of a manager's directory,
which changes nothing on disk and says why each unlisted checkpoint is not listed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Set
from typing import Any

from ckptable._commit import CREATING_MARKER, OLD_MARKER, STAGING_MARKER, recover_leftovers
from ckptable._layout import loads_json
from ckptable._manifest import MANIFEST_FILE, check_listing, read_manifest, read_verified
from ckptable._storage import EntryKind, Storage
from ckptable.errors import CheckpointError, CorruptCheckpointError

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
    "holds_checkpoint_files",
    "is_gone",
    "looks_like_manager_directory",
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


def _read_entry(layout: Layout, step: int, identity: Any) -> Entry:
    """The listed form of ``checkpoint_<step>``, if it is complete (see the module doc)."""
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


def looks_like_manager_directory(storage: Storage, root: str) -> bool:
    """Whether ``root`` is a ``CheckpointManager``'s directory: it holds no checkpoint
    files of its own, and at least one ``checkpoint_<step>`` directory (or what a save
    or deletion of one leaves) named as a manager names them."""
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
            entries[step] = _read_entry(layout, step, None)
        except _BeingDeleted:
            unlisted[step] = Unlisted(step, path, "deleting", "a deletion is under way")
        except (CheckpointError, OSError, ValueError) as exc:
            try:
                complete = MANIFEST_FILE in storage.listdir(directory)
            except OSError:
                complete = True
            unlisted[step] = Unlisted(step, path, "corrupt" if complete else "incomplete", str(exc))
    return Survey(entries, unlisted, leftovers)
