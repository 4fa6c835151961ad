"""Transfer benchmark: ``RayObjectStoreTransfer`` between two worker nodes vs a local
copy, and a whole save of an actor component on another node vs a local save of it.

What: a directory of ``--files`` files (64 MiB, 512 MiB and 2 GiB in all, by default) is
moved from one worker node of a ``ray.cluster_utils.Cluster`` (a CPU-less head and two
one-CPU worker nodes, all on this machine) to the other with ``RayObjectStoreTransfer``
(its default: the contents over a direct connection between the reader and writer
tasks; with ``--object-store`` also ``direct=False``, everything through Ray's object
store), and copied on the same disk with ``shutil.copytree`` (the floor: the kernel
copies, no Ray, no checksums) and with ``LocalCopyTransfer`` (ckptable's in-process
copy). The transfer still treats the nodes as separate machines: the two worker nodes
have different node ids, so neither shortcut of the hook (same node, or destination on
the caller's node) applies.

Why: the transfer moves component directories of actors into the checkpoint; this shows
what it costs next to copying the same files locally, and that its memory stays a few
chunks whatever the size (Ray's ``sync_dir_between_nodes`` holds the whole directory in
memory and refuses more than 1 GiB).

Method: every repeat runs the three back to back, the order rotating from repeat to
repeat; before each timed call, untimed: the previous copy is deleted, ``gc.collect()``,
``os.sync()`` and a memory pre-warm (``prewarm``). One untimed warm-up transfer starts
the Ray workers first. Every copy is compared with the source (size and xxh3 of each
file). Reported: medians, min and max, throughput (size / median), the ratio of medians
against ``copytree`` and the paired ratio (median of the per-repeat ratios).

Memory of the Ray transfer (the largest of the repeats):

- reader and writer task: the rise of the resident-set high-water mark (``VmHWM``,
  reset at the task's start by writing 5 to ``/proc/self/clear_refs``, so a reused
  worker's past does not count) above the resident set at the start, and the rise of
  anonymous (private) memory alone, sampled every 5 ms. ``VmHWM`` also counts the
  object-store pages a task touches: shared memory of the node's store, bounded by its
  size, which stay mapped (and counted) after the objects in them are freed, so this
  figure grows with the pages the store's allocator has handed out, not with the data.
- object store: the peak use of the source and destination node as ``ray status``
  shows it (the raylets report it to the GCS; sampled every 20 ms). Through the object
  store it showed the chunks created on the source node and none of the copies the
  writer pulls, which are secondary (evictable) copies; the writer holds a few at a
  time. Over the direct connection only the listing and the records pass there.

The tasks report through files in the benchmark's directory (all nodes run on this
machine); that is the benchmark's instrument, not how transfers work.

Save workload (``--workloads save``): a ``Holder`` Checkpointable with ``--save-mib`` MiB of
float32 arrays (1.2 GiB by default, in 4 arrays) is the one component ``holder`` of a
``Parent`` in the driver (the head node). *Cross-node*: the holder is a Ray actor on a
worker node, in a ``RayActorManager``: ``parent.save_to_path`` has the actor save on its
node (into a temporary directory under the actor node's ``tempfile.gettempdir()``), moves
that directory with the default transfer hook into the staging tree under ``--dir`` (the
driver's node: the hook's writer runs in the driver, its reader in a task on the actor's
node), checks it against the actor's manifest and publishes it, durably. *Local*: the same
``Parent`` holding a ``Holder`` with the same arrays in the driver, saved to ``--dir``,
durably. The two alternate (order rotating), each after the same untimed preparation as
above, and each checkpoint is checked (untimed): ``verify_checkpoint``, and the
component's state file of the cross-node save must equal the local one's. The time
spent inside the transfer hook during the cross-node save is reported too.

Targets (a target passes only if both the ratio of medians and the paired ratio meet
it): the 2 GiB worker → worker transfer within 2x of ``copytree``; the cross-node save
within 3x of the local save. All nodes of a ``ray.cluster_utils.Cluster`` run on this
machine, so ``copytree`` on the same disk is the physical floor for the bytes; the
transfer still treats the nodes as separate machines (it neither shares paths nor
takes the same-node shortcut between different node ids).

Run from the repository root::

    python benchmarks/bench_transfer.py --repeats 3               # all three sizes, and the save
    python benchmarks/bench_transfer.py --sizes-mib 64 --save-mib 64 --repeats 2 # quick
    python benchmarks/bench_transfer.py --sizes-mib 2048 --workloads transfer,save --repeats 5
    python benchmarks/bench_transfer.py --out transfer.md         # also write the tables
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import xxhash
from ray.cluster_utils import Cluster

import ckptable
from ckptable.ray import FaultAwareApply, RayActorManager
from ckptable.ray._nodes import current_node_id, pinned_to
from ckptable.ray._transfer import LocalCopyTransfer, RayObjectStoreTransfer, get_default_transfer

MiB = 1 << 20
IMPLEMENTATIONS = ("ray", "copytree", "local")
#: With ``--object-store``: the default hook with ``direct=False`` as well.
STORE_ONLY = "ray-store"
NAMES = {
    "ray": "RayObjectStoreTransfer, worker → worker",
    STORE_ONLY: "RayObjectStoreTransfer(direct=False), worker → worker",
    "copytree": "shutil.copytree (same disk)",
    "local": "LocalCopyTransfer (same disk)",
}


def implementations(args: argparse.Namespace) -> tuple[str, ...]:
    return (*IMPLEMENTATIONS, STORE_ONLY) if args.object_store else IMPLEMENTATIONS


#: The issue's targets: transfer of 2 GiB / copytree; cross-node save / local save.
TRANSFER_TARGET_MIB, TRANSFER_TARGET = 2048, 2.0
SAVE_TARGET = 3.0
SAVE_IMPLEMENTATIONS = ("actor", "local")
SAVE_NAMES = {
    "actor": "save_to_path, component held by an actor on another node",
    "local": "save_to_path, the same component in this process",
}


class BenchmarkError(RuntimeError):
    """A copy differs from its source."""


# --------------------------------------------------------------------------- save workload


class Holder(ckptable.Checkpointable, FaultAwareApply):
    """A component whose state is ``mib`` MiB of float32 arrays in 4 parts (seeded)."""

    def __init__(self, mib: int = 0, seed: int = 0) -> None:
        self.mib, self.seed = mib, seed
        rng = np.random.default_rng(seed)
        part = mib * MiB // 4 // 4
        self.weights = {f"w{i}": rng.random(part, dtype=np.float32) for i in range(4)}

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"weights": self.weights}

    def set_state(self, state: Any) -> None:
        self.weights = state["weights"]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (0, self.seed), {}  # rebuilding must not make the arrays again

    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.weights.values())


class Parent(ckptable.Checkpointable):
    """Holds one component ``holder``: an actor manager or a local ``Holder``."""

    def __init__(self, holder: Any = None) -> None:
        self.holder = holder
        self.step = 0

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"step": self.step}

    def set_state(self, state: Any) -> None:
        self.step = state["step"]

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("holder", self.holder)]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (None,), {}


class TimedTransfer:
    """Delegates to the default hook and adds up the seconds spent in it."""

    def __init__(self) -> None:
        self.inner = get_default_transfer()
        self.seconds = 0.0

    def transfer(self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.transfer(src_node_id, src_path, dst_node_id, dst_path)
        finally:
            self.seconds += time.perf_counter() - started


# --------------------------------------------------------------------------- probes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _TaskMemory:
    """In a task: peak extra resident set (VmHWM) and anonymous memory, written as JSON
    to ``<probe_dir>/<role>.json`` when the task body ends."""

    def __init__(self, probe_dir: str, role: str) -> None:
        self.path = os.path.join(probe_dir, role + ".json")
        self.anon_peak = 0
        self.stop = threading.Event()

    def __enter__(self) -> None:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        self.rss_before = _status_kib("VmRSS")
        self.anon_before = _status_kib("RssAnon")
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.anon_peak = max(self.anon_peak, _status_kib("RssAnon"))

    def __exit__(self, *exc_info: Any) -> None:
        self.stop.set()
        self.thread.join()
        report = {
            "node_id": current_node_id(),
            "hwm_extra_kib": _status_kib("VmHWM") - self.rss_before,
            "anon_extra_kib": max(self.anon_peak, _status_kib("RssAnon")) - self.anon_before,
        }
        with open(self.path, "w") as file:
            json.dump(report, file)


class MeasuredTransfer(RayObjectStoreTransfer):
    """``RayObjectStoreTransfer`` whose reader and writer report their peak memory."""

    def __init__(self, probe_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.probe_dir = probe_dir

    def _read_source(self, src_path: str, algorithm: str) -> Iterator[Any]:
        with _TaskMemory(self.probe_dir, "reader"):
            # Not ``yield from``: Ray resumes generators with send().
            for item in super()._read_source(src_path, algorithm):  # noqa: UP028
                yield item

    def _write_destination(self, items: Iterator[Any], tmp_path: str, algorithm: str) -> Any:
        with _TaskMemory(self.probe_dir, "writer"):
            return super()._write_destination(items, tmp_path, algorithm)


class ObjectStorePeak:
    """Peak object-store use of some nodes, sampled from a thread (what ``ray status``
    shows: the raylets report it to the GCS several times a second)."""

    def __init__(self, node_ids: Sequence[str]) -> None:
        from ray.autoscaler.v2.sdk import get_cluster_status

        self._status = get_cluster_status
        self._gcs_address = ray.get_runtime_context().gcs_address
        self._node_ids = list(node_ids)
        self.peaks = [0] * len(node_ids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        status = self._status(self._gcs_address)
        for node in [*status.active_nodes, *status.idle_nodes]:
            if node.node_id not in self._node_ids:
                continue
            index = self._node_ids.index(node.node_id)
            for usage in node.resource_usage.usage:
                if usage.resource_name == "object_store_memory":
                    self.peaks[index] = max(self.peaks[index], int(usage.used))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> ObjectStorePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- workload


def make_source(root: Path, total_mib: int, files: int) -> dict[str, tuple[int, str]]:
    """``files`` files of ``total_mib`` MiB in all (each MiB block distinct); returns
    name → (size, xxh3-64)."""
    root.mkdir(parents=True)
    block = bytearray(os.urandom(MiB))
    expected: dict[str, tuple[int, str]] = {}
    per_file = total_mib * MiB // files
    counter = 0
    for index in range(files):
        name = f"part-{index:02d}.bin"
        checksum = xxhash.xxh3_64()
        with open(root / name, "wb") as file:
            for offset in range(0, per_file, MiB):
                counter += 1
                block[:8] = counter.to_bytes(8, "little")
                piece = memoryview(block)[: min(MiB, per_file - offset)]
                file.write(piece)
                checksum.update(piece)
        expected[name] = (per_file, checksum.hexdigest())
    return expected


def check_copy(root: Path, expected: dict[str, tuple[int, str]], label: str) -> None:
    found = sorted(os.listdir(root))
    if found != sorted(expected):
        raise BenchmarkError(f"{label}: {root} holds {found}")
    for name, (size, digest) in expected.items():
        checksum = xxhash.xxh3_64()
        with open(root / name, "rb") as file:
            while chunk := file.read(8 * MiB):
                checksum.update(chunk)
        if os.path.getsize(root / name) != size or checksum.hexdigest() != digest:
            raise BenchmarkError(f"{label}: {root / name} differs from its source")


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Sample:
    seconds: float
    #: Ray only: reader / writer peak extra RSS and anonymous memory (KiB), object-store
    #: peaks of the source and destination node (bytes).
    memory: dict[str, int] = dataclasses.field(default_factory=dict)


def timed_run(
    impl: str,
    src: Path,
    dst: Path,
    nodes: tuple[str, str],
    probe_dir: str,
    args: argparse.Namespace,
) -> Sample:
    gc.collect()
    if not args.no_sync:
        os.sync()
    prewarm(args.prewarm_mib * MiB if args.prewarm_mib is not None else 2 * total_bytes(src))
    if impl in ("ray", STORE_ONLY):
        hook = MeasuredTransfer(
            probe_dir,
            chunk_bytes=args.chunk_mib * MiB,
            max_chunks_in_flight=args.in_flight,
            direct=impl == "ray",
        )
        with ObjectStorePeak(nodes) as store:
            started = time.perf_counter()
            hook.transfer(nodes[0], str(src), nodes[1], str(dst))
            seconds = time.perf_counter() - started
        memory = {"store_src": store.peaks[0], "store_dst": store.peaks[1]}
        for role in ("reader", "writer"):
            with open(os.path.join(probe_dir, role + ".json")) as file:
                report = json.load(file)
            expected_node = nodes[0] if role == "reader" else nodes[1]
            if report["node_id"] != expected_node:
                raise BenchmarkError(f"the {role} ran on {report['node_id']}")
            memory[f"{role}_hwm"] = report["hwm_extra_kib"]
            memory[f"{role}_anon"] = report["anon_extra_kib"]
        return Sample(seconds, memory)
    started = time.perf_counter()
    if impl == "copytree":
        shutil.copytree(src, dst)
    else:
        LocalCopyTransfer().transfer("local", str(src), "local", str(dst))
    return Sample(time.perf_counter() - started)


def total_bytes(root: Path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(root))


def prewarm(nbytes: int) -> None:
    """Touch and free ``nbytes`` of memory, so that the page cache the timed call fills
    reuses pages the hypervisor backs (see ``bench_durability.prewarm``: the reference VM
    hands memory left free for about 2 s back to the host, and touching it again cost
    1-3 s per GiB; a 2 GiB write from one process took 0.6 s or 8.6 s by that alone)."""
    if nbytes > 0:
        buffer = np.ones(nbytes // 8, dtype=np.float64)
        del buffer


def rotated(items: Sequence[str], shift: int) -> list[str]:
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def run_size(
    total_mib: int,
    work_dir: Path,
    nodes: tuple[str, str],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, list[Sample]]:
    src = work_dir / f"src-{total_mib}"
    expected = make_source(src, total_mib, args.files)
    probe_dir = str(work_dir / "probes")
    os.makedirs(probe_dir, exist_ok=True)
    samples: dict[str, list[Sample]] = {impl: [] for impl in implementations(args)}
    try:
        for repeat in range(args.repeats):
            for impl in rotated(implementations(args), repeat):
                dst = work_dir / f"dst-{impl}"
                sample = timed_run(impl, src, dst, nodes, probe_dir, args)
                check_copy(dst, expected, impl)
                shutil.rmtree(dst)
                samples[impl].append(sample)
                log(f"{total_mib} MiB repeat {repeat + 1} {impl}: {sample.seconds:.3f} s")
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return samples


@dataclasses.dataclass
class SaveSample:
    seconds: float
    #: Cross-node only: the seconds spent in the transfer hook.
    transfer_seconds: float = 0.0


def state_file_digest(path: Path) -> str:
    checksum = xxhash.xxh3_64()
    with open(path / "holder" / "state.pkl", "rb") as file:
        while chunk := file.read(8 * MiB):
            checksum.update(chunk)
    return str(checksum.hexdigest())


def run_saves(
    work_dir: Path,
    actor_node: str,
    holder_cls: type[Any],
    parent_cls: type[Any],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, list[SaveSample]]:
    """The save workload: cross-node vs local, interleaved (see the module docstring)."""
    remote_holder = ray.remote(num_cpus=0)(holder_cls)
    actor = remote_holder.options(scheduling_strategy=pinned_to(actor_node)).remote(
        args.save_mib, 7
    )
    manager = RayActorManager([actor])
    local = holder_cls(args.save_mib, 7)
    nbytes = local.nbytes()
    if ray.get(actor.apply.remote(lambda holder: holder.nbytes())) != nbytes:
        raise BenchmarkError("the actor's state differs in size from the local one")
    parents = {"actor": parent_cls(manager), "local": parent_cls(local)}
    samples: dict[str, list[SaveSample]] = {impl: [] for impl in SAVE_IMPLEMENTATIONS}
    # Untimed warm-up: one save through the actor starts the helper tasks' workers.
    parents["actor"].save_to_path(work_dir / "save-warm", transfer=TimedTransfer())
    shutil.rmtree(work_dir / "save-warm")
    try:
        for repeat in range(args.repeats):
            digests = {}
            for impl in rotated(SAVE_IMPLEMENTATIONS, repeat):
                path = work_dir / f"save-{impl}"
                gc.collect()
                if not args.no_sync:
                    os.sync()
                prewarm(args.prewarm_mib * MiB if args.prewarm_mib is not None else 2 * nbytes)
                hook = TimedTransfer()
                started = time.perf_counter()
                parents[impl].save_to_path(path, transfer=hook)
                seconds = time.perf_counter() - started
                ckptable.verify_checkpoint(path)
                digests[impl] = state_file_digest(path)
                shutil.rmtree(path)
                samples[impl].append(SaveSample(seconds, hook.seconds))
                log(
                    f"save {nbytes / MiB:.0f} MiB repeat {repeat + 1} {impl}: {seconds:.3f} s"
                    + (f" (transfer {hook.seconds:.3f} s)" if impl == "actor" else "")
                )
            if digests["actor"] != digests["local"]:
                raise BenchmarkError("the cross-node save's state file differs from the local one")
    finally:
        ray.kill(actor)
    return samples


# --------------------------------------------------------------------------- report


def table(results: dict[int, dict[str, list[Sample]]], args: argparse.Namespace) -> str:
    header = [
        "size",
        "implementation",
        "median s",
        "min-max s",
        "MiB/s",
        "/ copytree (medians)",
        "/ copytree (paired)",
        "reader +RSS / +anon MiB",
        "writer +RSS / +anon MiB",
        "object store peak src / dst MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for total_mib, samples in results.items():
        base = [s.seconds for s in samples["copytree"]]
        for impl in samples:
            times = [s.seconds for s in samples[impl]]
            median = statistics.median(times)
            paired = statistics.median(t / b for t, b in zip(times, base, strict=True))
            mem = ["—", "—", "—"]
            if impl in ("ray", STORE_ONLY):

                def peak(key: str, scale: int, runs: list[Sample] = samples[impl]) -> str:
                    return f"{max(s.memory[key] for s in runs) / scale:.0f}"

                mem = [
                    f"{peak('reader_hwm', 1024)} / {peak('reader_anon', 1024)}",
                    f"{peak('writer_hwm', 1024)} / {peak('writer_anon', 1024)}",
                    f"{peak('store_src', MiB)} / {peak('store_dst', MiB)}",
                ]
            row = [
                f"{total_mib} MiB",
                NAMES[impl],
                f"{median:.3f}",
                f"{min(times):.3f}-{max(times):.3f}",
                f"{total_mib / median:.0f}",
                f"{median / statistics.median(base):.2f}",
                f"{paired:.2f}",
                *mem,
            ]
            lines.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        f"{args.files} files per directory; chunks of {args.chunk_mib} MiB, at most "
        f"{args.in_flight} in flight; object store {args.object_store_mib} MiB per node; "
        f"{args.repeats} repeats; directory {args.dir}. Memory columns: the largest of "
        "the repeats; +RSS is the rise of VmHWM, which includes object-store pages the "
        "task touched (shared memory), +anon the rise of private memory; the object "
        "store peak is what `ray status` shows (chunks created on the node).",
    ]
    return "\n".join(lines + notes)


def save_table(samples: dict[str, list[SaveSample]], args: argparse.Namespace) -> str:
    header = ["implementation", "median s", "min-max s", "MiB/s", "/ local (medians)"]
    header += ["/ local (paired)", "in the transfer hook, median s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = [s.seconds for s in samples["local"]]
    for impl in SAVE_IMPLEMENTATIONS:
        times = [s.seconds for s in samples[impl]]
        median = statistics.median(times)
        paired = statistics.median(t / b for t, b in zip(times, base, strict=True))
        moved = statistics.median(s.transfer_seconds for s in samples[impl])
        row = [
            SAVE_NAMES[impl],
            f"{median:.3f}",
            f"{min(times):.3f}-{max(times):.3f}",
            f"{args.save_mib / median:.0f}",
            f"{median / statistics.median(base):.2f}",
            f"{paired:.2f}",
            f"{moved:.3f}" if impl == "actor" else "—",
        ]
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        f"{args.save_mib} MiB of float32 arrays (4 arrays), cloudpickle, durable saves; "
        f"checkpoints under {args.dir}; the actor writes under {tempfile.gettempdir()} on "
        f"its node; {args.repeats} repeats.",
    ]
    return "\n".join(lines + notes)


def ratios(times: list[float], base: list[float]) -> tuple[float, float]:
    """Ratio of medians, paired ratio (median of the per-repeat ratios)."""
    paired = statistics.median(t / b for t, b in zip(times, base, strict=True))
    return statistics.median(times) / statistics.median(base), paired


def verdicts(
    results: dict[int, dict[str, list[Sample]]], saves: dict[str, list[SaveSample]] | None
) -> list[tuple[str, str, float | None, float | None, str]]:
    """``(target, limit, ratio of medians, paired ratio, PASS / FAIL / NOT RUN)``."""
    rows: list[tuple[str, str, float | None, float | None, str]] = []
    name = f"{TRANSFER_TARGET_MIB} MiB transfer worker → worker / copytree"
    samples = results.get(TRANSFER_TARGET_MIB)
    if samples is None:
        rows.append((name, f"<= {TRANSFER_TARGET:.1f}x", None, None, "NOT RUN"))
    else:
        med, paired = ratios(
            [s.seconds for s in samples["ray"]], [s.seconds for s in samples["copytree"]]
        )
        ok = med <= TRANSFER_TARGET and paired <= TRANSFER_TARGET
        rows.append((name, f"<= {TRANSFER_TARGET:.1f}x", med, paired, "PASS" if ok else "FAIL"))
    name = "cross-node save of the actor component / local save"
    if saves is None:
        rows.append((name, f"<= {SAVE_TARGET:.1f}x", None, None, "NOT RUN"))
    else:
        med, paired = ratios(
            [s.seconds for s in saves["actor"]], [s.seconds for s in saves["local"]]
        )
        ok = med <= SAVE_TARGET and paired <= SAVE_TARGET
        rows.append((name, f"<= {SAVE_TARGET:.1f}x", med, paired, "PASS" if ok else "FAIL"))
    return rows


def verdict_table(rows: list[tuple[str, str, float | None, float | None, str]]) -> str:
    lines = [
        "| target | limit | ratio of medians | paired ratio | result |",
        "|---|---|--:|--:|---|",
    ]
    for name, limit, med, paired, result in rows:
        shown = [f"{x:.2f}x" if x is not None else "—" for x in (med, paired)]
        lines.append(f"| {name} | {limit} | {shown[0]} | {shown[1]} | {result} |")
    return "\n".join(lines)


def report(
    results: dict[int, dict[str, list[Sample]]],
    saves: dict[str, list[SaveSample]] | None,
    args: argparse.Namespace,
) -> str:
    command = "python benchmarks/bench_transfer.py " + shlex.join(sys.argv[1:])
    parts = [
        "## Transfer between nodes",
        "",
        f"`{command.strip()}` — {datetime.date.today().isoformat()}, "
        f"{os.cpu_count()} CPUs, Ray {ray.__version__}",
        "",
    ]
    if results:
        parts += [table(results, args), ""]
    if saves is not None:
        parts += [save_table(saves, args), ""]
    parts += [verdict_table(verdicts(results, saves)), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads", default="transfer,save", help="transfer (directories), save (component)"
    )
    parser.add_argument("--sizes-mib", default="64,512,2048", help="directory sizes, in MiB")
    parser.add_argument(
        "--save-mib", type=int, default=1229, help="save workload: the component's MiB"
    )
    parser.add_argument("--files", type=int, default=8, help="files per directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp", help="where the directories are made")
    parser.add_argument("--chunk-mib", type=int, default=8, help="chunk_bytes, in MiB")
    parser.add_argument("--in-flight", type=int, default=4, help="max_chunks_in_flight")
    parser.add_argument("--object-store-mib", type=int, default=512, help="per node")
    parser.add_argument("--no-sync", action="store_true", help="no os.sync() before timing")
    parser.add_argument(
        "--object-store",
        action="store_true",
        help="also time RayObjectStoreTransfer(direct=False): everything through the object store",
    )
    parser.add_argument(
        "--prewarm-mib",
        type=int,
        help="memory touched and freed before each timed call (default: twice the size; 0: none)",
    )
    parser.add_argument("--out", help="also write the Markdown report to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workloads = set(args.workloads.split(","))
    if not workloads <= {"transfer", "save"}:
        raise SystemExit(f"unknown workloads: {sorted(workloads - {'transfer', 'save'})}")
    sizes = [int(size) for size in args.sizes_mib.split(",")] if "transfer" in workloads else []
    # The save workload's classes, imported by name (not from __main__), so that the
    # actor's worker imports them as users' code would be: benchmarks/ joins its path.
    here = str(Path(__file__).resolve().parent)
    path = os.environ.get("PYTHONPATH", "")
    if here not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, path) if p)
    import bench_transfer

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    store = args.object_store_mib * MiB
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store}
    )
    work_dir = Path(tempfile.mkdtemp(prefix="bench-transfer-", dir=args.dir))
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        nodes = (workers[0].node_id, workers[1].node_id)
        # Warm-up, untimed: starts the reader and writer workers.
        warm = work_dir / "warm"
        make_source(warm, 16, 2)
        RayObjectStoreTransfer().transfer(nodes[0], str(warm), nodes[1], str(work_dir / "w"))
        results = {size: run_size(size, work_dir, nodes, args, log) for size in sizes}
        saves = None
        if "save" in workloads:
            saves = run_saves(
                work_dir, nodes[0], bench_transfer.Holder, bench_transfer.Parent, args, log
            )
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)
    text = report(results, saves, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    failed = [row for row in verdicts(results, saves) if row[-1] == "FAIL"]
    for row in failed:
        print(f"FAIL: {row[0]}: {row[2]:.2f}x (paired {row[3]:.2f}x), limit {row[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
