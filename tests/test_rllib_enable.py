"""``ckptable.rllib``: RLlib's own classes on ckptable's Checkpointable, with real PPO.

Switching on before RLlib is imported (fresh processes), after (this process), off
again exactly, refusals that change nothing, remote Learners and env runners on the
session's multi-node cluster, and the ``set_state(None)`` that Ray's copying of the
driver's methods onto actor classes used to cause.
"""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptable
import ckptable.rllib
from ckptable import CheckpointError
from ckptable._manifest import MANIFEST_FILE
from ckptable.rllib import _bases
from rllib_ppo import (
    learner_setup,
    learner_states,
    mro_names,
    ray_job,
    tiny_ppo_config,
    weights,
)

pytestmark = pytest.mark.rllib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def switched_off() -> Iterator[None]:
    """Every test starts and ends with the switch off."""
    ckptable.rllib.disable()
    yield
    ckptable.rllib.disable()


def _rllib_classes() -> dict[type, tuple[type, ...]]:
    """Every class below RLlib's Checkpointable, with its MRO."""
    from ray.rllib.algorithms.ppo import PPO  # noqa: F401  (imports the usual classes)
    from ray.rllib.utils.checkpoints import Checkpointable

    gc.collect()  # classes of earlier tests, and an adapter let go by disable()
    return {cls: cls.__mro__ for cls in _bases._subtree(Checkpointable)}


def _on_ckptable(cls: type, rllib_base: type) -> bool:
    mro = cls.__mro__
    return mro.index(ckptable.Checkpointable) < mro.index(rllib_base) and issubclass(
        cls, ckptable.Checkpointable
    )


def _run(code: str, env: dict[str, str] | None = None, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args] if args else [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


#: Run in a fresh process: builds a real PPO RLModule (no Ray needed), saves it,
#: checks it is on ckptable and restores it into another one.
_CHECK_MODULE = """
import os, sys, tempfile
import ckptable, ckptable.rllib
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.rl_module import RLModule
import gymnasium as gym
assert ckptable.rllib.is_enabled()
assert "RLlibCheckpointable" in [c.__name__ for c in RLModule.__mro__]
spec = PPOConfig().environment("CartPole-v1").rl_module(
    model_config={"fcnet_hiddens": [8]}).get_rl_module_spec(env=gym.make("CartPole-v1"))
module = spec.build()
assert isinstance(module, ckptable.Checkpointable)
path = module.save_to_path(os.path.join(tempfile.mkdtemp(), "m"))
assert os.path.isfile(os.path.join(path, ".ckptable-manifest.json")), os.listdir(path)
ckptable.verify_checkpoint(path)
other = spec.build()
other.restore_from_path(path)
import torch
for key, value in module.state_dict().items():
    assert torch.equal(value, other.state_dict()[key]), key
print("OK", type(module).__name__)
"""


# --------------------------------------------------------------- switching on and off


def test_enable_before_rllib_is_imported_swaps_classes_as_they_are_defined() -> None:
    out = _run("import ckptable.rllib; ckptable.rllib.enable(); " + _CHECK_MODULE)
    assert out.startswith("OK")


def test_ckptable_rllib_env_var_switches_on_unchanged_scripts_through_the_startup_line(
    tmp_path: Path,
) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    assert ckptable.rllib.install_startup_hook(site_dir).is_file()
    # Python reads .pth files of site directories at start; addsitedir does the same.
    prelude = f"import site; site.addsitedir({str(site_dir)!r})\n"
    assert _run(prelude + _CHECK_MODULE, {"CKPTABLE_RLLIB": "1"}).startswith("OK")
    off = prelude + "import ckptable.rllib; print(ckptable.rllib.is_enabled())"
    assert _run(off, {"CKPTABLE_RLLIB": "0"}).strip() == "False"
    assert ckptable.rllib.uninstall_startup_hook(site_dir)
    assert not (site_dir / "ckptable-rllib.pth").exists()


def test_launcher_runs_an_unchanged_script_with_the_switch_on(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_CHECK_MODULE) + "print(sys.argv[1:])\n")
    out = _run("", None, "-m", "ckptable.rllib", str(script), "--flag", "x")
    assert out.splitlines() == ["OK DefaultPPOTorchRLModule", "['--flag', 'x']"]


def test_enable_after_import_swaps_every_class_and_disable_restores_them_exactly(
    switched_off: None,
) -> None:
    from ray.rllib.core.rl_module.torch.torch_rl_module import TorchDDPRLModule
    from ray.rllib.utils.checkpoints import Checkpointable as RLlibCheckpointable

    before = _rllib_classes()
    ddp_save = TorchDDPRLModule.__dict__["save_to_path"]
    ckptable.rllib.enable(ray_workers=False)
    try:
        assert ckptable.rllib.is_enabled()
        assert all(_on_ckptable(cls, RLlibCheckpointable) for cls in before)
        assert TorchDDPRLModule.__dict__["save_to_path"] is not ddp_save  # staged
    finally:
        ckptable.rllib.disable()
    assert not ckptable.rllib.is_enabled()
    assert _rllib_classes() == before
    assert TorchDDPRLModule.__dict__["save_to_path"] is ddp_save
    assert "__init_subclass__" not in RLlibCheckpointable.__dict__
    assert not any(issubclass(cls, ckptable.Checkpointable) for cls in before)


def test_a_class_defined_while_switched_on_is_on_ckptable_until_disable(
    switched_off: None, tmp_path: Path
) -> None:
    from rllib_small import RLlibLeaf

    ckptable.rllib.enable(ray_workers=False)

    class Late(RLlibLeaf):
        def save_to_path(self, *args: Any, **kwargs: Any) -> Any:
            return super().save_to_path(*args, **kwargs)

    class Direct(_bases.get_adapter(RLlibLeaf.__mro__[1]).__mro__[2]):  # RLlib's base
        def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return {}

        def set_state(self, state: dict[str, Any]) -> None:
            pass

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (), {}

    try:
        assert isinstance(Direct(), ckptable.Checkpointable)
        path = Late(5).save_to_path(tmp_path / "late")
        assert (Path(path) / MANIFEST_FILE).is_file()
    finally:
        ckptable.rllib.disable()
    assert not issubclass(Direct, ckptable.Checkpointable)
    assert not issubclass(Late, ckptable.Checkpointable)
    assert Late.__dict__["save_to_path"].__qualname__.endswith("Late.save_to_path")
    assert not hasattr(Late.__dict__["save_to_path"], "_ckptable_staged")
    Late(6).save_to_path(tmp_path / "plain")
    assert not (tmp_path / "plain" / MANIFEST_FILE).exists()


def test_a_class_that_cannot_be_swapped_is_refused_and_nothing_is_changed(
    switched_off: None,
) -> None:
    from ray.rllib.utils.checkpoints import Checkpointable as RLlibCheckpointable

    refuse = [True]

    class Refusing(type(RLlibCheckpointable)):  # type: ignore[misc]
        def mro(cls) -> list[type]:
            if refuse[0] and any(b.__name__ == "RLlibCheckpointable" for b in cls.__bases__):
                raise TypeError("this class keeps its bases")
            return super().mro()

    class Good(RLlibCheckpointable):
        pass

    class Stubborn(RLlibCheckpointable, metaclass=Refusing):
        pass

    before = _rllib_classes()
    try:
        with pytest.raises(CheckpointError, match=r"Stubborn.*nothing was changed"):
            ckptable.rllib.enable(ray_workers=False)
        assert not ckptable.rllib.is_enabled()
        assert _rllib_classes() == before
        assert Good.__bases__ == (RLlibCheckpointable,)
        assert "__init_subclass__" not in RLlibCheckpointable.__dict__
    finally:
        refuse[0] = False
        del Good, Stubborn
        gc.collect()


def test_enable_refuses_without_rllib(switched_off: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.delitem(sys.modules, _bases.RLLIB_MODULE)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CheckpointError, match=r"RLlib is not installed.*ckptable\[rllib\]"):
        ckptable.rllib.enable()
    assert not ckptable.rllib.is_enabled()
    assert "RAY_RUNTIME_ENV_HOOK" not in os.environ


def test_enable_refuses_an_rllib_with_another_checkpoint_api() -> None:
    class OldCheckpointable:
        def get_state(self) -> None: ...

    with pytest.raises(CheckpointError, match="lacks save_to_path, restore_from_path"):
        _bases.check_original(OldCheckpointable)


def test_enable_refuses_when_ray_runs_a_job_without_the_worker_hook(
    switched_off: None, ray_cluster: Any
) -> None:
    with pytest.raises(CheckpointError, match=r"already initialized.*runtime_env="):
        ckptable.rllib.enable()
    assert not ckptable.rllib.is_enabled()
    from ray.rllib.core.rl_module.rl_module import RLModule

    assert not issubclass(RLModule, ckptable.Checkpointable)


def test_runtime_env_adds_the_hook_and_keeps_the_user_s_own() -> None:
    env = ckptable.rllib.runtime_env({"env_vars": {"A": "1"}})
    assert env == {
        "env_vars": {"A": "1", "CKPTABLE_RLLIB": "1"},
        "worker_process_setup_hook": "ckptable.rllib.worker_setup",
    }
    chained = ckptable.rllib.runtime_env({"worker_process_setup_hook": "mine.setup"})
    assert callable(chained["worker_process_setup_hook"])
    assert ckptable.rllib.runtime_env(chained) == chained


# ------------------------------------------------------------------- no set_state(None)


def test_ckptable_restore_of_an_object_it_does_not_run_raises_instead_of_set_state_none(
    tmp_path: Path,
) -> None:
    from rllib_small import RLlibLeaf

    set_with: list[Any] = []

    class Watched(RLlibLeaf):
        def set_state(self, state: dict[str, Any]) -> None:
            set_with.append(state)
            super().set_state(state)

    path = Watched(3).save_to_path(tmp_path / "leaf")
    with pytest.raises(CheckpointError, match="no decoded state.*set_state was not called"):
        ckptable.Checkpointable.restore_from_path(Watched(0), path)  # type: ignore[arg-type]
    assert set_with == []


def _learner_mro(algo: Any) -> list[str]:
    """The MRO of the (remote) Learner's class, as its own process sees it."""
    return next(iter(algo.learner_group.foreach_learner(mro_names))).get()  # type: ignore[no-any-return]


def _ray_copy(function: Any) -> Any:
    """What Ray's tracing helper puts on an actor class: a functools.wraps wrapper."""

    @functools.wraps(function)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return function(self, *args, **kwargs)

    return wrapper


def test_ckptable_methods_copied_over_rllib_bases_save_and_restore_the_state(
    tmp_path: Path,
) -> None:
    """A worker where the switch is off runs the actor class the driver resolved:
    ckptable's methods, RLlib's bases. The restore must decode and apply the state."""
    from rllib_small import RLlibLeaf

    class ActorClass(RLlibLeaf):
        save_to_path = _ray_copy(ckptable.Checkpointable.save_to_path)
        restore_from_path = _ray_copy(ckptable.Checkpointable.restore_from_path)

    path = ActorClass(7).save_to_path(tmp_path / "actor")
    assert (Path(path) / MANIFEST_FILE).is_file()
    restored = ActorClass(0)
    restored.restore_from_path(path)
    assert restored.value == 7


# --------------------------------------------------------------------- real PPO on Ray


def test_ppo_with_remote_learner_and_env_runner_on_the_cluster_saves_through_ckptable(
    switched_off: None, ray_cluster: Any, tmp_path: Path, states_equal: Any
) -> None:
    from ray.rllib.algorithms.algorithm import Algorithm

    with ray_job(ray_cluster, enabled=True):
        # Two CPUs in the cluster: one algorithm (a Learner and an env runner) at a time.
        config = tiny_ppo_config(num_learners=1, num_env_runners=1)
        algo = config.build_algo()
        try:
            assert "RLlibCheckpointable" in _learner_mro(algo)
            runner_mros = algo.env_runner_group.foreach_env_runner(
                mro_names, local_env_runner=False
            )
            assert runner_mros and all("RLlibCheckpointable" in mro for mro in runner_mros)
            algo.train()
            path = algo.save_to_path(tmp_path / "ppo")
            trained = weights(algo)
        finally:
            algo.stop()
        assert ckptable.verify_checkpoint(path).unverified == ()
        assert (Path(path) / "learner_group" / "learner" / MANIFEST_FILE).is_file()
        other = config.build_algo()
        try:
            other.restore_from_path(path)
            states_equal(weights(other), trained)
            other.train()
        finally:
            other.stop()
        rebuilt = Algorithm.from_checkpoint(path)
        try:
            states_equal(weights(rebuilt), trained)
        finally:
            rebuilt.stop()


def test_remote_learner_of_a_job_without_the_worker_hook_restores_its_state(
    switched_off: None, ray_cluster: Any, tmp_path: Path, states_equal: Any
) -> None:
    """The issue's failure: the driver switched on, the Learner's worker not. Ray's
    actor class carries the driver's (ckptable's) methods over RLlib's bases; the
    restore inside the actor used to call ``set_state(None)``."""
    ckptable.rllib.enable(ray_workers=False)
    config = tiny_ppo_config(num_learners=1)
    algo = config.build_algo()
    try:
        assert "RLlibCheckpointable" not in _learner_mro(algo)
        algo.train()
        path = algo.save_to_path(tmp_path / "ppo")
        trained = weights(algo)
    finally:
        algo.stop()
    ckptable.verify_checkpoint(path)
    other = config.build_algo()
    try:
        other.restore_from_path(path)
        states_equal(weights(other), trained)
    finally:
        other.stop()


def test_two_ddp_learners_on_two_nodes_save_once_and_both_restore(
    switched_off: None, ray_cluster: Any, tmp_path: Path, states_equal: Any
) -> None:
    """``num_learners=2``: torch DDP (gloo, CPU) across the cluster's two worker nodes.
    The save writes the first Learner's state once; the restore moves the checkpoint to
    both nodes and gives both Learners the same weights and optimizer state."""
    with ray_job(ray_cluster, enabled=True):
        # The cluster's two CPUs: one Learner on each worker node, the env runner local.
        config = tiny_ppo_config(num_learners=2)
        algo = config.build_algo()
        try:
            setups = [r.get() for r in algo.learner_group.foreach_learner(learner_setup)]
            assert {setup["node"] for setup in setups} == set(ray_cluster.worker_node_ids)
            for setup in setups:
                assert (setup["world_size"], setup["backend"]) == (2, "gloo")
                assert setup["module"] == "TorchDDPRLModule"
                assert "RLlibCheckpointable" in setup["mro"]
            algo.train()
            first, second = learner_states(algo)
            states_equal(second, first)  # DDP kept them in step
            path = algo.save_to_path(tmp_path / "ppo")
        finally:
            algo.stop()
        report = ckptable.verify_checkpoint(path)
        assert report.unverified == () and report.levels == 8
        learner_dir = Path(path) / "learner_group" / "learner"
        assert (learner_dir / MANIFEST_FILE).is_file()
        assert (learner_dir / "rl_module" / "default_policy" / MANIFEST_FILE).is_file()
        other = config.build_algo()
        try:
            with pytest.raises(AssertionError):
                states_equal(learner_states(other)[0], first)
            other.restore_from_path(path)
            restored = learner_states(other)
            assert len(restored) == 2
            for state in restored:
                states_equal(state, first)
            other.train()
            after_first, after_second = learner_states(other)
            states_equal(after_second, after_first)  # still in step after the restore
        finally:
            other.stop()
