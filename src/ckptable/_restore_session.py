"""What the steps of a restore share: the options, the session, and a read level.

:mod:`ckptable._restore` runs the pipeline; :mod:`ckptable._restore_read` (step 1),
:mod:`ckptable._restore_decode` (step 2) and :mod:`ckptable._restore_apply` (step 3)
pass these between them.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import warnings
from typing import TYPE_CHECKING, Any

from ckptable._formats import Codec
from ckptable._layout import (
    record_of,
)
from ckptable._pickle_scan import ScannedPickle
from ckptable._storage import Storage
from ckptable._torch_placement import TensorPlacement, check_map_location
from ckptable.errors import (
    UnverifiedCheckpointWarning,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "KEEP_TOTAL_BYTES",
    "AppliedLevel",
    "Level",
    "RestoreOptions",
    "RestoreSession",
    "current_restore",
    "non_default_options",
]

logger = logging.getLogger("ckptable")


@dataclasses.dataclass
class Level:
    """One checkpoint level, read and decoded, with the levels below it."""

    path: str
    metadata: dict[str, Any] | None
    state: Any
    children: dict[str, Level]
    #: Names of all subdirectories (components that appear late are looked up here).
    subdirs: frozenset[str] = frozenset()
    #: True if the level could not be read ahead (its file names are known only to the
    #: component that appears during the parent's ``set_state``); it is read then.
    deferred: bool = False
    #: The state file and its codec (decoded in step 2).
    state_file: str = ""
    codec: Codec | None = None
    #: The state file's bytes if step 1 read and kept them (small files), or its pickle
    #: split into skeleton and big payloads (big files: see ``_pickle_scan``).
    raw_state: bytes | memoryview | ScannedPickle | None = None
    #: Read for a component the object does not have (yet): a decode failure defers it.
    read_ahead: bool = False
    #: ``upgrade_state`` has run on ``state`` (or was not needed).
    upgraded: bool = False
    #: Its files were verified against a manifest in step 1 (and counted as read then).
    verified: bool = False
    #: The state file's manifest record ``((size, checksum), algorithm)`` where step 1
    #: left its check to step 2, which checksums it as it decodes it (one read; see
    #: ``_formats.decodes_untrusted``).
    check_when_decoded: tuple[tuple[int, str], str] | None = None

    @property
    def record(self) -> dict[str, Any] | None:
        """ckptable's record in ``metadata.json``; None for levels RLlib wrote."""
        return record_of(self.metadata)


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """How a restore reads: ``verify`` against manifests, ``safe`` restricted decoding,
    ``mmap`` big arrays mapped from their files instead of read; for components held by
    Ray actors, the ``transfer`` hook and what ``on_actor_failure`` does; whether to
    show a ``progress`` bar; whether to ``rollback`` the levels applied when a later
    ``set_state`` fails; where torch tensors go (``map_location``, see
    :class:`ckptable._torch_placement.TensorPlacement`)."""

    verify: bool = True
    safe: bool = False
    mmap: bool = False
    transfer: Any = None
    on_actor_failure: str = "raise"
    progress: bool | None = None
    rollback: bool = False
    map_location: Any = None

    def __post_init__(self) -> None:
        check_map_location(self.map_location)
        if self.on_actor_failure not in ("raise", "mark_unhealthy"):
            raise ValueError(
                f"on_actor_failure must be 'raise' or 'mark_unhealthy', not "
                f"{self.on_actor_failure!r}."
            )

    def for_actors(self) -> dict[str, Any]:
        """The options a ckptable actor restores itself with (the non-default ones that
        concern reading; the hook and failure policy are the caller's)."""
        return {
            name: value
            for name, value in non_default_options(self).items()
            if name in ("verify", "safe", "mmap", "map_location")
        }


#: Step 1 keeps files up to this size in memory for step 2 (saving a second read) ...
_KEEP_FILE_BYTES = 16 << 20
#: ... and up to this much per restore in all.
KEEP_TOTAL_BYTES = 256 << 20


@dataclasses.dataclass
class AppliedLevel:
    """A level ``set_state`` was called on: the object, and its own state from before
    (taken only with ``rollback=True``)."""

    obj: Any
    path: str
    previous: dict[str, Any] | None


@dataclasses.dataclass
class RestoreSession:
    storage: Storage
    kwargs: dict[str, Any]
    options: RestoreOptions = RestoreOptions()
    prepared: dict[str, Level] = dataclasses.field(default_factory=dict)
    #: Levels without a manifest (written by RLlib), restored unverified.
    unverified: list[str] = dataclasses.field(default_factory=list)
    #: Classes of the objects being restored: their instances may appear in states.
    allowed: set[type] = dataclasses.field(default_factory=set)
    keep_budget: int = KEEP_TOTAL_BYTES
    #: Levels of actor components already restored (before the first ``set_state``).
    actors_restored: set[str] = dataclasses.field(default_factory=set)
    #: The checkpoint's root directory (component paths in messages are relative to it).
    root: str = ""
    #: Every level whose ``set_state`` was called, in order, with its state from before
    #: (``None`` where ``rollback`` is off: then only the count and names matter).
    applied: list[AppliedLevel] = dataclasses.field(default_factory=list)
    #: Where the restore's torch tensors go, and how many had to move to the CPU
    #: (made on first use: :meth:`tensor_placement`).
    tensors: TensorPlacement | None = None

    def tensor_placement(self) -> TensorPlacement:
        """The restore's :class:`TensorPlacement` (``options.map_location``)."""
        if self.tensors is None:
            self.tensors = TensorPlacement(self.options.map_location)
        return self.tensors

    def warn_moved_tensors(self) -> None:
        """One ``UserWarning`` if tensors went to the CPU because a device is missing."""
        if self.tensors is not None:
            self.tensors.warn(stacklevel=4)

    def component_of(self, directory: str) -> str | None:
        """``"a/b"`` for a level below the root; None for the root (or elsewhere)."""
        prefix = self.storage.join(self.root, "") if self.root else None
        if prefix and directory.startswith(prefix):
            return directory[len(prefix) :] or None
        return None

    def keep(self, size: int) -> bool:
        """Whether to keep a verified file's bytes for decoding (within the budget)."""
        if size > _KEEP_FILE_BYTES or size > self.keep_budget:
            return False
        self.keep_budget -= size
        return True

    def warn_unverified(self) -> None:
        if self.unverified:
            shown = self.unverified[0]
            more = f" and {len(self.unverified) - 1} more" if len(self.unverified) > 1 else ""
            warnings.warn(
                UnverifiedCheckpointWarning(
                    f"{shown}{more} has no ckptable manifest (written by RLlib or another "
                    "tool): restored without an integrity check.",
                    path=shown,
                ),
                stacklevel=4,
            )


current_restore: contextvars.ContextVar[RestoreSession | None] = contextvars.ContextVar(
    "ckptable_current_restore", default=None
)


def non_default_options(options: RestoreOptions) -> dict[str, Any]:
    """The options to pass on as keywords: only those that differ from the defaults, so
    overriding methods written for RLlib see the keywords they always saw."""
    default = RestoreOptions()
    return {
        name: value
        for name in (
            "verify",
            "safe",
            "mmap",
            "transfer",
            "on_actor_failure",
            "progress",
            "rollback",
            "map_location",
        )
        if (value := getattr(options, name)) is not getattr(default, name)
        and value != getattr(default, name)
    }
