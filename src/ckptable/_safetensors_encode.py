"""The safetensors codec, writing: check that a state fits, plan its file, stream it out.

Why this order: a state that does not fit must fail before a byte is written, so the
state is walked once first (:class:`_Encoder`): every value checked (the error names its
key path), every array and tensor named and planned, and the structure record built.
Only then is the header (:meth:`_Encoder.header`) laid out, biggest item size first so
every tensor starts aligned, and checked against the readers' limit; and each tensor's
bytes are written straight from its own memory (:meth:`Planned.data`), without staging
the file in memory. The file's layout is described in :mod:`ckptable._safetensors`,
which passes the header limit in (its ``MAX_HEADER_BYTES``).

numpy and torch are never imported here: a state can only hold their arrays once the
user has imported them, so they are taken from ``sys.modules``.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import sys
from typing import IO, Any

from ckptable._safetensors_format import DTYPES, FORMAT_NAME, FORMAT_VERSION, METADATA_KEY
from ckptable.errors import StateEncodingError

__all__ = ["Planned", "plan_file", "write_file"]


class Planned:
    """One array or tensor to write: its name, safetensors dtype, shape and size."""

    __slots__ = ("dtype", "name", "nbytes", "shape", "torch", "value")

    def __init__(self, name: str, dtype: str, shape: list[int], value: Any, torch: bool) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.value = value
        self.torch = torch
        self.nbytes = math.prod(shape) * DTYPES[dtype].itemsize

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
        self.tensors: list[Planned] = []
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
        self.tensors.append(Planned(chosen, st_dtype, list(value.shape), value, False))
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
        self.tensors.append(Planned(chosen, st_dtype, list(value.shape), value, True))
        encoded: dict[str, Any] = {"pt": chosen}
        if value.requires_grad:
            encoded["grad"] = True
        if is_parameter:
            encoded["param"] = True
        if value.device.type != "cpu":
            encoded["device"] = str(value.device)
        return encoded

    def header(self, tree: Any, max_header: int) -> bytes:
        """The 8-byte length and the padded JSON header, tensors laid out biggest item
        size first (each then starts at a multiple of its item size); refused if longer
        than ``max_header`` bytes."""
        self.tensors.sort(key=lambda planned: -DTYPES[planned.dtype].itemsize)
        record = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tree": tree}
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
        if len(raw) > max_header:
            raise StateEncodingError(
                f"state has {len(raw):,} bytes of names and non-tensor values, more than the "
                f"{max_header:,} a safetensors header may hold (readers refuse bigger "
                "ones): keep big data in arrays, or use another format."
            )
        return len(raw).to_bytes(8, "little") + raw


@functools.cache
def _numpy_names() -> dict[Any, str]:
    """numpy dtype (little-endian) → safetensors dtype."""
    np = sys.modules["numpy"]
    return {np.dtype(d.numpy): name for name, d in DTYPES.items() if d.numpy is not None}


@functools.cache
def _torch_names() -> dict[Any, str]:
    """torch dtype → safetensors dtype (those this torch has)."""
    torch = sys.modules["torch"]
    found = ((getattr(torch, d.torch, None), name) for name, d in DTYPES.items())
    return {dtype: name for dtype, name in found if dtype is not None}


def plan_file(state: Any, max_header: int) -> tuple[bytes, list[Planned]]:
    """Check ``state`` and plan its file: the header and the tensors to write after it.

    Raises:
        StateEncodingError: a value does not fit (the message names its key path), or the
            header would exceed ``max_header`` bytes.
    """
    encoder = _Encoder()
    tree = encoder.node(state, "state", None)
    return encoder.header(tree, max_header), encoder.tensors


def write_file(stream: IO[bytes], header: bytes, tensors: list[Planned]) -> None:
    """Write a planned file: the header, then each tensor's bytes from its memory."""
    _write_all(stream, memoryview(header))
    for planned in tensors:
        if planned.nbytes:
            _write_all(stream, planned.data())


def _write_all(stream: IO[bytes], view: memoryview) -> None:
    """Write all of ``view`` (a raw stream may take less than it is given)."""
    while view:
        written = stream.write(view)
        if written is None or written >= len(view):
            return
        if written <= 0:
            raise OSError(f"Short write: the stream accepted {written} bytes.")
        view = view[written:]
