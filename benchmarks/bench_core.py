"""Core benchmark: ckptable vs RLlib's ``Checkpointable`` vs plain file I/O.

What: the same object tree (``benchmarks/_trees.py``) is saved with ``save_to_path``,
restored into an existing object with ``restore_from_path`` and rebuilt with
``Root.from_checkpoint``, once on ``ckptable.Checkpointable`` and once on RLlib's
``Checkpointable``. Two plain-I/O baselines write and read the same bytes: *plain* puts
each leaf's payload in one file of its leaf directory; *plain-layout* writes RLlib's
on-disk layout (per level a directory with ``metadata.json``, ``class_and_ctor_args.pkl``
and ``state.pkl``) with the bytes ckptable writes, prepared before the timing, so it is
the layout's own file I/O, which neither implementation can go below. Two workloads:
*wide* (many small leaves: RLlib calls ``get_state`` once per component, which is
quadratic) and *big* (a few large numpy arrays: the cost is the bytes).

Why: to show the speed-up over RLlib and the overhead over the cheapest possible way to
put the same bytes (and the same layout) on disk, measured fairly: every repeat runs the
four implementations back to back in a rotating order, each timed op starts after
``gc.collect()`` (and ``os.sync()``) outside the timed region, every restore is checked
against the original data, and medians are reported.

Run from the repository root::

    python benchmarks/bench_core.py                         # full run, table on stdout
    python benchmarks/bench_core.py --out docs/benchmarks.md
    python benchmarks/bench_core.py --big-mib 64 --repeats 3   # quick run
    python benchmarks/bench_core.py --workloads wide --dir /dev/shm \\
        --out docs/benchmarks.md --section "Wide tree on tmpfs"   # add a section
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

# The tree classes must come from an importable module (see _trees.py); this puts the
# benchmarks directory on the path also when the script is run from elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _trees
from _trees import Payload, build_root, leaf_name

T = TypeVar("T")

IMPLEMENTATIONS = ("ckptable", "rllib", "plain", "plain-layout")
#: Implementation label → the name shown in reports.
DISPLAY_NAMES = {
    "ckptable": "ckptable",
    "rllib": "RLlib",
    "plain": "plain I/O",
    "plain-layout": "plain I/O, RLlib layout",
}
#: Operation key → the name shown in tables.
OPERATIONS = {
    "save": "save_to_path",
    "restore": "restore_from_path",
    "from_checkpoint": "from_checkpoint",
}
WORKLOADS = ("wide", "big")
DEFAULT_REPEATS = {"wide": 7, "big": 3}
#: ``--cleanup auto``: many small files are kept until the run ends (creating files right
#: after deleting thousands is slow on ext4 without a journal); big files are deleted
#: after each repeat (so the page cache reuses memory instead of growing by 3 GiB a round).
AUTO_CLEANUP = {"wide": "end", "big": "repeat"}
#: File name of a leaf's payload in the plain-I/O baseline.
PLAIN_FILE = "payload.bin"
#: The files of one level (directory) in RLlib's layout, in the order plain-layout writes.
LAYOUT_FILES = ("metadata.json", "class_and_ctor_args.pkl", "state.pkl", ".ckptable-manifest.json")
#: Index of ``state.pkl`` in ``LAYOUT_FILES``.
STATE_INDEX = 2
ROOT_STEP = 12345


class BenchmarkError(RuntimeError):
    """A restored state differs from the saved one, or a checkpoint is missing parts."""


# --------------------------------------------------------------------------- workloads


@dataclasses.dataclass
class Workload:
    """Named payloads (one per leaf) and how often to time them."""

    name: str
    description: str
    payloads: list[Payload]
    repeats: int
    #: When its checkpoints are deleted: after each ``"repeat"`` or at the ``"end"``.
    cleanup: str = "end"


def make_wide(leaves: int, leaf_bytes: int, repeats: int) -> Workload:
    payloads: list[Payload] = [os.urandom(leaf_bytes) for _ in range(leaves)]
    description = f"{leaves:,} leaves x {format_bytes(leaf_bytes)} (bytes)"
    return Workload("wide", description, payloads, repeats)


def make_big(total_mib: int, leaves: int, repeats: int) -> Workload:
    floats = total_mib * 2**20 // (4 * leaves)
    if floats < 1:
        raise SystemExit(f"--big-mib {total_mib} is too small for {leaves} leaves")
    rng = np.random.default_rng(0)
    payloads: list[Payload] = [rng.random(floats, dtype=np.float32) for _ in range(leaves)]
    description = (
        f"{leaves} leaves x {format_bytes(floats * 4)} (float32) = "
        f"{format_bytes(floats * 4 * leaves)}"
    )
    return Workload("big", description, payloads, repeats)


# --------------------------------------------------------------------------- implementations


class TreeImplementation:
    """A ``Root`` of one base class holding the workload's payloads (shared, not copied)."""

    def __init__(self, label: str, root_cls: type[Any], payloads: Sequence[Payload]) -> None:
        self.label = label
        self.root_cls = root_cls
        self.num_leaves = len(payloads)
        self.root = build_root(root_cls, payloads, step=ROOT_STEP)

    def prepare(self, op: str, path: str) -> Callable[[], Any]:
        """The call to time for ``op`` on ``path``; its setup happens here, untimed."""
        if op == "save":
            root = self.root
            return lambda: root.save_to_path(path)
        if op == "restore":
            target = self.root_cls(self.num_leaves)  # an existing object, empty leaves

            def restore() -> Any:
                target.restore_from_path(path)
                return target

            return restore
        if op == "from_checkpoint":
            cls = self.root_cls
            return lambda: cls.from_checkpoint(path)
        raise ValueError(op)

    def expected(self, payloads: Sequence[Payload]) -> Sequence[Any]:
        """What ``contents`` must return as the leaves' data: the original payloads."""
        return payloads

    def contents(self, result: Any) -> tuple[int | None, list[Any]]:
        """The root's ``step`` and the leaves' payloads of a restored object."""
        if type(result) is not self.root_cls:
            raise BenchmarkError(
                f"{self.label}: expected a {self.root_cls.__name__}, got {type(result).__name__}"
            )
        return result.step, [leaf.payload for leaf in result.leaves.values()]


class PlainImplementation:
    """The baseline: each payload in its own file ``<leaf>/payload.bin``, nothing else."""

    label = "plain"

    def __init__(self, payloads: Sequence[Payload]) -> None:
        self.payloads = list(payloads)
        self.names = [leaf_name(i, len(payloads)) for i in range(len(payloads))]

    def prepare(self, op: str, path: str) -> Callable[[], Any]:
        names, payloads = self.names, self.payloads
        if op == "save":
            return lambda: plain_write(path, names, payloads)
        if op in ("restore", "from_checkpoint"):
            return lambda: plain_read(path, names, payloads)
        raise ValueError(op)

    def expected(self, payloads: Sequence[Payload]) -> Sequence[Any]:
        return payloads

    def contents(self, result: Any) -> tuple[int | None, list[Any]]:
        return None, list(result)


def plain_write(path: str, names: Sequence[str], payloads: Sequence[Payload]) -> None:
    os.mkdir(path)
    for name, payload in zip(names, payloads, strict=True):
        leaf_dir = os.path.join(path, name)
        os.mkdir(leaf_dir)
        with open(os.path.join(leaf_dir, PLAIN_FILE), "wb") as f:
            f.write(payload.data if isinstance(payload, np.ndarray) else payload)


def plain_read(path: str, names: Sequence[str], templates: Sequence[Payload]) -> list[Payload]:
    """Read the payloads back; ``templates`` give array dtypes and shapes (no metadata).

    Arrays are wrapped around the bytes read (``np.frombuffer``, no copy). Reading into a
    preallocated ``np.empty`` array instead was 3-5x slower for 256 MiB arrays on the
    reference VM (the kernel faulting in numpy's huge-page-advised memory during the read).
    """
    out: list[Payload] = []
    for name, template in zip(names, templates, strict=True):
        with open(os.path.join(path, name, PLAIN_FILE), "rb") as f:
            data = f.read()
        if isinstance(template, np.ndarray):
            out.append(np.frombuffer(data, template.dtype).reshape(template.shape))
        else:
            out.append(data)
    return out


LevelFiles = tuple[bytes, ...]  # the contents of LAYOUT_FILES of one level, in that order


class LayoutImplementation:
    """The layout's floor: RLlib's on-disk layout written and read with plain file I/O.

    Per level (the root, then each leaf) a directory with the four ``LAYOUT_FILES``,
    holding exactly the bytes ckptable writes for the same tree: at setup, untimed,
    ckptable saves the tree once to ``template_dir`` and every file is read into memory.
    The timed save is then only ``mkdir`` and open/write/close; the timed restore only
    open/read of the four files of every level.
    """

    label = "plain-layout"

    def __init__(self, payloads: Sequence[Payload], template_dir: str) -> None:
        self.names = [leaf_name(i, len(payloads)) for i in range(len(payloads))]
        root = build_root(_trees.CkRoot, payloads, step=ROOT_STEP)
        root.save_to_path(template_dir)
        del root
        self.root_files = read_template_level(template_dir, set(self.names))
        self.leaf_files = [
            read_template_level(os.path.join(template_dir, name), set()) for name in self.names
        ]

    def prepare(self, op: str, path: str) -> Callable[[], Any]:
        root_files, names, leaf_files = self.root_files, self.names, self.leaf_files
        if op == "save":
            return lambda: layout_write(path, root_files, names, leaf_files)
        if op in ("restore", "from_checkpoint"):
            return lambda: layout_read(path, names)
        raise ValueError(op)

    def expected(self, payloads: Sequence[Payload]) -> Sequence[Any]:
        """The leaves' ``state.pkl`` bytes, as ckptable wrote them."""
        return [files[STATE_INDEX] for files in self.leaf_files]

    def contents(self, result: Any) -> tuple[int | None, list[Any]]:
        """The leaves' ``state.pkl`` bytes read back; the other files must be unchanged."""
        levels: list[LevelFiles] = result
        if len(levels) != len(self.leaf_files) + 1:
            raise BenchmarkError(f"{self.label}: read {len(levels)} levels")
        for got, want in zip(levels, [self.root_files, *self.leaf_files], strict=True):
            if got != want:
                raise BenchmarkError(f"{self.label}: a level's files differ from those written")
        return None, [files[STATE_INDEX] for files in levels[1:]]


def read_template_level(directory: str, subdirs: set[str]) -> LevelFiles:
    """The ``LAYOUT_FILES`` of a ckptable-written level; its layout must be exactly that."""
    entries = set(os.listdir(directory))
    if entries != set(LAYOUT_FILES) | subdirs:
        raise BenchmarkError(
            f"ckptable's checkpoint level {directory} has {sorted(entries - subdirs)}, "
            f"expected {list(LAYOUT_FILES)}: the plain-layout baseline needs updating"
        )
    return tuple(Path(directory, name).read_bytes() for name in LAYOUT_FILES)


def layout_write(
    path: str, root_files: LevelFiles, names: Sequence[str], leaf_files: Sequence[LevelFiles]
) -> None:
    os.mkdir(path)
    for file_name, data in zip(LAYOUT_FILES, root_files, strict=True):
        with open(os.path.join(path, file_name), "wb") as f:
            f.write(data)
    for name, files in zip(names, leaf_files, strict=True):
        leaf_dir = os.path.join(path, name)
        os.mkdir(leaf_dir)
        for file_name, data in zip(LAYOUT_FILES, files, strict=True):
            with open(os.path.join(leaf_dir, file_name), "wb") as f:
                f.write(data)


def layout_read(path: str, names: Sequence[str]) -> list[LevelFiles]:
    """The files of the root and of every leaf, read back with ``read()``."""
    levels: list[LevelFiles] = []
    for directory in (path, *(os.path.join(path, name) for name in names)):
        files = []
        for file_name in LAYOUT_FILES:
            with open(os.path.join(directory, file_name), "rb") as f:
                files.append(f.read())
        levels.append(tuple(files))
    return levels


Implementation = TreeImplementation | PlainImplementation | LayoutImplementation


def make_implementations(
    payloads: Sequence[Payload], template_dir: str
) -> dict[str, Implementation]:
    """The four implementations; ``template_dir`` receives plain-layout's template."""
    return {
        "ckptable": TreeImplementation("ckptable", _trees.CkRoot, payloads),
        "rllib": TreeImplementation("rllib", _trees.RlRoot, payloads),
        "plain": PlainImplementation(payloads),
        "plain-layout": LayoutImplementation(payloads, template_dir),
    }


# --------------------------------------------------------------------------- checks


def check_saved(label: str, path: str, names: Sequence[str]) -> None:
    """Every leaf has its directory in the saved tree."""
    entries = set(os.listdir(path))
    missing = [name for name in names if name not in entries]
    if missing:
        raise BenchmarkError(f"{label}: saved tree at {path} lacks {len(missing)} leaf dirs")


def check_restored(
    label: str, op: str, step: int | None, got: Sequence[Any], expected: Sequence[Payload]
) -> None:
    """The restored payloads (and root step) equal the originals; raise if not."""
    where = f"{label} {OPERATIONS[op]}"
    if step is not None and step != ROOT_STEP:
        raise BenchmarkError(f"{where}: restored step {step!r}, expected {ROOT_STEP}")
    if len(got) != len(expected):
        raise BenchmarkError(f"{where}: {len(got)} leaves restored, expected {len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if isinstance(e, np.ndarray):
            same = (
                isinstance(g, np.ndarray)
                and g.dtype == e.dtype
                and g.shape == e.shape
                and bool(np.array_equal(g, e))
            )
        else:
            same = isinstance(g, bytes) and g == e
        if g is e:
            same = False  # a restore must produce new data, not hand back the original
        if not same:
            raise BenchmarkError(f"{where}: leaf {i} differs from the saved payload")


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], T], *, sync: bool) -> tuple[float, T]:
    """Run ``fn`` once; return the wall time and its result. Setup is untimed."""
    gc.collect()
    if sync:
        os.sync()  # start with no dirty pages from earlier ops
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


Samples = dict[tuple[str, str, str], list[float]]  # (workload, op, impl) → seconds


def run_round(
    workload: Workload,
    impls: dict[str, Implementation],
    order: Sequence[str],
    repeat_dir: str,
    *,
    sync: bool,
    samples: Samples | None,
) -> dict[tuple[str, str], float]:
    """All operations of one repeat, each for every implementation in ``order``."""
    names = [leaf_name(i, len(workload.payloads)) for i in range(len(workload.payloads))]
    paths = {label: os.path.join(repeat_dir, label) for label in order}
    times: dict[tuple[str, str], float] = {}
    for op in OPERATIONS:
        for label in order:
            impl = impls[label]
            run = impl.prepare(op, paths[label])
            seconds, result = timed(run, sync=sync)
            if op == "save":
                check_saved(label, paths[label], names)
            else:
                step, got = impl.contents(result)
                check_restored(label, op, step, got, impl.expected(workload.payloads))
                del step, got
            del run, result
            times[op, label] = seconds
            if samples is not None:
                samples[workload.name, op, label].append(seconds)
    return times


def run_workload(workload: Workload, run_dir: str, *, sync: bool, samples: Samples) -> None:
    """One untimed full-size round, then ``workload.repeats`` timed rounds, rotating order.

    ``workload.cleanup`` is ``"repeat"`` (delete each round's checkpoints right after it)
    or ``"end"`` (keep them until the whole run is done); see ``--cleanup``.
    """
    # plain-layout's template: a ckptable checkpoint of the tree, read once (untimed) and
    # deleted like the workload's other checkpoints.
    template_parent = tempfile.mkdtemp(prefix=f"{workload.name}-template-", dir=run_dir)
    impls = make_implementations(workload.payloads, os.path.join(template_parent, "ckptable"))
    if workload.cleanup == "repeat":
        shutil.rmtree(template_parent, ignore_errors=True)
    for key in ((workload.name, op, label) for op in OPERATIONS for label in IMPLEMENTATIONS):
        samples[key] = []
    # Round 0 is the warm-up: imports, caches, and memory the VM has not handed out yet
    # (the first GiB written to the page cache was several times slower than later ones).
    for r in range(workload.repeats + 1):
        warm_up = r == 0
        shift = (r - 1) % len(IMPLEMENTATIONS)
        order = IMPLEMENTATIONS[shift:] + IMPLEMENTATIONS[:shift]
        repeat_dir = tempfile.mkdtemp(prefix=f"{workload.name}-r{r}-", dir=run_dir)
        try:
            times = run_round(
                workload,
                impls,
                order,
                repeat_dir,
                sync=sync,
                samples=None if warm_up else samples,
            )
        finally:
            if workload.cleanup == "repeat":
                shutil.rmtree(repeat_dir, ignore_errors=True)
        shown = "  ".join(
            f"{op}: " + "/".join(format_seconds(times[op, label]) for label in IMPLEMENTATIONS)
            for op in OPERATIONS
        )
        print(
            f"[{workload.name} {'warm-up' if warm_up else f'{r}/{workload.repeats}'}] "
            f"order={','.join(order)}  "
            f"({'/'.join(IMPLEMENTATIONS)}) {shown}",
            file=sys.stderr,
            flush=True,
        )


# --------------------------------------------------------------------------- reporting


@dataclasses.dataclass
class Row:
    workload: str
    op: str
    medians: dict[str, float]
    spread: dict[str, tuple[float, float, int]]  # impl → (min, max, n)
    #: Medians over repeats of the per-repeat ratios (rllib/ckptable, ckptable/plain,
    #: ckptable/plain-layout): each pair ran back to back, so these cancel noise that hits
    #: a whole repeat.
    paired: tuple[float, float, float]

    @property
    def speedup(self) -> float:
        return self.medians["rllib"] / self.medians["ckptable"]

    @property
    def overhead(self) -> float:
        return self.medians["ckptable"] / self.medians["plain"]

    @property
    def layout_overhead(self) -> float:
        return self.medians["ckptable"] / self.medians["plain-layout"]


def summarize(workloads: Sequence[Workload], samples: Samples) -> list[Row]:
    rows = []
    for workload in workloads:
        for op in OPERATIONS:
            medians, spread = {}, {}
            for label in IMPLEMENTATIONS:
                values = samples[workload.name, op, label]
                medians[label] = statistics.median(values)
                spread[label] = (min(values), max(values), len(values))
            ck, rl, plain, layout = (samples[workload.name, op, label] for label in IMPLEMENTATIONS)
            paired = (
                statistics.median(r / c for r, c in zip(rl, ck, strict=True)),
                statistics.median(c / p for c, p in zip(ck, plain, strict=True)),
                statistics.median(c / p for c, p in zip(ck, layout, strict=True)),
            )
            rows.append(Row(workload.name, op, medians, spread, paired))
    return rows


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds * 1e3:.1f} ms"


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def format_ratio(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


HEADERS = [
    "Workload",
    "Operation",
    "ckptable",
    "RLlib",
    "plain I/O",
    "plain, RLlib layout",
    "RLlib / ckptable",
    "ckptable / plain",
    "ckptable / plain layout",
]
#: The ratio columns at the end of ``HEADERS``.
RATIO_COLUMNS = 3


def table_cells(rows: Sequence[Row]) -> list[list[str]]:
    return [
        [
            row.workload,
            OPERATIONS[row.op],
            format_seconds(row.medians["ckptable"]),
            format_seconds(row.medians["rllib"]),
            format_seconds(row.medians["plain"]),
            format_seconds(row.medians["plain-layout"]),
            format_ratio(row.speedup),
            format_ratio(row.overhead),
            format_ratio(row.layout_overhead),
        ]
        for row in rows
    ]


PAIRED_HEADERS = ["paired RL/ck", "paired ck/plain", "paired ck/layout"]


def text_table(rows: Sequence[Row]) -> str:
    """The results table for stdout, with the paired ratios as three extra columns."""
    body = [
        [*cells, *(format_ratio(ratio) for ratio in row.paired)]
        for row, cells in zip(rows, table_cells(rows), strict=True)
    ]
    cells = [HEADERS + PAIRED_HEADERS, *body]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = []
    for n, line in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], body: Sequence[Sequence[str]], left: int) -> str:
    align = ["---" if i < left else "---:" for i in range(len(headers))]
    lines = [headers, align, *body]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def spread_table(rows: Sequence[Row]) -> str:
    body = []
    for row in rows:
        for label in IMPLEMENTATIONS:
            low, high, n = row.spread[label]
            body.append(
                [
                    row.workload,
                    OPERATIONS[row.op],
                    DISPLAY_NAMES[label],
                    format_seconds(low),
                    format_seconds(row.medians[label]),
                    format_seconds(high),
                    str(n),
                ]
            )
    headers = ["Workload", "Operation", "Implementation", "min", "median", "max", "n"]
    return markdown_table(headers, body, left=3)


def paired_table(rows: Sequence[Row]) -> str:
    body = [
        [row.workload, OPERATIONS[row.op], *(format_ratio(ratio) for ratio in row.paired)]
        for row in rows
    ]
    return markdown_table(HEADERS[:2] + HEADERS[-RATIO_COLUMNS:], body, left=2)


def cpu_check() -> float:
    """Seconds for a fixed pure-Python loop: a gauge of how fast the machine is right now."""
    start = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    return time.perf_counter() - start


# --------------------------------------------------------------------------- machine facts


def machine_facts(bench_dir: str) -> list[tuple[str, str]]:
    import cloudpickle
    import pyarrow
    import ray

    import ckptable

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    return [
        ("Date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPUs (`nproc`)", str(cpus)),
        ("CPU model", _proc_field("/proc/cpuinfo", "model name") or platform.processor()),
        ("RAM", _ram()),
        ("OS", platform.platform()),
        ("Benchmark directory", f"`{bench_dir}` ({_filesystem_of(bench_dir)})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("ckptable", f"{ckptable.__version__} ({_git_revision()})"),
        ("ray", ray.__version__),
        ("numpy", np.__version__),
        ("pyarrow", pyarrow.__version__),
        ("cloudpickle", cloudpickle.__version__),
    ]


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        return None
    return None


def _ram() -> str:
    total = _proc_field("/proc/meminfo", "MemTotal")
    if total is None:
        return "unknown"
    return f"{int(total.split()[0]) / 2**20:.1f} GiB"


def _filesystem_of(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (Linux), e.g. ``ext4``."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown filesystem"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def _git_revision() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no git checkout"
    return f"git {head}" + (", src/ modified" if dirty else "")


RESULTS_TEXT = """\
Median wall time per operation. **RLlib / ckptable** is ckptable's speed-up over RLlib
(higher is better). The two plain-I/O baselines are floors (lower ratios are better,
1.00x is no overhead):

- **plain I/O**: the same payload bytes, one file per leaf (`<leaf>/payload.bin`).
  **ckptable / plain** is ckptable's cost relative to putting just the data on disk.
- **plain, RLlib layout**: RLlib's on-disk layout, which both ckptable and RLlib write,
  plus ckptable's manifest: per level (the root and each leaf) a directory with
  `metadata.json`, `class_and_ctor_args.pkl`, `state.pkl` and `.ckptable-manifest.json`,
  holding exactly the bytes ckptable writes
  (taken from a ckptable checkpoint of the same tree made before the timing). Only the
  file I/O is timed: `mkdir` and open/write/close per file; open/read for both restore
  rows. It is the layout's own file I/O; neither implementation can go below it.
  **ckptable / plain layout** is ckptable's overhead above that floor (building, encoding
  and decoding the states and metadata, constructing the objects). On wide trees the
  layout has four files per leaf, so on a disk where file creation dominates this floor
  is well above plain I/O's.

ckptable runs with its defaults: every file checksummed into the manifests, and the tree
flushed to disk (`syncfs`, or `fsync` per file for small trees) before it is published
(`durable=True`). RLlib and the plain baselines never flush. `bench_durability.py`
measures the flush and the checksums on their own."""

OPERATIONS_TEXT = """\
- `save_to_path`: save the whole tree to a new directory.
- `restore_from_path`: restore a freshly built object (empty leaves) from the checkpoint.
- `from_checkpoint`: `Root.from_checkpoint(path)`, constructing the tree and restoring it.
- plain I/O: `mkdir` plus open/write/close of each payload; for both restore rows, reading
  every file back with `read()` (arrays wrap the bytes read with `np.frombuffer`).
- plain, RLlib layout: `mkdir` per level plus open/write/close of its four files; for
  both restore rows, reading the four files of every level back with `read()` (the
  check compares every file read, including the `state.pkl` payload bytes)."""


def method_text(sync: bool) -> str:
    sync_text = " and `os.sync()`" if sync else ""
    return f"""\
Each repeat runs ckptable, RLlib, plain I/O and plain I/O of the RLlib layout back to
back, rotating the order; each timed call is preceded (untimed) by
`gc.collect()`{sync_text}. An untimed full-size round runs first. Checkpoints go to
fresh directories under the benchmark directory and are deleted outside the timing (when:
see Workloads). Restores read files that were just written, so they come from the page
cache. Every restored object (and every plain read-back) is compared with the original
data, outside the timing."""


def result_tables(rows: Sequence[Row], heading: str) -> str:
    """The medians table, the paired ratios and the spread, under ``heading`` headings."""
    return f"""{markdown_table(HEADERS, table_cells(rows), left=2)}

{heading} Paired ratios

The same ratios computed per repeat (the four implementations of a repeat ran back to
back) and then taken the median of; less sensitive to slow phases of a shared machine.

{paired_table(rows)}

{heading} Spread

{spread_table(rows)}"""


def workload_text(workloads: Sequence[Workload]) -> str:
    deleted = {"repeat": "deleted after each repeat", "end": "deleted at the end of the run"}
    return "\n".join(
        f"- **{w.name}**: {w.description}; {w.repeats} repeat{'s' if w.repeats != 1 else ''}; "
        f"checkpoints {deleted[w.cleanup]}"
        for w in workloads
    )


def markdown_report(
    command: str,
    workloads: Sequence[Workload],
    rows: Sequence[Row],
    facts: Sequence[tuple[str, str]],
    sync: bool,
) -> str:
    fact_table = markdown_table(["", ""], [[f"**{k}**", v] for k, v in facts], left=2)
    return f"""# Benchmarks

Generated by `benchmarks/bench_core.py` (see `benchmarks/README.md`); rerun it to update
this page rather than editing it.

## Command

Run from the repository root:

```sh
{command}
```

Workloads:

{workload_text(workloads)}

## Machine

{fact_table}

## Results

{RESULTS_TEXT}

{result_tables(rows, "###")}

{OPERATIONS_TEXT}

{method_text(sync)}
"""


#: Machine facts repeated in a ``--section`` (the rest are in the page's Machine table).
SECTION_FACTS = ("Date", "Benchmark directory", "ckptable", "CPU gauge")


def markdown_section(
    title: str,
    command: str,
    workloads: Sequence[Workload],
    rows: Sequence[Row],
    facts: Sequence[tuple[str, str]],
) -> str:
    """A ``## title`` section with its own command, run facts and tables (``--section``)."""
    shown = [(k, v) for k, v in facts if k in SECTION_FACTS]
    fact_table = markdown_table(["", ""], [[f"**{k}**", v] for k, v in shown], left=2)
    return f"""## {title}

A separate run, added to this page with `--section`; the tables below come from this
command (run from the repository root), the ones above from the command at the top. The
columns are those of Results above.

```sh
{command}
```

Workloads:

{workload_text(workloads)}

{fact_table}

{result_tables(rows, "###")}
"""


def add_section(page: str, title: str, section: str) -> str:
    """``page`` with the ``## title`` section replaced by ``section``, or appended."""
    lines = page.splitlines(keepends=True)
    heading = f"## {title}\n"
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        rest = "".join(lines[end:])
        return "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    return page.rstrip("\n") + "\n\n" + section


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time save_to_path / restore_from_path / from_checkpoint for ckptable, "
        "RLlib's Checkpointable and plain file I/O.",
    )
    parser.add_argument("--workloads", default="wide,big", help="comma-separated: wide,big")
    parser.add_argument("--leaves", type=int, default=1000, help="wide: number of leaves")
    parser.add_argument("--leaf-bytes", type=int, default=1024, help="wide: bytes per leaf")
    parser.add_argument("--big-mib", type=int, default=1024, help="big: total MiB of float32")
    parser.add_argument("--big-leaves", type=int, default=4, help="big: number of leaves")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats per workload (default: 7 for wide, 3 for big)",
    )
    parser.add_argument(
        "--dir", default=None, help="where to create checkpoints (default: system temp dir)"
    )
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument(
        "--section",
        default=None,
        metavar="TITLE",
        help="with --out: add (or replace) a '## TITLE' section with this run's command and "
        "tables in the existing --out page, instead of rewriting the page",
    )
    parser.add_argument(
        "--no-sync", action="store_true", help="do not os.sync() before each timed op"
    )
    parser.add_argument(
        "--cleanup",
        choices=("auto", "end", "repeat"),
        default="auto",
        help="when to delete checkpoints: at the end of the run, after each repeat, or "
        "auto (default): wide at the end, big after each repeat (see README)",
    )
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown or not args.workloads:
        parser.error(f"--workloads: choose from {', '.join(WORKLOADS)} (got {unknown})")
    for flag in ("leaves", "leaf_bytes", "big_mib", "big_leaves"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be positive")
    check_section_args(parser, args)
    return args


def check_section_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--section`` adds to an existing ``--out`` page under a one-line title."""
    if args.section is not None:
        if not args.out:
            parser.error("--section needs --out")
        if not Path(args.out).is_file():
            parser.error(f"--section: {args.out} does not exist (write it without --section)")
        if not args.section.strip() or "\n" in args.section:
            parser.error("--section: give a one-line title")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    sync = not args.no_sync

    workloads = []
    for name in args.workloads:
        repeats = args.repeats or DEFAULT_REPEATS[name]
        if name == "wide":
            workloads.append(make_wide(args.leaves, args.leaf_bytes, repeats))
        else:
            workloads.append(make_big(args.big_mib, args.big_leaves, repeats))
        workloads[-1].cleanup = AUTO_CLEANUP[name] if args.cleanup == "auto" else args.cleanup

    bench_dir = args.dir or tempfile.gettempdir()
    run_dir = tempfile.mkdtemp(prefix="ckptable-bench-", dir=bench_dir)
    samples: Samples = {}
    gauge_before = statistics.median(cpu_check() for _ in range(3))
    try:
        for workload in workloads:
            print(f"{workload.name}: {workload.description}", file=sys.stderr, flush=True)
            run_workload(workload, run_dir, sync=sync, samples=samples)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    gauge = (gauge_before, statistics.median(cpu_check() for _ in range(3)))
    rows = summarize(workloads, samples)
    print()
    print(
        "Medians (RLlib / ckptable = speed-up; ckptable / plain = overhead vs plain I/O; "
        "ckptable / plain layout = overhead vs plain I/O of RLlib's layout; "
        "paired = median of per-repeat ratios)"
    )
    print(text_table(rows))
    print(
        f"\nCPU gauge (2M-iteration Python loop): {format_seconds(gauge[0])} before, "
        f"{format_seconds(gauge[1])} after"
    )

    if args.out:
        facts = machine_facts(bench_dir)
        facts.append(
            (
                "CPU gauge",
                f"2M-iteration Python loop: {format_seconds(gauge[0])} before the run, "
                f"{format_seconds(gauge[1])} after (a noise indicator for shared machines)",
            )
        )
        out = Path(args.out)
        if args.section is not None:
            section = markdown_section(args.section.strip(), command, workloads, rows, facts)
            out.write_text(add_section(out.read_text(), args.section.strip(), section))
            print(f"\nwrote section {args.section.strip()!r} of {out}")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(markdown_report(command, workloads, rows, facts, sync))
            print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
