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

**Why arenas are reused.** Copying into fresh memory costs the page faults of every
page (on this project's VMs, 1 GiB: 0.15-0.4 s, sometimes seconds); copying into memory
already touched runs at memory speed (about 50 ms on two threads). A pool keeps the
arena of a finished save for the next one, so periodic saves pay the faults once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import mmap
import os
import pickle
import sys
import threading
from collections.abc import Mapping
from typing import Any

import cloudpickle

from ckptable._components import is_actor_manager
from ckptable._formats import get_codec, locate_unencodable
from ckptable._save import collect_level_state
from ckptable.errors import StateEncodingError

__all__ = [
    "SnapshotArena",
    "SnapshotPool",
    "StateSnapshot",
    "collect_tree_state",
    "take_snapshot",
]

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

    ``max_idle``: how many idle arenas to keep; 0 frees every arena when its save ends.
    """

    def __init__(self, max_idle: int = 1) -> None:
        self.max_idle = max_idle
        self._idle: list[SnapshotArena] = []
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

    def clear(self) -> None:
        """Free every idle arena."""
        with self._lock:
            idle, self._idle = self._idle, []
        for arena in idle:
            arena.close()

    @property
    def idle_bytes(self) -> int:
        """Memory held by idle arenas."""
        with self._lock:
            return sum(arena.capacity for arena in self._idle)


class StateSnapshot:
    """A state pickled with its big buffers copied into an arena; see ``take_snapshot``."""

    def __init__(
        self,
        skeleton: bytes,
        spans: list[tuple[int, int]],
        arena: SnapshotArena | None,
        pool: SnapshotPool,
    ) -> None:
        self._skeleton = skeleton
        self._spans = spans
        self._arena = arena
        self._pool = pool

    @property
    def nbytes(self) -> int:
        """Bytes the snapshot holds: the skeleton and the copied buffers."""
        return len(self._skeleton) + sum(length for _, length in self._spans)

    def materialize(self) -> Any:
        """The state again: unpickled over the arena's memory (arrays are views of it)."""
        if self._arena is None:
            return pickle.loads(self._skeleton)
        view = memoryview(self._arena.memory)
        buffers = [view[start : start + length] for start, length in self._spans]
        return pickle.loads(self._skeleton, buffers=buffers)

    def release(self, *, reuse: bool) -> None:
        """Give the arena back to the pool (``reuse``) or free it.

        Call only once nothing uses the materialized state any more: its arrays view
        the arena, which the next snapshot overwrites. A failed save frees its arena
        instead, because the exception's traceback may still reach the arrays.
        """
        arena, self._arena = self._arena, None
        if arena is None:
            return
        if reuse and self._pool.max_idle > 0:
            self._pool.release(arena)
        else:
            arena.close()


def take_snapshot(state: Any, pool: SnapshotPool) -> StateSnapshot:
    """Copy ``state`` so that nothing done to the original later reaches the copy.

    Raises:
        StateEncodingError: a value of the state cannot be pickled (named by its key
            path, as a synchronous save names it).
    """
    raw_buffers: list[pickle.PickleBuffer] = []
    try:
        skeleton = cloudpickle.dumps(state, protocol=5, buffer_callback=raw_buffers.append)
    except Exception as exc:
        where = locate_unencodable(get_codec("cloudpickle"), state)
        raise StateEncodingError(
            f"Cannot snapshot the state for an async save: {where} cannot be pickled "
            f"({exc}). An async save copies the state with cloudpickle before it returns.",
        ) from exc
    if not raw_buffers:
        return StateSnapshot(skeleton, [], None, pool)
    views = [buffer.raw() for buffer in raw_buffers]
    spans: list[tuple[int, int]] = []
    offset = 0
    for view in views:
        spans.append((offset, view.nbytes))
        offset += -(-view.nbytes // _ALIGNMENT) * _ALIGNMENT
    arena = pool.acquire(offset)
    try:
        _copy_into(arena, views, spans)
    except BaseException:
        arena.close()
        raise
    finally:
        for buffer in raw_buffers:
            buffer.release()
    return StateSnapshot(skeleton, spans, arena, pool)


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
