"""Two tiny classes on RLlib's own Checkpointable, for tests that need RLlib-written files."""

from __future__ import annotations

from typing import Any

from ray.rllib.utils.checkpoints import Checkpointable


class RLlibLeaf(Checkpointable):
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {"value": self.value}

    def set_state(self, state: dict) -> None:
        self.value = state["value"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (self.value,), {}


class RLlibNode(Checkpointable):
    def __init__(self) -> None:
        self.parts = {"left": RLlibLeaf(1), "right": RLlibLeaf(2)}

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.parts.items())

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {
            key: part.get_state()
            for key, part in self.parts.items()
            if self._check_component(key, components, not_components)
        }

    def set_state(self, state: dict) -> None:
        for key, part in self.parts.items():
            if key in state:
                part.set_state(state[key])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}
