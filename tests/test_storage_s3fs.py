"""s3fs's big-file requests without its copies (``ckptable._storage_s3fs``), on the real
S3 test server (moto), partly behind the 20 ms latency proxy.

What is checked: the bytes (ranges, the object's end, uploads of every kind of buffer);
that neither direction makes a copy of the file (``tracemalloc``, against the copy the
``cat_file``/``pipe_file`` path makes); that a retry after a failure part-way through a
body starts that body again (faults injected by wrapping one call, the only mocks
here); which filesystems get the direct path; and that an ``FsspecStorage`` over s3fs
sends its big files through it and nothing else.
"""

from __future__ import annotations

import gc
import io
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable._storage_remote import FsspecStorage
from ckptable._storage_s3fs import DIRECT_PUT_BYTES, S3Requests, ViewBody, s3_requests
from s3_server import BUCKET, S3Server


def _data(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


@pytest.fixture
def key() -> str:
    return f"{BUCKET}/{uuid.uuid4().hex}/object"


@pytest.fixture
def direct(s3fs_s3: Any) -> S3Requests:
    requests = s3_requests(s3fs_s3)
    assert requests is not None
    return requests


def _peak(run: Any) -> int:
    """The most memory Python allocated (``tracemalloc``) while ``run()`` ran."""
    gc.collect()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _intercept_gets(
    monkeypatch: pytest.MonkeyPatch,
    fs: Any,
    *,
    request: Callable[[dict[str, Any]], None] | None = None,
    response: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Fault injection: ``request`` changes the arguments of each ``get_object`` call
    s3fs makes, ``response`` its response (both in place)."""
    real = fs._call_s3

    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "get_object" and request is not None:
            request(kwargs)
        result = await real(method, *args, **kwargs)
        if method == "get_object" and response is not None:
            response(result)
        return result

    monkeypatch.setattr(fs, "_call_s3", call)


def _without_range(arguments: dict[str, Any]) -> None:
    arguments.pop("Range", None)  # as a store that answers a ranged GET with the object


# --------------------------------------------------------------------------- who gets it


def test_only_a_synchronous_s3fs_filesystem_gets_the_direct_requests(
    s3_server: S3Server, s3fs_s3: Any
) -> None:
    import fsspec

    assert isinstance(s3_requests(s3fs_s3), S3Requests)
    assert s3_requests(fsspec.filesystem("memory", skip_instance_cache=True)) is None
    asynchronous = s3_server.s3fs_filesystem(asynchronous=True, skip_instance_cache=True)
    assert s3_requests(asynchronous) is None

    class Lacking:  # an s3fs-like class without the coroutine layer this needs
        __module__ = "s3fs.core"
        loop = object()

    assert s3_requests(Lacking()) is None
    assert FsspecStorage(s3fs_s3).takes_bytes is False
    assert FsspecStorage(fsspec.filesystem("memory", skip_instance_cache=True)).takes_bytes


# --------------------------------------------------------------------------- reads


def test_read_into_fills_a_range_and_stops_at_the_objects_end(
    direct: S3Requests, s3fs_s3: Any, key: str
) -> None:
    data = _data(3 << 20)
    s3fs_s3.pipe_file(key, data)
    view = memoryview(bytearray(1 << 20))
    assert direct.read_into(key, 12345, view) == len(view)
    assert bytes(view) == data[12345 : 12345 + (1 << 20)]
    tail = memoryview(bytearray(1 << 20))
    start = len(data) - 1000
    assert direct.read_into(key, start, tail) == 1000  # fewer at the end
    assert bytes(tail[:1000]) == data[start:]
    assert bytes(tail[1000:]) == bytes(len(tail) - 1000)  # nothing written past it
    assert direct.read_into(key, 0, memoryview(bytearray())) == 0
    # Into a numpy array's memory, as the restore's file buffers are.
    array = np.zeros(len(data), dtype=np.uint8)
    assert direct.read_into(key, 0, memoryview(array)) == len(data)
    assert array.tobytes() == data
    with pytest.raises(FileNotFoundError):
        direct.read_into(key + "-missing", 0, memoryview(bytearray(10)))


def test_read_into_makes_no_copy_of_the_range(direct: S3Requests, s3fs_s3: Any, key: str) -> None:
    size = 16 << 20
    s3fs_s3.pipe_file(key, _data(size, seed=1))
    target = memoryview(bytearray(size))
    direct_peak = _peak(lambda: direct.read_into(key, 0, target))
    copied_peak = _peak(lambda: s3fs_s3.cat_file(key, start=0, end=size))
    assert copied_peak >= size  # what the fallback allocates, so the measure can see it
    assert direct_peak < 4 << 20, direct_peak


def test_a_read_that_fails_part_way_is_retried_from_the_ranges_start(
    direct: S3Requests, s3fs_s3: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp import ClientPayloadError

    data = _data(4 << 20, seed=2)
    s3fs_s3.pipe_file(key, data)
    broken: list[int] = []

    def break_the_first(response: dict[str, Any]) -> None:
        if broken:
            return
        body = response["Body"]
        readinto = body.readinto

        async def fail_after_a_chunk(buffer: Any) -> int:
            if broken:
                raise ClientPayloadError("injected: the connection dropped")
            broken.append(1)
            n: int = await readinto(memoryview(buffer)[:65536])
            return n

        body.readinto = fail_after_a_chunk

    _intercept_gets(monkeypatch, s3fs_s3, response=break_the_first)
    view = memoryview(bytearray(len(data)))
    view[:] = b"\xaa" * len(data)
    assert direct.read_into(key, 0, view) == len(data)
    assert broken == [1]
    assert bytes(view) == data


def test_a_store_that_ignores_the_range_is_an_error(
    direct: S3Requests, s3fs_s3: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _data(1 << 20, seed=3)
    s3fs_s3.pipe_file(key, data)
    _intercept_gets(monkeypatch, s3fs_s3, request=_without_range)
    with pytest.raises(OSError, match="asked for 1000 bytes from offset 10, the store sent"):
        direct.read_into(key, 10, memoryview(bytearray(1000)))


def test_a_store_that_ignores_the_range_past_the_start_is_an_error(
    direct: S3Requests, s3fs_s3: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the object's start only a partial response holds the range's bytes, even
    where the whole object fits the view."""
    s3fs_s3.pipe_file(key, _data(1000, seed=10))
    _intercept_gets(monkeypatch, s3fs_s3, request=_without_range)
    view = memoryview(bytearray(4000))
    with pytest.raises(OSError, match="from offset 10, the store sent no range"):
        direct.read_into(key, 10, view)


def test_a_body_longer_than_the_range_is_an_error_without_a_length_header(
    direct: S3Requests, s3fs_s3: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _data(1 << 20, seed=11)
    s3fs_s3.pipe_file(key, data)
    # The whole object, and no length to tell.
    _intercept_gets(
        monkeypatch,
        s3fs_s3,
        request=_without_range,
        response=lambda response: response.pop("ContentLength", None),
    )
    with pytest.raises(OSError, match="from offset 0, the store sent more"):
        direct.read_into(key, 0, memoryview(bytearray(1000)))


def test_a_read_that_fills_its_view_still_reads_to_the_bodys_end(
    direct: S3Requests, s3fs_s3: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiobotocore compares a body's length and checksum with the headers when a read
    finds its end: the last read of a range returns nothing."""
    data = _data(2 << 20, seed=12)
    s3fs_s3.pipe_file(key, data)
    reads: list[int] = []

    def watch(response: dict[str, Any]) -> None:
        body = response["Body"]
        readinto = body.readinto

        async def counted(buffer: Any) -> int:
            n: int = await readinto(buffer)
            reads.append(n)
            return n

        body.readinto = counted

    _intercept_gets(monkeypatch, s3fs_s3, response=watch)
    view = memoryview(bytearray(len(data)))
    assert direct.read_into(key, 0, view) == len(data) and bytes(view) == data
    assert reads[-1] == 0 and sum(reads) == len(data)


def test_a_body_without_readinto_is_read_in_chunks(
    direct: S3Requests, s3fs_s3: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiobotocore before 2.23 has no ``readinto``: its ``read`` is used, chunk by chunk,
    with the same result."""
    data = _data((3 << 20) + 5, seed=13)
    s3fs_s3.pipe_file(key, data)
    asked: list[int] = []

    class OldBody:
        def __init__(self, body: Any) -> None:
            self._body = body

        async def read(self, amount: int | None = None) -> bytes:
            asked.append(amount or -1)
            chunk: bytes = await self._body.read(amount)
            return chunk

        def close(self) -> None:
            self._body.close()

    def make_old(response: dict[str, Any]) -> None:
        response["Body"] = OldBody(response["Body"])

    _intercept_gets(monkeypatch, s3fs_s3, response=make_old)
    view = memoryview(bytearray(len(data)))
    assert direct.read_into(key, 0, view) == len(data) and bytes(view) == data
    assert asked and max(asked) <= 1 << 20  # chunks, never the whole range at once
    tail = memoryview(bytearray(100))
    assert direct.read_into(key, len(data) - 40, tail) == 40
    assert bytes(tail[:40]) == data[-40:]


def test_reads_and_uploads_carry_the_filesystems_own_arguments(
    s3_server: S3Server,
) -> None:
    """What s3fs adds to its own calls (``s3_additional_kwargs``, a version id in the
    path of a version-aware filesystem) reaches the direct requests too."""
    bucket = f"versioned-{uuid.uuid4().hex[:12]}"
    client = s3_server.boto3_client()
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    fs = s3_server.s3fs_filesystem(
        version_aware=True,
        s3_additional_kwargs={"ServerSideEncryption": "AES256"},
        skip_instance_cache=True,
    )
    direct = s3_requests(fs)
    assert direct is not None
    path = f"{bucket}/object"
    first, second = _data(DIRECT_PUT_BYTES, seed=14), _data(DIRECT_PUT_BYTES, seed=15)
    direct.put(path, bytearray(first))
    direct.put(path, bytearray(second))
    head = client.head_object(Bucket=bucket, Key="object")
    assert head["ServerSideEncryption"] == "AES256"
    versions = client.list_object_versions(Bucket=bucket, Prefix="object")["Versions"]
    assert len(versions) == 2
    (oldest,) = [v["VersionId"] for v in versions if not v["IsLatest"]]
    view = memoryview(bytearray(1000))
    assert direct.read_into(f"{path}?versionId={oldest}", 100, view) == 1000
    assert bytes(view) == first[100:1100]
    assert direct.read_into(path, 100, view) == 1000 and bytes(view) == second[100:1100]


# --------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "numpy"])
def test_put_stores_any_buffer_whole(direct: S3Requests, s3fs_s3: Any, key: str, kind: str) -> None:
    data = _data((2 << 20) + 7, seed=4)
    buffer: Any = {
        "bytes": lambda: data,
        "bytearray": lambda: bytearray(data),
        "memoryview": lambda: memoryview(bytearray(data)),
        "numpy": lambda: np.frombuffer(data, dtype=np.uint8).copy(),
    }[kind]()
    parent = key.rsplit("/", 1)[0]
    s3fs_s3.pipe_file(f"{parent}/other", b"x")
    s3fs_s3.ls(parent)  # now in s3fs's listing cache, without the object
    direct.put(key, buffer)
    assert s3fs_s3.cat_file(key) == data
    assert s3fs_s3.size(key) == len(data)  # s3fs's listing cache was told


def test_put_makes_no_copy_of_the_file(direct: S3Requests, s3fs_s3: Any, key: str) -> None:
    size = 16 << 20
    held = bytearray(_data(size, seed=5))
    direct_peak = _peak(lambda: direct.put(key, held))
    copied_peak = _peak(lambda: s3fs_s3.pipe_file(key + "-copied", bytes(held)))
    assert copied_peak >= size
    assert direct_peak < 4 << 20, direct_peak
    assert s3fs_s3.cat_file(key) == bytes(held)


def test_an_upload_that_fails_part_way_is_retried_with_its_body_from_the_start(
    direct: S3Requests, s3fs_s3: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3fs's own retries resend the same body object, left where the failed attempt
    stopped reading it; each attempt here has a fresh one, so the object is whole."""
    from botocore.exceptions import HTTPClientError

    data = _data(3 << 20, seed=6)
    real_get_s3 = s3fs_s3.get_s3
    failed: list[int] = []

    async def get_s3(bucket: Any = None) -> Any:
        client = await real_get_s3(bucket)
        real_put = client.put_object

        async def put_object(**kwargs: Any) -> Any:
            if not failed:
                failed.append(len(kwargs["Body"].read(1 << 20)))  # part sent, then lost
                raise HTTPClientError(error="injected: the connection dropped")
            return await real_put(**kwargs)

        monkeypatch.setattr(client, "put_object", put_object)
        return client

    monkeypatch.setattr(s3fs_s3, "get_s3", get_s3)
    try:
        direct.put(key, bytearray(data))
    finally:
        monkeypatch.undo()
    assert failed == [1 << 20]
    assert s3fs_s3.cat_file(key) == data


def test_an_upload_refused_by_the_store_raises_s3fs_error(direct: S3Requests, s3fs_s3: Any) -> None:
    with pytest.raises(FileNotFoundError):
        direct.put(f"no-such-bucket-{uuid.uuid4().hex[:8]}/x", bytearray(DIRECT_PUT_BYTES))


def test_the_view_body_reads_seeks_and_rewinds_like_a_file() -> None:
    data = bytes(range(256)) * 10
    body = ViewBody(memoryview(data))
    assert len(body) == len(data) and body.seekable() and body.readable()
    assert body.read(10) == data[:10] and body.tell() == 10
    target = bytearray(20)
    assert body.readinto(target) == 20 and bytes(target) == data[10:30]
    assert body.seek(-5, io.SEEK_END) == len(data) - 5
    assert body.read() == data[-5:] and body.read(3) == b""
    assert body.readinto(bytearray(4)) == 0
    assert body.seek(0) == 0 and body.read() == data
    assert body.seek(7) == 7 and body.seek(3, io.SEEK_CUR) == 10 and body.read(2) == data[10:12]
    assert body.seek(len(data) + 10) == len(data) + 10 and body.read() == b""
    with pytest.raises(ValueError, match="negative seek position"):
        body.seek(-1)
    with pytest.raises(ValueError, match="invalid whence"):
        body.seek(0, 7)


# --------------------------------------------------------------------------- the storage


def test_an_s3fs_storage_sends_big_files_directly_and_small_ones_as_before(
    s3fs_s3: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FsspecStorage(s3fs_s3)
    assert storage._s3 is not None
    used: list[str] = []
    monkeypatch.setattr(S3Requests, "put", _recording(S3Requests.put, used, "put"))
    monkeypatch.setattr(S3Requests, "read_into", _recording(S3Requests.read_into, used, "get"))
    monkeypatch.setattr(s3fs_s3, "pipe_file", _recording(s3fs_s3.pipe_file, used, "pipe"))

    big = bytearray(_data(DIRECT_PUT_BYTES, seed=7))
    storage.write_bytes(key, big)  # type: ignore[arg-type]
    storage.write_bytes(key + "-small", bytearray(b"small"))  # type: ignore[arg-type]
    storage.write_bytes(key + "-bytes", b"bytes")
    assert used == ["put", "pipe", "pipe"]
    assert storage.read_bytes(key) == bytes(big)
    assert storage.read_bytes(key + "-small") == b"small"

    # Above what the storage sends in one request (two of s3fs's chunks; the
    # concurrent writes stream longer files as multipart uploads) it is s3fs's call.
    used.clear()
    monkeypatch.setattr(s3fs_s3, "default_block_size", 1 << 20)
    assert storage.stream_bytes == (2 << 20) - 1
    storage.write_bytes(key + "-long", bytearray(_data(3 << 20, seed=8)))  # type: ignore[arg-type]
    assert used == ["pipe"]

    used.clear()
    with storage.ranged_into(key) as read_into:
        view = memoryview(bytearray(1000))
        assert read_into(500, view) == 1000
    assert used == ["get"] and bytes(view) == bytes(big[500:1500])


def _recording(function: Any, calls: list[str], name: str) -> Any:
    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return function(*args, **kwargs)

    return record


def test_a_checkpoint_of_big_arrays_round_trips_through_s3fs_with_latency(
    s3fs_s3_latency: Any, s3_latency_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save and restore of big arrays over s3fs send and fetch each big file through
    the direct requests, once, and a damaged byte is still caught."""

    class Model(ckptable.Checkpointable):
        def __init__(self) -> None:
            self.weights: dict[str, np.ndarray] = {}

        def get_state(
            self, components: Any = None, *, not_components: Any = None, **kw: Any
        ) -> Any:
            return dict(self.weights)

        def set_state(self, state: Any) -> None:
            self.weights = dict(state)

        def get_ctor_args_and_kwargs(self) -> Any:
            return (), {}

    used: list[str] = []
    monkeypatch.setattr(S3Requests, "put", _recording(S3Requests.put, used, "put"))
    monkeypatch.setattr(S3Requests, "read_into", _recording(S3Requests.read_into, used, "get"))
    model = Model()
    rng = np.random.default_rng(9)
    # 24 MiB in one state file: a big file for the restore (files to 16 MiB come whole).
    model.weights = {f"w{i}": rng.random((8 << 20) // 8) for i in range(3)}
    path = f"s3://{BUCKET}/{uuid.uuid4().hex}/model"
    model.save_to_path(path, filesystem=s3fs_s3_latency)
    assert used.count("put") == 1  # the one state file; the small files as before
    used.clear()
    restored = Model()
    restored.restore_from_path(path, filesystem=s3fs_s3_latency)
    assert used and set(used) == {"get"}
    for name, array in model.weights.items():
        assert np.array_equal(restored.weights[name], array)
        assert restored.weights[name].flags.writeable

    state = f"{path[len('s3://') :]}/state.pkl"
    damaged = bytearray(s3fs_s3_latency.cat_file(state))
    damaged[len(damaged) // 2] ^= 0x10
    s3fs_s3_latency.pipe_file(state, bytes(damaged))
    target = Model()
    with pytest.raises(ckptable.CorruptCheckpointError, match="state.pkl"):
        target.restore_from_path(path, filesystem=s3fs_s3_latency)
    assert target.weights == {}
