"""Child process of ``test_manager_trust.py``: another writer of a manager's directory.

Saves the steps ``first, first + stride, ...`` (``count`` of them) through its own
``CheckpointManager``. With ``--wait`` it prints ``ready`` and waits for a line on stdin
first, so that several children start saving together. For each step it prints one line:

- ``saved <step> <ok>``: the save returned; ``ok`` is 1 if the returned path existed
  right after (or had been deleted by a later save's retention: ``keep_last`` newer
  checkpoints are there), else 0;
- ``refused <step> <error class>``: the manager refused the step (another process had
  saved a newer one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from ckptable import CheckpointError, CheckpointManager
from manager_child import model_at


def newer_checkpoints(directory: str, step: int) -> int:
    return sum(
        1
        for name in os.listdir(directory)
        if name.startswith("checkpoint_") and int(name[len("checkpoint_") :]) > step
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--keep-last", type=int, default=None)
    parser.add_argument("--keep-best", type=int, default=None)
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between saves")
    args = parser.parse_args()
    manager = CheckpointManager(
        args.directory,
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        metric="score" if args.keep_best else None,
        mode="max" if args.keep_best else None,
    )
    if args.wait:
        print("ready", flush=True)
        sys.stdin.readline()
    for k in range(args.count):
        time.sleep(args.pause)  # lets the other writers take the directory's lock
        step = args.first + k * args.stride
        score = -abs(step - 7.0)  # step 7 is the best, if it is saved
        try:
            if args.mode == "async":
                future = manager.save_async(model_at(step, args.width), step, {"score": score})
                path = future.result()
            else:
                path = manager.save(model_at(step, args.width), step, {"score": score})
        except (CheckpointError, ValueError) as exc:
            print(f"refused {step} {type(exc).__name__}", flush=True)
            if args.mode == "async":  # the manager raises a failed async save once more
                with contextlib.suppress(CheckpointError, ValueError):
                    manager.wait()
            continue
        ok = os.path.isdir(path) or (
            args.keep_last is not None and newer_checkpoints(args.directory, step) >= args.keep_last
        )
        print(f"saved {step} {int(ok)}", flush=True)
    manager.close()


if __name__ == "__main__":
    main()
