"""The restore pipeline: read and verify → decode → apply.

1. **read and verify** (``read_level``): the levels of the checkpoint tree that the
   restore uses are listed; a symlink or special file anywhere is refused unopened.
   Where a level has a manifest (ckptable wrote it), the listing must match it and every
   file is read and checked against its size and checksum; the parent's manifest pins
   each component directory's manifest. A level ckptable wrote without a manifest is an
   unfinished save and is refused; a level RLlib wrote has none and is restored
   unverified, with one :class:`UnverifiedCheckpointWarning` per restore. The object tree
   guides the walk (each component knows its own file names). A level ckptable wrote
   lists its components in ``metadata.json`` and all of them are read. In a level RLlib
   wrote, directories the object has no component for are read ahead where they can be
   (components may appear during the parent's ``set_state``); one that does not read —
   a class's own file names, or a stale directory of RLlib's in-place saves — is read
   only if such a component appears (RLlib ignores stale directories).
2. **decode**: only when the whole tree is verified are the state files decoded (from
   the bytes read in step 1 where they were small, else read again), with the
   restricted unpickler in safe mode. A missing state file or one that does not decode
   raises :class:`CorruptCheckpointError` — all before step 3, so a bad file leaves the
   user's object untouched.
3. **apply**: ``set_state`` runs children before parent (as in RLlib), then on the
   components that appeared during the parent's ``set_state``. A component whose class
   overrides ``restore_from_path`` (or is not a ckptable class) is restored through that
   method; a ckptable ``restore_from_path`` reached that way takes the level read in
   step 1 from the session instead of reading it again.

Restoring one component (``component="a/b"``) walks the component path through each
level's ``restore_from_path`` like RLlib, but first checks that every name exists and
raises :class:`UnknownComponentError` where RLlib silently restores nothing.

The outermost restore opens the progress bar (:mod:`ckptable._progress`), its total the
size the checkpoint's root manifest records: every file counts once, as step 1 reads
and verifies it (or, in levels without a manifest, as step 2 decodes it).
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import io
import logging
import pickle
import warnings
from typing import TYPE_CHECKING, Any, TypeVar

from ckptable._commit import recover_leftovers
from ckptable._components import (
    force_list,
    is_actor_manager,
    is_ckptable_object,
    split_component_path,
    uses_ckptable_method,
    validate_component_name,
)
from ckptable._formats import Codec, accepts_buffers, codec_for_suffix, get_codec
from ckptable._info import stored_class_name, verify_tree
from ckptable._layout import (
    DEFAULT_CLASS_FILE,
    DEFAULT_METADATA_FILE,
    DEFAULT_STATE_FILE,
    is_state_version,
    read_metadata_file,
    record_of,
)
from ckptable._manifest import (
    MANIFEST_FILE,
    LevelManifest,
    check_listing,
    manifest_tree_bytes,
    read_manifest,
    read_verified,
    refuse_special_entries,
    require_manifest_unless_foreign,
)
from ckptable._pickle_scan import ScannedPickle, map_pickle, read_pickle_verified
from ckptable._progress import counted_open, mark, progress_bar, rewind
from ckptable._storage import LocalStorage, Storage, resolve_storage
from ckptable.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    InvalidComponentNameError,
    UnknownComponentError,
    UnsafeCheckpointError,
    UnverifiedCheckpointWarning,
)

if TYPE_CHECKING:
    from ckptable._checkpointable import Checkpointable

__all__ = [
    "Level",
    "RestoreOptions",
    "construct_from_checkpoint",
    "read_level",
    "restore_checkpointable",
]

logger = logging.getLogger("ckptable")

_T = TypeVar("_T")


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
    raw_state: bytes | ScannedPickle | None = None
    #: Read for a component the object does not have (yet): a decode failure defers it.
    read_ahead: bool = False
    #: ``upgrade_state`` has run on ``state`` (or was not needed).
    upgraded: bool = False
    #: Its files were verified against a manifest in step 1 (and counted as read then).
    verified: bool = False

    @property
    def record(self) -> dict[str, Any] | None:
        """ckptable's record in ``metadata.json``; None for levels RLlib wrote."""
        return record_of(self.metadata)


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """How a restore reads: ``verify`` against manifests, ``safe`` restricted decoding,
    ``mmap`` big arrays mapped from their files instead of read; for components held by
    Ray actors, the ``transfer`` hook and what ``on_actor_failure`` does; whether to
    show a ``progress`` bar."""

    verify: bool = True
    safe: bool = False
    mmap: bool = False
    transfer: Any = None
    on_actor_failure: str = "raise"
    progress: bool | None = None

    def __post_init__(self) -> None:
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
            for name, value in _non_default(self).items()
            if name in ("verify", "safe", "mmap")
        }


#: Step 1 keeps files up to this size in memory for step 2 (saving a second read) ...
_KEEP_FILE_BYTES = 16 << 20
#: ... and up to this much per restore in all.
_KEEP_TOTAL_BYTES = 256 << 20


@dataclasses.dataclass
class _RestoreSession:
    storage: Storage
    kwargs: dict[str, Any]
    options: RestoreOptions = RestoreOptions()
    prepared: dict[str, Level] = dataclasses.field(default_factory=dict)
    #: Levels without a manifest (written by RLlib), restored unverified.
    unverified: list[str] = dataclasses.field(default_factory=list)
    #: Classes of the objects being restored: their instances may appear in states.
    allowed: set[type] = dataclasses.field(default_factory=set)
    keep_budget: int = _KEEP_TOTAL_BYTES
    #: Levels of actor components already restored (before the first ``set_state``).
    actors_restored: set[str] = dataclasses.field(default_factory=set)

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


_current_restore: contextvars.ContextVar[_RestoreSession | None] = contextvars.ContextVar(
    "ckptable_current_restore", default=None
)


# --------------------------------------------------------------------------- entry points


def restore_checkpointable(
    obj: Checkpointable,
    path: Any,
    *,
    component: str | None,
    filesystem: Any,
    options: RestoreOptions,
    kwargs: dict[str, Any],
) -> None:
    """``Checkpointable.restore_from_path``: see there."""
    storage, root = resolve_storage(path, filesystem)
    _check_mmap(storage, root, options)
    session = _current_restore.get()
    if component is None and session is not None:
        level = session.prepared.pop(root, None)
        if level is not None:
            _apply_level(session, obj, level)
            return

    with progress_bar(options.progress, "Restoring") as bar:
        if bar is not None and options.verify:
            bar.set_total(manifest_tree_bytes(storage, root))
        _require_directory(storage, root)
        if component is not None:
            _restore_component_path(obj, storage, root, component, options, kwargs)
            return
        session = _RestoreSession(storage, kwargs, options)
        level = _read_consistently(session, root, obj)
        session.warn_unverified()
        upgrade_tree(session, obj, level)
        restore_actor_tree(session, obj, level)
        token = _current_restore.set(session)
        try:
            _apply_level(session, obj, level)
        finally:
            _current_restore.reset(token)


#: Reads of a checkpoint that a concurrent save replaces are repeated up to this often.
_READ_ATTEMPTS = 10


def _read_consistently(session: _RestoreSession, root: str, obj: Any) -> Level:
    """Steps 1 and 2, repeated if a concurrent save replaced the checkpoint meanwhile.

    A save swaps whole trees and never changes a published file, so a read that starts
    and ends on the same root directory (same device and inode) read one checkpoint;
    one that did not may hold files of two, or report a "mismatch" that is only the
    swap: it is read again.
    """
    storage = session.storage
    start = mark()
    for attempt in range(_READ_ATTEMPTS):
        before = storage.identity(root)
        session.unverified.clear()
        session.keep_budget = _KEEP_TOTAL_BYTES
        rewind(start)  # the bytes of an attempt read again count once
        try:
            try:
                level = read_level(session, root, obj)
                decode_tree(session, level)
            except OSError as exc:
                shown = storage.display(root)
                raise CorruptCheckpointError(
                    f"Cannot read the checkpoint {shown}: {exc}", path=shown
                ) from exc
        except CheckpointError:
            if before is None or storage.identity(root) == before:
                raise
            if attempt == _READ_ATTEMPTS - 1:
                raise
            continue
        if before is None or storage.identity(root) == before:
            return level
    shown = storage.display(root)
    raise CheckpointError(
        f"The checkpoint {shown} was replaced {_READ_ATTEMPTS} times while it was being "
        "read (concurrent saves); try again.",
        path=shown,
    )


def construct_from_checkpoint(
    cls: type[_T], path: Any, filesystem: Any, options: RestoreOptions, kwargs: dict[str, Any]
) -> _T:
    """``Checkpointable.from_checkpoint``: build the stored class, then restore it.

    Keyword arguments naming a constructor parameter replace the stored argument (by
    position where it was passed positionally), as RLlib does; the rest go on to
    ``restore_from_path``.
    """
    storage, root = resolve_storage(path, filesystem)
    _check_mmap(storage, root, options)
    _require_directory(storage, root)
    class_file = storage.join(
        root, getattr(cls, "CLASS_AND_CTOR_ARGS_FILE_NAME", DEFAULT_CLASS_FILE)
    )
    refuse_special_entries(storage, root, storage.listdir(root))
    if storage.kind(class_file) != "file":
        raise CorruptCheckpointError(
            f"The checkpoint at {storage.display(root)} has no {storage.split(class_file)[1]}: "
            "it cannot say which class to build.",
            path=storage.display(class_file),
        )
    raw = _read_class_file(storage, root, class_file, options)
    info = _decode_file(
        storage, class_file, get_codec("cloudpickle"), raw, options, allow_subclasses_of=cls
    )
    ctor, args, ctor_kwargs = _parse_class_record(info, storage.display(class_file))
    if not issubclass(ctor, cls):
        raise IncompatibleCheckpointError(
            f"The class {ctor.__module__}.{ctor.__qualname__} stored in the checkpoint at "
            f"{storage.display(root)} is not a subclass of {cls.__module__}.{cls.__qualname__}.",
            path=storage.display(root),
        )
    kwargs = dict(kwargs)
    for i, (name, param) in enumerate(inspect.signature(ctor).parameters.items()):
        if name in kwargs:
            value = kwargs.pop(name)
            if param.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD and len(args) > i:
                args[i] = value
            else:
                ctor_kwargs[name] = value
    obj: Any = ctor(*args, **ctor_kwargs)
    if is_ckptable_object(obj):
        kwargs.update(_non_default(options))
    obj.restore_from_path(path, filesystem=filesystem, **kwargs)
    return obj  # type: ignore[no-any-return]


def _non_default(options: RestoreOptions) -> dict[str, bool]:
    """The options to pass on as keywords: only those that differ from the defaults, so
    overriding methods written for RLlib see the keywords they always saw."""
    default = RestoreOptions()
    return {
        name: value
        for name in ("verify", "safe", "mmap", "transfer", "on_actor_failure", "progress")
        if (value := getattr(options, name)) != getattr(default, name)
    }


def _read_class_file(
    storage: Storage, root: str, class_file: str, options: RestoreOptions
) -> bytes | None:
    """The class file's bytes, verified against the root manifest (None if unverified)."""
    if not options.verify:
        return None
    entries = storage.listdir(root)
    name = storage.split(class_file)[1]
    if MANIFEST_FILE not in entries:
        require_manifest_unless_foreign(storage, root, None, entries)
        return None
    manifest = read_manifest(storage, root)
    expected = manifest.files.get(name)
    if expected is None:
        shown = storage.display(class_file)
        raise CorruptCheckpointError(
            f"{shown} is not listed in the checkpoint's manifest.", path=shown
        )
    return read_verified(storage, class_file, expected, manifest.algorithm, keep=True)


def _parse_class_record(info: Any, shown: str) -> tuple[type, list[Any], dict[str, Any]]:
    try:
        ctor = info["class"]
        args, ctor_kwargs = info["ctor_args_and_kwargs"]
        ctor_kwargs = dict(ctor_kwargs or {})
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"{shown} does not hold a class and its constructor arguments.", path=shown
        ) from exc
    if not isinstance(ctor, type):
        raise CorruptCheckpointError(f"{shown} names {ctor!r}, which is not a class.", path=shown)
    return ctor, force_list(args), ctor_kwargs


def _check_mmap(storage: Storage, root: str, options: RestoreOptions) -> None:
    if options.mmap and not isinstance(storage, LocalStorage):
        shown = storage.display(root)
        raise CheckpointError(
            f"mmap=True maps files of the local disk; {shown} is not on it (copy the "
            "checkpoint to a local directory first, or restore without mmap).",
            path=shown,
        )


def _require_directory(storage: Storage, root: str) -> None:
    if storage.kind(root, follow_symlinks=True) == "dir":
        return
    # A save that died between the two steps of its publish leaves the old checkpoint
    # beside the target: put it back.
    recover_leftovers(storage, root)
    if storage.kind(root, follow_symlinks=True) != "dir":
        shown = storage.display(root)
        raise CheckpointNotFoundError(f"No checkpoint directory at {shown}.", path=shown)


# --------------------------------------------------------------------------- partial restore


def _restore_component_path(
    obj: Checkpointable,
    storage: Storage,
    root: str,
    component: str,
    options: RestoreOptions,
    kwargs: dict[str, Any],
) -> None:
    """Restore only ``component`` of ``obj`` from ``root``, the component's own directory."""
    try:
        names = split_component_path(component)
    except InvalidComponentNameError as exc:
        raise UnknownComponentError(
            str(exc), path=storage.display(root), component=component
        ) from exc
    current: Any = obj
    for depth, name in enumerate(names):
        if not callable(getattr(current, "get_checkpointable_components", None)):
            break  # e.g. an actor manager: its actors resolve the rest
        comps = dict(current.get_checkpointable_components())
        if name not in comps:
            owner = "/".join(names[:depth]) or type(obj).__name__
            raise UnknownComponentError(
                f"Unknown component {component!r}: {owner} has no component {name!r} "
                f"(it has: {', '.join(sorted(comps)) or 'none'}).",
                path=storage.display(root),
                component=component,
            )
        current = comps[name]
    else:
        _refuse_a_parent_directory(storage, root, component, names, current)
    head, rest = names[0], "/".join(names[1:]) or None
    comp = dict(obj.get_checkpointable_components())[head]
    if is_actor_manager(comp):
        _restore_actor_component_path(comp, storage, root, component, rest, options, kwargs)
        return
    if is_ckptable_object(comp):
        kwargs = {**kwargs, **_non_default(options)}
    else:
        # Code other than ckptable's reads the files itself: verify them first, and
        # refuse safe mode, which that code cannot honour.
        _refuse_foreign_in_safe_mode(options, comp, storage.display(root), component)
        if options.verify:
            _verify_component_directory(storage, root, options, kwargs)
    comp.restore_from_path(root, component=rest, filesystem=storage.user_filesystem(), **kwargs)


def _restore_actor_component_path(
    manager: Any,
    storage: Storage,
    root: str,
    component: str,
    rest: str | None,
    options: RestoreOptions,
    kwargs: dict[str, Any],
) -> None:
    """``component`` starts with an actor component: its directory ``root`` is verified
    here, then every healthy actor restores (``rest`` of) itself from it."""
    if options.verify:
        _verify_component_directory(storage, root, options, kwargs)
    else:
        refuse_special_entries(storage, root, storage.listdir(root))
    _push_to_actors(
        manager,
        storage,
        root,
        rest,
        f"component {component!r} from {storage.display(root)}",
        options,
        kwargs,
    )


def _verify_component_directory(
    storage: Storage, root: str, options: RestoreOptions, kwargs: dict[str, Any]
) -> None:
    """Verify a component's directory that code other than ckptable's restore will read
    (a foreign component, Ray actors); warn once if parts of it have no manifest."""
    report = verify_tree(storage, root, read_unverified=False)
    if report.unverified:
        session = _RestoreSession(storage, kwargs, options, unverified=list(report.unverified))
        session.warn_unverified()


def _refuse_foreign_in_safe_mode(
    options: RestoreOptions, comp: Any, shown: str, component: str | None
) -> None:
    if options.safe and not is_ckptable_object(comp):
        raise UnsafeCheckpointError(
            f"Component {component!r} ({type(comp).__module__}.{type(comp).__qualname__}) "
            "is not a ckptable Checkpointable: it restores itself with its own code, which "
            "safe=True cannot restrict.",
            path=shown,
            component=component,
        )


def _refuse_a_parent_directory(
    storage: Storage, root: str, component: str, names: list[str], target: Any
) -> None:
    """Catch ``restore_from_path(<whole checkpoint>, component="a/b")``.

    RLlib wants the component's *own* directory there and, given the parent's, loads the
    parent's state into the component. When ``root`` holds a directory named like the
    component path's first name and was saved from another class than the target's, the
    caller passed the parent: say which directory to pass instead.
    """
    if storage.kind(storage.join(root, names[0])) != "dir":
        return
    stored = stored_class_name(
        storage,
        root,
        getattr(target, "METADATA_FILE_NAME", DEFAULT_METADATA_FILE),
        getattr(target, "CLASS_AND_CTOR_ARGS_FILE_NAME", DEFAULT_CLASS_FILE),
    )
    cls = type(target)
    if stored is None or stored == f"{cls.__module__}.{cls.__qualname__}":
        return
    shown = storage.display(root)
    raise IncompatibleCheckpointError(
        f"{shown} holds a checkpoint of {stored}, not of component {component!r} "
        f"({cls.__module__}.{cls.__qualname__}). With component=, pass the component's "
        f"own directory: {storage.display(storage.join(root, *names))}",
        path=shown,
        component=component,
    )


# --------------------------------------------------------------------------- read


def read_level(
    session: _RestoreSession,
    directory: str,
    obj: Any | None,
    metadata_file: str | None = None,
    expected_manifest: tuple[str, str] | None = None,
    read_ahead: bool = False,
) -> Level:
    """Step 1 for the level at ``directory`` and every level below it that is used: list,
    verify, read the metadata and find the state file (decoded later, by ``decode_tree``).

    ``obj`` (the object the level will be restored into, if known) supplies the file
    names; without it they come from the level's metadata (found under ``metadata_file``,
    which the parent's record names, or the default name) or RLlib's defaults.
    ``expected_manifest``: the parent manifest's ``(algorithm, checksum)`` of this level's
    manifest.
    """
    storage = session.storage
    if obj is not None and not is_ckptable_object(obj):
        return _check_foreign_level(session, directory, expected_manifest)
    entries = storage.listdir(directory)
    refuse_special_entries(storage, directory, entries)
    if obj is not None:
        session.allowed.add(type(obj))

    manifest = None
    raw: dict[str, bytes] = {}
    big: dict[str, tuple[int, str]] = {}
    if session.options.verify and (MANIFEST_FILE in entries or expected_manifest):
        manifest = read_manifest(storage, directory, expected_manifest)
        raw, big = _verify_files(session, directory, manifest, entries)

    meta_name = getattr(obj, "METADATA_FILE_NAME", None) or metadata_file or DEFAULT_METADATA_FILE
    metadata = None
    if entries.get(meta_name) == "file":
        metadata = read_metadata_file(
            storage, storage.join(directory, meta_name), raw.get(meta_name)
        )
    record = record_of(metadata)
    if obj is not None:
        _check_state_version(storage, directory, obj, record)
    if session.options.verify and manifest is None:
        require_manifest_unless_foreign(
            storage, directory, record, entries, meta_name if metadata is not None else None
        )
        session.unverified.append(storage.display(directory))

    try:
        codec, state_name = _state_file_of(storage, directory, obj, metadata, record, entries)
    except CorruptCheckpointError:
        if not read_ahead:
            raise
        # Verified (if it has a manifest) but not in ckptable's layout: a component with
        # file names of its own, or code of its own. Read when the component appears.
        _verify_big_files(session, directory, manifest, big, None)
        return Level(directory, metadata, None, {}, deferred=True)
    prepared = _verify_big_files(session, directory, manifest, big, (state_name, codec))

    comps: dict[str, Any] = {}
    if obj is not None and callable(getattr(obj, "get_checkpointable_components", None)):
        comps = dict(obj.get_checkpointable_components())
    children: dict[str, Level] = {}
    for name in _child_names(storage, directory, record, entries, comps):
        child_obj = comps.get(name)
        child_dir = storage.join(directory, name)
        if child_obj is not None:
            _check_restorable(session, obj, name, child_obj, child_dir)
        expected = (manifest.algorithm, manifest.dirs[name]) if manifest else None
        if child_obj is None and record is None:
            children[name] = _read_ahead(session, child_dir, expected)
        elif child_obj is None:
            # Listed by ckptable but not (yet) a component: created by set_state.
            hint = (record or {}).get("component_metadata_files", {}).get(name)
            children[name] = read_level(
                session,
                child_dir,
                None,
                hint if isinstance(hint, str) else None,
                expected,
                read_ahead=True,
            )
        else:
            hint = (record or {}).get("component_metadata_files", {}).get(name)
            children[name] = read_level(
                session, child_dir, child_obj, hint if isinstance(hint, str) else None, expected
            )
    if manifest is not None:
        # Directories the manifest pins that no component reads (written by a save
        # override, say): verified too, so that nothing in the tree goes unchecked.
        for name, digest in manifest.dirs.items():
            if name not in children:
                verify_tree(
                    storage,
                    storage.join(directory, name),
                    (manifest.algorithm, digest),
                    read_unverified=False,
                )
    subdirs = frozenset(name for name, kind in entries.items() if kind == "dir")
    return Level(
        directory,
        metadata,
        None,
        children,
        subdirs=subdirs,
        state_file=state_name,
        codec=codec,
        raw_state=prepared if prepared is not None else raw.get(state_name),
        read_ahead=read_ahead,
        verified=manifest is not None,
    )


def _check_foreign_level(
    session: _RestoreSession, directory: str, expected_manifest: tuple[str, str] | None
) -> Level:
    """A component restored by code other than ckptable's (RLlib's own classes, say)
    reads its files itself: they are only verified here, whole subtree, not decoded."""
    storage = session.storage
    if session.options.verify:
        report = verify_tree(storage, directory, expected_manifest, read_unverified=False)
        session.unverified.extend(report.unverified)
    else:
        refuse_special_entries(storage, directory, storage.listdir(directory))
    return Level(directory, None, None, {})


def _verify_files(
    session: _RestoreSession,
    directory: str,
    manifest: LevelManifest,
    entries: dict[str, Any],
) -> tuple[dict[str, bytes], dict[str, tuple[int, str]]]:
    """Check the listing and every small file of a level.

    Returns the small files' bytes, and the big files (name → manifest entry), left for
    ``_verify_big_files`` once the state file is known: that one is verified as it is
    read for decoding.
    """
    storage = session.storage
    check_listing(storage, directory, manifest, entries)
    kept: dict[str, bytes] = {}
    big: dict[str, tuple[int, str]] = {}
    for name, expected in manifest.files.items():
        # Pickles with a recorded skeleton hold big arrays: read in the one pass that
        # verifies them, straight into the arrays (not kept as bytes, then copied).
        if name in manifest.skeletons or not session.keep(expected[0]):
            big[name] = expected
            continue
        data = read_verified(
            storage, storage.join(directory, name), expected, manifest.algorithm, keep=True
        )
        if data is not None:
            kept[name] = data
    return kept, big


def _verify_big_files(
    session: _RestoreSession,
    directory: str,
    manifest: LevelManifest | None,
    big: dict[str, tuple[int, str]],
    state_file: tuple[str, Codec] | None,
) -> ScannedPickle | None:
    """Verify the big files of a level; the state file (a pickle) in the same pass that
    reads it for decoding, its big arrays straight into their final memory (or mapped,
    with ``mmap=True``). Returns that state file's scan, if it was scanned."""
    if manifest is None:
        return None
    storage = session.storage
    prepared = None
    for name, expected in big.items():
        path = storage.join(directory, name)
        if state_file is not None and name == state_file[0] and accepts_buffers(state_file[1]):
            prepared = read_pickle_verified(
                storage,
                path,
                expected,
                manifest.algorithm,
                skeleton=manifest.skeletons.get(name),
                mmap=session.options.mmap,
                skeleton_limit=_KEEP_TOTAL_BYTES,
            )
        else:
            read_verified(storage, path, expected, manifest.algorithm, keep=False)
    return prepared


def _check_restorable(
    session: _RestoreSession, parent: Any, name: str, comp: Any, directory: str
) -> None:
    if is_actor_manager(comp):
        return  # its actors restore themselves, with the caller's options
    if not callable(getattr(comp, "restore_from_path", None)):
        raise CheckpointError(
            f"Component {name!r} of {type(parent).__name__} is a {type(comp).__name__}, "
            "which has no restore_from_path(); components must be Checkpointable (or "
            "managers of Ray actors: see ckptable.ray).",
            path=session.storage.display(directory),
            component=name,
        )
    _refuse_foreign_in_safe_mode(session.options, comp, session.storage.display(directory), name)


def _read_ahead(
    session: _RestoreSession, directory: str, expected_manifest: tuple[str, str] | None
) -> Level:
    """Read a level RLlib wrote for a component the object does not have (yet).

    It may appear during the parent's ``set_state``; or it is a stale directory that
    RLlib's in-place saves leave behind, which RLlib ignores. A level that does not read
    (file names of a class of its own, code that is gone) is deferred: read when such a
    component appears, ignored otherwise.
    """
    try:
        return read_level(session, directory, None, None, expected_manifest, read_ahead=True)
    except UnsafeCheckpointError:
        raise
    except CheckpointError:
        storage = session.storage
        if expected_manifest is not None or storage.kind(storage.join(directory, MANIFEST_FILE)):
            raise  # a verified level that fails is damaged, not foreign
        return Level(directory, None, None, {}, deferred=True)


def decode_tree(session: _RestoreSession, level: Level) -> None:
    """Step 2: decode the state of ``level`` and of every level below it."""
    if level.deferred:
        return
    for child in level.children.values():
        decode_tree(session, child)
    if level.codec is None:
        return
    path = session.storage.join(level.path, level.state_file)
    if level.raw_state is None and session.options.mmap and accepts_buffers(level.codec):
        level.raw_state = map_pickle(session.storage, path)  # unverified: mapped as is
    try:
        state = _decode_file(
            session.storage,
            path,
            level.codec,
            level.raw_state,
            session.options,
            allowed=session.allowed,
            count_reads=not level.verified,
        )
    except CheckpointError:
        if not level.read_ahead:
            raise
        level.deferred, level.children = True, {}
        return
    finally:
        level.raw_state = None
    if not isinstance(state, dict):
        shown = session.storage.display(path)
        if level.read_ahead:
            level.deferred, level.children = True, {}
            return
        raise CorruptCheckpointError(
            f"{shown} holds a {type(state).__name__}, not a state dict.", path=shown
        )
    level.state = state


def _state_file_of(
    storage: Storage,
    directory: str,
    obj: Any | None,
    metadata: dict[str, Any] | None,
    record: dict[str, Any] | None,
    entries: dict[str, Any],
) -> tuple[Codec, str]:
    """Which state file the level has, and the codec that reads it."""
    shown = storage.display(directory)
    if record is not None:
        name = record.get("state_file")
        try:
            codec = get_codec(str(record.get("format")))
        except CheckpointError as exc:
            raise IncompatibleCheckpointError(f"{shown}: {exc}", path=shown) from exc
        if not isinstance(name, str) or entries.get(name) != "file":
            raise CorruptCheckpointError(
                f"The state file {name!r} recorded in the metadata of {shown} is missing.",
                path=shown,
            )
        return codec, name
    base = getattr(obj, "STATE_FILE_NAME", None) or (metadata or {}).get("state_file")
    base = base if isinstance(base, str) else DEFAULT_STATE_FILE
    # RLlib's rule: the msgpack file wins if present, else the pickle file.
    for suffix in (".msgpack", ".pkl"):
        found = codec_for_suffix(suffix)
        if found is not None and entries.get(base + suffix) == "file":
            return found, base + suffix
    raise CorruptCheckpointError(
        f"The checkpoint level {shown} has no state file {base}.pkl or {base}.msgpack.",
        path=shown,
    )


def _child_names(
    storage: Storage,
    directory: str,
    record: dict[str, Any] | None,
    entries: dict[str, Any],
    comps: dict[str, Any],
) -> list[str]:
    shown = storage.display(directory)
    if record is not None:
        names = record.get("components", [])
        if not isinstance(names, list):
            raise CorruptCheckpointError(
                f"Bad component list in the metadata of {shown}.", path=shown
            )
        for name in names:
            try:
                validate_component_name(name, path=shown)
            except InvalidComponentNameError as exc:
                raise CorruptCheckpointError(str(exc), path=shown, component=str(name)) from exc
            if entries.get(name) != "dir":
                raise CorruptCheckpointError(
                    f"The component directory {storage.display(storage.join(directory, name))} "
                    "recorded in the checkpoint's metadata is missing.",
                    path=shown,
                    component=name,
                )
        return list(names)
    # Written by RLlib: every component directory of the object, plus any other
    # directory that looks like a checkpoint level (a component that may appear later).
    names = []
    for name, kind in entries.items():
        if kind != "dir":
            continue
        if (
            name in comps
            or storage.kind(storage.join(directory, name, DEFAULT_CLASS_FILE)) == "file"
        ):
            names.append(name)
    return names


def _decode_file(
    storage: Storage,
    path: str,
    codec: Codec,
    raw: bytes | ScannedPickle | None,
    options: RestoreOptions,
    *,
    allowed: set[type] | frozenset[type] = frozenset(),
    allow_subclasses_of: type | None = None,
    count_reads: bool = False,
) -> Any:
    """Decode one file (from ``raw`` if step 1 kept its bytes or scanned it); errors name
    the file. ``count_reads``: count what is read from the file in the progress bar (a
    file no manifest verified, which step 1 did not read)."""
    shown = storage.display(path)
    extra: dict[str, Any] = {}
    if isinstance(raw, ScannedPickle):
        extra["buffers"] = iter(raw.buffers)
    try:
        with _open_source(storage, path, raw, count_reads) as stream:
            if not options.safe:
                return codec.load(stream, **extra)
            load_restricted = getattr(codec, "load_restricted", None)
            if load_restricted is None:
                raise UnsafeCheckpointError(
                    f"{shown}: the {codec.name!r} format has no restricted loader, so it "
                    "cannot be loaded with safe=True.",
                    path=shown,
                )
            return load_restricted(
                stream,
                allowed=allowed,
                allow_subclasses_of=allow_subclasses_of,
                source=shown,
                **extra,
            )
    except CheckpointError as exc:
        if exc.path is None:
            exc.path = shown
        raise
    except (ImportError, AttributeError) as exc:
        raise IncompatibleCheckpointError(
            f"Cannot load {shown}: it refers to code this Python environment lacks ({exc}).",
            path=shown,
        ) from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"Cannot read {shown}: {exc}", path=shown) from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        MemoryError,
        OverflowError,
        UnicodeDecodeError,
    ) as exc:
        raise CorruptCheckpointError(
            f"{shown} is truncated or corrupt ({type(exc).__name__}: {exc}).", path=shown
        ) from exc
    except Exception as exc:  # the msgpack decoder raises its own error types
        if type(exc).__module__.startswith("msgpack"):
            raise CorruptCheckpointError(
                f"{shown} is truncated or corrupt ({type(exc).__name__}: {exc}).", path=shown
            ) from exc
        raise


def _open_source(
    storage: Storage, path: str, raw: bytes | ScannedPickle | None, count_reads: bool
) -> Any:
    if isinstance(raw, ScannedPickle):
        return raw.open()
    if raw is not None:
        return io.BytesIO(raw)
    if count_reads:
        return counted_open(storage.open_read(path))
    return storage.open_read(path)


# --------------------------------------------------------------------------- apply


def _apply_level(session: _RestoreSession, obj: Checkpointable, level: Level) -> None:
    """Restore ``obj`` from an already decoded level: children, then ``obj``, then late ones."""
    _upgrade_level(session, obj, level)  # done already unless the component came late
    before = list(obj.get_checkpointable_components())
    for name, comp in before:
        child = level.children.get(name)
        if child is not None:
            _apply_component(session, comp, child)
    obj.set_state(level.state)

    before_names = {name for name, _ in before}
    after = list(obj.get_checkpointable_components())
    late = [(name, comp) for name, comp in after if name not in before_names]
    for name, comp in late:
        # Components created by set_state: checked like the others (safe mode refuses
        # one that restores itself with its own code) before any of them is restored.
        if name in level.children or name in level.subdirs:
            _check_restorable(session, obj, name, comp, session.storage.join(level.path, name))
    for name, comp in late:
        child = level.children.get(name)
        if (child is None or child.deferred) and name in level.subdirs:
            child_dir = session.storage.join(level.path, name)
            child = read_level(session, child_dir, comp)
            decode_tree(session, child)
        if child is not None:
            _apply_component(session, comp, child)

    unused = set(level.children) - before_names - {name for name, _ in after}
    if unused:
        logger.warning(
            "Checkpoint %s holds components that %s does not have; they were not restored: %s",
            session.storage.display(level.path),
            type(obj).__name__,
            ", ".join(sorted(unused)),
        )


# --------------------------------------------------------------------------- actors


def restore_actor_tree(session: _RestoreSession, obj: Any, level: Level) -> None:
    """Restore every component of ``obj``'s tree that Ray actors hold, before the first
    ``set_state``: an actor that fails then leaves the local objects untouched."""
    if level.deferred or not is_ckptable_object(obj):
        return
    for name, comp in obj.get_checkpointable_components():
        child = level.children.get(name)
        if child is None:
            continue
        if is_actor_manager(comp):
            _restore_actors(session, comp, child)
        else:
            restore_actor_tree(session, comp, child)


def _restore_actors(session: _RestoreSession, manager: Any, level: Level) -> None:
    storage = session.storage
    where = f"the actor component at {storage.display(level.path)}"
    _push_to_actors(manager, storage, level.path, None, where, session.options, session.kwargs)
    session.actors_restored.add(level.path)


def _push_to_actors(
    manager: Any,
    storage: Storage,
    directory: str,
    component: str | None,
    where: str,
    options: RestoreOptions,
    kwargs: dict[str, Any],
) -> None:
    """Every healthy actor of ``manager`` restores (``component`` of) itself from the
    verified ``directory`` (``ckptable.ray``, imported only when actors are involved)."""
    from ckptable.ray._actors import restore_actor_component

    restore_actor_component(
        manager,
        storage,
        directory,
        component=component,
        where=where,
        options=options.for_actors(),
        kwargs=kwargs,
        transfer=options.transfer,
        on_actor_failure=options.on_actor_failure,
    )


# --------------------------------------------------------------------------- versions


def _stored_state_version(storage: Storage, directory: str, record: dict[str, Any] | None) -> int:
    """The ``STATE_VERSION`` a level was saved with (1 if none is recorded: RLlib's)."""
    version = (record or {}).get("state_version", 1)
    if not is_state_version(version):
        shown = storage.display(directory)
        raise CorruptCheckpointError(
            f"The metadata of {shown} records a bad state version {version!r}.", path=shown
        )
    return version


def _check_state_version(
    storage: Storage, directory: str, obj: Any, record: dict[str, Any] | None
) -> tuple[int, int]:
    """The level's stored and ``obj``'s current ``STATE_VERSION``; refuses a level saved by
    newer code than ``obj``'s class (before anything is set)."""
    stored = _stored_state_version(storage, directory, record)
    cls = type(obj)
    current = getattr(cls, "STATE_VERSION", 1)
    if stored > current:
        shown = storage.display(directory)
        raise IncompatibleCheckpointError(
            f"{shown} holds state version {stored} of {cls.__module__}.{cls.__qualname__}, "
            f"newer than version {current} this code knows: restore it with the newer code.",
            path=shown,
        )
    return stored, current


def upgrade_tree(session: _RestoreSession, obj: Any, level: Level) -> None:
    """Run ``upgrade_state`` on every decoded level of ``obj``'s tree saved at an older
    ``STATE_VERSION``: all of them before the first ``set_state``."""
    if level.deferred or not is_ckptable_object(obj):
        return
    comps = dict(obj.get_checkpointable_components())
    for name, child in level.children.items():
        if name in comps:
            upgrade_tree(session, comps[name], child)
    _upgrade_level(session, obj, level)


def _upgrade_level(session: _RestoreSession, obj: Any, level: Level) -> None:
    if level.upgraded or level.deferred or level.codec is None:
        return
    storage = session.storage
    stored, current = _check_state_version(storage, level.path, obj, level.record)
    if stored < current:
        shown = storage.display(level.path)
        try:
            upgraded = obj.upgrade_state(level.state, stored)
        except CheckpointError as exc:
            if exc.path is None:
                exc.path = shown
            raise
        except Exception as exc:
            raise IncompatibleCheckpointError(
                f"{type(obj).__name__}.upgrade_state failed to upgrade {shown} from state "
                f"version {stored} to {current}: {type(exc).__name__}: {exc}",
                path=shown,
            ) from exc
        if not isinstance(upgraded, dict):
            raise CheckpointError(
                f"{type(obj).__name__}.upgrade_state returned {type(upgraded).__name__}, "
                f"not a state dict (upgrading {shown}).",
                path=shown,
            )
        level.state = upgraded
    level.upgraded = True


def _apply_component(session: _RestoreSession, comp: Any, level: Level) -> None:
    if is_actor_manager(comp):
        if level.path not in session.actors_restored:  # a component that came late
            _restore_actors(session, comp, level)
        return
    if uses_ckptable_method(comp, "restore_from_path"):
        _apply_level(session, comp, level)
        return
    if level.codec is not None:  # decoded: a ckptable restore it reaches takes it as is
        session.prepared[level.path] = level
    try:
        # Code other than ckptable's own restore gets a filesystem object, as from RLlib.
        comp.restore_from_path(
            level.path, filesystem=session.storage.user_filesystem(), **session.kwargs
        )
    finally:
        session.prepared.pop(level.path, None)
