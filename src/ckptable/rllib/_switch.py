"""``enable`` / ``disable`` / ``is_enabled``: the switch and its process-wide state.

Before RLlib is imported, ``enable`` installs an import hook that swaps the bases as
soon as ``ray.rllib.utils.checkpoints`` has run (before RLModule, Learner, Algorithm...
are defined); after, it swaps the bases of the classes that exist (see
:mod:`ckptable.rllib._bases`). For Ray's worker processes it sets Ray's
``RAY_RUNTIME_ENV_HOOK`` so that every ``ray.init`` that follows adds ckptable's worker
setup hook to the job (see :mod:`ckptable.rllib._worker`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

from ckptable.errors import CheckpointError
from ckptable.rllib._bases import RLLIB_MODULE, Swap, apply, revert
from ckptable.rllib._import_hook import ModuleExecutedHook

__all__ = [
    "ENV_VAR",
    "current_swap",
    "disable",
    "enable",
    "enable_from_environment",
    "is_enabled",
]

#: ``CKPTABLE_RLLIB=1``: switch on in processes that start through ckptable's startup
#: line, its launcher, or as Ray workers of a job that ``enable()`` set up.
ENV_VAR = "CKPTABLE_RLLIB"

#: Ray's variable naming a function that edits the runtime env of every ``ray.init``.
RAY_RUNTIME_ENV_HOOK = "RAY_RUNTIME_ENV_HOOK"
#: Where ``enable()`` keeps a hook that was set before it, for ckptable's to call it.
PREVIOUS_RUNTIME_ENV_HOOK = "CKPTABLE_RLLIB_PREVIOUS_RUNTIME_ENV_HOOK"
#: ckptable's ``RAY_RUNTIME_ENV_HOOK``.
RUNTIME_ENV_HOOK = "ckptable.rllib._worker.runtime_env_hook"

_TRUE = ("1", "true", "yes", "on")


@dataclasses.dataclass
class _State:
    enabled: bool = False
    hook: ModuleExecutedHook | None = None
    swap: Swap | None = None
    ray_workers: bool = False
    #: The environment variables ``enable()`` set, with their values before.
    environ: dict[str, str | None] = dataclasses.field(default_factory=dict)


_lock = threading.RLock()
_state = _State()


def is_enabled() -> bool:
    """True between ``enable()`` and ``disable()`` in this process."""
    return _state.enabled


def current_swap() -> Swap | None:
    """The base swap in effect (None before RLlib's module has been imported)."""
    return _state.swap


def enable(*, ray_workers: bool = True) -> None:
    """Make every RLlib class deriving from RLlib's ``Checkpointable`` save, restore and
    rebuild through ckptable, in this process and (``ray_workers``) in every Ray worker
    process of the jobs that ``ray.init`` starts from now on.

    Works before or after RLlib is imported; objects that already exist change too.
    Calling it again does nothing.

    Args:
        ray_workers: Also set up Ray's workers (remote Learners, env runners, Tune
            trials). False: this process only (for jobs whose remote RLlib actors are
            set up otherwise, or that have none).

    Raises:
        CheckpointError: it cannot take effect, and nothing was changed: RLlib is not
            installed or has another checkpoint API; a class cannot be put on ckptable's
            base (the message names it); or, with ``ray_workers``, Ray is already
            initialized by a job whose workers do not run ckptable's setup hook (call
            ``enable()`` before ``ray.init``, or pass ``runtime_env=
            ckptable.rllib.runtime_env()`` to it).
    """
    with _lock:
        if _state.enabled:
            if ray_workers and not _state.ray_workers:
                _check_ray_job()
                _set_runtime_env_hook()
                _state.ray_workers = True
            return
        _check_installed()
        if ray_workers:
            _check_ray_job()
        module = sys.modules.get(RLLIB_MODULE)
        if module is not None:
            original = getattr(module, "Checkpointable", None)
            if original is None:
                raise CheckpointError(
                    f"ckptable.rllib cannot take effect: {RLLIB_MODULE} is being imported "
                    "right now (enable() was called from inside RLlib's import)."
                )
            _state.swap = apply(original)
        else:
            _state.hook = ModuleExecutedHook(RLLIB_MODULE, _on_rllib_executed)
            _state.hook.install()
        if ray_workers:
            _set_runtime_env_hook()
        _state.ray_workers = ray_workers
        _state.enabled = True


def disable() -> None:
    """Undo ``enable()`` in this process: RLlib's classes are back on RLlib's own base
    exactly as before (also those created meanwhile), the import hook and Ray's runtime
    env hook are removed. Ray workers already started stay as they are (their job ends
    with ``ray.shutdown()``). Calling it when not enabled does nothing."""
    with _lock:
        if not _state.enabled:
            return
        if _state.hook is not None:
            _state.hook.uninstall()
            _state.hook = None
        if _state.swap is not None:
            revert(_state.swap)
            _state.swap = None
        for name, value in _state.environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _state.environ.clear()
        _state.ray_workers = False
        _state.enabled = False


def enable_from_environment() -> bool:
    """``enable()`` if ``CKPTABLE_RLLIB`` is set to ``1`` (or true/yes/on); returns
    whether it did."""
    if os.environ.get(ENV_VAR, "").strip().lower() not in _TRUE:
        return False
    enable()
    return True


def _on_rllib_executed(module: ModuleType) -> None:
    """The import hook's callback: RLlib's module has run, nothing derives from its
    ``Checkpointable`` yet."""
    with _lock:
        if _state.hook is not None:
            _state.hook.uninstall()
            _state.hook = None
        if _state.enabled and _state.swap is None:
            _state.swap = apply(module.Checkpointable)


def _check_installed() -> None:
    try:
        ray_spec = importlib.util.find_spec("ray")
    except (ImportError, ValueError):
        ray_spec = None
    locations = list(ray_spec.submodule_search_locations or []) if ray_spec else []
    target = Path("rllib", "utils", "checkpoints.py")
    if RLLIB_MODULE not in sys.modules and not any(
        (Path(location) / target).is_file() for location in locations
    ):
        raise CheckpointError(
            "ckptable.rllib cannot take effect: RLlib is not installed "
            "(pip install 'ckptable[rllib]')."
        )


def _check_ray_job() -> None:
    """Refuse when this process is the driver of a Ray job whose workers would not be
    switched on."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        runtime_env = dict(ray.get_runtime_context().runtime_env or {})
    except Exception:  # a worker process, or a Ray without a runtime context
        return
    if str(dict(runtime_env.get("env_vars") or {}).get(ENV_VAR, "")).lower() in _TRUE:
        return
    raise CheckpointError(
        "ckptable.rllib cannot take effect in Ray's workers: Ray is already initialized "
        "by a job without ckptable's worker setup hook, so remote Learners, env runners "
        "and Tune trials of this job would save with RLlib's own code. Call "
        "ckptable.rllib.enable() before ray.init(), pass runtime_env="
        "ckptable.rllib.runtime_env() to ray.init(), or call enable(ray_workers=False) "
        "if this job runs no RLlib code in other processes."
    )


def _set_runtime_env_hook() -> None:
    previous = os.environ.get(RAY_RUNTIME_ENV_HOOK)
    if previous == RUNTIME_ENV_HOOK:
        return
    _remember(RAY_RUNTIME_ENV_HOOK)
    if previous:
        _remember(PREVIOUS_RUNTIME_ENV_HOOK)
        os.environ[PREVIOUS_RUNTIME_ENV_HOOK] = previous
    os.environ[RAY_RUNTIME_ENV_HOOK] = RUNTIME_ENV_HOOK


def _remember(name: str) -> None:
    _state.environ.setdefault(name, os.environ.get(name))
