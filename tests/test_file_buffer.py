"""Big files of a restore from an object store, fetched whole into memory their arrays
keep (``_storage_filebuffer``), and the check that each payload handed out as a view
became an array (``_buffer_views``).

The unit tests drive :class:`FileBuffer` over an in-memory "store" that fills ranges
from a thread pool (and can fail or come back short). The end-to-end tests restore big
arrays from the S3 test server behind the 20 ms latency proxy with both client
libraries: the arrays are the downloaded memory (no copy), aligned and writable; a big
``bytearray`` value comes back a ``bytearray``; a damaged byte is caught before anything
is applied.
"""

from __future__ import annotations

import ctypes
import io
import pickle
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable import CorruptCheckpointError
from ckptable._buffer_views import decode_with_views, is_view
from ckptable._parallel_read import PAYLOAD_ALIGNMENT
from ckptable._pickle_scan import ScannedPickle, scan_pickle
from ckptable._safe_unpickler import safe_pickle_load
from ckptable._storage import resolve_storage
from ckptable._storage_filebuffer import BufferReader, FileBuffer, copy_into
from ckptable._storage_prefetch import PrefetchedReads
from ckptable._torch import TensorUnpickler
from ckptable._torch_placement import TensorPlacement
from s3_server import S3Server

MIB = 1 << 20


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(4)
    yield executor
    executor.shutdown(wait=True)


def fetched(
    pool: ThreadPoolExecutor,
    data: bytes,
    range_bytes: int,
    *,
    fail_at: int | None = None,
    short_at: int | None = None,
    gate: threading.Event | None = None,
) -> FileBuffer:
    """``data`` fetched into a :class:`FileBuffer` in ranges of ``range_bytes``: the
    range at ``fail_at`` raises, the one at ``short_at`` comes back half full; every
    range waits for ``gate`` if given."""
    ranges = [(o, min(range_bytes, len(data) - o)) for o in range(0, len(data), range_bytes)]

    def read_into(offset: int, view: memoryview) -> int:
        if gate is not None:
            assert gate.wait(30)
        if offset == fail_at:
            raise OSError(f"range at {offset} failed")
        part = data[offset : offset + len(view)]
        if offset == short_at:
            part = part[: len(part) // 2]
        return copy_into(view, part)

    def submit(offset: int, view: memoryview) -> Future[int]:
        return pool.submit(read_into, offset, view)

    return FileBuffer(len(data), ranges, submit)


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_reader_reads_and_seeks_over_the_ranges(pool: ThreadPoolExecutor) -> None:
    data = np.random.default_rng(0).bytes(10_000)
    reader = BufferReader(fetched(pool, data, 1000))
    assert reader.read(10) == data[:10]
    assert reader.read(2500) == data[10:2510]  # across ranges
    assert reader.seek(0, io.SEEK_END) == len(data)
    assert reader.read() == b""
    reader.seek(-3, io.SEEK_END)
    assert reader.read() == data[-3:]
    reader.seek(4321)
    assert reader.tell() == 4321 and reader.read() == data[4321:]
    reader.seek(0)
    assert reader.readall() == data


def test_payloads_are_aligned_writable_views_of_the_fetched_memory(
    pool: ThreadPoolExecutor,
) -> None:
    data = np.random.default_rng(1).bytes(3 * MIB)
    buffer = fetched(pool, data, MIB // 3)
    reader = BufferReader(buffer)
    assert reader.read(71) == data[:71]  # a payload at 71: not aligned where it landed
    first = reader.payload_view(MIB)
    assert first is not None and not first.readonly
    assert address(first) % PAYLOAD_ALIGNMENT == 0
    assert first.obj is buffer._view.obj  # the fetched memory itself, not a copy
    assert bytes(first) == data[71 : 71 + MIB]
    # The bytes after it are the file's still; the next payload starts 9 bytes on.
    assert reader.read(9) == data[71 + MIB : 80 + MIB]
    second = reader.payload_view(MIB)
    assert second is not None and address(second) % PAYLOAD_ALIGNMENT == 0
    assert bytes(second) == data[80 + MIB : 80 + 2 * MIB]
    assert bytes(first) == data[71 : 71 + MIB]  # moving the second left the first alone
    first[0] ^= 0xFF  # writable
    assert reader.read() == data[80 + 2 * MIB :]
    assert buffer.handed_out


def test_a_payload_that_would_move_over_the_previous_one_is_not_handed_out(
    pool: ThreadPoolExecutor,
) -> None:
    data = np.random.default_rng(2).bytes(2 * MIB)
    buffer = fetched(pool, data, MIB)
    reader = BufferReader(buffer)
    first = reader.payload_view(1000)  # at 0: aligned where it landed
    assert first is not None and address(first) % PAYLOAD_ALIGNMENT == 0
    # Right behind it, 1000 bytes on (40 past a boundary): aligning it would move it
    # over the end of the first payload.
    assert reader.payload_view(1000) is None
    assert reader.tell() == 1000  # nothing moved
    assert bytes(first) == data[:1000]
    assert reader.read(1000) == data[1000:2000]  # the caller copies it instead


def test_a_failed_range_raises_where_the_reader_reaches_it(pool: ThreadPoolExecutor) -> None:
    data = bytes(range(256)) * 40
    reader = BufferReader(fetched(pool, data, 1000, fail_at=3000))
    assert reader.read(3000) == data[:3000]
    with pytest.raises(OSError, match="range at 3000 failed"):
        reader.read(10)
    with pytest.raises(OSError, match="range at 3000 failed"):
        reader.payload_view(2000)


def test_a_file_shorter_than_listed_ends_where_its_bytes_do(pool: ThreadPoolExecutor) -> None:
    data = bytes(range(256)) * 40
    reader = BufferReader(fetched(pool, data, 1000, short_at=2000))
    assert reader.payload_view(4000) is None  # not all there: nothing handed out
    assert reader.read() == data[:2500]
    assert reader.read() == b""


def test_the_reader_waits_for_its_ranges(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    data = bytes(range(256)) * 8
    reader = BufferReader(fetched(pool, data, 512, gate=gate))
    got: list[bytes] = []
    worker = threading.Thread(target=lambda: got.append(reader.read(2048)))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive() and not got
    gate.set()
    worker.join(30)
    assert got == [data]


# --------------------------------------------------------------------------- decoding


def _scanned(obj: Any) -> ScannedPickle:
    """``obj`` pickled as ckptable saves it (protocol 5, in band) and walked: its big
    payloads in buffers of their own, the skeleton with ``NEXT_BUFFER`` in their place."""
    data = pickle.dumps(obj, protocol=5)
    walked = scan_pickle(io.BytesIO(data), "read", size=len(data))
    assert walked is not None
    return walked


def _decoder(walked: ScannedPickle, decodes: list[list[Any]], safe: bool) -> Any:
    def decode(buffers: list[Any]) -> Any:
        decodes.append(buffers)
        if safe:
            return safe_pickle_load(walked.open(), source="test", buffers=iter(buffers))
        return TensorUnpickler(
            walked.open(), placement=TensorPlacement(), buffers=iter(buffers)
        ).load()

    return decode


@pytest.mark.parametrize("safe", [False, True])
def test_views_that_became_arrays_are_kept_and_a_bytearray_value_is_copied(safe: bool) -> None:
    array = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: a payload of its own
    value = bytearray(b"x" * (2 << 20))
    walked = _scanned({"a": array, "b": value})
    # Writable views of memory of their own (kept between restores), as a file fetched
    # whole gives them too.
    views = walked.buffers
    assert [is_view(b) for b in views] == [True, True]
    decodes: list[list[Any]] = []
    state = decode_with_views(_decoder(walked, decodes, safe), views)
    assert len(decodes) == 2  # the bytearray value did not go to numpy: decoded again
    assert type(state["b"]) is bytearray and state["b"] == value
    assert np.array_equal(state["a"], array)

    walked = _scanned({"a": array, "c": array[::2].copy()})
    views = walked.buffers
    decodes.clear()
    state = decode_with_views(_decoder(walked, decodes, safe), views)
    assert len(decodes) == 1  # numpy took both views: decoded once, no copies
    assert np.array_equal(state["a"], array) and np.array_equal(state["c"], array[::2])
    assert np.shares_memory(state["a"], np.asarray(views[0]))
    assert np.shares_memory(state["c"], np.asarray(views[1]))


# --------------------------------------------------------------------------- end to end


class Holder(ckptable.Checkpointable):
    def __init__(self) -> None:
        self.value: Any = None

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"value": self.value}

    def set_state(self, state: dict[str, Any]) -> None:
        self.value = state["value"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {}


class Pair(ckptable.Checkpointable):
    def __init__(self) -> None:
        self.left, self.right = Holder(), Holder()

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        state: dict[str, Any] = {}
        for name in ("left", "right"):
            if self._check_component(name, components, not_components):
                state[name] = getattr(self, name).get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        for name in ("left", "right"):
            if name in state:
                getattr(self, name).set_state(state[name])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {}

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("left", self.left), ("right", self.right)]


@pytest.fixture(params=["pyarrow", "s3fs"])
def latency_fs(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_s3_latency")


def _fetched_whole(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Files over 1 MiB are big (fetched whole, ranges of 1 MiB; verified as they are
    walked, not kept as bytes); returns the list of those the prefetch fetches whole."""
    import ckptable._restore_session as session_module
    import ckptable._storage_prefetch as prefetch_module

    monkeypatch.setattr(prefetch_module, "SMALL_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(prefetch_module, "RANGE_BYTES", 1 << 20)
    monkeypatch.setattr(session_module, "_KEEP_FILE_BYTES", 1 << 20)
    whole: list[str] = []
    real = PrefetchedReads._fetch_whole

    def fetch_whole(self: PrefetchedReads, path: str, size: int) -> FileBuffer:
        whole.append(path)
        return real(self, path, size)

    monkeypatch.setattr(PrefetchedReads, "_fetch_whole", fetch_whole)
    return whole


@pytest.mark.parametrize("safe", [False, True])
def test_big_arrays_restore_as_the_downloaded_memory(
    latency_fs: Any, s3_prefix: str, monkeypatch: pytest.MonkeyPatch, safe: bool
) -> None:
    whole = _fetched_whole(monkeypatch)
    rng = np.random.default_rng(3)
    tree = Pair()
    tree.left.value = {
        "w": rng.random((3 << 20) // 8),
        "b": rng.random((2 << 20) // 4).astype(np.float32),
    }
    tree.right.value = rng.integers(0, 255, 5 << 20, dtype=np.uint8)
    path = f"{s3_prefix}/views-{safe}"
    tree.save_to_path(path, filesystem=latency_fs)
    restored = Pair()
    restored.restore_from_path(path, filesystem=latency_fs, safe=safe)
    assert sorted(p.rsplit("/", 2)[-2] for p in whole) == ["left", "right"]
    arrays = [restored.left.value["w"], restored.left.value["b"], restored.right.value]
    for got, want in zip(
        arrays, [tree.left.value["w"], tree.left.value["b"], tree.right.value], strict=True
    ):
        assert np.array_equal(got, want)
        assert got.flags.writeable and got.flags.aligned
        assert got.ctypes.data % PAYLOAD_ALIGNMENT == 0
        # The array's memory is the downloaded file's (a view of it), not a copy.
        assert isinstance(_memory_of(got), ctypes.Array)  # a block of the payload pool
    # The two payloads of one file share the file's memory.
    assert _memory_of(arrays[0]) is _memory_of(arrays[1])
    assert _memory_of(arrays[0]) is not _memory_of(arrays[2])


def _memory_of(array: np.ndarray) -> Any:
    """What an array's memory belongs to, past the views in between."""
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_a_big_bytearray_value_restores_as_a_bytearray(
    latency_fs: Any, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _fetched_whole(monkeypatch)
    tree = Pair()
    tree.left.value = bytearray(np.random.default_rng(4).bytes(3 << 20))
    tree.right.value = [np.arange(1 << 18, dtype=np.float64), bytearray(b"y" * (2 << 20))]
    path = f"{s3_prefix}/bytearray-{uuid.uuid4().hex}"
    tree.save_to_path(path, filesystem=latency_fs)
    for safe in (False, True):
        restored = Pair()
        restored.restore_from_path(path, filesystem=latency_fs, safe=safe)
        assert type(restored.left.value) is bytearray and restored.left.value == tree.left.value
        array, value = restored.right.value
        assert type(value) is bytearray and value == tree.right.value[1]
        assert np.array_equal(array, tree.right.value[0])
    assert len(whole) == 4


def test_a_damaged_byte_in_a_file_fetched_whole_applies_nothing(
    latency_fs: Any, s3_prefix: str, server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _fetched_whole(monkeypatch)
    tree = Pair()
    tree.left.value = np.random.default_rng(5).random((4 << 20) // 8)
    tree.right.value = np.random.default_rng(6).random((4 << 20) // 8)
    path = f"{s3_prefix}/damaged-{uuid.uuid4().hex}"
    tree.save_to_path(path, filesystem=latency_fs)
    storage, fs_path = resolve_storage(f"{path}/right/state.pkl", latency_fs)
    data = bytearray(storage.read_bytes(fs_path))
    data[len(data) // 2] ^= 0x01  # inside the payload, which is handed out as a view
    storage.write_bytes(fs_path, bytes(data))
    target = Pair()
    with pytest.raises(CorruptCheckpointError, match="right/state.pkl"):
        target.restore_from_path(path, filesystem=latency_fs)
    assert target.left.value is None and target.right.value is None
    assert any(p.endswith("right/state.pkl") for p in whole)


@pytest.fixture
def server(s3_latency_server: S3Server) -> S3Server:
    s3_latency_server.reset_counts()
    return s3_latency_server


@pytest.mark.parametrize("verify", [True, False])
def test_a_big_msgpack_state_is_decoded_from_the_downloaded_memory(
    latency_fs: Any, s3_prefix: str, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    import ckptable._formats as formats_module

    whole = _fetched_whole(monkeypatch)
    given: list[Any] = []
    real_read_whole = formats_module._read_whole

    def read_whole(stream: Any) -> Any:
        given.append(real_read_whole(stream))
        return given[-1]

    monkeypatch.setattr(formats_module, "_read_whole", read_whole)
    tree = Pair()
    tree.left.value = {"w": np.random.default_rng(7).random((3 << 20) // 8), "n": 3}
    tree.right.value = np.arange(1 << 19, dtype=np.int32)
    path = f"{s3_prefix}/mp-{uuid.uuid4().hex}"
    tree.save_to_path(path, filesystem=latency_fs, use_msgpack=True)
    restored = Pair()
    restored.restore_from_path(path, filesystem=latency_fs, verify=verify)
    assert np.array_equal(restored.left.value["w"], tree.left.value["w"])
    assert restored.left.value["n"] == 3
    assert np.array_equal(restored.right.value, tree.right.value)
    assert sorted(p.rsplit("/", 2)[-2] for p in whole) == ["left", "right"]
    # Both big states reached msgpack as views of the memory they were fetched into.
    big = [view for view in given if isinstance(view, memoryview) and len(view) > 1 << 20]
    assert len(big) == 2 and all(isinstance(view.obj, ctypes.Array) for view in big)
    # And the arrays are that memory: aligned, writable, not msgpack's copies.
    for array in (restored.left.value["w"], restored.right.value):
        assert array.flags.writeable and array.ctypes.data % PAYLOAD_ALIGNMENT == 0
        assert any(array.base is view.obj for view in big)


def test_a_damaged_big_msgpack_state_applies_nothing(
    latency_fs: Any, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fetched_whole(monkeypatch)
    tree = Pair()
    tree.left.value = np.random.default_rng(8).random((3 << 20) // 8)
    tree.right.value = np.random.default_rng(9).random((3 << 20) // 8)
    path = f"{s3_prefix}/mp-damaged-{uuid.uuid4().hex}"
    tree.save_to_path(path, filesystem=latency_fs, use_msgpack=True)
    storage, fs_path = resolve_storage(f"{path}/left/state.msgpack", latency_fs)
    data = bytearray(storage.read_bytes(fs_path))
    data[len(data) // 2] ^= 0x04
    storage.write_bytes(fs_path, bytes(data))
    target = Pair()
    with pytest.raises(CorruptCheckpointError, match="left/state.msgpack"):
        target.restore_from_path(path, filesystem=latency_fs)
    assert target.left.value is None and target.right.value is None


@pytest.mark.parametrize("use_msgpack", [False, True])
def test_files_fetched_whole_count_every_byte_once_in_the_progress_bar(
    latency_fs: Any, s3_prefix: str, monkeypatch: pytest.MonkeyPatch, use_msgpack: bool
) -> None:
    import tqdm

    _fetched_whole(monkeypatch)
    closed: list[tuple[Any, int, Any]] = []
    close = tqdm.tqdm.close

    def recording_close(self: Any) -> None:
        if not getattr(self, "disable", True):
            closed.append((self.desc, self.n, self.total))
        close(self)

    monkeypatch.setattr(tqdm.tqdm, "close", recording_close)
    tree = Pair()
    tree.left.value = np.random.default_rng(10).random((3 << 20) // 8)
    tree.right.value = {"a": np.ones(1 << 18), "b": np.zeros(1 << 18)}
    path = f"{s3_prefix}/progress-{uuid.uuid4().hex}"
    tree.save_to_path(path, filesystem=latency_fs, use_msgpack=use_msgpack, progress=False)
    size = ckptable.verify_checkpoint(path, filesystem=latency_fs, progress=False).bytes
    Pair().restore_from_path(path, filesystem=latency_fs, progress=True)
    assert closed == [("Restoring", size, size)]
    closed.clear()
    Pair().restore_from_path(path, filesystem=latency_fs, progress=True, verify=False)
    states = sum(
        n for p, kind, n in resolve_storage(path, latency_fs)[0].list_tree(  # type: ignore[attr-defined]
            resolve_storage(path, latency_fs)[1]
        ) if kind == "file" and "/state." in p
    )  # fmt: skip
    assert closed[0][0] == "Restoring" and closed[0][2] is None
    assert states <= closed[0][1] <= size


# --------------------------------------------------------------------------- budget


def _cgroup(tmp_path: Path, groups: str, files: dict[str, str]) -> tuple[str, str]:
    tmp_path.mkdir()
    (tmp_path / "cgroup").write_text(groups)
    for name, text in files.items():
        target = tmp_path / "fs" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return str(tmp_path / "cgroup"), str(tmp_path / "fs")


def test_the_prefetch_budget_stays_within_a_container_s_memory_limit(tmp_path: Path) -> None:
    from ckptable._memory_budget import cgroup_memory_left

    v2 = _cgroup(tmp_path / "v2", "0::/pod/app\n", {
        "pod/app/memory.max": "2147483648\n", "pod/app/memory.current": "536870912\n",
    })  # fmt: skip
    assert cgroup_memory_left(*v2) == 1536 << 20
    unlimited = _cgroup(tmp_path / "max", "0::/x\n", {
        "x/memory.max": "max\n", "x/memory.current": "5\n",
    })  # fmt: skip
    assert cgroup_memory_left(*unlimited) is None
    v1 = _cgroup(tmp_path / "v1", "4:memory:/job\n1:cpu:/\n", {
        "memory/job/memory.limit_in_bytes": str(1 << 30),
        "memory/job/memory.usage_in_bytes": str(1 << 29),
    })  # fmt: skip
    assert cgroup_memory_left(*v1) == 1 << 29
    assert cgroup_memory_left(str(tmp_path / "none"), str(tmp_path)) is None


def needs_a_bytearray(data: Any) -> bytes:
    """A reconstructor that takes only a ``bytearray`` (as some libraries' are)."""
    if type(data) is not bytearray:
        raise TypeError(f"a bytearray, not a {type(data).__name__}")
    return bytes(data[:4])


class _Reduced:
    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return needs_a_bytearray, (self.data,)


def test_a_reconstructor_that_refuses_a_view_gets_a_bytearray() -> None:
    walked = _scanned({"x": _Reduced(bytearray(b"abcd" * (1 << 19))), "a": np.arange(1 << 18)})
    decodes: list[list[Any]] = []
    state = decode_with_views(_decoder(walked, decodes, False), walked.buffers)
    assert len(decodes) == 2  # the first failed: decoded again with bytearrays
    assert state["x"] == b"abcd" and np.array_equal(state["a"], np.arange(1 << 18))
