"""ckptable's features on RLlib's own PPO checkpoints, with ``ckptable.rllib`` on.

A real PPO (torch CPU, CartPole) is trained and saved once for the module; each test
builds a fresh algorithm and restores into it: ``safe=True``, ``mmap=True``,
``verify=False``, msgpack state files, a damaged file found before anything is set,
one component alone, ``CheckpointManager`` and ``Algorithm.from_checkpoint``.
Everything runs in the driver of a Ray job that ``ckptable.rllib.enable()`` set up.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptable
import ckptable.rllib
from ckptable import _safe
from helpers import assert_states_equal
from rllib_ppo import env_runner_weights, learner_states, ray_job, tiny_ppo_config

pytestmark = pytest.mark.rllib

#: The deepest state file of a PPO checkpoint: the RLModule's weights.
MODULE_STATE = "learner_group/learner/rl_module/default_policy/module_state.pkl"
#: The component holding the RLModule(s), as ``component=`` names it.
RL_MODULE = "learner_group/learner/rl_module"


@dataclasses.dataclass
class Trained:
    """A PPO checkpoint and the state it holds, as the trained algorithm had it."""

    path: Path
    config: Any
    learner: dict[str, Any]  # RLModule weights and optimizer state
    iteration: int


def snapshot(algo: Any) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """What a restore changes: the Learner's weights and optimizer state, the
    iteration, the env runner's weights."""
    (learner,) = learner_states(algo)
    return learner, algo.iteration, env_runner_weights(algo)


def assert_restored(algo: Any, trained: Trained) -> None:
    """``algo`` has the trained state, its env runner the trained weights, and trains."""
    learner, iteration, runner = snapshot(algo)
    assert_states_equal(learner, trained.learner)
    assert iteration == trained.iteration
    expected = trained.learner["rl_module"]["default_policy"]
    assert_states_equal(runner, {key: expected[key] for key in runner})
    algo.train()
    assert algo.iteration == trained.iteration + 1


@pytest.fixture(scope="module")
def rllib_job(ray_cluster: Any) -> Iterator[None]:
    ckptable.rllib.disable()
    with ray_job(ray_cluster, enabled=True):
        yield


@pytest.fixture(scope="module")
def trained(rllib_job: None, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    config = tiny_ppo_config()
    algo = config.build_algo()
    try:
        algo.train()
        algo.train()
        path = algo.save_to_path(tmp_path_factory.mktemp("trained") / "ppo")
        (learner,) = learner_states(algo)
        return Trained(Path(path), config, learner, algo.iteration)
    finally:
        algo.stop()


@pytest.fixture
def fresh(trained: Trained) -> Iterator[Any]:
    """A new, untrained PPO of the same configuration."""
    algo = trained.config.build_algo()
    try:
        yield algo
    finally:
        algo.stop()


@pytest.fixture
def allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo ``add_safe_classes`` after the test."""
    monkeypatch.setattr(_safe, "_USER_ALLOWED", dict(_safe._USER_ALLOWED))


# ----------------------------------------------------------------- restore options


@pytest.mark.parametrize(
    "options",
    [{}, {"safe": True}, {"verify": False}, {"mmap": True}, {"safe": True, "verify": False}],
    ids=["default", "safe", "verify_false", "mmap", "safe_verify_false"],
)
def test_restore_options_bring_back_the_trained_ppo(
    options: dict[str, Any], trained: Trained, fresh: Any
) -> None:
    fresh.restore_from_path(trained.path, **options)
    assert_restored(fresh, trained)


def test_safe_restore_refuses_a_state_file_that_would_run_code(
    trained: Trained, fresh: Any, tmp_path: Path
) -> None:
    """The state files of a PPO checkpoint hold plain data and arrays only: ``safe=True``
    restores them (above). A state file that names other code is refused before
    anything is set, with the global and the file named."""
    import pickle

    from helpers import reseal

    path = Path(shutil.copytree(trained.path, tmp_path / "ppo"))
    learner_file = path / "learner_group" / "learner" / "state.pkl"
    state = pickle.loads(learner_file.read_bytes())
    state["planted"] = os.system  # any callable outside the allowlist
    learner_file.write_bytes(pickle.dumps(state))
    reseal(path)
    before = snapshot(fresh)
    with pytest.raises(ckptable.UnsafeCheckpointError, match=r"'posix\.system'.*state\.pkl"):
        fresh.restore_from_path(path, safe=True)
    assert_states_equal(snapshot(fresh), before)


def test_mmap_restore_maps_the_learner_arrays_instead_of_reading_them(
    rllib_job: None, tmp_path: Path
) -> None:
    """``mmap=True`` on arrays of 1 MiB and more (two 1024x1024 layers): the restore
    reads next to nothing of the files, the weights are right, training writes into
    the copy-on-write mapping and never into the checkpoint."""
    config = tiny_ppo_config(hidden=(1024, 1024))
    algo = config.build_algo()
    try:
        algo.train()
        path = Path(algo.save_to_path(tmp_path / "ppo"))
        (learner,) = learner_states(algo)
    finally:
        algo.stop()
    big = Trained(path, config, learner, 1)
    state_bytes = sum(
        (path / name).stat().st_size for name in (MODULE_STATE, "learner_group/learner/state.pkl")
    )
    assert state_bytes > 24 << 20  # two 4 MiB layers, with their two Adam moments

    read: dict[bool, int] = {}
    for mmap in (False, True):
        restored = config.build_algo()
        try:
            before = bytes_read()
            restored.restore_from_path(path, mmap=mmap)
            read[mmap] = bytes_read() - before
            assert_restored(restored, big)  # trains once: writes the optimizer's moments
        finally:
            restored.stop()
    assert read[False] >= state_bytes, read  # the control: a plain restore reads it all
    assert read[True] < state_bytes / 20, read
    report = ckptable.verify_checkpoint(path)
    assert report.unverified == ()


def bytes_read() -> int:
    """Bytes this process read with read(2)-like calls so far (page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


# ---------------------------------------------------------------------- msgpack


def test_msgpack_save_writes_msgpack_state_files_that_restore(
    trained: Trained, fresh: Any, tmp_path: Path
) -> None:
    source = trained.config.build_algo()
    try:
        source.restore_from_path(trained.path)
        path = Path(source.save_to_path(tmp_path / "ppo", use_msgpack=True))
    finally:
        source.stop()
    state_files = sorted(
        str(file.relative_to(path))
        for file in path.rglob("*")
        if file.name.endswith(("state.pkl", "state.msgpack"))
    )
    assert "algorithm_state.msgpack" in state_files
    assert MODULE_STATE.replace(".pkl", ".msgpack") in state_files
    assert not [name for name in state_files if name.endswith(".pkl")], state_files
    assert ckptable.verify_checkpoint(path).unverified == ()
    fresh.restore_from_path(path, safe=True)
    assert_restored(fresh, trained)


# ------------------------------------------------------------------- corruption


@pytest.mark.parametrize("damaged", ["algorithm_state.pkl", MODULE_STATE])
def test_a_damaged_file_is_refused_before_any_state_is_set(
    damaged: str, trained: Trained, fresh: Any, tmp_path: Path
) -> None:
    """One byte flipped in the root's state or in the deepest one (the weights): the
    restore raises before the first ``set_state``, and nothing of ``fresh`` changed."""
    path = Path(shutil.copytree(trained.path, tmp_path / "ppo"))
    victim = path / damaged
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = snapshot(fresh)
    with pytest.raises(ckptable.CorruptCheckpointError, match=Path(damaged).name) as info:
        fresh.restore_from_path(path)
    assert str(victim) in str(info.value)
    assert_states_equal(snapshot(fresh), before)
    fresh.restore_from_path(trained.path)  # the algorithm is still usable
    assert_restored(fresh, trained)


# ------------------------------------------------------------------- components


def test_the_rl_module_component_restores_alone_and_reaches_the_env_runner(
    trained: Trained, fresh: Any
) -> None:
    """RLlib's partial restore: the RLModule from its own directory. The optimizer and
    the iteration stay as they were; RLlib's override syncs the env runner."""
    (before,) = learner_states(fresh)
    fresh.restore_from_path(trained.path / RL_MODULE, component=RL_MODULE)
    (learner,) = learner_states(fresh)
    assert_states_equal(learner["rl_module"], trained.learner["rl_module"])
    assert_states_equal(learner["optimizer"], before["optimizer"])
    assert fresh.iteration == 0
    expected = trained.learner["rl_module"]["default_policy"]
    runner = env_runner_weights(fresh)
    assert_states_equal(runner, {key: expected[key] for key in runner})


def test_an_unknown_component_is_refused_by_name(trained: Trained, fresh: Any) -> None:
    with pytest.raises(ckptable.UnknownComponentError, match="learner_grup"):
        fresh.restore_from_path(trained.path / "learner_group", component="learner_grup")


# ------------------------------------------------------------- CheckpointManager


def test_checkpoint_manager_keeps_the_last_ppo_checkpoints_and_restores_the_newest(
    trained: Trained, fresh: Any, tmp_path: Path
) -> None:
    manager = ckptable.CheckpointManager(tmp_path / "run", keep_last=2, metric="return", mode="max")
    for _ in range(3):
        result = fresh.train()
        returned = float(result["env_runners"]["episode_return_mean"])
        manager.save(fresh, fresh.iteration, {"return": returned})
    assert manager.steps() == [2, 3]
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint_000002", "checkpoint_000003"]
    assert manager.metrics(3) == {"return": returned}
    for step in manager.steps():
        assert ckptable.verify_checkpoint(manager.path(step)).unverified == ()
    last = Trained(Path(manager.path(3)), trained.config, learner_states(fresh)[0], 3)

    other = trained.config.build_algo()
    try:
        assert manager.restore_latest(other) == 3
        assert_restored(other, last)
    finally:
        other.stop()


# -------------------------------------------------------------- from_checkpoint


@pytest.mark.parametrize("options", [{}, {"mmap": True, "verify": False}], ids=["default", "mmap"])
def test_from_checkpoint_rebuilds_the_trained_ppo(
    options: dict[str, Any], trained: Trained
) -> None:
    from ray.rllib.algorithms.algorithm import Algorithm
    from ray.rllib.algorithms.ppo import PPO

    rebuilt = Algorithm.from_checkpoint(trained.path, **options)
    try:
        assert type(rebuilt) is PPO
        assert_restored(rebuilt, trained)
    finally:
        rebuilt.stop()


def test_from_checkpoint_of_another_algorithm_class_is_refused(trained: Trained) -> None:
    from ray.rllib.algorithms.dqn import DQN

    with pytest.raises(ckptable.IncompatibleCheckpointError, match=r"ppo\.PPO.*not a subclass"):
        DQN.from_checkpoint(trained.path)


def test_safe_from_checkpoint_refuses_the_config_classes_until_they_are_allowed(
    trained: Trained, allowlist: None
) -> None:
    """``from_checkpoint(safe=True)`` unpickles the constructor arguments: PPO's config,
    which names RLlib classes (enums, metrics, callbacks) that are not on the
    allowlist. It refuses, naming the first one and the call that allows it; once the
    classes the config names are allowed, it rebuilds the algorithm."""
    import importlib

    from ray.rllib.algorithms.algorithm import Algorithm

    with pytest.raises(ckptable.UnsafeCheckpointError) as info:
        Algorithm.from_checkpoint(trained.path, safe=True)
    message = str(info.value)
    assert "class_and_ctor_args.pkl" in message
    assert "ckptable.add_safe_classes(ray.rllib." in message

    for dotted in CONFIG_CLASSES:
        module, _, name = dotted.rpartition(":")
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
        ckptable.add_safe_classes(found)
    rebuilt = Algorithm.from_checkpoint(trained.path, safe=True)
    try:
        assert_restored(rebuilt, trained)
    finally:
        rebuilt.stop()


#: What the pickled config of :func:`tiny_ppo_config` names beyond the allowlist (Ray
#: 2.60): the classes a user of ``from_checkpoint(safe=True)`` allows.
CONFIG_CLASSES = [
    "ray.rllib.algorithms.algorithm_config:AlgorithmConfig.DEFAULT_POLICY_MAPPING_FN",
    "ray.rllib.algorithms.algorithm_config:TorchCompileWhatToCompile",
    "ray.rllib.algorithms.ppo.ppo:PPOConfig",
    "ray.rllib.callbacks.callbacks:RLlibCallback",
    "ray.rllib.evaluation.collectors.simple_list_collector:SimpleListCollector",
    "ray.rllib.utils.metrics.stats.ema:EmaStats",
    "ray.rllib.utils.metrics.stats.item:ItemStats",
    "ray.rllib.utils.metrics.stats.item_series:ItemSeriesStats",
    "ray.rllib.utils.metrics.stats.lifetime_sum:LifetimeSumStats",
    "ray.rllib.utils.metrics.stats.max:MaxStats",
    "ray.rllib.utils.metrics.stats.mean:MeanStats",
    "ray.rllib.utils.metrics.stats.min:MinStats",
    "ray.rllib.utils.metrics.stats.percentiles:PercentilesStats",
    "ray.rllib.utils.metrics.stats.sum:SumStats",
]
