"""Torch tensors in async snapshots: GPU tensors copied into reused pinned host memory.

``ckptable._snapshot`` imports this module only when ``torch`` is imported already (a
state can hold tensors only then): a process that never imports torch never does here.

**The copy, in the caller** (``take_snapshot``). The state is pickled by
:class:`SnapshotPickler`: CPU tensors as ckptable's codec writes them
(``_torch.reduce_tensor``: numpy arrays, out of band, which ``_snapshot`` copies into
its arena), each CUDA tensor as a placeholder naming its index. :meth:`DeviceCopies.start`
then copies the bytes of every CUDA tensor into one block of page-locked ("pinned") host
memory, ``copy_(non_blocking=True)`` on a side stream per device that first waits for the
device's current stream (so the copies see every write queued before the call), and
:meth:`DeviceCopies.wait` waits on the events recorded after them. A pinned copy runs at
the link's speed (on an H200, 2 GiB in 39 ms; into fresh pageable memory, 1.6 s of page
faults). Once ``wait`` returns, nothing done to the tensors reaches the copy; the caller
never waits for any serialisation.

**The pinned block is reused** (:class:`HostArena`): page-locking memory costs far more
than the copy, so the block goes back to the ``SnapshotPool`` when the save ends and the
next snapshot copies into it (a bigger state replaces it by a bigger block, with room to
grow). ``SnapshotPool.close()`` (``CheckpointManager.close()``,
``ckptable.release_snapshot_memory()``) frees it.

**The write, in the background** (:meth:`DeviceCopies.load` unpickles the skeleton). Each
placeholder becomes:

- ``records=True`` (the save writes every level with the cloudpickle codec): a
  :class:`HostTensor`, which pickles as exactly the record ``reduce_tensor`` writes for
  the original tensor, its device string ("cuda:0") included, with the bytes read
  straight from the pinned block: the file is the one a synchronous save writes, restores
  put the tensor back on its GPU, and nothing is copied again. (``Parameter``s around
  such tensors stay deferred calls, :class:`_Deferred`, for the same reason.)
- ``records=False`` (other codecs, such as safetensors, which need real tensors; levels
  whose own ``save_to_path`` may look at the state; or a skeleton that does not unpickle
  around host copies, as a tensor subclass's rebuild function may not): the pinned copy
  put back on its device (``.to(device)``), as the caller's tensor was. That costs
  device memory while the save runs, and the codec's own copy to the host.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ckptable._torch import _Call, _dtypes, pickler_class, reduce_tensor

__all__ = [
    "HOST_COPY_DEVICE_TYPES",
    "DeviceCopies",
    "HostArena",
    "HostTensor",
    "SnapshotPickler",
    "device_tensor",
]

#: Tensors on these device types are copied by :class:`DeviceCopies` (others, the CPU's
#: included, as ``reduce_tensor`` writes them). Tests add ``"cpu"`` to run the same path
#: without a GPU.
HOST_COPY_DEVICE_TYPES: frozenset[str] = frozenset({"cuda"})
#: Each tensor's bytes start at a multiple of this in the host block.
_ALIGNMENT = 64
#: Host blocks are allocated in multiples of this.
_GRANULE = 2 << 20
#: A block replacing a smaller one is at least this much bigger (a state that grows
#: a little at every save does not page-lock new memory every time).
_GROWTH = 1.25

_PLACEHOLDER_MODULE = __name__
_PLACEHOLDER_NAME = "device_tensor"


def device_tensor(index: int) -> Any:
    """The global that snapshot skeletons name for a device tensor's placeholder.

    Only :meth:`DeviceCopies.load` resolves it (to the copy of tensor ``index``); a
    skeleton is never loaded elsewhere, so calling this is a bug.
    """
    raise RuntimeError(
        f"ckptable snapshot placeholder {index} loaded outside ckptable's async save"
    )


class _Entry(NamedTuple):
    """One device tensor in the host block: where its bytes are, and what it was."""

    start: int
    nbytes: int
    dtype: Any
    shape: tuple[int, ...]
    device: str
    requires_grad: bool


class HostArena:
    """One block of host memory for the bytes of device tensors: a ``uint8`` tensor,
    page-locked (``pinned``) when it takes copies from a GPU."""

    def __init__(self, capacity: int, *, pinned: bool) -> None:
        torch = sys.modules["torch"]
        self.capacity = capacity
        self.pinned = pinned
        self.tensor: Any = torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned)

    @classmethod
    def allocate(cls, nbytes: int, *, pinned: bool, replacing: int = 0) -> HostArena:
        """A new block for ``nbytes``; ``replacing``: the capacity of the too-small block
        it replaces (the new one then grows by at least ``_GROWTH``)."""
        capacity = max(nbytes, int(replacing * _GROWTH) if replacing else 0, 1)
        return cls(-(-capacity // _GRANULE) * _GRANULE, pinned=pinned)

    @property
    def address(self) -> int:
        """Where the block is (tests check that saves reuse it)."""
        return int(self.tensor.data_ptr()) if self.tensor is not None else 0

    def close(self) -> None:
        """Drop the block, and give torch's cache of pinned memory back to the system
        (only its unused blocks: one still viewed by a live tensor stays until freed)."""
        self.tensor = None
        if self.pinned:
            empty_host_cache = getattr(
                getattr(sys.modules["torch"], "accelerator", None), "empty_host_cache", None
            )
            if callable(empty_host_cache):
                empty_host_cache()


class _Eligible:
    """Which tensors :class:`DeviceCopies` copies: dense, plain ``torch.Tensor`` on a
    device of ``HOST_COPY_DEVICE_TYPES`` that ``reduce_tensor`` writes as a record (its
    rules, mirrored), of a dtype whose bytes a ``uint8`` view carries both ways."""

    def __init__(self) -> None:
        torch = sys.modules["torch"]
        self.strided = torch.strided
        known = _dtypes()
        self.dtypes: set[Any] = set()
        for dtype in (*known.numpy, *known.viewed):
            try:
                torch.empty(16, dtype=torch.uint8).view(dtype).view(torch.uint8)
            except (RuntimeError, TypeError):
                continue
            self.dtypes.add(dtype)

    def __call__(self, tensor: Any) -> bool:
        return (
            tensor.device.type in HOST_COPY_DEVICE_TYPES
            and tensor.layout is self.strided
            and tensor.dtype in self.dtypes
            and not (tensor.is_quantized or tensor.is_nested or tensor.is_meta)
            and not tensor.__dict__
            and all(name is None for name in getattr(tensor, "names", ()))
        )


_ELIGIBLE: _Eligible | None = None
_PICKLERS: dict[type, type] = {}
_SETUP_LOCK = threading.Lock()


def _snapshot_pickler_class() -> type:
    """``_torch.pickler_class()`` (the codec's: CPU tensors as records around numpy
    arrays) with a dispatch table of its own per instance (see :class:`SnapshotPickler`)."""
    base: Any = pickler_class()
    with _SETUP_LOCK:
        made = _PICKLERS.get(base)
        if made is None:

            def __init__(self: Any, file: Any, *, reduce: Any, **kwargs: Any) -> None:
                torch = sys.modules["torch"]
                # (The C pickler reads ``dispatch_table`` when it is initialised.)
                self.dispatch_table = collections.ChainMap(
                    {torch.Tensor: reduce}, base.dispatch_table
                )
                base.__init__(self, file, **kwargs)

            made = type("SnapshotTensorPickler", (base,), {"__init__": __init__})
            _PICKLERS[base] = made
        return made


class SnapshotPickler:
    """Pickles a snapshot's skeleton and keeps the device tensors it met, in order.

    The pickler is the codec's (``_torch.pickler_class()``) with ``torch.Tensor`` sent
    to :meth:`reduce` first: a tensor to copy to the host becomes a placeholder, any
    other what ``reduce_tensor`` makes of it.
    """

    def __init__(self) -> None:
        global _ELIGIBLE
        with _SETUP_LOCK:
            if _ELIGIBLE is None:
                _ELIGIBLE = _Eligible()
        self._eligible = _ELIGIBLE
        #: The tensors the placeholders stand for, by index.
        self.tensors: list[Any] = []

    def dump(self, state: Any, file: Any, buffer_callback: Callable[[Any], Any]) -> None:
        """Pickle ``state`` (protocol 5, big buffers to ``buffer_callback``) to ``file``."""
        pickler = _snapshot_pickler_class()(
            file, reduce=self.reduce, protocol=5, buffer_callback=buffer_callback
        )
        pickler.dump(state)

    def reduce(self, tensor: Any) -> Any:
        """The dispatch entry for ``torch.Tensor``."""
        if not self._eligible(tensor):
            return reduce_tensor(tensor)
        self.tensors.append(tensor)
        return device_tensor, (len(self.tensors) - 1,)


class DeviceCopies:
    """The device tensors of one snapshot, copied into one :class:`HostArena`."""

    def __init__(self, arena: HostArena, entries: list[_Entry], events: list[Any]) -> None:
        self.arena: HostArena | None = arena
        self.entries = entries
        self._events = events

    @property
    def nbytes(self) -> int:
        """Bytes of the copied tensors."""
        return sum(entry.nbytes for entry in self.entries)

    @classmethod
    def start(
        cls, tensors: list[Any], take_arena: Callable[[int, bool], HostArena]
    ) -> DeviceCopies:
        """Queue the copies of ``tensors`` into a host block from ``take_arena(nbytes,
        pinned)``; :meth:`wait` waits for them. Copies from a GPU run on a side stream
        of its device that waits for the device's current stream first."""
        torch = sys.modules["torch"]
        entries: list[_Entry] = []
        offset = 0
        for tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            entries.append(
                _Entry(
                    offset,
                    nbytes,
                    tensor.dtype,
                    tuple(tensor.shape),
                    str(tensor.device),
                    bool(tensor.requires_grad),
                )
            )
            offset += -(-nbytes // _ALIGNMENT) * _ALIGNMENT
        pinned = any(tensor.device.type == "cuda" for tensor in tensors)
        arena = take_arena(offset, pinned)
        by_device: dict[Any, list[tuple[Any, _Entry]]] = {}
        for tensor, entry in zip(tensors, entries, strict=True):
            if entry.nbytes:
                by_device.setdefault(tensor.device, []).append((tensor, entry))
        events: list[Any] = []
        copies = cls(arena, entries, events)
        try:
            for device, items in by_device.items():
                if device.type == "cuda":
                    events.append(_copy_from_cuda(torch, device, items, arena.tensor))
                else:
                    for tensor, entry in items:
                        _target(arena.tensor, entry).copy_(_bytes_of(tensor))
        except BaseException:
            copies.abandon()
            raise
        return copies

    def wait(self) -> None:
        """Return once every copy is complete (the caller's tensors are free again)."""
        events, self._events = self._events, []
        for event in events:
            event.synchronize()

    def abandon(self) -> None:
        """Wait for the copies queued, then free the block (a snapshot that failed)."""
        try:
            self.wait()
        finally:
            arena, self.arena = self.arena, None
            if arena is not None:
                arena.close()

    def host_bytes(self, index: int) -> Any:
        """The bytes of tensor ``index``'s copy: a ``uint8`` view of the host block."""
        if self.arena is None:
            raise RuntimeError("the snapshot's host copies were released")
        entry = self.entries[index]
        return self.arena.tensor[entry.start : entry.start + entry.nbytes]

    def host_tensor(self, index: int) -> Any:
        """The copy of tensor ``index``: a CPU tensor viewing the host block, with the
        original's dtype, shape and ``requires_grad``."""
        entry = self.entries[index]
        tensor = self.host_bytes(index).view(entry.dtype).view(entry.shape)
        if entry.requires_grad:
            tensor.requires_grad_(True)
        return tensor

    def load(self, skeleton: bytes, buffers: Iterable[Any] | None, *, records: bool) -> Any:
        """Unpickle ``skeleton``, each placeholder replaced (see the module docstring):
        by a :class:`HostTensor` if ``records``, else by the copy back on its device."""
        return _SkeletonUnpickler(io.BytesIO(skeleton), self, buffers, records=records).load()

    def take_arena(self) -> HostArena | None:
        """Hand the host block over (to the pool, or to be closed); None if gone."""
        arena, self.arena = self.arena, None
        return arena


def _bytes_of(tensor: Any) -> Any:
    """``tensor``'s values as contiguous bytes (a ``uint8`` view, copied only where it
    is not contiguous, conjugated or negated), as ``reduce_tensor`` takes them."""
    torch = sys.modules["torch"]
    data = tensor.detach().resolve_conj().resolve_neg().contiguous()
    return data.reshape(-1).view(torch.uint8)


def _target(block: Any, entry: _Entry) -> Any:
    return block[entry.start : entry.start + entry.nbytes]


def _copy_from_cuda(torch: Any, device: Any, items: list[tuple[Any, _Entry]], block: Any) -> Any:
    """Queue the copies from one GPU on a side stream that waits for the current one;
    return the event recorded after them."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            try:
                for tensor, entry in items:
                    _target(block, entry).copy_(_bytes_of(tensor), non_blocking=True)
            except BaseException:
                side.synchronize()  # (no copy may still be writing when the block is freed)
                raise
            event = torch.cuda.Event()
            event.record(side)
    return event


class HostTensor:
    """A device tensor's copy in host memory that pickles as the original would:
    ``reduce_tensor``'s record of the copy, with the original's device string in it
    (``"cuda:0"``). Only the background save of an async save sees these."""

    __slots__ = ("_copies", "_index")

    def __init__(self, copies: DeviceCopies, index: int) -> None:
        self._copies = copies
        self._index = index

    @property
    def device(self) -> str:
        """The device the original tensor was on."""
        return self._copies.entries[self._index].device

    def __reduce__(self) -> Any:
        fn, args = reduce_tensor(self._copies.host_tensor(self._index))
        record, found = _with_device(fn, args, self.device)
        if not found:  # (the eligibility rules above mirror reduce_tensor's)
            raise pickle.PicklingError(
                f"ckptable could not write the host copy of a {self.device} tensor as a "
                "tensor record (a bug: please report it)"
            )
        return record


def _with_device(fn: Any, args: tuple[Any, ...], device: str) -> tuple[Any, bool]:
    """``(fn, args)`` with the device of its ``_rebuild_device_tensor_from_numpy`` call
    (itself, or nested in ``_Call`` arguments) set to ``device``; and whether there was one."""
    rebuild = _dtypes().rebuild
    if fn is rebuild:
        return (fn, (args[0], args[1], device, *args[3:])), True
    found = False
    new_args: list[Any] = []
    for arg in args:
        if isinstance(arg, _Call):
            (inner_fn, inner_args), inner_found = _with_device(arg.fn, arg.args, device)
            found = found or inner_found
            arg = _Call(inner_fn, inner_args)
        new_args.append(arg)
    return (fn, tuple(new_args)), found


class _Deferred:
    """A call left for the save's pickler to write (``_rebuild_parameter`` around a
    :class:`HostTensor`): pickles as ``fn(*args)``, naming only ``fn``."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


class _SkeletonUnpickler(pickle.Unpickler):
    """Loads a skeleton: placeholders become the copies; with ``records``, the rebuild
    of a ``Parameter`` around one stays a :class:`_Deferred` call."""

    def __init__(
        self,
        file: io.BytesIO,
        copies: DeviceCopies,
        buffers: Iterable[Any] | None,
        *,
        records: bool,
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._copies = copies
        self._records = records
        self._placed: dict[int, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == _PLACEHOLDER_MODULE and name == _PLACEHOLDER_NAME:
            return self._placeholder
        if self._records and module == "torch._utils" and name.startswith("_rebuild_parameter"):
            return _deferring(super().find_class(module, name))
        return super().find_class(module, name)

    def _placeholder(self, index: int) -> Any:
        if type(index) is not int or not 0 <= index < len(self._copies.entries):
            raise pickle.UnpicklingError(f"bad snapshot placeholder {index!r}")
        if self._records:
            return HostTensor(self._copies, index)
        placed = self._placed.get(index)
        if placed is None:
            entry = self._copies.entries[index]
            # Moved as bytes, viewed on the device: torch has no copy kernel for some
            # dtypes (bits16...), and a byte copy is what the host copy was.
            raw = self._copies.host_bytes(index).to(entry.device)
            placed = raw.view(entry.dtype).view(entry.shape)
            placed.requires_grad_(entry.requires_grad)
            self._placed[index] = placed
        return placed


def _deferring(rebuild: Callable[..., Any]) -> Callable[..., Any]:
    """``rebuild`` (``_rebuild_parameter``...), deferred when its tensor is a host copy."""

    def call(data: Any, *args: Any) -> Any:
        if isinstance(data, HostTensor):
            return _Deferred(rebuild, (data, *args))
        return rebuild(data, *args)

    return call
