"""The ``safetensors`` state codec: a level's state as a file any safetensors reader opens.

``save_to_path(path, format="safetensors")`` writes each level's state as
``state.safetensors``. ``safetensors.safe_open``, ``safetensors.numpy.load_file`` and
``safetensors.torch.load_file`` open it and see the state's arrays and tensors, named by
their key paths; ckptable reads it back as the exact state that was saved.

What fits: a (nested) dict with str keys whose leaves are numpy arrays and scalars, torch
tensors, or JSON-like values (None, bool, int, float including nan and ±inf, str, lists and
tuples of those, dicts and ``OrderedDict``s). Anything else (an object, a set, a non-str
key, an object-dtype array, a meta or sparse tensor, a dict subclass such as
``defaultdict``, a tuple subclass such as a namedtuple, a container holding itself) raises
``StateEncodingError`` naming its key path, before a byte is written.

The file is the standard format, written here directly (it is small, and what lets a save
stream at disk speed):

- 8 bytes: the header's length N, little-endian;
- N bytes: the JSON header, padded with spaces to a multiple of 8 (so the data starts
  8-aligned), holding ``{"dtype", "shape", "data_offsets"}`` for each tensor and the
  ``__metadata__`` map (str → str);
- the tensors' bytes, back to back, biggest item size first, so that every tensor starts
  at a multiple of its item size (mapped arrays are aligned).

Names: the key path joined with ``/``, each key escaped as in JSON Pointer (RFC 6901:
``~`` → ``~0``, ``/`` → ``~1``), list and tuple items by index:
``{"learner": {"module": {"encoder.0.weight": t}}}`` holds ``learner/module/encoder.0.weight``.
A name no reader could take (the reserved ``__metadata__``, or a key with a lone
surrogate) becomes ``~t<n>`` instead (``~t`` never comes out of the escaping).

Structure: ``__metadata__["ckptable"]`` holds one JSON document,
``{"format": "ckptable.safetensors", "version": 1, "tree": NODE}``, where NODE is a JSON
scalar (a None, bool, int, finite float or str leaf) or a one-tag object:
``{"d": {key: NODE}}`` dict, ``{"od": {...}}`` ``OrderedDict`` (``"meta"``: its
``_metadata`` attribute, as ``torch.nn.Module.state_dict()`` sets it), ``{"l": [NODE]}``
list, ``{"t": [NODE]}`` tuple, ``{"f": "nan" | "inf" | "-inf"}`` non-finite float,
``{"np": name}`` numpy array, ``{"ns": name}`` numpy scalar, ``{"pt": name}`` torch tensor
(``"grad": true`` if it required grad, ``"param": true`` for a ``torch.nn.Parameter``,
``"device": "cuda:0"`` if it was not on the CPU).

Exactness: tensors come back bit for bit, with their dtype and shape (0-d and empty
included), numpy as numpy and torch as torch, ``requires_grad`` and ``Parameter`` restored,
tensors placed by the restore's ``map_location`` (by default on their saved device, or
on the CPU with a warning where this machine lacks it).
Not kept: memory layout (a Fortran-ordered or strided array comes back C-contiguous), byte
order (a big-endian array comes back little-endian, same values), the sharing of memory
between arrays (each is written whole), the sign and payload of a float nan leaf.
dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL C64 and the fp8 types
F8_E4M3 F8_E5M2 F8_E4M3FNUZ F8_E5M2FNUZ F8_E8M0 (numpy has no bf16 or fp8: those are torch
tensors only).

Reading parses the header defensively (its length bounded by the file, every tensor's
dtype known, its size prod(shape) * itemsize, the tensors tiling the data region exactly,
no duplicate names, the structure valid and naming each tensor once); any violation is a
:class:`SafetensorsFormatError` (a ``ValueError``), which a restore reports as
``CorruptCheckpointError`` naming the file. Then each tensor is read with ``readinto``
straight into the memory of its final array. ``load_mapped`` (``mmap=True``) maps the
file copy-on-write instead: the arrays are backed by the file's pages and writable, and
writing to them never changes the file.

Nothing in a file can make the loader run code, so ``load_restricted`` is ``load``.
numpy is imported only for a state (or file) with arrays, torch only where the user has
imported it already (saving) or the file holds torch tensors (loading).
"""

from __future__ import annotations

import collections
import functools
import io
import json
import math
import mmap
import os
import sys
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from ckptable.errors import IncompatibleCheckpointError, StateEncodingError

if TYPE_CHECKING:
    from ckptable._torch import TensorPlacement

__all__ = [
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "SafetensorsCodec",
    "SafetensorsFormatError",
]

#: The biggest header the reference reader (Rust) accepts; ckptable writes no bigger one.
MAX_HEADER_BYTES = 100_000_000
#: The ``__metadata__`` key holding ckptable's description of the state's structure.
METADATA_KEY = "ckptable"
_FORMAT_NAME = "ckptable.safetensors"
_FORMAT_VERSION = 1
#: numpy's limit on dimensions.
_MAX_NDIM = 64
_READ_CHUNK = 64 << 20


class SafetensorsFormatError(ValueError):
    """A ``.safetensors`` file breaks the format (or ckptable's structure record in it)."""


class _DType(NamedTuple):
    """One safetensors dtype: its item size, the numpy dtype that holds it (None where
    numpy has none), torch's dtype attribute, and the numpy dtype its bytes are read into
    (the same as ``numpy``, or an integer of the same width for torch-only dtypes)."""

    itemsize: int
    numpy: str | None
    torch: str
    carrier: str


_DTYPES: dict[str, _DType] = {
    "F64": _DType(8, "<f8", "float64", "<f8"),
    "F32": _DType(4, "<f4", "float32", "<f4"),
    "F16": _DType(2, "<f2", "float16", "<f2"),
    "BF16": _DType(2, None, "bfloat16", "<i2"),
    "I64": _DType(8, "<i8", "int64", "<i8"),
    "I32": _DType(4, "<i4", "int32", "<i4"),
    "I16": _DType(2, "<i2", "int16", "<i2"),
    "I8": _DType(1, "i1", "int8", "i1"),
    "U64": _DType(8, "<u8", "uint64", "<u8"),
    "U32": _DType(4, "<u4", "uint32", "<u4"),
    "U16": _DType(2, "<u2", "uint16", "<u2"),
    "U8": _DType(1, "u1", "uint8", "u1"),
    "BOOL": _DType(1, "?", "bool", "?"),
    "C64": _DType(8, "<c8", "complex64", "<c8"),
    "F8_E4M3": _DType(1, None, "float8_e4m3fn", "i1"),
    "F8_E5M2": _DType(1, None, "float8_e5m2", "i1"),
    "F8_E4M3FNUZ": _DType(1, None, "float8_e4m3fnuz", "i1"),
    "F8_E5M2FNUZ": _DType(1, None, "float8_e5m2fnuz", "i1"),
    "F8_E8M0": _DType(1, None, "float8_e8m0fnu", "i1"),
}

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_JSON_SCALARS = (bool, int, float, str)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ImportError(
            "The safetensors format needs numpy for arrays and tensors: "
            "pip install 'ckptable[safetensors]'"
        ) from None
    return numpy


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("This safetensors file holds torch tensors: pip install torch") from None
    return torch


# ------------------------------------------------------------------------------- writing


class _Planned:
    """One array or tensor to write: its name, safetensors dtype, shape and size."""

    __slots__ = ("dtype", "name", "nbytes", "shape", "torch", "value")

    def __init__(self, name: str, dtype: str, shape: list[int], value: Any, torch: bool) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.value = value
        self.torch = torch
        self.nbytes = math.prod(shape) * _DTYPES[dtype].itemsize

    def data(self) -> memoryview:
        """The bytes to write, little-endian and C-ordered, from the value's own memory
        where it has that layout (a copy of this one value where it has not)."""
        value = self.value
        if self.torch:
            torch = sys.modules["torch"]
            tensor = value.detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            tensor = tensor.resolve_conj().resolve_neg().contiguous()
            array = tensor.reshape(-1).view(torch.uint8).numpy()
        else:
            np = sys.modules["numpy"]
            array = np.asarray(value)
            little = array.dtype.newbyteorder("<")
            if array.dtype != little:
                array = array.astype(little)
            array = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        view = memoryview(array)
        if view.nbytes != self.nbytes:  # the value changed since it was planned
            raise RuntimeError(
                f"{self.name}: {view.nbytes} bytes to write where {self.nbytes} were planned "
                "(was the state changed while it was being saved?)"
            )
        return view


class _Encoder:
    """Walks a state once: checks every value, names the tensors and builds the
    structure record, before anything is written."""

    def __init__(self) -> None:
        self.np: Any = sys.modules.get("numpy")
        self.torch: Any = sys.modules.get("torch")
        self.tensors: list[_Planned] = []
        self.names: set[str] = set()
        #: ids of the containers on the path being walked (a container holding itself).
        self.open: set[int] = set()

    def refuse(self, path: str, why: str) -> StateEncodingError:
        return StateEncodingError(f"{path} {why}; the safetensors format cannot hold it")

    def node(self, value: Any, path: str, name: str | None) -> Any:
        kind = type(value)
        if value is None or kind in (bool, int, str):
            if kind is int and value.bit_length() > 10_000:
                self.check_int(value, path)
            return value
        if kind is float:
            if math.isfinite(value):
                return value
            return {"f": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if kind is dict or kind is collections.OrderedDict:
            return self.mapping(value, path, name)
        if kind is list or kind is tuple:
            return self.sequence(value, path, name)
        np, torch = self.np, self.torch
        if np is not None and isinstance(value, (np.ndarray, np.generic)):
            return self.numpy(value, path, name)
        if torch is not None and isinstance(value, torch.Tensor):
            return self.tensor(value, path, name)
        raise self.refuse(path, self.describe(value))

    def describe(self, value: Any) -> str:
        kind = type(value)
        shown = f"{kind.__module__}.{kind.__qualname__}"
        for base in (dict, list, tuple, int, float, str):
            if isinstance(value, base):
                return f"is a {shown}, which would come back as a plain {base.__name__}"
        return f"is a {shown}"

    def check_int(self, value: int, path: str) -> None:
        try:
            str(value)
        except ValueError as exc:
            raise self.refuse(path, f"is an int too long to write as text ({exc})") from None

    def enter(self, value: Any, path: str) -> None:
        if id(value) in self.open:
            raise self.refuse(path, "contains itself")
        self.open.add(id(value))

    def mapping(self, value: dict[Any, Any], path: str, name: str | None) -> Any:
        self.enter(value, path)
        items: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise self.refuse(
                    path, f"has the key {key!r} ({type(key).__name__}; keys must be str)"
                )
            escaped = key.replace("~", "~0").replace("/", "~1")
            items[key] = self.node(
                item, f"{path}[{key!r}]", escaped if name is None else f"{name}/{escaped}"
            )
        self.open.discard(id(value))
        if type(value) is dict:
            return {"d": items}
        encoded: dict[str, Any] = {"od": items}
        attributes = vars(value)
        if set(attributes) - {"_metadata"}:
            extra = sorted(set(attributes) - {"_metadata"})
            raise self.refuse(path, f"is an OrderedDict with the attributes {extra}")
        if "_metadata" in attributes:
            encoded["meta"] = self.node(attributes["_metadata"], f"{path}._metadata", None)
        return encoded

    def sequence(self, value: list[Any] | tuple[Any, ...], path: str, name: str | None) -> Any:
        self.enter(value, path)
        items = [
            self.node(item, f"{path}[{i}]", str(i) if name is None else f"{name}/{i}")
            for i, item in enumerate(value)
        ]
        self.open.discard(id(value))
        return {"l" if type(value) is list else "t": items}

    def name_for(self, name: str | None) -> str:
        """The tensor's name in the file: its escaped key path where a reader can take
        it, else a fresh ``~t<n>`` (which the escaping never produces)."""
        chosen = "" if name is None else name
        try:
            chosen.encode("utf-8")
        except UnicodeEncodeError:
            chosen = "__metadata__"  # (a lone surrogate: fall through to a fresh name)
        if chosen == "__metadata__" or chosen in self.names:
            chosen = f"~t{len(self.tensors)}"
        self.names.add(chosen)
        return chosen

    def numpy(self, value: Any, path: str, name: str | None) -> Any:
        np = self.np
        scalar = isinstance(value, np.generic)
        if not scalar and type(value) not in (np.ndarray, np.memmap):
            raise self.refuse(path, self.describe(value) + " (an ndarray subclass)")
        dtype = value.dtype
        if dtype.fields is not None or dtype.subdtype is not None or dtype.hasobject:
            st_dtype = None
        else:
            st_dtype = _numpy_names().get(dtype.newbyteorder("<"))
        if st_dtype is None:
            what = "numpy scalar" if scalar else "numpy array"
            raise self.refuse(path, f"is a {what} of dtype {dtype} (no safetensors dtype)")
        chosen = self.name_for(name)
        self.tensors.append(_Planned(chosen, st_dtype, list(value.shape), value, False))
        return {"ns" if scalar else "np": chosen}

    def tensor(self, value: Any, path: str, name: str | None) -> Any:
        torch = self.torch
        is_parameter = type(value) is torch.nn.Parameter
        if type(value) is not torch.Tensor and not is_parameter:
            raise self.refuse(path, f"{self.describe(value)} (a torch.Tensor subclass)")
        if value.layout != torch.strided or value.is_nested:
            raise self.refuse(path, f"is a {value.layout} torch tensor (only dense ones fit)")
        if value.device.type == "meta":
            raise self.refuse(path, "is a torch tensor on the meta device (it has no data)")
        names = getattr(value, "names", None)  # (torch versions that have named tensors)
        if names and any(dim_name is not None for dim_name in names):
            raise self.refuse(path, f"is a named torch tensor ({names})")
        st_dtype = _torch_names().get(value.dtype)
        if st_dtype is None:
            raise self.refuse(path, f"is a torch tensor of dtype {value.dtype}")
        chosen = self.name_for(name)
        self.tensors.append(_Planned(chosen, st_dtype, list(value.shape), value, True))
        encoded: dict[str, Any] = {"pt": chosen}
        if value.requires_grad:
            encoded["grad"] = True
        if is_parameter:
            encoded["param"] = True
        if value.device.type != "cpu":
            encoded["device"] = str(value.device)
        return encoded

    def header(self, tree: Any) -> bytes:
        """The 8-byte length and the padded JSON header, tensors laid out biggest item
        size first (each then starts at a multiple of its item size)."""
        self.tensors.sort(key=lambda planned: -_DTYPES[planned.dtype].itemsize)
        record = {"format": _FORMAT_NAME, "version": _FORMAT_VERSION, "tree": tree}
        entries: dict[str, Any] = {
            "__metadata__": {METADATA_KEY: json.dumps(record, separators=(",", ":"))}
        }
        offset = 0
        for planned in self.tensors:
            end = offset + planned.nbytes
            entries[planned.name] = {
                "dtype": planned.dtype,
                "shape": planned.shape,
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(entries, separators=(",", ":")).encode("ascii")
        raw += b" " * (-len(raw) % 8)
        if len(raw) > MAX_HEADER_BYTES:
            raise StateEncodingError(
                f"state has {len(raw):,} bytes of names and non-tensor values, more than the "
                f"{MAX_HEADER_BYTES:,} a safetensors header may hold (readers refuse bigger "
                "ones): keep big data in arrays, or use another format."
            )
        return len(raw).to_bytes(8, "little") + raw


@functools.cache
def _numpy_names() -> dict[Any, str]:
    """numpy dtype (little-endian) → safetensors dtype."""
    np = sys.modules["numpy"]
    return {np.dtype(d.numpy): name for name, d in _DTYPES.items() if d.numpy is not None}


@functools.cache
def _torch_names() -> dict[Any, str]:
    """torch dtype → safetensors dtype (those this torch has)."""
    torch = sys.modules["torch"]
    found = ((getattr(torch, d.torch, None), name) for name, d in _DTYPES.items())
    return {dtype: name for dtype, name in found if dtype is not None}


def encode(state: Any) -> tuple[bytes, list[_Planned]]:
    """Check ``state`` and plan its file: the header and the tensors to write after it.

    Raises:
        StateEncodingError: a value does not fit (the message names its key path), or the
            header would exceed :data:`MAX_HEADER_BYTES`.
    """
    encoder = _Encoder()
    tree = encoder.node(state, "state", None)
    return encoder.header(tree), encoder.tensors


# ------------------------------------------------------------------------------- reading


class _Entry(NamedTuple):
    """One tensor of a file's header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _Layout(NamedTuple):
    """A parsed header: the tensors in file order, and the ``__metadata__`` map."""

    entries: list[_Entry]
    metadata: dict[str, str]


def _corrupt(what: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(f"not a valid safetensors file: {what}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"the non-JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _json(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(f"{what} is not valid JSON ({exc})") from None


def _header_length(head: bytes, size: int | None) -> int:
    if len(head) < 8:
        raise _corrupt(f"{len(head)} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(head, "little")
    limit = MAX_HEADER_BYTES if size is None else min(MAX_HEADER_BYTES, size - 8)
    if length > limit:
        left = "" if size is None else f" (the file has {size - 8} bytes after the length)"
        raise _corrupt(f"a header length of {length} bytes{left}")
    if length < 2:
        raise _corrupt(f"a header length of {length} bytes")
    return length


def _parse_header(raw: bytes, data_size: int | None) -> _Layout:
    """Check a header as the format and the reference reader demand, more strictly: the
    tensors must tile the data region from 0 to its end (``data_size``: the bytes after
    the header, None where unknown)."""
    if raw[:1] != b"{":
        raise _corrupt("the header does not start with '{'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(f"the header is not UTF-8 ({exc})") from None
    doc = _json(text, "the header")
    if not isinstance(doc, dict):
        raise _corrupt("the header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise _corrupt("__metadata__ is not a map of strings to strings")
    entries = [_parse_entry(name, info) for name, info in doc.items()]
    entries.sort(key=lambda entry: (entry.begin, entry.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            how = "overlaps the tensor before it" if entry.begin < position else "leaves a gap"
            raise _corrupt(f"tensor {entry.name!r} at offset {entry.begin} {how}")
        position = entry.end
    if data_size is not None and position != data_size:
        raise _corrupt(f"the tensors cover {position} bytes of a data region of {data_size}")
    return _Layout(entries, metadata)


def _parse_entry(name: str, info: Any) -> _Entry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(f"tensor {name!r} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _corrupt(f"tensor {name!r} has the unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(type(dim) is int and 0 <= dim < 1 << 63 for dim in shape)
    ):
        raise _corrupt(f"tensor {name!r} has the invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(offset) is int for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(f"tensor {name!r} has the invalid data_offsets {offsets!r}")
    itemsize = _DTYPES[dtype].itemsize
    if math.prod(dim for dim in shape if dim) * itemsize >= 1 << 63:
        raise _corrupt(f"tensor {name!r} has a shape too big for any array: {shape!r}")
    nbytes = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(
            f"tensor {name!r} ({dtype} {shape}) needs {nbytes} bytes; its data_offsets "
            f"{offsets} give {offsets[1] - offsets[0]}"
        )
    return _Entry(name, dtype, tuple(shape), offsets[0], offsets[1])


class _Structure:
    """The state's structure from ``__metadata__["ckptable"]``, checked against the
    header before any tensor is read: every node well-formed, every tensor named once,
    each of a dtype its kind can hold."""

    def __init__(self, layout: _Layout) -> None:
        self.dtypes = {entry.name: entry for entry in layout.entries}
        record = layout.metadata.get(METADATA_KEY)
        if record is None:
            # Written by another tool: a flat dict of its tensors, numpy where numpy has
            # the dtype, else torch.
            self.tree: Any = {
                "d": {
                    entry.name: {"np" if _DTYPES[entry.dtype].numpy else "pt": entry.name}
                    for entry in layout.entries
                }
            }
        else:
            doc = _json(record, f"__metadata__[{METADATA_KEY!r}]")
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT_NAME:
                raise _corrupt(f"__metadata__[{METADATA_KEY!r}] is not ckptable's record")
            version = doc.get("version")
            if type(version) is not int or version < 1:
                raise _corrupt(f"ckptable's record has the invalid version {version!r}")
            if version > _FORMAT_VERSION:
                raise IncompatibleCheckpointError(
                    f"The state was written by a newer ckptable (safetensors record "
                    f"version {version}; this one reads up to {_FORMAT_VERSION}): "
                    "upgrade ckptable."
                )
            if set(doc) != {"format", "version", "tree"}:
                raise _corrupt("ckptable's record is not {format, version, tree}")
            self.tree = doc["tree"]
        self.used: set[str] = set()
        self.torch = False
        self.check(self.tree)
        unused = set(self.dtypes) - self.used
        if unused:
            raise _corrupt(f"the tensor {min(unused)!r} is in no place of the state")

    def check(self, node: Any) -> None:
        if node is None or type(node) in _JSON_SCALARS:
            if type(node) is float and not math.isfinite(node):
                raise _corrupt("a non-finite float is stored bare")
            return
        if type(node) is not dict or not node:
            raise _corrupt(f"the state's structure has the invalid node {_short(node)}")
        tag = next(iter(node))
        check = _NODE_CHECKS.get(tag)
        if check is None:
            raise _corrupt(f"the state's structure has the invalid node {_short(node)}")
        check(self, node)

    def check_mapping(self, node: dict[str, Any]) -> None:
        tag = "d" if "d" in node else "od"
        allowed = {tag} if tag == "d" else {"od", "meta"}
        if not set(node) <= allowed or type(node[tag]) is not dict:
            raise _corrupt(f"the state's structure has the invalid node {_short(node)}")
        for item in node[tag].values():
            self.check(item)
        if "meta" in node:
            self.check(node["meta"])

    def check_sequence(self, node: dict[str, Any]) -> None:
        items = next(iter(node.values()))
        if len(node) != 1 or type(items) is not list:
            raise _corrupt(f"the state's structure has the invalid node {_short(node)}")
        for item in items:
            self.check(item)

    def check_float(self, node: dict[str, Any]) -> None:
        if len(node) != 1 or node["f"] not in _NON_FINITE:
            raise _corrupt(f"the state's structure has the invalid node {_short(node)}")

    def check_tensor(self, node: dict[str, Any]) -> None:
        tag = next(iter(node))
        name = node[tag]
        allowed = {"pt", "grad", "param", "device"} if tag == "pt" else {tag}
        if (
            not set(node) <= allowed
            or type(name) is not str
            or any(type(node.get(flag, True)) is not bool for flag in ("grad", "param"))
            or type(node.get("device", "")) is not str
        ):
            raise _corrupt(f"the state's structure has the invalid node {_short(node)}")
        entry = self.dtypes.get(name)
        if entry is None:
            raise _corrupt(f"the state names the tensor {name!r}, which the header lacks")
        if name in self.used:
            raise _corrupt(f"the state names the tensor {name!r} twice")
        self.used.add(name)
        if tag == "pt":
            self.torch = True
            if node.get("grad", False) and not entry.dtype.startswith(("F", "BF", "C")):
                raise _corrupt(f"the {entry.dtype} tensor {name!r} cannot require grad")
        elif _DTYPES[entry.dtype].numpy is None:
            raise _corrupt(f"tensor {name!r} is {entry.dtype}, which numpy cannot hold")
        elif tag == "ns" and entry.shape:
            raise _corrupt(f"the numpy scalar {name!r} has the shape {list(entry.shape)}")


def _short(node: Any) -> str:
    text = json.dumps(node)
    return text if len(text) <= 80 else text[:77] + "..."


_NODE_CHECKS = {
    "d": _Structure.check_mapping,
    "od": _Structure.check_mapping,
    "l": _Structure.check_sequence,
    "t": _Structure.check_sequence,
    "f": _Structure.check_float,
    "np": _Structure.check_tensor,
    "ns": _Structure.check_tensor,
    "pt": _Structure.check_tensor,
}


class _Builder:
    """Turns a checked structure and the arrays read (name → numpy array of the carrier
    dtype) into the state, torch tensors placed by ``placement`` (``map_location``)."""

    def __init__(self, arrays: dict[str, Any], entries: dict[str, _Entry], placement: Any) -> None:
        self.arrays = arrays
        self.entries = entries
        self.placement = placement

    def build(self, node: Any) -> Any:
        if type(node) is not dict:
            return node
        tag = next(iter(node))
        if tag == "d":
            return {key: self.build(item) for key, item in node["d"].items()}
        if tag == "od":
            result = collections.OrderedDict(
                (key, self.build(item)) for key, item in node["od"].items()
            )
            if "meta" in node:
                result._metadata = self.build(node["meta"])  # type: ignore[attr-defined]
            return result
        if tag == "l":
            return [self.build(item) for item in node["l"]]
        if tag == "t":
            return tuple(self.build(item) for item in node["t"])
        if tag == "f":
            return _NON_FINITE[node["f"]]
        array = self.arrays[node[tag]]
        if tag == "np":
            return array
        if tag == "ns":
            return array[()]
        return self.tensor(node, array)

    def tensor(self, node: dict[str, Any], array: Any) -> Any:
        """A torch tensor on the memory of ``array``, viewed as its dtype, placed where
        ``map_location`` sends a tensor saved on its recorded device, then given back
        its ``requires_grad`` and ``Parameter``-ness."""
        torch = sys.modules["torch"]
        dtype = _DTYPES[self.entries[node["pt"]].dtype]
        tensor = torch.from_numpy(array)
        if dtype.numpy is None:
            tensor = tensor.view(getattr(torch, dtype.torch))
        tensor = self.placement.place(tensor, node.get("device", "cpu"))
        if node.get("param", False):
            return torch.nn.Parameter(tensor, requires_grad=node.get("grad", False))
        if node.get("grad", False):
            tensor.requires_grad_(True)
        return tensor


def _prepare(layout: _Layout) -> tuple[_Structure, Any]:
    """Check the structure, and import what its arrays need (numpy; torch for tensors)."""
    structure = _Structure(layout)
    np = _numpy() if layout.entries else None
    if structure.torch:
        _torch()
    return structure, np


def _finish(structure: _Structure, arrays: dict[str, Any], tensors: TensorPlacement | None) -> Any:
    """The state, from the structure and the arrays read (or mapped) for it."""
    for entry in structure.dtypes.values():
        if entry.dtype == "BOOL":
            array = arrays[entry.name]
            if array.size and int(array.view("u1").max()) > 1:
                raise _corrupt(f"the BOOL tensor {entry.name!r} holds bytes other than 0 and 1")
    placement = tensors
    if placement is None and structure.torch:
        from ckptable._torch import TensorPlacement

        placement = TensorPlacement()  # the default: back to the saved devices
    state = _Builder(arrays, structure.dtypes, placement).build(structure.tree)
    if tensors is None and placement is not None:
        placement.warn(stacklevel=3)
    return state


def _size_of(stream: IO[bytes]) -> int | None:
    """Bytes from the stream's position to its end; None where it cannot tell."""
    try:
        start = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        if end is None:
            end = stream.tell()
        stream.seek(start)
    except (AttributeError, OSError, ValueError):
        return None
    return int(end) - int(start)


def _read_exactly(stream: IO[bytes], n: int, what: str) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        data = stream.read(min(left, _READ_CHUNK))
        if not data:
            raise _corrupt(f"the file ends inside {what}")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _fill(stream: IO[bytes], view: memoryview, what: str) -> None:
    """Read exactly ``len(view)`` bytes into ``view``."""
    readinto = getattr(stream, "readinto", None)
    filled, total = 0, len(view)
    while filled < total:
        chunk = view[filled : filled + _READ_CHUNK]
        if readinto is not None:
            got = readinto(chunk) or 0
        else:
            data = stream.read(len(chunk))
            got = len(data)
            chunk[:got] = data
        if not got:
            raise _corrupt(f"the file ends inside {what}")
        filled += got


def _write_all(stream: IO[bytes], view: memoryview) -> None:
    """Write all of ``view`` (a raw stream may take less than it is given)."""
    while view:
        written = stream.write(view)
        if written is None or written >= len(view):
            return
        if written <= 0:
            raise OSError(f"Short write: the stream accepted {written} bytes.")
        view = view[written:]


class SafetensorsCodec:
    """Writes a state as a standard ``.safetensors`` file and reads it back exactly.

    See the module's documentation for what fits and how the file is laid out.
    """

    name = "safetensors"
    suffix = ".safetensors"
    #: Restores pass the restore's ``TensorPlacement`` (``map_location``) as ``tensors``.
    accepts_tensors = True

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        """Write ``state`` to ``stream``: the header, then each tensor's bytes straight
        from its memory. Everything is checked first: a state that does not fit raises
        ``StateEncodingError`` with nothing written."""
        header, tensors = encode(state)
        _write_all(stream, memoryview(header))
        for planned in tensors:
            if planned.nbytes:
                _write_all(stream, planned.data())

    def load(self, stream: IO[bytes], *, tensors: TensorPlacement | None = None) -> Any:
        """Read a state from ``stream``, each tensor read straight into its final array;
        torch tensors placed by ``tensors`` (the restore's ``map_location``; None: back
        on their saved devices where this machine has them, else on the CPU with a
        warning).

        Raises:
            SafetensorsFormatError: the file breaks the format (a ``ValueError``).
            IncompatibleCheckpointError: a newer ckptable wrote its structure record.
            ImportError: numpy (or, for torch tensors, torch) is not installed.
        """
        size = _size_of(stream)
        length = _header_length(_read_exactly(stream, 8, "the header length"), size)
        raw = _read_exactly(stream, length, "the header")
        layout = _parse_header(raw, None if size is None else size - 8 - length)
        structure, np = _prepare(layout)
        arrays: dict[str, Any] = {}
        for entry in layout.entries:
            array = np.empty(entry.shape, dtype=_DTYPES[entry.dtype].carrier)
            if array.nbytes:
                _fill(stream, memoryview(array.reshape(-1).view(np.uint8)), repr(entry.name))
            arrays[entry.name] = array
        if size is None and stream.read(1):
            raise _corrupt("bytes follow the last tensor")
        return _finish(structure, arrays, tensors)

    def load_restricted(
        self,
        stream: IO[bytes],
        *,
        allowed: Iterable[object] = (),
        allow_subclasses_of: type | None = None,
        source: str = "",
        tensors: TensorPlacement | None = None,
    ) -> Any:
        """``load``, for ``safe=True``: nothing in a safetensors file can run code."""
        return self.load(stream, tensors=tensors)

    def load_mapped(self, stream: IO[bytes], *, tensors: TensorPlacement | None = None) -> Any:
        """Read a state from the regular file open as ``stream``, its tensors mapped
        from the file (``mmap=True``) rather than read.

        The mapping is copy-on-write (``mmap.ACCESS_COPY``): the arrays are writable,
        what is written to them stays in this process's memory, and the file never
        changes. Pages are read when first touched. A tensor at an offset that is not a
        multiple of its item size (in files of other writers) is copied instead.
        """
        fileno = stream.fileno()
        size = os.fstat(fileno).st_size
        if size < 8:
            raise _corrupt(f"{size} bytes, shorter than the 8-byte header length")
        mapped = mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)
        length = _header_length(mapped[:8], size)
        layout = _parse_header(mapped[8 : 8 + length], size - 8 - length)
        structure, np = _prepare(layout)
        start = 8 + length
        arrays: dict[str, Any] = {}
        for entry in layout.entries:
            dtype = np.dtype(_DTYPES[entry.dtype].carrier)
            count = math.prod(entry.shape)
            if count == 0:
                array = np.empty(entry.shape, dtype=dtype)
            else:
                offset = start + entry.begin
                array = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
                array = array.reshape(entry.shape)
                if offset % dtype.itemsize:
                    array = array.copy()
            arrays[entry.name] = array
        return _finish(structure, arrays, tensors)
