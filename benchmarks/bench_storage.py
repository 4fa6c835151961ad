"""Storage and format benchmark: ckptable vs RLlib vs plain I/O, on disk and on S3.

What: the tree of ``benchmarks/_trees.py`` holding a *big* workload (1 GiB of float32
arrays in 4 leaves; ``--big-mib``, ``--big-leaves``) or a *wide* one (1,000 leaves of
1 KiB; ``--leaves``, ``--leaf-bytes``; on S3 100 leaves, ``--s3-leaves``) is saved and
restored in both state formats (cloudpickle, and msgpack via ``use_msgpack=True``) on two
storages: the local disk (``--dir``) and an S3-compatible server (moto's, on the
loopback, in a child process; ``tests/s3_server.py``). On S3 it runs once per client
library (``--s3-clients``: pyarrow's ``S3FileSystem``, s3fs; also obstore, on request:
ckptable gets its fsspec adapter, the plain baselines its own ``put``/``get``) and per
added round-trip
time (``--s3-rtts``, default 20 ms: a latency proxy in front of the server,
``tests/latency_proxy.py``); ckptable gets the client's filesystem as ``filesystem=``,
and so does RLlib's ``Checkpointable`` (s3fs wrapped in
``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``, as RLlib takes pyarrow filesystems
only). Baselines: plain I/O of the same bytes, one file (one object on S3) per leaf: a
plain write (locally also with ``fsync``) and a plain read, one after the other
(*sequential*) and, on S3, ``--s3-threads`` (32) at a time (*concurrent*), with the
same client. ckptable's saves run with ``durable=True`` (its default) and, locally,
``durable=False``; its restores with ``verify=True`` (default), ``verify=False`` and
``mmap=True``. On S3 the requests of one call of every implementation (in the last
repeat, outside the timing) are counted by kind (PUT, GET, HEAD, LIST, DELETE, OTHER:
``S3Server.counts()``) and reported as a table.

Why: the issue "Any storage, portable formats, and big states at disk speed" sets
targets for the local big cloudpickle case: a save within 1.1x of a plain write
(``durable=False`` vs write; ``durable=True`` vs write+fsync), a restore within 1.1x of
a plain read, and an ``mmap=True`` restore at least 10x faster than RLlib's restore. The
issue about object stores at realistic latency sets targets on S3, in both formats and
for each client: with 20 ms RTT, *wide*: save and restore each >= 5x faster than RLlib's
and <= 1.5x the plain concurrent upload / download; *big*: save <= 1.2x the plain
concurrent upload, restore (``verify=True``) <= 1.2x the plain concurrent download;
without added latency: ckptable not slower than RLlib in any operation. The script
prints each target as PASS or FAIL with its figures, and the same measurements for the
combinations without targets, with the peak memory of every operation. The local wide
target on tmpfs (1,000 leaves) is ``bench_wide_local.py``'s.

Method (as ``bench_core.py`` and ``bench_durability.py``): every repeat runs all
implementations of an operation back to back in a rotating order, after an untimed
warm-up round; before each timed call, untimed: checkpoints no longer needed are
deleted, ``gc.collect()``, ``os.sync()``, a memory pre-warm (see
``bench_durability.prewarm``), freed memory handed back to the OS and the process's
peak-RSS mark reset (see ``PeakRss``). Every restore is compared with the original data.
Reported: medians, ratios of medians and paired ratios (the median of the per-repeat
ratios), and the median peak extra memory of each operation.

Run from the repository root::

    python benchmarks/bench_storage.py --big-mib 64 --repeats 2     # quick local run
    python benchmarks/bench_storage.py --storages s3 --repeats 3 --s3-big-mib 64  # quick S3
    python benchmarks/bench_storage.py --storages s3 --s3-rtts 0,20 --s3-clients s3fs
    python benchmarks/bench_storage.py --dir /var/tmp --storages local,s3 --repeats 11 \\
        --s3-big-mib 256 --s3-leaves 100 --out docs/benchmarks.md \\
        --section "Storage and formats" --plot docs/img/storage_formats.png

S3 flags: ``--s3-clients pyarrow,s3fs`` (default both; ``obstore`` too, if installed),
``--s3-rtts 0,20`` (round-trip
times in ms added by the proxy, one run each; default 20; ``--s3-rtt-ms N`` is
``--s3-rtts N``; 0 connects to the server directly), ``--s3-threads 32`` (requests in
flight of the plain concurrent baseline; s3fs gets as many pooled connections),
``--s3-big-mib``, ``--s3-leaves`` (default 100), ``--s3-repeats`` (default
``--repeats``, else 3). The S3 sizes are smaller because moto charges milliseconds per
request and copies the whole object for each ranged GET (see ``S3Place.request_costs``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow
import pyarrow.fs

# The tree classes must come from an importable module (see _trees.py); this puts the
# benchmarks directory on the path also when the script is run from elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _trees
from _memory import PeakRss, proc_status, release_freed_memory
from _trees import Payload, build_root, leaf_name
from bench_core import (
    PLAIN_FILE,
    ROOT_STEP,
    BenchmarkError,
    Workload,
    add_section,
    check_restored,
    check_section_args,
    cpu_check,
    format_bytes,
    format_ratio,
    format_seconds,
    machine_facts,
    make_big,
    make_wide,
    markdown_table,
    plain_read,
    plain_write,
)
from bench_durability import plain_write_fsync, prewarm, rotated, text_table

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("big", "wide")
FORMATS = ("cloudpickle", "msgpack")
STORAGES = ("local", "s3")
STORAGE_TITLES = {"local": "local disk", "s3": "S3-compatible server"}
DEFAULT_REPEATS = {"big": 5, "wide": 7}
DEFAULT_S3_REPEATS = 3
#: Wide on S3: 100 leaves (each costs requests, and moto milliseconds per request).
DEFAULT_S3_LEAVES = 100
S3_CLIENTS = ("pyarrow", "s3fs")
#: ``--s3-clients`` may also name obstore (``pip install obstore``): ckptable reaches it
#: through obstore's fsspec adapter, the plain baselines through its own calls.
S3_CLIENT_CHOICES = (*S3_CLIENTS, "obstore")
#: The round-trip times (ms) the latency proxy adds by default: a region close by.
DEFAULT_S3_RTTS = (20.0,)
#: Requests in flight of the plain concurrent baseline (and s3fs's connection pool).
DEFAULT_S3_THREADS = 32
#: Request kinds counted by the S3 server (``tests/s3_server.py``'s ``KINDS``).
REQUEST_KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE", "OTHER")
#: Variants that take a request per file in sequence: at 20 ms RTT, a minute per call of
#: the wide tree with pyarrow; with added latency they are timed in fewer repeats.
SLOW_KINDS = frozenset({"rllib", "plain"})
DEFAULT_S3_SLOW_REPEATS = 1
DEFAULT_SECTION = "Storage and formats"
#: The bucket the benchmark creates on its own moto server.
BUCKET = "ckptable-bench"
#: The ranged read of ``S3Place.request_costs``: ckptable's read size for big files.
PROBE_RANGE = 8 << 20
LOCAL = frozenset({"local"})
S3 = frozenset({"s3"})
BOTH = frozenset(STORAGES)


# --------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One implementation of one operation (``save`` or ``restore``)."""

    op: str
    label: str
    name: str
    storages: frozenset[str]
    #: ckptable's options (saves: ``durable``; restores: ``verify``, ``mmap``).
    durable: bool = True
    verify: bool = True
    mmap: bool = False
    #: Restores: the label of the save whose checkpoint they read.
    source: str = ""

    @property
    def kind(self) -> str:
        """``ckptable``, ``rllib``, ``plain``, ``plain-conc``, ``plain-objects`` or
        ``plain-fsync``."""
        return "ckptable" if self.label.startswith("ck") else self.label

    @property
    def key(self) -> tuple[str, str]:
        return self.op, self.label


SAVES = (
    Variant("save", "ck", "ckptable", BOTH),
    Variant("save", "ck-nondurable", "ckptable durable=False", LOCAL, durable=False),
    Variant("save", "rllib", "RLlib", BOTH),
    Variant("save", "plain", "plain write, sequential", BOTH),
    Variant("save", "plain-conc", "plain write, concurrent", S3),
    Variant("save", "plain-objects", "plain write of ckptable's objects, concurrent", S3),
    Variant("save", "plain-fsync", "plain write+fsync", LOCAL),
)
RESTORES = (
    Variant("restore", "ck", "ckptable", BOTH, source="ck"),
    Variant("restore", "ck-noverify", "ckptable verify=False", BOTH, verify=False, source="ck"),
    Variant("restore", "ck-mmap", "ckptable mmap=True", BOTH, mmap=True, source="ck"),
    Variant("restore", "rllib", "RLlib", BOTH, source="rllib"),
    Variant("restore", "plain", "plain read, sequential", BOTH, source="plain"),
    Variant("restore", "plain-conc", "plain read, concurrent", S3, source="plain-conc"),
    Variant(
        "restore",
        "plain-objects",
        "plain read of ckptable's objects, concurrent",
        S3,
        source="plain-objects",
    ),
)
VARIANTS = {v.key: v for v in (*SAVES, *RESTORES)}
#: Labels in the plot's legend (one colour per label, save and restore alike).
LEGEND = {
    "ck": "ckptable (defaults)",
    "ck-nondurable": "ckptable durable=False / verify=False",
    "ck-noverify": "ckptable durable=False / verify=False",
    "ck-mmap": "ckptable mmap=True",
    "rllib": "RLlib",
    "plain": "plain write / read, sequential",
    "plain-conc": "plain write / read, concurrent (S3)",
    "plain-objects": "plain write / read of ckptable's objects, concurrent (S3)",
    "plain-fsync": "plain write+fsync",
}
COLORS = {
    "ck": "#1f5fa8",
    "ck-nondurable": "#6fa8dc",
    "ck-noverify": "#6fa8dc",
    "ck-mmap": "#0b2f5a",
    "rllib": "#e69138",
    "plain": "#999999",
    "plain-conc": "#c9c9c9",
    "plain-objects": "#e0e0e0",
    "plain-fsync": "#555555",
}


def may_be_unsupported(variant: Variant, fmt: str, storage: str) -> bool:
    """The combinations expected to refuse: ``mmap=True`` maps local files only, and
    RLlib looks for ``state.msgpack`` with ``pathlib`` (on the local disk) whatever the
    filesystem. The warm-up round tries them; if they raise, they are reported as not
    supported. Any other exception stops the benchmark."""
    if storage != "s3" or variant.op != "restore":
        return False
    return variant.label == "ck-mmap" or (variant.label == "rllib" and fmt == "msgpack")


@dataclasses.dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of median times (lower: the numerator is faster)."""

    op: str
    numerator: str
    denominator: str
    storages: frozenset[str]
    #: The issue's bound for the big cloudpickle workload on the local disk, if any:
    #: ``("<=", 1.1)`` or ``(">=", 10.0)``.
    target: tuple[str, float] | None = None

    @property
    def text(self) -> str:
        num, den = VARIANTS[self.op, self.numerator], VARIANTS[self.op, self.denominator]
        return f"{num.name} / {den.name}"


RATIOS = (
    Ratio("save", "ck-nondurable", "plain", LOCAL, ("<=", 1.1)),
    Ratio("save", "ck", "plain-fsync", LOCAL, ("<=", 1.1)),
    Ratio("save", "ck", "plain-conc", S3),
    Ratio("save", "ck", "plain", S3),
    Ratio("save", "ck", "plain-objects", S3),
    Ratio("save", "plain", "plain-conc", S3),
    Ratio("save", "rllib", "plain", BOTH),
    Ratio("save", "rllib", "ck-nondurable", LOCAL),
    Ratio("save", "rllib", "ck", S3),
    Ratio("restore", "ck", "plain-conc", S3),
    Ratio("restore", "ck", "plain", BOTH, ("<=", 1.1)),
    Ratio("restore", "ck-noverify", "plain", BOTH),
    Ratio("restore", "ck", "plain-objects", S3),
    Ratio("restore", "plain", "plain-conc", S3),
    Ratio("restore", "rllib", "plain", BOTH),
    Ratio("restore", "rllib", "ck", BOTH),
    Ratio("restore", "rllib", "ck-mmap", LOCAL, (">=", 10.0)),
)
#: The group the issue's targets are about: (workload, format, storage).
TARGET_GROUP = ("big", "cloudpickle", "local")


@dataclasses.dataclass(frozen=True)
class S3Target:
    """A target of the issue about object stores at realistic latency: ``ratio`` meets
    ``sign bound`` for the ``workloads``, in every format and with every client, in the
    runs with added latency (``latency=True``: RTT > 0) or without (RTT = 0)."""

    workloads: tuple[str, ...]
    latency: bool
    ratio: Ratio
    sign: str
    bound: float

    def applies(self, workload: str, rtt_ms: float) -> bool:
        return workload in self.workloads and self.latency == (rtt_ms > 0)


def _s3_target(workloads: str, latency: bool, op: str, num: str, den: str, bound: str) -> S3Target:
    sign, value = bound.split()
    return S3Target(
        tuple(workloads.split(",")), latency, Ratio(op, num, den, S3), sign, float(value)
    )


S3_TARGETS = (
    _s3_target("wide", True, "save", "rllib", "ck", ">= 5"),
    _s3_target("wide", True, "restore", "rllib", "ck", ">= 5"),
    # "within 1.5x of a plain concurrent upload/download of the same files": the files
    # of the checkpoint (four per level, as RLlib's layout has), uploaded and downloaded
    # by plain concurrent requests. ``plain-conc`` (one object per leaf) is reported too.
    _s3_target("wide", True, "save", "ck", "plain-objects", "<= 1.5"),
    _s3_target("wide", True, "restore", "ck", "plain-objects", "<= 1.5"),
    _s3_target("big", True, "save", "ck", "plain-conc", "<= 1.2"),
    _s3_target("big", True, "restore", "ck", "plain-conc", "<= 1.2"),
    _s3_target("big,wide", False, "save", "rllib", "ck", ">= 1"),
    _s3_target("big,wide", False, "restore", "rllib", "ck", ">= 1"),
)


# --------------------------------------------------------------------------- storages


class LocalPlace:
    """Checkpoints in a directory of the local disk."""

    name = "local"
    title = "local disk"
    filesystem: Any = None
    rllib_filesystem: Any = None

    def __init__(self, base: str) -> None:
        self.base = base

    def new_round(self, name: str) -> str:
        path = os.path.join(self.base, name)
        os.mkdir(path)
        return path

    def join(self, base: str, name: str) -> str:
        return os.path.join(base, name)

    def delete(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def entries(self, path: str) -> set[str]:
        return set(os.listdir(path))

    def write_plain(self, path: str, names: Sequence[str], payloads: Sequence[Payload]) -> None:
        plain_write(path, names, payloads)

    def read_plain(self, path: str, names: Sequence[str], templates: Sequence[Payload]) -> Any:
        return plain_read(path, names, templates)

    def close(self) -> None:
        pass


class S3Place:
    """Checkpoints under a prefix of a bucket on the benchmark's own moto server, through
    one client library (``pyarrow`` or ``s3fs``) and, if ``server`` is a view through a
    latency proxy (``S3Server.with_latency``), with its round-trip time.

    ``filesystem`` is what ckptable gets, ``rllib_filesystem`` what RLlib gets (RLlib
    takes pyarrow filesystems only: s3fs is wrapped in ``PyFileSystem(FSSpecHandler)``).
    The plain baselines use the same client (``plain_filesystem``: pyarrow's with
    ``allow_delayed_open=True``, so that a small object is one ``PutObject``, not a
    multipart upload's three requests, as ckptable writes them): one object per leaf,
    one request at a time (``write_plain``, ``read_plain``) or ``threads`` at a time
    (``*_concurrent``); and ckptable's own objects, ``threads`` at a time
    (``write_objects``, ``read_objects``).
    """

    name = "s3"

    def __init__(self, server: Any, client: str, prefix: str, threads: int) -> None:
        self.server = server
        self.client = client
        self.prefix = prefix
        self.threads = threads
        if client == "pyarrow":
            self.filesystem = server.pyarrow_filesystem()
            self.rllib_filesystem = self.filesystem
            self.plain_filesystem = server.pyarrow_filesystem(allow_delayed_open=True)
        elif client == "s3fs":
            # As many pooled connections as the concurrent baseline has requests in
            # flight (botocore's default is 10); a fresh instance, not fsspec's cached one.
            self.filesystem = server.s3fs_filesystem(
                config_kwargs={"max_pool_connections": max(threads, 10)},
                skip_instance_cache=True,
            )
            self.rllib_filesystem = pyarrow.fs.PyFileSystem(
                pyarrow.fs.FSSpecHandler(self.filesystem)
            )
            self.plain_filesystem = self.filesystem
        elif client == "obstore":
            self.filesystem = server.obstore_filesystem()
            # RLlib writes through pyarrow's file API, whose buffers obstore's fsspec
            # writer refuses ("not compatible with u8"): RLlib gets pyarrow's own S3.
            self.rllib_filesystem = server.pyarrow_filesystem()
            self.plain_filesystem = self.filesystem
            #: obstore's own stores (one per bucket) for the plain baselines.
            self.stores: dict[str, Any] = {}
        else:
            raise ValueError(client)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="plain-s3")

    @property
    def rtt_ms(self) -> float:
        return float(self.server.rtt_ms)

    @property
    def title(self) -> str:
        latency = f"{self.rtt_ms:g} ms RTT" if self.rtt_ms else "no added latency"
        return f"S3-compatible server ({self.client}, {latency})"

    def new_round(self, name: str) -> str:
        return f"{self.prefix}/{name}"  # object stores have no directories to make

    def join(self, base: str, name: str) -> str:
        return f"{base}/{name}"

    # ------------------------------------------------------------------ one object

    def _store(self, key: str) -> tuple[Any, str]:
        """obstore: the store of ``key``'s bucket, and the key within it."""
        bucket, _, name = key.partition("/")
        if bucket not in self.stores:
            self.stores[bucket] = self.server.obstore_store(bucket)
        return self.stores[bucket], name

    def put(self, key: str, payload: Payload) -> None:
        """One object holding ``payload``'s bytes: one PUT (multipart above the
        client's part size)."""
        if self.client == "pyarrow":
            with self.plain_filesystem.open_output_stream(key) as f:
                f.write(payload)
        elif self.client == "obstore":  # the array's memory itself
            import obstore

            store, name = self._store(key)
            obstore.put(store, name, memoryview(payload).cast("B"))
        else:  # botocore takes bytes, not buffers: arrays are copied once
            data = payload.tobytes() if isinstance(payload, np.ndarray) else payload
            self.plain_filesystem.pipe_file(key, data)

    def get(self, key: str, nbytes: int) -> bytes:
        """The first ``nbytes`` of an object, in one GET.

        pyarrow: ``read(size)`` on ``open_input_stream``; ``read()`` without a size would
        read the stream in 256 KiB requests (pyarrow cannot ask a stream its size), which
        is no baseline at all. s3fs: ``cat_file(key, end=nbytes)``.
        """
        if self.client == "pyarrow":
            with self.plain_filesystem.open_input_stream(key) as f:
                data: bytes = f.read(nbytes)
            return data
        if self.client == "obstore":  # its ``Bytes``: the downloaded memory, no copy
            import obstore

            store, name = self._store(key)
            if not nbytes:
                return obstore.get(store, name).bytes()  # type: ignore[no-any-return]
            return obstore.get_range(store, name, start=0, end=nbytes)  # type: ignore[no-any-return]
        if not nbytes:  # (a range of 0 bytes is no range)
            return bytes(self.plain_filesystem.cat_file(key))
        return bytes(self.plain_filesystem.cat_file(key, start=0, end=nbytes))

    def delete(self, path: str) -> None:
        with contextlib.suppress(OSError):
            if self.client == "pyarrow":
                self.filesystem.delete_dir(path)
            else:
                self.filesystem.rm(path, recursive=True)

    def entries(self, path: str) -> set[str]:
        if self.client == "pyarrow":
            infos = self.filesystem.get_file_info(
                pyarrow.fs.FileSelector(path, allow_not_found=True)
            )
            return {info.base_name for info in infos}
        self.filesystem.invalidate_cache(path)
        try:
            names = self.filesystem.ls(path, detail=False)
        except FileNotFoundError:
            return set()
        return {name.rstrip("/").rsplit("/", 1)[-1] for name in names}

    # ------------------------------------------------------------------ plain I/O

    def write_plain(self, path: str, names: Sequence[str], payloads: Sequence[Payload]) -> None:
        """One PUT per leaf holding its payload's bytes, one after the other."""
        for name, payload in zip(names, payloads, strict=True):
            self.put(f"{path}/{name}/{PLAIN_FILE}", payload)

    def write_plain_concurrent(
        self, path: str, names: Sequence[str], payloads: Sequence[Payload]
    ) -> None:
        """The same PUTs, ``threads`` in flight."""
        keys = [f"{path}/{name}/{PLAIN_FILE}" for name in names]
        list(self.pool.map(self.put, keys, payloads))

    def read_plain(self, path: str, names: Sequence[str], templates: Sequence[Payload]) -> Any:
        """One GET per leaf (the size known), one after the other."""
        return [self._read_leaf(path, name, t) for name, t in zip(names, templates, strict=True)]

    def read_plain_concurrent(
        self, path: str, names: Sequence[str], templates: Sequence[Payload]
    ) -> Any:
        """The same GETs, ``threads`` in flight."""
        return list(self.pool.map(lambda n, t: self._read_leaf(path, n, t), names, templates))

    def read_tree(self, path: str) -> dict[str, bytes]:
        """Every object under ``path`` (a checkpoint), by key relative to it (untimed)."""
        if self.client == "pyarrow":
            selector = pyarrow.fs.FileSelector(path, recursive=True)
            infos = self.filesystem.get_file_info(selector)
            sizes = {i.path: i.size for i in infos if i.type == pyarrow.fs.FileType.File}
        else:
            self.filesystem.invalidate_cache(path)
            found = self.filesystem.find(path, detail=True)
            sizes = {key: info["size"] for key, info in found.items() if info["type"] == "file"}
        keys = sorted(sizes)
        datas = self.pool.map(lambda key: self.get(key, sizes[key]), keys)
        return {key[len(path) + 1 :]: data for key, data in zip(keys, datas, strict=True)}

    def write_objects(self, path: str, objects: dict[str, bytes]) -> None:
        """``objects`` under ``path``, ``threads`` PUTs in flight."""
        keys = [f"{path}/{name}" for name in objects]
        list(self.pool.map(self.put, keys, objects.values()))

    def read_objects(self, path: str, objects: dict[str, bytes]) -> dict[str, bytes]:
        """The objects of ``write_objects`` read back (their sizes known), ``threads``
        GETs in flight."""
        datas = self.pool.map(
            lambda name, data: self.get(f"{path}/{name}", len(data)),
            objects,
            objects.values(),
        )
        return dict(zip(objects, datas, strict=True))

    def _read_leaf(self, path: str, name: str, template: Payload) -> Payload:
        data = self.get(f"{path}/{name}/{PLAIN_FILE}", memoryview(template).nbytes)
        if isinstance(template, np.ndarray):
            return np.frombuffer(data, template.dtype).reshape(template.shape)
        return data

    # ------------------------------------------------------------------ the server

    def request_costs(self, big_bytes: int) -> str:
        """What a request costs, measured untimed before the run (moto's time plus the
        added round trips): the median of small PUTs and GETs, and of one 8 MiB ranged
        GET from objects of two sizes."""
        base, small = f"{self.prefix}/probe", b"x" * 1024
        put, get = [], []
        for i in range(20):
            start = time.perf_counter()
            self.put(f"{base}/small{i}", small)
            put.append(time.perf_counter() - start)
            start = time.perf_counter()
            self.get(f"{base}/small{i}", len(small))
            get.append(time.perf_counter() - start)
        ranged = {}
        for size in dict.fromkeys([PROBE_RANGE, max(PROBE_RANGE, big_bytes)]):
            self.put(f"{base}/object", os.urandom(size))
            times = []
            for _ in range(3):
                start = time.perf_counter()
                self.get(f"{base}/object", PROBE_RANGE)
                times.append(time.perf_counter() - start)
            ranged[size] = statistics.median(times)
        self.delete(base)
        ranges = ", ".join(
            f"{format_seconds(t)} (object of {format_bytes(size)})" for size, t in ranged.items()
        )
        return (
            f"1 KiB PUT {format_seconds(statistics.median(put))}, 1 KiB GET "
            f"{format_seconds(statistics.median(get))}; one {format_bytes(PROBE_RANGE)} "
            f"ranged GET: {ranges}"
        )

    def server_peak_rss(self) -> int | None:
        """The moto server's peak resident memory so far (``VmHWM``), in bytes."""
        return proc_status(f"/proc/{self.server.process.pid}/status").get("VmHWM")

    def reset_counts(self) -> None:
        self.server.reset_counts()

    def counts(self) -> dict[str, int]:
        """Requests the server received since ``reset_counts()``, by kind."""
        return dict(self.server.counts())

    def close(self) -> None:
        self.pool.shutdown()


Place = LocalPlace | S3Place


def load_test_module(name: str) -> ModuleType:
    """``tests/<name>.py``, imported by file (``tests/`` is not put on ``sys.path``)."""
    path = REPO / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_s3_server_module() -> ModuleType:
    """``tests/s3_server.py`` (and the ``latency_proxy`` module it imports)."""
    load_test_module("latency_proxy")
    return load_test_module("s3_server")


@contextlib.contextmanager
def s3_server() -> Iterator[Any]:
    """A moto server (a child process, ``tests/s3_server.py``) with the bucket ``BUCKET``."""
    s3 = load_s3_server_module()
    os.environ.update(s3.offline_aws_environment())  # no client looks for real credentials
    server = s3.start_server()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def s3_view(server: Any, rtt_ms: float) -> Iterator[Any]:
    """``server`` itself (``rtt_ms`` 0), or a view of it through a latency proxy."""
    if not rtt_ms:
        yield server
        return
    view = server.with_latency(rtt_ms)
    try:
        yield view
    finally:
        view.stop()


# --------------------------------------------------------------------------- subjects


class Subjects:
    """The workload's trees and the timed call of every variant, in one format and place."""

    def __init__(self, payloads: Sequence[Payload], fmt: str, place: Place) -> None:
        self.payloads = list(payloads)
        self.names = [leaf_name(i, len(payloads)) for i in range(len(payloads))]
        self.msgpack = fmt == "msgpack"
        self.place = place
        self.ck_root = build_root(_trees.CkRoot, payloads, step=ROOT_STEP)
        self.rl_root = build_root(_trees.RlRoot, payloads, step=ROOT_STEP)
        #: S3: the objects of a ckptable checkpoint of the tree (``plain-objects``).
        self.objects: dict[str, bytes] = {}

    def save(self, variant: Variant, path: str) -> Callable[[], Any]:
        fs, msgpack, place = self.place.filesystem, self.msgpack, self.place
        names, payloads = self.names, self.payloads
        if variant.kind == "ckptable":
            root, durable = self.ck_root, variant.durable
            return lambda: root.save_to_path(
                path, filesystem=fs, use_msgpack=msgpack, durable=durable
            )
        if variant.kind == "rllib":
            rl_root, rl_fs = self.rl_root, place.rllib_filesystem
            return lambda: rl_root.save_to_path(path, filesystem=rl_fs, use_msgpack=msgpack)
        if variant.kind == "plain":
            return lambda: place.write_plain(path, names, payloads)
        if variant.kind == "plain-conc" and isinstance(place, S3Place):
            return lambda: place.write_plain_concurrent(path, names, payloads)
        if variant.kind == "plain-objects" and isinstance(place, S3Place):
            objects = self.objects
            return lambda: place.write_objects(path, objects)
        if variant.kind == "plain-fsync":
            return lambda: plain_write_fsync(path, names, payloads)
        raise ValueError(variant.kind)

    def restore(self, variant: Variant, path: str) -> Callable[[], tuple[int | None, list[Any]]]:
        """The timed call; it returns ``(root step, leaf payloads)`` (step None: plain)."""
        fs, place, names, payloads = self.place.filesystem, self.place, self.names, self.payloads
        if variant.kind == "plain":
            return lambda: (None, place.read_plain(path, names, payloads))
        if variant.kind == "plain-conc" and isinstance(place, S3Place):
            return lambda: (None, place.read_plain_concurrent(path, names, payloads))
        if variant.kind == "plain-objects" and isinstance(place, S3Place):
            objects = self.objects
            return lambda: (None, [place.read_objects(path, objects)])
        if variant.kind == "ckptable":
            target = _trees.CkRoot(len(payloads))
            verify, mmap = variant.verify, variant.mmap

            def restore_ckptable() -> tuple[int | None, list[Any]]:
                target.restore_from_path(path, filesystem=fs, verify=verify, mmap=mmap)
                return target.step, [leaf.payload for leaf in target.leaves.values()]

            return restore_ckptable
        if variant.kind == "rllib":
            rl_target, rl_fs = _trees.RlRoot(len(payloads)), place.rllib_filesystem

            def restore_rllib() -> tuple[int | None, list[Any]]:
                rl_target.restore_from_path(path, filesystem=rl_fs)
                return rl_target.step, [leaf.payload for leaf in rl_target.leaves.values()]

            return restore_rllib
        raise ValueError(variant.kind)

    def check_saved(self, variant: Variant, path: str) -> None:
        """Every leaf has its directory (its prefix, on S3) in the saved tree."""
        missing = set(self.names) - self.place.entries(path)
        if missing:
            raise BenchmarkError(f"{variant.name}: {path} lacks {len(missing)} leaves")

    def check_restored(self, variant: Variant, step: int | None, got: list[Any]) -> None:
        """A restore returned the saved data (``plain-objects``: the objects)."""
        if variant.kind != "plain-objects":
            check_restored(variant.name, "restore", step, got, self.payloads)
        elif got != [self.objects]:
            raise BenchmarkError(f"{variant.name}: the objects read differ from those written")


# --------------------------------------------------------------------------- memory


def release_memory() -> None:
    """Hand freed memory back to the OS (glibc's heap, Arrow's pool, ckptable's idle
    payload memory), so that what the next operation reuses shows in its peak rather
    than hiding in the baseline."""
    pyarrow.default_memory_pool().release_unused()
    release_freed_memory()


# --------------------------------------------------------------------------- timing


class Untimed:
    """What runs before each timed call, untimed: pending deletions, ``gc.collect()``,
    ``os.sync()``, the memory pre-warm, and handing freed memory back."""

    def __init__(self, *, sync: bool, prewarm_bytes: int) -> None:
        self.sync = sync
        self.prewarm_bytes = prewarm_bytes
        self.pending: list[Callable[[], None]] = []
        #: Called last, right before the timing starts (resetting the request counts).
        self.last: Callable[[], None] | None = None

    def later(self, action: Callable[[], None]) -> None:
        self.pending.append(action)

    def prepare(self) -> None:
        while self.pending:
            self.pending.pop()()
        gc.collect()
        if self.sync:
            os.sync()  # start with no dirty pages from earlier ops (and the deletions)
        if self.prewarm_bytes:
            prewarm(self.prewarm_bytes)
        release_memory()
        if self.last is not None:
            self.last()


def measure(
    fn: Callable[[], Any], untimed: Untimed, peak: PeakRss
) -> tuple[float, int | None, Any]:
    """Prepare (untimed), then run ``fn`` once: wall time, peak extra memory, result."""
    untimed.prepare()
    start_rss = peak.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, peak.extra(start_rss), result


@dataclasses.dataclass
class Group:
    """The measurements of one (workload, format, storage)."""

    workload: Workload
    fmt: str
    storage: str
    repeats: int
    nbytes: int
    variants: list[Variant]
    times: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=dict)
    memory: dict[tuple[str, str], list[int]] = dataclasses.field(default_factory=dict)
    #: Variant key → why it is not supported here (its exception, from the warm-up).
    unsupported: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    #: S3: variant key → the requests of one call (the last repeat's), by kind.
    counts: dict[tuple[str, str], dict[str, int]] = dataclasses.field(default_factory=dict)

    #: S3: the client and round-trip time (``pyarrow, 20 ms RTT``).
    setting: str = ""
    #: With added latency: the ``SLOW_KINDS`` run in the first this many repeats only,
    #: without a warm-up round (``--s3-slow-repeats``); None: in every round.
    slow_repeats: int | None = None

    @property
    def title(self) -> str:
        return f"{self.workload.name} {self.fmt} {self.storage}" + (
            f" ({self.setting})" if self.setting else ""
        )

    def supported(self, op: str) -> list[Variant]:
        return [v for v in self.variants if v.op == op and v.key not in self.unsupported]

    def has(self, op: str, label: str) -> bool:
        return bool(self.times.get((op, label)))

    def median(self, op: str, label: str) -> float:
        return statistics.median(self.times[op, label])

    def ratio(self, ratio: Ratio) -> tuple[float, float] | None:
        """(ratio of medians, median of per-repeat ratios); None if not measured."""
        if not (self.has(ratio.op, ratio.numerator) and self.has(ratio.op, ratio.denominator)):
            return None
        num, den = self.times[ratio.op, ratio.numerator], self.times[ratio.op, ratio.denominator]
        # Variants timed in fewer repeats (``slow_repeats``) ran in the first ones.
        n = min(len(num), len(den))
        paired = statistics.median(a / b for a, b in zip(num[:n], den[:n], strict=True))
        return statistics.median(num) / statistics.median(den), paired

    def runs_in(self, variant: Variant, r: int) -> bool:
        """Whether ``variant`` runs in round ``r`` (0: the warm-up round)."""
        if self.slow_repeats is None or variant.kind not in SLOW_KINDS:
            return True
        return 1 <= r <= self.slow_repeats

    def last_round(self, variant: Variant) -> int:
        if self.slow_repeats is None or variant.kind not in SLOW_KINDS:
            return self.repeats
        return min(self.slow_repeats, self.repeats)


def run_group(group: Group, place: Place, untimed: Untimed, peak: PeakRss) -> None:
    """One untimed warm-up round (which also finds what is not supported), then
    ``group.repeats`` timed rounds: every save, then every restore, in rotated order.
    Variants limited by ``group.slow_repeats`` skip the warm-up and the later rounds.
    On S3, each variant's requests are counted in the last round it runs in."""
    subjects = Subjects(group.workload.payloads, group.fmt, place)
    saves = [v for v in group.variants if v.op == "save"]
    tried: set[tuple[str, str]] = set()
    for r in range(group.repeats + 1):
        warm_up = r == 0
        round_path = place.new_round(f"{group.workload.name}-{group.fmt}-r{r}")
        paths = {v.label: place.join(round_path, v.label) for v in saves}
        times: dict[str, float] = {}

        def counter(variant: Variant, r: int = r) -> S3Place | None:
            last = isinstance(place, S3Place) and r == group.last_round(variant)
            return place if last and isinstance(place, S3Place) else None

        order = rotated([v for v in saves if group.runs_in(v, r)], r - 1)
        if warm_up:  # plain-objects writes the objects of ckptable's first save
            order.sort(key=lambda v: v.kind == "plain-objects")
        for variant in order:
            with counting(counter(variant), untimed, group, variant):
                seconds, extra, _ = measure(
                    subjects.save(variant, paths[variant.label]), untimed, peak
                )
            subjects.check_saved(variant, paths[variant.label])
            if variant.label == "ck" and warm_up and isinstance(place, S3Place):
                subjects.objects = place.read_tree(paths[variant.label])
            times[f"save:{variant.label}"] = seconds
            if not warm_up:
                record(group, variant, seconds, extra)
        restores = [v for v in group.supported("restore") if group.runs_in(v, r)]
        for variant in rotated(restores, r - 1):
            run = subjects.restore(variant, paths[variant.source])
            first = variant.key not in tried
            tried.add(variant.key)
            try:
                with counting(counter(variant), untimed, group, variant):
                    seconds, extra, (step, got) = measure(run, untimed, peak)
            except Exception as exc:
                if not (first and may_be_unsupported(variant, group.fmt, group.storage)):
                    raise
                group.unsupported[variant.key] = f"{type(exc).__name__}: {first_line(exc)}"
                continue
            subjects.check_restored(variant, step, got)
            del run, step, got
            times[f"restore:{variant.label}"] = seconds
            if not warm_up:
                record(group, variant, seconds, extra)
        if place.name != "local" or group.workload.cleanup != "end":
            untimed.later(lambda path=round_path: place.delete(path))
        # else: kept until the run directory is removed, at the end of the run
        shown = " ".join(f"{key}={format_seconds(t)}" for key, t in times.items())
        progress = "warm-up" if warm_up else f"{r}/{group.repeats}"
        print(f"[{group.title} {progress}] {shown}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def counting(
    place: S3Place | None, untimed: Untimed, group: Group, variant: Variant
) -> Iterator[None]:
    """With a place: the server's request counts are reset last before the timed call
    (after the untimed deletions) and read after it, into ``group.counts``."""
    if place is None:
        yield
        return
    untimed.last = place.reset_counts
    try:
        yield
    finally:
        untimed.last = None
    group.counts[variant.key] = place.counts()


def record(group: Group, variant: Variant, seconds: float, extra: int | None) -> None:
    group.times.setdefault(variant.key, []).append(seconds)
    if extra is not None:
        group.memory.setdefault(variant.key, []).append(extra)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


# --------------------------------------------------------------------------- reporting


def verdicts(groups: Sequence[Group]) -> list[tuple[str, str]]:
    """The issue's targets: (line, PASS/FAIL/NOT RUN) for the big cloudpickle local group.

    A target passes only if both the ratio of medians and the paired ratio meet it.
    """
    group = next((g for g in groups if (g.workload.name, g.fmt, g.storage) == TARGET_GROUP), None)
    out = []
    for ratio in RATIOS:
        if ratio.target is None:
            continue
        sign, bound = ratio.target
        name = f"{ratio.op}: {ratio.text} {sign} {format_ratio(bound)}"
        if group is None:
            out.append((f"{name}: not measured (run --workloads big --formats cloudpickle)", "-"))
            continue
        out.append(judge(name, group, ratio, sign, bound))
    return out


def s3_verdicts(run: Run) -> list[tuple[str, str]]:
    """The S3 targets (``S3_TARGETS``) that apply to a run's groups: (line, verdict)."""
    out = []
    for group in run.groups:
        for target in S3_TARGETS:
            if not target.applies(group.workload.name, run.rtt_ms):
                continue
            ratio = target.ratio
            name = (
                f"{group.workload.name} {group.fmt}: {ratio.op}: {ratio.text} "
                f"{target.sign} {format_ratio(target.bound)}"
            )
            out.append(judge(name, group, ratio, target.sign, target.bound))
    return out


def judge(name: str, group: Group, ratio: Ratio, sign: str, bound: float) -> tuple[str, str]:
    """``(line with the figures, PASS/FAIL)``; ``-`` where a side was not measured."""
    values = group.ratio(ratio)
    if values is None:
        missing = [
            VARIANTS[ratio.op, label].name
            for label in (ratio.numerator, ratio.denominator)
            if not group.has(ratio.op, label)
        ]
        why = [
            group.unsupported[ratio.op, label]
            for label in (ratio.numerator, ratio.denominator)
            if (ratio.op, label) in group.unsupported
        ]
        detail = f" ({why[0]})" if why else ""
        return f"{name}: not measured: {', '.join(missing)} did not run{detail}", "-"
    of_medians, paired = values
    worst = max(values) if sign == "<=" else min(values)
    ok = worst <= bound if sign == "<=" else worst >= bound
    medians = (
        f"{format_seconds(group.median(ratio.op, ratio.numerator))} vs "
        f"{format_seconds(group.median(ratio.op, ratio.denominator))}"
    )
    line = (
        f"{name}: {format_ratio(of_medians)} of medians ({medians}), {format_ratio(paired)} paired"
    )
    return line, "PASS" if ok else "FAIL"


def run_verdicts(run: Run) -> list[tuple[str, str]]:
    return verdicts(run.groups) if run.storage == "local" else s3_verdicts(run)


TIME_HEADERS = [
    "Workload",
    "Format",
    "Operation",
    "Implementation",
    "median",
    "min",
    "max",
    "GB/s",
    "peak extra memory",
    "x data",
    "n",
]
RATIO_HEADERS = ["Workload", "Format", "Operation", "Ratio", "of medians", "paired", "target"]


def time_rows(groups: Sequence[Group]) -> list[list[str]]:
    rows = []
    for group in groups:
        for variant in group.variants:
            cells = [group.workload.name, group.fmt, variant.op, variant.name]
            if variant.key in group.unsupported:
                rows.append([*cells, "not supported", "", "", "", "", "", "0"])
                continue
            values = group.times[variant.key]
            median = statistics.median(values)
            memory = group.memory.get(variant.key)
            peak = statistics.median(memory) if memory else None
            big = group.workload.name == "big"
            rows.append(
                [
                    *cells,
                    format_seconds(median),
                    format_seconds(min(values)),
                    format_seconds(max(values)),
                    f"{group.nbytes / median / 1e9:.2f}" if big else "-",
                    format_bytes(int(peak)) if peak is not None else "n/a",
                    f"{peak / group.nbytes:.2f}" if big and peak is not None else "-",
                    str(len(values)),
                ]
            )
    return rows


def ratio_rows(run: Run) -> list[list[str]]:
    rows = []
    for group in run.groups:
        for ratio in RATIOS:
            if group.storage not in ratio.storages:
                continue
            values = group.ratio(ratio)
            rows.append(
                [
                    group.workload.name,
                    group.fmt,
                    ratio.op,
                    ratio.text,
                    format_ratio(values[0]) if values else "n/s",
                    format_ratio(values[1]) if values else "n/s",
                    target_text(run, group, ratio),
                ]
            )
    return rows


def target_text(run: Run, group: Group, ratio: Ratio) -> str:
    """The bound a target sets on ``ratio`` in ``group`` (``<= 1.10x``), or ``""``."""
    if run.storage == "local":
        is_target = (group.workload.name, group.fmt, group.storage) == TARGET_GROUP
        return (
            f"{ratio.target[0]} {format_ratio(ratio.target[1])}"
            if ratio.target and is_target
            else ""
        )
    for target in S3_TARGETS:
        same = (target.ratio.op, target.ratio.numerator, target.ratio.denominator) == (
            ratio.op,
            ratio.numerator,
            ratio.denominator,
        )
        if same and target.applies(group.workload.name, run.rtt_ms):
            return f"{target.sign} {format_ratio(target.bound)}"
    return ""


COUNT_HEADERS = ["Workload", "Format", "Operation", "Implementation", *REQUEST_KINDS, "total"]


def count_rows(groups: Sequence[Group]) -> list[list[str]]:
    """The requests of one call of every implementation (S3), by kind."""
    rows = []
    for group in groups:
        for variant in group.variants:
            counts = group.counts.get(variant.key)
            if counts is None:
                continue
            cells = [str(counts.get(kind, 0)) for kind in REQUEST_KINDS]
            total = sum(counts.get(kind, 0) for kind in REQUEST_KINDS)
            rows.append(
                [group.workload.name, group.fmt, variant.op, variant.name, *cells, str(total)]
            )
    return rows


def format_rows(groups: Sequence[Group]) -> list[list[str]]:
    """msgpack against cloudpickle, per implementation: time and peak-memory ratios."""
    by_key = {(g.workload.name, g.fmt, g.storage): g for g in groups}
    rows = []
    for group in groups:
        if group.fmt != "msgpack":
            continue
        pickled = by_key.get((group.workload.name, "cloudpickle", group.storage))
        if pickled is None:
            continue
        for variant in group.variants:
            if not (group.has(*variant.key) and pickled.has(*variant.key)):
                continue
            if variant.kind.startswith("plain"):
                continue  # the same bytes in both formats
            memory, pickled_memory = group.memory.get(variant.key), pickled.memory.get(variant.key)
            rows.append(
                [
                    group.workload.name,
                    variant.op,
                    variant.name,
                    format_seconds(pickled.median(*variant.key)),
                    format_seconds(group.median(*variant.key)),
                    format_ratio(group.median(*variant.key) / pickled.median(*variant.key)),
                    format_bytes(int(statistics.median(pickled_memory))) if pickled_memory else "",
                    format_bytes(int(statistics.median(memory))) if memory else "",
                ]
            )
    return rows


FORMAT_HEADERS = [
    "Workload",
    "Operation",
    "Implementation",
    "cloudpickle",
    "msgpack",
    "msgpack / cloudpickle",
    "peak, cloudpickle",
    "peak, msgpack",
]


@dataclasses.dataclass
class Run:
    """One storage's results and what the report says about them."""

    storage: str
    command: str
    groups: list[Group]
    facts: list[tuple[str, str]]
    sync: bool
    prewarm_mib: int | None
    server_peak: int | None = None
    #: S3: what the server charges per request (``S3Place.request_costs``).
    server_costs: str | None = None
    #: S3: the ``--s3-*`` options that made a workload smaller than the local one.
    smaller_than_local: list[str] = dataclasses.field(default_factory=list)
    #: ``local disk``, or ``S3-compatible server (pyarrow, 20 ms RTT)``.
    title: str = ""
    #: S3: the client library (``pyarrow``, ``s3fs``) and the round-trip time added.
    client: str = ""
    rtt_ms: float = 0.0
    threads: int = 0
    slow_repeats: int = 0

    def __post_init__(self) -> None:
        self.title = self.title or STORAGE_TITLES[self.storage]


def print_run(run: Run) -> None:
    print(f"\n== {run.title}: medians (ratios: time / time)")
    print(text_table(TIME_HEADERS, time_rows(run.groups), left=4))
    print()
    print(text_table(RATIO_HEADERS, ratio_rows(run), left=4))
    rows = format_rows(run.groups)
    if rows:
        print()
        print(text_table(FORMAT_HEADERS, rows, left=3))
    rows = count_rows(run.groups)
    if rows:
        print(f"\nRequests of one call, by kind ({run.title}):")
        print(text_table(COUNT_HEADERS, rows, left=4))
    for group in run.groups:
        for key, why in group.unsupported.items():
            print(f"not supported: {group.title} {VARIANTS[key].op} {VARIANTS[key].name}: {why}")
    if run.server_peak is not None:
        print(f"moto server peak RSS: {format_bytes(run.server_peak)}")
    if run.server_costs is not None:
        print(f"moto request costs: {run.server_costs}")
    lines = run_verdicts(run)
    if lines:
        print()
        for line, verdict in lines:
            print(f"TARGET {verdict}: {line}")


METHOD_TEXT = """\
- Each repeat runs every save, then every restore (each reading the checkpoint that its
  save made in the same repeat), all implementations back to back in an order rotated
  from repeat to repeat, after an untimed warm-up round. Before each timed call,
  untimed: checkpoints no longer needed are deleted, `gc.collect()`{sync}{prewarm},
  freed memory is handed back to the OS (`malloc_trim(0)`, Arrow's
  `release_unused()`, the idle payload memory ckptable keeps between restores) and the
  peak-memory mark is reset. Every restored tree (and every plain read-back) is
  compared with the original data, outside the timing.
- **Ratios** divide times (lower: the first is faster). *of medians*: the ratio of the
  two medians; *paired*: the median of the per-repeat ratios (both ran in the same
  repeat), which cancels slow phases of a shared machine. A target passes only if both
  meet it.
- **Peak extra memory**: the process's resident-set high-water mark (`VmHWM`, reset by
  writing `5` to `/proc/self/clear_refs` right before the call) minus its resident set
  at that moment; median over repeats. It counts every allocation of every thread
  (numpy, Python, Arrow's and the AWS SDK's allocators) and the pages of mapped files
  that are touched, not the page cache, with no tracing overhead; tracemalloc was not
  used: it slows pure-Python code and does not see Arrow's allocator. A restore's peak
  includes the restored data it returns (for *big*, 1.00x data is a restore that makes
  no extra copy); a save's is only what it allocates on top of the tree it saves.
  **x data** is that peak over the workload's array bytes.
- ckptable runs with its defaults (`durable=True`: every file and directory flushed
  before publishing; `verify=True`: every file checked against the manifest's
  checksums) unless the name says otherwise. `mmap=True` maps big arrays of pickle
  files from the local disk instead of reading them (verifying all but the arrays'
  bytes); msgpack files are never mapped (it then reads them as usual), and other
  storages are refused."""

LOCAL_TEXT = """\
- **plain write**: `mkdir` per leaf and open/write/close of one file holding the leaf's
  bytes; **plain write+fsync**: the same, each file fsynced before close, then the leaf
  directories, the checkpoint directory and its parent; **plain read**: `read()` of each
  file (arrays wrap the bytes read with `np.frombuffer`). RLlib never fsyncs.
- Checkpoints go to fresh directories under the benchmark directory; restores read files
  just written, from the page cache. {cleanup}"""

S3_TEXT = """\
- The server is moto's application on 127.0.0.1 in a child process (`tests/s3_server.py`:
  werkzeug, a thread per connection, connections kept alive between requests as S3
  does), one bucket, plain HTTP. {latency} Client: {client}. {filesystems} ckptable
  writes in place on object stores (no directory rename), the root manifest last;
  `durable=True` has nothing to flush there (a closed stream is a committed PUT).
- **plain write, sequential**: one PUT per leaf holding its bytes ({put}; multipart
  above the client's part size), one after the other; **plain read, sequential**: one
  GET per leaf, the size known ({get}). **concurrent**: the same requests from a pool of
  {threads} threads, {threads} in flight.{slow} **plain write / read of ckptable's
  objects, concurrent**: the objects of ckptable's checkpoint of the same tree (read
  once, untimed, after its save in the warm-up round), written and read back with the
  same calls, {threads} in flight: the floor of ckptable's own layout (more objects than
  leaves).
- **Requests of one call**: the server counts the requests it receives by kind (PUT:
  objects and parts written, multipart creates and completes included; GET: object
  reads, ranged or not; HEAD; LIST: bucket listings; DELETE: single and bulk deletes;
  OTHER: the rest); the counts are reset right before one call of each implementation
  in the last repeat it runs in (after the untimed deletions) and read right after it.
- Each repeat's objects are deleted (untimed) after its restores, so the server's memory
  does not grow. Times include moto itself (Python, one process, serving from memory
  and spooled temporary files): every request costs milliseconds of its CPU, requests
  in flight at once share its interpreter, and a ranged GET copies the whole object on
  the server (see the costs measured above), so readers that fetch a big object in many
  ranged GETs pay for it many times over. These figures show request counts, round trips
  and copies, not S3's speed."""

LATENCY_TEXT = """\
A latency proxy (`tests/latency_proxy.py`, a child process) stands between the
clients and the server: every chunk of bytes is forwarded {delay} after it arrived, in
each direction ({rtt} per round trip, no bandwidth limit: chunks are timestamped on
arrival and forwarded in order, so streams and concurrent requests overlap as on a
network), and a new connection's first bytes wait one round trip more (its TCP
handshake; TLS is not modelled)."""

CLIENT_TEXT = {
    "pyarrow": '`pyarrow.fs.S3FileSystem(endpoint_override=..., scheme="http")`',
    "s3fs": '`s3fs.S3FileSystem(client_kwargs={{"endpoint_url": ...}}, config_kwargs='
    '{{"max_pool_connections": {pool}}})`',
    "obstore": '`obstore.fsspec.FsspecStore("s3", endpoint=..., client_options='
    '{{"allow_http": True}})` for ckptable and RLlib, `obstore.store.S3Store` per bucket '
    "for the plain baselines",
}
FILESYSTEMS_TEXT = {
    "pyarrow": "ckptable and RLlib get the same filesystem as `filesystem=`.",
    "s3fs": "ckptable gets it as `filesystem=`; RLlib, which takes pyarrow filesystems only, "
    "gets it wrapped in `pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(...))`.",
    "obstore": "ckptable gets obstore's fsspec adapter as `filesystem=` (its generic fsspec "
    "path: `pipe_file` and `cat_file`). RLlib gets pyarrow's `S3FileSystem`: it writes "
    "through pyarrow's file API, whose buffers obstore's fsspec writer refuses "
    "(`BufferError: buffer contents are not compatible with u8`).",
}
PLAIN_CALLS = {
    "pyarrow": (
        "`open_output_stream` + `write` on an `S3FileSystem(allow_delayed_open=True)`, which "
        "makes a small object one `PutObject` (as ckptable writes them) instead of a multipart "
        "upload's three requests",
        "`open_input_stream(...).read(size)`",
    ),
    "s3fs": ("`pipe_file` (arrays copied to bytes, which botocore needs)", "`cat_file(end=size)`"),
    "obstore": (
        "`obstore.put` of the array's memory",
        "`obstore.get_range(end=size)` (obstore's `Bytes`, not copied)",
    ),
}


def s3_text(run: Run) -> str:
    put, get = PLAIN_CALLS[run.client]
    latency = (
        LATENCY_TEXT.format(
            delay=format_seconds(run.rtt_ms / 2000), rtt=format_seconds(run.rtt_ms / 1000)
        )
        if run.rtt_ms
        else "The clients connect to the server directly (no added latency)."
    )
    slow = ""
    if run.rtt_ms and run.slow_repeats:
        s = "" if run.slow_repeats == 1 else "s"
        slow = (
            f" RLlib and the sequential baseline, which send a request per file one after the "
            f"other, run in the first {run.slow_repeats} timed repeat{s} only, with no "
            "warm-up round (`--s3-slow-repeats`): at this latency a call of theirs takes "
            "seconds to minutes; their paired ratios pair those repeats."
        )
    return S3_TEXT.format(
        slow=slow,
        latency=latency,
        client=CLIENT_TEXT[run.client].format(pool=max(run.threads, 10)),
        filesystems=FILESYSTEMS_TEXT[run.client],
        put=put,
        get=get,
        threads=run.threads,
    )


def wrap_bullets(text: str) -> str:
    """Re-wrap a Markdown bullet list (``- `` items, continued with two spaces) to 88
    columns, after the placeholders were filled in."""
    items = [" ".join(item.split()) for item in text.removeprefix("- ").split("\n- ")]
    return "\n".join(
        textwrap.fill(item, width=88, initial_indent="- ", subsequent_indent="  ") for item in items
    )


def cleanup_text(groups: Sequence[Group]) -> str:
    kept = sorted({g.workload.name for g in groups if g.workload.cleanup == "end"})
    if not kept:
        return "Each repeat's checkpoints are deleted (untimed) once its restores are done."
    return (
        f"The {', '.join(kept)} workload's checkpoints are kept until the run ends (on ext4, "
        "creating files right after deleting thousands is slow: see `benchmarks/README.md`); "
        "the others' are deleted (untimed) once their repeat's restores are done."
    )


def workload_lines(run: Run) -> str:
    seen: dict[str, Group] = {}
    for group in run.groups:
        seen.setdefault(group.workload.name, group)
    return "\n".join(
        f"- **{name}**: {g.workload.description}; {g.repeats} timed repeat"
        f"{'s' if g.repeats != 1 else ''} after an untimed warm-up round"
        for name, g in seen.items()
    )


def markdown_section(title: str, run: Run, plot: str | None) -> str:
    fact_table = markdown_table(["", ""], [[f"**{k}**", v] for k, v in run.facts], left=2)
    formats = ", ".join(dict.fromkeys(g.fmt for g in run.groups))
    sync = " and `os.sync()`" if run.sync else ""
    prewarm_text = (
        ", a memory pre-warm (twice the workload's bytes touched and freed, as in "
        "`bench_durability.py`)"
        if run.prewarm_mib is None
        else (f", a memory pre-warm ({run.prewarm_mib} MiB)" if run.prewarm_mib else "")
    )
    parts = [
        f"## {title}",
        textwrap.fill(
            "Generated by `benchmarks/bench_storage.py` (see `benchmarks/README.md`): "
            "ckptable, RLlib's `Checkpointable` and plain I/O of the same bytes, saving and "
            f"restoring the same tree ({formats}) on the {run.title}. "
            "Run from the repository root:",
            width=88,
        ),
        f"```sh\n{run.command}\n```",
        f"Workloads:\n\n{workload_lines(run)}",
        fact_table,
    ]
    lines = "\n".join(f"- **{v}**: {line}" for line, v in run_verdicts(run))
    if run.storage == "local":
        parts += [
            "### Targets",
            "The issue's targets, for the big workload in cloudpickle on the local disk (a\n"
            "target passes only if both the ratio of medians and the paired ratio meet it):"
            f"\n\n{lines}",
        ]
    elif lines:
        which = "with added latency" if run.rtt_ms else "without added latency"
        parts += [
            "### Targets",
            f"The issue's targets on an object store {which}, in each format (a target\n"
            "passes only if both the ratio of medians and the paired ratio meet it):"
            f"\n\n{lines}",
        ]
    parts += [
        "### Median times and peak memory",
        markdown_table(TIME_HEADERS, time_rows(run.groups), left=4),
        "### Ratios",
        markdown_table(RATIO_HEADERS, ratio_rows(run), left=4),
    ]
    rows = count_rows(run.groups)
    if rows:
        parts += [
            "### Requests",
            "The requests the server received during one call of each implementation (the\n"
            "last repeat's, counted outside the timing), by kind:",
            markdown_table(COUNT_HEADERS, rows, left=4),
        ]
    rows = format_rows(run.groups)
    if rows:
        parts += [
            "### msgpack against cloudpickle",
            "Median times and peak extra memory of the same implementation in both formats\n"
            "(msgpack has no target).",
            markdown_table(FORMAT_HEADERS, rows, left=3),
        ]
    unsupported = [
        f"- {g.workload.name}, {g.fmt}: {VARIANTS[key].op} by **{VARIANTS[key].name}**: `{why}`"
        for g in run.groups
        for key, why in g.unsupported.items()
    ]
    if unsupported:
        parts += ["### Not supported", "Raised in the warm-up round:\n\n" + "\n".join(unsupported)]
    if run.smaller_than_local:
        parts.append(
            textwrap.fill(
                "The S3 workloads are smaller than the local ones "
                f"({', '.join(run.smaller_than_local)}): every request to moto costs "
                "milliseconds and a ranged GET copies the whole object on the server, so "
                "readers that fetch a big object in many requests take minutes per repeat "
                "at the local sizes.",
                width=88,
            )
        )
    if run.server_costs is not None:
        text = (
            f"Request costs of the moto server, measured before the run: {run.server_costs}. "
            f"Its peak resident memory during the run: {format_bytes(run.server_peak or 0)}."
        )
        parts.append(textwrap.fill(text, width=88))
    if plot:
        parts.append(f"![Median times per implementation (log scale)]({plot})")
    storage_text = (
        LOCAL_TEXT.format(cleanup=cleanup_text(run.groups))
        if run.storage == "local"
        else s3_text(run)
    )
    method = METHOD_TEXT.format(sync=sync, prewarm=prewarm_text)
    parts += ["### Method", wrap_bullets(f"{method}\n{storage_text}")]
    return "\n\n".join(parts) + "\n"


def run_facts(bench_dir: str, place: Place, gauge: tuple[float, float]) -> list[tuple[str, str]]:
    facts = machine_facts(bench_dir)
    versions = ["msgpack", "msgpack-numpy", "xxhash"]
    if isinstance(place, S3Place):
        versions += ["moto", *(["s3fs", "aiobotocore"] if place.client == "s3fs" else [])]
        versions += ["obstore"] if place.client == "obstore" else []
    for package in versions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            facts.append((package, importlib.metadata.version(package)))
    if isinstance(place, S3Place):
        client = {
            "pyarrow": "pyarrow S3FileSystem",
            "s3fs": "s3fs S3FileSystem",
            "obstore": "obstore (fsspec adapter for ckptable and RLlib, S3Store for plain I/O)",
        }[place.client]
        latency = (
            f"through a latency proxy adding {place.rtt_ms:g} ms per round trip"
            if place.rtt_ms
            else "no added latency"
        )
        storage = f"moto S3 server on 127.0.0.1 (child process), {client}, {latency}"
        facts = [
            ("Storage", storage) if name == "Benchmark directory" else (name, value)
            for name, value in facts
        ]
    facts.append(
        (
            "CPU gauge",
            f"2M-iteration Python loop: {format_seconds(gauge[0])} before, "
            f"{format_seconds(gauge[1])} after (a noise indicator for shared machines)",
        )
    )
    return facts


# --------------------------------------------------------------------------- plot


def plot(runs: Sequence[Run], path: str) -> None:
    """Grouped bars: median time (log scale, min-max whiskers) per implementation, one
    panel per (storage, workload), one group of bars per (format, operation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = [
        (run.title, name, [g for g in run.groups if g.workload.name == name])
        for run in runs
        for name in dict.fromkeys(g.workload.name for g in run.groups)
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.4 * len(panels)), squeeze=False)
    shown: dict[str, Any] = {}
    for ax, (title, name, groups) in zip(axes[:, 0], panels, strict=True):
        ticks, labels = [], []
        x = 0.0
        for group in groups:
            for op in ("save", "restore"):
                variants = [v for v in group.variants if v.op == op]
                width = 0.8 / len(variants)
                for i, variant in enumerate(variants):
                    pos = x - 0.4 + (i + 0.5) * width
                    if variant.key in group.unsupported:
                        ax.text(pos, 0.02, "n/s", ha="center", transform=ax.get_xaxis_transform())
                        continue
                    values = group.times[variant.key]
                    median = statistics.median(values)
                    bar = ax.bar(
                        pos,
                        median,
                        width * 0.9,
                        color=COLORS[variant.label],
                        yerr=[[median - min(values)], [max(values) - median]],
                        capsize=2,
                        error_kw={"elinewidth": 0.8},
                    )
                    shown.setdefault(LEGEND[variant.label], bar)
                ticks.append(x)
                labels.append(f"{group.fmt}\n{op}")
                x += 1
        ax.set_xticks(ticks, labels)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: format_seconds(y)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"{title}: {name} ({groups[0].workload.description})")
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.legend(list(shown.values()), list(shown), loc="upper center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.4 * len(panels))))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time saves and restores by ckptable, RLlib's Checkpointable and plain "
        "I/O, in cloudpickle and msgpack, on the local disk and an S3-compatible server.",
    )
    parser.add_argument("--workloads", default="big,wide", help="comma-separated: big,wide")
    parser.add_argument("--formats", default="cloudpickle,msgpack", help="cloudpickle,msgpack")
    parser.add_argument("--storages", default="local", help="comma-separated: local,s3")
    parser.add_argument("--big-mib", type=int, default=1024, help="big: total MiB of float32")
    parser.add_argument("--s3-big-mib", type=int, default=None, help="big on S3 (default: same)")
    parser.add_argument("--big-leaves", type=int, default=4, help="big: number of leaves")
    parser.add_argument("--leaves", type=int, default=1000, help="wide: number of leaves")
    parser.add_argument(
        "--s3-leaves", type=int, default=None, help=f"wide on S3 (default: {DEFAULT_S3_LEAVES})"
    )
    parser.add_argument("--leaf-bytes", type=int, default=1024, help="wide: bytes per leaf")
    parser.add_argument(
        "--repeats", type=int, default=None, help="local repeats (default: 5 big, 7 wide)"
    )
    parser.add_argument(
        "--s3-repeats",
        type=int,
        default=None,
        help=f"S3 repeats (default: --repeats, else {DEFAULT_S3_REPEATS})",
    )
    parser.add_argument(
        "--s3-clients",
        default=",".join(S3_CLIENTS),
        help="S3 client libraries, one run each: pyarrow,s3fs,obstore (default: pyarrow,s3fs)",
    )
    parser.add_argument(
        "--s3-rtts",
        default=None,
        metavar="MS,...",
        help="round-trip times (ms) a latency proxy adds, one run each; 0: no proxy (default: 20)",
    )
    parser.add_argument(
        "--s3-rtt-ms", type=float, default=None, metavar="MS", help="the same as --s3-rtts MS"
    )
    parser.add_argument(
        "--s3-slow-repeats",
        type=int,
        default=DEFAULT_S3_SLOW_REPEATS,
        help="with added latency, RLlib and the sequential plain baseline (a request per "
        "file, one after the other) run in the first N timed repeats only, with no warm-up "
        f"round (default: {DEFAULT_S3_SLOW_REPEATS}; 0: in every round)",
    )
    parser.add_argument(
        "--s3-threads",
        type=int,
        default=DEFAULT_S3_THREADS,
        help=f"requests in flight of the plain concurrent baseline (default: "
        f"{DEFAULT_S3_THREADS}; also s3fs's connection pool)",
    )
    parser.add_argument("--dir", default=None, help="local checkpoints (default: system temp)")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument(
        "--section",
        default=None,
        metavar="TITLE",
        help="with --out: add (or replace) one '## TITLE: <storage>' section per run (S3: "
        "per client and RTT) in the existing --out page",
    )
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG/SVG chart")
    parser.add_argument(
        "--no-sync", action="store_true", help="do not os.sync() before each timed op"
    )
    parser.add_argument(
        "--prewarm-mib",
        type=int,
        default=None,
        help="MiB of memory touched and freed before each timed op (default: 2x the "
        "workload's bytes; 0: none)",
    )
    args = parser.parse_args(argv)
    for flag, choices in (
        ("workloads", WORKLOADS),
        ("formats", FORMATS),
        ("storages", STORAGES),
        ("s3_clients", S3_CLIENT_CHOICES),
    ):
        chosen = [item.strip() for item in getattr(args, flag).split(",") if item.strip()]
        unknown = sorted(set(chosen) - set(choices))
        if unknown or not chosen:
            parser.error(
                f"--{flag.replace('_', '-')}: choose from {', '.join(choices)} (got {unknown})"
            )
        setattr(args, flag, [c for c in choices if c in chosen])  # canonical order
    if args.s3_rtts is not None and args.s3_rtt_ms is not None:
        parser.error("give --s3-rtts or --s3-rtt-ms, not both")
    try:
        rtts = (
            [args.s3_rtt_ms]
            if args.s3_rtt_ms is not None
            else [float(v) for v in args.s3_rtts.split(",") if v.strip()]
            if args.s3_rtts is not None
            else list(DEFAULT_S3_RTTS)
        )
    except ValueError:
        parser.error(f"--s3-rtts: give milliseconds, comma-separated (got {args.s3_rtts!r})")
    if not rtts or any(rtt < 0 for rtt in rtts):
        parser.error("--s3-rtts: give one or more round-trip times >= 0")
    args.s3_rtts = list(dict.fromkeys(rtts))
    for flag in ("big_mib", "big_leaves", "leaves", "leaf_bytes", "s3_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be positive")
    for flag in ("s3_big_mib", "s3_leaves", "s3_repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.prewarm_mib is not None and args.prewarm_mib < 0:
        parser.error("--prewarm-mib must not be negative")
    if args.s3_slow_repeats < 0:
        parser.error("--s3-slow-repeats must not be negative")
    check_section_args(parser, args)
    return args


def make_workloads(args: argparse.Namespace, storage: str) -> list[tuple[Workload, int]]:
    """The workloads of one storage, each with its repeats (``--s3-*`` sizes on S3: moto
    costs milliseconds per request and copies a whole object for each ranged GET)."""
    out = []
    for name in args.workloads:
        local_repeats = args.repeats or DEFAULT_REPEATS[name]
        s3_repeats = args.s3_repeats or args.repeats or DEFAULT_S3_REPEATS
        repeats = s3_repeats if storage == "s3" else local_repeats
        if name == "wide":
            leaves = (args.s3_leaves or DEFAULT_S3_LEAVES) if storage == "s3" else args.leaves
            workload = make_wide(leaves, args.leaf_bytes, repeats)
            workload.cleanup = "end"
        else:
            mib = args.s3_big_mib if storage == "s3" and args.s3_big_mib else args.big_mib
            workload = make_big(mib, args.big_leaves, repeats)
            workload.cleanup = "repeat"
        out.append((workload, repeats))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench_dir = args.dir or tempfile.gettempdir()
    peak = PeakRss()
    if not peak.available:
        print("peak memory: /proc/self/clear_refs unavailable, not measured", file=sys.stderr)
    runs: list[Run] = []
    run_dir = tempfile.mkdtemp(prefix="ckptable-storage-", dir=bench_dir)
    try:
        for storage in args.storages:
            for run in run_storage(args, storage, run_dir, peak):
                runs.append(run)
                print_run(run)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    failed = [
        f"{run.title}: {line}"
        for run in runs
        for line, verdict in run_verdicts(run)
        if verdict == "FAIL"
    ]
    if len(runs) > 1:
        print(f"\n{len(failed)} target(s) failed over {len(runs)} runs" + (":" if failed else ""))
        for line in failed:
            print(f"  FAIL {line}")

    plot_ref = None
    if args.plot:
        plot(runs, args.plot)
        print(f"\nwrote {args.plot}")
        if args.out:
            plot_ref = os.path.relpath(args.plot, Path(args.out).resolve().parent)
    if args.out:
        write_report(args, runs, plot_ref)
    return 0


def run_storage(
    args: argparse.Namespace, storage: str, run_dir: str, peak: PeakRss
) -> Iterator[Run]:
    """The runs of one storage: the local disk, or on S3 (one moto server, in a child
    process) one run per round-trip time (``--s3-rtts``) and client (``--s3-clients``)."""
    if storage == "local":
        yield run_place(args, LocalPlace(run_dir), peak)
        return
    with s3_server() as server:
        for rtt_ms in args.s3_rtts:
            with s3_view(server, rtt_ms) as view:
                for client in args.s3_clients:
                    prefix = f"{BUCKET}/{uuid.uuid4().hex[:12]}"
                    place = S3Place(view, client, prefix, args.s3_threads)
                    try:
                        yield run_place(args, place, peak)
                    finally:
                        place.close()


def run_place(args: argparse.Namespace, place: Place, peak: PeakRss) -> Run:
    """Every workload and format in one place (the local disk, or S3 through one client
    at one round-trip time)."""
    storage = place.name
    gauge_before = statistics.median(cpu_check() for _ in range(3))
    groups: list[Group] = []
    server_costs = server_peak = None
    workloads = make_workloads(args, storage)
    setting = ""
    if isinstance(place, S3Place):
        setting = place.title.partition("(")[2].rstrip(")")
        print(f"{place.title}: measuring request costs", file=sys.stderr, flush=True)
        big = [w for w, _ in workloads if w.name == "big"]
        leaf = max((memoryview(p).nbytes for w in big for p in w.payloads), default=0)
        server_costs = place.request_costs(leaf)
    for workload, repeats in workloads:
        nbytes = sum(memoryview(p).nbytes for p in workload.payloads)
        prewarm_bytes = 2 * nbytes if args.prewarm_mib is None else args.prewarm_mib << 20
        untimed = Untimed(sync=not args.no_sync, prewarm_bytes=prewarm_bytes)
        variants = [v for v in (*SAVES, *RESTORES) if storage in v.storages]
        for fmt in args.formats:
            print(f"{place.title}: {workload.name} {fmt}: {workload.description}", file=sys.stderr)
            group = Group(workload, fmt, storage, repeats, nbytes, variants, setting=setting)
            if isinstance(place, S3Place) and place.rtt_ms and args.s3_slow_repeats:
                group.slow_repeats = args.s3_slow_repeats
            run_group(group, place, untimed, peak)
            untimed.prepare()  # the last round's deletions
            groups.append(group)
        workload.payloads = []  # free the arrays; the groups keep the figures
    if isinstance(place, S3Place):
        server_peak = place.server_peak_rss()
    gauge = (gauge_before, statistics.median(cpu_check() for _ in range(3)))
    facts = run_facts(args.dir or tempfile.gettempdir(), place, gauge)
    command = shlex.join([sys.executable, *sys.argv])
    run = Run(storage, command, groups, facts, not args.no_sync, args.prewarm_mib)
    run.title = place.title
    run.server_peak, run.server_costs = server_peak, server_costs
    if isinstance(place, S3Place):
        run.client, run.rtt_ms, run.threads = place.client, place.rtt_ms, place.threads
        run.slow_repeats = args.s3_slow_repeats
        leaves = args.s3_leaves or DEFAULT_S3_LEAVES
        for flag, value, local in (
            ("s3_big_mib", args.s3_big_mib, args.big_mib),
            ("s3_leaves", leaves, args.leaves),
        ):
            if value is not None and value < local:
                run.smaller_than_local.append(f"`--{flag.replace('_', '-')} {value}`")
    return run


def write_report(args: argparse.Namespace, runs: Sequence[Run], plot_ref: str | None) -> None:
    """One ``## <title>: <storage>`` section per run (storage, and on S3 client and
    round-trip time), added to the page or a new one."""
    out = Path(args.out)
    title = (args.section or DEFAULT_SECTION).strip()
    page = out.read_text() if args.section is not None else "# Benchmarks\n"
    for i, run in enumerate(runs):
        heading = f"{title}: {run.title}"
        section = markdown_section(heading, run, plot_ref if i == 0 else None)
        page = add_section(page, heading, section)
        print(f"wrote section {heading!r} of {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)


if __name__ == "__main__":
    sys.exit(main())
