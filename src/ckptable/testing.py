"""Test helpers for checkpointable classes, usable with any test runner.

``assert_states_equal`` compares two states (nested dicts, lists, numpy arrays, ...) and
raises an ``AssertionError`` listing every difference by its key path; ``roundtrip``
saves an object, rebuilds it from the checkpoint and checks that the state survived.
This module does not import pytest: the fixtures built on it live in
``ckptable.pytest_plugin``.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ckptable._compare import Difference, state_differences

if TYPE_CHECKING:
    from ckptable._checkpointable import Checkpointable

__all__ = ["Difference", "assert_states_equal", "roundtrip", "state_differences"]

_C = TypeVar("_C", bound="Checkpointable")


def assert_states_equal(
    actual: Any,
    expected: Any,
    *,
    where: str = "state",
    same_types: bool = False,
    rtol: float = 0.0,
    atol: float = 0.0,
    max_differences: int | None = 20,
    msg: str | None = None,
) -> None:
    """Assert that two states are equal, listing every difference if they are not.

    Equality is that of ``state_differences``: numpy arrays by shape, dtype and
    values (NaN equals NaN), mappings key by key, a list equals a tuple with the same
    items unless ``same_types``.

    Args:
        actual: The state found (say, the restored object's ``get_state()``).
        expected: The state wanted (the original's).
        where: Name of the root in the paths of the message (``state['a'][0]``).
        same_types: Also require the same type at every node (``list`` vs ``tuple``,
            ``numpy.float32`` vs ``float``).
        rtol: Relative tolerance for numbers and numeric arrays (as ``numpy.isclose``).
        atol: Absolute tolerance for numbers and numeric arrays.
        max_differences: List at most this many differences (None: all).
        msg: A first line for the message (what was compared).

    Raises:
        AssertionError: the states differ; one line per difference,
            ``<path>: <detail>``, values shown as ``actual != expected``.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    limit = None if max_differences is None else max_differences + 1
    found = state_differences(
        actual, expected, where=where, limit=limit, same_types=same_types, rtol=rtol, atol=atol
    )
    if not found:
        return
    shown = found if max_differences is None else found[:max_differences]
    if len(found) > len(shown):
        count = f"more than {len(shown)} places (the first {len(shown)} shown)"
    else:
        count = "1 place" if len(found) == 1 else f"{len(found)} places"
    lines = [f"{where} differs from the expected state in {count}:"]
    lines.extend(f"  {difference}" for difference in shown)
    if msg:
        lines.insert(0, msg)
    raise AssertionError("\n".join(lines))


def roundtrip(
    obj: _C,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    components: str | Collection[str] | None = None,
    compare: bool = True,
    same_types: bool = False,
    rtol: float = 0.0,
    atol: float = 0.0,
    restore_kwargs: Mapping[str, Any] | None = None,
    map_location: Any = None,
    **save_kwargs: Any,
) -> _C:
    """Save ``obj`` to ``path``, rebuild it from the checkpoint and compare the states.

    Whole (``components=None``): ``type(obj).from_checkpoint(path)``, then the new
    object's ``get_state()`` must equal ``obj.get_state()``. This catches a key that
    ``set_state`` forgets, constructor arguments that do not rebuild the object, and
    state that a format cannot carry (``format="msgpack"`` turns tuples into lists:
    equal here unless ``same_types``).

    Partial (``components="learner/module"`` or a list of such paths): a fresh object is
    built from ``obj.get_ctor_args_and_kwargs()`` (copied, as the checkpoint stores
    them) and each component alone is restored into it, as RLlib users do:
    ``new.restore_from_path(<path>/learner/module, component="learner/module")``. Only
    the states of those components are compared: ``state['learner']['module']`` of
    both objects' ``get_state()`` (a component's state sits under its name in its
    parent's state). The rest of the new object is left as its constructor made it.

    Args:
        obj: The object to save.
        path: Where to save it (a directory that does not exist or is empty, or a URI).
        format: Name of a registered codec (``"cloudpickle"``, ``"msgpack"``, ...); the
            default is ``save_to_path``'s (cloudpickle).
        components: Component paths to restore alone instead of the whole object.
        compare: False returns the new object without comparing (for checks of your own).
        same_types: Passed to ``assert_states_equal``.
        rtol: Passed to ``assert_states_equal``.
        atol: Passed to ``assert_states_equal``.
        restore_kwargs: Keywords for ``from_checkpoint`` (whole) or
            ``restore_from_path`` (partial): ``safe=True``, ``mmap=True``,
            ``filesystem=...``, constructor overrides for ``from_checkpoint``, ...
        map_location: Where the restored object's torch tensors go, as in
            ``restore_from_path`` (short for ``restore_kwargs={"map_location": ...}``):
            a GPU object rebuilt on the CPU, say. Tensors on different devices do not
            compare equal: check such states yourself (``compare=False``).
        **save_kwargs: Keywords for ``save_to_path`` (``filesystem``, ``durable``,
            ``use_msgpack``, ...).

    Returns:
        The new object.

    Raises:
        AssertionError: the restored state differs; the message names the object, the
            checkpoint, the format and every difference.
    """
    __tracebackhide__ = True
    restore_options = dict(restore_kwargs or {})
    if map_location is not None:
        restore_options["map_location"] = map_location
    if format is not None:
        save_kwargs["format"] = format
    saved = obj.save_to_path(path, **save_kwargs)
    selected = _component_list(components)
    new: _C
    if not selected:
        new = type(obj).from_checkpoint(saved, **restore_options)
    else:
        new = _fresh_copy(obj)
        for component in selected:
            new.restore_from_path(
                _component_path(saved, component), component=component, **restore_options
            )
    if not compare:
        return new
    cls = type(obj)
    shown_format = format or ("msgpack" if save_kwargs.get("use_msgpack") else "default")
    header = (
        f"Roundtrip of {cls.__module__}.{cls.__qualname__} through {saved} "
        f"(format: {shown_format}"
        + (f", components: {', '.join(selected)}" if selected else "")
        + "): the restored state is not the saved one."
    )

    def check(restored: Any, original: Any, where: str = "state") -> None:
        __tracebackhide__ = True
        assert_states_equal(
            restored,
            original,
            where=where,
            same_types=same_types,
            rtol=rtol,
            atol=atol,
            msg=header,
        )

    if not selected:
        check(new.get_state(), obj.get_state())
        return new
    restored_state, original_state = new.get_state(), obj.get_state()
    for component in selected:
        check(
            _sub_state(restored_state, component, "restored object"),
            _sub_state(original_state, component, "original object"),
            "state" + "".join(f"[{part!r}]" for part in component.split("/")),
        )
    return new


def _component_list(components: str | Collection[str] | None) -> list[str]:
    if components is None:
        return []
    if isinstance(components, str):
        return [components]
    return list(components)


def _fresh_copy(obj: _C) -> _C:
    """A new object built as ``from_checkpoint`` builds one, before any state is set."""
    import cloudpickle

    args, kwargs = cloudpickle.loads(cloudpickle.dumps(obj.get_ctor_args_and_kwargs()))
    return type(obj)(*args, **kwargs)


def _component_path(path: str, component: str) -> str:
    """The directory of ``component``'s own checkpoint inside the checkpoint at ``path``."""
    if "://" in path:
        base, _, query = path.partition("?")
        joined = base.rstrip("/") + "/" + component
        return f"{joined}?{query}" if query else joined
    return os.path.join(path, *component.split("/"))


def _sub_state(state: Any, component: str, whose: str) -> Any:
    """The part of ``state`` that ``component`` holds (its names as nested keys)."""
    where = "state"
    for name in component.split("/"):
        if not isinstance(state, Mapping) or name not in state:
            raise AssertionError(
                f"The {whose}'s get_state() has no {where}[{name!r}] for component "
                f"{component!r}: a component's state belongs under its name."
            )
        state = state[name]
        where += f"[{name!r}]"
    return state
