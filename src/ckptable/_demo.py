"""``ckptable demo``: a tree with local and Ray actor components, saved and restored.

The classes live here, in an importable module, so that Ray's worker processes can
import the actors' class by name (and cloudpickle pickles them by reference).

The tree::

    Trainer                      iteration counter, metrics history
    ├── learner: Learner         weights (numpy, ~1.6 MiB)
    │   └── optimizer: Adam      moments of every weight (~3.2 MiB), step count
    └── runners: RayActorManager over 2 Ray actors (Runner): observation normalizer,
                                 policy weights, sampled steps (state inside the actors)

``run_demo`` starts an embedded local Ray, trains a few fake steps, saves, shows the
checkpoint (``ckptable info``), changes every state (the actors' too) and saves that as a
second checkpoint, restores the first, checks that every state is back (inside the
actors too), verifies the files, shuts Ray down and ends with the commands to try next
on the two checkpoints. Its file and byte counts are those of ``ckptable info`` and
``ckptable verify`` (one count, ``ckptable._info.counted_files``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import shlex
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from typing import IO, Any

import ckptable
from ckptable._checkpointable import Checkpointable

__all__ = ["Adam", "Learner", "Runner", "Trainer", "next_steps", "run_demo", "saved_summary"]

Sel = str | Collection[str] | None

#: Layer sizes of the learner's fake network (float32): about 1.6 MiB of weights.
LAYERS = (64, 512, 512, 256, 8)
#: Observation size the runners normalize.
OBS_DIM = 64


def _np() -> Any:
    try:
        import numpy
    except ImportError:
        raise ImportError(
            "ckptable demo needs numpy and Ray: pip install 'ckptable[cli]'"
        ) from None
    return numpy


class Adam(Checkpointable):
    """An Adam-like optimizer: first and second moments for every weight array."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], lr: float = 1e-3) -> None:
        np = _np()
        self.shapes = dict(shapes)
        self.lr = lr
        self.step = 0
        self.m = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        self.v = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}

    def apply(self, weights: dict[str, Any], grads: dict[str, Any]) -> None:
        np = _np()
        self.step += 1
        for name, grad in grads.items():
            self.m[name] = 0.9 * self.m[name] + 0.1 * grad
            self.v[name] = 0.999 * self.v[name] + 0.001 * grad * grad
            m_hat = self.m[name] / (1 - 0.9**self.step)
            v_hat = self.v[name] / (1 - 0.999**self.step)
            weights[name] -= (self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(np.float32)

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> Any:
        return {"lr": self.lr, "step": self.step, "m": dict(self.m), "v": dict(self.v)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.lr, self.step = state["lr"], state["step"]
        self.m, self.v = dict(state["m"]), dict(state["v"])

    def get_ctor_args_and_kwargs(self) -> Any:
        return (self.shapes,), {"lr": self.lr}


class Learner(Checkpointable):
    """Weights of a small fake network, updated by its ``optimizer`` component."""

    def __init__(self, layers: tuple[int, ...] = LAYERS, seed: int = 0) -> None:
        np = _np()
        self.layers, self.seed = tuple(layers), seed
        rng = np.random.default_rng(seed)
        self.weights: dict[str, Any] = {}
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(layers)):
            scale = np.float32(1 / np.sqrt(fan_in))
            self.weights[f"w{i}"] = rng.standard_normal((fan_in, fan_out), np.float32) * scale
            self.weights[f"b{i}"] = np.zeros(fan_out, np.float32)
        self.optimizer = Adam({name: w.shape for name, w in self.weights.items()})
        self.updates = 0
        self._rng = rng

    def update(self, batch: dict[str, Any]) -> float:
        """One fake gradient step on ``batch``; returns a fake loss."""
        np = _np()
        grads = {
            name: self._rng.standard_normal(w.shape, np.float32) * np.float32(0.01)
            + np.float32(batch["mean_obs"]) * np.float32(1e-3)
            for name, w in self.weights.items()
        }
        self.optimizer.apply(self.weights, grads)
        self.updates += 1
        return float(np.mean([np.abs(g).mean() for g in grads.values()]))

    def policy_weights(self) -> Any:
        """The last layer: what the runners act with."""
        return self.weights[f"w{len(self.layers) - 2}"].copy()

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("optimizer", self.optimizer)]

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> Any:
        state: dict[str, Any] = {"weights": dict(self.weights), "updates": self.updates}
        if self._check_component("optimizer", components, not_components):
            state["optimizer"] = self.optimizer.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.weights = {name: w.copy() for name, w in state["weights"].items()}
        self.updates = state["updates"]
        if "optimizer" in state:
            self.optimizer.set_state(state["optimizer"])

    def get_ctor_args_and_kwargs(self) -> Any:
        return (self.layers,), {"seed": self.seed}


def _fault_aware_apply() -> type:
    try:
        from ckptable.ray import FaultAwareApply
    except ImportError:
        return object  # no Ray: the class is importable, the demo says what to install
    return FaultAwareApply


class Runner(Checkpointable, _fault_aware_apply()):  # type: ignore[misc]
    """A Ray actor that "samples" observations: its state lives in the actor process.

    ``apply(func)`` (``ckptable.ray.FaultAwareApply``) runs ``func(runner)`` inside it.
    """

    def __init__(self, index: int = 0, obs_dim: int = OBS_DIM) -> None:
        np = _np()
        self.index, self.obs_dim = index, obs_dim
        self.env_steps = 0
        self.obs_mean = np.zeros(obs_dim)
        self.obs_var = np.ones(obs_dim)
        self.obs_count = 0
        self.policy = np.zeros((LAYERS[-2], LAYERS[-1]), np.float32)
        self.weights_version = 0
        self._rng = np.random.default_rng(1000 + index)

    def sample(self, steps: int) -> dict[str, Any]:
        """Sample ``steps`` fake observations; returns their batch statistics."""
        obs = self._rng.standard_normal((steps, self.obs_dim)) * 2.0 + 0.5
        self.env_steps += steps
        return {"count": steps, "mean": obs.mean(axis=0), "var": obs.var(axis=0)}

    def sync(self, mean: Any, var: Any, count: int, policy: Any, version: int) -> None:
        """Take the merged normalizer statistics and new policy weights (as RLlib syncs
        connector states and weights to every env runner after each iteration)."""
        self.obs_mean, self.obs_var, self.obs_count = mean.copy(), var.copy(), count
        self.policy, self.weights_version = policy.copy(), version

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> Any:
        return {
            "env_steps": self.env_steps,
            "obs_mean": self.obs_mean,
            "obs_var": self.obs_var,
            "obs_count": self.obs_count,
            "policy": self.policy,
            "weights_version": self.weights_version,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.env_steps = state["env_steps"]
        self.obs_mean, self.obs_var = state["obs_mean"].copy(), state["obs_var"].copy()
        self.obs_count = state["obs_count"]
        self.policy, self.weights_version = state["policy"].copy(), state["weights_version"]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (self.index,), {"obs_dim": self.obs_dim}


class Trainer(Checkpointable):
    """The root: a local learner and a group of Ray actors that sample for it."""

    def __init__(self, num_runners: int = 2, seed: int = 0) -> None:
        import ray

        from ckptable.ray import RayActorManager

        self.num_runners, self.seed = num_runners, seed
        self.learner = Learner(seed=seed)
        remote_runner: Any = ray.remote(num_cpus=0)(Runner)
        self.runners = RayActorManager(
            [remote_runner.remote(i) for i in range(num_runners)], timeout_seconds=120
        )
        self.iteration = 0
        self.losses: list[float] = []

    def train(self, iterations: int = 1, steps_per_runner: int = 200) -> None:
        """Sample on every runner, merge their statistics, update, sync the runners."""
        for _ in range(iterations):
            stats = _results(self.runners.foreach_actor(lambda r: r.sample(steps_per_runner)))
            count = sum(s["count"] for s in stats)
            mean = sum(s["mean"] * s["count"] for s in stats) / count
            var = sum(s["var"] * s["count"] for s in stats) / count
            loss = self.learner.update({"mean_obs": float(mean.mean())})
            self.iteration += 1
            self.losses.append(round(loss, 6))
            policy, version = self.learner.policy_weights(), self.iteration
            total = count * self.iteration
            _results(
                self.runners.foreach_actor(
                    lambda r, m=mean, v=var, p=policy, n=version, c=total: r.sync(m, v, c, p, n)
                )
            )

    def runner_states(self) -> list[dict[str, Any]]:
        """Every runner's state, read inside its actor."""
        return _results(self.runners.foreach_actor(lambda r: r.get_state()))

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("learner", self.learner), ("runners", self.runners)]

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> Any:
        state: dict[str, Any] = {"iteration": self.iteration, "losses": list(self.losses)}
        if self._check_component("learner", components, not_components):
            state["learner"] = self.learner.get_state(
                components=self._get_subcomponents("learner", components),
                not_components=self._get_subcomponents("learner", not_components),
            )
        return state  # the runners' state is in the actors: ckptable.ray saves it there

    def set_state(self, state: dict[str, Any]) -> None:
        self.iteration, self.losses = state["iteration"], list(state["losses"])
        if "learner" in state:
            self.learner.set_state(state["learner"])

    def get_ctor_args_and_kwargs(self) -> Any:
        return (self.num_runners,), {"seed": self.seed}

    def stop(self) -> None:
        """Kill the runner actors."""
        import ray

        for handle in self.runners.actors.values():
            with contextlib.suppress(Exception):
                ray.kill(handle)


def _results(results: Any) -> list[Any]:
    """The values of a ``foreach_actor`` call; the first failure raised."""
    return [result.get() for result in results]


# --------------------------------------------------------------------------- the script


class _Steps:
    """Numbered, timed steps printed as they finish."""

    def __init__(self, out: IO[str], total: int) -> None:
        self.out, self.total, self.done = out, total, 0
        self.timings: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[list[str]]:
        """Time the block; it may append a result text to the yielded list."""
        notes: list[str] = []
        start = time.perf_counter()
        yield notes
        seconds = time.perf_counter() - start
        self.done += 1
        self.timings.append((title, seconds))
        text = f"[{self.done}/{self.total}] {notes[0] if notes else title}"
        self.print(f"{text:<72} {seconds:5.2f} s")

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("ckptable demo needs Ray: pip install 'ckptable[cli]'") from None
    return ray


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block is done: Ray's start and shutdown, interrupted
    halfway, can leave its core worker half made, which crashes the process at exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _start_ray(ray: Any) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # address="local": always a new embedded instance, never a cluster found through
    # RAY_ADDRESS or a `ray start` on this machine.
    with _interrupt_deferred():
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=200 << 20,  # the demo moves a few MiB
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )


def run_demo(directory: str | None = None, *, keep: bool = False, out: IO[str]) -> int:
    """The ``ckptable demo`` script; returns its exit code (0: every check passed).

    Args:
        directory: Where to write the checkpoint (as ``DIR/ckptable-demo``); None for a
            temporary directory.
        keep: Keep the checkpoints in ``directory`` (else they are removed at the end).
            Without ``directory`` they are always kept, in a new temporary directory
            that the last lines name, so that the commands printed there work.
        out: Where the report goes.

    Raises:
        ImportError: Ray or numpy is missing (says what to install).
    """
    _np()
    ray = _import_ray()
    from ckptable._compare import state_differences
    from ckptable.cli import count_noun, describe_checkpoint, format_info, human_bytes

    made_temp = directory is None
    if directory is None:
        base = tempfile.mkdtemp(prefix="ckptable-demo-")
    else:
        base = os.path.abspath(os.path.expanduser(directory))
    path = os.path.join(base, "ckptable-demo")
    changed_path = path + "-changed"
    changed_written = False
    steps = _Steps(out, total=8)
    started = time.perf_counter()
    steps.print(
        "ckptable demo: a Trainer with a local learner (+ optimizer) and 2 Ray actor runners"
    )
    trainer: Trainer | None = None
    failed = written = finished = False
    try:
        with steps.step("started an embedded local Ray (2 CPUs)"):
            _start_ray(ray)
        with steps.step("built the tree") as notes:
            trainer = Trainer(num_runners=2)
            trainer.runner_states()  # wait until both actors are up
            nbytes = sum(w.nbytes for w in trainer.learner.weights.values())
            notes.append(f"built the tree: {human_bytes(nbytes)} of weights, 2 runner actors")
        with steps.step("trained") as notes:
            trainer.train(3)
            notes.append(f"trained 3 iterations (loss {trainer.losses[-1]:.4f})")
        with steps.step("saved"):
            trainer.save_to_path(path)
            written = True
        doc = describe_checkpoint(path)
        steps.print(f"    {saved_summary(path, doc)} (ckptable info):")
        for line in format_info(doc, unicode=_unicode(out)).splitlines()[4:]:
            steps.print("  " + line)

        saved_local = copy.deepcopy(trainer.get_state())
        saved_runner = trainer.runner_states()[0]
        with steps.step("changed every state") as notes:
            trainer.train(2)
            trainer.learner.weights["w0"][:] = 0
            local = len(state_differences(trainer.get_state(), saved_local))
            runners = sum(
                1 for st in trainer.runner_states() if state_differences(st, saved_runner, limit=1)
            )
            trainer.save_to_path(changed_path)  # for `ckptable diff` afterwards
            changed_written = True
            notes.append(
                f"changed the states: {local} local values, {runners} of 2 actors; saved them"
            )
        with steps.step("restored from the checkpoint"):
            trainer.restore_from_path(path)
        with steps.step("checked the states") as notes:
            problems = state_differences(trainer.get_state(), saved_local, where="trainer")
            for i, runner_state in enumerate(trainer.runner_states()):
                problems += state_differences(runner_state, saved_runner, where=f"runner[{i}]")
            if problems:
                failed = True
                notes.append(f"FAILED: {len(problems)} differences, first: {problems[0]}")
            else:
                levels = sum(1 for _ in _walk_local(trainer))
                notes.append(f"checked: every state is back ({levels} local levels, 2 actors)")
        with steps.step("verified") as notes:
            report = ckptable.verify_checkpoint(path)
            notes.append(
                f"verified {count_noun(report.levels, 'level')}, "
                f"{count_noun(report.files, 'file')}, {human_bytes(report.bytes)} "
                f"({', '.join(report.algorithms)})"
            )
        finished = True
    finally:
        # First: the rest may be interrupted by a second Ctrl-C. Only what the demo
        # made goes (a directory of the user's at DIR/ckptable-demo is refused by the
        # save and left alone). A temporary directory of a demo that ran to its end is
        # left in place, so that the commands printed last work as printed.
        if made_temp and not (written and finished):
            shutil.rmtree(base, ignore_errors=True)
        elif not keep:
            if written:
                shutil.rmtree(path, ignore_errors=True)
            if changed_written:
                shutil.rmtree(changed_path, ignore_errors=True)
        with _interrupt_deferred():
            try:
                if trainer is not None and ray.is_initialized():
                    trainer.stop()
            finally:
                ray.shutdown()
    total = time.perf_counter() - started
    ray_start = steps.timings[0][1]
    steps.print(
        f"{'FAILED' if failed else 'done'} in {total:.1f} s ({ray_start:.1f} s of it starting "
        "Ray); Ray shut down"
    )
    kept = keep or made_temp
    for line in next_steps(
        path,
        changed_path if changed_written else None,
        kept=kept,
        temporary=base if made_temp else None,
    ):
        steps.print(line)
    return 1 if failed else 0


def saved_summary(path: str, doc: dict[str, Any]) -> str:
    """The demo's line about the saved checkpoint, from ``describe_checkpoint(path)``:
    counted as ``ckptable info`` and ``ckptable verify`` count (manifests apart)."""
    from ckptable.cli import count_noun, human_bytes

    return (
        f"{path}: {count_noun(doc['levels'], 'level')}, {count_noun(doc['files'], 'file')}, "
        f"{human_bytes(doc['bytes'])}"
    )


def next_steps(
    path: str, changed_path: str | None, *, kept: bool, temporary: str | None = None
) -> list[str]:
    """The demo's last lines: what to try next on its checkpoints (the real paths, shell
    quoted, when they are kept; otherwise how to keep them). ``temporary``: the new
    temporary directory they are kept in (said so, with how to remove it)."""
    if not kept:
        return [
            "checkpoints removed; to look inside them, run: ckptable demo --dir DIR --keep",
            "  (it ends with the ckptable info, verify and diff commands to try)",
        ]
    quoted = shlex.quote(path)
    lines = [f"checkpoint kept: {quoted}"]
    if changed_path is not None:
        lines[0] += f" (and the changed state: {shlex.quote(changed_path)})"
    if temporary is not None:
        lines.append(
            f"  in a new temporary directory, left in place: rm -r {shlex.quote(temporary)} "
            "when done"
        )
    lines.append("try next:")
    commands = [
        (f"ckptable info {quoted}", "the tree, sizes and manifests, nothing unpickled"),
        (f"ckptable verify {quoted}", "every file against its checksum"),
    ]
    if changed_path is not None:
        commands.append(
            (f"ckptable diff {quoted} {shlex.quote(changed_path)}", "which states changed")
        )
    width = max(len(command) for command, _ in commands)
    lines.extend(f"  {command:<{width}}  # {what}" for command, what in commands)
    return lines


def _walk_local(obj: Any) -> Iterator[Any]:
    yield obj
    for _, comp in obj.get_checkpointable_components():
        if isinstance(comp, Checkpointable):
            yield from _walk_local(comp)


def _unicode(stream: Any) -> bool:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf16", "utf32")
