"""Torch tensors in ckptable's pickles: written as numpy arrays, placed on devices on restore.

Why: pickled the ordinary way, a ``torch.Tensor`` goes through ``torch.save`` into a
byte string inside the pickle (``torch.storage._load_from_bytes``). That is slow (a
second serializer, a copy), cannot be loaded with ``safe=True`` without allowing
``torch.load`` (which runs pickles), and a tensor saved from a GPU cannot be loaded on a
CPU-only machine at all: torch's loader raises "Attempting to deserialize object on a
CUDA device".

**Saving.** Once ``torch`` is imported (ckptable never imports it for states without
tensors), the cloudpickle codec pickles with :func:`pickler_class`, whose dispatch table
sends ``torch.Tensor`` (exactly that type; ``torch.nn.Parameter`` pickles itself as
``_rebuild_parameter`` around its plain ``.data`` tensor) to :func:`reduce_tensor`:
the tensor's bytes become a numpy array, which pickle protocol 5 writes as one big
out-of-band payload (read straight into its final memory by ``_pickle_scan``), plus a
small record naming only torch's and numpy's own functions, so any process with torch
and numpy loads it with plain ``pickle.load`` (RLlib never imports ckptable)::

    torch._utils._rebuild_device_tensor_from_numpy(array, torch.float32, "cuda:0", True)

For dtypes numpy lacks (``bfloat16``, ``float8_*``, ``complex32``, sub-byte and bit
types), the array holds the bytes as a same-width integer type and the record views
them back, through the method descriptors as pickle writes them
(``builtins.getattr(torch._C.TensorBase, "view")``)::

    getattr(TensorBase, "requires_grad_")(
        getattr(TensorBase, "view")(_rebuild_device_tensor_from_numpy(
            int16_array, torch.int16, "cuda:0", False), torch.bfloat16),
        True)                                   # only when requires_grad

What changes in a round trip: strides (every tensor comes back contiguous); tensors
that shared one storage (views of each other, tied weights as distinct tensor objects)
come back as independent copies (the same tensor *object* twice stays one object);
conjugate and negative bits are resolved into the values. Values are bit-exact (NaN
payloads included), and so are dtype, shape, ``requires_grad`` and ``Parameter``-ness.

Kept on torch's own reducer (``torch.save`` inside the pickle, as before): sparse,
quantized, nested and meta tensors, tensor subclasses other than ``Parameter``, named
tensors, tensors (and Parameters) carrying attributes of their own, and dtypes this
module does not know.

**Restoring** (:class:`~ckptable._torch_placement.TensorPlacement`, one per restore):
ckptable's unpickler (:class:`TensorUnpickler`) resolves
``_rebuild_device_tensor_from_numpy``, ``torch.storage._load_from_bytes`` and
``torch._utils._rebuild_tensor_v2`` to methods of the placement, which put each tensor
where ``map_location`` says: for the records
above and for tensors that torch's reducer wrote (older ckptable checkpoints, RLlib's).
The default puts each tensor back on the device it was saved from where this machine
has it, else on the CPU, with one ``UserWarning`` per restore counting the tensors
moved.
"""

from __future__ import annotations

import collections
import importlib
import pickle
import sys
import threading
import types
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from ckptable._buffer_views import FROMBUFFER, watched, watching

if TYPE_CHECKING:
    from ckptable._torch_placement import TensorPlacement

__all__ = [
    "INSTALL_HINT",
    "TensorUnpickler",
    "import_torch",
    "load_pickle",
    "pickler_class",
    "reduce_tensor",
]

INSTALL_HINT = "pip install 'ckptable[torch]'"


def import_torch() -> types.ModuleType:
    """``torch``, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError(
            f"This checkpoint holds torch tensors, which need PyTorch: {INSTALL_HINT} ({exc})."
        ) from exc


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


class _Call:
    """A call written into the pickle as ``fn(*args)``: an argument of a record that is
    itself a call (the integer tensor that a ``view`` turns back into ``bfloat16``).
    Only ``fn`` is named in the pickle, never this class."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


class _Dtypes:
    """What :func:`reduce_tensor` needs to know of torch's dtypes (built once)."""

    def __init__(self, torch: Any) -> None:
        names = (
            "bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
            "float64", "complex64", "complex128", "uint16", "uint32", "uint64",
        )  # fmt: skip
        #: dtypes whose tensors have a ``.numpy()``: written as they are.
        self.numpy: frozenset[Any] = frozenset(
            getattr(torch, name) for name in names if hasattr(torch, name)
        )
        #: the signed integer dtype of each width, for the bytes of the other dtypes.
        self.by_width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        quantized = {
            getattr(torch, name)
            for name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
            if hasattr(torch, name)
        }
        #: the other dtypes: written as integers of their width, viewed back.
        self.viewed: dict[Any, Any] = {}
        for value in vars(torch).values():
            if isinstance(value, torch.dtype) and value not in self.numpy:
                width = value.itemsize
                if value not in quantized and width in self.by_width:
                    self.viewed[value] = self.by_width[width]
        self.strided = torch.strided
        self.rebuild = torch._utils._rebuild_device_tensor_from_numpy
        self.view = torch._C.TensorBase.view
        self.requires_grad_ = torch._C.TensorBase.requires_grad_


_DTYPES: _Dtypes | None = None
_PICKLER: type | None = None
_SETUP_LOCK = threading.Lock()


def _dtypes() -> _Dtypes:
    global _DTYPES
    if _DTYPES is None:
        _DTYPES = _Dtypes(import_torch())
    return _DTYPES


def pickler_class() -> type:
    """The pickler class of the cloudpickle codec for this process.

    ``cloudpickle.Pickler`` as long as torch is not imported (no tensor can exist, and
    nothing is imported here), else its subclass whose dispatch table (looked up by the
    C pickler by exact type, so it costs nothing for other objects) writes
    ``torch.Tensor`` with :func:`reduce_tensor`.
    """
    import cloudpickle

    if "torch" not in sys.modules:
        return cloudpickle.Pickler  # type: ignore[no-any-return]
    global _PICKLER
    if _PICKLER is None:
        with _SETUP_LOCK:
            if _PICKLER is None:
                torch = import_torch()
                table = collections.ChainMap(
                    {torch.Tensor: reduce_tensor}, cloudpickle.Pickler.dispatch_table
                )
                _PICKLER = type(
                    "TensorPickler",
                    (cloudpickle.Pickler,),
                    {"dispatch_table": table, "__module__": __name__},
                )
    return _PICKLER


def _own_reducer(tensor: Any) -> Any:
    return tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def reduce_tensor(tensor: Any) -> Any:
    """The pickle record of a ``torch.Tensor`` (see the module docstring); torch's own
    reduction for tensors the record cannot express."""
    dtypes = _dtypes()
    dtype = tensor.dtype
    if (
        tensor.layout is not dtypes.strided
        or tensor.is_quantized
        or tensor.is_nested
        or tensor.is_meta
        or (dtype not in dtypes.numpy and dtype not in dtypes.viewed)
        or tensor.__dict__
        or any(name is not None for name in getattr(tensor, "names", ()))
    ):
        return _own_reducer(tensor)
    device = str(tensor.device)
    on_cpu = tensor.device.type == "cpu"
    data = tensor.detach()
    if data.is_conj():
        data = data.resolve_conj()
    if data.is_neg():
        data = data.resolve_neg()
    requires_grad = bool(tensor.requires_grad)
    if dtype in dtypes.numpy:
        data = data.contiguous() if on_cpu else data.contiguous().to("cpu")
        return dtypes.rebuild, (data.numpy(), dtype, device, requires_grad)
    # Viewed as integers first (same item size: any strides), then copied: devices need
    # no copy kernel for the exotic dtype itself.
    width_type = dtypes.viewed[dtype]
    data = data.view(width_type).contiguous()
    if not on_cpu:
        data = data.to("cpu")
    raw = _Call(dtypes.rebuild, (data.numpy(), width_type, device, False))
    if not requires_grad:
        return dtypes.view, (raw, dtype)
    return dtypes.requires_grad_, (_Call(dtypes.view, (raw, dtype)), True)


# --------------------------------------------------------------------------------------
# Restoring: the unpickler (where tensors go: ckptable._torch_placement)
# --------------------------------------------------------------------------------------


class TensorUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` (C speed) whose torch rebuild functions are those of
    ``placement``; every other global resolves as usual (see the module docstring)."""

    def __init__(
        self,
        file: IO[bytes],
        *,
        placement: TensorPlacement,
        buffers: Iterable[Any] | None = None,
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._placement = placement

    def find_class(self, module: str, name: str) -> Any:
        if not module.startswith("torch"):
            found = super().find_class(module, name)
            # (Payloads may be views of downloaded memory: see _buffer_views.)
            if (module, name) in FROMBUFFER and watching():
                return watched(found)
            return found
        replaced = self._placement.replacement(module, name)
        if replaced is not None:
            return replaced
        if module.split(".")[0] == "torch":
            import_torch()  # an ImportError that says how to install torch, if missing
        return super().find_class(module, name)


def load_pickle(
    stream: IO[bytes],
    *,
    buffers: Iterable[Any] | None = None,
    placement: TensorPlacement | None = None,
) -> Any:
    """``pickle.load`` with tensors placed by ``placement`` (a new default one, which
    warns by itself, if None)."""
    from ckptable._torch_placement import TensorPlacement

    own = placement is None
    used = TensorPlacement() if placement is None else placement
    try:
        return TensorUnpickler(stream, placement=used, buffers=buffers).load()
    finally:
        used.finish_file()
        if own:
            used.warn(stacklevel=3)
