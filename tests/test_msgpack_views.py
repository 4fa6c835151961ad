"""msgpack decoded in place (``ckptable._msgpack_views``): the same values as msgpack's
own decoder, big arrays as aligned views of the buffer, msgpack itself for anything
else, with nothing changed in the buffer before it takes over."""

from __future__ import annotations

import datetime
import math
import random
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import pytest

from ckptable import UnsafeCheckpointError
from ckptable._formats import get_codec
from ckptable._msgpack_views import Unsuited, item_budget, unpack_with_views
from ckptable._parallel_read import PAYLOAD_ALIGNMENT
from ckptable._payload_pool import payload_memory
from ckptable._restore_decode import _HeldBytes

MIB = 1 << 20


def packed(value: Any) -> bytes:
    return msgpack.packb(value, default=msgpack_numpy.encode, use_bin_type=True)


def reference(data: bytes, hook: Any = msgpack_numpy.decode) -> Any:
    return msgpack.unpackb(data, object_hook=hook, strict_map_key=False, raw=False)


def own_memory(data: bytes, slack: int = 0) -> memoryview:
    """``data`` in writable memory of its own (as a file fetched whole is held), starting
    ``slack`` bytes into a page-aligned block."""
    view = payload_memory(len(data) + slack)[slack:]
    view[:] = data
    return view


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, arrays compared by dtype, shape and contents."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A value of every msgpack type at its length and range boundaries."""
    kinds = ["int", "float", "str", "bin", "none", "bool", "ext", "small-array"]
    if depth < 4:
        kinds += ["list", "dict", "dict"]
    kind = rng.choice(kinds)
    if kind == "int":
        edges = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
        edges += [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]
        return rng.choice([*edges, rng.randint(-(2**63), 2**64 - 1)])
    if kind == "float":
        return rng.choice([0.0, -1.5, 1e300, float("inf"), float("nan"), rng.random()])
    if kind == "str":
        n = rng.choice([0, 1, 31, 32, 255, 256, 65535, 65536])
        return "".join(rng.choice("aé€😀") for _ in range(n))[:n]
    if kind == "bin":
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 255, 256, 70000])))
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "ext":
        n = rng.choice([1, 2, 4, 8, 16, 3, 300, 70000])
        return msgpack.ExtType(rng.randint(0, 127), bytes(n))
    if kind == "small-array":
        dtype = rng.choice([np.float32, np.int64, np.uint8, np.complex64])
        return np.arange(rng.randint(0, 50), dtype=dtype)
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.choice([0, 3, 15, 16, 20]))]
    keys: list[Any] = ["k", "é", 7, -3, b"raw", 2.5, None, True]
    return {
        rng.choice(keys) if rng.random() < 0.3 else f"key{i}": random_value(rng, depth + 1)
        for i in range(rng.choice([0, 2, 15, 16, 20]))
    }


@pytest.mark.parametrize("seed", range(12))
def test_any_document_decodes_as_msgpack_decodes_it(seed: int) -> None:
    rng = random.Random(seed)
    value = {
        "doc": random_value(rng),
        "big": np.random.default_rng(seed).random(MIB // 8 + seed),
        "timestamp": msgpack.Timestamp.from_datetime(
            datetime.datetime(2026, 12, 5, tzinfo=datetime.timezone.utc)
        ),
    }
    data = packed(value)
    got = unpack_with_views(own_memory(data, slack=seed), msgpack_numpy.decode)
    assert same(got, reference(data))


def test_maps_are_given_to_the_hook_as_msgpack_gives_them() -> None:
    seen: list[Any] = []
    ours: list[Any] = []
    value = {"a": [{"x": 1}, {2: b"y" * 10}], "pad": b"p" * MIB}
    data = packed(value)

    def hook(into: list[Any]) -> Any:
        def record(obj: dict[Any, Any]) -> Any:
            into.append(dict(obj))
            return ("seen", len(into))

        return record

    assert unpack_with_views(own_memory(data), hook(ours)) == reference(data, hook(seen))
    assert ours == seen and type(seen[-1]["pad"]) is bytes


def test_big_arrays_are_aligned_writable_views_of_the_buffer() -> None:
    arrays = {f"w{i}": np.random.default_rng(i).random(MIB // 8 + i) for i in range(3)}
    data = packed({"arrays": arrays, "blob": b"b" * (2 * MIB), "n": 3})
    buffer = own_memory(data, slack=5)
    start = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    got = unpack_with_views(buffer, msgpack_numpy.decode)
    for name, expected in arrays.items():
        array = got["arrays"][name]
        assert np.array_equal(array, expected)
        assert array.flags.writeable and array.flags.aligned
        assert array.ctypes.data % PAYLOAD_ALIGNMENT == 0
        assert start <= array.ctypes.data < start + len(buffer)  # the buffer itself
    # A big value that is no array's data comes back bytes, as msgpack gives it.
    assert type(got["blob"]) is bytes and got["blob"] == b"b" * (2 * MIB)
    assert got["n"] == 3


def test_a_big_value_outside_a_map_is_bytes() -> None:
    data = packed([b"x" * (2 * MIB), {"v": [b"y" * (2 * MIB)]}])
    got = unpack_with_views(own_memory(data), msgpack_numpy.decode)
    assert got == reference(data) and all(type(b) is bytes for b in (got[0], got[1]["v"][0]))


def test_read_only_or_small_buffers_are_left_to_msgpack() -> None:
    data = packed({"w": np.ones(MIB)})
    with pytest.raises(Unsuited):
        unpack_with_views(memoryview(data), msgpack_numpy.decode)
    small = packed({"w": np.ones(10)})
    with pytest.raises(Unsuited):
        unpack_with_views(own_memory(small), msgpack_numpy.decode)


def test_many_small_items_are_left_to_msgpack_untouched() -> None:
    data = packed({"w": np.ones(MIB // 8), "items": list(range(2000))})
    buffer = own_memory(data, slack=3)
    with pytest.raises(Unsuited):
        unpack_with_views(buffer, msgpack_numpy.decode, budget=100)
    # The budget ran out before the array: nothing moved, msgpack reads the same bytes.
    assert bytes(buffer) == data
    assert item_budget(64 * MIB) > 100_000


@pytest.mark.parametrize(
    "damage",
    ["truncated", "extra", "bad-type", "bad-utf8", "huge-length", "unhashable-key"],
)
def test_malformed_data_before_any_move_is_left_to_msgpack(damage: str) -> None:
    data = bytearray(packed({"a": "text", "w": np.ones(MIB // 8)}))
    if damage == "truncated":
        del data[-100:]
    elif damage == "extra":
        data += b"\x00"
    elif damage == "bad-type":
        data[1] = 0xC1  # the first key's type byte: never used by msgpack
    elif damage == "bad-utf8":
        assert data[3:8] == b"\xa4text"
        data[4] = 0xFF  # not UTF-8
    elif damage == "huge-length":
        data[0:1] = b"\xdf\xff\xff\xff\xff"  # a map of 2**32 - 1 entries
    else:
        data[0:1] = b"\x83\x91\x01\x01"  # one more entry first: [1] -> 1, a list key
    raw = bytes(data)
    buffer = own_memory(raw, slack=1)
    with pytest.raises(Unsuited):
        unpack_with_views(buffer, msgpack_numpy.decode)
    assert bytes(buffer) == raw
    with pytest.raises((ValueError, TypeError)):  # msgpack's own error
        reference(raw)


def test_malformed_data_after_a_big_array_leaves_the_buffer_unchanged() -> None:
    data = packed(["x" * 100, {"w": np.ones(MIB // 8)}, "end"])
    broken = data[:-2]  # "end" cut short, after the array
    at = data.index(np.ones(MIB // 8).tobytes())
    slack = 1 if at % PAYLOAD_ALIGNMENT == PAYLOAD_ALIGNMENT - 1 else 2  # never aligned
    buffer = own_memory(broken, slack=slack)
    with pytest.raises(Unsuited):
        unpack_with_views(buffer, msgpack_numpy.decode)
    assert bytes(buffer) == broken  # the array's bytes were not moved: msgpack reads them


def test_deep_nesting_is_left_to_msgpack_which_decodes_it() -> None:
    value: Any = {"w": np.arange(MIB // 4, dtype=np.float32)}
    for _ in range(400):  # within msgpack's limit, past Python's recursion here
        value = [value]
    data = packed(value)
    buffer = own_memory(data, slack=3)
    with pytest.raises(Unsuited):
        unpack_with_views(buffer, msgpack_numpy.decode)
    assert bytes(buffer) == data
    got = get_codec("msgpack").load(_HeldBytes(own_memory(data, slack=3)))
    for _ in range(400):
        got = got[0]
    assert np.array_equal(got["w"], np.arange(MIB // 4, dtype=np.float32))


def test_a_big_object_array_is_unpickled_from_its_own_bytes() -> None:
    objects = np.array([{"i": i, "pad": f"{i:0300d}"} for i in range(6000)], dtype=object)
    data = packed({"name": "x" * 100, "o": objects, "w": np.ones(MIB // 8)})
    got = unpack_with_views(own_memory(data, slack=5), msgpack_numpy.decode)
    assert list(got["o"]) == list(objects) and np.array_equal(got["w"], np.ones(MIB // 8))


def test_errors_of_the_hook_are_raised_as_they_are() -> None:
    calls = 0

    def hook(obj: dict[Any, Any]) -> Any:
        nonlocal calls
        calls += 1
        raise TypeError("the hook's own")

    with pytest.raises(TypeError, match="the hook's own"):
        unpack_with_views(own_memory(packed({"w": np.ones(MIB)})), hook)
    assert calls == 1


def test_the_codec_decodes_held_bytes_in_place_and_refuses_object_arrays_safely() -> None:
    codec = get_codec("msgpack")
    weights = np.random.default_rng(3).random(MIB // 4)
    data = packed({"name": "x" * 100, "w": weights, "step": 4})  # room to move it down
    got = codec.load(_HeldBytes(own_memory(data, slack=9)))
    assert np.array_equal(got["w"], weights) and got["w"].flags.writeable
    assert got["w"].ctypes.data % PAYLOAD_ALIGNMENT == 0
    restricted = codec.load_restricted(_HeldBytes(own_memory(data)), source="s.msgpack")
    assert np.array_equal(restricted["w"], weights) and restricted["step"] == 4
    unsafe = packed({"w": weights, "o": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(UnsafeCheckpointError, match="s.msgpack"):
        codec.load_restricted(_HeldBytes(own_memory(unsafe)), source="s.msgpack")
