"""Concurrent requests on object stores: saves write behind the pipeline
(``_storage_concurrent``), restores list once and fetch ahead (``_storage_prefetch``).

Against the S3 test server behind the latency proxy (20 ms per round trip, see
``conftest.py``), with both client libraries: the request counts of a save and a restore,
the order that matters (the root manifest strictly after everything else), a failure
injected in one of many concurrent writes, a corrupted object among many, big files
through ranged reads and streamed uploads. The unit tests at the end drive
``ConcurrentWrites`` over a storage double that records what runs at once.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable import CheckpointError, CorruptCheckpointError
from ckptable._manifest import MANIFEST_FILE
from ckptable._storage import LocalStorage, resolve_storage
from ckptable._storage_batched import BatchedLocalWrites
from ckptable._storage_concurrent import (
    ConcurrentWrites,
    WriteFailed,
    io_concurrency,
    writing_concurrently,
)
from ckptable._storage_prefetch import PrefetchedReads, reading_ahead
from ckptable._storage_remote import FsspecStorage, PyArrowStorage
from s3_server import S3Server

LEAVES = 40


class Leaf(ckptable.Checkpointable):
    def __init__(self) -> None:
        self.payload: Any = None

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"payload": self.payload}

    def set_state(self, state: dict[str, Any]) -> None:
        self.payload = state["payload"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {}


class Wide(ckptable.Checkpointable):
    def __init__(self, leaves: int) -> None:
        self.leaves = {f"leaf_{i:03d}": Leaf() for i in range(leaves)}
        self.step = 0

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        state: dict[str, Any] = {"step": self.step}
        for name, leaf in self.leaves.items():
            if self._check_component(name, components, not_components):
                state[name] = leaf.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for name, leaf in self.leaves.items():
            if name in state:
                leaf.set_state(state[name])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (len(self.leaves),), {}

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.leaves.items())


def wide(leaves: int = LEAVES, seed: int = 0) -> Wide:
    tree = Wide(leaves)
    tree.step = seed
    for i, leaf in enumerate(tree.leaves.values()):
        leaf.payload = os.urandom(64) + bytes([i % 256, seed % 256])
    return tree


def payloads(tree: Wide) -> list[Any]:
    return [leaf.payload for leaf in tree.leaves.values()]


@pytest.fixture(params=["pyarrow", "s3fs"])
def latency_fs(request: pytest.FixtureRequest) -> Any:
    """Both S3 clients, through the 20 ms latency proxy."""
    return request.getfixturevalue(f"{request.param}_s3_latency")


@pytest.fixture
def server(s3_latency_server: S3Server) -> S3Server:
    s3_latency_server.reset_counts()
    return s3_latency_server


def _objects(fs: Any, prefix: str) -> list[str]:
    storage, path = resolve_storage(prefix, fs)
    return sorted(path for path, kind, _ in storage.list_tree(path) if kind == "file")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- S3 saves


def test_a_wide_save_sends_one_put_per_file_and_the_root_manifest_last(
    latency_fs: Any, server: S3Server, s3_prefix: str
) -> None:
    tree = wide()
    path = f"{s3_prefix}/ckpt"
    server.reset_counts()
    tree.save_to_path(path, filesystem=latency_fs)
    counts = server.counts()
    files = 4 * (LEAVES + 1)
    assert counts["PUT"] == files, counts  # one request per file: no multipart, no markers
    assert counts["GET"] == 0 and counts["DELETE"] == 0, counts
    # Looking at the target before writing: one look at a new path (nothing to check
    # or remove there; each look is a round trip or two).
    assert counts["HEAD"] <= 1 and counts["LIST"] <= 1, counts
    puts = [r for r in server.requests() if r.kind == "PUT"]
    assert puts[-1].path.split("?")[0].endswith(f"ckpt/{MANIFEST_FILE}")
    assert sum(r.path.split("?")[0].endswith(f"ckpt/{MANIFEST_FILE}") for r in puts) == 1
    restored = Wide(LEAVES)
    restored.restore_from_path(path, filesystem=latency_fs)
    assert payloads(restored) == payloads(tree)


def test_saving_over_a_wide_checkpoint_checks_it_with_one_listing(
    latency_fs: Any, server: S3Server, s3_prefix: str
) -> None:
    """Before replacing what is at the path, the save checks that it is a checkpoint:
    from one recursive listing, not a LIST per level (one round trip each)."""
    path = f"{s3_prefix}/ckpt"
    wide(seed=1).save_to_path(path, filesystem=latency_fs)
    tree = wide(seed=2)
    server.reset_counts()
    tree.save_to_path(path, filesystem=latency_fs)
    counts = server.counts()
    # One to check the tree, the rest to remove the old manifest and tree.
    assert counts["LIST"] <= 5 < LEAVES, counts
    restored = Wide(LEAVES)
    restored.restore_from_path(path, filesystem=latency_fs)
    assert payloads(restored) == payloads(tree)
    assert len(_objects(latency_fs, path)) == 4 * (LEAVES + 1)  # the new tree, nothing else

    # The listing is judged as the per-level one was: a user's file two levels down,
    # in a directory that is no checkpoint level, still stops the save.
    storage, fs_path = resolve_storage(path, latency_fs)
    storage.write_bytes(storage.join(fs_path, "leaf_003", "extra", "notes.txt"), b"mine")
    with pytest.raises(CheckpointError, match=r"notes\.txt is in a directory that is not"):
        wide(seed=4).save_to_path(path, filesystem=latency_fs)
    assert len(_objects(latency_fs, path)) == 4 * (LEAVES + 1) + 1  # nothing touched


def test_a_wide_restore_lists_once_and_fetches_each_file_once(
    latency_fs: Any, server: S3Server, s3_prefix: str
) -> None:
    tree = wide(seed=3)
    path = f"{s3_prefix}/ckpt"
    tree.save_to_path(path, filesystem=latency_fs)
    server.reset_counts()
    restored = Wide(LEAVES)
    restored.restore_from_path(path, filesystem=latency_fs)
    counts = server.counts()
    files = 4 * (LEAVES + 1)
    assert counts["LIST"] == 1, counts  # one recursive listing, not one per level
    assert counts["GET"] == files, counts  # verification and decoding share the bytes
    assert counts["PUT"] == counts["DELETE"] == 0
    # pyarrow opens every file with a HEAD (it cannot be given the size); s3fs is told.
    assert counts["HEAD"] == (files if isinstance(latency_fs, _pyarrow_s3()) else 0), counts
    assert payloads(restored) == payloads(tree) and restored.step == 3

    # from_checkpoint reads the class file and restores: the same single pass.
    server.reset_counts()
    rebuilt = Wide.from_checkpoint(path, filesystem=latency_fs)
    counts = server.counts()
    assert payloads(rebuilt) == payloads(tree)
    assert counts["LIST"] == 1 and counts["GET"] == files, counts


def test_verify_checkpoint_lists_once_and_reads_each_file_once(
    latency_fs: Any, server: S3Server, s3_prefix: str
) -> None:
    path = f"{s3_prefix}/ckpt"
    wide(seed=5).save_to_path(path, filesystem=latency_fs)
    server.reset_counts()
    report = ckptable.verify_checkpoint(path, filesystem=latency_fs)
    counts = server.counts()
    assert report.levels == LEAVES + 1
    assert counts["LIST"] == 1 and counts["GET"] == 4 * (LEAVES + 1), counts


def _pyarrow_s3() -> type:
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem


def test_writes_really_run_concurrently_on_the_store(
    latency_fs: Any, server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many requests are in flight at once (counted around the adapter's own call)."""
    adapter = PyArrowStorage if isinstance(latency_fs, _pyarrow_s3()) else FsspecStorage
    real = adapter.write_bytes
    lock = threading.Lock()
    now = {"in_flight": 0, "most": 0}

    def counting(self: Any, path: str, data: bytes) -> None:
        with lock:
            now["in_flight"] += 1
            now["most"] = max(now["most"], now["in_flight"])
        try:
            real(self, path, data)
        finally:
            with lock:
                now["in_flight"] -= 1

    monkeypatch.setattr(adapter, "write_bytes", counting)
    wide().save_to_path(f"{s3_prefix}/ckpt", filesystem=latency_fs)
    assert now["most"] >= 8, now


def test_one_failed_write_among_many_leaves_no_checkpoint_and_the_next_save_cleans_up(
    latency_fs: Any, server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = f"{s3_prefix}/ckpt"
    old = wide(seed=1)
    old.save_to_path(path, filesystem=latency_fs)
    adapter = PyArrowStorage if isinstance(latency_fs, _pyarrow_s3()) else FsspecStorage
    real = adapter.write_bytes
    started: list[str] = []

    def failing(self: Any, target: str, data: bytes) -> None:
        started.append(target)
        if target.endswith("leaf_017/state.pkl"):
            time.sleep(0.05)  # others are in flight meanwhile
            raise OSError(errno.EIO, "injected: the store refused this object")
        real(self, target, data)

    monkeypatch.setattr(adapter, "write_bytes", failing)
    with pytest.raises(CheckpointError) as caught:
        wide(seed=2).save_to_path(path, filesystem=latency_fs)
    message = str(caught.value)
    assert "leaf_017/state.pkl" in message and "injected" in message
    assert "was removed when this save began" in message  # true: the old one is gone
    assert len(started) < 4 * (LEAVES + 1)  # the writes not yet started were cancelled
    # No checkpoint, and no object the failed save wrote is left behind.
    assert _objects(latency_fs, path) == []
    with pytest.raises(CheckpointError):
        Wide(LEAVES).restore_from_path(path, filesystem=latency_fs)

    monkeypatch.setattr(adapter, "write_bytes", real)
    new = wide(seed=3)
    new.save_to_path(path, filesystem=latency_fs)
    assert len(_objects(latency_fs, path)) == 4 * (LEAVES + 1)
    restored = Wide(LEAVES)
    restored.restore_from_path(path, filesystem=latency_fs)
    assert payloads(restored) == payloads(new)


def test_a_restore_with_one_corrupted_object_among_many_applies_nothing(
    latency_fs: Any, s3_prefix: str
) -> None:
    path = f"{s3_prefix}/ckpt"
    wide(seed=4).save_to_path(path, filesystem=latency_fs)
    storage, fs_path = resolve_storage(f"{path}/leaf_031/state.pkl", latency_fs)
    data = bytearray(storage.read_bytes(fs_path))
    data[-3] ^= 0xFF
    storage.write_bytes(fs_path, bytes(data))
    target = wide(seed=9)
    before = payloads(target)
    with pytest.raises(CorruptCheckpointError, match="leaf_031/state.pkl"):
        target.restore_from_path(path, filesystem=latency_fs)
    assert payloads(target) == before and target.step == 9


def test_big_files_upload_streamed_and_restore_through_ranged_reads(
    latency_fs: Any, server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptable._storage_concurrent as concurrent_module
    import ckptable._storage_prefetch as prefetch_module

    monkeypatch.setattr(prefetch_module, "SMALL_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(prefetch_module, "RANGE_BYTES", 1 << 20)
    monkeypatch.setattr(concurrent_module, "SPILL_BYTES", 1 << 20)
    adapter = PyArrowStorage if isinstance(latency_fs, _pyarrow_s3()) else FsspecStorage
    monkeypatch.setattr(adapter, "stream_bytes", 1 << 20, raising=False)
    tree = Wide(3)
    rng = np.random.default_rng(5)
    for leaf in tree.leaves.values():
        leaf.payload = rng.random((6 << 20) // 8)  # 6 MiB: six ranges
    path = f"{s3_prefix}/big"
    streamed: list[str] = []
    real_open = adapter.open_write

    def opening(self: Any, target: str) -> Any:
        streamed.append(target)
        return real_open(self, target)

    monkeypatch.setattr(adapter, "open_write", opening)
    server.reset_counts()
    tree.save_to_path(path, filesystem=latency_fs)
    written = server.counts(detail=True)
    # Streamed through the library's own stream: the three big state files only.
    assert sorted(p.rsplit("/", 2)[-2] for p in streamed) == sorted(tree.leaves), streamed
    assert written["GET"] == 0 and written["PUT"] >= 4 * 4, written

    server.reset_counts()
    restored = Wide(3)
    restored.restore_from_path(path, filesystem=latency_fs)
    ranged = [r for r in server.requests() if r.kind == "GET" and "state.pkl" in r.path]
    for leaf, want in zip(restored.leaves.values(), tree.leaves.values(), strict=True):
        assert np.array_equal(leaf.payload, want.payload)
    # Every big state file was read in several ranges, each range once.
    assert len(ranged) >= 3 * 6, [r.path for r in ranged]

    # A damaged range is caught before anything is applied.
    storage, fs_path = resolve_storage(f"{path}/leaf_001/state.pkl", latency_fs)
    data = bytearray(storage.read_bytes(fs_path))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(fs_path, bytes(data))
    target = Wide(3)
    with pytest.raises(CorruptCheckpointError, match="leaf_001/state.pkl"):
        target.restore_from_path(path, filesystem=latency_fs)
    assert all(leaf.payload is None for leaf in target.leaves.values())


def test_msgpack_trees_round_trip_concurrently(latency_fs: Any, s3_prefix: str) -> None:
    tree = wide(seed=6)
    path = f"{s3_prefix}/mp"
    tree.save_to_path(path, filesystem=latency_fs, use_msgpack=True)
    restored = Wide(LEAVES)
    restored.restore_from_path(path, filesystem=latency_fs)
    assert payloads(restored) == payloads(tree)
    assert ckptable.verify_checkpoint(path, filesystem=latency_fs).levels == LEAVES + 1


def test_a_component_restore_reads_only_its_own_subtree(
    latency_fs: Any, server: S3Server, s3_prefix: str
) -> None:
    tree = wide(seed=7)
    path = f"{s3_prefix}/ckpt"
    tree.save_to_path(path, filesystem=latency_fs)
    server.reset_counts()
    target = Wide(LEAVES)
    target.restore_from_path(f"{path}/leaf_005", component="leaf_005", filesystem=latency_fs)
    counts = server.counts()
    assert target.leaves["leaf_005"].payload == tree.leaves["leaf_005"].payload
    assert counts["GET"] <= 8, counts  # the component's own files, not the whole tree


# --------------------------------------------------------------------------- local disk


def test_the_local_disk_keeps_writing_in_the_callers_thread(tmp_path: Path) -> None:
    storage, _ = resolve_storage(str(tmp_path))
    assert io_concurrency(storage) == 1
    with writing_concurrently(storage) as writer:
        # Batched, not concurrent (tests/test_batched_writes.py): no thread pool.
        assert isinstance(writer, BatchedLocalWrites)
    with reading_ahead(storage, str(tmp_path)) as reader:
        assert reader is storage


def test_the_environment_variable_sets_the_concurrency_of_object_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pyarrow_s3: Any, s3_prefix: str
) -> None:
    remote, _ = resolve_storage(s3_prefix, pyarrow_s3)
    assert io_concurrency(remote) == 32
    monkeypatch.setenv("CKPTABLE_IO_CONCURRENCY", "3")
    assert io_concurrency(remote) == 3
    assert io_concurrency(LocalStorage()) == 1  # the local disk stays in order
    for bad in ("0", "many"):
        monkeypatch.setenv("CKPTABLE_IO_CONCURRENCY", bad)
        with pytest.raises(ValueError, match="CKPTABLE_IO_CONCURRENCY"):
            io_concurrency(remote)
    # One at a time, when asked: the same tree comes out.
    monkeypatch.setenv("CKPTABLE_IO_CONCURRENCY", "1")
    with writing_concurrently(remote) as writer:
        assert writer is remote
    tree = wide(seed=8)
    tree.save_to_path(f"{s3_prefix}/one", filesystem=pyarrow_s3)
    restored = Wide(LEAVES)
    restored.restore_from_path(f"{s3_prefix}/one", filesystem=pyarrow_s3)
    assert payloads(restored) == payloads(tree)


# --------------------------------------------------------------------------- units


class Recording(LocalStorage):
    """The local disk, slowed down and watched: what runs at once, in what order."""

    def __init__(self, delay: float = 0.01, fail: str | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.done: list[str] = []

    def _call(self, path: str, call: Any) -> None:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(self.delay)
            if self.fail is not None and path.endswith(self.fail):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            call()
            with self.lock:
                self.done.append(path)
        finally:
            with self.lock:
                self.in_flight -= 1

    def write_bytes(self, path: str, data: bytes) -> None:
        self._call(path, lambda: super(Recording, self).write_bytes(path, data))

    def mkdir(self, path: str) -> None:
        self._call(path, lambda: super(Recording, self).mkdir(path))


def test_writes_wait_for_their_directory_and_reads_wait_for_the_writes(tmp_path: Path) -> None:
    inner = Recording()
    writes = ConcurrentWrites(inner, 8)
    try:
        for d in range(4):
            directory = str(tmp_path / f"d{d}")
            writes.mkdir(directory)
            writes.mkdir(os.path.join(directory, "sub"))
            for f in range(4):
                writes.write_bytes(os.path.join(directory, "sub", f"f{f}"), b"x" * f)
        # A listing sees every write made before it.
        assert sorted(writes.listdir(str(tmp_path))) == ["d0", "d1", "d2", "d3"]
        assert writes.listdir(str(tmp_path / "d3" / "sub")) == dict.fromkeys(
            ["f0", "f1", "f2", "f3"], "file"
        )
        writes.barrier()
    finally:
        writes.abort()
    assert inner.most > 1
    for path in inner.done:  # every file after its directories
        parent = os.path.dirname(path)
        if parent != str(tmp_path):
            assert inner.done.index(parent) < inner.done.index(path)


def test_a_failed_write_cancels_the_rest_and_is_raised_naming_its_file(tmp_path: Path) -> None:
    inner = Recording(delay=0.02, fail="f3")
    writes = ConcurrentWrites(inner, 2)

    def write_all() -> None:
        for f in range(200):
            writes.write_bytes(str(tmp_path / f"f{f}"), b"data")
        writes.barrier()

    with pytest.raises(WriteFailed, match="f3") as caught:
        write_all()
    writes.abort()
    assert isinstance(caught.value.error, OSError) and caught.value.error.errno == errno.ENOSPC
    assert len(inner.done) < 20  # cancelled, not all written
    assert inner.in_flight == 0  # abort waited for the running ones
    with pytest.raises(WriteFailed):
        writes.write_bytes(str(tmp_path / "late"), b"")


def test_memory_waiting_in_the_pool_is_bounded(tmp_path: Path) -> None:
    inner = Recording(delay=0.01)
    writes = ConcurrentWrites(inner, 4, max_pending_bytes=1000)
    seen: list[int] = []
    try:
        for f in range(30):
            writes.write_bytes(str(tmp_path / f"f{f}"), b"x" * 300)
            seen.append(writes._pending_bytes)
        writes.barrier()
    finally:
        writes.abort()
    assert max(seen) <= 1000
    assert all((tmp_path / f"f{f}").stat().st_size == 300 for f in range(30))


def test_a_long_stream_is_written_through_by_the_pool(tmp_path: Path) -> None:
    inner = Recording(delay=0)
    writes = ConcurrentWrites(inner, 4, spill_bytes=1000)
    target = tmp_path / "big"
    pieces = [os.urandom(700) for _ in range(10)]
    try:
        with writes.open_write(str(target)) as stream:
            for piece in pieces:
                stream.write(memoryview(bytearray(piece)))  # a buffer the caller reuses
        with writes.open_write(str(tmp_path / "small")) as stream:
            stream.write(b"tiny")
        writes.barrier()
    finally:
        writes.abort()
    assert target.read_bytes() == b"".join(pieces)
    assert (tmp_path / "small").read_bytes() == b"tiny"
    assert str(tmp_path / "small") in inner.done  # whole, through write_bytes
    assert str(target) not in inner.done  # streamed, through open_write


def test_prefetched_reads_answer_from_one_listing(tmp_path: Path) -> None:
    """Over the fsspec memory filesystem (an FsspecStorage): listing, kinds and sizes
    from one recursive listing; bytes from one fetch; paths outside go to the store."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/prefetch-{uuid.uuid4().hex}"
    fs.pipe({f"{root}/a/x": b"1", f"{root}/a/b/y": b"22", f"{root}/z": b"333"})
    storage, path = resolve_storage(root, fs)
    calls: list[str] = []
    real_read = storage.read_sized  # type: ignore[attr-defined]

    def reading(p: str, size: int) -> bytes:
        calls.append(p)
        return bytes(real_read(p, size))

    storage.read_sized = reading  # type: ignore[attr-defined]
    with reading_ahead(storage, path) as reader:
        assert isinstance(reader, PrefetchedReads)
        assert reader.listdir(path) == {"a": "dir", "z": "file"}
        assert reader.listdir(f"{path}/a") == {"x": "file", "b": "dir"}
        assert reader.kind(f"{path}/a/b") == "dir" and reader.kind(f"{path}/nope") is None
        assert reader.size(f"{path}/z") == 3
        assert reader.read_bytes(f"{path}/a/b/y") == b"22"
        with reader.open_read(f"{path}/z") as stream:
            assert stream.read() == b"333"
        assert reader.read_bytes(f"{path}/z") == b"333"
        # A nested restore of the same tree shares it.
        with reading_ahead(storage, f"{path}/a") as inner:
            assert inner is reader
    assert sorted(calls) == sorted([f"{path}/a/x", f"{path}/a/b/y", f"{path}/z"])


# --------------------------------------------------------------------------- review cases


def test_a_manager_checkpoint_on_s3_gets_its_commit_record_after_its_own_record(
    latency_fs: Any, server: S3Server, s3_prefix: str
) -> None:
    """The root manifest, the commit record, is written once, after every other object:
    also after the files a caller adds to the root (CheckpointManager's record)."""
    from ckptable import CheckpointManager

    manager = CheckpointManager(f"{s3_prefix}/run", filesystem=latency_fs)
    server.reset_counts()
    manager.save(wide(seed=11), step=1)
    puts = [r.path.split("?")[0] for r in server.requests() if r.kind == "PUT"]
    commit = f"checkpoint_000001/{MANIFEST_FILE}"
    root_manifests = [i for i, p in enumerate(puts) if p.endswith(commit)]
    record = [i for i, p in enumerate(puts) if p.endswith("checkpoint_manager.json")]
    assert len(root_manifests) == 1 and len(record) == 1, puts[-5:]
    assert root_manifests[0] == len(puts) - 1 > record[0]
    restored = Wide(LEAVES)
    assert manager.restore_latest(restored) == 1


def test_a_bad_concurrency_setting_loses_no_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = f"memory://bad-setting-{uuid.uuid4().hex}/ckpt"
    tree = wide(seed=12)
    tree.save_to_path(path)
    monkeypatch.setenv("CKPTABLE_IO_CONCURRENCY", "3O")
    with pytest.raises(ValueError, match="CKPTABLE_IO_CONCURRENCY"):
        wide(seed=13).save_to_path(path)
    monkeypatch.delenv("CKPTABLE_IO_CONCURRENCY")
    restored = Wide(LEAVES)
    restored.restore_from_path(path)  # the checkpoint that was there is still there
    assert payloads(restored) == payloads(tree)


def test_a_pyarrow_path_with_a_trailing_slash_restores_and_verifies(tmp_path: Path) -> None:
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem, SubTreeFileSystem

    fs = SubTreeFileSystem(str(tmp_path), PyFileSystem(FSSpecHandler(fsspec.filesystem("file"))))
    assert io_concurrency(resolve_storage("ck", fs)[0]) > 1
    tree = wide(seed=14)
    tree.save_to_path("ck", filesystem=fs)
    restored = Wide(LEAVES)
    restored.restore_from_path("ck/", filesystem=fs)
    assert payloads(restored) == payloads(tree)
    assert ckptable.verify_checkpoint("ck/", filesystem=fs).levels == LEAVES + 1


def test_big_safetensors_states_restore_from_an_object_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The safetensors decoder seeks (header, then data; the check looks at the end)."""
    import ckptable._restore_session as session_module
    import ckptable._storage_prefetch as prefetch_module

    monkeypatch.setattr(prefetch_module, "SMALL_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(prefetch_module, "RANGE_BYTES", 1 << 20)
    # Files over this are verified as the decoder reads them (one pass): 16 MiB at scale.
    monkeypatch.setattr(session_module, "_KEEP_FILE_BYTES", 1 << 20)
    tree = Wide(2)
    rng = np.random.default_rng(15)
    for leaf in tree.leaves.values():
        leaf.payload = rng.random((3 << 20) // 8)
    path = f"memory://st-{uuid.uuid4().hex}/ckpt"
    tree.save_to_path(path, format="safetensors")
    for verify in (True, False):
        restored = Wide(2)
        restored.restore_from_path(path, verify=verify)
        for leaf, want in zip(restored.leaves.values(), tree.leaves.values(), strict=True):
            assert np.array_equal(leaf.payload, want.payload)


def _memory_file(size: int) -> tuple[Any, str, bytes]:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/reader-{uuid.uuid4().hex}"
    data = os.urandom(size)
    fs.pipe({f"{root}/big": data, f"{root}/a/small": b"s" * 50, f"{root}/b/big2": data})
    storage, path = resolve_storage(root, fs)
    return storage, path, data


def test_a_big_file_read_partly_is_read_whole_the_second_time() -> None:
    storage, root, data = _memory_file(2500)
    reader = PrefetchedReads(storage, root, 4, budget=10_000, small=100, range_bytes=1000)
    try:
        with reader.open_read(f"{root}/big") as stream:
            assert stream.read(10) == data[:10]
        assert reader.read_bytes(f"{root}/big") == data
        with reader.open_read(f"{root}/big") as stream:  # and it seeks
            assert stream.seek(0, io.SEEK_END) == len(data)
            assert stream.seek(1200) == 1200 and stream.tell() == 1200
            assert stream.read(600) == data[1200:1800]
            stream.seek(5)
            assert stream.read() == data[5:]
    finally:
        reader.close()


def test_the_prefetch_window_moves_on_and_nothing_is_fetched_twice() -> None:
    storage, root, data = _memory_file(2500)
    fetched: list[tuple[str, int]] = []
    real = storage.read_sized  # type: ignore[attr-defined]
    real_ranged = storage.ranged  # type: ignore[attr-defined]

    def reading(p: str, size: int) -> bytes:
        fetched.append((p, 0))
        return bytes(real(p, size))

    import contextlib

    @contextlib.contextmanager
    def ranged(p: str) -> Iterator[Any]:
        with real_ranged(p) as read_at:
            yield lambda offset, length: (fetched.append((p, offset)), read_at(offset, length))[1]

    storage.read_sized = reading  # type: ignore[attr-defined]
    storage.ranged = ranged  # type: ignore[attr-defined]
    # Room for one big file's first range at a time.
    reader = PrefetchedReads(storage, root, 4, budget=1100, small=100, range_bytes=1000)
    try:
        # The window holds the root's own big file's head and a/small (a level's files
        # come before the levels below it); b/big2's head waits until the window moves
        # on: each range is fetched once, whatever the order the reads come in.
        assert reader.read_bytes(f"{root}/big") == data
        assert reader.read_bytes(f"{root}/b/big2") == data
        assert reader.read_bytes(f"{root}/a/small") == b"s" * 50
        first_pass = [(p.rsplit("/", 1)[1], o) for p, o in fetched]
        # A read that fails midway (of a file read before: not kept, over the budget)
        # gives its budget back.

        def failing_decoder() -> None:
            with reader.open_read(f"{root}/big") as stream:
                stream.read(1)
                raise RuntimeError("the decoder failed")

        with pytest.raises(RuntimeError):
            failing_decoder()
    finally:
        reader.close()
    assert reader._budget == reader._whole_budget - 50  # only the small file is held
    assert len(first_pass) == len(set(first_pass)) == 7, first_pass  # each range once


def test_a_level_s_own_files_are_fetched_before_the_levels_below_it() -> None:
    """The window is planned in the order the restore reads: the root level's small files
    (which sort after its subdirectories by path) are fetched ahead even when the big
    files below fill the window, never fetched one by one when asked."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/order-{uuid.uuid4().hex}"
    big = os.urandom(1000)
    fs.pipe({f"{root}/a/state.pkl": big, f"{root}/b/state.pkl": big,
             f"{root}/metadata.json": b"m" * 40, f"{root}/state.pkl": b"r" * 30})  # fmt: skip
    storage, path = resolve_storage(root, fs)
    fetched: list[str] = []
    real = storage.read_sized  # type: ignore[attr-defined]
    storage.read_sized = lambda p, size: (fetched.append(p), real(p, size))[1]  # type: ignore[attr-defined]
    asked: list[str] = []
    real_open = storage.open_read
    storage.open_read = lambda p: (asked.append(p), real_open(p))[1]  # type: ignore[method-assign]
    # Room for the small files and one big file's first range.
    reader = PrefetchedReads(storage, path, 4, budget=1100, small=100, range_bytes=1000)
    try:
        assert reader.kind(path) == "dir"  # lists the tree and starts the fetches
        assert reader.read_bytes(f"{path}/metadata.json") == b"m" * 40
        assert reader.read_bytes(f"{path}/state.pkl") == b"r" * 30
        assert reader.read_bytes(f"{path}/a/state.pkl") == big
        assert reader.read_bytes(f"{path}/b/state.pkl") == big
    finally:
        reader.close()
    assert asked == []  # nothing read past the prefetch
    assert [p.rsplit("/", 2)[-2:] for p in fetched[:2]] == [
        [path.rsplit("/", 1)[1], "metadata.json"],
        [path.rsplit("/", 1)[1], "state.pkl"],
    ]


def test_a_stream_near_the_memory_bound_does_not_wait_for_itself(tmp_path: Path) -> None:
    inner = Recording(delay=0)
    writes = ConcurrentWrites(inner, 2, max_pending_bytes=100, spill_bytes=95)
    done = threading.Event()

    def save() -> None:
        with writes.open_write(str(tmp_path / "f")) as stream:
            stream.write(b"a" * 60)
            stream.write(b"b" * 60)
        writes.barrier()
        done.set()

    worker = threading.Thread(target=save, daemon=True)
    worker.start()
    worker.join(30)
    writes.abort()
    assert done.is_set()
    assert (tmp_path / "f").read_bytes() == b"a" * 60 + b"b" * 60


def test_the_default_memory_bound_is_a_share_of_the_memory_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptable._memory_budget as budget_module
    from ckptable._storage_concurrent import (
        MAX_PENDING_BYTES,
        MIN_PENDING_BYTES,
        pending_budget,
    )

    for available, expected in [
        (None, MIN_PENDING_BYTES),
        (512 << 20, MIN_PENDING_BYTES),
        (6 << 30, 1536 << 20),
        (64 << 30, MAX_PENDING_BYTES),
    ]:
        monkeypatch.setattr(budget_module, "memory_available", lambda a=available: a)
        assert pending_budget() == expected
        writes = ConcurrentWrites(Recording(delay=0), 2)
        writes.abort()
        assert writes._max_pending == expected


def test_four_big_files_of_a_save_upload_at_once_under_the_default_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four held files of 64 MiB and a little more (a pickle's header), with 4 GiB
    available: each is handed to its upload as it is finished, none waits for another's
    upload to end. (Under the fixed bound of 256 MiB the fourth waited for the first.)"""
    import ckptable._memory_budget as budget_module

    monkeypatch.setattr(budget_module, "memory_available", lambda: 4 << 30)
    size = (64 << 20) + 10
    started = threading.Barrier(4, timeout=20)
    sizes: list[int] = []

    class Uploads(Recording):
        def write_bytes(self, path: str, data: bytes) -> None:
            started.wait()  # broken (raises) unless all four run at once
            sizes.append(len(data))

    chunk = b"x" * (size // 2)
    writes = ConcurrentWrites(Uploads(delay=0), 8, spill_bytes=100 << 20)
    try:
        for f in range(4):
            with writes.open_write(str(tmp_path / f"big{f}")) as stream:
                stream.write(chunk)
                stream.write(chunk)
        writes.barrier()
    finally:
        writes.abort()
    assert sizes == [2 * len(chunk)] * 4


def test_a_held_file_reaches_a_storage_that_takes_bytes_as_bytes(tmp_path: Path) -> None:
    """botocore copies a ``bytearray`` body more than once, so fsspec filesystems get
    ``bytes`` (s3fs itself is sent the held memory through ckptable's own request, see
    ``test_storage_s3fs.py``); another storage gets the held ``bytearray`` itself."""
    import fsspec

    from ckptable._storage_remote import FsspecStorage

    given: list[type] = []

    class Fsspec(FsspecStorage):
        def write_bytes(self, path: str, data: bytes) -> None:
            given.append(type(data))
            super().write_bytes(path, data)

    class Local(Recording):
        def write_bytes(self, path: str, data: bytes) -> None:
            given.append(type(data))
            super().write_bytes(path, data)

    memory = fsspec.filesystem("memory", skip_instance_cache=True)
    for inner, path in ((Fsspec(memory), "/held/f"), (Local(delay=0), str(tmp_path / "f"))):
        writes = ConcurrentWrites(inner, 2, spill_bytes=1 << 20)
        try:
            with writes.open_write(path) as stream:
                stream.write(b"a" * 1000)
                stream.write(memoryview(b"b" * 1000))
            writes.barrier()
        finally:
            writes.abort()
        assert inner.read_bytes(path) == b"a" * 1000 + b"b" * 1000
    assert given == [bytes, bytearray]


def test_an_encoders_own_bytes_are_kept_not_copied(tmp_path: Path) -> None:
    """``write_owned``: a file that is one ``bytes`` of the encoder's (msgpack's
    ``packb``) reaches the storage as that very object; more writes after it, or a file
    past the spill size, still write every byte in order; a discarded one gives its
    pending bytes back."""
    import fsspec

    from ckptable._storage_remote import FsspecStorage

    given: list[Any] = []

    class Fsspec(FsspecStorage):
        def write_bytes(self, path: str, data: bytes) -> None:
            given.append(data)
            super().write_bytes(path, data)

    inner = Fsspec(fsspec.filesystem("memory", skip_instance_cache=True))
    writes = ConcurrentWrites(inner, 2, spill_bytes=1 << 20)
    alone = os.urandom(5000)
    first, more = os.urandom(3000), b"tail"
    big = os.urandom(3 << 20)
    try:
        with writes.open_write("/owned/alone") as stream:
            stream.write_owned(alone)
        with writes.open_write("/owned/more") as stream:
            stream.write_owned(first)
            stream.write(memoryview(more))
            stream.write_owned(more)
        with writes.open_write("/owned/big") as stream:
            stream.write(b"head")
            stream.write_owned(big)
        with writes.open_write("/owned/streamed") as stream:
            stream.write_owned(big)
            stream.write(b"end")
        with pytest.raises(RuntimeError, match="encoder"):
            _write_owned_then_fail(writes, "/owned/dropped", alone)
        writes.barrier()
    finally:
        writes.abort()
    assert given[0] is alone  # the encoder's object itself: no copy
    assert inner.read_bytes("/owned/more") == first + more + more
    assert inner.read_bytes("/owned/big") == b"head" + big
    assert inner.read_bytes("/owned/streamed") == big + b"end"
    assert inner.kind("/owned/dropped") is None
    assert writes._pending_bytes == 0


def _write_owned_then_fail(writes: ConcurrentWrites, path: str, data: bytes) -> None:
    with writes.open_write(path) as stream:
        stream.write_owned(data)  # type: ignore[attr-defined]
        raise RuntimeError("the encoder failed")


def test_a_msgpack_state_s_arrays_reach_the_uploads_from_their_own_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A msgpack state's big array reaches the concurrent writes from the array's
    memory (``write``: one copy, into the held file), not as msgpack's ``bytes`` (which
    held two copies of it before); the checkpoint verifies and restores."""
    import fsspec
    import numpy as np

    from ckptable._storage_concurrent import _SpoolingWriter
    from helpers import StateHolder

    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    base = f"/arrays-{uuid.uuid4().hex}"  # (the memory filesystem is shared by all tests)
    owned: list[bytes] = []
    writes: list[Any] = []
    real_owned, real_write = _SpoolingWriter.write_owned, _SpoolingWriter.write

    def write_owned(self: _SpoolingWriter, data: bytes) -> int:
        owned.append(data)
        return real_owned(self, data)

    def write(self: _SpoolingWriter, data: Any) -> int:
        writes.append(data)
        return real_write(self, data)

    monkeypatch.setattr(_SpoolingWriter, "write_owned", write_owned)
    monkeypatch.setattr(_SpoolingWriter, "write", write)
    weights = np.arange(3 << 20, dtype=np.float32)  # 12 MiB
    StateHolder({"weights": weights}).save_to_path(base, filesystem=fs, use_msgpack=True)
    assert not owned
    from_array = [d for d in writes if isinstance(d, memoryview) and d.obj is not None]
    assert sum(len(d) for d in from_array if np.shares_memory(d.obj, weights)) == 12 << 20
    restored = StateHolder()
    restored.restore_from_path(base, filesystem=fs)
    assert np.array_equal(restored.state["weights"], weights)
