"""Wide-tree save on tmpfs: ckptable vs RLlib vs the floor of RLlib's layout.

What: the tree of ``benchmarks/_trees.py`` with 1,000 leaves of 1 KiB (``--leaves``,
``--leaf-bytes``) is saved to a directory on tmpfs (``--dir``, default ``/dev/shm``) by
ckptable with ``durable=False`` and with ``durable=True`` (its default), by RLlib's
``Checkpointable``, and by the *plain, RLlib layout* floor of ``bench_core.py``
(``LayoutImplementation``: per level a directory with RLlib's files plus ckptable's
manifest, holding exactly the bytes ckptable writes, prepared before the timing; only
``mkdir`` and open/write/close are timed). On tmpfs the disk costs nothing, so what is
left is each implementation's own work per component.

Why: the issue's local target for wide trees: a ckptable save >= 10x faster than RLlib's
and <= 1.5x the floor. Both ckptable saves are judged (``durable=True`` adds the
flush, which tmpfs makes almost free); a target passes only if both the ratio of medians
and the paired ratio (median of the per-repeat ratios) meet it.

Method: as ``bench_core.py``: one untimed warm-up round, then ``--repeats`` rounds, each
running the four saves back to back in an order rotated from round to round; before
each timed call, untimed, ``gc.collect()`` and ``os.sync()``; each save goes to a fresh
directory, is checked to hold every leaf, and is deleted after its round (untimed).

Run from the repository root::

    python benchmarks/bench_wide_local.py                    # 1,000 leaves on /dev/shm
    python benchmarks/bench_wide_local.py --repeats 3        # quicker
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _trees
from _trees import build_root, leaf_name
from bench_core import (
    ROOT_STEP,
    LayoutImplementation,
    check_saved,
    cpu_check,
    format_ratio,
    format_seconds,
    make_wide,
    timed,
)
from bench_durability import rotated, text_table

#: label → shown name
SAVES = {
    "ck-nondurable": "ckptable durable=False",
    "ck": "ckptable durable=True",
    "rllib": "RLlib",
    "layout": "plain, RLlib layout",
}
#: The issue's targets, per ckptable save: (numerator, denominator, sign, bound) on the
#: ratio of their times (RLlib / ckptable: the speed-up; ckptable / floor: the overhead).
TARGETS = [
    target
    for ck in ("ck-nondurable", "ck")
    for target in (("rllib", ck, ">=", 10.0), (ck, "layout", "<=", 1.5))
]


def make_saves(payloads: Sequence[Any], template_dir: str) -> dict[str, Callable[[str], Any]]:
    """The timed call of each save, given the checkpoint's path (setup done here)."""
    ck_root = build_root(_trees.CkRoot, payloads, step=ROOT_STEP)
    rl_root = build_root(_trees.RlRoot, payloads, step=ROOT_STEP)
    layout = LayoutImplementation(payloads, template_dir)
    return {
        "ck-nondurable": lambda path: ck_root.save_to_path(path, durable=False),
        "ck": lambda path: ck_root.save_to_path(path),
        "rllib": lambda path: rl_root.save_to_path(path),
        "layout": lambda path: layout.prepare("save", path)(),
    }


def ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float]:
    """(ratio of medians, median of the per-repeat ratios)."""
    paired = statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))
    return statistics.median(times[num]) / statistics.median(times[den]), paired


def verdict(times: dict[str, list[float]], num: str, den: str, sign: str, bound: float) -> str:
    """A ``TARGET PASS/FAIL`` line: both ratios (of medians, paired) must meet the bound."""
    values = ratio(times, num, den)
    worst = max(values) if sign == "<=" else min(values)
    ok = worst <= bound if sign == "<=" else worst >= bound
    medians = (
        f"{format_seconds(statistics.median(times[num]))} vs "
        f"{format_seconds(statistics.median(times[den]))}"
    )
    return (
        f"TARGET {'PASS' if ok else 'FAIL'}: save: {SAVES[num]} / {SAVES[den]} {sign} "
        f"{format_ratio(bound)}: {format_ratio(values[0])} of medians ({medians}), "
        f"{format_ratio(values[1])} paired"
    )


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    workload = make_wide(args.leaves, args.leaf_bytes, args.repeats)
    names = [leaf_name(i, args.leaves) for i in range(args.leaves)]
    run_dir = tempfile.mkdtemp(prefix="ckptable-wide-", dir=args.dir)
    times: dict[str, list[float]] = {label: [] for label in SAVES}
    try:
        saves = make_saves(workload.payloads, os.path.join(run_dir, "template"))
        for r in range(args.repeats + 1):
            round_dir = os.path.join(run_dir, f"r{r}")
            os.mkdir(round_dir)
            shown = []
            for label in rotated(list(SAVES), r - 1):
                path = os.path.join(round_dir, label)
                seconds, _ = timed(functools.partial(saves[label], path), sync=True)
                check_saved(SAVES[label], path, names)
                shown.append(f"{label}={format_seconds(seconds)}")
                if r:
                    times[label].append(seconds)
            shutil.rmtree(round_dir)
            progress = f"{r}/{args.repeats}" if r else "warm-up"
            print(f"[wide {progress}] {' '.join(shown)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/dev/shm", help="where to save (default: /dev/shm)")
    parser.add_argument("--leaves", type=int, default=1000, help="number of leaves (1000)")
    parser.add_argument("--leaf-bytes", type=int, default=1024, help="bytes per leaf (1024)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (7)")
    args = parser.parse_args(argv)
    if min(args.leaves, args.leaf_bytes, args.repeats) < 1:
        parser.error("--leaves, --leaf-bytes and --repeats must be positive")
    gauge = statistics.median(cpu_check() for _ in range(3))
    times = run(args)
    gauge_after = statistics.median(cpu_check() for _ in range(3))
    rows = [
        [
            name,
            format_seconds(statistics.median(times[label])),
            format_seconds(min(times[label])),
            format_seconds(max(times[label])),
            str(len(times[label])),
        ]
        for label, name in SAVES.items()
    ]
    print(
        f"\nsave_to_path, {args.leaves:,} leaves x {args.leaf_bytes} B on {args.dir} "
        f"({args.repeats} repeats; CPU gauge {format_seconds(gauge)} before, "
        f"{format_seconds(gauge_after)} after)"
    )
    print(text_table(["Implementation", "median", "min", "max", "n"], rows))
    print()
    for num, den, sign, bound in TARGETS:
        print(verdict(times, num, den, sign, bound))
    return 0


if __name__ == "__main__":
    sys.exit(main())
