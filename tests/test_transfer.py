"""The transfer hook of ckptable.ray: directory trees moved between the nodes of a real
multi-node Ray cluster (``tests/ray_cluster.py``), complete or not at all.

All nodes run on this machine, so a "remote" path is visible from the test process too:
the tests use that to check results, never the code under test. ``ProbedTransfer`` (a
``RayObjectStoreTransfer`` whose two task bodies report where they ran, their process
id and their memory, and can be slowed down or made to misbehave) is the only stand-in:
it injects faults at the edges, the reader's stream, the writer's input and the direct
connection between them. Tests of the stream run both ways the contents can travel:
over the direct connection (the default) and through the object store (``direct=False``,
also what happens where no connection can be made).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import random
import resource
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import ckptable
from ckptable._manifest import MANIFEST_FILE, checksum_of, preferred_algorithm
from ckptable.errors import ActorCheckpointError, TransferError
from ckptable.ray import _actors, _transfer_direct, _transfer_local
from ckptable.ray._nodes import current_node_id
from ckptable.ray._transfer import (
    TRANSFER_MARKER,
    LocalCopyTransfer,
    RayObjectStoreTransfer,
    RecordingTransfer,
    TransferCall,
    TransferHook,
    TransferReceipt,
    check_transfer_hook,
    get_default_transfer,
    set_default_transfer,
)
from ckptable.ray._transfer_direct import direct_allowed
from ckptable.ray._transfer_fetch import END_GRACE_S
from ray_actors import Algo, foreach
from ray_cluster import ObjectStoreSampler

# The probes below run inside Ray workers, which cannot import this module by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

KiB, MiB = 1 << 10, 1 << 20

#: Small chunks, so that the small trees of most tests still take many of them.
SMALL_CHUNK = 64 * KiB


# --------------------------------------------------------------------------- helpers


def make_tree(root: Path, chunk_bytes: int = SMALL_CHUNK) -> None:
    """A nested tree with what a checkpoint may hold, and what it rarely does."""
    rng = random.Random(7)
    (root / "empty_dir").mkdir(parents=True)
    (root / "a" / "b" / "c" / "d").mkdir(parents=True)
    (root / "a" / "empty.bin").write_bytes(b"")
    (root / "a" / "b" / "c" / "d" / "leaf.txt").write_text("deep\n")
    (root / "a" / "b" / "zeros.bin").write_bytes(bytes(3 * chunk_bytes))
    # Larger than a chunk, and not a multiple of it.
    (root / "big.bin").write_bytes(rng.randbytes(5 * chunk_bytes + 12_345))
    (root / "exactly_one_chunk.bin").write_bytes(rng.randbytes(chunk_bytes))
    many = root / "many"
    many.mkdir()
    for index in range(300):
        (many / f"f{index:04d}.bin").write_bytes(rng.randbytes(index * 7))
    (many / "z_empty").write_bytes(b"")
    # A name that is not UTF-8, and one with spaces and a newline.
    os.mkdir(os.fsencode(root) + b"/caf\xe9")
    Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9/na\xefve.bin")).write_bytes(b"\xff\x00")
    (root / "odd name\nwith newline").write_bytes(b"x")


def snapshot(root: Path) -> dict[bytes, Any]:
    """Relative path → ``"dir"`` or the file's bytes; anything else fails."""
    result: dict[bytes, Any] = {}
    base = os.fsencode(root)
    for directory, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                result[os.path.relpath(path, base)] = "dir"
            elif stat.S_ISREG(mode):
                with open(path, "rb") as file:
                    result[os.path.relpath(path, base)] = file.read()
            else:
                raise AssertionError(f"neither a file nor a directory: {path!r}")
    return result


def leftovers(path: Path) -> list[str]:
    """Temporary siblings of ``path`` that a transfer left."""
    parent = path.parent
    return (
        [name for name in os.listdir(parent) if TRANSFER_MARKER in name] if parent.exists() else []
    )


def assert_nothing_at(dst: Path) -> None:
    assert not os.path.lexists(dst), f"{dst} exists"
    assert leftovers(dst) == []


def expected_receipt(root: Path) -> TransferReceipt:
    """The receipt of the tree at ``root``: every file's size and checksum."""
    algorithm = preferred_algorithm()
    files = {}
    for rel, data in snapshot(root).items():
        if data != "dir":
            files[os.fsdecode(rel)] = (len(data), checksum_of(algorithm, data))
    return TransferReceipt(algorithm, files)


def status_kib(field: str) -> int:
    """A ``VmHWM``-style field of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Probe:
    """Inside a task: write ``<role>.pid`` at the start and ``<role>.json`` at the end
    (node id, pid, and with ``measure`` the memory the task added)."""

    def __init__(self, probe_dir: str, role: str, measure: bool) -> None:
        self.probe_dir, self.role, self.measure = probe_dir, role, measure
        self.anon_peak_kib = self.shmem_peak_kib = 0
        self._stop = threading.Event()

    def __enter__(self) -> Probe:
        self.report: dict[str, Any] = {"node_id": current_node_id(), "pid": os.getpid()}
        if self.measure:
            # Reset the high-water mark to the current RSS (Linux >= 4.0), so the mark
            # read at the end is this task's peak, whatever the reused worker did before.
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.report["rss_before_kib"] = status_kib("VmRSS")
            self.report["anon_before_kib"] = status_kib("RssAnon")
            self.report["shmem_before_kib"] = status_kib("RssShmem")
            self.report["maxrss_before_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self._write(".pid", self.report)
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.anon_peak_kib = max(self.anon_peak_kib, status_kib("RssAnon"))
            self.shmem_peak_kib = max(self.shmem_peak_kib, status_kib("RssShmem"))

    def __exit__(self, *exc_info: Any) -> None:
        if self.measure:
            self._stop.set()
            self._sampler.join()
            self.report["hwm_after_kib"] = status_kib("VmHWM")
            self.report["anon_peak_kib"] = max(self.anon_peak_kib, status_kib("RssAnon"))
            self.report["shmem_peak_kib"] = max(self.shmem_peak_kib, status_kib("RssShmem"))
            self.report["maxrss_after_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.report["failed"] = exc_info[0] is not None
        # KeyboardInterrupt: the task was cancelled (``ray.cancel``); GeneratorExit: its
        # stream was closed from outside (a direct connection that went away).
        self.report["error"] = None if exc_info[0] is None else exc_info[0].__name__
        self._write(".json", self.report)

    def _write(self, suffix: str, data: dict[str, Any]) -> None:
        path = os.path.join(self.probe_dir, self.role + suffix)
        with open(path + ".tmp", "w") as file:
            json.dump(data, file)
        os.rename(path + ".tmp", path)


class ProbedTransfer(RayObjectStoreTransfer):
    """``RayObjectStoreTransfer`` whose reader and writer report through ``Probe`` files.

    ``delay_s``: the reader sleeps this long after each item (to be killed mid-stream).
    ``fault(index, item, src_path)``: the reader yields what it returns instead of item
    ``index`` (an iterable: drop, replace or add items; or raise).
    ``wrap_connection(connection, probe_dir)``: what the reader sends the contents
    through instead of its direct connection. ``refuse_connection``: the reader cannot
    connect (as behind a firewall). Every connection the reader tries is recorded in
    ``connections.json``. ``writer_fails_at``: the writer's disk fails (ENOSPC) as it
    takes that item of the stream.
    """

    def __init__(
        self,
        probe_dir: Path,
        *,
        delay_s: float = 0.0,
        fault: Callable[[int, Any, str], Any] | None = None,
        measure: bool = False,
        wrap_connection: Callable[[Any, str], Any] | None = None,
        refuse_connection: bool = False,
        writer_fails_at: int | None = None,
        reader_end_grace_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.writer_fails_at = writer_fails_at
        if reader_end_grace_s is not None:
            self.reader_end_grace_s = reader_end_grace_s
        self.probe_dir = str(probe_dir)
        self.delay_s = delay_s
        self.fault = fault
        self.measure = measure
        self.wrap_connection = wrap_connection
        self.refuse_connection = refuse_connection

    def _connect(self, peer: Any) -> Any:
        connection = None if self.refuse_connection else super()._connect(peer)
        with open(os.path.join(self.probe_dir, "connections.json"), "a") as file:
            file.write(json.dumps({"connected": connection is not None}) + "\n")
        if connection is None or self.wrap_connection is None:
            return connection
        return self.wrap_connection(connection, self.probe_dir)

    def connections(self) -> list[bool]:
        """Whether each connection the reader tried was made."""
        path = os.path.join(self.probe_dir, "connections.json")
        if not os.path.exists(path):
            return []
        with open(path) as file:
            return [json.loads(line)["connected"] for line in file]

    def _read_source(self, src_path: str, algorithm: str) -> Iterator[Any]:
        with Probe(self.probe_dir, "reader", self.measure) as probe:
            probe.report["items"] = 0  # how many of the source's items it yielded
            for index, item in enumerate(super()._read_source(src_path, algorithm)):
                if self.fault is None:
                    yield item
                else:
                    # Not ``yield from``: Ray resumes generators with send(), which a
                    # list iterator does not have.
                    for out in self.fault(index, item, src_path):  # noqa: UP028
                        yield out
                probe.report["items"] = index + 1
                if self.delay_s:
                    time.sleep(self.delay_s)

    def _write_destination(self, items: Iterator[Any], tmp_path: str, algorithm: str) -> Any:
        with Probe(self.probe_dir, "writer", self.measure):
            if self.writer_fails_at is not None:
                items = failing_at(items, self.writer_fails_at)
            return super()._write_destination(items, tmp_path, algorithm)

    def report(self, role: str) -> dict[str, Any]:
        with open(os.path.join(self.probe_dir, role + ".json")) as file:
            return dict(json.load(file))

    def wait_for_pid(self, role: str, timeout_s: float = 60.0) -> int:
        path = os.path.join(self.probe_dir, role + ".pid")
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            assert time.monotonic() < deadline, f"no {role} started"
            time.sleep(0.02)
        with open(path) as file:
            return int(json.load(file)["pid"])


def failing_at(items: Iterator[Any], index: int) -> Iterator[Any]:
    for position, item in enumerate(items):
        if position == index:
            raise OSError(errno.ENOSPC, "injected write error")
        yield item


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    path = tmp_path / "probes"
    path.mkdir()
    return path


@pytest.fixture(params=[True, False], ids=["direct", "object-store"])
def direct(request: pytest.FixtureRequest) -> bool:
    """How the contents travel: over a direct connection, or through the object store."""
    return bool(request.param)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src" / "tree"
    make_tree(root)
    return root


def nodes(ray_cluster: Any, route: str) -> tuple[str, str]:
    head, (first, second) = ray_cluster.head_node_id, ray_cluster.worker_node_ids
    return {
        "worker-to-worker": (first, second),
        "head-to-worker": (head, second),
        "worker-to-head": (first, head),
        "same-node": (second, second),
    }[route]


# --------------------------------------------------------------------------- copies


@pytest.mark.parametrize(
    "route", ["worker-to-worker", "head-to-worker", "worker-to-head", "same-node"]
)
def test_tree_arrives_byte_exact_read_on_source_and_written_on_destination_node(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path, route: str, direct: bool
) -> None:
    src_node, dst_node = nodes(ray_cluster, route)
    dst = tmp_path / "dst" / "parents" / "made" / "tree"
    hook = ProbedTransfer(probe_dir, chunk_bytes=SMALL_CHUNK, max_chunks_in_flight=2, direct=direct)

    hook.transfer(src_node, str(source), dst_node, str(dst))

    assert snapshot(dst) == snapshot(source)
    assert (dst / "empty_dir").is_dir() and not os.listdir(dst / "empty_dir")
    assert (dst / "a" / "empty.bin").read_bytes() == b""
    assert leftovers(dst) == []
    assert hook.report("reader")["node_id"] == src_node
    assert hook.report("writer")["node_id"] == dst_node


def test_default_hook_moves_a_tree_and_takes_pathlike_paths(
    ray_cluster: Any, source: Path, tmp_path: Path
) -> None:
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")
    dst = tmp_path / "dst"

    get_default_transfer().transfer(src_node, source, dst_node, dst)  # type: ignore[arg-type]

    assert snapshot(dst) == snapshot(source)


def test_empty_tree_is_transferred(ray_cluster: Any, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    RayObjectStoreTransfer().transfer(
        src_node, str(tmp_path / "empty"), dst_node, str(tmp_path / "copy")
    )

    assert os.listdir(tmp_path / "copy") == []


def test_only_empty_files_are_transferred(ray_cluster: Any, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "src" / name).write_bytes(b"")
    src_node, dst_node = nodes(ray_cluster, "head-to-worker")

    RayObjectStoreTransfer().transfer(
        src_node, str(tmp_path / "src"), dst_node, str(tmp_path / "d")
    )

    assert snapshot(tmp_path / "d") == snapshot(tmp_path / "src")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("existing", ["directory", "empty directory", "file", "dangling symlink"])
def test_existing_destination_is_refused_and_left_untouched(
    ray_cluster: Any, source: Path, tmp_path: Path, existing: str
) -> None:
    dst = tmp_path / "dst"
    if existing == "directory":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    elif existing == "empty directory":
        dst.mkdir()
    elif existing == "file":
        dst.write_text("mine")
    else:
        dst.symlink_to(tmp_path / "nowhere")
    before = os.lstat(dst)
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    with pytest.raises(TransferError, match="already exists") as info:
        RayObjectStoreTransfer().transfer(src_node, str(source), dst_node, str(dst))

    assert info.value.path == str(dst)
    after = os.lstat(dst)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    if existing == "directory":
        assert os.listdir(dst) == ["keep.txt"]
    assert leftovers(dst) == []


def test_error_names_both_nodes_both_paths_and_the_cause(ray_cluster: Any, tmp_path: Path) -> None:
    src_node, dst_node = nodes(ray_cluster, "worker-to-head")
    missing, dst = tmp_path / "missing", tmp_path / "dst"

    with pytest.raises(TransferError) as info:
        RayObjectStoreTransfer().transfer(src_node, str(missing), dst_node, str(dst))

    message = str(info.value)
    for part in (src_node, str(missing), dst_node, str(dst), "No such file or directory"):
        assert part in message
    assert info.value.path == str(dst)
    assert_nothing_at(dst)


@pytest.mark.parametrize("special", ["symlink to a file", "symlink to a directory", "fifo"])
def test_symlink_or_special_file_in_source_is_refused(
    ray_cluster: Any, source: Path, tmp_path: Path, special: str
) -> None:
    inside = source / "a" / "b"
    if special == "symlink to a file":
        (inside / "link").symlink_to(source / "big.bin")
    elif special == "symlink to a directory":
        (inside / "link").symlink_to(source / "many")
    else:
        os.mkfifo(inside / "link")
    dst = tmp_path / "dst"
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    with pytest.raises(TransferError, match=r"a/b/link is a (symbolic link|FIFO)"):
        RayObjectStoreTransfer().transfer(src_node, str(source), dst_node, str(dst))

    assert_nothing_at(dst)


@pytest.mark.parametrize(
    ("src", "dst", "match"),
    [
        ("relative/src", "/abs/dst", "not an absolute path"),
        ("/abs/src", "relative/dst", "not an absolute path"),
        ("/abs/src", "/abs/src/inside", "one path contains the other"),
        ("/abs/src", "/", "filesystem root"),
    ],
)
def test_unusable_paths_are_refused_before_any_task_runs(
    ray_cluster: Any, src: str, dst: str, match: str
) -> None:
    node = ray_cluster.worker_node_ids[0]

    with pytest.raises(TransferError, match=match):
        RayObjectStoreTransfer().transfer(node, src, node, dst)


def test_unknown_node_is_a_transfer_error(ray_cluster: Any, source: Path, tmp_path: Path) -> None:
    unknown = "ab" * 28
    dst = tmp_path / "dst"

    with pytest.raises(TransferError, match=unknown):
        RayObjectStoreTransfer(timeout_s=60).transfer(
            ray_cluster.worker_node_ids[0], str(source), unknown, str(dst)
        )

    assert_nothing_at(dst)


def test_bad_arguments_are_type_errors() -> None:
    hook = RayObjectStoreTransfer()
    with pytest.raises(TypeError, match="src_node_id"):
        hook.transfer(None, "/a", "n", "/b")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dst_path"):
        hook.transfer("n", "/a", "n", 3)  # type: ignore[arg-type]
    for bad in ({"chunk_bytes": 0}, {"max_chunks_in_flight": 0}, {"timeout_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RayObjectStoreTransfer(**bad)
    with pytest.raises(TypeError, match="direct"):
        RayObjectStoreTransfer(direct="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- faults


def listing_with(*extra: tuple[bytes, str, int]) -> Callable[[int, Any, str], Any]:
    """A fault: the listing gains ``extra`` entries."""

    def fault(index: int, item: Any, src_path: str) -> Any:
        if index == 0:
            kind, version, algorithm, entries = item
            return [(kind, version, algorithm, [*entries, *extra])]
        return [item]

    return fault


@pytest.mark.parametrize(
    "entry",
    [
        (b"../escaped", "f", 1),
        (b"a/../../escaped", "f", 1),
        (b"/tmp/escaped", "f", 1),
        (b"", "f", 1),
        (b".", "d", 0),
        (b"a//b", "f", 1),
        (b"a/./x", "f", 1),
        (b"a\\..\\..\\escaped", "f", 1),
        (b"nul\x00byte", "f", 1),
        (b"big.bin", "f", 1),  # listed twice
        (b"unlisted/x", "f", 1),  # its directory is not listed
        ("str/not/bytes", "f", 1),
        (b"weird", "l", 1),
        (b"negative", "f", -1),
    ],
    ids=repr,
)
def test_bad_member_path_in_the_stream_is_refused_before_anything_is_written(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path, entry: Any
) -> None:
    dst = tmp_path / "out" / "dst"
    hook = ProbedTransfer(probe_dir, fault=listing_with(entry), chunk_bytes=SMALL_CHUNK)
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    with pytest.raises(TransferError, match="refused member path"):
        hook.transfer(src_node, str(source), dst_node, str(dst))

    assert_nothing_at(dst)
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()
    assert hook.report("writer")["failed"]


def flip_a_byte(index: int, item: Any, src_path: str) -> Any:
    if index == 2:
        data = bytearray(memoryview(item))
        data[len(data) // 2] ^= 1
        return [data]
    return [item]


def drop_a_chunk(index: int, item: Any, src_path: str) -> Any:
    return [] if index == 2 else [item]


def drop_the_end(index: int, item: Any, src_path: str) -> Any:
    return [] if isinstance(item, tuple) and item[0] == "end" else [item]


def add_after_the_end(index: int, item: Any, src_path: str) -> Any:
    return [item, b"extra"] if isinstance(item, tuple) and item[0] == "end" else [item]


def remove_the_source(index: int, item: Any, src_path: str) -> Any:
    yield item
    if index == 0:
        shutil.rmtree(src_path)  # after the listing: the files vanish mid-stream


def raise_in_the_reader(index: int, item: Any, src_path: str) -> Any:
    if index == 3:
        raise OSError(errno.EIO, "injected read error", src_path)
    return [item]


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        (flip_a_byte, "checksum mismatch"),
        (drop_a_chunk, "ended early|checksum|sent"),
        (drop_the_end, "without its end record"),
        (add_after_the_end, "goes on after its end"),
        (remove_the_source, "No such file or directory"),
        (raise_in_the_reader, "injected read error"),
    ],
)
def test_broken_stream_is_a_transfer_error_and_leaves_nothing(
    ray_cluster: Any,
    source: Path,
    tmp_path: Path,
    probe_dir: Path,
    fault: Callable[..., Any],
    match: str,
    direct: bool,
) -> None:
    dst = tmp_path / "dst"
    hook = ProbedTransfer(probe_dir, fault=fault, chunk_bytes=SMALL_CHUNK, direct=direct)
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    with pytest.raises(TransferError, match=match):
        hook.transfer(src_node, str(source), dst_node, str(dst))

    assert_nothing_at(dst)


#: The grace the first test gives its reader: long, so that a busy machine does not
#: run it out while the reader sends its last items through Ray and lingers.
LONG_GRACE_S = 10.0


def linger_at_the_end(index: int, item: Any, src_path: str) -> Any:
    """The reader lingers a little after its end record: ending by itself well within
    ``LONG_GRACE_S``, but not before a writer that failed mid-stream closes."""
    yield item
    if isinstance(item, tuple) and item[0] == "end":
        time.sleep(END_GRACE_S / 4)


def test_a_reader_ending_by_itself_is_not_cancelled_when_the_writer_fails(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path, direct: bool
) -> None:
    """Cancelling a task just as it completes crashes the worker that owns it (Ray
    2.60's task manager, seen in CI: the writer's worker died and the transfer's error
    named a WorkerCrashedError instead of what went wrong). So a writer that fails lets
    a reader that is ending end by itself, and cancels only one that goes on. (The
    reader's report is written before its task completes; the writer waits for that.)"""
    dst = tmp_path / "dst"
    hook = ProbedTransfer(
        probe_dir,
        fault=linger_at_the_end,
        writer_fails_at=1,
        reader_end_grace_s=LONG_GRACE_S,
        chunk_bytes=SMALL_CHUNK,
        direct=direct,
    )
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    with pytest.raises(TransferError, match="injected write error"):
        hook.transfer(src_node, str(source), dst_node, str(dst))

    assert_nothing_at(dst)
    reader = hook.report("reader")
    assert reader["error"] != "KeyboardInterrupt", reader  # not cancelled
    if not direct:  # nothing stopped it: it sent all its items and ended
        assert reader["error"] is None and reader["items"] == 16, reader


def test_a_reader_going_on_is_cancelled_when_the_writer_fails(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path, direct: bool
) -> None:
    """Reading the whole source would take 32 s; the reader is stopped soon after the
    writer fails: cancelled after ``END_GRACE_S`` (a KeyboardInterrupt, raised when its
    2 s sleep returns), or, over a direct connection, possibly first by the writer
    closing the connection (its next send fails)."""
    dst = tmp_path / "dst"
    hook = ProbedTransfer(
        probe_dir, writer_fails_at=1, delay_s=2.0, chunk_bytes=SMALL_CHUNK, direct=direct
    )
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    with pytest.raises(TransferError, match="injected write error"):
        hook.transfer(src_node, str(source), dst_node, str(dst))

    assert_nothing_at(dst)
    deadline = time.monotonic() + 30
    while not (probe_dir / "reader.json").exists():
        assert time.monotonic() < deadline, "the reader did not end"
        time.sleep(0.05)
    reader = hook.report("reader")
    assert reader["failed"] and reader["items"] < 8, reader
    # Over a direct connection: cancelled, or its send failed first (GeneratorExit).
    stopped = {"KeyboardInterrupt", "GeneratorExit"} if direct else {"KeyboardInterrupt"}
    assert reader["error"] in stopped, reader


def run_in_thread(call: Callable[[], None]) -> concurrent.futures.Future[None]:
    executor = concurrent.futures.ThreadPoolExecutor(1)
    future = executor.submit(call)
    executor.shutdown(wait=False)
    return future


@pytest.mark.parametrize(
    ("role", "route"),
    [
        ("reader", "worker-to-worker"),
        ("writer", "worker-to-worker"),
        # The writer is this process: only the reader can be killed.
        ("reader", "worker-to-head"),
    ],
)
def test_killing_a_task_mid_stream_is_a_transfer_error_and_leaves_nothing(
    ray_cluster: Any,
    source: Path,
    tmp_path: Path,
    probe_dir: Path,
    role: str,
    route: str,
    direct: bool,
) -> None:
    # About 60 chunks at 0.1 s each: the kill lands mid-stream.
    (source / "slow.bin").write_bytes(os.urandom(60 * SMALL_CHUNK))
    dst = tmp_path / "dst"
    hook = ProbedTransfer(
        probe_dir, delay_s=0.1, chunk_bytes=SMALL_CHUNK, max_chunks_in_flight=2, direct=direct
    )
    src_node, dst_node = nodes(ray_cluster, route)
    future = run_in_thread(lambda: hook.transfer(src_node, str(source), dst_node, str(dst)))
    pid = hook.wait_for_pid(role)
    tmp_dirs: list[str] = []
    while not tmp_dirs:  # the writer has started writing
        tmp_dirs = leftovers(dst)
        time.sleep(0.05)
    time.sleep(0.5)

    os.kill(pid, signal.SIGKILL)

    with pytest.raises(TransferError) as info:
        future.result(timeout=120)
    assert src_node in str(info.value) and str(dst) in str(info.value)
    side = "source" if role == "reader" else "destination"
    assert f"on the {side} node: WorkerCrashedError" in str(info.value)
    assert_nothing_at(dst)
    if role == "reader":  # it ran, so it connected if it could
        assert hook.connections() == ([True] if direct else [])


@pytest.mark.parametrize("route", ["head-to-worker", "worker-to-head"])
def test_timeout_is_a_transfer_error_and_leaves_nothing(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path, route: str, direct: bool
) -> None:
    dst = tmp_path / "dst"
    hook = ProbedTransfer(
        probe_dir, delay_s=0.5, chunk_bytes=SMALL_CHUNK, timeout_s=3, direct=direct
    )
    src_node, dst_node = nodes(ray_cluster, route)

    started = time.monotonic()
    with pytest.raises(TransferError, match="did not finish within 3 s"):
        hook.transfer(src_node, str(source), dst_node, str(dst))

    assert time.monotonic() - started < 30
    assert_nothing_at(dst)


def test_a_writer_finishing_as_the_time_runs_out_is_reported_not_cancelled(
    ray_cluster: Any, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time runs out just as the writer finishes (injected: a timed ``ray.get``
    waits for the result, then says it timed out). The transfer reports what happened,
    the tree moved, and does not cancel the writer: a cancel that crosses a task's
    completion crashes the worker that owns it, here this process's."""
    dst = tmp_path / "dst"
    src_node, dst_node = nodes(ray_cluster, "head-to-worker")
    real_get, cancelled = ray.get, []

    def get_timing_out(refs: Any, *, timeout: float | None = None) -> Any:
        if timeout is None:
            return real_get(refs)
        real_get(refs)
        raise ray.exceptions.GetTimeoutError("injected: the time ran out")

    monkeypatch.setattr(ray, "get", get_timing_out)
    monkeypatch.setattr(ray, "cancel", lambda *args, **kwargs: cancelled.append(args))
    hook = RayObjectStoreTransfer(chunk_bytes=SMALL_CHUNK, timeout_s=60, progress=False)

    receipt = hook.transfer(src_node, str(source), dst_node, str(dst))

    assert snapshot(dst) == snapshot(source)
    assert receipt == expected_receipt(dst)
    assert not cancelled


def test_into_the_caller_s_node_the_caller_is_the_writer(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path, direct: bool
) -> None:
    src_node, dst_node = nodes(ray_cluster, "worker-to-head")
    hook = ProbedTransfer(probe_dir, chunk_bytes=SMALL_CHUNK, direct=direct)

    receipt = hook.transfer(src_node, str(source), dst_node, str(tmp_path / "dst"))

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert receipt == expected_receipt(tmp_path / "dst")
    assert hook.report("writer")["pid"] == os.getpid()
    assert hook.report("reader")["node_id"] == src_node
    assert hook.connections() == ([True] if direct else [])


# --------------------------------------------------------------------------- big and bounded


def write_big_file(path: Path, size: int) -> str:
    """``size`` bytes, each 1 MiB block distinct; returns their xxh3-64."""
    import xxhash

    block = bytearray(os.urandom(MiB))
    checksum = xxhash.xxh3_64()
    with open(path, "wb") as file:
        for index in range(0, size, MiB):
            block[:8] = index.to_bytes(8, "little")
            piece = memoryview(block)[: min(MiB, size - index)]
            file.write(piece)
            checksum.update(piece)
    return str(checksum.hexdigest())


def checksum_of_file(path: Path) -> str:
    import xxhash

    checksum = xxhash.xxh3_64()
    with open(path, "rb") as file:
        while chunk := file.read(8 * MiB):
            checksum.update(chunk)
    return str(checksum.hexdigest())


def test_more_than_a_gib_between_workers_in_a_few_chunks_of_memory(
    ray_cluster: Any, tmp_path: Path, probe_dir: Path, direct: bool
) -> None:
    chunk, in_flight = 4 * MiB, 4
    size = (1 << 30) + 100 * MiB + 12_345  # 1.1 GiB, not a multiple of the chunk
    source = tmp_path / "src"
    (source / "small").mkdir(parents=True)
    expected = write_big_file(source / "huge.bin", size)
    for index in range(20):
        (source / "small" / f"{index}.bin").write_bytes(os.urandom(index * 1000))
    dst = tmp_path / "dst"
    src_node, dst_node = ray_cluster.worker_node_ids
    hook = ProbedTransfer(
        probe_dir, measure=True, chunk_bytes=chunk, max_chunks_in_flight=in_flight, direct=direct
    )

    try:
        with ObjectStoreSampler([src_node, dst_node]) as store:
            started = time.perf_counter()
            hook.transfer(src_node, str(source), dst_node, str(dst))
            seconds = time.perf_counter() - started

        assert os.path.getsize(dst / "huge.bin") == size
        assert checksum_of_file(dst / "huge.bin") == expected
        for index in range(20):
            assert (dst / "small" / f"{index}.bin").read_bytes() == (
                source / "small" / f"{index}.bin"
            ).read_bytes()
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)

    reader, writer = hook.report("reader"), hook.report("writer")
    assert (reader["node_id"], writer["node_id"]) == (src_node, dst_node)
    lines = [f"{size / MiB:.0f} MiB in {seconds:.1f} s ({size / MiB / seconds:.0f} MiB/s)"]
    private_kib = {}
    for name, report in (("reader", reader), ("writer", writer)):
        hwm = report["hwm_after_kib"] - report["rss_before_kib"]
        anon = report["anon_peak_kib"] - report["anon_before_kib"]
        shmem = report["shmem_peak_kib"] - report["shmem_before_kib"]
        # VmHWM also counts the object-store pages the task touched (shared memory,
        # the node's store: measured below); what the task holds privately is the rest.
        private_kib[name] = max(anon, hwm - max(shmem, 0))
        lines.append(
            f"{name}: peak RSS +{hwm / KiB:.1f} MiB (VmHWM), of which object-store pages "
            f"+{shmem / KiB:.1f} MiB (RssShmem) and private +{private_kib[name] / KiB:.1f} "
            f"MiB (sampled RssAnon +{anon / KiB:.1f} MiB); ru_maxrss "
            f"{report['maxrss_before_kib'] / KiB:.0f} -> {report['maxrss_after_kib'] / KiB:.0f} MiB"
        )
    for node_id, role in ((src_node, "source"), (dst_node, "destination")):
        lines.append(
            f"{role} node object store peak {store.peak_bytes[node_id] / MiB:.1f} MiB "
            f"(primary copies, as `ray status` counts them)"
        )
    print("\n".join(lines))

    # Buffering the file or the tree would add 1.1 GiB; a few chunks are allowed.
    bound_kib = (10 * chunk + 64 * MiB) // KiB
    assert private_kib["reader"] < bound_kib, lines
    assert private_kib["writer"] < bound_kib, lines
    # Through the object store, the chunks are created on the source node: there they
    # count; the writer's pulled copies are secondary (evictable) ones, and the writer
    # holds a few at a time. Over the direct connection only the records pass there.
    assert store.samples > 10, "the object store was not sampled during the transfer"
    assert store.peak_bytes[src_node] < (in_flight + 2) * chunk, lines
    assert store.peak_bytes[dst_node] < (in_flight + 2) * chunk, lines
    if direct:
        assert hook.connections() == [True]
        assert store.peak_bytes[src_node] < chunk, lines
    else:
        assert hook.connections() == []
        assert store.peak_bytes[src_node] > 0, lines


# --------------------------------------------------------------------------- direct connection


class CountingConnection:
    """The reader's connection, counting what it sends (in ``sent.json`` at close)."""

    def __init__(self, connection: Any, probe_dir: str) -> None:
        self.connection, self.probe_dir, self.sent = connection, probe_dir, 0

    def sendall(self, data: Any) -> None:
        self.connection.sendall(data)
        self.sent += memoryview(data).nbytes

    def close(self) -> None:
        self.connection.close()
        with open(os.path.join(self.probe_dir, "sent.json"), "w") as file:
            json.dump(self.sent, file)


class FaultyConnection:
    """The reader's connection, misbehaving at byte ``at`` of the contents: ``flip``
    one byte, ``drop`` the piece that holds it, ``reset`` (closed, and an error raised
    in the reader), or ``extra`` bytes after the last."""

    def __init__(self, connection: Any, kind: str, at: int) -> None:
        self.connection, self.kind, self.at, self.sent = connection, kind, at, 0

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self.sent <= self.at < self.sent + len(view) and self.kind != "extra":
            if self.kind == "reset":
                self.connection.close()
                raise ConnectionResetError(errno.ECONNRESET, "injected reset")
            if self.kind == "flip":
                changed = bytearray(view)
                changed[self.at - self.sent] ^= 1
                view = memoryview(changed)
            else:  # drop
                self.sent += len(view)
                return
        self.connection.sendall(view)
        self.sent += len(view)

    def close(self) -> None:
        if self.kind == "extra" and self.sent:
            with contextlib.suppress(OSError):
                self.connection.sendall(b"extra")
        self.connection.close()


def faulty(kind: str, at: int) -> Callable[[Any, str], Any]:
    return lambda connection, probe_dir: FaultyConnection(connection, kind, at)


@pytest.fixture
def two_files(tmp_path: Path) -> Path:
    """``a.bin`` and ``b.bin``, 1 MiB each: byte 1.5 MiB of the contents is in b.bin."""
    root = tmp_path / "two"
    root.mkdir()
    (root / "a.bin").write_bytes(os.urandom(MiB))
    (root / "b.bin").write_bytes(os.urandom(MiB))
    return root


def test_the_contents_travel_over_the_direct_connection(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path
) -> None:
    hook = ProbedTransfer(probe_dir, chunk_bytes=SMALL_CHUNK, wrap_connection=CountingConnection)
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    hook.transfer(src_node, str(source), dst_node, str(tmp_path / "dst"))

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert hook.connections() == [True]
    sizes = [len(data) for data in snapshot(source).values() if data != "dir"]
    assert json.loads((probe_dir / "sent.json").read_text()) == sum(sizes)


def test_a_reader_that_cannot_connect_sends_through_the_object_store(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path
) -> None:
    hook = ProbedTransfer(probe_dir, chunk_bytes=SMALL_CHUNK, refuse_connection=True)
    src_node, dst_node = nodes(ray_cluster, "head-to-worker")

    receipt = hook.transfer(src_node, str(source), dst_node, str(tmp_path / "dst"))

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert receipt == expected_receipt(tmp_path / "dst")
    assert hook.connections() == [False]


def test_without_direct_the_reader_does_not_connect(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path
) -> None:
    hook = ProbedTransfer(probe_dir, chunk_bytes=SMALL_CHUNK, direct=False)
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    hook.transfer(src_node, str(source), dst_node, str(tmp_path / "dst"))

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert hook.connections() == []


def test_no_direct_connection_where_ray_encrypts_its_traffic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_USE_TLS", "1")
    assert not direct_allowed()
    monkeypatch.setenv("RAY_USE_TLS", "0")
    assert direct_allowed()
    monkeypatch.delenv("RAY_USE_TLS")
    assert direct_allowed()


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("flip", r"checksum mismatch for \S*/b\.bin"),
        ("drop", r"ended early, after \d+ bytes of \d+ \(in file 2 of 2: \S*/b\.bin\)"),
        ("reset", "on the source node: .*injected reset"),
        ("extra", "goes on after its end"),
    ],
)
def test_a_connection_that_misbehaves_is_a_transfer_error_and_leaves_nothing(
    ray_cluster: Any, two_files: Path, tmp_path: Path, probe_dir: Path, kind: str, match: str
) -> None:
    dst = tmp_path / "dst"
    hook = ProbedTransfer(
        probe_dir, chunk_bytes=SMALL_CHUNK, wrap_connection=faulty(kind, 3 * MiB // 2)
    )
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    with pytest.raises(TransferError, match=match) as info:
        hook.transfer(src_node, str(two_files), dst_node, str(dst))

    assert info.value.path == str(dst)
    assert_nothing_at(dst)


class Impostor(ProbedTransfer):
    """Someone else connects to the writer first, with a wrong token: ``alone``, the
    reader sends over that connection (and the writer never gets the token)."""

    def __init__(self, probe_dir: Path, *, alone: bool, **kwargs: Any) -> None:
        super().__init__(probe_dir, **kwargs)
        self.alone = alone

    def _connect(self, peer: Any) -> Any:
        impostor = socket.create_connection((peer.host, peer.port))
        impostor.sendall(b"x" * len(peer.token))
        if self.alone:
            return impostor
        self.impostor = impostor  # held open while the transfer runs
        return super()._connect(peer)

    def _write_destination(self, items: Iterator[Any], tmp_path: str, algorithm: str) -> Any:
        before = _transfer_direct._ACCEPT_TIMEOUT_S
        _transfer_direct._ACCEPT_TIMEOUT_S = 3.0  # in the writer task
        try:
            return super()._write_destination(items, tmp_path, algorithm)
        finally:
            _transfer_direct._ACCEPT_TIMEOUT_S = before


def test_a_connection_without_the_token_is_refused(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path
) -> None:
    src_node, dst_node = nodes(ray_cluster, "worker-to-worker")

    Impostor(probe_dir, alone=False, chunk_bytes=SMALL_CHUNK).transfer(
        src_node, str(source), dst_node, str(tmp_path / "dst")
    )
    assert snapshot(tmp_path / "dst") == snapshot(source)

    with pytest.raises(TransferError, match="connection did not arrive within 3 s"):
        Impostor(probe_dir, alone=True, chunk_bytes=SMALL_CHUNK).transfer(
            src_node, str(source), dst_node, str(tmp_path / "dst2")
        )
    assert_nothing_at(tmp_path / "dst2")


def test_on_one_node_the_writer_reads_the_source_itself(
    ray_cluster: Any, source: Path, tmp_path: Path, probe_dir: Path
) -> None:
    src_node, dst_node = nodes(ray_cluster, "same-node")
    hook = ProbedTransfer(probe_dir, chunk_bytes=SMALL_CHUNK)

    receipt = hook.transfer(src_node, str(source), dst_node, str(tmp_path / "dst"))

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert receipt == expected_receipt(tmp_path / "dst")
    assert hook.report("reader")["pid"] == hook.report("writer")["pid"]
    assert hook.connections() == []


# --------------------------------------------------------------------------- receipts


@pytest.mark.parametrize("route", ["worker-to-worker", "worker-to-head"])
def test_the_receipt_names_every_file_with_the_size_and_checksum_written(
    ray_cluster: Any, source: Path, tmp_path: Path, route: str, direct: bool
) -> None:
    src_node, dst_node = nodes(ray_cluster, route)
    hook = RayObjectStoreTransfer(chunk_bytes=SMALL_CHUNK, direct=direct)

    receipt = hook.transfer(src_node, str(source), dst_node, str(tmp_path / "dst"))

    assert receipt == expected_receipt(tmp_path / "dst")
    assert receipt is not None and os.fsdecode(b"caf\xe9/na\xefve.bin") in receipt.files


@pytest.fixture
def algo(ray_cluster: Any) -> Iterator[Algo]:
    """An object whose component ``runners`` is one actor on a worker node, with a
    3 MiB payload."""
    algo = Algo("ckptable", (ray_cluster.worker_node_ids[0],))
    try:
        foreach(algo.runners, lambda actor: actor.fill_payload(3 * MiB))
        yield algo
    finally:
        algo.kill_actors()


def reads_of_moved_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the save reads back to check a moved tree (filled as it runs)."""
    reads: list[str] = []
    read_verified = _actors.read_verified

    def counting(storage: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(path)
        return read_verified(storage, path, *args, **kwargs)

    monkeypatch.setattr(_actors, "read_verified", counting)
    return reads


class WithoutReceipt:
    """A custom hook that moves the tree with the default one and returns nothing."""

    def transfer(self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str) -> None:
        RayObjectStoreTransfer().transfer(src_node_id, src_path, dst_node_id, dst_path)


def test_a_save_checks_a_moved_tree_by_its_receipt_instead_of_reading_it_again(
    algo: Algo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = reads_of_moved_files(monkeypatch)

    algo.save_to_path(tmp_path / "with")
    assert reads == []

    algo.save_to_path(tmp_path / "without", transfer=WithoutReceipt())
    moved = tmp_path / "without" / "runners"
    files = [p for p in moved.rglob("*") if p.is_file() and p.name != MANIFEST_FILE]
    assert sorted(os.path.basename(path) for path in reads) == sorted(p.name for p in files)

    for path in (tmp_path / "with", tmp_path / "without"):
        assert ckptable.verify_checkpoint(path).verified


class CorruptingSource:
    """The actor's state file goes bad on its node after the actor wrote it (all nodes
    run on this machine, so the test reaches it), then the default hook moves it."""

    def transfer(self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str) -> Any:
        with open(os.path.join(src_path, "state.pkl"), "r+b") as file:
            file.seek(-100, os.SEEK_END)
            byte = file.read(1)
            file.seek(-100, os.SEEK_END)
            file.write(bytes([byte[0] ^ 1]))
        return RayObjectStoreTransfer().transfer(src_node_id, src_path, dst_node_id, dst_path)


def test_a_moved_tree_that_differs_from_the_actor_s_manifest_fails_the_save(
    algo: Algo, tmp_path: Path
) -> None:
    with pytest.raises(ActorCheckpointError, match=r"state\.pkl is corrupt"):
        algo.save_to_path(tmp_path / "ckpt", transfer=CorruptingSource())

    assert not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------- local copy


def test_local_copy_transfer_copies_byte_exact(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "parents" / "dst"

    LocalCopyTransfer().transfer("node-a", str(source), "node-b", str(dst))

    assert snapshot(dst) == snapshot(source)
    assert leftovers(dst) == []


def test_local_copy_transfer_refuses_symlinks_existing_and_nested_destinations(
    source: Path, tmp_path: Path
) -> None:
    hook = LocalCopyTransfer()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(TransferError, match="already exists"):
        hook.transfer("n", str(source), "n", str(existing))
    # The node ids do not matter: the paths are on one filesystem.
    with pytest.raises(TransferError, match="one path contains the other"):
        hook.transfer("node-a", str(source), "node-b", str(source / "copy"))
    (source / "link").symlink_to("/etc/passwd")
    dst = tmp_path / "dst"
    with pytest.raises(TransferError, match="link is a symbolic link") as info:
        hook.transfer("n", str(source), "n", str(dst))
    assert info.value.path == str(dst)
    assert_nothing_at(dst)


def test_local_copy_transfer_returns_the_receipt_of_what_it_wrote(
    source: Path, tmp_path: Path
) -> None:
    receipt = LocalCopyTransfer().transfer("n", str(source), "n", str(tmp_path / "dst"))

    assert receipt == expected_receipt(tmp_path / "dst")


def test_local_copy_transfer_failure_midway_leaves_nothing(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_tree = _transfer_local._stream_tree

    def failing_stream(*args: Any) -> Iterator[Any]:
        for index, item in enumerate(stream_tree(*args)):
            if index == 3:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            yield item

    monkeypatch.setattr(_transfer_local, "_stream_tree", failing_stream)
    dst = tmp_path / "dst"
    hook = LocalCopyTransfer()
    hook.chunk_bytes = SMALL_CHUNK  # several chunks: the failure comes mid-stream

    with pytest.raises(TransferError, match="No space left on device"):
        hook.transfer("n", str(source), "n", str(dst))

    assert_nothing_at(dst)


# --------------------------------------------------------------------------- the test double


def test_recording_transfer_records_and_delegates_to_the_object_store_by_default(
    ray_cluster: Any, source: Path, tmp_path: Path
) -> None:
    hook = RecordingTransfer()
    src_node, dst_node = nodes(ray_cluster, "head-to-worker")
    dst = tmp_path / "dst"

    hook.transfer(src_node, str(source), dst_node, str(dst))

    assert isinstance(hook.inner, RayObjectStoreTransfer)
    assert hook.calls == [TransferCall(src_node, str(source), dst_node, str(dst))]
    assert snapshot(dst) == snapshot(source)


def test_recording_transfer_returns_what_its_inner_hook_returns(
    source: Path, tmp_path: Path
) -> None:
    receipt = RecordingTransfer(LocalCopyTransfer()).transfer(
        "a", str(source), "b", str(tmp_path / "dst")
    )

    assert receipt == expected_receipt(tmp_path / "dst")


def test_recording_transfer_delegates_to_inner(source: Path, tmp_path: Path) -> None:
    hook = RecordingTransfer(LocalCopyTransfer())

    hook.transfer("a", str(source), "b", str(tmp_path / "one"))
    hook.transfer("b", str(source), "a", str(tmp_path / "two"))

    assert [call.dst_path for call in hook.calls] == [str(tmp_path / "one"), str(tmp_path / "two")]
    assert snapshot(tmp_path / "two") == snapshot(source)


@pytest.mark.parametrize(
    "fail",
    [OSError(errno.ENOSPC, "No space left on device"), TransferError("injected", path="/x")],
    ids=["OSError", "TransferError"],
)
def test_recording_transfer_with_fail_raises_a_transfer_error_and_creates_nothing(
    source: Path, tmp_path: Path, fail: BaseException
) -> None:
    hook = RecordingTransfer(LocalCopyTransfer(), fail=fail)
    dst = tmp_path / "parent" / "dst"

    with pytest.raises(TransferError) as info:
        hook.transfer("a", str(source), "b", str(dst))

    if isinstance(fail, TransferError):
        assert info.value is fail
    else:
        assert info.value.__cause__ is fail
        assert "No space left on device" in str(info.value) and str(dst) in str(info.value)
    assert len(hook.calls) == 1
    assert not dst.parent.exists()


# --------------------------------------------------------------------------- checking hooks


class NoTransfer:
    pass


class TooFewArguments:
    def transfer(self, src_node_id: str, src_path: str) -> None: ...


class KeywordOnly:
    def transfer(
        self, *, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str
    ) -> None: ...


class NotCallable:
    transfer = "copy"


class Flexible:
    def transfer(self, *args: Any, **kwargs: Any) -> None: ...


@pytest.mark.parametrize(
    ("hook", "match"),
    [
        (NoTransfer(), "no callable method transfer"),
        (NotCallable(), "no callable method transfer"),
        (TooFewArguments(), "cannot be called as transfer"),
        (KeywordOnly(), "cannot be called as transfer"),
        (RayObjectStoreTransfer, "is a class"),
        (None, "no callable method transfer"),
    ],
    ids=["no method", "not callable", "too few arguments", "keyword-only", "a class", "None"],
)
def test_check_transfer_hook_rejects_what_cannot_transfer(hook: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        check_transfer_hook(hook)


@pytest.mark.parametrize(
    "hook", [RayObjectStoreTransfer(), LocalCopyTransfer(), RecordingTransfer(), Flexible()]
)
def test_check_transfer_hook_accepts_hooks_and_returns_them(hook: Any) -> None:
    assert check_transfer_hook(hook) is hook
    assert isinstance(hook, TransferHook)


@pytest.fixture
def restore_default() -> Iterator[None]:
    before = get_default_transfer()
    try:
        yield
    finally:
        set_default_transfer(before)


@pytest.mark.usefixtures("restore_default")
def test_set_default_transfer_sets_checks_and_resets() -> None:
    mine = RecordingTransfer(LocalCopyTransfer())

    set_default_transfer(mine)
    assert get_default_transfer() is mine

    with pytest.raises(TypeError, match="cannot be called as transfer"):
        set_default_transfer(TooFewArguments())  # type: ignore[arg-type]
    assert get_default_transfer() is mine

    set_default_transfer(None)
    default = get_default_transfer()
    assert isinstance(default, RayObjectStoreTransfer) and default is not mine
    assert get_default_transfer() is default


def test_default_transfer_is_shared_between_threads() -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        hooks = list(pool.map(lambda _: get_default_transfer(), range(32)))
    assert all(hook is hooks[0] for hook in hooks)


def test_hooks_pickle() -> None:
    import pickle

    for hook in (
        RayObjectStoreTransfer(chunk_bytes=MiB, timeout_s=5.0),
        RayObjectStoreTransfer(direct=False),
        LocalCopyTransfer(),
    ):
        assert pickle.loads(pickle.dumps(hook)) == hook
    assert RayObjectStoreTransfer(direct=False) != RayObjectStoreTransfer()
