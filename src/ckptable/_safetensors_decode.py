"""The safetensors codec, reading: check a file defensively, then read or map its tensors.

Why this order: a file may be damaged or crafted, and no length or shape in it may
allocate memory or index past its end before it is checked. So the header is parsed
first (:func:`_header_length`, :func:`_parse_header`: its length bounded by the file,
every tensor's dtype known, its size ``prod(shape) * itemsize``, the tensors tiling the
data region exactly, no duplicate names), then ckptable's structure record is checked
against it (:class:`_Structure`: every node well-formed, every tensor named once, of a
dtype its kind can hold). Only then is each tensor read with ``readinto`` straight into
the memory of its final array (:func:`read_state`), or mapped copy-on-write from the
file (:func:`map_state`), and the state built from the structure (:class:`_Builder`).
Any violation is a :class:`SafetensorsFormatError`. The file's layout is described in
:mod:`ckptable._safetensors`, which passes the header limit in (its
``MAX_HEADER_BYTES``).

numpy is imported only for a file with tensors, torch only for one holding torch tensors.
"""

from __future__ import annotations

import collections
import io
import json
import math
import mmap
import os
import sys
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from ckptable._layout import loads_json
from ckptable._parallel_read import new_payload_buffer, readinto_parallel
from ckptable._safetensors_format import DTYPES, FORMAT_NAME, FORMAT_VERSION, METADATA_KEY
from ckptable.errors import IncompatibleCheckpointError

if TYPE_CHECKING:
    from ckptable._torch_placement import TensorPlacement

__all__ = ["SafetensorsFormatError", "map_state", "read_state"]

#: numpy's limit on dimensions.
_MAX_NDIM = 64
_READ_CHUNK = 64 << 20


class SafetensorsFormatError(ValueError):
    """A ``.safetensors`` file breaks the format (or ckptable's structure record in it)."""


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
        return loads_json(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(f"{what} is not valid JSON ({exc})") from None


def _header_length(head: bytes, size: int | None, max_header: int) -> int:
    if len(head) < 8:
        raise _corrupt(f"{len(head)} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(head, "little")
    limit = max_header if size is None else min(max_header, size - 8)
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
    if not isinstance(dtype, str) or dtype not in DTYPES:
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
    itemsize = DTYPES[dtype].itemsize
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
                    entry.name: {"np" if DTYPES[entry.dtype].numpy else "pt": entry.name}
                    for entry in layout.entries
                }
            }
        else:
            doc = _json(record, f"__metadata__[{METADATA_KEY!r}]")
            if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
                raise _corrupt(f"__metadata__[{METADATA_KEY!r}] is not ckptable's record")
            version = doc.get("version")
            if type(version) is not int or version < 1:
                raise _corrupt(f"ckptable's record has the invalid version {version!r}")
            if version > FORMAT_VERSION:
                raise IncompatibleCheckpointError(
                    f"The state was written by a newer ckptable (safetensors record "
                    f"version {version}; this one reads up to {FORMAT_VERSION}): "
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
        elif DTYPES[entry.dtype].numpy is None:
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
        dtype = DTYPES[self.entries[node["pt"]].dtype]
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
        from ckptable._torch_placement import TensorPlacement

        placement = TensorPlacement()  # the default: back to the saved devices
    state = _Builder(arrays, structure.dtypes, placement).build(structure.tree)
    if tensors is None and placement is not None:
        placement.warn(stacklevel=4)  # the caller of the codec's load
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
    """Read exactly ``len(view)`` bytes into ``view`` (a big one of a local file with
    parallel reads: ``_parallel_read``)."""
    readinto = getattr(stream, "readinto", None)
    filled, total = 0, len(view)
    if readinto is not None:
        filled = readinto_parallel(stream, view) or 0
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


def read_state(stream: IO[bytes], tensors: TensorPlacement | None, *, max_header: int) -> Any:
    """Read a state from ``stream``, each tensor read straight into its final array."""
    size = _size_of(stream)
    length = _header_length(_read_exactly(stream, 8, "the header length"), size, max_header)
    raw = _read_exactly(stream, length, "the header")
    layout = _parse_header(raw, None if size is None else size - 8 - length)
    structure, np = _prepare(layout)
    arrays: dict[str, Any] = {}
    for entry in layout.entries:
        dtype = np.dtype(DTYPES[entry.dtype].carrier)
        nbytes = math.prod(entry.shape) * dtype.itemsize
        if nbytes:
            # Aligned, uninitialised memory (not numpy's empty: see new_payload_buffer).
            buffer = new_payload_buffer(nbytes)
            _fill(stream, memoryview(buffer), repr(entry.name))
            array = np.frombuffer(buffer, dtype=dtype).reshape(entry.shape)
        else:
            array = np.empty(entry.shape, dtype=dtype)
        arrays[entry.name] = array
    if size is None and stream.read(1):
        raise _corrupt("bytes follow the last tensor")
    return _finish(structure, arrays, tensors)


def map_state(stream: IO[bytes], tensors: TensorPlacement | None, *, max_header: int) -> Any:
    """Read a state from the regular file open as ``stream``, its tensors mapped
    copy-on-write from the file (a tensor not aligned to its item size is copied)."""
    fileno = stream.fileno()
    size = os.fstat(fileno).st_size
    if size < 8:
        raise _corrupt(f"{size} bytes, shorter than the 8-byte header length")
    mapped = mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)
    length = _header_length(mapped[:8], size, max_header)
    layout = _parse_header(mapped[8 : 8 + length], size - 8 - length)
    structure, np = _prepare(layout)
    start = 8 + length
    arrays: dict[str, Any] = {}
    for entry in layout.entries:
        dtype = np.dtype(DTYPES[entry.dtype].carrier)
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
