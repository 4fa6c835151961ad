"""``ckptable demo --rllib``: RLlib's own PPO on ckptable, end to end.

Switches RLlib onto ckptable (``ckptable.rllib.enable()``), starts an embedded local Ray,
trains PPO on CartPole for a few iterations with one remote env runner, saves through
ckptable, shows the checkpoint (``ckptable info``), damages a copy of the RLModule's
weights to show the error a restore gives, restores the checkpoint into a fresh
algorithm and trains on. Needs the ``rllib`` extra (``pip install 'ckptable[rllib]'``).

As ``ckptable demo`` (see its ``--keep``): without a directory the checkpoint is kept
in a new temporary directory named at the end; in a directory of the user's, only with
``keep``. The damaged copy is made in a temporary directory of its own and removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import IO, Any

__all__ = ["main", "run_rllib_demo"]

#: Iterations trained before the save, and after the restore.
ITERATIONS = 2


def main(args: argparse.Namespace) -> int:
    """The command's entry point: ``args.dir`` (None: a temporary directory) and
    ``args.keep`` (keep the checkpoints afterwards)."""
    return run_rllib_demo(
        directory=getattr(args, "dir", None), keep=getattr(args, "keep", False), out=sys.stdout
    )


def run_rllib_demo(
    directory: str | None = None, keep: bool = False, out: IO[str] = sys.stdout
) -> int:
    """Run the demo; returns the exit status (0: every step did what it shows).

    Args:
        directory: Where to write the checkpoint (as ``DIR/ppo``); None for a new
            temporary directory, kept (and named) when the demo ran to its end.
        keep: Keep ``DIR/ppo`` in ``directory`` (else it is removed at the end).
        out: Where the report goes.
    """
    try:
        import ray
        from ray.rllib.algorithms.ppo import PPOConfig  # noqa: F401
    except ImportError:
        print("ckptable demo --rllib needs RLlib: pip install 'ckptable[rllib]'", file=out)
        return 2
    import ckptable
    import ckptable.rllib
    from ckptable.cli import main as cli_main

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    made_temp = directory is None
    root = tempfile.mkdtemp(prefix="ckptable-rllib-demo-") if directory is None else directory
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "ppo")
    scratch = tempfile.mkdtemp(prefix="ckptable-rllib-demo-damaged-")
    started = time.perf_counter()
    algo = other = None
    written = finished = False
    try:
        ckptable.rllib.enable()  # before ray.init: the env runner's worker is switched on too
        logging.getLogger("ray").setLevel(logging.ERROR)
        # address="local": always a new embedded instance, never a cluster found
        # through RAY_ADDRESS or a `ray start` (or a test's cluster) on this machine.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        say("1. PPO on CartPole, one remote env runner, RLlib switched onto ckptable")
        algo = _config().build_algo()
        for _ in range(ITERATIONS):
            result = algo.train()
        say(f"   trained {ITERATIONS} iterations, return {_return(result):.1f}")

        t0 = time.perf_counter()
        algo.save_to_path(path)
        written = True
        say(f"2. saved through ckptable in {time.perf_counter() - t0:.2f}s: {path}")
        say("3. ckptable info:")
        cli_main(["info", path])

        damaged = shutil.copytree(path, os.path.join(scratch, "ppo"))
        victim = _a_state_file(damaged)
        with open(victim, "r+b") as file:
            file.seek(os.path.getsize(victim) // 2)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0xFF]))
        say(
            f"4. one byte flipped in a copy's {os.path.relpath(victim, damaged)}; "
            "restoring that copy:"
        )
        weights_before = algo.learner_group.get_weights()
        try:
            algo.restore_from_path(damaged)
        except ckptable.CorruptCheckpointError as exc:
            say(f"   refused before anything was set: {type(exc).__name__}: {exc}")
        else:
            say("   the damaged copy restored: this should not happen")
            return 1
        if not _same(algo.learner_group.get_weights(), weights_before):
            say("   the algorithm changed: this should not happen")
            return 1
        algo.stop()
        algo = None

        other = _config().build_algo()
        t0 = time.perf_counter()
        other.restore_from_path(path)
        say(f"5. restored into a fresh PPO in {time.perf_counter() - t0:.2f}s; training on:")
        for _ in range(ITERATIONS):
            result = other.train()
        say(f"   iteration {other.iteration}, return {_return(result):.1f}")
        say(f"done in {time.perf_counter() - started:.1f}s")
        finished = True
        if keep or made_temp:
            quoted = shlex.quote(path)
            say(f"checkpoint kept: {quoted}")
            say(f"  try: ckptable info {quoted}; ckptable verify {quoted}")
        else:
            say("checkpoint removed; to keep it, run: ckptable demo --rllib --dir DIR --keep")
        return 0
    finally:
        for algorithm in (algo, other):
            if algorithm is not None:
                algorithm.stop()
        ray.shutdown()
        ckptable.rllib.disable()
        shutil.rmtree(scratch, ignore_errors=True)
        if made_temp and not finished:
            shutil.rmtree(root, ignore_errors=True)
        elif not made_temp and not keep and written:
            shutil.rmtree(path, ignore_errors=True)


def _config() -> Any:
    from ray.rllib.algorithms.ppo import PPOConfig

    return (
        PPOConfig()  # type: ignore[no-untyped-call]
        .environment("CartPole-v1")
        .env_runners(num_env_runners=1)
        .training(train_batch_size_per_learner=500, minibatch_size=100, num_epochs=2)
        .rl_module(model_config={"fcnet_hiddens": [32]})
        .reporting(metrics_num_episodes_for_smoothing=5)
    )


def _return(result: dict[str, Any]) -> float:
    value = result.get("env_runners", {}).get("episode_return_mean", float("nan"))
    return float(value)


def _a_state_file(root: str) -> str:
    """The RLModule's weights: the deepest state file, read last by RLlib's restore
    order, and still refused before the first ``set_state``."""
    found = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(root)
        for name in names
        if name.startswith("module_state.")
    ]
    return max(found, key=lambda file: (file.count(os.sep), os.path.getsize(file)))


def _same(a: Any, b: Any) -> bool:
    from ckptable.testing import assert_states_equal

    try:
        assert_states_equal(a, b)
    except AssertionError:
        return False
    return True
