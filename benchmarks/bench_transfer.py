"""Transfer benchmark: ``RayObjectStoreTransfer`` between two worker nodes vs a local copy.

What: a directory of ``--files`` files (64 MiB, 512 MiB and 2 GiB in all, by default) is
moved from one worker node of a ``ray.cluster_utils.Cluster`` (a CPU-less head and two
one-CPU worker nodes, all on this machine) to the other with ``RayObjectStoreTransfer``,
and copied on the same disk with ``shutil.copytree`` (the floor: ``sendfile`` in the
kernel, no Ray, no checksums) and with ``LocalCopyTransfer`` (ckptable's in-process copy).

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
  shows it (the raylets report it to the GCS; sampled every 20 ms). It showed the
  chunks created on the source node and none of the copies the writer pulls, which
  are secondary (evictable) copies; the writer holds a few at a time.

The tasks report through files in the benchmark's directory (all nodes run on this
machine); that is the benchmark's instrument, not how transfers work.

Run from the repository root::

    python benchmarks/bench_transfer.py --repeats 3               # all three sizes
    python benchmarks/bench_transfer.py --sizes-mib 64 --repeats 2 # quick
    python benchmarks/bench_transfer.py --out transfer.md         # also write the table
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

from ckptable.ray._nodes import current_node_id
from ckptable.ray._transfer import LocalCopyTransfer, RayObjectStoreTransfer

MiB = 1 << 20
IMPLEMENTATIONS = ("ray", "copytree", "local")
NAMES = {
    "ray": "RayObjectStoreTransfer, worker → worker",
    "copytree": "shutil.copytree (same disk)",
    "local": "LocalCopyTransfer (same disk)",
}


class BenchmarkError(RuntimeError):
    """A copy differs from its source."""


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

    def _write_destination(self, items: Iterator[Any], tmp_path: str, algorithm: str) -> None:
        with _TaskMemory(self.probe_dir, "writer"):
            super()._write_destination(items, tmp_path, algorithm)


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
    if impl == "ray":
        hook = MeasuredTransfer(
            probe_dir, chunk_bytes=args.chunk_mib * MiB, max_chunks_in_flight=args.in_flight
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
    samples: dict[str, list[Sample]] = {impl: [] for impl in IMPLEMENTATIONS}
    try:
        for repeat in range(args.repeats):
            for impl in rotated(IMPLEMENTATIONS, repeat):
                dst = work_dir / f"dst-{impl}"
                sample = timed_run(impl, src, dst, nodes, probe_dir, args)
                check_copy(dst, expected, impl)
                shutil.rmtree(dst)
                samples[impl].append(sample)
                log(f"{total_mib} MiB repeat {repeat + 1} {impl}: {sample.seconds:.3f} s")
    finally:
        shutil.rmtree(src, ignore_errors=True)
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
        for impl in IMPLEMENTATIONS:
            times = [s.seconds for s in samples[impl]]
            median = statistics.median(times)
            paired = statistics.median(t / b for t, b in zip(times, base, strict=True))
            mem = ["—", "—", "—"]
            if impl == "ray":

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


def report(results: dict[int, dict[str, list[Sample]]], args: argparse.Namespace) -> str:
    command = "python benchmarks/bench_transfer.py " + shlex.join(sys.argv[1:])
    return "\n".join(
        [
            "## Transfer between nodes",
            "",
            f"`{command.strip()}` — {datetime.date.today().isoformat()}, "
            f"{os.cpu_count()} CPUs, Ray {ray.__version__}",
            "",
            table(results, args),
            "",
        ]
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="64,512,2048", help="directory sizes, in MiB")
    parser.add_argument("--files", type=int, default=8, help="files per directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp", help="where the directories are made")
    parser.add_argument("--chunk-mib", type=int, default=8, help="chunk_bytes, in MiB")
    parser.add_argument("--in-flight", type=int, default=4, help="max_chunks_in_flight")
    parser.add_argument("--object-store-mib", type=int, default=512, help="per node")
    parser.add_argument("--no-sync", action="store_true", help="no os.sync() before timing")
    parser.add_argument(
        "--prewarm-mib",
        type=int,
        help="memory touched and freed before each timed call (default: twice the size; 0: none)",
    )
    parser.add_argument("--out", help="also write the Markdown report to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(size) for size in args.sizes_mib.split(",")]

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
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)
    text = report(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
