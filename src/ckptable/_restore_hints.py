"""Common slips before a restore, recognised and explained with what to do instead.

Each check runs before anything of the user's object is set, and costs no I/O unless
the slip is likely:

- a component's directory restored into the whole object, ``component=`` forgotten
  (``refuse_component_directory``): the path's last names are a component path of the
  object, the directory above them is a checkpoint, and the level was saved from another
  class than the object's;
- a ``CheckpointManager``'s directory given as a checkpoint
  (``manager_directory_error``, ``ckptable._manager_listing``'s rule): no level files of
  its own, and ``checkpoint_<step>`` directories or what a save of one leaves; an empty
  directory is said to be empty;
- a class defined in ``__main__`` of the saving script, stored by value, met by
  ``from_checkpoint`` of another program (``main_module_class_error``);
- a class without ``get_ctor_args_and_kwargs`` whose constructor needs arguments
  (``constructor_hint``).
"""

from __future__ import annotations

import inspect
from typing import Any

from ckptable._info import stored_class_name
from ckptable._layout import DEFAULT_CLASS_FILE, DEFAULT_METADATA_FILE, loads_json
from ckptable._manager_listing import empty_directory_error
from ckptable._manager_listing import manager_directory_error as manager_directory_error_of
from ckptable._storage import Storage
from ckptable.errors import CheckpointError, CheckpointNotFoundError, IncompatibleCheckpointError

__all__ = [
    "component_directory_hint",
    "constructor_hint",
    "enclosing_checkpoint",
    "main_module_class_error",
    "manager_directory_error",
    "refuse_component_directory",
]

#: How many directory names above the checkpoint are tried as a component path.
_MAX_COMPONENT_DEPTH = 8
#: A metadata file bigger than this is not read for a hint.
_MAX_METADATA_BYTES = 1 << 20


def class_name(cls: type) -> str:
    """``module.QualName`` of ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _component_at(obj: Any, names: list[str]) -> Any | None:
    """The component of ``obj`` at the path ``names``, or None if it has none there."""
    current = obj
    for name in names:
        lister = getattr(current, "get_checkpointable_components", None)
        if not callable(lister):
            return None
        try:
            components = dict(lister())
        except Exception:  # user code: the restore itself will report it
            return None
        if name not in components:
            return None
        current = components[name]
    return current


def refuse_component_directory(storage: Storage, root: str, obj: Any) -> None:
    """Refuse ``obj.restore_from_path(<a component's directory>)`` without ``component=``.

    Raised only on evidence: the last names of ``root`` are a component path of ``obj``
    (``ckpt/optimizer`` and ``obj`` has a component ``optimizer``), the directory above
    them is a checkpoint level, and ``root`` was saved from another class than
    ``obj``'s own (a base or a subclass of it included: ``Model(Params)`` with a
    component ``optimizer`` of class ``Params`` would otherwise take the optimizer's
    state into the root). Levels that record no class (pickled by value, or without a
    class file), and levels saved from exactly ``obj``'s class (a subtree restored into
    a node of its own class), restore as before; so does any level without that path
    evidence.

    Raises:
        IncompatibleCheckpointError: naming both classes, with the ``component=`` call
            and ``from_checkpoint`` to use instead.
    """
    try:
        top_names = {name for name, _ in obj.get_checkpointable_components()}
    except Exception:  # user code: the restore itself will report it
        return
    if not top_names:
        return
    names: list[str] = []
    current = root
    found: tuple[str, list[str], Any] | None = None
    for _ in range(_MAX_COMPONENT_DEPTH):
        parent, name = storage.split(current)
        if not name or parent == current:
            break
        names.insert(0, name)
        current = parent
        if name not in top_names:
            continue  # no I/O unless the path's names start with a component's name
        component = _component_at(obj, names)
        if component is not None and _is_level(storage, parent, obj):
            found = (parent, list(names), component)  # the longest path wins
    if found is None:
        return
    parent, path_names, component = found
    try:
        stored = stored_class_name(
            storage,
            root,
            getattr(component, "METADATA_FILE_NAME", DEFAULT_METADATA_FILE),
            getattr(component, "CLASS_AND_CTOR_ARGS_FILE_NAME", DEFAULT_CLASS_FILE),
        )
    except (CheckpointError, OSError):
        return  # damaged: the restore's own reading reports it, naming the file
    if stored is None or stored == class_name(type(obj)):
        return
    shown = storage.display(root)
    relative = "/".join(path_names)
    short = stored.rsplit(".", 1)[-1]
    raise IncompatibleCheckpointError(
        f"{shown} is the checkpoint of component {relative!r} (a {stored}) inside the "
        f"checkpoint {storage.display(parent)}, not a checkpoint of "
        f"{class_name(type(obj))}: restoring it into the whole object would hand the "
        f"component's state to {type(obj).__name__}.set_state. To restore that component "
        f"alone, pass component={relative!r}: obj.restore_from_path({shown!r}, "
        f"component={relative!r}); to build a new {short} from it: "
        f"{short}.from_checkpoint({shown!r}). Nothing was restored.",
        path=shown,
        component=relative,
    )


def enclosing_checkpoint(storage: Storage, root: str) -> tuple[str, str] | None:
    """``(checkpoint, component path)`` if ``root`` is a component's directory inside a
    checkpoint (its parents up to the checkpoint are checkpoint levels), else None."""
    found: tuple[str, str] | None = None
    names: list[str] = []
    current = root
    try:
        for _ in range(_MAX_COMPONENT_DEPTH):
            parent, name = storage.split(current)
            if not name or parent == current or not _lists_component(storage, parent, name):
                break
            names.insert(0, name)
            current = parent
            found = (parent, "/".join(names))
    except (CheckpointError, OSError, ValueError):
        pass
    return found


def _lists_component(storage: Storage, directory: str, name: str) -> bool:
    """Whether ``directory`` is a checkpoint level with a component ``name`` (as its
    ckptable record lists them; a level without one: any directory in it)."""
    metadata = storage.join(directory, DEFAULT_METADATA_FILE)
    if storage.kind(metadata) != "file":
        return storage.kind(storage.join(directory, DEFAULT_CLASS_FILE)) == "file"
    if storage.size(metadata) > _MAX_METADATA_BYTES:
        return False
    record = loads_json(storage.read_bytes(metadata))
    listed = record.get("ckptable", {}).get("components") if isinstance(record, dict) else None
    if isinstance(listed, list):
        return name in listed
    return True


def component_directory_hint(storage: Storage, root: str, stored: str, cls: type) -> str:
    """For ``cls.from_checkpoint(root)`` meeting the class ``stored`` where ``root`` is a
    component's directory: what it is and the two calls that work ("" if it is not)."""
    found = enclosing_checkpoint(storage, root)
    if found is None:
        return ""
    parent, component = found
    shown, parent_shown = storage.display(root), storage.display(parent)
    short = stored.rsplit(".", 1)[-1]
    return (
        f" {shown} is the directory of component {component!r} of the checkpoint at "
        f"{parent_shown}: build that component with {short}.from_checkpoint({shown!r}), "
        f"or the whole object with {cls.__name__}.from_checkpoint({parent_shown!r})."
    )


def _is_level(storage: Storage, directory: str, obj: Any) -> bool:
    """Whether ``directory`` holds a checkpoint level of ``obj``'s file names."""
    for attribute, default in (
        ("METADATA_FILE_NAME", DEFAULT_METADATA_FILE),
        ("CLASS_AND_CTOR_ARGS_FILE_NAME", DEFAULT_CLASS_FILE),
    ):
        name = getattr(obj, attribute, None) or default
        if storage.kind(storage.join(directory, name)) == "file":
            return True
    return False


def manager_directory_error(
    storage: Storage, root: str, *, building: bool = False
) -> CheckpointNotFoundError | None:
    """The error for a ``CheckpointManager``'s directory (or an empty directory) given
    as a checkpoint, or None if ``root`` is neither (the rule and the message are
    ``ckptable._manager_listing``'s, shared by every reader of checkpoints).

    ``building``: the caller is ``from_checkpoint`` (else ``restore_from_path``).
    """
    shown = storage.display(root)

    def todo(newest: str | None) -> str:
        if newest is None:
            return "There is nothing to restore from it until a save completes."
        if building:
            return (
                f"Pass one of the checkpoints inside it to from_checkpoint, e.g. the newest "
                f"complete one: {newest} (CheckpointManager({shown!r}).latest() gives its path)."
            )
        return (
            f"Restore the newest with CheckpointManager({shown!r}).restore_latest(obj), or "
            f"pass one of the checkpoints inside it, e.g. {newest}."
        )

    try:
        entries = storage.listdir(root)
    except OSError:
        return None
    return manager_directory_error_of(storage, root, todo, entries=entries) or (
        empty_directory_error(storage, root, entries)
    )


def main_module_class_error(stored: type, cls: type, shown: str) -> IncompatibleCheckpointError:
    """The error for ``cls.from_checkpoint`` meeting ``stored``, a copy of a class defined
    in ``__main__`` of the program that saved the checkpoint (pickled by value)."""
    name = stored.__qualname__
    same = cls.__module__ == "__main__" and cls.__qualname__ == name
    other = (
        f"this program's {name} (also __main__.{name}) is another class, even if its code "
        "is the same"
        if same
        else f"it is not {class_name(cls)} or a subclass of it"
    )
    return IncompatibleCheckpointError(
        f"The class __main__.{name} stored in the checkpoint at {shown} was defined in "
        f"__main__ of the script that saved it, so cloudpickle stored a copy of its code; "
        f"{other}. Define {name} in a module that both scripts import (from mymodule "
        f"import {name}) and save the checkpoint again. To use this checkpoint as it is: "
        f"restore it into an object you build, {cls.__name__}(...).restore_from_path(path), "
        "or build the stored copy with ckptable.Checkpointable.from_checkpoint(path).",
        path=shown,
    )


def constructor_hint(ctor: type, args: Any, kwargs: Any) -> str:
    """Advice for a failed ``ctor(*args, **kwargs)`` with arguments stored by the default
    ``get_ctor_args_and_kwargs`` (none): "" if it does not apply."""
    method = getattr(ctor, "get_ctor_args_and_kwargs", None)
    default = (
        getattr(method, "__module__", None) == "ckptable._checkpointable"
        and getattr(method, "__qualname__", None) == "Checkpointable.get_ctor_args_and_kwargs"
    )
    if args or kwargs or not default:
        return ""
    try:
        parameters = inspect.signature(ctor).parameters.values()
    except (TypeError, ValueError):
        return ""
    required = [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if not required:
        return ""
    listed = ", ".join(f"{name}=..." for name in required)
    return (
        f" {ctor.__name__} does not define get_ctor_args_and_kwargs(), so the checkpoint "
        f"stores no constructor arguments, but its constructor needs {', '.join(required)}: "
        f"pass them to from_checkpoint ({ctor.__name__}.from_checkpoint(path, {listed})), "
        "or define get_ctor_args_and_kwargs() to return them and save again."
    )
