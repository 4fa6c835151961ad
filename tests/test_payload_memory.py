"""The memory big arrays and tensors are read into, and the parallel reads that fill it.

A restore reads each big payload (an array's bytes in a pickle, a tensor in a safetensors
file) straight into the memory the restored value keeps. That memory starts on a 64-byte
boundary (the kernel copies page-cache pages into an unaligned destination measurably
slower: ``_parallel_read.new_payload_buffer``), whatever the format, and a ``bytearray``
in a state comes back a ``bytearray``. Big tensors of a local safetensors file are read
with parallel ``pread`` calls, verified or not, and the checksum still catches a damaged
byte anywhere in them, or a file cut short.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptable import CorruptCheckpointError, _parallel_read
from ckptable._parallel_read import (
    PARALLEL_READ_CHUNK,
    PARALLEL_READ_MIN_BYTES,
    PAYLOAD_ALIGNMENT,
    READ_THREADS,
    new_payload_buffer,
    readinto_parallel,
)
from helpers import StateHolder, fstat_reporting, record_preads

MiB = 1 << 20


Arrays = StateHolder


def address(buffer: Any) -> int:
    if isinstance(buffer, np.ndarray):
        return int(buffer.ctypes.data)
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def big_state() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {
        # Sizes that are no multiple of the alignment, so that each next one starts off it.
        "weights": rng.random((PARALLEL_READ_MIN_BYTES // 8 + 3,)),
        "embedding": rng.integers(0, 255, size=3 * MiB + 5, dtype=np.uint8),
        "small": np.arange(5, dtype=np.int16),
    }


@pytest.mark.parametrize("n", [0, 1, 17, 64, 127, 128, 1000, 3 * MiB + 1])
def test_new_payload_buffers_are_aligned_bytearrays_of_the_size(n: int) -> None:
    buffer = new_payload_buffer(n)
    assert type(buffer) is bytearray
    assert len(buffer) == n
    if n >= 2 * PAYLOAD_ALIGNMENT:
        assert address(buffer) % PAYLOAD_ALIGNMENT == 0
    buffer[:] = b"\x01" * n  # writable, and resizable like any bytearray
    buffer += b"x"
    assert len(buffer) == n + 1


@pytest.mark.parametrize("fmt", ["cloudpickle", "safetensors"])
@pytest.mark.parametrize("verify", [True, False])
def test_restored_big_arrays_start_aligned_and_are_writable(
    tmp_path: Path, fmt: str, verify: bool
) -> None:
    state = big_state()
    Arrays(state).save_to_path(tmp_path / "ckpt", format=fmt)
    restored = Arrays()
    restored.restore_from_path(tmp_path / "ckpt", verify=verify)
    for key in ("weights", "embedding"):
        array = restored.state[key]
        np.testing.assert_array_equal(array, state[key])
        assert array.dtype == state[key].dtype
        assert address(array) % PAYLOAD_ALIGNMENT == 0, key
        assert array.flags.writeable
        array[0] = 1  # its own memory: the checkpoint is not touched
    again = Arrays()
    again.restore_from_path(tmp_path / "ckpt", verify=verify)
    np.testing.assert_array_equal(again.state["weights"], state["weights"])


def test_a_big_bytearray_in_a_state_comes_back_a_bytearray(tmp_path: Path) -> None:
    data = bytearray(os.urandom(2 * MiB + 3))
    Arrays({"raw": data, "bytes": bytes(data[:100])}).save_to_path(tmp_path / "ckpt")
    restored = Arrays()
    restored.restore_from_path(tmp_path / "ckpt")
    assert type(restored.state["raw"]) is bytearray
    assert restored.state["raw"] == data
    assert type(restored.state["bytes"]) is bytes


@pytest.mark.parametrize("where", ["start", "middle", "last byte"])
def test_a_damaged_byte_in_a_big_safetensors_tensor_is_caught(tmp_path: Path, where: str) -> None:
    state = big_state()
    Arrays(state).save_to_path(tmp_path / "ckpt", format="safetensors")
    file = tmp_path / "ckpt" / "state.safetensors"
    size = file.stat().st_size
    offset = {"start": size // 4, "middle": size // 2, "last byte": size - 1}[where]
    with open(file, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x40]))
    target = Arrays({"untouched": 1})
    with pytest.raises(CorruptCheckpointError, match="state.safetensors") as caught:
        target.restore_from_path(tmp_path / "ckpt")
    assert caught.value.path is not None and "state.safetensors" in str(caught.value.path)
    assert target.state == {"untouched": 1}


def test_a_big_safetensors_file_cut_short_is_refused(tmp_path: Path) -> None:
    Arrays(big_state()).save_to_path(tmp_path / "ckpt", format="safetensors")
    file = tmp_path / "ckpt" / "state.safetensors"
    os.truncate(file, file.stat().st_size - 1000)
    for verify in (True, False):
        target = Arrays({"untouched": 1})
        with pytest.raises(CorruptCheckpointError, match="state.safetensors"):
            target.restore_from_path(tmp_path / "ckpt", verify=verify)
        assert target.state == {"untouched": 1}


def test_readinto_parallel_reads_from_the_position_in_order(tmp_path: Path) -> None:
    data = os.urandom(PARALLEL_READ_MIN_BYTES + 3 * PARALLEL_READ_CHUNK + 11)
    file = tmp_path / "data"
    file.write_bytes(data)
    seen: list[tuple[int, bytes]] = []
    with open(file, "rb", buffering=0) as stream:
        stream.seek(5)
        view = memoryview(new_payload_buffer(PARALLEL_READ_MIN_BYTES + PARALLEL_READ_CHUNK))
        n = readinto_parallel(stream, view, lambda at, chunk: seen.append((at, bytes(chunk))))
        assert n == len(view)
        assert bytes(view) == data[5 : 5 + n]
        assert stream.tell() == 5 + n
        assert [at for at, _ in seen] == sorted(at for at, _ in seen)
        assert b"".join(chunk for _, chunk in seen) == data[5 : 5 + n]
        # The file ends first: what is there, and the stream at the end.
        rest = memoryview(bytearray(PARALLEL_READ_MIN_BYTES * 2))
        got = readinto_parallel(stream, rest)
        assert got == len(data) - 5 - n
        assert bytes(rest[:got]) == data[5 + n :]
        assert stream.tell() == len(data)
        # Too small to gain, or not a regular file: the caller reads as before.
        assert readinto_parallel(stream, memoryview(bytearray(10))) is None


def test_readinto_parallel_leaves_pipes_to_the_caller(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        with open(read_end, "rb", buffering=0, closefd=False) as stream:
            view = memoryview(bytearray(PARALLEL_READ_MIN_BYTES))
            assert readinto_parallel(stream, view) is None
    finally:
        os.close(read_end)
        os.close(write_end)


def test_readinto_parallel_returns_what_was_there_when_the_file_shrinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size comes from ``fstat`` before the reads: a file cut short meanwhile (here:
    ``fstat`` reporting more than is there) gives the whole chunks read, never EOFError,
    and the stream where they end."""
    data = os.urandom(PARALLEL_READ_MIN_BYTES + PARALLEL_READ_CHUNK // 2)
    file = tmp_path / "data"
    file.write_bytes(data)
    with open(file, "rb", buffering=0) as stream:
        fstat_reporting(monkeypatch, lambda real: real + 3 * PARALLEL_READ_CHUNK)
        view = memoryview(bytearray(len(data) + 2 * PARALLEL_READ_CHUNK))
        # (Read in PARALLEL_READ_CHUNK pieces, as for a checksum: some of them whole.)
        got = readinto_parallel(stream, view, lambda at, chunk: None)
        monkeypatch.undo()
        whole = len(data) // PARALLEL_READ_CHUNK * PARALLEL_READ_CHUNK
        assert got == whole
        assert bytes(view[:got]) == data[:got]
        assert stream.tell() == got


def test_a_read_nothing_consumes_in_order_is_one_piece_per_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a consumer of the chunks in order, each reading thread gets one piece (each
    piece is a hand-over: 4 MiB ones made reads into reused memory 10-20% slower); with
    one, the pieces are small enough to hash one while the next is read."""
    data = os.urandom(4 * PARALLEL_READ_CHUNK + 4096 * 3 + 5)
    file = tmp_path / "data"
    file.write_bytes(data)
    reads = record_preads(monkeypatch)
    with open(file, "rb", buffering=0) as stream:
        view = memoryview(bytearray(len(data)))
        assert readinto_parallel(stream, view) == len(data)
        assert bytes(view) == data
        assert len(reads) == READ_THREADS
        first = min(reads)
        assert first[0] == 0 and first[1] % mmap.PAGESIZE == 0
        reads.clear()
        stream.seek(0)
        assert readinto_parallel(stream, view, lambda at, chunk: None) == len(data)
        assert bytes(view) == data
        assert len(reads) == 5 and max(n for _, n in reads) == PARALLEL_READ_CHUNK
        # A big read: pieces of at most UNORDERED_CHUNK_MAX (the bar moves, a stopped
        # read ends), here made small.
        monkeypatch.setattr(_parallel_read, "UNORDERED_CHUNK_MAX", PARALLEL_READ_CHUNK)
        reads.clear()
        stream.seek(0)
        assert readinto_parallel(stream, view) == len(data)
        assert bytes(view) == data
        assert len(reads) == 5 and max(n for _, n in reads) == PARALLEL_READ_CHUNK


def test_an_unordered_read_returns_the_whole_pieces_when_the_file_shrinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with chunks in order: a file cut short after ``fstat`` gives the pieces read
    whole (here the first of two), never EOFError, and the stream where they end."""
    data = os.urandom(PARALLEL_READ_MIN_BYTES + PARALLEL_READ_CHUNK)
    file = tmp_path / "data"
    file.write_bytes(data)
    claimed = len(data) + 2 * PARALLEL_READ_CHUNK
    with open(file, "rb", buffering=0) as stream:
        fstat_reporting(monkeypatch, lambda real: claimed)
        view = memoryview(bytearray(claimed))
        got = readinto_parallel(stream, view)
        monkeypatch.undo()
    piece = _parallel_read.unordered_chunk(claimed)
    assert piece < len(data) < 2 * piece
    assert got == piece
    assert bytes(view[:got]) == data[:got]


def test_sizes_beyond_what_c_can_hold_are_refused_not_wrapped() -> None:
    with pytest.raises((OverflowError, MemoryError)):
        new_payload_buffer(2**64 + 200)
    with pytest.raises((OverflowError, MemoryError)):
        new_payload_buffer(2**63 - 10)
