"""The restricted unpickler and the safe msgpack hook of ``ckptable._safe``.

Every malicious payload is checked both ways: the safe loader refuses it and its effect
(a marker file, an object array read from raw bytes, a dangling view) never happens,
and plain ``pickle.loads`` / ``msgpack_numpy.decode`` on the very same bytes does show
the effect, so each test can fail. The numpy payloads use zero bytes where they would
be read as pointers (NULL is read as ``None``), so the plain loads cannot crash.
"""

from __future__ import annotations

import collections
import copyreg
import datetime
import decimal
import fractions
import functools
import io
import os
import pickle
import struct
import sys
import types
import uuid
import warnings
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack_numpy
import numpy as np
import pytest

from ckptable import UnsafeCheckpointError, _safe
from ckptable._formats import unpatched_msgpack
from ckptable._safe import (
    SafeUnpickler,
    add_safe_classes,
    safe_classes,
    safe_msgpack_decode,
    safe_pickle_load,
)

PROTOCOLS = [2, 5]

# numpy's private pickle helpers, named the way numpy's own pickles name them.
_reconstruct = np.arange(2).__reduce__()[0]
_frombuffer = np.arange(2).__reduce_ex__(5)[0]


# --------------------------------------------------------------------------------------
# Module-level classes (importable, so pickled by reference)
# --------------------------------------------------------------------------------------


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class Base:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.value)


class Child(Base):
    pass


class Outer:
    class Inner(Base):
        pass


class Victim:
    """A class a pickle tries to change process-wide with BUILD."""

    flag = False


class Reduce:
    """Pickles as ``func(*args)``, then ``__setstate__(state)`` if a state is given."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


def touch_payload(marker: Path) -> Reduce:
    """Unpickling creates ``marker``: ``pathlib.Path.touch(Path(marker))``."""
    return Reduce(Path.touch, (Path(marker),))


def eval_payload(marker: Path) -> Reduce:
    """Unpickling creates ``marker`` through ``eval``."""
    return Reduce(eval, (f"open({str(marker)!r}, 'w').close()",))


def system_payload(marker: Path) -> Reduce:
    """Unpickling creates ``marker`` through ``os.system``."""
    return Reduce(os.system, (f"touch '{marker}'",))


PAYLOADS = {"touch": touch_payload, "eval": eval_payload, "system": system_payload}
PLACES = {
    "top": lambda payload: payload,
    "in_dict": lambda payload: {"weights": [1, 2], "nested": {"deep": (payload,)}},
    "in_object_array": lambda payload: {"a": np.array([1.5, payload, "x"], dtype=object)},
}


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo add_safe_classes after the test."""
    monkeypatch.setattr(_safe, "_USER_ALLOWED", dict(_safe._USER_ALLOWED))


def write(tmp_path: Path, data: bytes, name: str = "state.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def safe_load_file(path: Path, **kwargs: Any) -> Any:
    with open(path, "rb") as stream:
        return safe_pickle_load(stream, source=str(path), **kwargs)


def roundtrip(tmp_path: Path, obj: Any, protocol: int, **kwargs: Any) -> Any:
    path = write(tmp_path, cloudpickle.dumps(obj, protocol=protocol))
    return safe_load_file(path, **kwargs)


def assert_same(actual: Any, expected: Any) -> None:
    """Deep equality with numpy arrays, dtypes and types compared exactly."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert actual.dtype.fields == expected.dtype.fields
        if expected.dtype.hasobject:
            assert len(actual.ravel()) == len(expected.ravel())
            for a, e in zip(actual.ravel(), expected.ravel(), strict=True):
                assert_same(a, e)
        else:
            assert np.array_equal(actual, expected)
    elif isinstance(expected, np.dtype):
        assert actual == expected and actual.flags == expected.flags
        assert actual.fields == expected.fields and actual.metadata == expected.metadata
    elif isinstance(expected, (dict, collections.OrderedDict)):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
        if isinstance(expected, collections.defaultdict):
            assert actual.default_factory is expected.default_factory
    elif isinstance(expected, (list, tuple, collections.deque)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
        if isinstance(expected, collections.deque):
            assert actual.maxlen == expected.maxlen
    else:
        assert actual == expected or (actual != actual and expected != expected)


class Ops:
    """Hand-assembled pickle opcodes, for payloads no pickler writes."""

    @staticmethod
    def glob(module: str, name: str) -> bytes:
        return pickle.GLOBAL + f"{module}\n{name}\n".encode()

    @staticmethod
    def text(value: str) -> bytes:
        data = value.encode()
        return pickle.BINUNICODE + struct.pack("<I", len(data)) + data

    @staticmethod
    def int_(value: int) -> bytes:
        return pickle.BININT + struct.pack("<i", value)

    @staticmethod
    def raw(data: bytes) -> bytes:
        return pickle.BINBYTES + struct.pack("<I", len(data)) + data

    @staticmethod
    def put(index: int) -> bytes:
        return pickle.BINPUT + bytes([index])

    @staticmethod
    def get(index: int) -> bytes:
        return pickle.BINGET + bytes([index])

    @classmethod
    def dtype(cls, spec: str) -> bytes:
        """``numpy.dtype(spec, False, True)``, with no state."""
        return (
            cls.glob("numpy", "dtype")
            + pickle.MARK
            + cls.text(spec)
            + pickle.NEWFALSE
            + pickle.NEWTRUE
            + pickle.TUPLE
            + pickle.REDUCE
        )


def global_pickle(module: str, name: str) -> bytes:
    """A whole pickle of just the global ``module.name`` (protocol 4, STACK_GLOBAL)."""

    def short_text(value: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(value.encode())]) + value.encode()

    return (
        pickle.PROTO
        + b"\x04"
        + short_text(module)
        + short_text(name)
        + pickle.STACK_GLOBAL
        + pickle.STOP
    )


# --------------------------------------------------------------------------------------
# Round trips of harmless states
# --------------------------------------------------------------------------------------

STRUCT = np.dtype([("a", "<f4"), ("b", "U3"), ("c", "i2", (2,))])

VALUES: dict[str, Any] = {
    "containers": {
        "list": [1, 2.5, -3, True, None, "text", b"bytes", 1 + 2j],
        "tuple": (1, (2, (3,))),
        "set": {1, 2, 3},
        "frozenset": frozenset({"a", "b"}),
        "bytearray": bytearray(b"\x00\xffabc"),
        "empty_bytes": b"",
        "big_int": 2**100,
        "nan": float("nan"),
        "slice": slice(1, 10, 2),
        "range": range(3, 9),
        "ellipsis": ...,
        "not_implemented": NotImplemented,
        "object_class": object,
        "type": dict,
    },
    "collections": {
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "default": collections.defaultdict(list, {"k": [1]}),
        "deque": collections.deque([1, 2, 3], maxlen=5),
        "counter": collections.Counter("abracadabra"),
    },
    "stdlib_values": {
        "datetime": datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone.utc),
        "naive": datetime.datetime(2020, 1, 1),
        "date": datetime.date(1999, 12, 31),
        "time": datetime.time(23, 59, 1),
        "timedelta": datetime.timedelta(days=2, microseconds=5),
        "timezone": datetime.timezone(datetime.timedelta(hours=-3), "X"),
        "decimal": decimal.Decimal("-1.25E+7"),
        "fraction": fractions.Fraction(22, 7),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    },
    "float_array": np.linspace(0, 1, 7),
    "float32_2d": np.arange(12, dtype=np.float32).reshape(3, 4),
    "int_array": np.arange(-5, 5, dtype=np.int64),
    "big_endian": np.arange(4, dtype=">i4"),
    "bool_array": np.array([True, False]),
    "complex_array": np.array([1 + 2j, 3j]),
    "structured": np.array([(1.5, "ab", (1, 2)), (2.5, "c", (3, 4))], dtype=STRUCT),
    "aligned_struct": np.zeros(3, dtype=np.dtype([("a", "i1"), ("b", "f8")], align=True)),
    "titled_struct": np.zeros(2, dtype=np.dtype([(("title", "a"), "f4"), ("b", "i2")])),
    "non_contiguous": np.arange(40.0).reshape(5, 8)[::2, 1::3],
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "zero_d": np.array(3.5),
    "empty": np.zeros((0, 3)),
    "unicode": np.array(["alpha", "βeta", ""]),
    "bytes_array": np.array([b"x", b"yz"]),
    "datetimes": np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),
    "timedeltas": np.array([1, 2], dtype="timedelta64[ms]"),
    "float16": np.array([0.5, 2.0], dtype=np.float16),
    "scalars": [
        np.float64(1.5),
        np.float32(-2.0),
        np.int8(-3),
        np.uint64(2**63),
        np.bool_(True),
        np.str_("abc"),
        np.bytes_(b"xy"),
        np.complex128(1 - 1j),
        np.datetime64("2020-01-01T12:00"),
        np.timedelta64(5, "s"),
        np.zeros(1, dtype=STRUCT)[0],
    ],
    "dtypes": [
        np.dtype("f8"),
        np.dtype(">u2"),
        np.dtype("U7"),
        np.dtype("M8[ns]"),
        np.dtype("O"),
        STRUCT,
        np.dtype(("i4", (2, 3))),
        np.dtype(float, metadata={"unit": "m"}),
        np.dtype({"names": ["a", "b"], "formats": ["i4", "u4"], "offsets": [0, 0]}),
        np.dtype({"names": ["a"], "formats": ["f4"], "offsets": [4], "itemsize": 12}),
    ],
    "object_array": np.array([{"a": 1}, [1, 2], "text", None, 2.5, np.arange(3)], dtype=object),
    "object_2d": np.array([[1, "a"], [None, (1, 2)]], dtype=object),
    "struct_with_objects": np.array([(1.0, {"k": 1})], dtype=[("a", "f8"), ("b", "O")]),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", sorted(VALUES))
def test_harmless_states_round_trip(tmp_path: Path, name: str, protocol: int) -> None:
    value = VALUES[name]
    data = cloudpickle.dumps(value, protocol=protocol)
    loaded = safe_load_file(write(tmp_path, data))
    assert_same(loaded, pickle.loads(data))
    if name == "big_endian" and protocol < 5:
        # numpy's own protocol-2 unpickling returns big-endian data in native order
        assert np.array_equal(loaded, value)
    else:
        assert_same(loaded, value)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_protocol_round_trips(tmp_path: Path, protocol: int) -> None:
    value = {"arrays": [np.arange(3.0), np.zeros(2, dtype=STRUCT)], "when": datetime.date.today()}
    assert_same(roundtrip(tmp_path, value, protocol), value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_shared_dtype_is_the_rebuilt_one_everywhere(tmp_path: Path, protocol: int) -> None:
    """The dtype rebuilt from its state replaces the original in the memo as well."""
    a, b = np.zeros(2, dtype=STRUCT), np.ones(3, dtype=STRUCT)
    assert a.dtype is b.dtype  # pickled once, then fetched from the memo
    loaded = roundtrip(tmp_path, {"a": a, "b": b, "dtype": a.dtype}, protocol)
    for value in (loaded["a"], loaded["b"]):
        assert_same(value.dtype, STRUCT)
    assert loaded["dtype"] == STRUCT and loaded["dtype"].names == STRUCT.names
    assert_same(loaded["b"], b)


def test_numpy_1_module_names_load_without_warnings(tmp_path: Path) -> None:
    """numpy 1.x pickles name numpy.core.*; numpy 2 warns on that module, not here."""
    value = {"array": np.arange(4.0), "scalar": np.float32(2.5)}
    data = cloudpickle.dumps(value, protocol=2)
    assert b"numpy._core." in data
    legacy = data.replace(b"numpy._core.", b"numpy.core.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = safe_load_file(write(tmp_path, legacy))
    assert_same(loaded, value)


def test_safe_unpickler_class_reads_a_stream(tmp_path: Path) -> None:
    path = write(tmp_path, pickle.dumps({"x": np.arange(3)}, protocol=5))
    with open(path, "rb") as stream:
        loaded = SafeUnpickler(stream, source=str(path)).load()
    assert_same(loaded, {"x": np.arange(3)})


# --------------------------------------------------------------------------------------
# Code-running payloads
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_code_running_payloads_are_refused(
    tmp_path: Path, payload: str, place: str, protocol: int
) -> None:
    marker = tmp_path / "marker"
    data = cloudpickle.dumps(PLACES[place](PAYLOADS[payload](marker)), protocol=protocol)
    path = write(tmp_path, data)

    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load_file(path)
    assert not marker.exists()
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert "ckptable.add_safe_classes(" in str(info.value)

    pickle.loads(data)  # the same bytes, unrestricted: the payload runs
    assert marker.exists()


def test_the_refusal_names_the_global_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, cloudpickle.dumps({"p": Point(1, 2)}))
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load_file(path)
    message = str(info.value)
    assert f"'{Point.__module__}.Point'" in message
    assert str(path) in message
    assert f"ckptable.add_safe_classes({Point.__module__}.Point)" in message


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_class_pickled_by_value_is_refused(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "marker"

    class Local:
        def __setstate__(self, state: dict[str, Any]) -> None:
            Path(state["marker"]).touch()

    local = Local()
    local.marker = str(marker)  # type: ignore[attr-defined]
    data = cloudpickle.dumps({"obj": local}, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="cloudpickle"):
        safe_load_file(write(tmp_path, data))
    assert not marker.exists()
    pickle.loads(data)
    assert marker.exists()


def test_a_function_pickled_by_value_is_refused(tmp_path: Path) -> None:
    def local(x: int) -> int:
        return x + 1

    with pytest.raises(UnsafeCheckpointError):
        roundtrip(tmp_path, {"fn": local}, 5)


def test_persistent_ids_are_refused(tmp_path: Path) -> None:
    data = pickle.PROTO + b"\x02" + Ops.text("some-id") + pickle.BINPERSID + pickle.STOP
    with pytest.raises(UnsafeCheckpointError, match="persistent id"):
        safe_load_file(write(tmp_path, data))


def test_extension_codes_go_through_the_allowlist_even_when_cached(tmp_path: Path) -> None:
    """copyreg's extension cache holds what an earlier unrestricted load resolved."""
    code = 0x3FFF1234
    copyreg.add_extension("os", "getcwd", code)
    try:
        data = pickle.PROTO + b"\x02" + pickle.EXT4 + struct.pack("<i", code) + pickle.STOP
        assert pickle.loads(data) is os.getcwd  # now in copyreg._extension_cache
        with pytest.raises(UnsafeCheckpointError, match="os.getcwd"):
            safe_load_file(write(tmp_path, data))
    finally:
        copyreg.remove_extension("os", "getcwd", code)


def test_getattr_only_reaches_allowlisted_names(tmp_path: Path) -> None:
    """Protocols 2 and 3 name nested classes as getattr(Outer, "Inner")."""
    on_an_instance = (
        pickle.PROTO
        + b"\x02"
        + Ops.glob("builtins", "getattr")
        + pickle.MARK
        + pickle.EMPTY_DICT
        + Ops.text("keys")
        + pickle.TUPLE
        + pickle.REDUCE
        + pickle.STOP
    )
    assert callable(pickle.loads(on_an_instance))
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        safe_load_file(write(tmp_path, on_an_instance))

    on_a_builtin = pickle.dumps(dict.fromkeys, protocol=2)
    assert b"getattr" in on_a_builtin
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.dict\.fromkeys"):
        safe_load_file(write(tmp_path, on_a_builtin))


def test_build_cannot_change_a_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Victim, "flag", False)  # restored after the unrestricted load
    data = (
        pickle.PROTO
        + b"\x02"
        + Ops.glob(Victim.__module__, "Victim")
        + pickle.NONE
        + pickle.EMPTY_DICT
        + Ops.text("flag")
        + pickle.NEWTRUE
        + pickle.SETITEM
        + pickle.TUPLE2
        + pickle.BUILD
        + pickle.STOP
    )
    with pytest.raises(UnsafeCheckpointError, match="not an instance"):
        safe_load_file(write(tmp_path, data), allowed=[Victim])
    assert Victim.flag is False
    pickle.loads(data)
    assert Victim.flag is True


def test_codecs_encode_is_limited_to_text_codecs(tmp_path: Path) -> None:
    data = (
        pickle.PROTO
        + b"\x02"
        + Ops.glob("_codecs", "encode")
        + pickle.MARK
        + Ops.text("abc")
        + Ops.text("rot13")
        + pickle.TUPLE
        + pickle.REDUCE
        + pickle.STOP
    )
    assert pickle.loads(data) == "nop"
    with pytest.raises(UnsafeCheckpointError, match="rot13"):
        safe_load_file(write(tmp_path, data))


# --------------------------------------------------------------------------------------
# numpy payloads that corrupt memory with allowlisted globals only
# --------------------------------------------------------------------------------------


def test_a_dtype_with_forged_flags_is_refused(tmp_path: Path) -> None:
    """A structured dtype whose state claims its object field holds no objects."""
    forged_state = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)
    dtype = Reduce(np.dtype, ("V8", False, True), forged_state)
    data = pickle.dumps(Reduce(_frombuffer, (bytes(8), dtype, (1,), "C")), protocol=5)

    with pytest.raises(UnsafeCheckpointError, match="inconsistent numpy dtype"):
        safe_load_file(write(tmp_path, data))

    array = pickle.loads(data)  # an array of a raw pointer (NULL) that numpy ignores
    assert array.dtype.fields["a"][0] == np.dtype("O") and not array.dtype.hasobject


@pytest.mark.parametrize(
    "state",
    [
        # an int field far outside the 8-byte item: reads beyond the buffer
        (3, "|", None, ("a",), {"a": (np.dtype("i8"), 4096)}, 8, 1, 0),
        # a field that is not among the names
        (3, "|", None, ("a",), {"a": (np.dtype("i4"), 0), "b": (np.dtype("O"), 0)}, 8, 1, 0),
        # a field whose type is not a dtype
        (3, "|", None, ("a",), {"a": ("junk", 0)}, 8, 1, 0),
    ],
    ids=["out_of_bounds", "hidden_field", "not_a_dtype"],
)
def test_other_inconsistent_dtypes_are_refused(tmp_path: Path, state: tuple[Any, ...]) -> None:
    data = pickle.dumps(Reduce(np.dtype, ("V8", False, True), state), protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="inconsistent numpy dtype"):
        safe_load_file(write(tmp_path, data))


def test_a_dtype_changed_after_use_leaves_its_arrays_alone(tmp_path: Path) -> None:
    """An array built with a dtype before the pickle sets that dtype's state.

    Unrestricted, the array's raw bytes become object pointers. Here the state goes to a
    copy of the dtype and the array keeps the plain one.
    """
    dtype = Reduce(np.dtype, ("V8", False, True))
    early = Reduce(_frombuffer, (bytes(8), dtype, (1,), "C"))
    dtype.state = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 27, {"x": early})
    data = pickle.dumps(dtype, protocol=2)

    loaded = safe_load_file(write(tmp_path, data))
    assert loaded.names == ("a",)  # the dtype itself is as pickled
    assert loaded.metadata["x"].dtype == np.dtype("V8")
    assert not loaded.metadata["x"].dtype.hasobject

    unrestricted = pickle.loads(data)
    assert unrestricted.metadata["x"].dtype.hasobject  # raw bytes read as objects


def test_calling_ndarray_directly_is_refused(tmp_path: Path) -> None:
    """numpy.ndarray(shape, object, buffer) reads object pointers from the bytes."""
    data = pickle.dumps(Reduce(np.ndarray, ((1,), np.dtype("O"), bytes(8))), protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="numpy.ndarray"):
        safe_load_file(write(tmp_path, data))
    array = pickle.loads(data)
    assert array.dtype == np.dtype("O") and array[0] is None  # NULL read as an object


def test_resetting_an_array_with_live_views_is_refused(tmp_path: Path) -> None:
    """BUILD on an array that has data frees the memory a view of it still uses."""
    data = (
        pickle.PROTO
        + b"\x03"
        + Ops.glob("numpy._core.multiarray", "_reconstruct")
        + Ops.glob("numpy", "ndarray")
        + Ops.int_(1000)
        + pickle.TUPLE1
        + Ops.dtype("f8")
        + pickle.TUPLE3
        + pickle.REDUCE
        + Ops.put(0)  # a: 1000 float64, 8000 bytes
        + Ops.glob("numpy._core.numeric", "_frombuffer")
        + pickle.MARK
        + Ops.get(0)
        + Ops.dtype("f8")
        + Ops.int_(1000)
        + pickle.TUPLE1
        + Ops.text("C")
        + pickle.TUPLE
        + pickle.REDUCE
        + Ops.put(1)  # view: a view of a's 8000 bytes
        + pickle.POP
        + pickle.MARK  # a.__setstate__((1, (1,), float64, False, 8 bytes))
        + Ops.int_(1)
        + Ops.int_(1)
        + pickle.TUPLE1
        + Ops.dtype("f8")
        + pickle.NEWFALSE
        + Ops.raw(bytes(8))
        + pickle.TUPLE
        + pickle.BUILD
        + Ops.get(1)
        + pickle.TUPLE2
        + pickle.STOP
    )
    with pytest.raises(UnsafeCheckpointError, match="a view of an array could outlive"):
        safe_load_file(write(tmp_path, data))

    array, view = pickle.loads(data)
    dangling = array.size == 1 and view.size == 1000 and view.base is array
    assert dangling  # the view's 8000 bytes were freed (never read them)
    del array, view


def test_setting_a_numpy_scalar_state_is_refused(tmp_path: Path) -> None:
    data = pickle.dumps(Reduce(np.float64, (1.0,), (1, 2)), protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="numpy scalar"):
        safe_load_file(write(tmp_path, data), allowed=[np.float64])


def test_object_arrays_from_raw_bytes_are_refused_by_numpy(tmp_path: Path) -> None:
    """The allowlisted rebuilders refuse object dtypes with raw bytes themselves."""
    for reduce in (
        Reduce(_frombuffer, (bytes(8), np.dtype("O"), (1,), "C")),
        Reduce(_frombuffer, (bytes(16), np.dtype([("a", "f8"), ("b", "O")]), (1,), "C")),
        Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), np.dtype("O"), False, bytes(8))),
    ):
        data = pickle.dumps(reduce, protocol=5)
        with pytest.raises(UnsafeCheckpointError, match="Python objects"):
            safe_load_file(write(tmp_path, data))


# --------------------------------------------------------------------------------------
# add_safe_classes, allowed, allow_subclasses_of
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_add_safe_classes_makes_a_user_class_loadable(
    tmp_path: Path, registry: None, protocol: int
) -> None:
    value = {"points": [Point(1, 2), Point(3.5, -1)]}
    path = write(tmp_path, cloudpickle.dumps(value, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError):
        safe_load_file(path)

    add_safe_classes(Point)
    assert (Point.__module__, "Point") in safe_classes()
    assert safe_load_file(path) == value


def test_the_registry_fixture_restores_it() -> None:
    assert (Point.__module__, "Point") not in safe_classes()


def test_safe_classes_is_a_read_only_snapshot(registry: None) -> None:
    add_safe_classes(Point, Base)
    snapshot = safe_classes()
    assert isinstance(snapshot, frozenset)
    assert {(Point.__module__, "Point"), (Base.__module__, "Base")} <= snapshot
    add_safe_classes(Child)
    assert (Child.__module__, "Child") not in snapshot


def test_nested_classes(tmp_path: Path, registry: None) -> None:
    value = Outer.Inner(7)
    add_safe_classes(Outer.Inner)
    assert (Outer.__module__, "Outer.Inner") in safe_classes()
    assert roundtrip(tmp_path, value, 5) == value
    # protocol 2 names it getattr(Outer, "Inner"): the enclosing class must be allowed too
    with pytest.raises(UnsafeCheckpointError, match="Outer'"):
        roundtrip(tmp_path, value, 2)
    add_safe_classes(Outer)
    assert roundtrip(tmp_path, value, 2) == value


def test_builtin_getattr_reaches_a_nested_class_through_the_allowlist(tmp_path: Path) -> None:
    data = pickle.dumps(Outer.Inner(3), protocol=2)
    assert b"getattr" in data
    loaded = safe_load_file(write(tmp_path, data), allowed=[Outer, Outer.Inner])
    assert loaded == Outer.Inner(3)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(Point(1, 2), id="instance"),
        pytest.param(lambda: None, id="lambda"),
        pytest.param(os, id="module"),
        pytest.param(3, id="int"),
    ],
)
def test_add_safe_classes_rejects_what_has_no_importable_name(registry: None, bad: Any) -> None:
    before = safe_classes()
    with pytest.raises(TypeError):
        add_safe_classes(Point, bad)
    assert safe_classes() == before  # all or nothing


def test_add_safe_classes_rejects_local_classes(registry: None) -> None:
    class Local:
        pass

    with pytest.raises(TypeError, match="inside a function"):
        add_safe_classes(Local)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_allowed_is_for_one_load_only(tmp_path: Path, protocol: int) -> None:
    value = [Point(1, 2), Base(3)]
    path = write(tmp_path, cloudpickle.dumps(value, protocol=protocol))
    assert safe_load_file(path, allowed=[Point, Base]) == value
    with pytest.raises(UnsafeCheckpointError, match="Base"):
        safe_load_file(path, allowed=[Point])
    assert (Point.__module__, "Point") not in safe_classes()


def test_allowed_rejects_what_has_no_importable_name(tmp_path: Path) -> None:
    path = write(tmp_path, pickle.dumps(1))
    with pytest.raises(TypeError):
        safe_load_file(path, allowed=[Point(1, 2)])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_allow_subclasses_of_accepts_imported_subclasses(tmp_path: Path, protocol: int) -> None:
    value = [Child(1), Base(2)]
    assert roundtrip(tmp_path, value, protocol, allow_subclasses_of=Base) == value
    nested = Outer.Inner(3)  # a nested subclass, found by its qualified name
    assert roundtrip(tmp_path, nested, 5, allow_subclasses_of=Base) == nested
    with pytest.raises(UnsafeCheckpointError, match="Point"):
        roundtrip(tmp_path, [Child(1), Point(0, 0)], protocol, allow_subclasses_of=Base)


def test_allow_subclasses_of_only_accepts_classes(tmp_path: Path) -> None:
    path = write(tmp_path, pickle.dumps(os.system))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        safe_load_file(path, allow_subclasses_of=object)
    with pytest.raises(TypeError):
        safe_load_file(path, allow_subclasses_of=Base(1))  # type: ignore[arg-type]


def test_allow_subclasses_of_never_imports(tmp_path: Path) -> None:
    """Even with ``object`` as the base, a module that is not imported is not imported."""
    for module, name in [("ckptable_no_such_module", "Evil"), ("this", "s")]:
        if module in sys.modules:
            pytest.skip(f"{module} is already imported")
        before = set(sys.modules)
        path = write(tmp_path, global_pickle(module, name))
        with pytest.raises(UnsafeCheckpointError, match=f"{module}.{name}"):
            safe_load_file(path, allow_subclasses_of=object)
        assert set(sys.modules) == before


def test_allow_subclasses_of_runs_no_module_getattr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lazy module's ``__getattr__`` (which may import) is never called."""
    calls: list[str] = []
    lazy = types.ModuleType("ckptable_lazy_module")

    def module_getattr(name: str) -> type:
        calls.append(name)
        return Child

    lazy.__getattr__ = module_getattr  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "ckptable_lazy_module", lazy)
    assert lazy.Anything is Child and calls == ["Anything"]  # the hook works

    path = write(tmp_path, global_pickle("ckptable_lazy_module", "Lazy"))
    with pytest.raises(UnsafeCheckpointError):
        safe_load_file(path, allow_subclasses_of=Base)
    assert calls == ["Anything"]


@pytest.mark.parametrize("module", ["ckptable_fake_module", "ckptable_fake_pkg.sub", "this"])
def test_unknown_modules_are_never_imported(tmp_path: Path, module: str) -> None:
    if module in sys.modules:
        pytest.skip(f"{module} is already imported")
    before = set(sys.modules)
    by_opcode = pickle.PROTO + b"\x02" + Ops.glob(module, "x") + pickle.STOP
    for data in (global_pickle(module, "Thing"), by_opcode):
        with pytest.raises(UnsafeCheckpointError, match=module):
            safe_load_file(write(tmp_path, data))
    assert set(sys.modules) == before


# --------------------------------------------------------------------------------------
# msgpack
# --------------------------------------------------------------------------------------


# msgpack's module-level functions may be patched by msgpack_numpy.patch() (RLlib calls it
# on import, so in a full test run they are): use the implementation's own, as ckptable does.
_PACKB, _UNPACKB, _ = unpatched_msgpack()


def pack(value: Any) -> bytes:
    return _PACKB(value, default=msgpack_numpy.encode, use_bin_type=True)


def safe_unpack(data: bytes) -> Any:
    return _UNPACKB(data, object_hook=safe_msgpack_decode, strict_map_key=False, raw=False)


def plain_unpack(data: bytes) -> Any:
    return _UNPACKB(data, object_hook=msgpack_numpy.decode, strict_map_key=False, raw=False)


MSGPACK_VALUES: dict[str, Any] = {
    "float_array": np.linspace(0, 1, 5),
    "int_2d": np.arange(12, dtype=np.int32).reshape(3, 4),
    "structured": np.array([(1.5, "ab", (1, 2))], dtype=STRUCT),
    "nested_structured": np.zeros(2, dtype=[("p", [("x", "f4"), ("y", "f4")]), ("n", "i8")]),
    "non_contiguous": np.arange(30.0).reshape(5, 6)[::2, ::3],
    "zero_d": np.array(4.25),
    "strings": np.array(["a", "bcd"]),
    "bytes": np.array([b"x", b"yz"]),
    "bool": np.array([True, False]),
    "scalars": [np.float32(1.5), np.int64(-7), np.bool_(False), np.complex64(1 + 1j)],
    "plain": {"a": [1, 2.5, "x", None], "b": {1: b"raw"}, "c": 3 + 4j},
}


@pytest.mark.parametrize("name", sorted(MSGPACK_VALUES))
def test_msgpack_round_trips(tmp_path: Path, name: str) -> None:
    value = MSGPACK_VALUES[name]
    path = tmp_path / "state.msgpack"
    path.write_bytes(pack(value))
    data = path.read_bytes()
    loaded = safe_unpack(data)
    expected = plain_unpack(data)
    assert_same(loaded, expected)
    if isinstance(value, np.ndarray):
        assert_same(loaded, value)


def test_msgpack_object_arrays_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "state.msgpack"
    path.write_bytes(pack({"w": np.array([1, touch_payload(marker)], dtype=object)}))
    data = path.read_bytes()
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        safe_unpack(data)
    assert not marker.exists()
    plain_unpack(data)
    assert marker.exists()


def forged_array(kind: bytes, descr: Any, data: bytes, nd: bool = True) -> bytes:
    return _PACKB(
        {"w": {b"nd": nd, b"type": descr, b"kind": kind, b"shape": [1], b"data": data}},
        use_bin_type=True,
    )


@pytest.mark.parametrize(
    ("kind", "descr"),
    [
        pytest.param(b"", "|O", id="object_under_no_kind"),
        pytest.param(b"V", [["a", "|O"]], id="struct_with_object_field"),
        pytest.param(b"V", [["a", "<f8"], ["b", [["c", "|O"]]]], id="nested_object_field"),
        pytest.param(b"", [["a", "|O", [1]]], id="object_subarray"),
        pytest.param("O", "|O", id="kind_as_text"),
    ],
)
def test_msgpack_object_dtypes_from_raw_bytes_are_refused(kind: Any, descr: Any) -> None:
    """Without the check, numpy reads the file's bytes as object pointers."""
    data = forged_array(kind, descr, bytes(16)[: np.dtype(_descr(descr)).itemsize])
    with pytest.raises(UnsafeCheckpointError, match="objects"):
        safe_unpack(data)
    array = plain_unpack(data)["w"]
    assert array.dtype.hasobject  # built from raw (zero) bytes: NULL pointers


def _descr(descr: Any) -> Any:
    if isinstance(descr, list):
        return [(d[0], _descr(d[1]), *d[2:]) for d in descr]
    return descr


def test_msgpack_errors_can_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.msgpack"
    path.write_bytes(pack({"w": np.array([1, None], dtype=object)}))
    hook = functools.partial(safe_msgpack_decode, source=str(path))
    with pytest.raises(UnsafeCheckpointError) as info:
        _UNPACKB(path.read_bytes(), object_hook=hook, strict_map_key=False, raw=False)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_msgpack_object_scalars_are_refused() -> None:
    data = forged_array(b"", "|O", bytes(8), nd=False)
    with pytest.raises(UnsafeCheckpointError, match="objects"):
        safe_unpack(data)


def test_msgpack_maps_that_are_not_arrays_pass_through() -> None:
    for value in ({b"nd": True}, {b"nd": False, b"kind": b"O"}, {"nd": 1, "x": [1]}):
        data = _PACKB(value, use_bin_type=True)
        assert safe_unpack(data) == plain_unpack(data) == value


def test_msgpack_chain_is_passed_on() -> None:
    seen: list[Any] = []

    def chain(obj: Any) -> Any:
        seen.append(obj)
        return "chained"

    assert safe_msgpack_decode({"a": 1}, chain=chain) == "chained"
    assert seen == [{"a": 1}]


def test_msgpack_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "msgpack_numpy", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'ckptable\[msgpack\]'"):
        safe_msgpack_decode({"a": 1})


def test_no_plain_pickle_reader_is_used_by_the_msgpack_hook(tmp_path: Path) -> None:
    """A pickle inside a harmless-looking map is data, not code."""
    marker = tmp_path / "marker"
    blob = pickle.dumps(touch_payload(marker))
    assert safe_unpack(_PACKB({"blob": blob}, use_bin_type=True)) == {"blob": blob}
    assert not marker.exists()


def test_io_streams_work(tmp_path: Path) -> None:
    assert safe_pickle_load(io.BytesIO(pickle.dumps([1, 2]))) == [1, 2]
