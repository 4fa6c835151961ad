"""Durability and checksum benchmark: what ``durable=True`` and the manifests cost.

What: 1 GiB of float32 arrays (default; ``--mib``, ``--leaves``) in a small tree
(``benchmarks/_trees.py``) is saved by ckptable durable (the default: manifest checksums,
flushed to disk before the publish) and non-durable (``durable=False``), each also with
checksums disabled, and non-durable with the CRC-32 fallback (as without ``xxhash``);
by RLlib's ``Checkpointable`` (which never flushes); and by plain file I/O of the same
array bytes, one file per leaf, without and with ``fsync``. The checkpoints are then
restored with ``verify=True`` and ``verify=False`` (and RLlib, and a plain read-back).

Why: the issue asks for the durable and non-durable save times against plain file I/O
with and without fsync, and for the checksum overhead, which may cost at most 10% of the
save time of 1 GiB of arrays. Checksum overhead = median(ckptable X) / median(ckptable X,
no checksum) - 1, with X durable or non-durable; checksums are disabled only in this
process, by swapping ckptable's checksum factories for a no-op (see ``checksums``).

Method (as ``bench_core.py``): every repeat runs all implementations back to back in a
rotating order; each timed call starts after deleting the previous checkpoints, then
``gc.collect()``, ``os.sync()`` and a memory pre-warm (see ``prewarm``), all untimed;
every restore is checked against the original arrays; medians are reported.

Run from the repository root::

    python benchmarks/bench_durability.py                      # 1 GiB on /var/tmp
    python benchmarks/bench_durability.py --mib 64 --repeats 2  # quick run
    python benchmarks/bench_durability.py --dir /var/tmp \\
        --out docs/benchmarks.md --section "Durability and checksums"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The tree classes must come from an importable module (see _trees.py); this puts the
# benchmarks directory on the path also when the script is run from elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _trees
from _trees import Payload, build_root, leaf_name
from bench_core import (
    PLAIN_FILE,
    ROOT_STEP,
    BenchmarkError,
    add_section,
    check_restored,
    check_saved,
    check_section_args,
    cpu_check,
    format_bytes,
    format_ratio,
    format_seconds,
    machine_facts,
    make_big,
    markdown_table,
    plain_read,
    plain_write,
)

from ckptable import _checksums, _manifest
from ckptable._commit import SYNCFS_MIN_FILES

#: The issue's budget: checksums may cost at most this fraction of the save time.
CHECKSUM_BUDGET = 0.10
DEFAULT_DIR = "/var/tmp"


# --------------------------------------------------------------------------- checksums


class NoChecksum:
    """A checksum that computes nothing: ``update`` returns at once, the digest is "0"."""

    def update(self, data: Any, /) -> None:
        pass

    def hexdigest(self) -> str:
        return "0"


@contextlib.contextmanager
def checksums(mode: str) -> Iterator[None]:
    """Within the block, new ckptable saves checksum with ``mode``.

    ``"default"`` changes nothing (xxh3_64 with ``xxhash`` installed); ``"crc32"`` makes
    ckptable believe ``xxhash`` is missing, so it picks its CRC-32 fallback; ``"none"``
    replaces every checksum factory with ``NoChecksum``. ckptable looks these up at each
    save (``preferred_algorithm()`` calls ``_has_xxhash()``; ``new_checksum`` reads
    ``_ALGORITHMS``), so patching the module's attributes is enough. The originals are
    put back on exit.
    """
    algorithms = dict(_checksums._ALGORITHMS)
    has_xxhash = _checksums._has_xxhash
    try:
        if mode == "none":
            for name in _checksums._ALGORITHMS:
                _checksums._ALGORITHMS[name] = NoChecksum
        elif mode == "crc32":
            _checksums._has_xxhash = lambda: False  # type: ignore[assignment]
        elif mode != "default":
            raise ValueError(mode)
        yield
    finally:
        _checksums._ALGORITHMS.clear()
        _checksums._ALGORITHMS.update(algorithms)
        _checksums._has_xxhash = has_xxhash


def checksum_speed(payloads: Sequence[Payload], algorithm: str) -> float:
    """Median seconds (of 3) to checksum all payloads in memory, one buffer each."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for payload in payloads:
            _manifest.checksum_of(algorithm, memoryview(payload).cast("B"))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- saves


@dataclasses.dataclass(frozen=True)
class Save:
    """One way of writing the workload to a new directory."""

    label: str
    name: str
    kind: str  # "ckptable", "rllib", "plain" or "plain-fsync"
    durable: bool
    #: ckptable: the ``checksums`` mode; others: "-".
    checksum: str = "-"


SAVES = (
    Save("ck-durable", "ckptable durable", "ckptable", True, "default"),
    Save("ck-nondurable", "ckptable non-durable", "ckptable", False, "default"),
    Save("ck-durable-nosum", "ckptable durable, no checksum", "ckptable", True, "none"),
    Save("ck-nondurable-nosum", "ckptable non-durable, no checksum", "ckptable", False, "none"),
    Save("ck-nondurable-crc32", "ckptable non-durable, crc32", "ckptable", False, "crc32"),
    Save("rllib", "RLlib", "rllib", False),
    Save("plain", "plain", "plain", False),
    Save("plain-fsync", "plain+fsync", "plain-fsync", True),
)
SAVE_BY_LABEL = {save.label: save for save in SAVES}


@dataclasses.dataclass(frozen=True)
class Restore:
    """One way of reading a checkpoint back: from the directory of the save ``source``."""

    label: str
    name: str
    source: str
    verify: bool = True


RESTORES = (
    Restore("ck-verify", "ckptable verify=True", "ck-durable", True),
    Restore("ck-noverify", "ckptable verify=False", "ck-durable", False),
    Restore("ck-verify-crc32", "ckptable verify=True, crc32 checkpoint", "ck-nondurable-crc32"),
    Restore("rllib", "RLlib", "rllib"),
    Restore("plain", "plain read", "plain"),
)
#: Checkpoints the restores read: kept until the round's restores are done.
KEPT = {restore.source for restore in RESTORES}

#: (variant, with checksum, without) for the checksum-overhead table.
CHECKSUM_PAIRS = (
    ("durable, {default}", "ck-durable", "ck-durable-nosum"),
    ("non-durable, {default}", "ck-nondurable", "ck-nondurable-nosum"),
    ("non-durable, crc32 (fallback)", "ck-nondurable-crc32", "ck-nondurable-nosum"),
)
#: (variant, with verification, without) for the verify-overhead table.
VERIFY_PAIRS = (
    ("verify=True, {default}", "ck-verify", "ck-noverify"),
    ("verify=True, crc32", "ck-verify-crc32", "ck-noverify"),
)


def plain_write_fsync(path: str, names: Sequence[str], payloads: Sequence[Payload]) -> None:
    """``plain_write``, durable: each file fsynced before close, then every directory
    (the leaves', the checkpoint's, and its parent, which holds the new entry)."""
    os.mkdir(path)
    directories = []
    for name, payload in zip(names, payloads, strict=True):
        leaf_dir = os.path.join(path, name)
        os.mkdir(leaf_dir)
        with open(os.path.join(leaf_dir, PLAIN_FILE), "wb") as f:
            f.write(payload.data if isinstance(payload, np.ndarray) else payload)
            f.flush()
            os.fsync(f.fileno())
        directories.append(leaf_dir)
    for directory in (*directories, path, os.path.dirname(path)):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Subjects:
    """The workload's objects, and the timed calls of every save and restore."""

    def __init__(self, payloads: Sequence[Payload]) -> None:
        self.payloads = list(payloads)
        self.names = [leaf_name(i, len(payloads)) for i in range(len(payloads))]
        self.ck_root = build_root(_trees.CkRoot, payloads, step=ROOT_STEP)
        self.rl_root = build_root(_trees.RlRoot, payloads, step=ROOT_STEP)

    def save(self, save: Save, path: str) -> Callable[[], Any]:
        names, payloads = self.names, self.payloads
        if save.kind == "ckptable":
            root, durable = self.ck_root, save.durable
            return lambda: root.save_to_path(path, durable=durable)
        if save.kind == "rllib":
            return lambda: self.rl_root.save_to_path(path)
        if save.kind == "plain":
            return lambda: plain_write(path, names, payloads)
        if save.kind == "plain-fsync":
            return lambda: plain_write_fsync(path, names, payloads)
        raise ValueError(save.kind)

    def restore(self, restore: Restore, path: str) -> Callable[[], Any]:
        """The call to time; it returns ``(step, leaf payloads)`` (``step`` None: plain)."""
        names, payloads = self.names, self.payloads
        kind = SAVE_BY_LABEL[restore.source].kind
        if kind == "plain":
            return lambda: (None, plain_read(path, names, payloads))
        if kind == "ckptable":
            target = _trees.CkRoot(len(payloads))
            verify = restore.verify

            def restore_ckptable() -> tuple[int, list[Any]]:
                target.restore_from_path(path, verify=verify)
                return target.step, [leaf.payload for leaf in target.leaves.values()]

            return restore_ckptable
        if kind == "rllib":
            rl_target = _trees.RlRoot(len(payloads))

            def restore_rllib() -> tuple[int, list[Any]]:
                rl_target.restore_from_path(path)
                return rl_target.step, [leaf.payload for leaf in rl_target.leaves.values()]

            return restore_rllib
        raise ValueError(kind)

    def check_save(self, save: Save, path: str, default_algorithm: str) -> int:
        """The checkpoint has every leaf, and a ckptable one the expected checksums (which
        proves ``checksums`` took effect). Returns the number of files written."""
        check_saved(save.name, path, self.names)
        files = sum(len(found) for _, _, found in os.walk(path))
        if save.kind.startswith("plain"):
            for name, payload in zip(self.names, self.payloads, strict=True):
                size = os.path.getsize(os.path.join(path, name, PLAIN_FILE))
                if size != memoryview(payload).nbytes:
                    raise BenchmarkError(f"{save.name}: {name} has {size} bytes")
        if save.kind != "ckptable":
            return files
        root = read_manifest(path)
        algorithm = "crc32" if save.checksum == "crc32" else default_algorithm
        if root.algorithm != algorithm:
            raise BenchmarkError(f"{save.name}: manifest uses {root.algorithm}, not {algorithm}")
        for name, payload in zip(self.names, self.payloads, strict=True):
            leaf = read_manifest(os.path.join(path, name))
            size, digest = leaf.files["state.pkl"]
            if size < memoryview(payload).nbytes or (digest == "0") != (save.checksum == "none"):
                raise BenchmarkError(f"{save.name}: {name}/state.pkl recorded as {size}, {digest}")
        return files


def read_manifest(directory: str) -> _manifest.LevelManifest:
    path = os.path.join(directory, _manifest.MANIFEST_FILE)
    return _manifest.LevelManifest.from_bytes(Path(path).read_bytes(), path)


# --------------------------------------------------------------------------- timing


class Untimed:
    """What runs before each timed call, untimed: delete the checkpoints no longer needed
    (never inside a timing: on this VM's ext4, deleting files can slow the file creation
    that follows), collect garbage, flush dirty pages, and pre-warm memory."""

    def __init__(self, *, sync: bool, prewarm_bytes: int) -> None:
        self.sync = sync
        self.prewarm_bytes = prewarm_bytes
        self.paths: list[str] = []

    def delete_later(self, path: str) -> None:
        self.paths.append(path)

    def delete(self) -> None:
        while self.paths:
            shutil.rmtree(self.paths.pop(), ignore_errors=True)

    def prepare(self) -> None:
        self.delete()
        gc.collect()
        if self.sync:
            os.sync()  # start with no dirty pages from earlier ops (and the deletions)
        if self.prewarm_bytes:
            prewarm(self.prewarm_bytes)


def prewarm(nbytes: int) -> None:
    """Touch and free ``nbytes`` of memory, so the timed call's allocations (page cache,
    arrays) reuse pages the hypervisor backs.

    The reference VM reports free memory to the host (virtio-balloon free page
    reporting): memory freed and left idle for about 2 s is handed back, and touching
    it again cost 1-3 s per GiB instead of 0.15 s. Without this, a save of 1 GiB took
    0.3 s or 3-4 s depending on which pages it got (whichever implementation it was).
    numpy advises huge pages for large arrays, as the large folios of the page cache
    want; touching 4 KiB pages (an ``mmap``) did not help.
    """
    buffer = np.ones(nbytes // 8, dtype=np.float64)
    del buffer


def timed(fn: Callable[[], Any], untimed: Untimed) -> tuple[float, Any]:
    """``untimed.prepare()``; then run ``fn`` once and return its wall time and result."""
    untimed.prepare()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


Samples = dict[tuple[str, str], list[float]]  # (op, label) → seconds per repeat


@dataclasses.dataclass
class RunInfo:
    default_algorithm: str
    files: int = 0


def run_round(
    subjects: Subjects,
    round_dir: str,
    shift: int,
    untimed: Untimed,
    info: RunInfo,
) -> dict[tuple[str, str], float]:
    """Every save, then every restore, each in rotated order; returns their times."""
    times: dict[tuple[str, str], float] = {}
    paths = {save.label: os.path.join(round_dir, save.label) for save in SAVES}
    for save in rotated(SAVES, shift):
        run = subjects.save(save, paths[save.label])
        with checksums(save.checksum if save.kind == "ckptable" else "default"):
            seconds, _ = timed(run, untimed)
        files = subjects.check_save(save, paths[save.label], info.default_algorithm)
        if save.label == "ck-durable":
            info.files = files
        if save.label not in KEPT:
            untimed.delete_later(paths[save.label])
        times["save", save.label] = seconds
    for restore in rotated(RESTORES, shift):
        run = subjects.restore(restore, paths[restore.source])
        seconds, (step, got) = timed(run, untimed)
        check_restored(restore.name, "restore", step, got, subjects.payloads)
        del run, step, got
        times["restore", restore.label] = seconds
    for label in KEPT:
        untimed.delete_later(paths[label])
    return times


def run(subjects: Subjects, run_dir: str, repeats: int, info: RunInfo, untimed: Untimed) -> Samples:
    """One untimed warm-up round, then ``repeats`` timed rounds in rotating order."""
    samples: Samples = {("save", s.label): [] for s in SAVES}
    samples.update({("restore", r.label): [] for r in RESTORES})
    for r in range(repeats + 1):
        warm_up = r == 0
        round_dir = os.path.join(run_dir, f"r{r}")
        os.mkdir(round_dir)
        times = run_round(subjects, round_dir, r - 1, untimed, info)
        if not warm_up:
            for key, seconds in times.items():
                samples[key].append(seconds)
        shown = "  ".join(
            f"{op}: "
            + " ".join(f"{label}={format_seconds(t)}" for (o, label), t in times.items() if o == op)
            for op in ("save", "restore")
        )
        print(
            f"[{'warm-up' if warm_up else f'{r}/{repeats}'}] {shown}", file=sys.stderr, flush=True
        )
    untimed.delete()
    return samples


# --------------------------------------------------------------------------- reporting


@dataclasses.dataclass
class Report:
    command: str
    description: str
    repeats: int
    nbytes: int
    samples: Samples
    default_algorithm: str
    files: int
    checksum_seconds: dict[str, float]
    gauge: tuple[float, float]
    sync: bool
    prewarm_bytes: int

    def median(self, op: str, label: str) -> float:
        return statistics.median(self.samples[op, label])

    def paired(self, op: str, a: str, b: str) -> float:
        """Median over repeats of ``a / b`` (the two ran in the same repeat)."""
        pairs = zip(self.samples[op, a], self.samples[op, b], strict=True)
        return statistics.median(x / y for x, y in pairs)

    def throughput(self, seconds: float) -> str:
        return f"{self.nbytes / seconds / 1e9:.2f}"

    def save_rows(self) -> list[list[str]]:
        plain, fsync = self.median("save", "plain"), self.median("save", "plain-fsync")
        rows = []
        for save in SAVES:
            values = self.samples["save", save.label]
            median = statistics.median(values)
            rows.append(
                [
                    save.name,
                    "yes" if save.durable else "no",
                    format_seconds(median),
                    self.throughput(median),
                    format_ratio(median / plain),
                    format_ratio(median / fsync),
                    format_seconds(min(values)),
                    format_seconds(max(values)),
                ]
            )
        return rows

    def restore_rows(self) -> list[list[str]]:
        plain = self.median("restore", "plain")
        rows = []
        for restore in RESTORES:
            values = self.samples["restore", restore.label]
            median = statistics.median(values)
            rows.append(
                [
                    restore.name,
                    format_seconds(median),
                    self.throughput(median),
                    format_ratio(median / plain),
                    format_seconds(min(values)),
                    format_seconds(max(values)),
                ]
            )
        return rows

    def overhead_rows(
        self, op: str, pairs: Sequence[tuple[str, str, str]], budget: bool
    ) -> list[list[str]]:
        rows = []
        for variant, with_label, without_label in pairs:
            with_, without = self.median(op, with_label), self.median(op, without_label)
            overhead = with_ / without - 1
            paired = self.paired(op, with_label, without_label) - 1
            row = [
                variant.format(default=self.default_algorithm),
                format_seconds(with_),
                format_seconds(without),
                format_seconds(with_ - without),
                f"{overhead:+.1%}",
                f"{paired:+.1%}",
            ]
            if budget:
                worst = max(overhead, paired)
                row.append(
                    "within" if worst <= CHECKSUM_BUDGET else f"**over** ({worst:.1%} > 10%)"
                )
            rows.append(row)
        return rows

    def over_budget(self) -> list[str]:
        """The checksum-overhead rows above the 10% budget (by median or paired ratio)."""
        out = []
        for variant, with_label, without_label in CHECKSUM_PAIRS:
            overhead = self.median("save", with_label) / self.median("save", without_label) - 1
            paired = self.paired("save", with_label, without_label) - 1
            if max(overhead, paired) > CHECKSUM_BUDGET:
                out.append(
                    f"{variant.format(default=self.default_algorithm)}: "
                    f"{overhead:+.1%} (paired {paired:+.1%})"
                )
        return out

    def checksum_text(self) -> str:
        return ", ".join(
            f"{name} {format_seconds(seconds)} ({self.nbytes / seconds / 1e9:.1f} GB/s)"
            for name, seconds in self.checksum_seconds.items()
        )

    def flush_text(self) -> str:
        if self.files >= SYNCFS_MIN_FILES:
            return f"one `syncfs(2)` ({self.files} files >= {SYNCFS_MIN_FILES})"
        return f"an `fsync` per file and directory ({self.files} files < {SYNCFS_MIN_FILES})"


SAVE_HEADERS = [
    "Save",
    "durable",
    "median",
    "GB/s",
    "vs plain",
    "vs plain+fsync",
    "min",
    "max",
]
RESTORE_HEADERS = ["Restore", "median", "GB/s", "vs plain read", "min", "max"]
CHECKSUM_HEADERS = [
    "Save (checksum)",
    "with",
    "without",
    "difference",
    "overhead",
    "paired",
    "10% budget",
]
VERIFY_HEADERS = ["Restore (verify)", "with", "verify=False", "difference", "overhead", "paired"]


def text_table(headers: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> str:
    cells = [list(headers), *(list(row) for row in body)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_report(report: Report) -> None:
    print(f"\n{report.description}; {report.repeats} repeats; medians")
    print(f"ckptable durable flushes with {report.flush_text()}".replace("`", ""))
    print(f"checksum of the payload in memory: {report.checksum_text()}\n")
    print(text_table(SAVE_HEADERS, report.save_rows(), left=2))
    print()
    checksum_rows = report.overhead_rows("save", CHECKSUM_PAIRS, budget=True)
    print(text_table(CHECKSUM_HEADERS, [[c.replace("**", "") for c in r] for r in checksum_rows]))
    print()
    print(text_table(RESTORE_HEADERS, report.restore_rows()))
    print()
    print(text_table(VERIFY_HEADERS, report.overhead_rows("restore", VERIFY_PAIRS, budget=False)))
    over = report.over_budget()
    print(
        "\nchecksum overhead OVER the 10% budget: " + "; ".join(over)
        if over
        else "\nchecksum overhead within the 10% budget"
    )
    gauge = report.gauge
    print(
        f"CPU gauge (2M-iteration Python loop): {format_seconds(gauge[0])} before, "
        f"{format_seconds(gauge[1])} after"
    )


METHOD_TEXT = """\
- Saves go to a new directory each time, so ckptable publishes with a plain `rename`
  (the `RENAME_EXCHANGE` swap is for replacing an existing checkpoint) and, when
  durable, flushes the files, then fsyncs the parent after the rename.
- **no checksum**: in the benchmark process only, ckptable's checksum factories are
  replaced by one whose `update` does nothing (manifests are still written, with
  digest `0`); **crc32**: ckptable is made to believe `xxhash` is missing, so it uses its
  zlib CRC-32 fallback. The originals are put back after each save. Each save's
  manifests are checked to use the intended checksum.
- **plain**: `mkdir` per leaf, then open/write/close of one file holding the array's
  bytes; **plain+fsync**: the same, each file fsynced before close, then each leaf
  directory, the checkpoint directory and its parent fsynced. RLlib never fsyncs.
- **overhead** = median(with) / median(without) - 1; **paired** = median over repeats of
  the per-repeat ratio (both ran in the same repeat) - 1, less sensitive to slow phases
  of a shared machine. The budget column takes the larger of the two.
- Restores read the checkpoints of the same repeat (`verify` rows: the default-checksum
  durable one; crc32: the crc32 one), from the page cache. `verify=True` reads each file
  once to check it and again to decode it. **plain read**: `read()` of every file.
- Every repeat runs all saves, then all restores, in an order rotated from repeat to
  repeat, after an untimed warm-up round. Before each timed call, untimed: the
  checkpoints no longer needed are deleted (on this VM's ext4, deleting files can slow
  file creation that follows, so never inside a timing), then `gc.collect()`{sync}.
  Every restore is compared with the original arrays. GB/s is 10^9 bytes of array data
  per second.{prewarm}"""

PREWARM_TEXT = """
- Pre-warm: right before each timed call, {size} of memory (a numpy array) is touched
  and freed, so that the call gets memory the hypervisor backs. This VM hands memory
  left free for about 2 s back to the host (free page reporting), and touching it again
  cost 1-3 s per GiB instead of 0.15 s; without the pre-warm a 1 GiB save to ext4 took
  0.3 s or 3-4 s depending on the pages it got, whatever the implementation."""


def markdown_section(title: str, report: Report, facts: Sequence[tuple[str, str]]) -> str:
    fact_table = markdown_table(["", ""], [[f"**{k}**", v] for k, v in facts], left=2)
    over = report.over_budget()
    verdict = (
        "**Over the 10% budget**: " + "; ".join(over) + "." if over else "Within the 10% budget."
    )
    checksum_rows = report.overhead_rows("save", CHECKSUM_PAIRS, budget=True)
    sync = " and `os.sync()`" if report.sync else ""
    prewarm = (
        PREWARM_TEXT.format(size=format_bytes(report.prewarm_bytes)) if report.prewarm_bytes else ""
    )
    return f"""## {title}

Generated by `benchmarks/bench_durability.py` (see `benchmarks/README.md`): what
`durable=True` and the integrity manifests' checksums cost, against plain file I/O with
and without `fsync`. The issue's budget: checksumming may cost at most 10% of the save
time of 1 GiB of arrays. Run from the repository root:

```sh
{report.command}
```

Workload: {report.description}; {report.repeats} repeats. ckptable's default checksum is
{report.default_algorithm}; its durable save flushes with {report.flush_text()}. The
checksum alone, over the arrays in memory: {report.checksum_text()}.

{fact_table}

### Save

Median wall time; ratios of medians against the two plain-I/O baselines.

{markdown_table(SAVE_HEADERS, report.save_rows(), left=2)}

### Checksum overhead on save

{verdict}

{markdown_table(CHECKSUM_HEADERS, checksum_rows, left=1)}

### Restore

{markdown_table(RESTORE_HEADERS, report.restore_rows(), left=1)}

{markdown_table(VERIFY_HEADERS, report.overhead_rows("restore", VERIFY_PAIRS, False), left=1)}

### Method

{METHOD_TEXT.format(sync=sync, prewarm=prewarm)}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time ckptable's durable and non-durable saves, with and without "
        "checksums, against RLlib and plain file I/O with and without fsync.",
    )
    parser.add_argument("--mib", type=int, default=1024, help="total MiB of float32 arrays")
    parser.add_argument("--leaves", type=int, default=8, help="number of leaves (arrays)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats")
    parser.add_argument(
        "--dir",
        default=DEFAULT_DIR,
        help=f"where to create checkpoints (default: a temp dir under {DEFAULT_DIR})",
    )
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument(
        "--section",
        default=None,
        metavar="TITLE",
        help="with --out: add (or replace) a '## TITLE' section in the existing --out page",
    )
    parser.add_argument(
        "--no-sync", action="store_true", help="do not os.sync() before each timed op"
    )
    parser.add_argument(
        "--prewarm-mib",
        type=int,
        default=None,
        help="MiB of memory to touch and free before each timed op (default: 2 x --mib; "
        "0: none); see prewarm()",
    )
    args = parser.parse_args(argv)
    if args.prewarm_mib is not None and args.prewarm_mib < 0:
        parser.error("--prewarm-mib must not be negative")
    for flag in ("mib", "leaves", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be positive")
    check_section_args(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    sync = not args.no_sync
    workload = make_big(args.mib, args.leaves, args.repeats)
    nbytes = sum(memoryview(p).nbytes for p in workload.payloads)
    subjects = Subjects(workload.payloads)
    default_algorithm = _manifest.preferred_algorithm()
    checksum_seconds = {
        name: checksum_speed(workload.payloads, name)
        for name in dict.fromkeys([default_algorithm, "crc32"])
    }
    info = RunInfo(default_algorithm)
    prewarm_mib = 2 * args.mib if args.prewarm_mib is None else args.prewarm_mib
    untimed = Untimed(sync=sync, prewarm_bytes=prewarm_mib << 20)

    run_dir = tempfile.mkdtemp(prefix="ckptable-durability-", dir=args.dir)
    print(f"{workload.description} under {run_dir}", file=sys.stderr, flush=True)
    gauge_before = statistics.median(cpu_check() for _ in range(3))
    try:
        samples = run(subjects, run_dir, args.repeats, info, untimed)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    gauge = (gauge_before, statistics.median(cpu_check() for _ in range(3)))

    report = Report(
        command=command,
        description=workload.description,
        repeats=args.repeats,
        nbytes=nbytes,
        samples=samples,
        default_algorithm=default_algorithm,
        files=info.files,
        checksum_seconds=checksum_seconds,
        gauge=gauge,
        sync=sync,
        prewarm_bytes=untimed.prewarm_bytes,
    )
    print_report(report)

    if args.out:
        facts = machine_facts(args.dir)
        facts.append(
            (
                "CPU gauge",
                f"2M-iteration Python loop: {format_seconds(gauge[0])} before the run, "
                f"{format_seconds(gauge[1])} after (a noise indicator for shared machines)",
            )
        )
        out = Path(args.out)
        title = (args.section or "Durability and checksums").strip()
        section = markdown_section(title, report, facts)
        if args.section is not None:
            out.write_text(add_section(out.read_text(), title, section))
            print(f"\nwrote section {title!r} of {out}")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"# Benchmarks\n\n{section}")
            print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
