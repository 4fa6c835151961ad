"""RLlib on ckptable: one call puts every RLlib class that derives from RLlib's
``Checkpointable`` (Algorithm, LearnerGroup, Learner, RLModule, MultiRLModule, the env
runners, the connectors) on ckptable's, in this process and in Ray's workers.

    import ckptable.rllib
    ckptable.rllib.enable()     # before or after importing RLlib; before ray.init()

Unchanged scripts: ``python -m ckptable.rllib train.py ...``, or ``CKPTABLE_RLLIB=1``
with ckptable's startup line installed (``python -m ckptable.rllib
--install-startup-hook``). See ``docs/rllib.md``.
"""

from ckptable.rllib._startup import install_startup_hook, uninstall_startup_hook
from ckptable.rllib._switch import (
    ENV_VAR,
    disable,
    enable,
    enable_from_environment,
    is_enabled,
)
from ckptable.rllib._worker import WORKER_SETUP_HOOK, runtime_env, worker_setup

__all__ = [
    "ENV_VAR",
    "WORKER_SETUP_HOOK",
    "disable",
    "enable",
    "enable_from_environment",
    "install_startup_hook",
    "is_enabled",
    "runtime_env",
    "uninstall_startup_hook",
    "worker_setup",
]
