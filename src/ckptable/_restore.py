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

import inspect
import logging
import sys
from typing import TYPE_CHECKING, Any, TypeVar

from ckptable._commit import recover_leftovers
from ckptable._components import (
    did_you_mean,
    is_actor_manager,
    is_ckptable_object,
    split_component_path,
)
from ckptable._formats import get_codec
from ckptable._info import stored_class_name
from ckptable._layout import (
    DEFAULT_CLASS_FILE,
    DEFAULT_METADATA_FILE,
)
from ckptable._manifest import (
    manifest_tree_bytes,
    refuse_special_entries,
)
from ckptable._progress import mark, progress_bar, rewind
from ckptable._restore_apply import (
    apply_level,
    apply_tree,
    push_to_actors,
    restore_actor_tree,
    upgrade_tree,
)
from ckptable._restore_decode import decode_file, decode_tree, parse_class_record, read_class_file
from ckptable._restore_hints import (
    class_name,
    component_directory_hint,
    constructor_hint,
    main_module_class_error,
    manager_directory_error,
    refuse_component_directory,
)
from ckptable._restore_read import read_level, refuse_foreign_in_safe_mode, state_file_of
from ckptable._restore_session import (
    KEEP_TOTAL_BYTES,
    Level,
    RestoreOptions,
    RestoreSession,
    current_restore,
    non_default_options,
)
from ckptable._storage import LocalStorage, Storage, resolve_storage
from ckptable._storage_prefetch import reading_ahead
from ckptable._verify import verify_tree
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

__all__ = [
    "Level",
    "RestoreOptions",
    "RestoreSession",
    "construct_from_checkpoint",
    "decode_file",
    "decode_tree",
    "read_level",
    "require_directory",
    "restore_checkpointable",
    "state_file_of",
]

logger = logging.getLogger("ckptable")

_T = TypeVar("_T")


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
    session = current_restore.get()
    if component is None and session is not None:
        level = session.prepared.pop(root, None)
        if level is not None:
            apply_level(session, obj, level)
            return

    with (
        reading_ahead(storage, root) as storage,
        progress_bar(options.progress, "Restoring") as bar,
    ):
        if bar is not None and options.verify:
            bar.set_total(manifest_tree_bytes(storage, root))
        require_directory(storage, root)
        if component is not None:
            _restore_component_path(obj, storage, root, component, options, kwargs)
            return
        refuse_component_directory(storage, root, obj)
        session = RestoreSession(storage, kwargs, options, root=root)
        try:
            level = _read_consistently(session, root, obj)
        except CorruptCheckpointError as exc:
            not_a_checkpoint = manager_directory_error(storage, root)
            if not_a_checkpoint is not None:
                raise not_a_checkpoint from exc
            raise
        session.warn_unverified()
        upgrade_tree(session, obj, level)
        restore_actor_tree(session, obj, level)
        token = current_restore.set(session)
        try:
            apply_tree(session, obj, level)
        finally:
            current_restore.reset(token)
        session.warn_moved_tensors()


#: Reads of a checkpoint that a concurrent save replaces are repeated up to this often.
_READ_ATTEMPTS = 10


def _read_consistently(session: RestoreSession, root: str, obj: Any) -> Level:
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
        session.keep_budget = KEEP_TOTAL_BYTES
        session.tensors = None  # tensors moved to the CPU count once, for this attempt
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
            except RecursionError as exc:
                shown = storage.display(root)
                raise CheckpointError(
                    f"The checkpoint {shown} nests its components too deeply to restore "
                    f"with Python's recursion limit ({exc}); nothing was set.",
                    path=shown,
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
    with reading_ahead(storage, root) as storage:
        # The restore it runs below reads the same tree: it shares the reads made here.
        return _construct(cls, path, storage, root, filesystem, options, kwargs)


def _construct(
    cls: type[_T],
    path: Any,
    storage: Storage,
    root: str,
    filesystem: Any,
    options: RestoreOptions,
    kwargs: dict[str, Any],
) -> _T:
    require_directory(storage, root)
    class_file = storage.join(
        root, getattr(cls, "CLASS_AND_CTOR_ARGS_FILE_NAME", DEFAULT_CLASS_FILE)
    )
    refuse_special_entries(storage, root, storage.listdir(root))
    if storage.kind(class_file) != "file":
        not_a_checkpoint = manager_directory_error(storage, root, building=True)
        if not_a_checkpoint is not None:
            raise not_a_checkpoint
        raise CorruptCheckpointError(
            f"The checkpoint at {storage.display(root)} has no {storage.split(class_file)[1]}: "
            "it cannot say which class to build.",
            path=storage.display(class_file),
        )
    raw = read_class_file(storage, root, class_file, options)
    info = decode_file(
        storage, class_file, get_codec("cloudpickle"), raw, options, allow_subclasses_of=cls
    )
    ctor, args, ctor_kwargs = parse_class_record(info, storage.display(class_file))
    if not issubclass(ctor, cls):
        if ctor.__module__ == "__main__" and not _importable_as_main(ctor):
            raise main_module_class_error(ctor, cls, storage.display(root))
        stored = f"{ctor.__module__}.{ctor.__qualname__}"
        raise IncompatibleCheckpointError(
            f"The class {stored} stored in the checkpoint at {storage.display(root)} is "
            f"not a subclass of {cls.__module__}.{cls.__qualname__}."
            + component_directory_hint(storage, root, stored, cls),
            path=storage.display(root),
        )
    kwargs = dict(kwargs)
    shown = storage.display(class_file)
    try:
        parameters = inspect.signature(ctor).parameters
    except (TypeError, ValueError) as exc:
        raise IncompatibleCheckpointError(
            f"Cannot read the constructor signature of {_name_of(ctor)} stored in {shown} ({exc}).",
            path=shown,
        ) from exc
    for i, (name, param) in enumerate(parameters.items()):
        if name in kwargs:
            value = kwargs.pop(name)
            if param.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD and len(args) > i:
                args[i] = value
            else:
                ctor_kwargs[name] = value
    try:
        obj: Any = ctor(*args, **ctor_kwargs)
    except Exception as exc:
        hint = constructor_hint(ctor, args, ctor_kwargs) or (
            " The arguments do not fit this version of the class (pass the ones that "
            "changed to from_checkpoint as keywords), or the file was altered."
        )
        raise IncompatibleCheckpointError(
            f"Building {_name_of(ctor)} with the constructor arguments stored in {shown} "
            f"failed ({type(exc).__name__}: {exc}).{hint}",
            path=shown,
        ) from exc
    if is_ckptable_object(obj):
        kwargs.update(non_default_options(options))
    obj.restore_from_path(path, filesystem=filesystem, **kwargs)
    return obj  # type: ignore[no-any-return]


_name_of = class_name


def _importable_as_main(cls: type) -> bool:
    """Whether ``cls`` is this program's own ``__main__`` class of that name (a class
    stored by value and rebuilt in the process that defined it is that class itself)."""
    main = sys.modules.get("__main__")
    return getattr(main, cls.__qualname__, None) is cls


def _check_mmap(storage: Storage, root: str, options: RestoreOptions) -> None:
    if options.mmap and not isinstance(storage, LocalStorage):
        shown = storage.display(root)
        raise CheckpointError(
            f"mmap=True maps files of the local disk; {shown} is not on it (copy the "
            "checkpoint to a local directory first, or restore without mmap).",
            path=shown,
        )


def require_directory(storage: Storage, root: str) -> None:
    if storage.kind(root, follow_symlinks=True) == "dir":
        return
    # A save that died between the two steps of its publish leaves the old checkpoint
    # beside the target: put it back.
    recover_leftovers(storage, root)
    if storage.kind(root, follow_symlinks=True) != "dir":
        shown = storage.display(root)
        raise CheckpointNotFoundError(f"No checkpoint directory at {shown}.", path=shown)


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
                f"(it has: {', '.join(sorted(comps)) or 'none'}).{did_you_mean(name, comps)}",
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
        kwargs = {**kwargs, **non_default_options(options)}
    else:
        # Code other than ckptable's reads the files itself: verify them first, and
        # refuse safe mode, which that code cannot honour.
        refuse_foreign_in_safe_mode(options, comp, storage.display(root), component)
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
    push_to_actors(
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
        session = RestoreSession(storage, kwargs, options, unverified=list(report.unverified))
        session.warn_unverified()


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
