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
