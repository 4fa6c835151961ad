"""Ray's side: the worker setup hook and the runtime env that carries it.

Ray runs a job's ``worker_process_setup_hook`` in every worker process of the job, on
every node, before the worker runs a task or builds an actor: remote Learners, env
runners and Tune trials (which build their Algorithm in a worker) then import RLlib
with ckptable's switch on. ``enable()`` makes every later ``ray.init`` add the hook to
the job's runtime env through Ray's ``RAY_RUNTIME_ENV_HOOK``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ckptable.rllib._switch import ENV_VAR, PREVIOUS_RUNTIME_ENV_HOOK, enable

__all__ = ["WORKER_SETUP_HOOK", "runtime_env", "runtime_env_hook", "worker_setup"]

#: The setup hook, as Ray's runtime env names it.
WORKER_SETUP_HOOK = "ckptable.rllib.worker_setup"


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook``: switch ckptable on in this worker process
    (Ray's own job-level setup covers the actors this worker starts)."""
    enable(ray_workers=False)


def runtime_env(base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (a runtime env dict) with ckptable's worker setup hook added, for
    ``ray.init(runtime_env=...)`` (``enable()`` does it for every ``ray.init`` after it).

    A setup hook already in ``base`` still runs, after ckptable's.
    """
    env = dict(base or {})
    hook = env.get("worker_process_setup_hook")
    if hook is None or hook == WORKER_SETUP_HOOK:
        env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    elif not getattr(hook, "_ckptable_chained", False):
        env["worker_process_setup_hook"] = _chained(hook)
    env_vars = dict(env.get("env_vars") or {})
    env_vars[ENV_VAR] = "1"
    env["env_vars"] = env_vars
    return env


def runtime_env_hook(base: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's ``RAY_RUNTIME_ENV_HOOK``, called by ``ray.init`` with the runtime env it
    was given; a hook set before ``enable()`` runs first."""
    previous = os.environ.get(PREVIOUS_RUNTIME_ENV_HOOK)
    if previous:
        base = _load(previous)(base)
    return runtime_env(base)


def _chained(hook: str | Callable[[], Any]) -> Callable[[], None]:
    def ckptable_rllib_worker_setup() -> None:
        worker_setup()
        if isinstance(hook, str):
            _load(hook)()
        else:
            hook()

    ckptable_rllib_worker_setup._ckptable_chained = True  # type: ignore[attr-defined]
    return ckptable_rllib_worker_setup


def _load(dotted: str) -> Any:
    """The object a dotted path ``package.module.name`` names (as Ray's hooks name them)."""
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)
