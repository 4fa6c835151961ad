"""``python -m ckptable.rllib SCRIPT [ARGS]`` (or ``-m MODULE [ARGS]``): run an unchanged
RLlib script with ckptable switched on; ``--install-startup-hook`` /
``--uninstall-startup-hook [DIR]`` manage the ``CKPTABLE_RLLIB`` startup line."""

from __future__ import annotations

import os
import runpy
import sys

_USAGE = """\
usage: python -m ckptable.rllib SCRIPT [ARGS...]
       python -m ckptable.rllib -m MODULE [ARGS...]
       python -m ckptable.rllib --install-startup-hook [DIR]
       python -m ckptable.rllib --uninstall-startup-hook [DIR]

Runs SCRIPT (or MODULE) with ckptable.rllib.enable() switched on: every RLlib
Checkpointable saves, restores and rebuilds through ckptable, also in Ray's workers.
The startup hook makes CKPTABLE_RLLIB=1 do the same for `python SCRIPT`.
"""


def main(argv: list[str] | None = None) -> int:
    """The launcher; returns the exit status (the script's own exits pass through)."""
    from ckptable.rllib import enable, install_startup_hook, uninstall_startup_hook

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] in ("--install-startup-hook", "--uninstall-startup-hook"):
        directory = args[1] if len(args) > 1 else None
        if args[0] == "--install-startup-hook":
            print(f"wrote {install_startup_hook(directory)}")
        elif uninstall_startup_hook(directory):
            print("removed the startup hook")
        else:
            print("no startup hook was installed")
        return 0
    if args[0] == "-m" and len(args) < 2:
        print(_USAGE, end="", file=sys.stderr)
        return 2
    enable()
    os.environ["CKPTABLE_RLLIB"] = "1"
    if args[0] == "-m":
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
        runpy.run_path(args[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
