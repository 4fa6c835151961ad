"""Checkpointable classes the tests build trees from.

They live in an importable module (not in test functions) so that cloudpickle pickles
them by reference, as it does for user code.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

from ckptable import Checkpointable

Sel = str | Collection[str] | None


class Leaf(Checkpointable):
    """A component without components: a weight array and a counter."""

    def __init__(self, size: int = 4, *, scale: float = 1.0) -> None:
        self.size = size
        self.scale = scale
        self.weights = np.arange(size, dtype=np.float32) * scale
        self.steps = 0
        self.get_state_calls = 0

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> dict:
        self.get_state_calls += 1
        return {"weights": self.weights.copy(), "steps": self.steps}

    def set_state(self, state: dict) -> None:
        self.weights = np.asarray(state["weights"])
        self.steps = state["steps"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (self.size,), {"scale": self.scale}


class Node(Checkpointable):
    """A component holding named child components and state of its own."""

    def __init__(
        self, children: dict[str, Checkpointable] | None = None, name: str = "node"
    ) -> None:
        self.children = dict(children or {})
        self.name = name
        self.config = {"lr": 0.1, "layers": [64, 64]}
        self.get_state_calls = 0
        self.set_state_log: list[str] = []

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.children.items())

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> dict:
        self.get_state_calls += 1
        state: dict[str, Any] = {"config": dict(self.config), "name": self.name}
        for key, child in self.children.items():
            if self._check_component(key, components, not_components):
                state[key] = child.get_state(
                    components=self._get_subcomponents(key, components),
                    not_components=self._get_subcomponents(key, not_components),
                )
        return state

    def set_state(self, state: dict) -> None:
        self.set_state_log.append(self.name)
        self.config = state.get("config", self.config)
        self.name = state.get("name", self.name)
        for key, child in self.children.items():
            if key in state:
                child.set_state(state[key])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {"children": None, "name": self.name}


class Growing(Checkpointable):
    """Creates its components in ``set_state``: they exist only after a restore."""

    def __init__(self) -> None:
        self.leaves: dict[str, Leaf] = {}

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.leaves.items())

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> dict:
        state: dict[str, Any] = {"names": sorted(self.leaves)}
        for key, leaf in self.leaves.items():
            if self._check_component(key, components, not_components):
                state[key] = leaf.get_state()
        return state

    def set_state(self, state: dict) -> None:
        for key in state["names"]:
            self.leaves.setdefault(key, Leaf())

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


def three_level_tree() -> Node:
    """root → {"encoder": Node → {"a", "b": Leaf}, "head": Leaf}, with distinct values."""
    encoder = Node({"a": Leaf(3, scale=2.0), "b": Leaf(5, scale=3.0)}, name="encoder")
    root = Node({"encoder": encoder, "head": Leaf(2, scale=7.0)}, name="root")
    encoder.children["a"].steps = 11
    encoder.children["b"].steps = 12
    root.children["head"].steps = 13
    root.config["lr"] = 0.5
    return root


def blank_three_level_tree() -> Node:
    """The same shape as ``three_level_tree`` with default values."""
    encoder = Node({"a": Leaf(3), "b": Leaf(5)}, name="encoder")
    return Node({"encoder": encoder, "head": Leaf(2)}, name="root")


class Model(Checkpointable):
    """Rebuilds its whole tree from its constructor arguments (for ``from_checkpoint``).

    model → {"layer0".."layerN": Leaf, "optimizer": Node → {"moments": Leaf}}
    """

    def __init__(self, layers: int = 2, width: int = 4, *, name: str = "model") -> None:
        self.layers_count = layers
        self.width = width
        self.name = name
        self.layers = {f"layer{i}": Leaf(width, scale=i + 1.0) for i in range(layers)}
        self.optimizer = Node({"moments": Leaf(width)}, name="optimizer")
        self.epoch = 0

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [*self.layers.items(), ("optimizer", self.optimizer)]

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> dict:
        state: dict[str, Any] = {"epoch": self.epoch}
        for key, comp in self.get_checkpointable_components():
            if self._check_component(key, components, not_components):
                state[key] = comp.get_state(
                    components=self._get_subcomponents(key, components),
                    not_components=self._get_subcomponents(key, not_components),
                )
        return state

    def set_state(self, state: dict) -> None:
        self.epoch = state.get("epoch", self.epoch)
        for key, comp in self.get_checkpointable_components():
            if key in state:
                comp.set_state(state[key])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (self.layers_count, self.width), {"name": self.name}


class SubModel(Model):
    """A subclass, for ``from_checkpoint`` class checks."""


class Unrelated(Leaf):
    """Not a Model, for ``from_checkpoint`` class checks."""


def trained_model(layers: int = 2, width: int = 4) -> Model:
    """A Model whose state differs from a freshly built one everywhere."""
    model = Model(layers, width, name="trained")
    model.epoch = 9
    for i, leaf in enumerate(model.layers.values()):
        leaf.weights = leaf.weights + 100 + i
        leaf.steps = 40 + i
    moments = model.optimizer.children["moments"]
    moments.weights = moments.weights - 5
    moments.steps = 77
    model.optimizer.config["lr"] = 0.01
    return model


def states_of(obj: Checkpointable) -> dict:
    """The object's full nested state, for comparisons."""
    return obj.get_state()
