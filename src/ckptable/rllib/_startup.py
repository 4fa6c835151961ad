"""The opt-in startup line: ``CKPTABLE_RLLIB=1 python train.py`` for unchanged scripts.

Python runs the ``import`` lines of the ``.pth`` files in its site-packages at every
start. ckptable does not ship one in its wheel (it would run in every Python process of
the environment, for everyone); :func:`install_startup_hook` writes it when asked. The
line costs a dictionary lookup unless ``CKPTABLE_RLLIB`` is set, and then switches
ckptable on before the script runs (and in Ray workers started with the variable set).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

__all__ = ["STARTUP_FILE", "install_startup_hook", "run", "uninstall_startup_hook"]

#: The file's name in site-packages.
STARTUP_FILE = "ckptable-rllib.pth"

_LINE = (
    "import os; os.environ.get('CKPTABLE_RLLIB', '0').strip().lower() not in ('', '0', "
    "'false', 'no', 'off') and __import__('ckptable.rllib._startup', fromlist=['run']).run()\n"
)


def run() -> None:
    """Called by the startup line when ``CKPTABLE_RLLIB`` is set."""
    from ckptable.rllib._switch import enable_from_environment

    enable_from_environment()


def install_startup_hook(directory: str | os.PathLike[str] | None = None) -> Path:
    """Write ``ckptable-rllib.pth`` into ``directory`` (default: this interpreter's
    site-packages); returns its path. Then ``CKPTABLE_RLLIB=1`` switches ckptable on in
    every Python process of the environment started with it set."""
    target = Path(directory if directory is not None else sysconfig.get_paths()["purelib"])
    path = target / STARTUP_FILE
    path.write_text(_LINE, encoding="utf-8")
    return path


def uninstall_startup_hook(directory: str | os.PathLike[str] | None = None) -> bool:
    """Remove the file :func:`install_startup_hook` wrote; returns whether there was one."""
    target = Path(directory if directory is not None else sysconfig.get_paths()["purelib"])
    try:
        (target / STARTUP_FILE).unlink()
    except FileNotFoundError:
        return False
    return True
