"""Actor managers on a real multi-node Ray cluster.

``RayActorManager`` calls actors on the two worker nodes, and every way a call can fail
(the function raises, the actor is killed, it hangs past the timeout, it crashes and Ray
restarts it) comes back as a failed result and takes the actor out of service. RLlib's
actors work with it unchanged, RLlib's ``FaultTolerantActorManager`` is an
``ActorManager``, and ckptable's ``FaultAwareApply`` actors work with RLlib's manager.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import ray.cloudpickle
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.rllib.utils.actor_manager import FaultAwareApply as RLlibFaultAwareApply
from ray.rllib.utils.actor_manager import FaultTolerantActorManager

from ckptable import Checkpointable
from ckptable.ray._manager import (
    ActorManager,
    CallResult,
    FaultAwareApply,
    RayActorManager,
    RemoteCallResults,
    call_error,
    mark_unhealthy,
)

# The cluster's workers cannot import this module (tests/ is not on their path): send the
# actor classes and functions defined here by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Counter(FaultAwareApply):
    """A ckptable-style actor: its index among the actors spawned, and a counter."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.count = 0
        self.saw_cancel = False

    def get_index(self) -> int:
        return self.index

    def add(self, n: int = 1) -> int:
        self.count += n
        return self.count

    def set_count(self, count: int) -> None:
        self.count = count


class PlainCounter:
    """An actor with ``apply`` but no ``ping``."""

    def __init__(self, index: int) -> None:
        self.index = index

    def apply(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return func(self, *args, **kwargs)


class RLlibStyleWorker(RLlibFaultAwareApply):
    """An actor written for RLlib: ``apply`` and ``ping`` come from RLlib's mixin, which
    ends the actor process when ``func`` raises (reading ``self.config``)."""

    config = SimpleNamespace(
        restart_failed_env_runners=False, delay_between_env_runner_restarts_s=0.0
    )

    def __init__(self, index: int) -> None:
        self.index = index

    def get_index(self) -> int:
        return self.index


Spawn = Callable[..., list[Any]]


@functools.cache
def remote_class(cls: type) -> Any:
    return ray.remote(cls)


@pytest.fixture
def spawn(ray_cluster: Any) -> Iterator[Spawn]:
    """``spawn(n, cls=Counter, **actor_options)``: ``n`` started actors, alternately on
    the two worker nodes, each ``cls(index)``; all killed when the test ends."""
    created: list[Any] = []

    def spawn(count: int, cls: type = Counter, **options: Any) -> list[Any]:
        nodes = ray_cluster.worker_node_ids
        remote_cls = remote_class(cls)
        handles = [
            remote_cls.options(
                num_cpus=0,
                scheduling_strategy=ray_cluster.on_node(nodes[i % len(nodes)]),
                **options,
            ).remote(i)
            for i in range(count)
        ]
        created.extend(handles)
        ray.get([handle.__ray_ready__.remote() for handle in handles])
        return handles

    yield spawn
    for handle in created:
        ray.kill(handle, no_restart=True)


def wait_until_dead(handle: Any, limit: float = 30.0) -> None:
    """Return once calls to ``handle`` fail (``ray.kill`` is asynchronous)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=limit)
        except RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the actor is still alive")


def fail_in_actor_1(actor: Any) -> int:
    if actor.index == 1:
        raise ValueError("boom in actor 1")
    return int(actor.index)


def ids_and_values(results: RemoteCallResults) -> list[tuple[int, Any]]:
    return [(result.actor_id, result.get()) for result in results]


# -- results without Ray ---------------------------------------------------------------


def test_call_result_get_returns_the_value_or_raises_the_error() -> None:
    assert CallResult(3, value="v").get() == "v"
    assert CallResult(3, value="v").ok
    failed = CallResult(4, error=KeyError("k"))
    assert not failed.ok
    with pytest.raises(KeyError):
        failed.get()
    with pytest.raises(ValueError, match="not both"):
        CallResult(5, value=1, error=KeyError("k"))


def test_remote_call_results_separate_successes_from_errors() -> None:
    results = RemoteCallResults(
        [CallResult(0, value=0), CallResult(1, error=OSError("x")), CallResult(2, value=None)]
    )
    assert len(results) == 3
    assert [result.actor_id for result in results] == [0, 1, 2]
    assert results[1].actor_id == 1
    assert [result.actor_id for result in results.ignore_errors()] == [0, 2]
    assert [result.actor_id for result in results.errors()] == [1]
    assert "failed actor ids: [1]" in repr(results)


def test_call_error_reads_errors_from_both_kinds_of_result() -> None:
    class RLlibLikeResult:  # RLlib's CallResult: get() returns the error
        actor_id, ok = 7, False

        def get(self) -> Any:
            return error

    error = RuntimeError("returned, not raised")
    assert call_error(RLlibLikeResult()) is error
    assert call_error(CallResult(1, error=error)) is error
    assert call_error(CallResult(1, value=2)) is None


def test_manager_refuses_what_is_not_an_actor_handle_and_bad_timeouts() -> None:
    with pytest.raises(TypeError, match=r"actors\[0\] is a object, not a Ray actor handle"):
        RayActorManager([object()])
    with pytest.raises(ValueError, match="timeout_seconds"):
        RayActorManager(timeout_seconds=-1)


def test_mark_unhealthy_needs_set_actor_state() -> None:
    class MinimalManager:
        def healthy_actor_ids(self) -> list[int]:
            return [0]

        def foreach_actor(self, func: Any, **kwargs: Any) -> list[Any]:
            return []

    assert isinstance(MinimalManager(), ActorManager)
    assert mark_unhealthy(MinimalManager(), 0) is False
    assert not isinstance(object(), ActorManager)


# -- RayActorManager on the cluster ----------------------------------------------------


def test_foreach_actor_calls_actors_on_their_nodes_in_id_order(
    ray_cluster: Any, spawn: Spawn
) -> None:
    manager = RayActorManager(spawn(3))
    results = manager.foreach_actor(
        lambda actor: (actor.index, ray.get_runtime_context().get_node_id())
    )
    first, second = ray_cluster.worker_node_ids
    assert all(result.ok for result in results)
    assert ids_and_values(results) == [(0, (0, first)), (1, (1, second)), (2, (2, first))]
    assert isinstance(manager, ActorManager)


def test_results_follow_the_requested_actor_ids(spawn: Spawn) -> None:
    manager = RayActorManager(spawn(3))
    assert ids_and_values(manager.foreach_actor("get_index", remote_actor_ids=[2, 0])) == [
        (2, 2),
        (0, 0),
    ]
    assert len(manager.foreach_actor("get_index", remote_actor_ids=[])) == 0


def test_kwargs_reach_every_call_and_object_refs_are_resolved(spawn: Spawn) -> None:
    manager = RayActorManager(spawn(2))
    assert [r.get() for r in manager.foreach_actor("add", kwargs={"n": ray.put(5)})] == [5, 5]
    adding = manager.foreach_actor(lambda actor, n: actor.add(n), kwargs={"n": 2})
    assert [result.get() for result in adding] == [7, 7]


def test_unknown_actor_ids_raise_value_error_before_any_call(spawn: Spawn) -> None:
    manager = RayActorManager(spawn(2))
    with pytest.raises(ValueError, match=r"unknown actor id\(s\) \[5\]"):
        manager.foreach_actor("add", remote_actor_ids=[0, 5])
    for refused in (manager.is_actor_healthy, manager.remove_actor):
        with pytest.raises(ValueError, match="unknown actor id"):
            refused(9)
    with pytest.raises(ValueError, match="unknown actor id"):
        manager.set_actor_state(9, healthy=False)
    assert [result.get() for result in manager.foreach_actor("add")] == [1, 1]


def test_exception_in_func_fails_its_call_and_takes_the_actor_out_of_service(
    spawn: Spawn,
) -> None:
    manager = RayActorManager(spawn(3))
    results = manager.foreach_actor(fail_in_actor_1)
    assert [result.ok for result in results] == [True, False, True]
    with pytest.raises(ValueError, match="boom in actor 1") as raised:
        results[1].get()
    assert isinstance(raised.value, RayTaskError)
    assert isinstance(raised.value.cause, ValueError)
    assert call_error(results[1]) is raised.value
    assert [result.actor_id for result in results.errors()] == [1]
    assert manager.healthy_actor_ids() == [0, 2]
    assert manager.num_healthy_actors() == 2
    assert ids_and_values(manager.foreach_actor("get_index")) == [(0, 0), (2, 2)]


def test_actors_that_answer_again_can_be_marked_healthy(spawn: Spawn) -> None:
    manager = RayActorManager(spawn(2))
    manager.foreach_actor(fail_in_actor_1)
    assert manager.healthy_actor_ids() == [0]
    again = manager.foreach_actor("get_index", healthy_only=False, mark_healthy=True)
    assert ids_and_values(again) == [(0, 0), (1, 1)]
    assert manager.healthy_actor_ids() == [0, 1]


def test_killed_actor_fails_with_ray_actor_error_and_is_skipped_afterwards(
    spawn: Spawn,
) -> None:
    actors = spawn(2)
    manager = RayActorManager(actors)
    ray.kill(actors[1], no_restart=True)
    wait_until_dead(actors[1])
    results = manager.foreach_actor("get_index")
    assert results[0].get() == 0
    assert isinstance(results[1].error, RayActorError)
    with pytest.raises(RayActorError):
        results[1].get()
    assert manager.healthy_actor_ids() == [0]
    assert ids_and_values(manager.foreach_actor("get_index")) == [(0, 0)]
    assert manager.probe_unhealthy_actors() == []
    assert not manager.is_actor_healthy(1)


def hang_until_cancelled(actor: Any) -> str:
    """Wait (at most 30 s) until the caller cancels this call; remember that it did."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ray.get_runtime_context().is_canceled():
        time.sleep(0.02)
    actor.saw_cancel = ray.get_runtime_context().is_canceled()
    return "gave up"


def test_call_that_times_out_fails_within_the_timeout_and_is_cancelled(spawn: Spawn) -> None:
    manager = RayActorManager(spawn(2), timeout_seconds=1.0)
    start = time.monotonic()
    results = manager.foreach_actor(
        lambda actor: hang_until_cancelled(actor) if actor.index == 1 else actor.index
    )
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 4.0
    assert results[0].get() == 0
    error = results[1].error
    assert isinstance(error, GetTimeoutError)
    assert isinstance(error, TimeoutError)
    assert "actor 1 did not answer within 1.0 s" in str(error)
    assert manager.healthy_actor_ids() == [0]
    # The cancelled call returns, so the actor answers the probe, and it saw the cancel.
    assert manager.probe_unhealthy_actors(timeout_seconds=20) == [1]
    saw_cancel = manager.foreach_actor(lambda actor: actor.saw_cancel, remote_actor_ids=[1])
    assert ids_and_values(saw_cancel) == [(1, True)]


def test_probe_brings_back_an_actor_ray_restarted_but_not_a_dead_one(spawn: Spawn) -> None:
    [restartable] = spawn(1, max_restarts=1)
    [mortal] = spawn(1)
    manager = RayActorManager([restartable, mortal])
    assert [result.get() for result in manager.foreach_actor("add")] == [1, 1]
    crashed = manager.foreach_actor(lambda actor: os._exit(1))
    assert all(isinstance(result.error, RayActorError) for result in crashed)
    assert manager.healthy_actor_ids() == []
    assert manager.probe_unhealthy_actors(timeout_seconds=60) == [0]
    assert manager.healthy_actor_ids() == [0]
    # Ray restarted it from its constructor: its state is gone until restored.
    assert ids_and_values(manager.foreach_actor(lambda actor: actor.count)) == [(0, 0)]


def test_probe_without_mark_healthy_only_reports(spawn: Spawn) -> None:
    manager = RayActorManager(spawn(1) + spawn(1, cls=PlainCounter))
    manager.set_actor_state(0, healthy=False)
    manager.set_actor_state(1, healthy=False)
    assert manager.probe_unhealthy_actors(mark_healthy=False) == [0, 1]
    assert manager.healthy_actor_ids() == []
    assert manager.probe_unhealthy_actors() == [0, 1]  # PlainCounter: through apply
    assert manager.healthy_actor_ids() == [0, 1]


def test_actors_can_be_added_and_removed(spawn: Spawn) -> None:
    first, second, third = spawn(3)
    manager = RayActorManager([first], timeout_seconds=30)
    assert manager.add_actors([second, third]) == [1, 2]
    with pytest.raises(ValueError, match="already managed under id 0"):
        manager.add_actors([first])
    assert manager.remove_actor(1) == second
    assert manager.actors == {0: first, 2: third}
    with pytest.raises(ValueError, match=r"actors\[1\] is the same actor as actors\[0\]"):
        manager.add_actors([second, second])
    assert manager.add_actors([second]) == [3]  # ids are never reused
    manager.set_actor_state(2, healthy=False)
    assert (manager.num_actors(), manager.num_healthy_actors()) == (3, 2)
    assert ids_and_values(manager.foreach_actor("get_index")) == [(0, 0), (3, 1)]
    assert repr(manager) == "RayActorManager(3 actors, unhealthy ids: [2], timeout_seconds=30.0)"


# -- RLlib compatibility ---------------------------------------------------------------


def test_rllib_actor_works_with_ray_actor_manager(spawn: Spawn) -> None:
    manager = RayActorManager(spawn(2, cls=RLlibStyleWorker))
    assert ids_and_values(manager.foreach_actor(lambda worker: worker.get_index())) == [
        (0, 0),
        (1, 1),
    ]
    assert ids_and_values(manager.foreach_actor("get_index")) == [(0, 0), (1, 1)]
    # RLlib's apply ends the actor when func raises: the call fails as a dead actor's.
    results = manager.foreach_actor(fail_in_actor_1)
    assert results[0].get() == 0
    assert isinstance(results[1].error, RayActorError)
    assert manager.healthy_actor_ids() == [0]
    manager.set_actor_state(0, healthy=False)
    assert manager.probe_unhealthy_actors() == [0]  # through RLlib's ping


def test_rllib_manager_is_an_actor_manager_and_runs_ckptable_actors(spawn: Spawn) -> None:
    manager = FaultTolerantActorManager(spawn(2))
    assert isinstance(manager, ActorManager)
    assert sorted((r.actor_id, r.get()) for r in manager.foreach_actor("get_index")) == [
        (0, 0),
        (1, 1),
    ]
    results = {result.actor_id: result for result in manager.foreach_actor(fail_in_actor_1)}
    assert results[0].get() == 0
    # RLlib's get() returns the error of a failed call; call_error reads it from both.
    returned = results[1].get()
    assert isinstance(returned, ValueError)
    assert call_error(results[1]) is returned
    assert manager.healthy_actor_ids() == [0]
    assert mark_unhealthy(manager, 0) is True
    assert manager.healthy_actor_ids() == []
    assert sorted(manager.probe_unhealthy_actors(mark_healthy=True)) == [0, 1]
    assert manager.healthy_actor_ids() == [0, 1]


# -- a manager inside a checkpoint component -------------------------------------------


class CounterGroup(Checkpointable):
    """A component whose state lives in actors it reaches through a RayActorManager."""

    def __init__(self, workers: RayActorManager | None = None) -> None:
        self.workers = workers

    def get_state(
        self,
        components: str | Collection[str] | None = None,
        *,
        not_components: str | Collection[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        assert self.workers is not None
        counts = {result.get() for result in self.workers.foreach_actor(lambda a: a.count)}
        [count] = counts
        return {"count": count}

    def set_state(self, state: dict[str, Any]) -> None:
        assert self.workers is not None
        for result in self.workers.foreach_actor("set_count", kwargs={"count": state["count"]}):
            result.get()

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {}


class Trainer(Checkpointable):
    def __init__(self, group: CounterGroup | None = None) -> None:
        self.group = group or CounterGroup()
        self.step = 0

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("group", self.group)]

    def get_state(
        self,
        components: str | Collection[str] | None = None,
        *,
        not_components: str | Collection[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step}
        if self._check_component("group", components, not_components):
            state["group"] = self.group.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = state.get("step", self.step)
        if "group" in state:
            self.group.set_state(state["group"])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {}


def test_manager_held_by_a_component_saves_and_restores_its_actors(
    spawn: Spawn, tmp_path: Path
) -> None:
    manager = RayActorManager(spawn(2), timeout_seconds=30)
    trainer = Trainer(CounterGroup(manager))
    trainer.step = 3
    manager.foreach_actor("set_count", kwargs={"count": 7})
    trainer.save_to_path(tmp_path / "ckpt")

    trainer.step = 0
    manager.foreach_actor("set_count", kwargs={"count": 0})
    trainer.restore_from_path(tmp_path / "ckpt")
    assert trainer.step == 3
    assert ids_and_values(manager.foreach_actor(lambda actor: actor.count)) == [(0, 7), (1, 7)]

    manager.foreach_actor("set_count", kwargs={"count": 1})
    trainer.restore_from_path(tmp_path / "ckpt" / "group", component="group")
    assert ids_and_values(manager.foreach_actor(lambda actor: actor.count)) == [(0, 7), (1, 7)]
    assert manager.healthy_actor_ids() == [0, 1]
