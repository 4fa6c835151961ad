"""Async saves: snapshot in the caller, write in a background thread.

``save_async`` returns once the tree's state is copied (``ckptable._snapshot``);
a thread then runs the ordinary ``save_to_path`` with that copy as ``state=``, so an
async save writes exactly what a synchronous save at the moment of the call would have
written, with the same staging, checksums, flushes and atomic publish.

Torch tensors (``ckptable._snapshot_torch``): CPU tensors are copied like arrays; GPU
tensors into a reused block of pinned host memory, on a side stream, and the call returns
once those copies are complete (not serialised: that is the thread's work). The thread
then writes them from the host block, recording their devices, so that restores put them
back on their GPUs.

The thread is not a daemon: a Python process that exits normally first finishes the
saves in flight (a killed one leaves the previous checkpoint, as any interrupted save).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

from ckptable._formats import get_codec
from ckptable._snapshot import SnapshotPool, collect_tree_state, saved_by_ckptable, take_snapshot

__all__ = ["release_snapshot_memory", "save_async", "start_background_save"]

logger = logging.getLogger("ckptable")

#: Arenas of ``ckptable.save_async`` calls (a manager has its own pool).
_default_pool = SnapshotPool(max_idle=1)


def save_async(obj: Any, path: Any = None, **save_kwargs: Any) -> concurrent.futures.Future[str]:
    """Save ``obj`` in a background thread; return once its state is copied.

    The tree's state is gathered (``get_state()``, as a synchronous save does) and copied
    before this returns, so changes made to ``obj`` afterwards never reach the checkpoint.
    The copy takes memory: the size of the state's arrays and tensors (those on a GPU in
    pinned host memory), kept after the save for the next async save
    (``ckptable.release_snapshot_memory()`` frees it).

    Args:
        obj: The ``Checkpointable`` to save.
        path: Where to save it (a local path or URI; a temporary directory if None).
        **save_kwargs: Any keyword argument of ``obj.save_to_path`` (``filesystem``,
            ``format``, ``durable``, ``state``, ...), checked now.

    Returns:
        A ``concurrent.futures.Future`` whose ``result()`` is the checkpoint's path, or
        raises what the save raised.

    Raises:
        TypeError: ``save_kwargs`` has a keyword that ``obj.save_to_path`` does not take.
        StateEncodingError: the state cannot be copied (cannot be pickled).

    Components held by Ray actors are saved by their actors when the background save
    reaches them: their state lives in other processes, beyond this process's changes.
    """
    return start_background_save(obj, path, save_kwargs, pool=_default_pool)


def release_snapshot_memory() -> None:
    """Free the memory ``ckptable.save_async`` keeps for its next snapshot (the pinned
    host memory of GPU tensors included)."""
    _default_pool.close()


def start_background_save(
    obj: Any,
    path: Any,
    save_kwargs: dict[str, Any],
    *,
    pool: SnapshotPool,
    save: Callable[[Any, Any, dict[str, Any]], str] | None = None,
    name: str = "ckptable-save-async",
) -> concurrent.futures.Future[str]:
    """Snapshot ``obj`` now; run ``save(obj, path, kwargs_with_state)`` on a new thread.

    ``save`` defaults to ``obj.save_to_path``; a ``CheckpointManager`` passes its own
    (which also records the step and applies retention).
    """
    kwargs = dict(save_kwargs)
    given_state = kwargs.pop("state", None)
    try:
        inspect.signature(obj.save_to_path).bind(path, state=None, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"{type(obj).__name__}.save_to_path() does not accept these arguments: {exc}"
        ) from None
    snapshot = take_snapshot(collect_tree_state(obj, given_state), pool)
    device_records = snapshot.has_device_tensors and _writes_records(obj, kwargs)
    future: concurrent.futures.Future[str] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    run_save = save or _save_to_path

    def run() -> None:
        # The arena goes back to the pool before the future completes, so that a save
        # started as soon as this one is seen done finds it there.
        try:
            state = snapshot.materialize(device_records=device_records)
            result = run_save(obj, path, {**kwargs, "state": state})
        except BaseException as exc:
            snapshot.release(reuse=False)
            future.set_exception(exc)
            return
        del state
        snapshot.release(reuse=True)
        future.set_result(result)

    threading.Thread(target=run, name=name, daemon=False).start()
    return future


def _writes_records(obj: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the save hands every level's state to the cloudpickle codec untouched:
    GPU tensors may then stay host copies that pickle as tensors on their devices
    (``StateSnapshot.materialize``); other codecs need real tensors."""
    name = kwargs.get("format") or ("msgpack" if kwargs.get("use_msgpack") else "cloudpickle")
    try:
        return get_codec(name).name == "cloudpickle" and saved_by_ckptable(obj)
    except Exception:
        return False  # (real tensors always do; the save raises what is wrong, if anything)


def _save_to_path(obj: Any, path: Any, kwargs: dict[str, Any]) -> str:
    return str(obj.save_to_path(path, **kwargs))
