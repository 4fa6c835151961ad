"""Classes for the Ray actor tests: actors that hold checkpoint components, and local
objects that hold managers of them. A module of its own so that every Ray worker can
import it by name (the test cluster puts tests/ on the workers' path)."""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np
import ray
from ray.rllib.utils.actor_manager import FaultTolerantActorManager
from ray.rllib.utils.checkpoints import Checkpointable as RLlibCheckpointable

import ckptable
from ckptable.ray import FaultAwareApply, RayActorManager


class Module(ckptable.Checkpointable):
    """A component inside an actor (the actor's tree has levels of its own)."""

    def __init__(self) -> None:
        self.weights = np.zeros(4)

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"weights": self.weights}

    def set_state(self, state: Any) -> None:
        self.weights = state["weights"]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (), {}


class Runner(ckptable.Checkpointable, FaultAwareApply):
    """An actor's object: a counter, a byte payload, a sub-component and fault switches."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.counter = 0
        self.payload: Any = b""
        self.module = Module()
        #: Fault injection: "kill" SIGKILLs the actor's process when its state is taken
        #: (mid-save); "raise" raises there; "kill_on_restore" / "raise_on_restore" do
        #: the same in set_state.
        self.fault: str | None = None

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        self._maybe_fail("kill", "raise")
        state = {"seed": self.seed, "counter": self.counter, "payload": self.payload}
        if not_components is None or "module" not in not_components:
            state["module"] = self.module.get_state()
        return state

    def set_state(self, state: Any) -> None:
        self._maybe_fail("kill_on_restore", "raise_on_restore")
        self.counter = state["counter"]
        self.payload = state["payload"]
        if "module" in state:
            self.module.set_state(state["module"])

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("module", self.module)]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (self.seed,), {}

    def _maybe_fail(self, kill: str, fail: str) -> None:
        if self.fault == kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == fail:
            raise RuntimeError(f"injected failure in actor {self.seed}")

    # -- helpers the tests call through apply ------------------------------------------

    def setup(self, counter: int, payload: Any = b"", weights: Any = None) -> None:
        self.counter, self.payload = counter, payload
        if weights is not None:
            self.module.weights = weights

    def fill_payload(self, size: int) -> str:
        """A random payload of ``size`` bytes (the same for every actor); its xxh3-64."""
        self.payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        return self.payload_digest()

    def payload_digest(self) -> str:
        import xxhash

        return str(xxhash.xxh3_64(memoryview(self.payload).cast("B")).hexdigest())

    def summary(self) -> dict[str, Any]:
        payload = self.payload
        size = payload.nbytes if isinstance(payload, np.ndarray) else len(payload)
        head = bytes(memoryview(payload).cast("B")[:16]) if size else b""
        return {
            "counter": self.counter,
            "payload_size": size,
            "payload_head": head,
            "weights": self.module.weights.tolist(),
            "node": ray.get_runtime_context().get_node_id(),
        }


class RLlibRunner(RLlibCheckpointable):
    """An actor written for RLlib: RLlib's Checkpointable and its apply convention."""

    def __init__(self) -> None:
        self.counter = 0

    def apply(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        return func(self, *args, **kwargs)

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"counter": self.counter}

    def set_state(self, state: Any) -> None:
        self.counter = state["counter"]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (), {}


class Local(ckptable.Checkpointable):
    """A local component next to the actor component."""

    def __init__(self) -> None:
        self.value = 0

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"value": self.value}

    def set_state(self, state: Any) -> None:
        self.value = state["value"]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (), {}


def make_runners(
    nodes: list[str], *, rllib_actor: bool = False, max_restarts: int = 0
) -> list[Any]:
    """One actor per entry of ``nodes``, pinned there (0 CPUs, so that several fit)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = RLlibRunner if rllib_actor else Runner
    remote_cls = ray.remote(num_cpus=0, max_restarts=max_restarts)(cls)
    return [
        remote_cls.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(*(() if rllib_actor else (i + 1,)))
        for i, node in enumerate(nodes)
    ]


def make_manager(kind: str, actors: list[Any]) -> Any:
    if kind == "rllib":
        return FaultTolerantActorManager(actors)
    return RayActorManager(actors)


class Algo(ckptable.Checkpointable):
    """A local object with an actor component ``runners`` and a local one ``local``.

    ``Algo(kind, nodes)`` creates its actors itself, so that ``from_checkpoint`` can
    build it from its constructor arguments.
    """

    def __init__(self, kind: str = "ckptable", nodes: tuple[str, ...] = ()) -> None:
        self.kind, self.nodes = kind, tuple(nodes)
        self.runners = make_manager(kind, make_runners(list(nodes)))
        self.local = Local()
        self.step = 0

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"step": self.step, "local": self.local.get_state()}

    def set_state(self, state: Any) -> None:
        self.step = state["step"]

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("runners", self.runners), ("local", self.local)]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (self.kind, self.nodes), {}

    def kill_actors(self) -> None:
        for actor in _actor_handles(self.runners):
            ray.kill(actor)


def _actor_handles(manager: Any) -> list[Any]:
    actors = manager.actors
    actors = actors() if callable(actors) else actors
    return list(actors.values())


def foreach(manager: Any, func: Any) -> list[Any]:
    """``func(actor)`` on every healthy actor, the results (raising the first error)."""
    return [result.get() for result in manager.foreach_actor(func)]
