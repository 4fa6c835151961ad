"""RLlib on ckptable: PPO checkpoints saved and restored by RLlib's base and ckptable's.

What: a real PPO algorithm (torch CPU, CartPole), small (64x64 MLP) and big (2x2048 MLP,
~96 MiB of weights and Adam moments), saved with ``algo.save_to_path`` and restored with
``algo.restore_from_path`` by RLlib's own ``Checkpointable`` (``ckptable.rllib``
switched off) and by ckptable's (switched on): durable and not (``durable=False``),
restores verified and not (``verify=False``), and with the arrays mapped from the files
(``mmap=True``: copy-on-write, the pickles' skeletons verified).

Method: one long-lived process per run; each algorithm is built once; every repeat runs
every variant back to back in a rotating order (switching ckptable on and off between
them is two attribute swaps per class), each into a fresh directory, after
``gc.collect()``; medians over repeats, and the median of the per-repeat (paired) ratios
ckptable / RLlib.

``algo.restore_from_path`` is the base's restore followed by RLlib's own weight sync
(``EnvRunnerGroup.sync_weights``, the same code whichever base restored): each restore
row is followed by one without the time spent in that sync, which is the base's own
part. The sync is measured because it is slower right after ckptable's restore on a
machine with few cores: the restore applies every state in one pass, so the sync starts
while the OpenMP worker of torch's last copy still spins (``docs/rllib.md``).

The last column is the memory each operation took fresh from the kernel (minor page
faults x 4 KiB): a restore reads ~96 MiB into new buffers, and whether glibc hands out
memory already mapped or new pages (each zeroed and faulted in: ~0.5 ms per MiB on a
2-core VM) depends on what the operations before it allocated and freed, not on the
implementation. ``--allocator fresh`` gives every big allocation new pages (the worst
case, the same for every variant: ckptable's own idle payload memory is released before
each operation too); ``--allocator reuse`` keeps freed memory in the heap (the best
case); ``default`` is glibc's adaptive thresholds. ckptable keeps the memory of its
restores' arrays for the next restore (``_payload_pool``) under ``default`` and
``reuse``.

Run from the repository root::

    python benchmarks/bench_rllib.py                        # 15 repeats
    python benchmarks/bench_rllib.py --repeats 5            # quick
    python benchmarks/bench_rllib.py --allocator fresh      # same memory cost for all
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

SIZES = {"small (64x64)": [64, 64], "big (2x2048)": [2048, 2048]}

#: Bytes of memory per minor page fault.
PAGE = os.sysconf("SC_PAGE_SIZE")

SAVES = {
    "rllib": dict(on=False, kwargs={}),
    "ckptable durable": dict(on=True, kwargs={}),
    "ckptable durable=False": dict(on=True, kwargs={"durable": False}),
}
RESTORES = {
    "rllib": dict(on=False, kwargs={}),
    "ckptable verify": dict(on=True, kwargs={}),
    "ckptable verify=False": dict(on=True, kwargs={"verify": False}),
    # The arrays mapped from the files (copy-on-write), their skeletons verified.
    "ckptable mmap=True": dict(on=True, kwargs={"mmap": True}),
}


def build(hidden: list[int]) -> Any:
    from ray.rllib.algorithms.ppo import PPOConfig

    return (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0)
        .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": hidden})
        .build_algo()
    )


def switch(on: bool) -> None:
    import ckptable.rllib

    if on:
        ckptable.rllib.enable(ray_workers=False)
    else:
        ckptable.rllib.disable()


#: ``--allocator fresh``: ckptable's idle payload memory (``_payload_pool``) is handed
#: back before each operation too, as glibc's is by its settings.
RELEASE_POOL = False


#: Seconds spent in RLlib's ``EnvRunnerGroup.sync_weights`` since the last ``timed``.
_sync_seconds = [0.0]


def watch_sync_weights() -> None:
    """Time every ``EnvRunnerGroup.sync_weights`` call (into ``_sync_seconds``)."""
    from ray.rllib.env.env_runner_group import EnvRunnerGroup

    sync = EnvRunnerGroup.sync_weights

    def timed_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return sync(self, *args, **kwargs)
        finally:
            _sync_seconds[0] += time.perf_counter() - start

    EnvRunnerGroup.sync_weights = timed_sync  # type: ignore[method-assign]


def timed(fn: Callable[[], Any]) -> tuple[float, int, float]:
    """Seconds ``fn`` took, the minor page faults this process took meanwhile (each a
    4 KiB page of memory touched for the first time: fresh memory from the kernel), and
    the seconds of it spent in RLlib's weight sync."""
    gc.collect()
    if RELEASE_POOL:
        from ckptable._payload_pool import release_idle

        release_idle()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _sync_seconds[0] = 0.0
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds, faults, _sync_seconds[0]


def tree_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


def run(repeats: int, directory: str) -> list[str]:
    lines = [
        "| checkpoint | operation | variant | median s | ratio to RLlib (paired median) "
        "| fresh memory, MiB (median) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for size, hidden in SIZES.items():
        switch(False)
        algo = build(hidden)
        algo.train()
        times: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
        paths = {}
        for name, variant in SAVES.items():  # warm-up, and the checkpoints to restore
            switch(variant["on"])
            paths[name] = algo.save_to_path(os.path.join(directory, f"warm-{len(paths)}"))
        ckpt_of = {"rllib": paths["rllib"], "ckptable verify": paths["ckptable durable"]}
        ckpt_of["ckptable verify=False"] = paths["ckptable durable"]
        ckpt_of["ckptable mmap=True"] = paths["ckptable durable"]
        for repeat in range(repeats):
            order = list(SAVES)
            order = order[repeat % len(order) :] + order[: repeat % len(order)]
            for name in order:
                variant = SAVES[name]
                switch(variant["on"])
                target = os.path.join(directory, f"save-{repeat}-{order.index(name)}")
                kwargs = variant["kwargs"]
                times.setdefault(("save", name), []).append(
                    timed(lambda a=algo, t=target, k=kwargs: a.save_to_path(t, **k))
                )
                shutil.rmtree(target)
            order = list(RESTORES)
            order = order[repeat % len(order) :] + order[: repeat % len(order)]
            for name in order:
                variant = RESTORES[name]
                switch(variant["on"])
                path, kwargs = ckpt_of[name], variant["kwargs"]
                times.setdefault(("restore", name), []).append(
                    timed(lambda a=algo, p=path, k=kwargs: a.restore_from_path(p, **k))
                )
        switch(False)
        mib = tree_bytes(paths["rllib"]) / 2**20
        algo.stop()
        for label, operation, variants, own in (
            ("save", "save", SAVES, False),
            ("restore", "restore", RESTORES, False),
            ("restore without RLlib's sync_weights", "restore", RESTORES, True),
        ):
            base = times[(operation, "rllib")]
            for name in variants:
                samples = times[(operation, name)]
                # The base's own part: the whole less RLlib's weight sync.
                spent = [s - (sync if own else 0.0) for s, _, sync in samples]
                paired = [b - (sync if own else 0.0) for b, _, sync in base]
                ratio = statistics.median(s / b for s, b in zip(spent, paired, strict=True))
                seconds = statistics.median(spent)
                fresh = statistics.median(f for _, f, _ in samples) * PAGE / 2**20
                lines.append(
                    f"| {size}, {mib:.1f} MiB | {label} | {name} | "
                    f"{seconds:.4f} | {ratio:.2f}x | {fresh:.0f} |"
                )
    return lines


#: glibc's malloc settings per ``--allocator`` (read when a process starts).
ALLOCATORS: dict[str, dict[str, str]] = {
    "default": {},
    # Every allocation from 128 KiB up gets its own new mapping: new pages each time.
    "fresh": {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)},
    # Up to 32 MiB from the heap, which is never trimmed: freed memory is reused.
    "reuse": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
}


def use_allocator(name: str) -> None:
    """Run this script again with the allocator's settings, unless they are in effect."""
    settings = ALLOCATORS[name]
    if all(os.environ.get(key) == value for key, value in settings.items()):
        return
    env = {**os.environ, **settings}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--allocator",
        choices=sorted(ALLOCATORS),
        default="default",
        help="glibc malloc settings: default, fresh (new pages for every big buffer), "
        "reuse (freed memory kept and reused)",
    )
    args = parser.parse_args()
    use_allocator(args.allocator)
    global RELEASE_POOL
    RELEASE_POOL = args.allocator == "fresh"
    logging.getLogger("ray").setLevel(logging.ERROR)
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    watch_sync_weights()
    directory = tempfile.mkdtemp(prefix="bench-rllib-", dir=args.dir)
    try:
        print("\n".join(run(args.repeats, directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
