"""msgpack written without copying big arrays (``ckptable._msgpack_encode``): the same
bytes as ``packb``, to the byte, with the big arrays' data written from their own
memory; ``packb`` itself where the packer's output is not what was expected."""

from __future__ import annotations

import gc
import importlib
import inspect
import io
import random
import sys
import tracemalloc
import types
import weakref
from pathlib import Path
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import pytest

from ckptable._formats import get_codec
from ckptable._msgpack_encode import pack_to
from test_msgpack_views import random_value

MIB = 1 << 20
C_IMPL = msgpack._cmsgpack  # type: ignore[attr-defined]
PY_IMPL = importlib.import_module("msgpack.fallback")


def packed(value: Any) -> bytes:
    return msgpack.packb(value, default=msgpack_numpy.encode, use_bin_type=True)


class Recorder(io.RawIOBase):
    """A stream that keeps what each ``write`` was given (as bytes) and its type."""

    def __init__(self) -> None:
        self.pieces: list[tuple[type, bytes]] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.pieces.append((type(data), bytes(view)))
        return len(view)

    @property
    def value(self) -> bytes:
        return b"".join(piece for _, piece in self.pieces)


def written(state: Any, impl: types.ModuleType = C_IMPL, **kwargs: Any) -> Recorder:
    out = Recorder()
    pack_to(out, state, impl, msgpack_numpy, **kwargs)
    return out


def big_arrays(rng: np.random.Generator) -> list[Any]:
    """Arrays of every kind the encoder meets, small ones among them."""
    return [
        rng.random(300_000).astype(np.float32),  # 1.1 MiB
        rng.integers(-5, 5, (600, 300), dtype=np.int64),  # 2-d, 1.4 MiB
        rng.random(160_000) < 0.5,  # bool, below 1 MiB: msgpack-numpy's own
        (rng.random(90_000) + 1j * rng.random(90_000)).astype(np.complex128),
        np.asfortranarray(rng.random((400, 400))),  # F order: msgpack-numpy's own
        rng.random((800, 400))[:, ::2],  # not contiguous: msgpack-numpy's own
        np.zeros(140_000, dtype=[("a", "<f4"), ("b", "<i4")]),  # structured: its own
        np.array([{"x": 1}] * 3, dtype=object),  # object: its own
        rng.random(300_000).astype(">f4"),  # big-endian
        np.array(["ab", "é"] * 100_000),  # unicode, 1.6 MiB
        np.ma.masked_array(rng.random(300_000), mask=rng.random(300_000) < 0.1),
        np.float32(2.5),
        rng.random(0),
    ]


@pytest.mark.parametrize("impl", [C_IMPL, PY_IMPL], ids=["c", "python"])
@pytest.mark.parametrize("seed", range(6))
def test_the_bytes_are_packb_s_to_the_byte(impl: types.ModuleType, seed: int) -> None:
    rng = random.Random(seed)
    arrays = big_arrays(np.random.default_rng(seed))
    state = {
        "doc": random_value(rng),
        "arrays": arrays,
        "nested": {"again": arrays[0], "tuple": (arrays[1], random_value(rng))},
        "tail": random_value(rng),
    }
    assert written(state, impl).value == packed(state)
    assert written(state, impl, min_bytes=1).value == packed(state)


def test_big_arrays_are_written_from_their_own_memory() -> None:
    """The array's data reaches the stream as one ``memoryview`` (the array's memory),
    after the ``bin 32`` header of its length; nothing else holds it."""
    weights = np.arange(MIB, dtype=np.float32)  # 4 MiB
    out = written({"w": weights, "step": 3})
    big = [(kind, data) for kind, data in out.pieces if len(data) >= MIB]
    assert big == [(memoryview, weights.tobytes())]
    index = next(i for i, (_, data) in enumerate(out.pieces) if len(data) >= MIB)
    assert out.pieces[index - 1][1] == b"\xc6" + (4 * MIB).to_bytes(4, "big")
    assert out.value == packed({"w": weights, "step": 3})


def test_small_states_and_states_without_big_arrays_are_one_piece() -> None:
    state = {"x": np.arange(10), "y": [1, "two", b"three"], "z": b"\0" * (2 * MIB)}
    out = written(state)
    assert len(out.pieces) == 1 and out.value == packed(state)


def test_where_the_packer_writes_otherwise_packb_writes_the_state() -> None:
    """A packer whose buffer does not hold the noted map where it was noted (here: it
    reports positions one byte off) gets no piece written: packb's bytes are."""

    class OffByOne(C_IMPL.Packer):  # type: ignore[misc,name-defined]
        def getbuffer(self) -> memoryview:
            view = super().getbuffer()
            if self._in_pack:
                shifted = memoryview(bytes(len(view) + 1))
                view.release()
                return shifted
            return view

        def pack(self, obj: Any) -> Any:
            self._in_pack = True
            try:
                return super().pack(obj)
            finally:
                self._in_pack = False

    impl = types.SimpleNamespace(Packer=OffByOne)
    state = {"w": np.arange(MIB, dtype=np.float32), "n": 1}
    out = written(state, impl)  # type: ignore[arg-type]
    assert [kind for kind, _ in out.pieces] == [bytes]
    assert out.value == packed(state)


def test_a_msgpack_save_holds_no_copy_of_its_arrays(tmp_path: Path) -> None:
    """The codec's ``dump`` to a file: Python allocates a fraction of the array's size
    (before, msgpack's buffer and ``packb``'s bytes held two copies of it)."""
    weights = np.ones(16 * MIB // 4, dtype=np.float32)
    codec = get_codec("msgpack")
    with open(tmp_path / "state.msgpack", "wb") as stream:
        tracemalloc.start()
        try:
            codec.dump({"weights": weights, "step": 1}, stream)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < MIB
    data = (tmp_path / "state.msgpack").read_bytes()
    assert data == packed({"weights": weights, "step": 1})
    with open(tmp_path / "state.msgpack", "rb") as stream:
        loaded = codec.load(stream)
    assert np.array_equal(loaded["weights"], weights) and loaded["step"] == 1


@pytest.mark.parametrize(
    "bad",
    [object(), np.arange(MIB).astype("datetime64[ns]")],
    ids=["an-object", "a-big-datetime-array"],
)
def test_what_msgpack_refuses_is_refused_as_before(bad: Any) -> None:
    """The same error as ``packb``'s, before anything is written."""
    state = {"w": np.arange(MIB, dtype=np.float32), "bad": bad}
    with pytest.raises((TypeError, ValueError)) as expected:
        packed(state)
    out = Recorder()
    with pytest.raises(type(expected.value), match=str(expected.value)):
        pack_to(out, state, C_IMPL, msgpack_numpy)
    assert out.pieces == []


def test_the_arrays_are_let_go_when_the_save_returns() -> None:
    """Nothing of a save keeps a state's arrays alive afterwards, without the cyclic
    garbage collector (the packer and its hook refer to each other)."""
    weights = np.arange(MIB, dtype=np.float32)
    alive = weakref.ref(weights)
    gc.disable()
    try:
        written({"w": weights, "n": [1, 2]})
        del weights
        assert alive() is None
    finally:
        gc.enable()


def test_a_state_nested_near_the_recursion_limit_is_written_as_packb_writes_it() -> None:
    """msgpack's pure-Python packer recurses per level, and the hook adds frames of its
    own below a big array: at the lowest limit at which ``packb`` succeeds, ``pack_to``
    writes the same bytes (``packb`` itself, where the hook ran out of stack)."""
    state: Any = {"w": np.arange(MIB, dtype=np.float32)}
    for _ in range(150):
        state = [state]

    def packb_py() -> bytes:
        return PY_IMPL.Packer(default=msgpack_numpy.encode, use_bin_type=True).pack(state)

    depth = len(inspect.stack(0))
    limit = sys.getrecursionlimit()
    try:
        for extra in range(100, 1000, 5):
            sys.setrecursionlimit(depth + extra)
            try:
                expected = packb_py()
            except RecursionError:
                continue
            break
        else:
            pytest.fail("packb never succeeded")
        out = Recorder()
        pack_to(out, state, PY_IMPL, msgpack_numpy)
    finally:
        sys.setrecursionlimit(limit)
    assert out.value == expected
