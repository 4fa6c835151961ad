"""Torch tensors on restore: where each one goes (``map_location``), step two of
:mod:`ckptable._torch` (which writes the records and unpickles them with
:class:`~ckptable._torch.TensorUnpickler`).

:class:`TensorPlacement`, one per restore, holds the functions that the unpickler
resolves ``torch._utils._rebuild_device_tensor_from_numpy``,
``torch.storage._load_from_bytes`` and ``torch._utils._rebuild_tensor_v2`` to; they put
each tensor where ``map_location`` says. The default puts each tensor back on the device
it was saved from where this machine has it, else on the CPU, with one ``UserWarning``
per restore counting the tensors moved. Like :mod:`ckptable._torch`, it imports torch
only when a pickle names one of those functions.
"""

from __future__ import annotations

import collections
import importlib
import io
import mmap
import sys
import threading
import warnings
from typing import Any

from ckptable._torch import import_torch
from ckptable.errors import CheckpointError

__all__ = ["MapLocation", "TensorPlacement", "check_map_location"]


#: ``map_location`` as ``restore_from_path`` takes it (see :class:`TensorPlacement`).
MapLocation = Any


def check_map_location(map_location: MapLocation) -> None:
    """Refuse a ``map_location`` of the wrong type when the restore is called, before
    anything is read (without importing torch).

    Raises:
        TypeError: not None, a string, a ``torch.device``, a dict of those, or a callable.
    """
    if map_location is None or callable(map_location) or _is_device_like(map_location):
        return
    if isinstance(map_location, dict):
        for key, value in map_location.items():
            if not (_is_device_like(key) and _is_device_like(value)):
                raise TypeError(
                    "map_location as a dict maps saved device strings to target devices "
                    f"(strings or torch.device), not {key!r}: {value!r}."
                )
        return
    raise TypeError(
        "map_location must be None, a device string, a torch.device, a dict of saved -> "
        f"target devices or a callable (tensor, saved_device) -> tensor, not {map_location!r}."
    )


def _is_device_like(value: Any) -> bool:
    if isinstance(value, str):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.device)


class TensorPlacement:
    """Where the tensors of one restore go, and how many had to leave their device.

    ``map_location`` has ``torch.load``'s meanings:

    - None (the default): each tensor goes back to the device it was saved from if this
      machine has it, else to the CPU; :meth:`warn` then says how many moved.
    - a device string or ``torch.device``: every tensor goes there.
    - a dict of saved device strings to target devices (``{"cuda:1": "cuda:0"}``):
      devices it does not name follow the default.
    - a callable ``(tensor, saved_device: str) -> tensor | None``: called with each
      tensor as built on the CPU and the string of the device it was saved from; it
      returns the tensor to use (``tensor.to(...)``), or None for the default. It may
      only move the tensor: a result of another dtype or shape is refused. (Unlike
      ``torch.load``'s ``(storage, location)``: ckptable's records hold tensors, not
      storages. For dtypes numpy lacks, ``bfloat16`` say, the callable gets the
      same-width integer tensor of the bytes; the dtype view follows on its device.)

    One instance per restore, used by every file it decodes (thread-safe); it never
    imports torch unless a pickle names one of the functions it replaces.
    """

    def __init__(self, map_location: MapLocation = None) -> None:
        check_map_location(map_location)
        self.map_location = map_location
        self._lock = threading.Lock()
        #: Saved device -> tensors put on the CPU because this machine lacks it.
        self._moved: collections.Counter[str] = collections.Counter()
        self._available: dict[str, bool] = {}
        #: Storages that torch's reducer wrote, as placed by ``load_from_bytes``: id ->
        #: [storage, saved location, moved by the default?, counted?]. Kept until
        #: :meth:`finish_file` (the storage object keeps its id unique meanwhile).
        self._storages: dict[int, list[Any]] = {}

    # -- what the unpickler resolves -----------------------------------------------------

    def replacement(self, module: str, name: str) -> Any:
        """The function to use for the global ``module.name`` in a pickle, or None."""
        if module == "torch._utils":
            if name == "_rebuild_device_tensor_from_numpy":
                return self.rebuild_from_numpy
            if name == "_rebuild_tensor_v2":
                return self.rebuild_tensor_v2
        elif module == "torch.storage" and name == "_load_from_bytes":
            return self.load_from_bytes
        return None

    def rebuild_from_numpy(self, data: Any, dtype: Any, device: Any, requires_grad: Any) -> Any:
        """``torch._utils._rebuild_device_tensor_from_numpy``, placed by ``map_location``."""
        torch = import_torch()
        numpy = importlib.import_module("numpy")
        if not isinstance(data, numpy.ndarray):
            raise TypeError(f"a tensor record holds a {type(data).__name__}, not an array")
        if not isinstance(device, str):
            raise TypeError(f"a tensor record's device is {device!r}, not a string")
        if not data.flags.writeable:
            # torch has no read-only tensors: on the pages of a copy-on-write mapping
            # (mmap=True) the tensor gets a writable view of those pages (a write stays in
            # this process), anything else read-only (a byte string) is copied.
            data = _writable_view(data, numpy)
        tensor = torch.from_numpy(data)
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        tensor = self.place(tensor, device)
        tensor.requires_grad = bool(requires_grad)
        return tensor

    def load_from_bytes(self, data: bytes) -> Any:
        """``torch.storage._load_from_bytes`` (a storage as torch's reducer writes it:
        ``torch.save``'s bytes), loaded with this placement's mapping."""
        return self.load_storage(data, weights_only=False)

    def load_storage(self, data: bytes, *, weights_only: bool) -> Any:
        """``torch.load`` of a storage's bytes (``weights_only=True``: torch's restricted
        unpickler, for safe loads), on the device the mapping chooses; remembered until
        :meth:`finish_file` so that ``_rebuild_tensor_v2`` knows where it came from."""
        torch = import_torch()
        seen: list[tuple[str, bool]] = []

        def restore_location(storage: Any, location: str) -> Any:
            if callable(self.map_location):
                target, fell_back = "cpu", False  # the callable gets the tensors built on it
            else:
                target, fell_back = self._decide(location)
            seen.append((location, fell_back))
            return torch.serialization.default_restore_location(storage, str(target))

        storage = torch.load(
            io.BytesIO(data), map_location=restore_location, weights_only=weights_only
        )
        if seen:
            location, fell_back = seen[0]
            with self._lock:
                self._storages[id(storage)] = [storage, location, fell_back, False]
        return storage

    def rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        metadata: Any = None,
    ) -> Any:
        """``torch._utils._rebuild_tensor_v2``: counts the tensors on storages moved to
        the CPU, and hands them to a callable ``map_location``."""
        torch = import_torch()
        entry = self._storages.get(id(storage))
        if entry is None or not callable(self.map_location):
            tensor = torch._utils._rebuild_tensor_v2(
                storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata
            )
            if entry is not None and entry[2]:
                with self._lock:
                    self._moved[entry[1]] += 1
                    entry[3] = True
            return tensor
        tensor = torch._utils._rebuild_tensor_v2(
            storage, storage_offset, size, stride, False, backward_hooks, metadata
        )
        tensor = self._call(tensor, entry[1])
        tensor.requires_grad = bool(requires_grad)
        return tensor

    def loaded_storage(self, storage: Any) -> bool:
        """Whether ``storage`` came from :meth:`load_storage` in the file being decoded."""
        entry = self._storages.get(id(storage))
        return entry is not None and entry[0] is storage

    def finish_file(self) -> None:
        """A file is decoded: count moved storages no tensor was built on (a sparse
        tensor's, say) once each, and forget the storages."""
        with self._lock:
            for _, location, moved, counted in self._storages.values():
                if moved and not counted:
                    self._moved[location] += 1
            self._storages.clear()

    # -- where a tensor goes ---------------------------------------------------------------

    def place(self, tensor: Any, saved: str) -> Any:
        """Put ``tensor`` (on the CPU, just built) where the mapping sends a tensor saved
        on ``saved``."""
        if callable(self.map_location):
            return self._call(tensor, saved)
        target, fell_back = self._decide(saved)
        if fell_back:
            self._count(saved)
        return tensor.to(target)

    def _call(self, tensor: Any, saved: str) -> Any:
        result = self.map_location(tensor, saved)
        if result is None:
            target, fell_back = self._default(saved)
            if fell_back:
                self._count(saved)
            return tensor.to(target)
        torch = import_torch()
        if not isinstance(result, torch.Tensor):
            raise CheckpointError(
                f"The map_location callable returned a {type(result).__name__} for a "
                f"tensor saved on {saved}, not a tensor (or None for the default)."
            )
        if result.dtype != tensor.dtype or result.shape != tensor.shape:
            raise CheckpointError(
                f"The map_location callable turned a {tensor.dtype} tensor of shape "
                f"{tuple(tensor.shape)} saved on {saved} into a {result.dtype} one of "
                f"shape {tuple(result.shape)}: it may only move tensors between devices."
            )
        return result

    def _decide(self, saved: str) -> tuple[Any, bool]:
        """Where a tensor saved on ``saved`` goes (for every mapping but a callable), and
        whether it goes to the CPU only because this machine lacks ``saved``."""
        mapping = self.map_location
        if mapping is None:
            return self._default(saved)
        if isinstance(mapping, dict):
            target = _lookup(mapping, saved)
            if target is None:
                return self._default(saved)
        else:
            target = mapping
        return self._require(target), False

    def _default(self, saved: str) -> tuple[str, bool]:
        if self.available(saved):
            return saved, False
        return "cpu", True

    def _count(self, saved: str) -> None:
        with self._lock:
            self._moved[saved] += 1

    def _require(self, target: Any) -> Any:
        """An explicit target (from ``map_location``) that this machine must have."""
        if not self.available(str(target)):
            raise CheckpointError(
                f"map_location sends tensors to {str(target)!r}, which this machine does "
                "not have (or torch cannot use)."
            )
        return target

    def available(self, device: str) -> bool:
        """Whether this machine has ``device`` (``"cuda:1"``: CUDA with 2+ GPUs)."""
        known = self._available.get(device)
        if known is None:
            known = _device_available(device)
            self._available[device] = known
        return known

    # -- the warning -----------------------------------------------------------------------

    def moved(self) -> dict[str, int]:
        """Saved device -> tensors restored to the CPU because that device is missing."""
        with self._lock:
            return dict(self._moved)

    def reset(self) -> None:
        """Forget the counts (a restore reads the checkpoint again)."""
        with self._lock:
            self._moved.clear()
            self._storages.clear()

    def warn(self, stacklevel: int = 2) -> None:
        """One ``UserWarning`` if tensors were moved to the CPU (then forgets them)."""
        with self._lock:
            moved, self._moved = dict(self._moved), collections.Counter()
        if not moved:
            return
        count = sum(moved.values())
        where = ", ".join(f"{device} ({n})" for device, n in sorted(moved.items()))
        lacks = "that device" if len(moved) == 1 else "those devices"
        warnings.warn(
            f"{count} tensor{'s' if count != 1 else ''} saved on {where} "
            f"{'were' if count != 1 else 'was'} restored to the CPU: this machine does "
            f"not have {lacks}. Pass map_location= to choose where tensors go.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _writable_view(array: Any, numpy: Any) -> Any:
    """A writable array on the memory of the read-only ``array``: the same pages where
    they belong to a private, copy-on-write mapping (``mmap.ACCESS_COPY``, what
    ``mmap=True`` maps pickle files with), else a copy.

    NumPy keeps the buffer an array was made from in its ``base`` chain; a read-only
    ``memoryview`` of such a mapping names the mapping as its ``obj``."""
    base = array
    while isinstance(base, numpy.ndarray):
        base = base.base
    mapped = base.obj if isinstance(base, memoryview) else None
    if not isinstance(mapped, mmap.mmap) or mapped.closed:
        return array.copy()
    whole = numpy.frombuffer(mapped, dtype=numpy.uint8)
    if not whole.flags.writeable:  # mapped read-only (ACCESS_READ): copy
        return array.copy()
    offset = array.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
    contiguous = array.flags.c_contiguous or array.flags.f_contiguous
    if not contiguous or offset < 0 or offset + array.nbytes > len(whole):
        return array.copy()
    return numpy.ndarray(
        array.shape, array.dtype, buffer=whole, offset=offset, strides=array.strides
    )


def _lookup(mapping: dict[Any, Any], saved: str) -> Any:
    target = mapping.get(saved)
    if target is None:
        for key, value in mapping.items():
            if not isinstance(key, str) and str(key) == saved:
                return value
    return target


def _device_available(device: str) -> bool:
    torch = import_torch()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return False
    if parsed.type == "cpu":
        return True
    if parsed.type == "cuda":
        index = 0 if parsed.index is None else parsed.index
        return bool(torch.cuda.is_available()) and index < torch.cuda.device_count()
    try:
        torch.empty(0, device=parsed)
    except Exception:
        return False
    return True
