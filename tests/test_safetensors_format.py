"""The ``safetensors`` format: exact round trips, files any safetensors reader opens, states
refused with their key path, damaged files refused naming the file, and restores that
map the file (``mmap=True``) or run no code (``safe=True``)."""

from __future__ import annotations

import collections
import enum
import hashlib
import io
import json
import math
import mmap
import os
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import ckptable
from ckptable import (
    Checkpointable,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StateEncodingError,
    get_codec,
    verify_checkpoint,
)
from ckptable._safetensors import SafetensorsCodec
from helpers import reseal

# The dev extra installs both: the official readers check ckptable's files.
torch = pytest.importorskip("torch")
st_numpy = pytest.importorskip("safetensors.numpy")
st_torch = pytest.importorskip("safetensors.torch")
safe_open = pytest.importorskip("safetensors").safe_open

MiB = 1 << 20
STATE_FILE = "state.safetensors"

# --------------------------------------------------------------------------- the classes


class Box(Checkpointable):
    """A level with a given state of its own and components built from ``spec``
    (``{"enc": {}, "dec": {"head": {}}}``: names to the specs of their own components)."""

    def __init__(self, spec: dict[str, Any] | None = None, own: dict[str, Any] | None = None):
        self.spec = dict(spec or {})
        self.children = {name: Box(sub) for name, sub in self.spec.items()}
        self.own: dict[str, Any] = dict(own or {})

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.children.items())

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        state = dict(self.own)
        for name, child in self.children.items():
            if self._check_component(name, components, not_components):
                state[name] = child.get_state()
        return state

    def set_state(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.children:
                self.children[key].set_state(value)
            else:
                self.own[key] = value

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {"spec": self.spec}


def saved(tmp_path: Path, own: dict[str, Any], name: str = "ckpt", **kwargs: Any) -> Path:
    path = tmp_path / name
    Box(own=own).save_to_path(path, format="safetensors", **kwargs)
    return path


def restored(path: Path, **kwargs: Any) -> dict[str, Any]:
    box = Box()
    box.restore_from_path(path, **kwargs)
    return box.own


# --------------------------------------------------------------------------- exactness


def assert_identical(actual: Any, expected: Any, where: str = "state") -> None:
    """Same types at every node, same keys in the same order, tensors bit for bit with
    their dtype, shape, requires_grad and device; floats bit for bit (any nan is nan)."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)}"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
        if isinstance(expected, collections.OrderedDict):
            assert vars(actual) == vars(expected), f"{where}: attributes"
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{where}[{i}]")
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} != {expected.shape}"
        assert actual.tobytes() == expected.tobytes(), f"{where}: bytes differ"
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} != {expected.shape}"
        assert actual.device == expected.device, f"{where}: {actual.device}"
        assert actual.requires_grad == expected.requires_grad, f"{where}: requires_grad"
        assert tensor_bytes(actual) == tensor_bytes(expected), f"{where}: bytes differ"
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual} is not nan"
        else:
            assert struct.pack("<d", actual) == struct.pack("<d", expected), f"{where}: {actual}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    plain = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    return plain.reshape(-1).view(torch.uint8).numpy().tobytes()


RNG = np.random.default_rng(7)


def random_array(dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Random bits of ``dtype`` (NaNs with payloads included); bools 0 or 1."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if dtype == np.bool_:
        return RNG.integers(0, 2, size=shape).astype(np.bool_)
    raw = RNG.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


NUMPY_DTYPES = ["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "<u8", "<u4", "<u2", "u1", "?",
                "<c8"]  # fmt: skip
#: Every torch dtype of the format (those this torch has).
TORCH_DTYPES = [
    getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
        "uint64", "uint32", "uint16", "uint8", "bool", "complex64", "float8_e4m3fn",
        "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    )
    if hasattr(torch, name)
]  # fmt: skip


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.from_numpy(random_array("?", shape))
    if not math.prod(shape):
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = random_array("u1", (math.prod(shape) * itemsize,))
    return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)


def json_leaves() -> dict[str, Any]:
    return {
        "none": None,
        "bools": [True, False],
        "ints": [0, -5, 2**70, -(2**64)],
        "floats": [1.5, -0.0, 5e-324, 1.7976931348623157e308, math.nan, math.inf, -math.inf],
        "text": ["", "plain", "ünïcödé ✓", 'with\nnewline and "quotes"'],
        "tuple": (1, "two", (3.0, None)),
        "empty": {"dict": {}, "list": [], "tuple": ()},
        "keys": {"a/b": 1, "~": 2, "~1": 3, "x.y": 4, "": 5, "__metadata__": 6},
    }


# --------------------------------------------------------------------------- round trips


def test_numpy_state_of_every_dtype_round_trips_exactly(tmp_path: Path) -> None:
    state: dict[str, Any] = {
        "arrays": {dtype: random_array(dtype, (3, 5)) for dtype in NUMPY_DTYPES},
        "zero_d": {dtype: random_array(dtype, ()) for dtype in NUMPY_DTYPES},
        "empty": {dtype: random_array(dtype, (0, 4)) for dtype in NUMPY_DTYPES},
        "scalars": [
            np.float64(2.5),
            np.float32(-1.25),
            np.int64(-7),
            np.uint8(200),
            np.bool_(True),
            np.float16(0.5),
            np.complex64(1 - 2j),
        ],
        "nested": {"a": [random_array("<f4", (2,)), {"b": (random_array("<i8", (1, 1, 1)),)}]},
        # Keys that need escaping in tensor names, and the one name safetensors reserves.
        "odd/keys": {"~": random_array("<f4", (2,)), "": random_array("u1", (1,))},
        "__metadata__": random_array("<f8", (2,)),
        **json_leaves(),
    }
    back = restored(saved(tmp_path, state))
    assert_identical(back, state)
    for array in back["arrays"].values():
        assert array.flags.writeable and array.flags.c_contiguous


def test_torch_state_of_every_dtype_round_trips_exactly(tmp_path: Path) -> None:
    grad = torch.randn(3, 4, dtype=torch.float32).requires_grad_()
    state: dict[str, Any] = {
        "tensors": {str(dtype): random_tensor(dtype, (4, 3)) for dtype in TORCH_DTYPES},
        "zero_d": {str(dtype): random_tensor(dtype, ()) for dtype in TORCH_DTYPES},
        "empty": {str(dtype): random_tensor(dtype, (2, 0)) for dtype in TORCH_DTYPES},
        "requires_grad": grad,
        "non_leaf": grad * 2,  # a result of autograd: saved as its values, requires_grad
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
        "frozen_parameter": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "transposed": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
        "conjugate": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
        "numpy_too": random_array("<f4", (2, 2)),
        **json_leaves(),
    }
    back = restored(saved(tmp_path, state))
    expected = dict(state)
    # Saved as their values: a non-leaf comes back a leaf that requires grad, views and
    # conjugate views come back as contiguous tensors with the same values.
    assert back["non_leaf"].is_leaf and back["non_leaf"].requires_grad
    expected["transposed"] = state["transposed"].contiguous()
    expected["conjugate"] = state["conjugate"].resolve_conj()
    assert_identical(back, expected)
    assert type(back["parameter"]) is torch.nn.Parameter
    assert type(back["frozen_parameter"]) is torch.nn.Parameter
    assert not back["frozen_parameter"].requires_grad
    assert type(back["tensors"]["torch.float32"]) is torch.Tensor
    assert type(back["numpy_too"]) is np.ndarray


def test_layout_and_byte_order_are_not_kept_but_values_are(tmp_path: Path) -> None:
    base = random_array("<f4", (4, 6))
    state = {
        "fortran": np.asfortranarray(base),
        "strided": base[::2, ::3],
        "big_endian": base.astype(">f4"),
        "memmap_free_view": base.T,
    }
    back = restored(saved(tmp_path, state))
    for key, value in state.items():
        assert np.array_equal(back[key], value), key
        assert back[key].flags.c_contiguous, key
    assert back["big_endian"].dtype == np.dtype("<f4")


def test_an_ordered_dict_comes_back_with_its_state_dict_metadata(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state_dict = module.state_dict()
    assert type(state_dict) is collections.OrderedDict and hasattr(state_dict, "_metadata")
    back = restored(saved(tmp_path, {"model": state_dict}))
    assert_identical(back["model"], state_dict)
    assert back["model"]._metadata == state_dict._metadata
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    fresh.load_state_dict(back["model"])


def test_a_big_array_is_written_from_its_memory_and_read_into_its_final_memory(
    tmp_path: Path,
) -> None:
    big = RNG.random(18 * MiB, dtype=np.float32)  # 72 MiB
    state = {"big": big, "small": np.arange(3), "step": 7}
    box = Box(own=state)
    tracemalloc.start()
    try:
        box.save_to_path(tmp_path / "ckpt", format="safetensors")
        _, save_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        back = restored(tmp_path / "ckpt")
        _, restore_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # No copy of the array on the way out; one allocation (the array's own) on the way in.
    assert save_peak < 8 * MiB, save_peak
    assert big.nbytes <= restore_peak < big.nbytes + 8 * MiB, restore_peak
    assert_identical(back, state)
    size = (tmp_path / "ckpt" / STATE_FILE).stat().st_size
    assert big.nbytes < size < big.nbytes + 4096
    with safe_open(tmp_path / "ckpt" / STATE_FILE, framework="np") as file:
        assert np.array_equal(file.get_tensor("big"), big)
    mapped = restored(tmp_path / "ckpt", mmap=True)
    assert_identical(mapped, state)


# --------------------------------------------------------------------------- other readers


def test_official_numpy_readers_see_the_arrays_by_key_path(tmp_path: Path) -> None:
    state = {
        "net": {"w": random_array("<f4", (3, 2)), "b/c": random_array("<i8", (2,))},
        "list": [random_array("u1", (4,)), {"x": random_array("?", (2, 2))}],
        "z": random_array("<c8", ()),
        "empty": random_array("<f2", (0,)),
        "step": 3,
    }
    path = saved(tmp_path, state) / STATE_FILE
    expected = {
        "net/w": state["net"]["w"],
        "net/b~1c": state["net"]["b/c"],
        "list/0": state["list"][0],
        "list/1/x": state["list"][1]["x"],
        "z": state["z"],
        "empty": state["empty"],
    }
    loaded = st_numpy.load_file(path)
    assert set(loaded) == set(expected)
    for name, array in expected.items():
        assert_identical(loaded[name], array, name)
    with safe_open(path, framework="np") as file:
        record = json.loads(file.metadata()["ckptable"])
        for name, array in expected.items():
            assert_identical(file.get_tensor(name), array, name)
    assert record["format"] == "ckptable.safetensors" and record["version"] == 1
    assert record["tree"]["d"]["step"] == 3
    assert record["tree"]["d"]["net"] == {"d": {"w": {"np": "net/w"}, "b/c": {"np": "net/b~1c"}}}


def test_official_torch_readers_see_every_dtype(tmp_path: Path) -> None:
    tensors = {
        str(dtype).removeprefix("torch."): random_tensor(dtype, (5,)) for dtype in TORCH_DTYPES
    }
    tensors["scalar"] = random_tensor(torch.bfloat16, ())
    path = saved(tmp_path, {"t": tensors}) / STATE_FILE
    loaded = st_torch.load_file(path)
    assert set(loaded) == {f"t/{name}" for name in tensors}
    for name, tensor in tensors.items():
        assert_identical(loaded[f"t/{name}"], tensor, name)
    with safe_open(path, framework="pt") as file:
        for name, tensor in tensors.items():
            assert_identical(file.get_tensor(f"t/{name}"), tensor, name)


def test_the_file_is_laid_out_as_the_format_and_aligned(tmp_path: Path) -> None:
    state = {"a": random_array("u1", (3,)), "b": random_array("<f8", (5,)),
             "c": random_array("<i2", (7,)), "d": random_array("<c8", (2,))}  # fmt: skip
    data = (saved(tmp_path, state) / STATE_FILE).read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    offsets = sorted(
        (entry["data_offsets"], entry["dtype"]) for name, entry in header.items()
        if name != "__metadata__"
    )  # fmt: skip
    itemsize = {"U8": 1, "F64": 8, "I16": 2, "C64": 8}
    position = 0
    for (begin, end), dtype in offsets:
        assert begin == position and begin % itemsize[dtype] == 0
        position = end
    assert 8 + length + position == len(data)


def test_files_of_other_writers_load_as_a_flat_dict(tmp_path: Path) -> None:
    arrays = {"a.weight": random_array("<f4", (2, 3)), "b": random_array("<i4", (4,))}
    codec = get_codec("safetensors")
    numpy_file = tmp_path / "np.safetensors"
    st_numpy.save_file(arrays, numpy_file, metadata={"other": "tool"})
    with open(numpy_file, "rb") as stream:
        assert_identical(codec.load(stream), arrays)
    tensors = {"w": random_tensor(torch.bfloat16, (3,)), "x": random_tensor(torch.float32, (2,))}
    torch_file = tmp_path / "pt.safetensors"
    st_torch.save_file(tensors, torch_file)
    with open(torch_file, "rb") as stream:
        back = codec.load(stream)
    assert_identical(back["w"], tensors["w"])  # numpy has no bf16: a torch tensor
    assert_identical(back["x"], tensors["x"].numpy())  # numpy's dtypes: an array


# --------------------------------------------------------------------------- refusals


class Point(NamedTuple):
    x: int
    y: int


class Color(enum.IntEnum):
    RED = 1


def _cycle() -> list[Any]:
    looped: list[Any] = [1]
    looped.append(looped)
    return looped


REFUSED: list[tuple[str, Callable[[], Any], str, str]] = [
    ("object", lambda: {"a": {"b": object()}}, "state['a']['b']", "builtins.object"),
    ("set", lambda: {"a": [1, {2, 3}]}, "state['a'][1]", "builtins.set"),
    ("bytes", lambda: {"a": b"raw"}, "state['a']", "builtins.bytes"),
    ("int key", lambda: {"a": {1: 2}}, "state['a']", "the key 1"),
    ("object array", lambda: {"a": np.array([object()])}, "state['a']", "dtype object"),
    ("complex128", lambda: {"a": np.zeros(2, np.complex128)}, "state['a']", "complex128"),
    ("str array", lambda: {"a": np.array(["x"])}, "state['a']", "<U1"),
    ("numpy str", lambda: {"a": np.str_("x")}, "state['a']", "numpy scalar"),
    ("matrix", lambda: {"a": np.matrix([[1.0]])}, "state['a']", "ndarray subclass"),
    ("meta tensor", lambda: {"a": torch.empty(2, device="meta")}, "state['a']", "meta"),
    ("sparse tensor", lambda: {"a": torch.eye(2).to_sparse()}, "state['a']", "sparse"),
    (
        "quantized",
        lambda: {"a": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)},
        "state['a']",
        "qint8",
    ),
    ("defaultdict", lambda: {"a": collections.defaultdict(list)}, "state['a']", "plain dict"),
    ("namedtuple", lambda: {"a": Point(1, 2)}, "state['a']", "plain tuple"),
    ("int enum", lambda: {"a": [Color.RED]}, "state['a'][0]", "plain int"),
]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize(("make", "where", "why"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])  # fmt: skip
def test_a_state_that_does_not_fit_is_refused_with_its_key_path(
    tmp_path: Path, make: Callable[[], Any], where: str, why: str
) -> None:
    stream = io.BytesIO()
    with pytest.raises(StateEncodingError, match=r"\b" + re.escape(where)) as direct:
        SafetensorsCodec().dump(make(), stream)
    assert why in str(direct.value)
    assert stream.getvalue() == b""  # refused before a byte was written
    with pytest.raises(StateEncodingError) as caught:
        Box(own=make()).save_to_path(tmp_path / "ckpt", format="safetensors")
    assert f"{where} cannot be encoded" in str(caught.value)
    assert "safetensors" in str(caught.value)
    assert not (tmp_path / "ckpt").exists()


def test_a_container_holding_itself_is_refused() -> None:
    with pytest.raises(StateEncodingError, match=r"state\['a'\]\[1\] contains itself"):
        SafetensorsCodec().dump({"a": _cycle()}, io.BytesIO())


def test_a_header_over_the_readers_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptable._safetensors as module

    monkeypatch.setattr(module, "MAX_HEADER_BYTES", 4096)
    with pytest.raises(StateEncodingError, match="a safetensors header may hold"):
        Box(own={"text": "x" * 5000}).save_to_path(tmp_path / "ckpt", format="safetensors")
    assert not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------- damaged files


def _good(tmp_path: Path) -> Path:
    own = {"w": np.arange(4, dtype=np.float32), "n": np.array([True, False]), "x": 1}
    return saved(tmp_path, own)


def _parts(path: Path) -> tuple[dict[str, Any], bytes]:
    data = (path / STATE_FILE).read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _file(header: Any, data: bytes, *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


def _with_record(header: dict[str, Any], change: Callable[[dict[str, Any]], Any]) -> dict:
    record = json.loads(header["__metadata__"]["ckptable"])
    change(record)
    header["__metadata__"]["ckptable"] = json.dumps(record)
    return header


def _set(mapping: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    mapping[key] = value
    return mapping


DAMAGE: dict[str, Callable[[dict[str, Any], bytes], bytes]] = {
    "shorter than 8 bytes": lambda h, d: b"\x10\x00\x00",
    "length past the end": lambda h, d: _file(h, d, length=10**6),
    "length zero": lambda h, d: _file(h, d, length=0),
    "length 2**63": lambda h, d: _file(h, d, length=1 << 63),
    "not json": lambda h, d: _file(b"{not json}", d),
    "not an object": lambda h, d: _file(b"[1, 2]", d),
    "not utf-8": lambda h, d: _file(b'{"\xff": 1}', d),
    "duplicate name": lambda h, d: _file(
        json.dumps(h)[:-1].encode() + b', "w": ' + json.dumps(h["w"]).encode() + b"}", d
    ),
    "unknown dtype": lambda h, d: _file({**h, "w": {**h["w"], "dtype": "F128"}}, d),
    "size differs from shape": lambda h, d: _file({**h, "w": {**h["w"], "shape": [5]}}, d),
    "float in shape": lambda h, d: _file({**h, "w": {**h["w"], "shape": [4.0]}}, d),
    "negative dimension": lambda h, d: _file({**h, "w": {**h["w"], "shape": [-4]}}, d),
    "extra field": lambda h, d: _file({**h, "w": {**h["w"], "extra": 1}}, d),
    "offsets overlap": lambda h, d: _file({**h, "n": {**h["n"], "data_offsets": [14, 16]}}, d),
    "offsets leave a gap": lambda h, d: _file(
        {**h, "n": {**h["n"], "data_offsets": [17, 19]}}, d + b"\x00\x00\x00"
    ),
    "offsets past the data": lambda h, d: _file(
        {**h, "n": {**h["n"], "data_offsets": [16, 18]}}, d[:-1]
    ),
    "negative offset": lambda h, d: _file({**h, "w": {**h["w"], "data_offsets": [-1, 15]}}, d),
    "bytes after the data": lambda h, d: _file(h, d + b"\x00" * 8),
    "truncated data": lambda h, d: _file(h, d)[:-1],
    "metadata not strings": lambda h, d: _file({**h, "__metadata__": {"ckptable": 1}}, d),
    "record not json": lambda h, d: _file({**h, "__metadata__": {"ckptable": "{oops"}}, d),
    "record of another tool": lambda h, d: _file(
        {**h, "__metadata__": {"ckptable": '{"format": "other"}'}}, d
    ),
    "nan constant in the record": lambda h, d: _file(
        json.dumps(_with_record(h, lambda r: r["tree"]["d"].update(x="@")))
        .encode()
        .replace(b'\\"@\\"', b"NaN"),
        d,
    ),
    "tree names a missing tensor": lambda h, d: _file(
        _with_record(h, lambda r: r["tree"]["d"].update(w={"np": "nope"})), d
    ),
    "tree names a tensor twice": lambda h, d: _file(
        _with_record(h, lambda r: r["tree"]["d"].update(x={"np": "w"})), d
    ),
    "tensor in no place": lambda h, d: _file(_with_record(h, lambda r: r["tree"]["d"].pop("n")), d),
    "invalid node": lambda h, d: _file(
        _with_record(h, lambda r: r["tree"]["d"].update(x={"zz": 1})), d
    ),
    "bare list node": lambda h, d: _file(
        _with_record(h, lambda r: r["tree"]["d"].update(x=[1, 2])), d
    ),
    "numpy node on bf16": lambda h, d: _file(
        {**h, "w": {**h["w"], "dtype": "BF16", "shape": [8]}}, d
    ),
    "bool byte 2": lambda h, d: _file(h, d[:-1] + b"\x02"),
    "grad on an int tensor": lambda h, d: _file(
        _with_record(
            _set(h, "w", {**h["w"], "dtype": "I32"}),
            lambda r: r["tree"]["d"].update(w={"pt": "w", "grad": True}),
        ),
        d,
    ),
}

MODES = {
    "verified": {},
    "unverified": {"verify": False},
    "mapped": {"verify": False, "mmap": True},
    "safe": {"safe": True},
}


@pytest.mark.filterwarnings("ignore::ckptable.errors.UnverifiedCheckpointWarning")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_corrupt_naming_it(tmp_path: Path, damage: str, mode: str) -> None:
    path = _good(tmp_path)
    header, data = _parts(path)
    (path / STATE_FILE).write_bytes(DAMAGE[damage](header, data))
    reseal(path)  # as an attacker who can write the files can: checksums do not catch it
    box = Box(own={"untouched": True})
    with pytest.raises(CorruptCheckpointError) as caught:
        box.restore_from_path(path, **MODES[mode])
    shown = str(path / STATE_FILE)
    assert caught.value.path == shown
    assert shown in str(caught.value)
    assert "not a valid safetensors file" in str(caught.value)
    assert box.own == {"untouched": True}


def test_a_record_from_a_newer_ckptable_is_incompatible(tmp_path: Path) -> None:
    path = _good(tmp_path)
    header, data = _parts(path)
    damaged = _with_record(header, lambda r: r.update(version=2))
    (path / STATE_FILE).write_bytes(_file(damaged, data))
    reseal(path)
    with pytest.raises(IncompatibleCheckpointError, match="newer ckptable") as caught:
        restored(path)
    assert caught.value.path == str(path / STATE_FILE)


def test_a_changed_byte_is_caught_by_the_checksum_first(tmp_path: Path) -> None:
    path = _good(tmp_path)
    data = bytearray((path / STATE_FILE).read_bytes())
    data[-5] ^= 0xFF
    (path / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        restored(path)


def _rchar() -> int:
    """Bytes this process read with read(2)-like calls so far (page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A level whose state.safetensors is over the size that step 1 keeps in memory."""
    state = {"w": RNG.random(6 * MiB, dtype=np.float32), "b": np.arange(5), "step": 3}
    return saved(tmp_path, state), state


@pytest.mark.parametrize("safe", [False, True])
def test_a_big_file_is_verified_in_the_read_that_decodes_it(
    big_file: tuple[Path, dict[str, Any]], safe: bool
) -> None:
    """A verified restore reads a big state.safetensors once: checksummed as it is
    decoded, not read whole for the checksum first."""
    path, state = big_file
    size = (path / STATE_FILE).stat().st_size
    assert size > 16 * MiB
    restored(path, safe=safe)  # warm the imports and the page cache
    before = _rchar()
    back = restored(path, safe=safe)
    read = _rchar() - before
    assert_identical(back, state)
    assert size <= read < size * 1.1


@pytest.mark.parametrize("where", ["tensor", "last byte"])
def test_damage_in_a_big_file_read_once_is_caught_before_anything_is_applied(
    big_file: tuple[Path, dict[str, Any]], where: str
) -> None:
    path, _ = big_file
    data = bytearray((path / STATE_FILE).read_bytes())
    data[len(data) // 2 if where == "tensor" else -1] ^= 0x01
    (path / STATE_FILE).write_bytes(bytes(data))
    box = Box(own={"untouched": 1})
    with pytest.raises(CorruptCheckpointError, match="checksum") as caught:
        box.restore_from_path(path)
    assert caught.value.path == str(path / STATE_FILE)
    assert box.own == {"untouched": 1}


@pytest.mark.parametrize("change", ["truncated", "appended"])
def test_a_big_file_of_another_size_is_caught(
    big_file: tuple[Path, dict[str, Any]], change: str
) -> None:
    path, _ = big_file
    file = path / STATE_FILE
    if change == "truncated":
        os.truncate(file, file.stat().st_size - 4)
    else:
        with open(file, "ab") as f:
            f.write(b"\0" * 8)
    box = Box(own={"untouched": 1})
    with pytest.raises(CorruptCheckpointError, match=STATE_FILE):
        box.restore_from_path(path)
    assert box.own == {"untouched": 1}


# --------------------------------------------------------------------------- restores


def test_safe_restores_load_it(tmp_path: Path) -> None:
    state = {"w": random_array("<f4", (3,)), "t": random_tensor(torch.bfloat16, (2,)),
             **json_leaves()}  # fmt: skip
    path = saved(tmp_path, state)
    assert_identical(restored(path, safe=True), state)
    assert_identical(restored(path, safe=True, verify=False, mmap=True), state)
    rebuilt = Box.from_checkpoint(path, safe=True)
    assert_identical(rebuilt.own, state)


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = (
            getattr(base, "base", None)
            if isinstance(base, np.ndarray)
            else getattr(base, "obj", None)
        )
    return base


@pytest.mark.parametrize("verify", [True, False])
def test_mmap_restores_map_the_file_copy_on_write(tmp_path: Path, verify: bool) -> None:
    # Over 16 MiB: a verified restore does not keep the file's bytes from its check.
    state = {
        "big": RNG.random(5 * MiB, dtype=np.float32),
        "tensor": random_tensor(torch.float32, (1024,)),
        "bf16": random_tensor(torch.bfloat16, (7,)),
        "flags": random_array("?", (9,)),
        "empty": random_array("<f4", (0,)),
        "step": 3,
    }
    path = saved(tmp_path, state)
    file = path / STATE_FILE
    before = hashlib.sha256(file.read_bytes()).hexdigest()
    back = restored(path, mmap=True, verify=verify)
    assert_identical(back, state)

    mapping = _mapping_of(back["big"])
    assert mapping is not None, "the array is not backed by the file's mapping"
    start = np.frombuffer(mapping, np.uint8).ctypes.data
    for name in ("tensor", "bf16"):
        assert start <= back[name].data_ptr() < start + len(mapping), name
    assert back["big"].flags.writeable
    back["big"][:] = 0  # copy-on-write: this process's pages only
    back["tensor"].add_(1)
    assert hashlib.sha256(file.read_bytes()).hexdigest() == before
    verify_checkpoint(path)
    assert_identical(restored(path), state)


def test_a_tensor_saved_on_a_missing_device_comes_back_on_the_cpu(tmp_path: Path) -> None:
    tensor = random_tensor(torch.float32, (3,))
    path = saved(tmp_path, {"t": tensor})
    header, data = _parts(path)
    damaged = _with_record(header, lambda r: r["tree"]["d"]["t"].update(device="cuda:7"))
    (path / STATE_FILE).write_bytes(_file(damaged, data))
    reseal(path)
    with pytest.warns(UserWarning, match="cuda:7"):
        back = restored(path)
    assert_identical(back["t"], tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_identical(restored(path, map_location="cpu")["t"], tensor)
    seen: list[str] = []
    restored(path, map_location=lambda t, saved: seen.append(saved) or t)
    assert seen == ["cuda:7"]


def test_a_tree_of_components_has_a_file_per_level(tmp_path: Path) -> None:
    spec = {"enc": {}, "dec": {"head": {}}}
    box = Box(spec, own={"step": 5, "opt": {"lr": 0.1}})
    box.children["enc"].own = {"w": random_array("<f4", (4, 4))}
    box.children["dec"].own = {"t": random_tensor(torch.bfloat16, (3,)), "n": None}
    box.children["dec"].children["head"].own = {"b": random_array("<i8", (2,)), "k": (1, 2)}
    path = tmp_path / "ckpt"
    box.save_to_path(path, format="safetensors")

    for level in (path, path / "enc", path / "dec", path / "dec" / "head"):
        assert (level / STATE_FILE).is_file(), level
        assert not (level / "state.pkl").exists()
        record = json.loads((level / "metadata.json").read_text())["ckptable"]
        assert record["format"] == "safetensors" and record["state_file"] == STATE_FILE
        with safe_open(level / STATE_FILE, framework="pt") as file:
            assert "ckptable" in file.metadata()
    with safe_open(path / "enc" / STATE_FILE, framework="np") as file:
        assert np.array_equal(file.get_tensor("w"), box.children["enc"].own["w"])
    assert ckptable.get_checkpoint_info(path)["format"] == "safetensors"
    verify_checkpoint(path)

    rebuilt = Box.from_checkpoint(path)
    assert_identical(rebuilt.get_state(), box.get_state())
    fresh = Box(spec)
    fresh.restore_from_path(path, mmap=True)
    assert_identical(fresh.get_state(), box.get_state())
    only = Box(spec)
    only.restore_from_path(path / "dec", component="dec")
    assert_identical(only.children["dec"].get_state(), box.children["dec"].get_state())
    assert only.own == {}


def test_convert_checkpoint_to_and_from_safetensors(tmp_path: Path) -> None:
    own = {"w": random_array("<f4", (3, 2)), "t": random_tensor(torch.float16, (4,)),
           "meta": {"lr": 0.5, "names": ("a", "b")}}  # fmt: skip
    box = Box({"sub": {}}, own=own)
    box.children["sub"].own = {"b": random_array("<u2", (5,))}
    box.save_to_path(tmp_path / "pickled")
    ckptable.convert_checkpoint(tmp_path / "pickled", tmp_path / "st", format="safetensors")
    assert (tmp_path / "st" / STATE_FILE).is_file()
    assert (tmp_path / "st" / "sub" / STATE_FILE).is_file()
    assert not (tmp_path / "st" / "state.pkl").exists()
    assert_identical(Box.from_checkpoint(tmp_path / "st").get_state(), box.get_state())
    ckptable.convert_checkpoint(tmp_path / "st", tmp_path / "back", format="cloudpickle")
    assert_identical(Box.from_checkpoint(tmp_path / "back").get_state(), box.get_state())

    Box(own={"bad": {"x": {1, 2}}}).save_to_path(tmp_path / "unfit")
    with pytest.raises(StateEncodingError, match=r"state\['bad'\]\['x'\]"):
        ckptable.convert_checkpoint(tmp_path / "unfit", tmp_path / "no", format="safetensors")
    assert not (tmp_path / "no").exists()


def test_a_state_without_tensors_never_imports_numpy_or_torch(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        import ckptable

        heavy = ("numpy", "torch", "safetensors")
        assert not [m for m in heavy if m in sys.modules], "import ckptable imported them"

        class Plain(ckptable.Checkpointable):
            def __init__(self):
                self.state = {}
            def get_state(self, components=None, *, not_components=None, **kwargs):
                return dict(self.state)
            def set_state(self, state):
                self.state = state
            def get_ctor_args_and_kwargs(self):
                return (), {}

        plain = Plain()
        plain.state = {"a": 1, "b": [1.5, None, float("inf")], "c": {"d": ("x", True)}}
        path = sys.argv[1]
        plain.save_to_path(path, format="safetensors")
        back = Plain()
        back.restore_from_path(path)
        assert back.state == plain.state, back.state
        assert ckptable.get_checkpoint_info(path)["format"] == "safetensors"
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(ckptable.__file__).parent.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("backend", ["fsspec", "pyarrow"])
def test_it_round_trips_through_other_filesystems(backend: str) -> None:
    fsspec = pytest.importorskip("fsspec")
    state = {"w": random_array("<f4", (1000,)), "t": random_tensor(torch.bfloat16, (3,)),
             "meta": {"lr": 0.5, "steps": [1, 2]}}  # fmt: skip
    key = f"st-{backend}-{os.getpid()}-{id(state)}/ckpt"
    if backend == "fsspec":
        path, filesystem = f"memory://{key}", None
    else:
        pafs = pytest.importorskip("pyarrow.fs")
        memory = fsspec.filesystem("memory")
        path, filesystem = f"/{key}", pafs.PyFileSystem(pafs.FSSpecHandler(memory))
    Box(own=state).save_to_path(path, filesystem=filesystem, format="safetensors")
    box = Box()
    box.restore_from_path(path, filesystem=filesystem)
    assert_identical(box.own, state)
    box = Box()
    box.restore_from_path(path, filesystem=filesystem, verify=False)
    assert_identical(box.own, state)
