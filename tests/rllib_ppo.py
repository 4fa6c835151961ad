"""Tiny real PPO configurations (torch CPU, gymnasium CartPole) for the RLlib tests,
and the helpers that switch the test cluster's Ray job onto ckptable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: Samples and learns as little as PPO allows: one iteration takes well under a second.
BATCH = 64


def tiny_ppo_config(
    *, num_learners: int = 0, num_env_runners: int = 0, hidden: tuple[int, ...] = (8,)
) -> Any:
    from ray.rllib.algorithms.ppo import PPOConfig

    return (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=num_env_runners, num_cpus_per_env_runner=1)
        .learners(num_learners=num_learners)
        .training(train_batch_size_per_learner=BATCH, minibatch_size=BATCH // 2, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": list(hidden)})
        .reporting(metrics_num_episodes_for_smoothing=1)
    )


def weights(algo: Any) -> dict[str, Any]:
    """The learner's RLModule weights, as numpy arrays."""
    return algo.learner_group.get_weights()  # type: ignore[no-any-return]


def mro_names(obj: Any) -> list[str]:
    return [cls.__qualname__ for cls in type(obj).__mro__]


def learner_state(learner: Any) -> dict[str, Any]:
    """A Learner's RLModule weights and optimizer state (numpy), taken in its process."""
    return learner.get_state(components=["rl_module", "optimizer"])  # type: ignore[no-any-return]


def learner_states(algo: Any) -> list[dict[str, Any]]:
    """:func:`learner_state` of every Learner of ``algo`` (local or remote)."""
    return [result.get() for result in algo.learner_group.foreach_learner(learner_state)]


def learner_setup(learner: Any) -> dict[str, Any]:
    """Where a (remote) Learner runs and how it trains: its node, its torch process
    group and the class wrapping its RLModule."""
    import ray
    import torch.distributed
    from ray.rllib.core import DEFAULT_MODULE_ID

    distributed = torch.distributed.is_initialized()
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "world_size": torch.distributed.get_world_size() if distributed else 1,
        "backend": torch.distributed.get_backend() if distributed else None,
        "module": type(learner.module[DEFAULT_MODULE_ID]).__name__,
        "mro": mro_names(learner),
    }


def env_runner_weights(algo: Any) -> dict[str, Any]:
    """The (inference-only) RLModule weights of the algorithm's local env runner."""
    state = algo.env_runner.get_state(components="rl_module")
    return dict(state["rl_module"])


@contextlib.contextmanager
def ray_job(ray_cluster: Any, *, enabled: bool) -> Iterator[None]:
    """A new Ray job on the session's cluster, started after ``ckptable.rllib.enable()``
    (so its workers run ckptable's setup hook) or without it; the session's plain job
    is back afterwards. Workers belong to a job: each job starts its own."""
    import ray

    import ckptable.rllib

    address = ray_cluster.cluster.address
    ray.shutdown()
    try:
        if enabled:
            ckptable.rllib.enable()
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        ckptable.rllib.disable()
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def fail_once_at_iteration(iteration: int, marker: str) -> type:
    """An RLlib callback class failing the trial at ``iteration`` unless the file
    ``marker`` exists (it creates it): a run interrupted once. Made per test, so that
    Ray pickles it by value."""
    import os

    from ray.rllib.callbacks.callbacks import RLlibCallback

    def on_train_result(self: Any, *, result: dict[str, Any], **kwargs: Any) -> None:
        if result["training_iteration"] == iteration and not os.path.exists(marker):
            with open(marker, "w"):
                pass
            raise RuntimeError(f"interrupted at iteration {iteration}")

    return type("FailOnce", (RLlibCallback,), {"on_train_result": on_train_result})
