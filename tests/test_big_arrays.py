"""Big arrays: one verified read into their final memory, and ``mmap=True``.

A verified restore reads each big pickle file once (counted with the kernel's own
``rchar`` in ``/proc/self/io``), with the arrays' bytes read straight into the memory the
arrays keep (``tracemalloc`` peak), and nothing is unpickled before the whole file has
matched its checksum. ``mmap=True`` maps the arrays instead of reading them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pyarrow.fs
import pytest

import ckptable
from ckptable import Checkpointable, CorruptCheckpointError, verify_checkpoint
from ckptable._manifest import MANIFEST_FILE
from ckptable._pickle_scan import PAYLOAD_MIN_BYTES, ScanError, scan_pickle
from helpers import StateHolder, assert_states_equal, record_preads

MiB = 1 << 20


#: A state of a few big arrays and some small values.
Arrays = StateHolder


class Holder(Checkpointable):
    """A parent with an ``Arrays`` component, to restore big levels below the root."""

    def __init__(self) -> None:
        self.arrays = Arrays()
        self.step = 0

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("arrays", self.arrays)]

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = state["step"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


def big_state(mib: int = 8) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    n = mib * MiB // 8
    readonly = rng.random(MiB // 4, dtype=np.float32)
    readonly.flags.writeable = False
    return {
        "float64": rng.random(n),
        "int8_fortran": np.asfortranarray(rng.integers(-100, 100, (1024, 2048), dtype=np.int8)),
        "strided": rng.random((2048, 256))[:, ::2],  # not contiguous: pickled by copy
        "readonly": readonly,
        "bytes": bytes(rng.integers(0, 256, 2 * MiB, dtype=np.uint8)),
        "bytearray": bytearray(rng.integers(0, 256, 2 * MiB, dtype=np.uint8)),
        "text": "x" * (2 * MiB),
        "small": np.arange(10),
        "nested": {"list": [1, 2.5, "three"], "big": rng.random(MiB // 8 + 1)},
    }


def bytes_read() -> int:
    """Bytes this process read with read(2)-like calls so far (page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    state = big_state()
    Arrays(state).save_to_path(tmp_path / "ckpt")
    return tmp_path / "ckpt", state


def test_big_states_round_trip_with_their_types(saved: tuple[Path, dict[str, Any]]) -> None:
    path, state = saved
    restored = Arrays()
    restored.restore_from_path(path)

    assert_states_equal(restored.state, state, same_types=True)
    assert restored.state["float64"].flags.writeable  # as pickle.load gives them
    assert not restored.state["readonly"].flags.writeable
    assert restored.state["int8_fortran"].flags.f_contiguous
    # A payload read into uninitialised memory is still a plain, resizable bytearray.
    restored.state["bytearray"].extend(b"more")
    assert restored.state["bytearray"][:-4] == state["bytearray"]


def test_a_verified_restore_reads_a_big_file_once(saved: tuple[Path, dict[str, Any]]) -> None:
    path, _ = saved
    size = (path / "state.pkl").stat().st_size
    Arrays().restore_from_path(path)  # warm the page cache and the imports

    before = bytes_read()
    Arrays().restore_from_path(path)
    read = bytes_read() - before

    assert size <= read < size * 1.1


@pytest.mark.parametrize("safe", [False, True])
def test_a_verified_msgpack_restore_reads_a_big_file_once(tmp_path: Path, safe: bool) -> None:
    """msgpack decodes from the whole file in memory: the bytes the verification read are
    decoded, not read again (on an object store, a second download)."""
    state = {"weights": np.random.default_rng(3).random(3 * MiB), "step": 7}  # 24 MiB
    Arrays(state).save_to_path(tmp_path / "ckpt", format="msgpack")
    size = (tmp_path / "ckpt" / "state.msgpack").stat().st_size
    Arrays().restore_from_path(tmp_path / "ckpt", safe=safe)  # the page cache, the imports

    before = bytes_read()
    restored = Arrays()
    restored.restore_from_path(tmp_path / "ckpt", safe=safe)
    read = bytes_read() - before

    assert size <= read < size * 1.1
    np.testing.assert_array_equal(restored.state["weights"], state["weights"])
    assert restored.state["step"] == 7


@pytest.mark.parametrize(
    ("damage", "says"),
    [("flip", "is corrupt"), ("truncate", "truncated"), ("append", "altered")],
)
def test_a_damaged_big_msgpack_file_is_refused_and_nothing_applied(
    tmp_path: Path, damage: str, says: str
) -> None:
    state = {"weights": np.random.default_rng(4).random(3 * MiB)}  # 24 MiB, read whole
    Arrays(state).save_to_path(tmp_path / "ckpt", format="msgpack")
    file = tmp_path / "ckpt" / "state.msgpack"
    size = file.stat().st_size
    if damage == "flip":
        with open(file, "r+b") as stream:
            stream.seek(size // 3)
            byte = stream.read(1)
            stream.seek(size // 3)
            stream.write(bytes([byte[0] ^ 1]))
    elif damage == "truncate":
        os.truncate(file, size - 1)
    else:
        with open(file, "ab") as stream:
            stream.write(b"\0")
    target = Arrays({"untouched": 1})
    with pytest.raises(CorruptCheckpointError, match=says) as caught:
        target.restore_from_path(tmp_path / "ckpt")
    assert str(file) in str(caught.value)
    assert target.state == {"untouched": 1}


@pytest.mark.parametrize("client", ["pyarrow_s3", "s3fs_s3"])
def test_a_big_msgpack_file_on_an_object_store_is_downloaded_once(
    request: pytest.FixtureRequest, s3_server: Any, s3_prefix: str, client: str
) -> None:
    filesystem = request.getfixturevalue(client)
    state = {"weights": np.random.default_rng(5).random(3 * MiB), "step": 2}
    Arrays(state).save_to_path(f"{s3_prefix}/ckpt", filesystem=filesystem, format="msgpack")
    s3_server.reset_counts()
    restored = Arrays()
    restored.restore_from_path(f"{s3_prefix}/ckpt", filesystem=filesystem)
    np.testing.assert_array_equal(restored.state["weights"], state["weights"])
    gets = [r for r in s3_server.requests() if r.kind == "GET" and r.path.endswith("state.msgpack")]
    assert len(gets) == 1, gets


def test_the_arrays_are_read_into_their_final_memory(saved: tuple[Path, dict[str, Any]]) -> None:
    """Peak allocation of a restore: the restored state, plus the payloads that pickle
    copies out of the skeleton (byte strings, read-only arrays, arrays pickled by copy),
    not a second copy of the big writable arrays."""
    path, state = saved
    Arrays().restore_from_path(path)
    total = (path / "state.pkl").stat().st_size
    in_skeleton = sum(
        len(state[k]) if isinstance(state[k], (bytes, str)) else state[k].nbytes
        for k in ("bytes", "text", "readonly", "strided")
    )
    arrays = (
        sum(memoryview(state[k]).nbytes for k in ("float64", "int8_fortran", "bytearray"))
        + state["nested"]["big"].nbytes
    )
    assert arrays > total / 2

    tracemalloc.start()
    try:
        Arrays().restore_from_path(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < total + in_skeleton + state["strided"].nbytes + 2 * MiB
    assert peak < total + arrays  # a second copy of the arrays would not fit


def test_a_save_makes_no_copy_of_the_arrays(tmp_path: Path) -> None:
    state = {"a": np.ones(16 * MiB // 8), "b": np.zeros(16 * MiB // 8)}
    Arrays(state).save_to_path(tmp_path / "warm")

    tracemalloc.start()
    try:
        Arrays(state).save_to_path(tmp_path / "ckpt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 4 * MiB  # 32 MiB of arrays written


def test_the_manifest_records_the_skeleton_of_big_pickles_only(
    saved: tuple[Path, dict[str, Any]],
) -> None:
    path, _ = saved
    body = json.loads((path / MANIFEST_FILE).read_text())["ckptable_manifest"]
    assert list(body["skeletons"]) == ["state.pkl"]

    Arrays({"x": np.ones(4)}).save_to_path(path.parent / "small")
    small = json.loads((path.parent / "small" / MANIFEST_FILE).read_text())["ckptable_manifest"]
    assert "skeletons" not in small


@pytest.mark.parametrize("where", ["skeleton_start", "array_payload", "after_payload", "last_byte"])
def test_damage_to_a_big_file_is_found_before_anything_is_unpickled(
    saved: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path, _ = saved
    state_file = path / "state.pkl"
    data = bytearray(state_file.read_bytes())
    offset = {
        "skeleton_start": 5,
        "array_payload": 1000 + len(data) // 4,
        "after_payload": len(data) // 2,
        "last_byte": len(data) - 1,
    }[where]
    data[offset] ^= 0x10
    state_file.write_bytes(bytes(data))
    calls: list[int] = []
    real_load = pickle.load
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    target = Arrays({"untouched": 1})

    with pytest.raises(CorruptCheckpointError, match="state.pkl"):
        target.restore_from_path(path)

    assert calls == [] and target.state == {"untouched": 1}


def test_a_truncated_big_file_is_found(saved: tuple[Path, dict[str, Any]]) -> None:
    path, _ = saved
    state_file = path / "state.pkl"
    for size in (1, 100, state_file.stat().st_size // 2):
        os.truncate(state_file, size)
        with pytest.raises(CorruptCheckpointError, match="state.pkl"):
            Arrays().restore_from_path(path)


def test_safe_mode_restores_big_arrays(saved: tuple[Path, dict[str, Any]]) -> None:
    path, state = saved
    restored = Arrays()
    restored.restore_from_path(path, safe=True)
    assert_states_equal(restored.state, state, same_types=True)


# --------------------------------------------------------------------------- mmap=True


def test_mmap_maps_the_arrays_without_reading_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    state = {f"w{i}": rng.random(2 * MiB) for i in range(4)}  # 64 MiB
    state["step"] = 7
    Arrays(state).save_to_path(tmp_path / "ckpt")
    size = (tmp_path / "ckpt" / "state.pkl").stat().st_size
    Arrays().restore_from_path(tmp_path / "ckpt", mmap=True)

    before = bytes_read()
    restored = Arrays()
    restored.restore_from_path(tmp_path / "ckpt", mmap=True)
    read = bytes_read() - before

    assert read < size / 100
    array = restored.state["w0"]
    assert not array.flags.writeable and not array.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 1.0
    assert_states_equal(restored.state, state)


def test_mmap_keeps_every_type_but_big_bytearrays(saved: tuple[Path, dict[str, Any]]) -> None:
    path, state = saved
    restored = Arrays()
    restored.restore_from_path(path, mmap=True)

    assert_states_equal(
        {k: v for k, v in restored.state.items() if k != "bytearray"},
        {k: v for k, v in state.items() if k != "bytearray"},
        same_types=True,
    )
    assert isinstance(restored.state["bytearray"], memoryview)  # documented for mmap=True
    assert restored.state["bytearray"].readonly
    assert bytes(restored.state["bytearray"]) == state["bytearray"]
    assert not restored.state["float64"].flags.writeable


def test_mmap_verifies_the_skeleton(saved: tuple[Path, dict[str, Any]]) -> None:
    path, _ = saved
    state_file = path / "state.pkl"
    original = state_file.read_bytes()
    for offset, match in ((original.index(b"float64"), "skeleton"), (5, "state.pkl.*corrupt")):
        data = bytearray(original)
        data[offset] ^= 0x01
        state_file.write_bytes(bytes(data))
        target = Arrays({"untouched": 1})
        with pytest.raises(CorruptCheckpointError, match=match):
            target.restore_from_path(path, mmap=True)
        assert target.state == {"untouched": 1}


def test_mmap_leaves_the_payload_to_verify_checkpoint(
    saved: tuple[Path, dict[str, Any]],
) -> None:
    """The documented trade: a flipped bit inside a mapped array is not read, so not
    found by the restore; ``verify_checkpoint`` (and a restore without mmap) finds it."""
    path, state = saved
    state_file = path / "state.pkl"
    data = bytearray(state_file.read_bytes())
    offset = bytes(data).index(state["float64"][1000:1001].tobytes())
    data[offset] ^= 0x01
    state_file.write_bytes(bytes(data))

    restored = Arrays()
    restored.restore_from_path(path, mmap=True)
    assert restored.state["float64"][1000] != state["float64"][1000]
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        verify_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        Arrays().restore_from_path(path)


def test_mmap_checks_the_size_of_a_mapped_file(saved: tuple[Path, dict[str, Any]]) -> None:
    path, _ = saved
    with open(path / "state.pkl", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptCheckpointError, match="state.pkl"):
        Arrays().restore_from_path(path, mmap=True)


def test_mmap_of_a_component_level_and_from_checkpoint(tmp_path: Path) -> None:
    holder = Holder()
    holder.arrays.state = {"w": np.arange(MiB, dtype=np.float64)}
    holder.step = 3
    holder.save_to_path(tmp_path / "ckpt")

    rebuilt = Holder.from_checkpoint(tmp_path / "ckpt", mmap=True)

    assert rebuilt.step == 3
    assert not rebuilt.arrays.state["w"].flags.writeable
    np.testing.assert_array_equal(rebuilt.arrays.state["w"], holder.arrays.state["w"])


def test_mmap_without_verification_and_of_unverified_checkpoints(tmp_path: Path) -> None:
    state = {"w": np.arange(MiB, dtype=np.float64)}
    Arrays(state).save_to_path(tmp_path / "ckpt")
    (tmp_path / "ckpt" / MANIFEST_FILE).unlink()

    restored = Arrays()
    restored.restore_from_path(tmp_path / "ckpt", mmap=True, verify=False)

    assert not restored.state["w"].flags.writeable
    np.testing.assert_array_equal(restored.state["w"], state["w"])


def test_mmap_of_a_checkpoint_without_skeleton_record_reads_and_verifies(
    tmp_path: Path,
) -> None:
    """A manifest without the skeleton's checksum (written to an object store, say):
    mapping could not verify what pickle runs, so the file is read and verified."""
    state = {"w": np.arange(MiB, dtype=np.float64)}
    Arrays(state).save_to_path(tmp_path / "ckpt")
    manifest = tmp_path / "ckpt" / MANIFEST_FILE
    body = json.loads(manifest.read_text())["ckptable_manifest"]
    del body["skeletons"]
    from ckptable._manifest import LevelManifest

    manifest.write_bytes(
        LevelManifest(
            body["algorithm"], {k: tuple(v) for k, v in body["files"].items()}, body["dirs"]
        ).to_bytes()
    )

    restored = Arrays()
    restored.restore_from_path(tmp_path / "ckpt", mmap=True)

    assert restored.state["w"].flags.writeable  # read, not mapped
    np.testing.assert_array_equal(restored.state["w"], state["w"])


def test_mmap_on_a_remote_filesystem_is_refused(tmp_path: Path) -> None:
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    Arrays({"w": np.ones(3)}).save_to_path("ckpt", filesystem=fs)
    with pytest.raises(ckptable.CheckpointError, match="mmap=True"):
        Arrays().restore_from_path("ckpt", filesystem=fs, mmap=True)


def test_mmap_with_safe_mode(saved: tuple[Path, dict[str, Any]]) -> None:
    path, state = saved
    restored = Arrays()
    restored.restore_from_path(path, mmap=True, safe=True)
    np.testing.assert_array_equal(restored.state["float64"], state["float64"])
    assert not restored.state["float64"].flags.writeable


# --------------------------------------------------------------------------- the walk


def walk(data: bytes, mode: str = "read") -> Any:
    return scan_pickle(io.BytesIO(data), mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("pickler", ["c", "python", "cloudpickle"])
def test_the_walk_understands_what_picklers_write(protocol: int, pickler: str) -> None:
    state = {"a": np.arange(PAYLOAD_MIN_BYTES // 4, dtype=np.float64), "b": [1, "x"] * 100}
    stream = io.BytesIO()
    if pickler == "c":
        pickle.dump(state, stream, protocol=protocol)
    elif pickler == "python":
        pickle._Pickler(stream, protocol=protocol).dump(state)  # type: ignore[attr-defined]
    else:
        cloudpickle.dump(state, stream, protocol=protocol)

    scanned = walk(stream.getvalue())

    assert scanned is not None
    assert len(scanned.buffers) == (1 if protocol == 5 else 0)
    assert_states_equal(pickle.load(scanned.open(), buffers=scanned.buffers), state)


def test_the_walk_leaves_old_protocols_to_pickle() -> None:
    assert walk(pickle.dumps({"a": 1}, protocol=2)) is None


@pytest.mark.parametrize(
    "data",
    [
        pickle.dumps({"a": np.ones(PAYLOAD_MIN_BYTES)}, protocol=5)[:-100],
        pickle.dumps({"a": 1}, protocol=5)[:-5] + b"\x95",
        b"\x80\x05\xff",
    ],
    ids=["truncated_payload", "truncated_frame_header", "unknown_opcode"],
)
def test_the_walk_refuses_what_is_not_a_whole_pickle(data: bytes) -> None:
    with pytest.raises(ScanError):
        walk(data)


def test_the_walk_refuses_bytes_after_stop() -> None:
    stream = io.BytesIO()
    pickle._Pickler(stream, protocol=5).dump(1)  # type: ignore[attr-defined]
    data = stream.getvalue()
    assert data.endswith(b".")  # STOP outside a frame
    with pytest.raises(ScanError, match="STOP"):
        walk(data + b"junk")


# --- payloads read with parallel reads -----------------------------------------------


@pytest.fixture(scope="module")
def parallel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A checkpoint whose arrays are big enough for parallel reads (and one that is not),
    saved once; tests work on copies."""
    from ckptable._parallel_read import PARALLEL_READ_MIN_BYTES

    rng = np.random.default_rng(7)
    state = {
        "big": rng.standard_normal(PARALLEL_READ_MIN_BYTES // 8 + 12345),  # not chunk-aligned
        "also_big": rng.integers(0, 255, PARALLEL_READ_MIN_BYTES + 3, dtype=np.uint8),
        "small": rng.standard_normal(1000),
    }
    path = tmp_path_factory.mktemp("parallel") / "ckpt"
    Arrays(state).save_to_path(path)
    return path, state


def _copy(path: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(path, tmp_path / "ckpt"))


@pytest.mark.parametrize("verify", [True, False])
def test_payloads_read_in_parallel_round_trip(
    parallel: tuple[Path, dict[str, Any]], verify: bool
) -> None:
    path, state = parallel
    restored = Arrays()
    restored.restore_from_path(path, verify=verify)
    assert_states_equal(restored.state, state)
    assert restored.state["big"].flags.writeable
    import threading

    assert any(t.name.startswith("ckptable-read") for t in threading.enumerate())


@pytest.mark.parametrize("verify", [True, False])
def test_payloads_are_read_in_pieces_a_checksum_can_follow(
    parallel: tuple[Path, dict[str, Any]], verify: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verified, a payload is read in chunks the checksum takes one by one while the next
    is read; unverified, nothing takes them in order, so each reading thread gets one
    piece (fewer hand-overs between threads)."""
    from ckptable._parallel_read import PARALLEL_READ_CHUNK, READ_THREADS

    path, state = parallel
    preads = record_preads(monkeypatch)
    restored = Arrays()
    restored.restore_from_path(path, verify=verify)
    assert_states_equal(restored.state, state)
    reads = [n for _, n in preads]
    sizes = [state["big"].nbytes, state["also_big"].nbytes]
    if verify:
        expected = sum(-(-size // PARALLEL_READ_CHUNK) for size in sizes)
        assert len(reads) == expected and max(reads) == PARALLEL_READ_CHUNK
    else:
        assert len(reads) == READ_THREADS * len(sizes)
        assert max(reads) > PARALLEL_READ_CHUNK


@pytest.mark.parametrize("where", [0.1, 0.5, 0.99])
def test_damage_inside_a_payload_read_in_parallel_is_found(
    parallel: tuple[Path, dict[str, Any]], tmp_path: Path, where: float
) -> None:
    """A flipped bit anywhere in a payload read by several threads: the checksum, fed
    the chunks in file order, still differs from the manifest's."""
    path = _copy(parallel[0], tmp_path)
    state_file = path / "state.pkl"
    with open(state_file, "r+b") as f:
        offset = int(state_file.stat().st_size * where)
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    target = Arrays({"untouched": 1})
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        target.restore_from_path(path)
    assert target.state == {"untouched": 1}


@pytest.mark.parametrize("verify", [True, False])
def test_a_file_cut_inside_a_payload_read_in_parallel_is_found(
    parallel: tuple[Path, dict[str, Any]], tmp_path: Path, verify: bool
) -> None:
    path = _copy(parallel[0], tmp_path)
    state_file = path / "state.pkl"
    os.truncate(state_file, state_file.stat().st_size * 3 // 4)
    target = Arrays({"untouched": 1})
    with pytest.raises(CorruptCheckpointError, match="state.pkl"):
        target.restore_from_path(path, verify=verify)
    assert target.state == {"untouched": 1}


def test_pread_chunks_fills_in_order_and_stops_at_the_end(tmp_path: Path) -> None:
    from ckptable._parallel_read import pread_chunks, regular_fileno

    data = os.urandom(5 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb") as f:
        fd = regular_fileno(f)
        assert fd is not None
        buffer = bytearray(len(data) - 100)
        chunks = [bytes(c) for c in pread_chunks(fd, memoryview(buffer), 100, 1024)]
        assert b"".join(chunks) == data[100:] and bytes(buffer) == data[100:]
        too_long = memoryview(bytearray(len(data)))
        with pytest.raises(EOFError, match="offset"):
            list(pread_chunks(fd, too_long, 100, 1024))
    assert regular_fileno(io.BytesIO(b"x")) is None
