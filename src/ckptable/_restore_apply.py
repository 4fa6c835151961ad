"""Step 3 of a restore: upgrade old states, restore actor components, apply the rest.

``set_state`` runs children before parent (as in RLlib), then on the components that
appeared during the parent's ``set_state``. A ``set_state`` that raises is reported with
the level, the class and the state version (:class:`ckptable.errors.SetStateError`);
with ``rollback=True`` the levels already applied first get back the states they had.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from ckptable._components import (
    is_actor_manager,
    is_ckptable_object,
    uses_ckptable_method,
)
from ckptable._restore_decode import decode_tree
from ckptable._restore_read import check_restorable, check_state_version, read_level
from ckptable._restore_session import AppliedLevel, Level, RestoreOptions, RestoreSession
from ckptable._storage import Storage
from ckptable.errors import (
    CheckpointError,
    IncompatibleCheckpointError,
    SetStateError,
)

if TYPE_CHECKING:
    from ckptable._checkpointable import Checkpointable

__all__ = [
    "apply_level",
    "apply_tree",
    "push_to_actors",
    "restore_actor_tree",
    "upgrade_tree",
]

logger = logging.getLogger("ckptable")


def upgrade_tree(session: RestoreSession, obj: Any, level: Level) -> None:
    """Run ``upgrade_state`` on every decoded level of ``obj``'s tree saved at an older
    ``STATE_VERSION``: all of them before the first ``set_state``."""
    if level.deferred or not is_ckptable_object(obj):
        return
    comps = dict(obj.get_checkpointable_components())
    for name, child in level.children.items():
        if name in comps:
            upgrade_tree(session, comps[name], child)
    _upgrade_level(session, obj, level)


def _upgrade_level(session: RestoreSession, obj: Any, level: Level) -> None:
    if level.upgraded or level.deferred or level.codec is None:
        return
    storage = session.storage
    stored, current = check_state_version(storage, level.path, obj, level.record)
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


def apply_tree(session: RestoreSession, obj: Checkpointable, level: Level) -> None:
    """Step 3 for a whole tree (the outermost restore): ``apply_level``, and on any
    failure roll back what was applied (``rollback=True``) or say what was left."""
    start = len(session.applied)
    try:
        apply_level(session, obj, level)
    except BaseException as exc:
        applied = session.applied[start:]
        del session.applied[start:]
        error = exc
        if isinstance(exc, RecursionError):
            shown = session.storage.display(level.path)
            error = CheckpointError(
                f"The tree restored from {shown} nests its components too deeply for "
                f"Python's recursion limit ({exc}).",
                path=shown,
            )
        if session.options.rollback:
            _roll_back(session, applied, error)
        elif isinstance(error, CheckpointError) and applied:
            done = applied[:-1] if isinstance(error, SetStateError) else applied
            _append(error, _left_applied(session, done))
        if error is not exc:
            raise error from exc
        raise


def apply_level(session: RestoreSession, obj: Checkpointable, level: Level) -> None:
    """Restore ``obj`` from an already decoded level: children, then ``obj``, then late ones."""
    _upgrade_level(session, obj, level)  # done already unless the component came late
    before = list(obj.get_checkpointable_components())
    for name, comp in before:
        child = level.children.get(name)
        if child is not None:
            _apply_component(session, comp, child)
    _set_state(session, obj, level, [name for name, _ in before])

    before_names = {name for name, _ in before}
    after = list(obj.get_checkpointable_components())
    late = [(name, comp) for name, comp in after if name not in before_names]
    for name, comp in late:
        # Components created by set_state: checked like the others (safe mode refuses
        # one that restores itself with its own code) before any of them is restored.
        if name in level.children or name in level.subdirs:
            check_restorable(session, obj, name, comp, session.storage.join(level.path, name))
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


def _set_state(session: RestoreSession, obj: Any, level: Level, component_names: list[str]) -> None:
    """``obj.set_state`` with the level's state; a failure becomes ``SetStateError``.

    With ``rollback=True`` the object's own state (without its components, which are
    levels of their own) is taken first, deep-copied: ``get_state`` may hand out live
    references that ``set_state`` then changes in place.
    """
    if level.codec is None:  # read as foreign, never decoded: never set_state(None)
        shown = session.storage.display(level.path)
        raise CheckpointError(
            f"{_class_name(obj)} has no decoded state for {shown} (its restore_from_path "
            "is not ckptable's, so ckptable left the level to it); its set_state was not "
            "called. In Ray workers, switch RLlib onto ckptable there too: "
            "ckptable.rllib.enable() before ray.init().",
            path=shown,
            component=session.component_of(level.path),
        )
    previous = None
    if session.options.rollback:
        previous = _own_state(session, obj, level, component_names)
    session.applied.append(AppliedLevel(obj, level.path, previous))
    try:
        obj.set_state(level.state)
    except Exception as exc:
        raise _set_state_error(session, obj, level, "set_state", exc) from exc


def _own_state(
    session: RestoreSession, obj: Any, level: Level, component_names: list[str]
) -> dict[str, Any]:
    try:
        state = obj.get_state(not_components=component_names) if component_names else None
        if state is None:
            state = obj.get_state()
        return dict(copy.deepcopy(state))
    except Exception as exc:
        shown = session.storage.display(level.path)
        raise CheckpointError(
            f"rollback=True: {_class_name(obj)}.get_state() failed ({type(exc).__name__}: "
            f"{exc}), so its state could not be kept for a rollback; nothing of "
            f"{shown} was set.",
            path=shown,
            component=session.component_of(level.path),
        ) from exc


def _set_state_error(
    session: RestoreSession, obj: Any, level: Level, method: str, exc: BaseException
) -> SetStateError:
    component = session.component_of(level.path)
    where = f"component {component!r}" if component else "the root level"
    record = level.record or {}
    version = record.get("state_version", 1)
    shown = session.storage.display(level.path)
    stored = record.get("class")
    saved_from = f"saved from {stored}, " if isinstance(stored, str) else ""
    other_class = ""
    if isinstance(stored, str) and stored not in {_name(c) for c in type(obj).__mro__}:
        other_class = (
            f" The level was saved from {stored}, not from {_class_name(obj)}: check that "
            f"{shown} is the checkpoint (or component directory) you meant."
        )
    return SetStateError(
        f"{_class_name(obj)}.{method} failed restoring {where} of the checkpoint "
        f"({saved_from}state version {version}, from {shown}): {type(exc).__name__}: "
        f"{exc}.{other_class}",
        path=shown,
        component=component,
        class_name=_class_name(obj),
    )


def _class_name(obj: Any) -> str:
    return _name(type(obj))


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _roll_back(session: RestoreSession, applied: list[AppliedLevel], exc: BaseException) -> None:
    """Give every level in ``applied`` its previous state back, the last applied first
    (the failed one included: its ``set_state`` may have changed part of it)."""
    failures: list[str] = []
    for entry in reversed(applied):
        if entry.previous is None:
            continue
        try:
            entry.obj.set_state(entry.previous)
        except Exception as undo_exc:
            failures.append(
                f"{_where(session, entry.path)} ({type(undo_exc).__name__}: {undo_exc})"
            )
    if not isinstance(exc, CheckpointError):
        return
    if isinstance(exc, SetStateError):
        exc.rolled_back = not failures
    if failures:
        _append(
            exc,
            f"Rolling back failed for {', '.join(failures)}: those levels may be left "
            "partly restored.",
        )
    elif applied:
        count = len(applied)
        _append(
            exc,
            f"rollback=True: the {count} level{'s' if count != 1 else ''} set so far "
            f"{'were' if count != 1 else 'was'} given back {'their' if count != 1 else 'its'}"
            " previous state.",
        )
    if session.actors_restored:
        _append(exc, _actors_note(session))


def _left_applied(session: RestoreSession, done: list[AppliedLevel]) -> str:
    text = (
        f"{len(done)} level{'s' if len(done) != 1 else ''} had been restored before it "
        f"({', '.join(_where(session, e.path) for e in done[:5])}"
        f"{', ...' if len(done) > 5 else ''}): the object is partly restored; pass "
        "rollback=True to give them back their previous states on failure."
        if done
        else "Nothing else had been set."
    )
    if session.actors_restored:
        text += " " + _actors_note(session)
    return text


def _actors_note(session: RestoreSession) -> str:
    names = sorted(_where(session, path) for path in session.actors_restored)
    return (
        f"The actor components {', '.join(names)} had been restored before any set_state "
        "and are not rolled back."
    )


def _where(session: RestoreSession, path: str) -> str:
    component = session.component_of(path)
    return repr(component) if component else "the root level"


def _append(exc: CheckpointError, text: str) -> None:
    message = str(exc.args[0]) if exc.args else ""
    exc.args = (f"{message} {text}".strip(), *exc.args[1:])


def _apply_component(session: RestoreSession, comp: Any, level: Level) -> None:
    if is_actor_manager(comp):
        if level.path not in session.actors_restored:  # a component that came late
            _restore_actors(session, comp, level)
        return
    if uses_ckptable_method(comp, "restore_from_path"):
        apply_level(session, comp, level)
        return
    if level.codec is not None:  # decoded: a ckptable restore it reaches takes it as is
        session.prepared[level.path] = level
    try:
        # Code other than ckptable's own restore gets a filesystem object, as from RLlib.
        comp.restore_from_path(
            level.path, filesystem=session.storage.user_filesystem(), **session.kwargs
        )
    except CheckpointError:
        raise
    except Exception as exc:
        # Its own code: no rollback of what it set (its state was not taken), but the
        # error says which component and class failed.
        session.applied.append(AppliedLevel(comp, level.path, None))
        raise _set_state_error(session, comp, level, "restore_from_path", exc) from exc
    finally:
        session.prepared.pop(level.path, None)


def restore_actor_tree(session: RestoreSession, obj: Any, level: Level) -> None:
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


def _restore_actors(session: RestoreSession, manager: Any, level: Level) -> None:
    storage = session.storage
    where = f"the actor component at {storage.display(level.path)}"
    push_to_actors(manager, storage, level.path, None, where, session.options, session.kwargs)
    session.actors_restored.add(level.path)


def push_to_actors(
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
