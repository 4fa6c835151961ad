"""Safe mode checks the *arguments* of every allowlisted callable, not only its name.

The payloads are hand-assembled pickles (raw opcodes): each calls a global that is on
ckptable's allowlist with arguments no pickler writes, to read memory the process freed
earlier, to allocate far more than the file holds, to import a module or to crash numpy.
``safe_pickle_load`` must refuse each one with a ckptable error that names the file
(never ``MemoryError``, ``TypeError``, ``ValueError`` or a crash), and everything that
numpy and the standard library pickle themselves must still load.

Payloads that would crash the interpreter (numpy reads past the end of its data) are
loaded in a child process, so that a crash fails that test instead of the whole run.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import cloudpickle
import numpy as np
import pytest

import ckptable
from ckptable import (
    Checkpointable,
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    _safe,
)
from ckptable._safe import safe_pickle_load
from helpers import reseal

#: More than any machine can allocate (above the 47-bit address space): a load that tries
#: fails fast with MemoryError instead of exhausting the machine.
HUGE = 2**52

#: What a secret left in freed memory looks like.
MARKER = b"CKPTABLE-SECRET-"

#: numpy's array rebuilder, under both module names (numpy 1.x and 2.x pickles).
RECONSTRUCT_MODULES = ["numpy.core.multiarray", "numpy._core.multiarray"]


# --------------------------------------------------------------------------------------
# Hand-assembled pickles
# --------------------------------------------------------------------------------------


class Op:
    """Pickle opcodes with their arguments, as bytes."""

    @staticmethod
    def proto(version: int = 2) -> bytes:
        return pickle.PROTO + bytes([version])

    @staticmethod
    def glob(module: str, name: str) -> bytes:
        return pickle.GLOBAL + f"{module}\n{name}\n".encode()

    @staticmethod
    def int_(value: int) -> bytes:
        if -(2**31) <= value < 2**31:
            return pickle.BININT + struct.pack("<i", value)
        data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return pickle.LONG1 + bytes([len(data)]) + data

    @staticmethod
    def text(value: str) -> bytes:
        data = value.encode("utf-8", "surrogatepass")
        return pickle.BINUNICODE + struct.pack("<I", len(data)) + data

    @staticmethod
    def raw(data: bytes) -> bytes:
        return pickle.BINBYTES + struct.pack("<I", len(data)) + data

    @classmethod
    def tuple_(cls, *items: bytes) -> bytes:
        return pickle.MARK + b"".join(items) + pickle.TUPLE

    @classmethod
    def call(cls, module: str, name: str, *args: bytes) -> bytes:
        """``module.name(*args)``: GLOBAL, the argument tuple, REDUCE."""
        return cls.glob(module, name) + cls.tuple_(*args) + pickle.REDUCE

    @classmethod
    def new(cls, module: str, name: str, *args: bytes) -> bytes:
        """``module.name.__new__(module.name, *args)``: NEWOBJ."""
        return cls.glob(module, name) + cls.tuple_(*args) + pickle.NEWOBJ

    @classmethod
    def dtype(cls, spec: str) -> bytes:
        """``numpy.dtype(spec, False, True)``, as numpy pickles a dtype (no state)."""
        return cls.call("numpy", "dtype", cls.text(spec), pickle.NEWFALSE, pickle.NEWTRUE)

    @classmethod
    def range_(cls, n: int) -> bytes:
        return cls.call("builtins", "range", cls.int_(n))

    @classmethod
    def reconstruct(cls, shape: tuple[int, ...], module: str = "numpy._core.multiarray") -> bytes:
        """numpy's ``_reconstruct(ndarray, shape, b"b")`` (numpy itself writes ``(0,)``)."""
        return cls.call(
            module,
            "_reconstruct",
            cls.glob("numpy", "ndarray"),
            cls.tuple_(*(cls.int_(dim) for dim in shape)),
            cls.raw(b"b"),
        )

    @classmethod
    def array_state(
        cls, shape: tuple[int, ...], dtype: str, data: bytes, *, version: int = 1
    ) -> bytes:
        """The state ``ndarray.__setstate__`` takes, ready for BUILD."""
        return cls.tuple_(
            cls.int_(version),
            cls.tuple_(*(cls.int_(dim) for dim in shape)),
            cls.dtype(dtype),
            pickle.NEWFALSE,
            data,
        )


def whole(*ops: bytes, protocol: int = 2) -> bytes:
    """A complete pickle: PROTO, the opcodes, STOP."""
    return Op.proto(protocol) + b"".join(ops) + pickle.STOP


def write(tmp_path: Path, data: bytes, name: str = "state.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def safe_load_file(path: Path, **kwargs: Any) -> Any:
    with open(path, "rb") as stream:
        return safe_pickle_load(stream, source=str(path), **kwargs)


def assert_refused(
    tmp_path: Path, data: bytes, error: type[CheckpointError] = UnsafeCheckpointError
) -> CheckpointError:
    """The safe load of ``data`` raises ``error`` naming the file (any other exception,
    ``MemoryError`` or ``TypeError`` say, fails the test as it is)."""
    path = write(tmp_path, data)
    with pytest.raises(CheckpointError) as info:
        safe_load_file(path)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {info.value}"
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value


def load_or_error(path: Path) -> tuple[Any, CheckpointError | None]:
    """The safe load's value, or the ckptable error it raised (others propagate)."""
    try:
        return safe_load_file(path), None
    except CheckpointError as exc:
        return None, exc


def plant_secret(size: int) -> None:
    """Fill memory of about ``size`` bytes with MARKER, then free it.

    Without the fix, an array numpy allocates next (uninitialised) typically lands in
    that memory and shows the marker.
    """
    blobs = [bytearray(MARKER * (size // len(MARKER) + 1)) for _ in range(16)]
    del blobs


def run_in_child(data: bytes, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Load ``data`` with ``safe_pickle_load`` in a child process (it may crash numpy)."""
    path = write(tmp_path, data, "crash.pkl")
    script = textwrap.dedent(
        f"""
        from ckptable import CheckpointError
        from ckptable._safe import safe_pickle_load
        try:
            with open({str(path)!r}, "rb") as stream:
                safe_pickle_load(stream, source={str(path)!r})
        except CheckpointError as exc:
            print("refused:", type(exc).__name__, exc)
        else:
            print("loaded")
        """
    )
    src = str(Path(ckptable.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )


# --------------------------------------------------------------------------------------
# Arrays over uninitialised memory
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", RECONSTRUCT_MODULES)
def test_reconstruct_without_build_is_refused_and_leaks_nothing(
    tmp_path: Path, module: str
) -> None:
    """The reported hole: ``_reconstruct(ndarray, (n,), b"b")`` and no BUILD."""
    size = 1 << 16
    data = whole(Op.reconstruct((size,), module), protocol=2)
    plant_secret(size)
    exc = assert_refused(tmp_path, data)
    assert "never gives it its data" in str(exc)

    # The same bytes, unrestricted: an array of 65536 bytes nobody initialised.
    plant_secret(size)
    leaked = pickle.loads(data)
    assert isinstance(leaked, np.ndarray) and leaked.shape == (size,)


def test_a_pending_array_inside_a_container_is_refused(tmp_path: Path) -> None:
    """Referenced from a list (or anywhere) and never built: still refused at STOP."""
    size = 1 << 14
    data = whole(
        pickle.EMPTY_LIST, pickle.MARK, Op.reconstruct((size,)), Op.int_(1), pickle.APPENDS
    )
    plant_secret(size)
    assert_refused(tmp_path, data)
    assert pickle.loads(data)[0].shape == (size,)


def test_a_pending_array_that_gets_its_build_holds_exactly_its_data(tmp_path: Path) -> None:
    """A non-zero ``_reconstruct`` shape followed by a correct BUILD loads (empty until
    its BUILD), and nothing but the BUILD's bytes ends up in it."""
    values = np.arange(4096, dtype=np.int64)
    state = Op.array_state((4096,), "<i8", Op.raw(values.tobytes()))
    data = whole(Op.reconstruct((4096,)), state, pickle.BUILD)
    plant_secret(values.nbytes)
    loaded = safe_load_file(write(tmp_path, data))
    assert loaded.dtype == np.int64 and np.array_equal(loaded, values)
    assert MARKER not in loaded.tobytes()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param((Op.glob("numpy", "ndarray"), Op.glob("numpy", "ndarray")), id="ndarray"),
        pytest.param((Op.glob("numpy", "ndarray"), Op.glob("builtins", "object")), id="object"),
    ],
)
def test_copyreg_reconstructor_never_makes_arrays(tmp_path: Path, args: tuple[bytes, ...]) -> None:
    """``copyreg._reconstructor(ndarray, ndarray, shape)`` is ``ndarray.__new__(shape)``:
    uninitialised memory, with or without a BUILD after it."""
    shape = Op.tuple_(Op.int_(1 << 16))
    state = shape if args[1] == Op.glob("numpy", "ndarray") else pickle.NONE
    data = whole(Op.call("copyreg", "_reconstructor", *args, state))
    exc = assert_refused(tmp_path, data)
    assert "uninitialised memory" in str(exc)
    if args[1] == Op.glob("numpy", "ndarray"):
        assert pickle.loads(data).shape == (1 << 16,)  # unrestricted: an uninitialised array


def test_ndarray_is_never_called_or_new_ed(tmp_path: Path) -> None:
    shape = Op.tuple_(Op.int_(HUGE >> 26), Op.int_(1 << 26))
    for data in (
        whole(Op.call("numpy", "ndarray", shape)),
        whole(Op.new("numpy", "ndarray", shape)),
    ):
        assert_refused(tmp_path, data)


def test_build_only_sets_an_array_reconstruct_made_once(tmp_path: Path) -> None:
    """``ndarray.__setstate__`` frees the array's memory: only arrays that no view can
    share (made by ``_reconstruct`` in this load, not yet set) may get it."""
    state = Op.array_state((1,), "<f8", Op.raw(bytes(8)))
    empty_state = Op.array_state((0,), "<f8", Op.raw(b""))

    def from_buffer(size: int) -> bytes:
        return frombuffer(Op.raw(bytes(8 * size)), Op.dtype("<f8"), (size,))

    for data in (
        whole(from_buffer(1), state, pickle.BUILD),  # an array that holds data
        whole(from_buffer(0), state, pickle.BUILD),  # one _reconstruct did not make
        whole(Op.reconstruct((0,)), state, pickle.BUILD, state, pickle.BUILD),
        whole(Op.reconstruct((0,)), empty_state, pickle.BUILD, state, pickle.BUILD),
    ):
        assert "already holds data" in str(assert_refused(tmp_path, data))


# --------------------------------------------------------------------------------------
# ndarray.__setstate__ (BUILD), _frombuffer and scalar with crafted arguments
# --------------------------------------------------------------------------------------

BAD_ARRAY_STATES = {
    "data_too_long": Op.array_state((2,), "<f8", Op.raw(bytes(24))),
    "data_too_short": Op.array_state((2,), "<f8", Op.raw(bytes(8))),
    "objects_from_bytes": Op.array_state((1,), "|O", Op.raw(bytes(8))),
    "bytearray_data": Op.array_state((1,), "|u1", Op.call("builtins", "bytearray", Op.raw(b"x"))),
    "negative_dim": Op.array_state((-1,), "|u1", Op.raw(b"")),
    "version_7": Op.array_state((1,), "|u1", Op.raw(b"x"), version=7),
    "dtype_is_text": Op.tuple_(
        Op.int_(1), Op.tuple_(Op.int_(1)), Op.text("u1"), pickle.NEWFALSE, Op.raw(b"x")
    ),
    "not_a_tuple": pickle.EMPTY_DICT,
}


@pytest.mark.parametrize("name", sorted(BAD_ARRAY_STATES))
def test_inconsistent_array_states_are_refused(tmp_path: Path, name: str) -> None:
    data = whole(Op.reconstruct((0,)), BAD_ARRAY_STATES[name], pickle.BUILD)
    assert_refused(tmp_path, data)


def frombuffer(buffer: bytes, dtype: bytes, shape: tuple[int, ...], order: str = "C") -> bytes:
    return Op.call(
        "numpy._core.numeric",
        "_frombuffer",
        buffer,
        dtype,
        Op.tuple_(*(Op.int_(dim) for dim in shape)),
        Op.text(order),
    )


BAD_FROMBUFFER = {
    "object_dtype": frombuffer(Op.raw(bytes(8)), Op.dtype("|O"), (1,)),
    "shape_past_the_buffer": frombuffer(Op.raw(bytes(8)), Op.dtype("<f8"), (HUGE,)),
    "shape_short_of_the_buffer": frombuffer(Op.raw(bytes(16)), Op.dtype("<f8"), (1,)),
    "array_as_buffer": frombuffer(Op.reconstruct((0,)), Op.dtype("<f8"), (0,)),
    "text_as_buffer": frombuffer(Op.text("abcdefgh"), Op.dtype("<f8"), (1,)),
    "order_k": frombuffer(Op.raw(bytes(8)), Op.dtype("<f8"), (1,), "K"),
    "dtype_is_text": frombuffer(Op.raw(bytes(8)), Op.text("<f8"), (1,)),
}


@pytest.mark.parametrize("name", sorted(BAD_FROMBUFFER))
def test_frombuffer_with_crafted_arguments_is_refused(tmp_path: Path, name: str) -> None:
    assert_refused(tmp_path, whole(BAD_FROMBUFFER[name]))


def scalar(*args: bytes) -> bytes:
    return Op.call("numpy._core.multiarray", "scalar", *args)


BAD_SCALARS = {
    "short_bytes": scalar(Op.dtype("<f8"), Op.raw(b"ab")),
    "long_bytes": scalar(Op.dtype("<f8"), Op.raw(bytes(16))),
    "no_data_huge_item": scalar(Op.dtype(f"V{2**31 - 1}")),
    "object_dtype": scalar(Op.dtype("|O"), pickle.NONE),
    "dtype_is_text": scalar(Op.text("<f8"), Op.raw(bytes(8))),
}


@pytest.mark.parametrize("name", sorted(BAD_SCALARS))
def test_scalars_with_crafted_arguments_are_refused(tmp_path: Path, name: str) -> None:
    assert_refused(tmp_path, whole(BAD_SCALARS[name]))


#: A structured dtype with an object field: ``numpy.dtype("V8")`` with its state set.
STRUCT_WITH_OBJECT = (
    Op.dtype("V8")
    + Op.tuple_(
        Op.int_(3),
        Op.text("|"),
        pickle.NONE,
        Op.tuple_(Op.text("a")),
        pickle.EMPTY_DICT + Op.text("a") + Op.tuple_(Op.dtype("|O"), Op.int_(0)) + pickle.SETITEM,
        Op.int_(8),
        Op.int_(1),
        Op.int_(27),  # the flags numpy gives it: it holds objects
    )
    + pickle.BUILD
)

CRASHING = {
    # numpy fills an object array from the list and reads past the end of a short one
    "short_object_list": whole(
        Op.reconstruct((0,)),
        Op.array_state((64,), "|O", pickle.EMPTY_LIST),
        pickle.BUILD,
    ),
    # numpy reads one item of the scalar's dtype from an empty array's memory
    "struct_scalar_from_an_empty_array": whole(
        STRUCT_WITH_OBJECT + pickle.BINPUT + b"\x00",
        pickle.POP,
        scalar(
            pickle.BINGET + b"\x00",
            Op.reconstruct((0,))
            + Op.tuple_(
                Op.int_(1),
                Op.tuple_(Op.int_(0)),
                pickle.BINGET + b"\x00",
                pickle.NEWFALSE,
                pickle.EMPTY_LIST,
            )
            + pickle.BUILD,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CRASHING))
def test_pickles_that_crash_numpy_are_refused(tmp_path: Path, name: str) -> None:
    """Run in a child: unchecked, these make numpy read memory past its data."""
    result = run_in_child(CRASHING[name], tmp_path)
    assert result.returncode == 0, f"the child died ({result.returncode}): {result.stderr}"
    assert result.stdout.startswith("refused: UnsafeCheckpointError"), result.stdout


def test_a_structured_scalar_with_objects_still_loads(tmp_path: Path) -> None:
    """What numpy writes for that scalar (a 0-d array of its dtype) is accepted."""
    value = np.array([(1.5, {"k": 1})], dtype=[("a", "f8"), ("b", "O")])[0]
    for protocol in (2, 5):
        loaded = safe_load_file(write(tmp_path, pickle.dumps(value, protocol=protocol)))
        assert loaded["a"] == 1.5 and loaded["b"] == {"k": 1}


# --------------------------------------------------------------------------------------
# Builtins and the standard library with hostile arguments
# --------------------------------------------------------------------------------------

HOSTILE_CALLS = {
    # sizes no file holds
    "bytearray_of_huge_int": Op.call("builtins", "bytearray", Op.int_(HUGE)),
    "bytes_of_huge_int": Op.call("builtins", "bytes", Op.int_(HUGE)),
    "bytes_new_of_huge_int": Op.new("builtins", "bytes", Op.int_(HUGE)),
    "reconstructor_bytearray": Op.call(
        "copyreg",
        "_reconstructor",
        Op.glob("builtins", "bytearray"),
        Op.glob("builtins", "bytearray"),
        Op.int_(HUGE),
    ),
    "reconstruct_huge_shape": Op.reconstruct((HUGE >> 26, 1 << 26)),
    # lazy ranges expanded by container constructors
    "list_of_range": Op.call("builtins", "list", Op.range_(10)),
    "tuple_of_range": Op.call("builtins", "tuple", Op.range_(10)),
    "set_of_range": Op.call("builtins", "set", Op.range_(10)),
    "frozenset_of_range": Op.call("builtins", "frozenset", Op.range_(10)),
    "bytes_of_range": Op.call("builtins", "bytes", Op.range_(10)),
    "deque_of_range": Op.call("collections", "deque", Op.range_(10)),
    "counter_of_range": Op.call("collections", "Counter", Op.range_(10)),
    "ordered_dict_of_range": Op.call("collections", "OrderedDict", Op.range_(0)),
    "range_as_the_argument_tuple": Op.glob("builtins", "tuple") + Op.range_(10) + pickle.REDUCE,
    # numbers that become huge
    "int_of_decimal": Op.call("builtins", "int", Op.call("decimal", "Decimal", Op.text("1e5000"))),
    "fraction_with_exponent": Op.call("fractions", "Fraction", Op.text("1e5000")),
    "fraction_of_decimal": Op.call(
        "fractions", "Fraction", Op.call("decimal", "Decimal", Op.text("1e5000"))
    ),
    # codecs (a lookup may import a module) and text of objects
    "str_decoding_other_codec": Op.call("builtins", "str", Op.raw(b"abc"), Op.text("punycode")),
    "bytes_encoding_other_codec": Op.call("builtins", "bytes", Op.text("abc"), Op.text("cp1140")),
    "codecs_encode_custom_errors": Op.call(
        "_codecs", "encode", Op.text("abc"), Op.text("ascii"), Op.text("ckptable-handler")
    ),
    "str_of_a_range": Op.call("builtins", "str", Op.range_(3)),
    # wrong types and counts
    "range_of_text": Op.call("builtins", "range", Op.text("a")),
    "complex_of_a_list": Op.call("builtins", "complex", pickle.EMPTY_LIST),
    "slice_of_nothing": Op.call("builtins", "slice"),
    "ellipsis_called": Op.call("builtins", "Ellipsis"),
    "datetime_of_a_long_state": Op.call("datetime", "datetime", Op.raw(bytes(64))),
    "timedelta_of_text": Op.call("datetime", "timedelta", Op.text("1")),
    "timezone_of_an_int": Op.call("datetime", "timezone", Op.int_(1)),
    "uuid_of_an_int": Op.call("uuid", "UUID", Op.int_(1)),
    "decimal_of_a_list": Op.call("decimal", "Decimal", pickle.EMPTY_LIST),
    "defaultdict_of_an_instance": Op.call(
        "collections", "defaultdict", Op.call("builtins", "bytearray")
    ),
    "deque_with_negative_maxlen": Op.call("collections", "deque", pickle.EMPTY_LIST, Op.int_(-1)),
    "getattr_three_arguments": Op.call(
        "builtins", "getattr", Op.glob("builtins", "dict"), Op.text("x"), pickle.NONE
    ),
    "dtype_of_a_class": Op.call("numpy", "dtype", Op.glob("builtins", "dict")),
    "dtype_with_text_flags": Op.call("numpy", "dtype", Op.text("f8"), Op.text("yes")),
    "keywords_to_a_builtin": Op.glob("builtins", "bytearray")
    + pickle.EMPTY_TUPLE
    + pickle.EMPTY_DICT
    + Op.text("source")
    + Op.int_(HUGE)
    + pickle.SETITEM
    + pickle.NEWOBJ_EX,
    "reconstruct_of_a_dict": Op.call(
        "numpy._core.multiarray",
        "_reconstruct",
        Op.glob("builtins", "dict"),
        Op.tuple_(Op.int_(0)),
        Op.raw(b"b"),
    ),
    "reconstruct_shape_of_text": Op.call(
        "numpy._core.multiarray",
        "_reconstruct",
        Op.glob("numpy", "ndarray"),
        Op.text("abc"),
        Op.raw(b"b"),
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CALLS))
def test_allowlisted_callables_refuse_hostile_arguments(tmp_path: Path, name: str) -> None:
    before = set(sys.modules)
    assert_refused(tmp_path, whole(HOSTILE_CALLS[name], protocol=4))
    # a codec lookup imports encodings.<name>: refused before it happens
    assert not {"encodings.punycode", "encodings.cp1140"} & (set(sys.modules) - before)


def test_every_allowlist_entry_has_an_argument_rule() -> None:
    assert set(_safe._RULE_NAMES) == set(_safe._BUILTIN_ALLOWED)


@pytest.mark.parametrize("key", sorted(_safe._BUILTIN_ALLOWED))
@pytest.mark.parametrize("opcode", ["REDUCE", "NEWOBJ"])
def test_no_allowlisted_callable_allocates_what_an_int_asks_for(
    tmp_path: Path, key: tuple[str, str], opcode: str
) -> None:
    """Each entry, called with a size no machine holds: a ckptable error or a small
    value (``int(HUGE)``, a lazy ``range``), never MemoryError or another error type."""
    build = Op.call if opcode == "REDUCE" else Op.new
    for args in ((Op.int_(HUGE),), (Op.int_(HUGE), Op.int_(HUGE)), (Op.text("x" * 64),)):
        path = write(tmp_path, whole(build(*key, *args)))
        value, error = load_or_error(path)
        if error is not None:
            assert error.path == str(path) and str(path) in str(error)
        else:
            assert sys.getsizeof(value) < 1 << 16


# --------------------------------------------------------------------------------------
# Length fields that claim more than the file holds
# --------------------------------------------------------------------------------------


class Unseekable(io.RawIOBase):
    """A stream that cannot tell how much is left (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


LYING_LENGTHS = {
    "bytearray8": Op.proto(5) + pickle.BYTEARRAY8 + struct.pack("<Q", HUGE) + b"tiny",
    "binbytes8": Op.proto(4) + pickle.BINBYTES8 + struct.pack("<Q", HUGE) + b"tiny",
    "binunicode8": Op.proto(4) + pickle.BINUNICODE8 + struct.pack("<Q", HUGE) + b"tiny",
    "frame": Op.proto(4) + pickle.FRAME + struct.pack("<Q", HUGE) + b"tiny",
}


@pytest.mark.parametrize("stream", ["file", "bytes", "unseekable"])
@pytest.mark.parametrize("name", sorted(LYING_LENGTHS))
def test_length_fields_never_allocate_more_than_the_file_holds(
    tmp_path: Path, name: str, stream: str
) -> None:
    data = LYING_LENGTHS[name]
    path = write(tmp_path, data)
    opened: Any = {
        "file": lambda: open(path, "rb"),  # noqa: SIM115
        "bytes": lambda: io.BytesIO(data),
        "unseekable": lambda: io.BufferedReader(Unseekable(data)),
    }[stream]()
    with opened, pytest.raises(CorruptCheckpointError) as info:
        safe_pickle_load(opened, source=str(path))
    assert info.value.path == str(path)


# --------------------------------------------------------------------------------------
# End to end: restore_from_path(..., safe=True)
# --------------------------------------------------------------------------------------


class Holder(Checkpointable):
    """A component whose state is whatever it is given."""

    def __init__(self, payload: Any = None) -> None:
        self.payload = payload
        self.set_state_calls = 0

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {"payload": self.payload}

    def set_state(self, state: dict) -> None:
        self.set_state_calls += 1
        self.payload = state["payload"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


def state_with(payload: bytes) -> bytes:
    """A whole state pickle ``{"payload": <payload>}``."""
    return whole(pickle.EMPTY_DICT, Op.text("payload"), payload, pickle.SETITEM)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(Op.reconstruct((1 << 16,)), id="reconstruct_without_build"),
        pytest.param(HOSTILE_CALLS["bytearray_of_huge_int"], id="bytearray_of_huge_int"),
        pytest.param(
            Op.reconstruct((0,)) + BAD_ARRAY_STATES["data_too_short"] + pickle.BUILD,
            id="short_array_data",
        ),
        pytest.param(BAD_FROMBUFFER["object_dtype"], id="object_array_from_bytes"),
    ],
)
def test_restore_refuses_hostile_arguments_and_leaves_the_object_alone(
    tmp_path: Path, payload: bytes
) -> None:
    Holder({"w": np.arange(3.0)}).save_to_path(tmp_path / "h")
    (tmp_path / "h" / "state.pkl").write_bytes(state_with(payload))
    reseal(tmp_path / "h")  # only the pickle's content is hostile, not its checksum

    target = Holder("untouched")
    plant_secret(1 << 16)
    with pytest.raises(UnsafeCheckpointError) as info:
        target.restore_from_path(tmp_path / "h", safe=True)
    assert "state.pkl" in str(info.value) and "state.pkl" in str(info.value.path)
    assert target.payload == "untouched" and target.set_state_calls == 0


def test_restore_still_loads_arrays_of_every_kind(tmp_path: Path) -> None:
    payload = {name: value for name, value in ARRAYS.items() if not name.startswith("self")}
    payload["big"] = np.arange(1 << 19, dtype=np.float64)  # 4 MiB: read as its own buffer
    Holder(payload).save_to_path(tmp_path / "h")
    restored = Holder()
    restored.restore_from_path(tmp_path / "h", safe=True)
    for name, value in payload.items():
        assert_same_array(restored.payload[name], value)


# --------------------------------------------------------------------------------------
# What numpy and the standard library pickle still loads
# --------------------------------------------------------------------------------------

STRUCT = np.dtype([("a", "<f4"), ("b", "U3"), ("c", "i2", (2,))])
ARRAYS: dict[str, Any] = {
    **{
        f"dtype_{code}": np.arange(6).astype(code)
        for code in ("?", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8")
    },
    "complex64": np.array([1 + 2j, -3j], dtype=np.complex64),
    "complex128": np.array([1 + 2j, -3j]),
    "longdouble": np.array([1.5, 2.5], dtype=np.longdouble),
    "big_endian": np.arange(5, dtype=">i4"),
    "unicode": np.array(["alpha", "βeta", ""]),
    "bytes": np.array([b"x", b"yz"]),
    "datetime": np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),
    "timedelta": np.array([1, 2], dtype="timedelta64[ms]"),
    "zero_d": np.array(3.5),
    "zero_d_int": np.array(7, dtype=np.int16),
    "empty": np.zeros((0, 3)),
    "non_contiguous": np.arange(40.0).reshape(5, 8)[::2, 1::3],
    "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "transposed": np.arange(12).reshape(3, 4).T,
    "four_d": np.arange(120, dtype=np.int32).reshape(2, 3, 4, 5),
    "structured": np.array([(1.5, "ab", (1, 2)), (2.5, "c", (3, 4))], dtype=STRUCT),
    "aligned_struct": np.zeros(3, dtype=np.dtype([("a", "i1"), ("b", "f8")], align=True)),
    "nested_struct": np.zeros(2, dtype=[("p", [("x", "f4"), ("y", "f4")]), ("n", "i8")]),
    "object": np.array([{"a": 1}, [1, 2], "text", None, 2.5], dtype=object),
    "object_2d": np.array([[1, "a"], [None, (1, 2)]], dtype=object),
    "object_zero_d": np.array(5, dtype=object),
    "struct_with_objects": np.array([(1.0, {"k": 1})], dtype=[("a", "f8"), ("b", "O")]),
    "bigger": np.linspace(0, 1, 300_000),
}


def self_referencing_array() -> np.ndarray:
    array = np.empty(2, dtype=object)
    array[0], array[1] = array, 5
    return array


def assert_same_array(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype.hasobject:
        assert actual.tolist() == expected.tolist()
    else:
        assert np.array_equal(actual, expected, equal_nan=expected.dtype.kind in "fc")


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_numpy_arrays_of_every_common_kind_round_trip(tmp_path: Path, protocol: int) -> None:
    writers = [pickle.dumps] + ([cloudpickle.dumps] if protocol >= 2 else [])
    for dumps in writers:
        data = dumps(ARRAYS, protocol=protocol)
        loaded = safe_load_file(write(tmp_path, data))
        plain = pickle.loads(data)
        assert list(loaded) == list(ARRAYS)
        for name, value in ARRAYS.items():
            assert_same_array(loaded[name], plain[name])  # exactly what numpy rebuilds
            # the values as saved (numpy gives big-endian data back in native order)
            assert pickle.dumps(loaded[name].tolist()) == pickle.dumps(value.tolist()), name


def test_out_of_band_buffers_still_load(tmp_path: Path) -> None:
    buffers: list[pickle.PickleBuffer] = []
    arrays = {"a": np.arange(100_000.0), "f": np.asfortranarray(np.ones((30, 40)))}
    data = pickle.dumps(arrays, protocol=5, buffer_callback=buffers.append)
    assert buffers
    path = write(tmp_path, data)
    with open(path, "rb") as stream:
        loaded = safe_pickle_load(stream, buffers=[b.raw() for b in buffers], source=str(path))
    for name, value in arrays.items():
        assert_same_array(loaded[name], value)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_self_referencing_object_array_still_loads(tmp_path: Path, protocol: int) -> None:
    """Its data (a list) refers to the array before the array's BUILD."""
    loaded = safe_load_file(write(tmp_path, pickle.dumps(self_referencing_array(), protocol)))
    assert loaded[0] is loaded and loaded[1] == 5


SCALARS = [
    np.float64(1.5),
    np.float32(-2.0),
    np.float16(0.5),
    np.int8(-3),
    np.uint64(2**63),
    np.bool_(True),
    np.str_("abc"),
    np.bytes_(b"xy"),
    np.complex64(1 - 1j),
    np.datetime64("2020-01-01T12:00"),
    np.timedelta64(5, "s"),
    np.void(b"ab"),
    np.zeros(1, dtype=STRUCT)[0],
]


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_numpy_scalars_and_dtypes_still_load(tmp_path: Path, protocol: int) -> None:
    dtypes = [STRUCT, np.dtype("O"), np.dtype("M8[ns]"), np.dtype(("i4", (2, 3)))]
    loaded = safe_load_file(write(tmp_path, pickle.dumps([SCALARS, dtypes], protocol)))
    for actual, expected in zip(loaded[0], SCALARS, strict=True):
        assert type(actual) is type(expected) and actual.tobytes() == expected.tobytes()
    assert loaded[1] == dtypes


class Pair(NamedTuple):
    x: int
    y: Any


class Blob(bytes):
    pass


class Config(dict):  # type: ignore[type-arg]
    pass


class Counts(collections.Counter):  # type: ignore[type-arg]
    pass


STDLIB_VALUES: dict[str, Any] = {
    "bytes": b"\x00\xff" * 10,
    "empty_bytes": b"",
    "bytearray": bytearray(b"\x00\xffabc"),
    "empty_bytearray": bytearray(),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a"}),
    "complex": 1 + 2j,
    "slice": slice(1, 10, 2),
    "range": range(3, 9),
    "huge_range": range(10**30),
    "big_int": 2**200,
    "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
    "default": collections.defaultdict(list, {"k": [1]}),
    "deque": collections.deque([1, 2], maxlen=5),
    "counter": collections.Counter("abracadabra"),
    "datetime": datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone.utc),
    "date": datetime.date(1999, 12, 31),
    "time": datetime.time(23, 59, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    "timedelta": datetime.timedelta(days=2, microseconds=5),
    "decimal": decimal.Decimal("-1.25E+7"),
    "fraction": fractions.Fraction(22, 7),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "user_namedtuple": Pair(1, "a"),
    "user_bytes": Blob(b"abc"),
    "user_dict": Config(a=1),
    "user_counter": Counts("aab"),
}


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_stdlib_values_and_user_subclasses_still_load(tmp_path: Path, protocol: int) -> None:
    data = pickle.dumps(STDLIB_VALUES, protocol=protocol)
    loaded = safe_load_file(write(tmp_path, data), allowed=[Pair, Blob, Config, Counts])
    for name, value in STDLIB_VALUES.items():
        assert type(loaded[name]) is type(value), name
        assert loaded[name] == value, name
    assert loaded["deque"].maxlen == 5 and loaded["default"].default_factory is list


def test_inherited_constructors_of_user_classes_are_checked_too(tmp_path: Path) -> None:
    """A user subclass of bytes that keeps bytes' constructor gets bytes' rule."""
    data = whole(Op.call(Blob.__module__, "Blob", Op.int_(HUGE)))
    path = write(tmp_path, data)
    with pytest.raises(UnsafeCheckpointError, match="zero bytes"):
        safe_load_file(path, allowed=[Blob])
