"""Snapshots of a tree's state for async saves: copied now, written later.

An async save must not see what the caller does after it returns (PyTorch DCP's async
save once wrote tensors the training loop had already changed). So before
``save_async`` returns:

1. **collect**: the tree's state is gathered exactly as a synchronous save gathers it
   (``collect_tree_state``): one ``get_state()`` per level, components missing from
   their parent's state asked for their own.
2. **copy**: the state is pickled (protocol 5) with its arrays' memory *out of band*,
   so the pickle itself (the "skeleton") holds everything but the big buffers and costs
   little; each buffer is then copied into a ``SnapshotArena``. Big copies run on a
   few threads (numpy's copy releases the GIL).

The background thread unpickles the skeleton over the arena's copies (no second copy:
the arrays are views of the arena) and saves that state.

**Torch tensors** (only once ``torch`` is imported: this module never imports it). The
skeleton is pickled with the cloudpickle codec's tensor reducer (``ckptable._torch``), so
a CPU tensor is a numpy array out of band, copied into the arena like any array. A CUDA
tensor is copied into a reused block of pinned host memory on a side stream instead,
while the CPU copies run, and written from there by the background save with its device
recorded: see ``ckptable._snapshot_torch``.

**Why arenas are reused.** Copying into fresh memory costs the page faults of every
page (on this project's VMs, 1 GiB: 0.15-0.4 s, sometimes seconds); copying into memory
already touched runs at memory speed (about 50 ms on two threads). A pool keeps the
arena of a finished save for the next one, so periodic saves pay the faults once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import mmap
import os
import pickle
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckptable._components import is_actor_manager, uses_ckptable_method
from ckptable._formats import get_codec, locate_unencodable
from ckptable._save import collect_level_state
from ckptable._torch import pickler_class
from ckptable.errors import StateEncodingError

if TYPE_CHECKING:
    from ckptable._snapshot_torch import DeviceCopies, HostArena

__all__ = [
    "SnapshotArena",
    "SnapshotPool",
    "StateSnapshot",
    "collect_tree_state",
    "saved_by_ckptable",
    "take_snapshot",
]

logger = logging.getLogger("ckptable")

#: Buffers start on this boundary in the arena (cache lines; numpy's SIMD loads).
_ALIGNMENT = 64
#: Buffers at least this big are copied in chunks of this size on the copy threads.
_PARALLEL_CHUNK_BYTES = 32 << 20


def collect_tree_state(obj: Any, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The state a synchronous ``obj.save_to_path(state=state)`` would write, gathered now.

    Mirrors the save pipeline's rules (``_save._write_level``), so that passing the
    result as ``state=`` later saves the same tree: a level without a given state calls
    its own ``get_state()``; an empty given state asks for the level's own state without
    its components (RLlib's rule); a given state without a component's key skips that
    component; a component missing from a state its parent produced itself is asked
    for its own. Components held by Ray actors keep their entry, if any: their state
    lives in the actors, which save it when the background save reaches them.
    """
    components = list(obj.get_checkpointable_components())
    provided = state is not None
    level = collect_level_state(obj, state, components, where=f"async save of {type(obj).__name__}")
    for name, component in components:
        if provided and name not in level:
            continue  # skipped by the save as well
        if is_actor_manager(component):
            continue
        level[name] = collect_tree_state(component, level.get(name))
    return level


def saved_by_ckptable(obj: Any) -> bool:
    """Whether every level of ``obj``'s tree (but those Ray actors save) is saved by
    ckptable's own ``save_to_path``, which hands each level's state to the codec
    untouched; an overriding ``save_to_path`` (RLlib's way) may look at its state."""
    if not uses_ckptable_method(obj, "save_to_path"):
        return False
    return all(
        is_actor_manager(component) or saved_by_ckptable(component)
        for _, component in obj.get_checkpointable_components()
    )


class SnapshotArena:
    """One block of anonymous memory holding the copied buffers of a snapshot.

    Anonymous ``mmap`` rather than ``bytearray``: no zero-fill of the whole block up front
    (pages are faulted in by the copy, on the copy threads) and no numpy needed.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, mmap.PAGESIZE)
        self.memory = mmap.mmap(-1, self.capacity)

    def close(self) -> None:
        """Unmap now if nothing still views the memory (else the GC unmaps it later)."""
        with contextlib.suppress(BufferError):
            self.memory.close()


class SnapshotPool:
    """Arenas of finished snapshots, kept for the next ones (see the module docstring).

    ``max_idle``: how many idle arenas to keep (of each kind: the arenas of arrays and
    CPU tensors, and the host blocks of GPU tensors, ``_snapshot_torch.HostArena``);
    0 frees every arena when its save ends.
    """

    def __init__(self, max_idle: int = 1) -> None:
        self.max_idle = max_idle
        self._idle: list[SnapshotArena] = []
        self._idle_host: list[HostArena] = []
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> SnapshotArena:
        """An idle arena big enough for ``nbytes`` (and not more than twice that), or a
        new one."""
        with self._lock:
            for arena in self._idle:
                if nbytes <= arena.capacity <= 2 * max(nbytes, mmap.PAGESIZE):
                    self._idle.remove(arena)
                    return arena
        return SnapshotArena(nbytes)

    def release(self, arena: SnapshotArena) -> None:
        """Keep ``arena`` for a later snapshot, dropping the oldest idle one if full."""
        with self._lock:
            self._idle.append(arena)
            while len(self._idle) > self.max_idle:
                self._idle.pop(0).close()

    def acquire_host(self, nbytes: int, pinned: bool) -> HostArena:
        """An idle host block of at least ``nbytes`` (page-locked if ``pinned``), or a
        new one. Unlike ``acquire``, any bigger block will do (page-locking memory costs
        far more than holding it); idle blocks too small are freed first, and the new
        block then grows by a margin (``HostArena.allocate``)."""
        from ckptable._snapshot_torch import HostArena

        with self._lock:
            fitting = [
                arena
                for arena in self._idle_host
                if arena.capacity >= nbytes and (arena.pinned or not pinned)
            ]
            if fitting:
                chosen = min(fitting, key=lambda arena: arena.capacity)
                self._idle_host.remove(chosen)
                return chosen
            replaced = [arena for arena in self._idle_host if arena.pinned == pinned]
            for arena in replaced:
                self._idle_host.remove(arena)
        for arena in replaced:
            arena.close()
        grown = max((arena.capacity for arena in replaced), default=0)
        return HostArena.allocate(nbytes, pinned=pinned, replacing=grown)

    def release_host(self, arena: HostArena) -> None:
        """Keep the host block ``arena`` for a later snapshot (as ``release``)."""
        with self._lock:
            self._idle_host.append(arena)
            while len(self._idle_host) > self.max_idle:
                self._idle_host.pop(0).close()

    def clear(self) -> None:
        """Free every idle arena and host block."""
        with self._lock:
            idle, self._idle = self._idle, []
            idle_host, self._idle_host = self._idle_host, []
        for arena in idle:
            arena.close()
        for host in idle_host:
            host.close()

    def close(self) -> None:
        """Free every idle arena and host block (``clear``); the pool stays usable."""
        self.clear()

    @property
    def idle_bytes(self) -> int:
        """Memory held by idle arenas and host blocks."""
        with self._lock:
            return sum(a.capacity for a in self._idle) + sum(h.capacity for h in self._idle_host)

    @property
    def idle_host_arenas(self) -> list[HostArena]:
        """The idle host blocks, oldest first (a copy of the list)."""
        with self._lock:
            return list(self._idle_host)


class StateSnapshot:
    """A state pickled with its big buffers copied into an arena (and its GPU tensors
    into a host block, ``device``); see ``take_snapshot``."""

    def __init__(
        self,
        skeleton: bytes,
        spans: list[tuple[int, int]],
        arena: SnapshotArena | None,
        pool: SnapshotPool,
        device: DeviceCopies | None = None,
    ) -> None:
        self._skeleton = skeleton
        self._spans = spans
        self._arena = arena
        self._pool = pool
        self._device = device

    @property
    def nbytes(self) -> int:
        """Bytes the snapshot holds: the skeleton and the copied buffers and tensors."""
        device = 0 if self._device is None else self._device.nbytes
        return len(self._skeleton) + sum(length for _, length in self._spans) + device

    @property
    def has_device_tensors(self) -> bool:
        """Whether the snapshot holds copies of GPU tensors (see ``materialize``)."""
        return self._device is not None

    def materialize(self, *, device_records: bool = False) -> Any:
        """The state again: unpickled over the arena's memory (arrays are views of it).

        GPU tensors come back as views of their host copies that pickle as the records
        of tensors on their devices if ``device_records`` (for a save whose every level
        the cloudpickle codec writes), else as tensors on their devices again; a state
        that cannot be rebuilt with the former (a tensor subclass's rebuild function
        may need a real tensor) falls back to the latter. See ``_snapshot_torch``.
        """
        buffers: list[memoryview] | None = None
        if self._arena is not None:
            view = memoryview(self._arena.memory)
            buffers = [view[start : start + length] for start, length in self._spans]
        if self._device is None:
            return pickle.loads(self._skeleton, buffers=buffers)
        if device_records:
            try:
                return self._device.load(self._skeleton, buffers, records=True)
            except Exception:
                logger.debug("async save: device tensors rebuilt on their devices", exc_info=True)
        return self._device.load(self._skeleton, buffers, records=False)

    def release(self, *, reuse: bool) -> None:
        """Give the arena (and host block) back to the pool (``reuse``) or free them.

        Call only once nothing uses the materialized state any more: its arrays view
        the arena, which the next snapshot overwrites. A failed save frees its arena
        instead, because the exception's traceback may still reach the arrays.
        """
        arena, self._arena = self._arena, None
        host = None if self._device is None else self._device.take_arena()
        keep = reuse and self._pool.max_idle > 0
        if arena is not None:
            if keep:
                self._pool.release(arena)
            else:
                arena.close()
        if host is not None:
            if keep:
                self._pool.release_host(host)
            else:
                host.close()


def take_snapshot(state: Any, pool: SnapshotPool) -> StateSnapshot:
    """Copy ``state`` so that nothing done to the original later reaches the copy.

    Returns once every copy is complete: arrays and CPU tensors into an arena, GPU
    tensors (queued first, so that both run at once) into a pinned host block.

    Raises:
        StateEncodingError: a value of the state cannot be pickled (named by its key
            path, as a synchronous save names it).
    """
    raw_buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    tensors = None
    try:
        if "torch" in sys.modules:
            from ckptable._snapshot_torch import SnapshotPickler

            tensors = SnapshotPickler()
            tensors.dump(state, stream, raw_buffers.append)
        else:
            pickler_class()(stream, protocol=5, buffer_callback=raw_buffers.append).dump(state)
    except Exception as exc:
        where = locate_unencodable(get_codec("cloudpickle"), state)
        raise StateEncodingError(
            f"Cannot snapshot the state for an async save: {where} cannot be pickled "
            f"({exc}). An async save copies the state with cloudpickle before it returns.",
        ) from exc
    skeleton = stream.getvalue()
    del stream
    device: DeviceCopies | None = None
    arena: SnapshotArena | None = None
    spans: list[tuple[int, int]] = []
    try:
        if tensors is not None and tensors.tensors:
            from ckptable._snapshot_torch import DeviceCopies

            device = DeviceCopies.start(tensors.tensors, pool.acquire_host)
        if raw_buffers:
            views = [buffer.raw() for buffer in raw_buffers]
            offset = 0
            for view in views:
                spans.append((offset, view.nbytes))
                offset += -(-view.nbytes // _ALIGNMENT) * _ALIGNMENT
            arena = pool.acquire(offset)
            _copy_into(arena, views, spans)
        if device is not None:
            device.wait()
    except BaseException:
        if device is not None:
            device.abandon()
        if arena is not None:
            arena.close()
        raise
    finally:
        for buffer in raw_buffers:
            buffer.release()
    return StateSnapshot(skeleton, spans, arena, pool, device)


def _copy_into(arena: SnapshotArena, views: list[memoryview], spans: list[tuple[int, int]]) -> None:
    """Copy each buffer to its span: small ones here, big ones in chunks on threads."""
    target = memoryview(arena.memory)
    chunks: list[tuple[memoryview, memoryview]] = []
    for view, (start, length) in zip(views, spans, strict=True):
        if length < _PARALLEL_CHUNK_BYTES:
            target[start : start + length] = view
            continue
        for begin in range(0, length, _PARALLEL_CHUNK_BYTES):
            end = min(begin + _PARALLEL_CHUNK_BYTES, length)
            chunks.append((target[start + begin : start + end], view[begin:end]))
    if not chunks:
        return
    numpy = sys.modules.get("numpy")
    if numpy is None:  # no arrays made these buffers: copy here, with the GIL
        for destination, source in chunks:
            destination[:] = source
        return

    def copy(pair: tuple[memoryview, memoryview]) -> None:
        destination, source = pair
        numpy.copyto(
            numpy.frombuffer(destination, dtype=numpy.uint8),
            numpy.frombuffer(source, dtype=numpy.uint8),
        )

    list(_copy_executor().map(copy, chunks))


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _copy_executor() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for big copies: one per core, at most four (memory bandwidth is shared)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="ckptable-copy"
            )
        return _executor
