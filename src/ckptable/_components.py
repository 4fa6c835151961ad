"""Component names and component paths.

A component name becomes one directory name inside the checkpoint, so it is checked
before anything is written or read: it must be a single, plain path segment. A
component path (``"learner_group/learner/rl_module"``) is a ``/``-joined chain of names.
The helpers ``check_component`` / ``get_subcomponents`` are the selection rules of
RLlib's ``Checkpointable._check_component`` / ``_get_subcomponents``.
"""

from __future__ import annotations

import difflib
import threading
import warnings
from collections.abc import Collection, Iterable
from typing import Any

from ckptable.errors import InvalidComponentNameError, UnknownComponentWarning

__all__ = [
    "MAX_NAME_BYTES",
    "RESERVED_PREFIX",
    "check_component",
    "did_you_mean",
    "force_list",
    "get_subcomponents",
    "is_actor_manager",
    "is_ckptable_object",
    "runs_ckptable_method",
    "split_component_path",
    "uses_ckptable_method",
    "validate_component_name",
    "warn_unknown_selection",
]

#: Longest component name, in UTF-8 bytes (the usual filesystem limit for one name).
MAX_NAME_BYTES = 255

#: Names starting with this belong to ckptable itself (staging directories, manifest).
RESERVED_PREFIX = ".ckptable"


def force_list(elements: Any) -> list[Any]:
    """``None`` → ``[]``; list/tuple/set → list; anything else → ``[elements]``."""
    if elements is None:
        return []
    if isinstance(elements, (list, tuple, set, frozenset)):
        return list(elements)
    return [elements]


def validate_component_name(
    name: object,
    *,
    path: str | None = None,
    where: str | None = None,
    reserved: Iterable[str] = (),
) -> str:
    """Return ``name`` if it is safe as one directory name inside a checkpoint.

    Refused: non-strings, the empty string, ``.`` and ``..``, anything holding a path
    separator or NUL, names longer than ``MAX_NAME_BYTES``, names reserved by ckptable,
    and the level's own file names given in ``reserved``. ``where`` (the checkpoint and
    parent component, for the message) defaults to ``path``.

    Raises:
        InvalidComponentNameError: naming the bad name and, if given, the checkpoint path.
    """

    def refuse(why: str) -> InvalidComponentNameError:
        place = where or path
        return InvalidComponentNameError(
            f"Invalid component name {name!r}{f' ({place})' if place else ''}: {why}.",
            path=path,
            component=str(name),
        )

    if not isinstance(name, str):
        raise refuse(f"component names must be str, not {type(name).__name__}")
    if name in ("", ".", ".."):
        raise refuse("empty, '.' and '..' are not component names")
    if "/" in name or "\\" in name:
        raise refuse("a component name is one directory name and holds no path separator")
    if "\x00" in name:
        raise refuse("a component name may not contain NUL")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise refuse(f"longer than {MAX_NAME_BYTES} bytes")
    if name.startswith(RESERVED_PREFIX):
        raise refuse(f"names starting with {RESERVED_PREFIX!r} are reserved by ckptable")
    if name in reserved:
        raise refuse("it collides with a file of the checkpoint level itself")
    return name


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """``" Did you mean 'policy'?"`` for a mistyped component ``name`` among ``names``
    (close matches by ``difflib``, at most three); ``""`` if none is close."""
    matches = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    if not matches:
        return ""
    return f" Did you mean {' or '.join(repr(match) for match in matches)}?"


def split_component_path(component: str) -> list[str]:
    """Split ``"a/b/c"`` into validated names; a bad segment raises InvalidComponentNameError."""
    if not isinstance(component, str) or not component:
        raise InvalidComponentNameError(
            f"Invalid component path {component!r}: expected 'name' or 'name/subname'.",
            component=str(component),
        )
    return [validate_component_name(part) for part in component.split("/")]


def check_component(
    name: str,
    components: str | Collection[str] | None,
    not_components: str | Collection[str] | None,
) -> bool:
    """True if ``name`` is selected by ``components`` and not excluded by ``not_components``.

    ``components=None`` selects everything; a selection ``"name/sub"`` selects ``name``
    (so that its sub-state can be asked for further down).
    """
    comp_list = force_list(components)
    not_comp_list = force_list(not_components)
    selected = (
        components is None or name in comp_list or any(c.startswith(name + "/") for c in comp_list)
    )
    return selected and (not_components is None or name not in not_comp_list)


def get_subcomponents(name: str, components: str | Collection[str] | None) -> list[str] | None:
    """The selections below ``name``: ``["a/x", "a/y", "b"]`` → ``["x", "y"]`` for ``"a"``.

    ``None`` (select everything) when ``components`` is None or nothing below ``name``
    is selected.
    """
    if components is None:
        return None
    prefix = name + "/"
    subcomponents = [c[len(prefix) :] for c in force_list(components) if c.startswith(prefix)]
    return subcomponents or None


def uses_ckptable_method(component: object, method: str) -> bool:
    """True if ``component``'s ``method`` (``save_to_path``, ``restore_from_path``) is
    ckptable's own: not overridden, and not RLlib's or another library's.

    The pipelines run such components directly; any other method is called, as RLlib
    calls it, because it may do work of its own (RLlib's Algorithm syncs weights after
    a restore).
    """
    function = getattr(type(component), method, None)
    return (
        getattr(function, "__module__", None) == "ckptable._checkpointable"
        and getattr(function, "__qualname__", None) == f"Checkpointable.{method}"
    )


def runs_ckptable_method(component: object, method: str) -> bool:
    """True if calling ``component.<method>`` (``save_to_path``, ``restore_from_path``)
    runs ckptable's pipeline, decided by the function the call really finds, not only by
    the class's bases: Ray copies the driver's methods onto actor classes, so an actor
    may run ckptable's method over RLlib's bases, or RLlib's over ckptable's.

    ckptable's own function (or a copy of it) → True; RLlib's base function → False; an
    override (which calls ``super()``) → whether its class derives from
    ``ckptable.Checkpointable`` (checked by name: this module sits below the one
    defining the class).
    """
    function = getattr(type(component), method, None)
    if getattr(function, "__qualname__", None) == f"Checkpointable.{method}":
        module = getattr(function, "__module__", None)
        if module == "ckptable._checkpointable":
            return True
        if module == "ray.rllib.utils.checkpoints":
            return False
    return any(
        cls.__module__ == "ckptable._checkpointable" and cls.__qualname__ == "Checkpointable"
        for cls in type(component).__mro__
    )


def is_ckptable_object(component: object) -> bool:
    """True if restoring ``component`` runs ckptable's pipeline (see
    :func:`runs_ckptable_method`): its levels are then read, decoded and applied by
    ckptable; any other object restores itself with its own ``restore_from_path``."""
    return runs_ckptable_method(component, "restore_from_path")


def is_actor_manager(component: object) -> bool:
    """True if ``component`` is a manager of Ray actors that hold the component's state
    (RLlib's ``FaultTolerantActorManager``, ``ckptable.ray.RayActorManager``): duck-typed,
    so that the core never imports Ray. Saved and restored by ``ckptable.ray``."""
    return (
        not is_ckptable_object(component)
        and not callable(getattr(component, "save_to_path", None))
        and callable(getattr(component, "healthy_actor_ids", None))
        and callable(getattr(component, "foreach_actor", None))
    )


#: Per class: the names ``_check_component`` was asked about (a selection naming one is
#: a state key the class selects by, not a typo), and the (class, name) pairs already
#: checked or warned about. Bounded: cleared when full.
_ASKED: dict[type, set[str]] = {}
_CHECKED: set[tuple[type, str]] = set()
_MAX_REMEMBERED = 4096
_REMEMBER_LOCK = threading.Lock()


def warn_unknown_selection(
    obj: Any,
    name: str,
    components: str | Collection[str] | None,
    not_components: str | Collection[str] | None,
) -> None:
    """Warn (``UnknownComponentWarning``, once per class and name) when a selection's
    first name is no component of ``obj`` (``get_checkpointable_components``), no name
    ``_check_component`` was asked about for its class, and close to a component's name.

    RLlib ignores unknown names silently, so nothing is raised; names that are close to
    no component are not warned about (a class may select state keys that are not
    components). Costs one call of ``get_checkpointable_components`` per class and
    new name.
    """
    cls = type(obj)
    with _REMEMBER_LOCK:
        if len(_CHECKED) > _MAX_REMEMBERED or len(_ASKED) > _MAX_REMEMBERED:
            _CHECKED.clear()
            _ASKED.clear()
        asked = _ASKED.setdefault(cls, set())
        asked.add(name)
        given = [c for c in (*force_list(components), *force_list(not_components))]
        new = sorted(
            {first for c in given if isinstance(c, str) and (first := c.split("/", 1)[0])} - asked
        )
        new = [n for n in new if (cls, n) not in _CHECKED]
        if not new:
            return
        _CHECKED.update((cls, n) for n in new)
    lister = getattr(obj, "get_checkpointable_components", None)
    try:
        names = [str(n) for n, _ in lister()] if callable(lister) else []
    except Exception:  # user code: whatever it raises, the selection goes on as RLlib's
        return
    for selected in new:
        if selected in names:
            continue
        hint = did_you_mean(selected, names)
        if hint:
            warnings.warn(
                UnknownComponentWarning(
                    f"{selected!r} (in components= or not_components=) names no component "
                    f"of {cls.__module__}.{cls.__qualname__}, whose components are "
                    f"{', '.join(map(repr, names))}: it selects nothing.{hint}",
                    component=selected,
                ),
                stacklevel=3,
            )
