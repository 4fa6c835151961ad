"""The class tree the benchmark checkpoints, built once per base class.

``make_tree_classes(Base)`` writes a two-level tree (a ``Root`` holding many ``Leaf``
components) on top of either ``ckptable.Checkpointable`` or RLlib's ``Checkpointable``,
so both implementations save exactly the same objects. ``Root.get_state`` is written the
RLlib way: it loops over its leaves with ``_check_component`` and asks only the selected
ones for their state, which is what makes RLlib's save quadratic on wide trees (it calls
``get_state(components=name)`` once per component).

The classes live here, as module attributes with matching ``__qualname__``, and not in
the benchmark script: cloudpickle pickles classes of ``__main__`` by value, which would be
slow and would not be what users' code sees.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from ray.rllib.utils.checkpoints import Checkpointable as RLlibCheckpointable

import ckptable

__all__ = [
    "CkLeaf",
    "CkRoot",
    "Payload",
    "RlLeaf",
    "RlRoot",
    "build_root",
    "leaf_name",
    "make_tree_classes",
]

#: One leaf's data: raw bytes (wide workload) or a numpy array (big workload).
Payload = bytes | np.ndarray
Selection = str | Collection[str] | None


def leaf_name(index: int, count: int) -> str:
    """The component name of leaf ``index`` of ``count`` (``leaf_0007``): sorts in order."""
    return f"leaf_{index:0{max(4, len(str(count - 1)))}d}"


def make_tree_classes(base: type[Any], prefix: str) -> tuple[type[Any], type[Any]]:
    """``(Leaf, Root)`` subclassing ``base``, named ``{prefix}Leaf`` and ``{prefix}Root``.

    The caller must bind the returned classes to module attributes of those names (this
    module does, at import), so that pickle finds them by reference.
    """

    class Leaf(base):  # type: ignore[misc]
        """A component without components whose whole state is one payload."""

        def __init__(self, payload: Payload | None = None) -> None:
            self.payload = payload

        def get_state(
            self,
            components: Selection = None,
            *,
            not_components: Selection = None,
            **kwargs: Any,
        ) -> dict[str, Any]:
            return {"payload": self.payload}

        def set_state(self, state: dict[str, Any]) -> None:
            if "payload" in state:
                self.payload = state["payload"]

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (), {}

    class Root(base):  # type: ignore[misc]
        """``num_leaves`` leaf components plus a little state of its own (``step``)."""

        def __init__(self, num_leaves: int) -> None:
            self.num_leaves = num_leaves
            self.step = 0
            self.leaves: dict[str, Any] = {
                leaf_name(i, num_leaves): Leaf() for i in range(num_leaves)
            }

        def get_state(
            self,
            components: Selection = None,
            *,
            not_components: Selection = None,
            **kwargs: Any,
        ) -> dict[str, Any]:
            state: dict[str, Any] = {"step": self.step}
            for name, leaf in self.leaves.items():
                if self._check_component(name, components, not_components):
                    state[name] = leaf.get_state(
                        components=self._get_subcomponents(name, components),
                        not_components=self._get_subcomponents(name, not_components),
                    )
            return state

        def set_state(self, state: dict[str, Any]) -> None:
            self.step = state.get("step", self.step)
            for name, leaf in self.leaves.items():
                if name in state:
                    leaf.set_state(state[name])

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (self.num_leaves,), {}

        def get_checkpointable_components(self) -> list[tuple[str, Any]]:
            return list(self.leaves.items())

    for cls, role in ((Leaf, "Leaf"), (Root, "Root")):
        cls.__name__ = cls.__qualname__ = prefix + role
        cls.__module__ = __name__
    return Leaf, Root


def build_root(root_cls: type[Any], payloads: Sequence[Payload], step: int = 0) -> Any:
    """A ``root_cls`` whose leaves hold ``payloads`` (shared, not copied)."""
    root = root_cls(len(payloads))
    root.step = step
    for leaf, payload in zip(root.leaves.values(), payloads, strict=True):
        leaf.payload = payload
    return root


CkLeaf, CkRoot = make_tree_classes(ckptable.Checkpointable, "Ck")
RlLeaf, RlRoot = make_tree_classes(RLlibCheckpointable, "Rl")
