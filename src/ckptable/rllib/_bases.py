"""The base swap: RLlib's classes put ckptable's ``Checkpointable`` first in their MRO.

RLlib's own ``ray.rllib.utils.checkpoints.Checkpointable`` (the *original*) stays the
class every RLlib module refers to; only its direct subclasses change their bases, from
``original`` to :data:`RLlibCheckpointable`, a class deriving from ckptable's base and
then from the original. So ``isinstance(x, original)`` stays true everywhere, ckptable's
``save_to_path`` / ``restore_from_path`` / ``from_checkpoint`` win the method lookup, and
the RLlib-only helpers remain reachable. ``__bases__`` assignment keeps working because
the new base has the original's instance layout (both are plain ABCs): checked once.

Classes created later (RLlib modules imported afterwards, user classes) are swapped as
they are created, by an ``__init_subclass__`` set on the original. :func:`apply` checks
every class first, then swaps them all, and puts back every swap done so far if one
fails; :func:`revert` undoes exactly what :func:`apply` did.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any

from ckptable.errors import CheckpointError

__all__ = ["RLLIB_MODULE", "Swap", "apply", "get_adapter", "revert"]

#: The module defining RLlib's ``Checkpointable``.
RLLIB_MODULE = "ray.rllib.utils.checkpoints"

#: Methods whose presence on RLlib's class says it is the API ckptable replaces.
_EXPECTED_METHODS = (
    "save_to_path",
    "restore_from_path",
    "from_checkpoint",
    "get_state",
    "set_state",
    "get_ctor_args_and_kwargs",
    "get_metadata",
    "get_checkpointable_components",
)

_LAYOUT = ("__basicsize__", "__itemsize__", "__dictoffset__", "__weakrefoffset__")

#: CPython's ``Py_TPFLAGS_IMMUTABLETYPE``: such a type's ``__bases__`` cannot be set.
_IMMUTABLE = 1 << 8

_adapter: type | None = None


def get_adapter(original: type) -> type:
    """The class RLlib's classes derive from while ckptable is on (made once)."""
    global _adapter
    if _adapter is None:
        from ckptable._checkpointable import Checkpointable

        check_original(original)
        adapter = abc.ABCMeta(
            "RLlibCheckpointable",
            (Checkpointable, original),
            {
                "__module__": __name__,
                "__qualname__": "RLlibCheckpointable",
                "__doc__": "RLlib's Checkpointable with ckptable's methods first (see "
                ":mod:`ckptable.rllib`).",
            },
        )
        for name in _LAYOUT:
            if getattr(adapter, name) != getattr(original, name):
                raise CheckpointError(
                    f"ckptable.rllib cannot take effect: RLlib's {_name(original)} has an "
                    f"instance layout ({name}) that ckptable's base cannot take over."
                )
        _adapter = adapter
    return _adapter


def __getattr__(name: str) -> Any:
    """``RLlibCheckpointable`` by name, so that classes pickled by value (cloudpickle,
    Ray) that name it as a base load in any process."""
    if name == "RLlibCheckpointable":
        import importlib

        return get_adapter(importlib.import_module(RLLIB_MODULE).Checkpointable)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_original(original: Any) -> None:
    """Refuse an RLlib whose ``Checkpointable`` is not the API ckptable implements."""
    if not isinstance(original, type):
        raise CheckpointError(
            f"ckptable.rllib cannot take effect: {RLLIB_MODULE}.Checkpointable is "
            f"{type(original).__name__}, not a class."
        )
    missing = [name for name in _EXPECTED_METHODS if not callable(getattr(original, name, None))]
    if missing:
        raise CheckpointError(
            f"ckptable.rllib cannot take effect: RLlib's {_name(original)} lacks "
            f"{', '.join(missing)}: this version of Ray's RLlib has another checkpoint API "
            "(ckptable follows Ray 2.60's)."
        )


@dataclasses.dataclass
class Swap:
    """What :func:`apply` changed, for :func:`revert`."""

    original: type
    adapter: type
    #: Classes whose bases were changed, with their bases before.
    rebased: list[tuple[type, tuple[type, ...]]] = dataclasses.field(default_factory=list)
    #: Classes whose own ``save_to_path`` was wrapped into ckptable's staging, with it.
    wrapped: list[tuple[type, Any]] = dataclasses.field(default_factory=list)
    #: ``original.__dict__``'s ``__init_subclass__`` before (None: it had none).
    init_subclass: Any = None


def apply(original: type) -> Swap:
    """Swap the bases of every existing subclass of ``original`` and hook the creation
    of new ones; all or nothing."""
    adapter = get_adapter(original)
    swap = Swap(original, adapter, init_subclass=original.__dict__.get("__init_subclass__"))
    plan = [
        (cls, _swapped_bases(cls.__bases__, original, adapter))
        for cls in _direct_subclasses(original)
        if _needs_swap(cls, original, adapter)
    ]
    problems = [problem for cls, bases in plan for problem in _check_swap(cls, bases)]
    if problems:
        raise CheckpointError(
            "ckptable.rllib cannot take effect, nothing was changed: " + "; ".join(problems)
        )
    try:
        for cls, bases in plan:
            old = cls.__bases__
            try:
                cls.__bases__ = bases
            except Exception as exc:
                raise CheckpointError(
                    f"ckptable.rllib cannot take effect: the bases of {_name(cls)} cannot be "
                    f"changed ({type(exc).__name__}: {exc}); every class swapped before it "
                    "was put back, nothing was changed."
                ) from exc
            swap.rebased.append((cls, old))
        for sub in _subtree(adapter):
            _wrap_save_override(sub, swap)
        setattr(original, "__init_subclass__", classmethod(_init_subclass_hook))  # noqa: B010
    except BaseException:
        revert(swap)
        raise
    _clear_abc_caches(original, adapter)
    return swap


def revert(swap: Swap) -> None:
    """Undo :func:`apply`: the original bases (also of classes created meanwhile), the
    original ``save_to_path`` overrides and ``__init_subclass__``."""
    original, adapter = swap.original, swap.adapter
    if swap.init_subclass is None:
        if "__init_subclass__" in original.__dict__:
            delattr(original, "__init_subclass__")
    else:
        original.__init_subclass__ = swap.init_subclass  # type: ignore[method-assign]
    from ckptable._checkpointable import Checkpointable

    for cls, override in reversed(swap.wrapped):
        if cls.__dict__.get("save_to_path") is not override:
            cls.save_to_path = override
    for cls, old in reversed(swap.rebased):
        if cls.__bases__ != old:
            cls.__bases__ = old
    # Created while switched on: direct subclasses of the adapter, back onto the original,
    # and overrides that ckptable's __init_subclass__ wrapped, unwrapped.
    for late in _direct_subclasses(adapter):
        late.__bases__ = _swapped_bases(late.__bases__, adapter, original)
    for sub in _subtree(original):
        staged = sub.__dict__.get("save_to_path")
        if getattr(staged, "_ckptable_staged", False) and Checkpointable not in sub.__mro__:
            setattr(sub, "save_to_path", getattr(staged, "__wrapped__"))  # noqa: B009, B010
    swap.rebased.clear()
    swap.wrapped.clear()
    _clear_abc_caches(original, adapter)
    # Let the adapter go: nothing derives from it now (a later enable makes a new one).
    global _adapter
    if _adapter is adapter:
        _adapter = None


def _init_subclass_hook(cls: type, /, **kwargs: Any) -> None:
    """Set on RLlib's ``Checkpointable`` while switched on: a class created as its
    direct subclass is put on ckptable's base as it is created."""
    import ckptable.rllib._switch as switch

    swap = switch.current_swap()
    original: Any = swap.original if swap is not None else _original_of(cls)
    if swap is not None and cls is not swap.adapter and _needs_swap(cls, original, swap.adapter):
        bases = _swapped_bases(cls.__bases__, original, swap.adapter)
        problems = list(_check_swap(cls, bases))
        if problems:
            raise CheckpointError("ckptable.rllib: " + "; ".join(problems))
        cls.__bases__ = bases
        _wrap_save_override(cls, swap)
    super(original, cls).__init_subclass__(**kwargs)


def _original_of(cls: type) -> type:
    for base in cls.__mro__:
        if base.__module__ == RLLIB_MODULE and base.__qualname__ == "Checkpointable":
            return base
    raise TypeError(f"{_name(cls)} does not derive from RLlib's Checkpointable")


def _needs_swap(cls: type, original: type, adapter: type) -> bool:
    """A direct subclass of ``original`` whose MRO does not already put ckptable's base
    before RLlib's (classes mixing both bases in that order are on ckptable already)."""
    from ckptable._checkpointable import Checkpointable

    if cls is adapter or original not in cls.__bases__:
        return False
    mro = cls.__mro__
    return Checkpointable not in mro or mro.index(Checkpointable) > mro.index(original)


def _swapped_bases(bases: tuple[type, ...], old: type, new: type) -> tuple[type, ...]:
    return tuple(new if base is old else base for base in bases)


def _check_swap(cls: type, bases: tuple[type, ...]) -> Iterator[str]:
    """Why ``cls.__bases__ = bases`` would fail (without trying it)."""
    if cls.__flags__ & _IMMUTABLE:
        yield f"{_name(cls)} is an immutable type"
        return
    try:
        _c3([*bases])
    except TypeError as exc:
        yield f"{_name(cls)} would have no consistent method order ({exc})"


def _c3(bases: list[type]) -> list[type]:
    """C3 linearization of a class with ``bases`` (without the class itself)."""
    sequences = [list(base.__mro__) for base in bases] + [list(bases)]
    result: list[type] = []
    while any(sequences):
        sequences = [seq for seq in sequences if seq]
        for seq in sequences:
            head = seq[0]
            if not any(head in other[1:] for other in sequences):
                break
        else:
            names = ", ".join(_name(seq[0]) for seq in sequences)
            raise TypeError(f"cannot order {names}")
        result.append(head)
        for seq in sequences:
            if seq and seq[0] is head:
                del seq[0]
    return result


def _wrap_save_override(cls: type, swap: Swap) -> None:
    """What ckptable's ``__init_subclass__`` does for its own subclasses: a class's own
    ``save_to_path`` runs inside the staging session (see ``ckptable._checkpointable``).
    Not for Ray's actor classes, whose methods are copies of their base's."""
    from ckptable._checkpointable import _staged

    override = cls.__dict__.get("save_to_path")
    if (
        callable(override)
        and not getattr(override, "_ckptable_staged", False)
        and "__ray_actor_class__" not in cls.__dict__
    ):
        cls.save_to_path = _staged(override)  # type: ignore[attr-defined]
        swap.wrapped.append((cls, override))


def _subtree(root: type) -> Iterator[type]:
    seen: set[type] = set()
    stack: list[type] = [root]
    while stack:
        cls = stack.pop()
        for sub in _direct_subclasses(cls):
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                yield sub


def _direct_subclasses(cls: type) -> list[type]:
    subclasses: list[type] = type.__subclasses__(cls)
    return subclasses


def _clear_abc_caches(*classes: type) -> None:
    """``issubclass`` answers that ABCs cached before the swap are stale now."""
    from ckptable._checkpointable import Checkpointable

    for cls in (*classes, Checkpointable):
        clear = getattr(cls, "_abc_caches_clear", None)
        if clear is not None:
            clear()


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
