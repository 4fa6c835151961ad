"""The restore pipeline: read → verify → apply.

1. **read**: the levels of the checkpoint tree that the restore uses are listed and every
   state file is read and decoded (``read_level``). The object tree guides it (each
   component knows its own file names). A level ckptable wrote lists its components in
   ``metadata.json`` and all of them are read. In a level RLlib wrote, directories the
   object has no component for are read ahead where they can be (components may appear
   during the parent's ``set_state``); one that does not read — a class's own file names,
   or a stale directory of RLlib's in-place saves — is read only if such a component
   appears (RLlib ignores stale directories).
2. **verify**: a listed component whose directory is missing, a missing state file or
   one that does not decode raises :class:`CorruptCheckpointError` — all before step 3,
   so a bad file leaves the user's object untouched.
3. **apply**: ``set_state`` runs children before parent (as in RLlib), then on the
   components that appeared during the parent's ``set_state``. A component whose class
   overrides ``restore_from_path`` (or is not a ckptable class) is restored through that
   method; a ckptable ``restore_from_path`` reached that way takes the level read in
   step 1 from the session instead of reading it again.

Restoring one component (``component="a/b"``) walks the component path through each
level's ``restore_from_path`` like RLlib, but first checks that every name exists and
raises :class:`UnknownComponentError` where RLlib silently restores nothing.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import logging
import pickle
from typing import TYPE_CHECKING, Any, TypeVar

from ckptable._components import (
    force_list,
    split_component_path,
    uses_ckptable_method,
    validate_component_name,
)
from ckptable._formats import Codec, codec_for_suffix, get_codec
from ckptable._info import stored_class_name
from ckptable._layout import (
    DEFAULT_CLASS_FILE,
    DEFAULT_METADATA_FILE,
    DEFAULT_STATE_FILE,
    read_metadata_file,
    record_of,
)
from ckptable._storage import Storage, resolve_storage
from ckptable.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    InvalidComponentNameError,
    UnknownComponentError,
)

if TYPE_CHECKING:
    from ckptable._checkpointable import Checkpointable

__all__ = ["Level", "construct_from_checkpoint", "read_level", "restore_checkpointable"]

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

    @property
    def record(self) -> dict[str, Any] | None:
        """ckptable's record in ``metadata.json``; None for levels RLlib wrote."""
        return record_of(self.metadata)


@dataclasses.dataclass
class _RestoreSession:
    storage: Storage
    kwargs: dict[str, Any]
    prepared: dict[str, Level] = dataclasses.field(default_factory=dict)


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
    kwargs: dict[str, Any],
) -> None:
    """``Checkpointable.restore_from_path``: see there."""
    storage, root = resolve_storage(path, filesystem)
    session = _current_restore.get()
    if component is None and session is not None:
        level = session.prepared.pop(root, None)
        if level is not None:
            _apply_level(session, obj, level)
            return

    _require_directory(storage, root)
    if component is not None:
        _restore_component_path(obj, storage, root, component, kwargs)
        return
    level = read_level(storage, root, obj)
    session = _RestoreSession(storage, kwargs)
    token = _current_restore.set(session)
    try:
        _apply_level(session, obj, level)
    finally:
        _current_restore.reset(token)


def construct_from_checkpoint(
    cls: type[_T], path: Any, filesystem: Any, kwargs: dict[str, Any]
) -> _T:
    """``Checkpointable.from_checkpoint``: build the stored class, then restore it.

    Keyword arguments naming a constructor parameter replace the stored argument (by
    position where it was passed positionally), as RLlib does; the rest go on to
    ``restore_from_path``.
    """
    storage, root = resolve_storage(path, filesystem)
    _require_directory(storage, root)
    class_file = storage.join(
        root, getattr(cls, "CLASS_AND_CTOR_ARGS_FILE_NAME", DEFAULT_CLASS_FILE)
    )
    if storage.kind(class_file) != "file":
        raise CorruptCheckpointError(
            f"The checkpoint at {storage.display(root)} has no {storage.split(class_file)[1]}: "
            "it cannot say which class to build.",
            path=storage.display(class_file),
        )
    info = _decode_file(storage, class_file, get_codec("cloudpickle"))
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
    obj.restore_from_path(path, filesystem=filesystem, **kwargs)
    return obj  # type: ignore[no-any-return]


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


def _require_directory(storage: Storage, root: str) -> None:
    if storage.kind(root, follow_symlinks=True) != "dir":
        shown = storage.display(root)
        raise CheckpointNotFoundError(f"No checkpoint directory at {shown}.", path=shown)


# --------------------------------------------------------------------------- partial restore


def _restore_component_path(
    obj: Checkpointable, storage: Storage, root: str, component: str, kwargs: dict[str, Any]
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
    comp.restore_from_path(root, component=rest, filesystem=storage.user_filesystem(), **kwargs)


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
    storage: Storage, directory: str, obj: Any | None, metadata_file: str | None = None
) -> Level:
    """Read and decode the level at ``directory`` and every level below it that is used.

    ``obj`` (the object the level will be restored into, if known) supplies the file
    names; without it they come from the level's metadata (found under ``metadata_file``,
    which the parent's record names, or the default name) or RLlib's defaults.
    """
    entries = storage.listdir(directory)
    meta_name = getattr(obj, "METADATA_FILE_NAME", None) or metadata_file or DEFAULT_METADATA_FILE
    metadata = _read_metadata(storage, directory, meta_name, entries)
    record = record_of(metadata)

    codec, state_name = _state_file_of(storage, directory, obj, metadata, record, entries)
    state = _decode_file(storage, storage.join(directory, state_name), codec)
    if not isinstance(state, dict):
        shown = storage.display(storage.join(directory, state_name))
        raise CorruptCheckpointError(
            f"{shown} holds a {type(state).__name__}, not a state dict.", path=shown
        )

    comps: dict[str, Any] = {}
    if obj is not None and callable(getattr(obj, "get_checkpointable_components", None)):
        comps = dict(obj.get_checkpointable_components())
    children: dict[str, Level] = {}
    for name in _child_names(storage, directory, record, entries, comps):
        child_obj = comps.get(name)
        if child_obj is not None and not callable(getattr(child_obj, "restore_from_path", None)):
            raise CheckpointError(
                f"Component {name!r} of {type(obj).__name__} is a {type(child_obj).__name__}, "
                "which has no restore_from_path(); components must be Checkpointable.",
                path=storage.display(directory),
                component=name,
            )
        child_dir = storage.join(directory, name)
        if child_obj is None and record is None:
            children[name] = _read_ahead(storage, child_dir)
        else:
            hint = (record or {}).get("component_metadata_files", {}).get(name)
            children[name] = read_level(
                storage, child_dir, child_obj, hint if isinstance(hint, str) else None
            )
    subdirs = frozenset(name for name, kind in entries.items() if kind == "dir")
    return Level(directory, metadata, state, children, subdirs=subdirs)


def _read_ahead(storage: Storage, directory: str) -> Level:
    """Read a level RLlib wrote for a component the object does not have (yet).

    It may appear during the parent's ``set_state``; or it is a stale directory that
    RLlib's in-place saves leave behind, which RLlib ignores. A level that does not read
    (file names of a class of its own, code that is gone) is deferred: read when such a
    component appears, ignored otherwise.
    """
    try:
        return read_level(storage, directory, None)
    except CheckpointError:
        return Level(directory, None, None, {}, deferred=True)


def _read_metadata(
    storage: Storage, directory: str, name: str, entries: dict[str, Any]
) -> dict[str, Any] | None:
    if entries.get(name) != "file":
        return None
    return read_metadata_file(storage, storage.join(directory, name))


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


def _decode_file(storage: Storage, path: str, codec: Codec) -> Any:
    shown = storage.display(path)
    try:
        with storage.open_read(path) as stream:
            return codec.load(stream)
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


# --------------------------------------------------------------------------- apply


def _apply_level(session: _RestoreSession, obj: Checkpointable, level: Level) -> None:
    """Restore ``obj`` from an already decoded level: children, then ``obj``, then late ones."""
    before = list(obj.get_checkpointable_components())
    for name, comp in before:
        child = level.children.get(name)
        if child is not None:
            _apply_component(session, comp, child)
    obj.set_state(level.state)

    before_names = {name for name, _ in before}
    after = list(obj.get_checkpointable_components())
    for name, comp in after:
        if name in before_names:
            continue
        child = level.children.get(name)
        if (child is None or child.deferred) and level.record is None and name in level.subdirs:
            child = read_level(session.storage, session.storage.join(level.path, name), comp)
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


def _apply_component(session: _RestoreSession, comp: Any, level: Level) -> None:
    if uses_ckptable_method(comp, "restore_from_path"):
        _apply_level(session, comp, level)
        return
    session.prepared[level.path] = level
    try:
        # Code other than ckptable's own restore gets a filesystem object, as from RLlib.
        comp.restore_from_path(
            level.path, filesystem=session.storage.user_filesystem(), **session.kwargs
        )
    finally:
        session.prepared.pop(level.path, None)
