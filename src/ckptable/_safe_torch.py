"""Safe loading, torch's part: tensors from their records, nothing else of torch.

Why: ckptable writes a tensor as a numpy array plus a record that calls torch's own
rebuild function (:mod:`ckptable._torch`), and ``safe=True`` should load that without
``add_safe_classes``; but a record is a call with arguments from the file, and torch's
functions trust them. So the record's globals resolve to the stand-ins of this module,
which exist only for that record, and each call goes through its rule first
(registered in :mod:`ckptable._safe_rules`' registry; the allowlist entries that lead
here are in :mod:`ckptable._safe_allowlist`):

- ``torch._utils._rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad)``:
  ``data`` a numpy array the safe numpy path built and finished (never one still waiting
  for its ``BUILD``, whose memory numpy would free under the tensor), native, numeric,
  contiguous; ``dtype`` a ``torch.dtype`` that is exactly the array's (no conversion);
  ``device`` a short string that ``torch.device`` parses back to itself (torch keeps
  the index in 8 bits: "cuda:70000" would be cuda:112), of a known device type;
  ``requires_grad`` a bool, True only for floating and complex dtypes. The tensor is
  then placed by the restore's ``map_location`` (:class:`TensorPlacement`).
- ``getattr(torch._C.TensorBase, "view")(tensor, dtype)``: the method is reached only
  through ``getattr`` on ``TensorBase`` with that exact name (any other name is not on
  the allowlist); ``tensor`` a tensor of a signed integer dtype, ``dtype`` a dtype numpy
  lacks of the same item size (bfloat16 from int16, ...). ``requires_grad_`` likewise,
  with ``(tensor, bool)``.
- ``torch._utils._rebuild_parameter(tensor, requires_grad, hooks)``: a tensor, a bool
  and an empty ``OrderedDict`` (a hook would be code to run).
- ``torch.<dtype>`` globals: resolved only to a real ``torch.dtype``
  (:func:`resolve_torch_global`).
- torch's own reducer (older checkpoints, RLlib's): ``torch.storage._load_from_bytes(b)``
  is loaded with ``torch.load(..., weights_only=True)`` (torch's restricted unpickler)
  after checking that ``b`` is exactly one storage in torch's legacy layout whose
  declared size is the bytes that follow (no allocation sized by a number in the file);
  its device tag must be a device string like the above. ``_rebuild_tensor_v2(storage,
  offset, size, stride, requires_grad, hooks[, metadata])``: a storage loaded so in this
  load, a view (offset, sizes, strides >= 0) inside it, empty hooks and metadata.

Nothing else of torch resolves; ``BUILD`` on torch objects is refused by the unpickler
(:func:`build_problem`). torch is imported only when a pickle names it.
"""

from __future__ import annotations

import collections
import contextvars
import io
import pickle
import pickletools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ckptable._safe_allowlist import imported_numpy
from ckptable._safe_rules import Rule, arity, brief, register_rules
from ckptable._torch import import_torch
from ckptable._torch_placement import TensorPlacement
from ckptable.errors import UnsafeCheckpointError

if TYPE_CHECKING:
    from ckptable._safe_unpickler import SafeUnpickler

__all__ = [
    "build_problem",
    "load_from_bytes",
    "placing",
    "rebuild_device_tensor_from_numpy",
    "rebuild_parameter",
    "rebuild_tensor_v2",
    "resolve_torch_global",
    "tensor_requires_grad_",
    "tensor_view",
]

#: Device types a record may name (what torch itself writes for tensors it can hold).
DEVICE_TYPES = frozenset(
    {"cpu", "cuda", "mps", "xpu", "hpu", "mtia", "xla", "maia", "ipu", "privateuseone"}
)
_MAX_DEVICE_TEXT = 32
_MAX_DIMS = 64
#: Offsets, sizes and strides of torch's reducer above this are refused (no real tensor
#: has them; products of them are then far from overflowing anything).
_MAX_INDEX = 1 << 48

#: The placement of the load in progress (set by the codec around a safe load).
_PLACEMENT: contextvars.ContextVar[TensorPlacement | None] = contextvars.ContextVar(
    "ckptable_safe_tensor_placement", default=None
)


@contextmanager
def placing(placement: TensorPlacement) -> Iterator[None]:
    """Tensors made by the stand-ins during the ``with`` go where ``placement`` says."""
    token = _PLACEMENT.set(placement)
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def _placement() -> TensorPlacement:
    placement = _PLACEMENT.get()
    if placement is None:  # a direct safe_pickle_load: the default, for this tensor
        placement = TensorPlacement()
    return placement


# --------------------------------------------------------------------------------------
# Resolving torch's globals
# --------------------------------------------------------------------------------------


def resolve_torch_global(module: str, name: str) -> object | None:
    """The object for ``module.name`` if it is a ``torch.<dtype>`` global (the record's
    dtypes); None for any other name (the allowlist decides about those). Imports torch
    (it is what the pickle needs), with a message saying how to install it if missing."""
    if module != "torch" or not name.isidentifier():
        return None
    torch = import_torch()
    value = torch.__dict__.get(name)  # never a module __getattr__
    return value if isinstance(value, torch.dtype) else None


def build_problem(inst: object) -> str | None:
    """Why ``BUILD`` may not set the state of ``inst``: any torch object (a tensor's
    ``__setstate__`` would re-point it at any storage, set hooks to run)."""
    module = getattr(type(inst), "__module__", "") or ""
    if module.split(".")[0] == "torch":
        return f"the pickle sets the state of a {type(inst).__name__} (torch objects get none)"
    return None


# --------------------------------------------------------------------------------------
# The stand-ins (called only after their rules passed)
# --------------------------------------------------------------------------------------


def rebuild_device_tensor_from_numpy(
    data: Any, dtype: Any, device: str, requires_grad: bool
) -> Any:
    """``torch._utils._rebuild_device_tensor_from_numpy``, placed by ``map_location``."""
    return _placement().rebuild_from_numpy(data, dtype, device, requires_grad)


def tensor_view(tensor: Any, dtype: Any) -> Any:
    """``torch.Tensor.view(tensor, dtype)``."""
    return tensor.view(dtype)


def tensor_requires_grad_(tensor: Any, requires_grad: bool) -> Any:
    """``torch.Tensor.requires_grad_(tensor, requires_grad)``."""
    return tensor.requires_grad_(requires_grad)


def rebuild_parameter(data: Any, requires_grad: bool, hooks: Any) -> Any:
    """``torch._utils._rebuild_parameter`` (hooks are empty: checked)."""
    return import_torch().nn.Parameter(data, requires_grad)


def load_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes``: ``torch.load(weights_only=True)``, placed."""
    storage = _placement().load_storage(data, weights_only=True)
    torch = import_torch()
    if type(storage) is not torch.storage.TypedStorage:
        raise UnsafeCheckpointError(
            f"refusing a tensor storage: it holds a {type(storage).__name__}"
        )
    return storage


def rebuild_tensor_v2(
    storage: Any,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> Any:
    """``torch._utils._rebuild_tensor_v2`` (a view inside a storage of this load)."""
    return _placement().rebuild_tensor_v2(
        storage, storage_offset, size, stride, requires_grad, backward_hooks, None
    )


# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------


def device_problem(device: object) -> str | None:
    """Why ``device`` is not a device string a record may name."""
    if not isinstance(device, str) or len(device) > _MAX_DEVICE_TEXT:
        return f"its device {brief(device)} is not a device string"
    torch = import_torch()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"its device {device!r} is not a device torch knows"
    if parsed.type not in DEVICE_TYPES:
        return f"its device type {parsed.type!r} is not one of {sorted(DEVICE_TYPES)}"
    if str(parsed) != device:
        # torch keeps an index in 8 bits ("cuda:70000" is cuda:112) and drops some it
        # cannot parse: only the spelling torch itself writes is taken
        return f"its device {device!r} is not written as torch writes it ({str(parsed)!r})"
    return None


def _grad_problem(dtype: Any, requires_grad: object) -> str | None:
    if type(requires_grad) is not bool:
        return f"requires_grad is {brief(requires_grad)}, not a bool"
    if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
        return f"a {dtype} tensor cannot require gradients"
    return None


def _is_tensor(value: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and type(value) in (torch.Tensor, torch.nn.Parameter)


def _is_dtype(value: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.dtype)


class _TorchDtypes:
    """numpy dtype -> torch dtype for the dtypes numpy has; the integer type of each
    width; the dtypes numpy lacks (only these are reached through ``view``)."""

    def __init__(self, torch: Any) -> None:
        from ckptable._torch import _dtypes

        known = _dtypes()
        self.from_numpy = {torch.empty(0, dtype=d).numpy().dtype: d for d in known.numpy}
        self.width_types = frozenset(known.by_width.values())
        self.viewed = frozenset(known.viewed)


_DTYPES: _TorchDtypes | None = None


def _torch_dtypes() -> _TorchDtypes:
    global _DTYPES
    if _DTYPES is None:
        _DTYPES = _TorchDtypes(import_torch())
    return _DTYPES


def _rule_rebuild_from_numpy(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 4, 4)
    if problem is not None:
        return problem
    data, dtype, device, requires_grad = args
    numpy = imported_numpy()
    if numpy is None or type(data) is not numpy.ndarray:
        return f"its data is a {type(data).__name__}, not a numpy array"
    if id(data) in u._arrays.unbuilt or id(data) in u._arrays.pending:
        return "its array is still waiting for its data (BUILD), which would free it"
    if not (data.flags.c_contiguous or data.flags.f_contiguous) or not data.dtype.isnative:
        return "its array is not contiguous in native byte order"
    if not _is_dtype(dtype):
        return f"its dtype is {brief(dtype)}, not a torch.dtype"
    expected = _torch_dtypes().from_numpy.get(data.dtype)
    if expected is None:
        return f"an array of {data.dtype} does not make a tensor"
    if dtype != expected:
        return f"an array of {data.dtype} holds {expected}, not {dtype}"
    return device_problem(device) or _grad_problem(dtype, requires_grad)


def _rule_view(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 2, 2)
    if problem is not None:
        return problem
    tensor, dtype = args
    if not _is_tensor(tensor):
        return f"view() of a {type(tensor).__name__}, not a tensor"
    dtypes = _torch_dtypes()
    if tensor.dtype not in dtypes.width_types:
        return f"view() of a {tensor.dtype} tensor (records view integers only)"
    if not _is_dtype(dtype) or dtype not in dtypes.viewed:
        return f"view() as {brief(dtype)} (only dtypes numpy lacks are viewed)"
    if dtype.itemsize != tensor.dtype.itemsize:
        return f"view() of {tensor.dtype} as {dtype}, of another item size"
    return None


def _rule_requires_grad_(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 2, 2)
    if problem is not None:
        return problem
    tensor, requires_grad = args
    if not _is_tensor(tensor):
        return f"requires_grad_() of a {type(tensor).__name__}, not a tensor"
    return _grad_problem(tensor.dtype, requires_grad)


def _hooks_problem(hooks: object) -> str | None:
    if type(hooks) is not collections.OrderedDict or hooks:
        return "its backward hooks must be an empty OrderedDict (a hook is code to run)"
    return None


def _rule_parameter(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 3, 3)
    if problem is not None:
        return problem
    data, requires_grad, hooks = args
    torch = sys.modules.get("torch")
    if torch is None or type(data) is not torch.Tensor:
        return f"a Parameter of a {type(data).__name__}, not a tensor"
    return _grad_problem(data.dtype, requires_grad) or _hooks_problem(hooks)


def _rule_load_from_bytes(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 1, 1)
    if problem is not None:
        return problem
    if type(args[0]) is not bytes:
        return f"a storage from a {type(args[0]).__name__}, not bytes"
    return legacy_storage_problem(args[0])


def _rule_rebuild_tensor_v2(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 6, 7)
    if problem is not None:
        return problem
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    if len(args) == 7 and args[6] not in (None, {}):
        return "tensor metadata (only None or empty is accepted)"
    placement = _PLACEMENT.get()
    if placement is None or not placement.loaded_storage(storage):
        return "its storage was not loaded by this pickle's _load_from_bytes"
    problem = _view_problem(storage.size(), offset, size, stride)
    if problem is not None:
        return problem
    return _grad_problem(storage.dtype, requires_grad) or _hooks_problem(hooks)


def _view_problem(elements: int, offset: object, size: object, stride: object) -> str | None:
    """Why ``(offset, size, stride)`` is not a view inside ``elements`` items."""
    if type(offset) is not int or not 0 <= offset <= _MAX_INDEX:
        return f"its storage offset {brief(offset)}"
    if (
        type(size) is not tuple
        or type(stride) is not tuple
        or len(size) != len(stride)
        or len(size) > _MAX_DIMS
    ):
        return "its size and stride must be tuples of the same length"
    if not all(type(n) is int and 0 <= n <= _MAX_INDEX for n in (*size, *stride)):
        return f"its size {brief(size)} or stride {brief(stride)} has a value out of range"
    if 0 in size:
        return None if offset <= elements else f"its offset {offset} is past the storage"
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= elements:
        return (
            f"a view of size {brief(size)}, stride {brief(stride)} at offset {offset} "
            f"reaches item {last} of a storage of {elements}"
        )
    return None


def _rule_not_callable(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return "torch's tensor class is only named, never called"


# -- torch's legacy storage layout -----------------------------------------------------

#: The pickles ``torch.save(storage, _use_new_zipfile_serialization=False)`` writes
#: before the storage's bytes: magic number, protocol version, system info, the object
#: (a persistent id), the storage keys.
_LEGACY_PICKLES = 5


class _LegacyReader(pickle.Unpickler):
    """Reads the small pickles of the legacy layout: no globals but storage classes
    (as their names), persistent ids recorded as they are."""

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self.ids: list[Any] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.isidentifier() and name.endswith("Storage"):
            return ("storage-class", name)
        raise pickle.UnpicklingError(f"the global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        self.ids.append(pid)
        return None


def legacy_storage_problem(data: bytes) -> str | None:
    """Why ``data`` is not exactly one storage in torch's legacy layout whose size field
    and declared item count match the bytes that follow (so ``torch.load`` allocates no
    more than the file holds)."""
    stream = io.BytesIO(data)
    values: list[Any] = []
    ids: list[Any] = []
    try:
        for _ in range(_LEGACY_PICKLES):
            start = stream.tell()
            for _op in pickletools.genops(stream):
                pass  # (finds the end of one pickle, running nothing)
            reader = _LegacyReader(io.BytesIO(data[start : stream.tell()]))
            values.append(reader.load())
            ids.extend(reader.ids)
    except Exception as exc:
        return f"it is not torch's legacy storage layout ({type(exc).__name__}: {exc})"
    if len(ids) != 1:
        return f"it holds {len(ids)} storages, not one"
    pid = ids[0]
    if not (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage"):
        return "its storage record is not (storage, type, key, location, count, None)"
    _, kind, key, location, count, view = pid
    if not (type(kind) is tuple and kind[0] == "storage-class"):
        return "its storage type is not a torch storage class"
    itemsize = _storage_itemsize(kind[1])
    if itemsize is None:
        return f"torch has no storage class {kind[1]!r}"
    if type(key) is not str or values[4] != [key] or view is not None:
        return "its storage keys do not match its one storage"
    problem = device_problem(location)
    if problem is not None:
        return problem.replace("its device", "its location")
    if type(count) is not int or count < 0:
        return f"its item count {brief(count)}"
    rest = data[stream.tell() :]
    if len(rest) < 8 or int.from_bytes(rest[:8], "little") != count:
        return "its size field does not match its item count"
    if len(rest) - 8 != count * itemsize:
        return f"{count} items of {itemsize} bytes, but {len(rest) - 8} bytes follow"
    return None


def _storage_itemsize(name: str) -> int | None:
    torch = import_torch()
    cls = torch.__dict__.get(name)
    legacy = getattr(torch.storage, "_LegacyStorage", None)
    if not (isinstance(cls, type) and legacy is not None and issubclass(cls, legacy)):
        return None
    dtype = getattr(cls, "_dtype", None)
    return int(dtype.itemsize) if isinstance(dtype, torch.dtype) else None


#: The rules of torch's stand-ins, by where each is found (``BUILTIN_ALLOWED``).
_TORCH_RULES: dict[tuple[str, str], Rule] = {
    (__name__, "rebuild_device_tensor_from_numpy"): _rule_rebuild_from_numpy,
    (__name__, "tensor_view"): _rule_view,
    (__name__, "tensor_requires_grad_"): _rule_requires_grad_,
    (__name__, "rebuild_parameter"): _rule_parameter,
    (__name__, "load_from_bytes"): _rule_load_from_bytes,
    (__name__, "rebuild_tensor_v2"): _rule_rebuild_tensor_v2,
    ("torch", "Tensor.__base__"): _rule_not_callable,
}

register_rules(_TORCH_RULES)
