"""Thread pools lent to one save or restore at a time, and kept between them.

The concurrent writes of a save (:mod:`ckptable._storage_concurrent`) and the prefetch
of a restore (:mod:`ckptable._storage_prefetch`) each run their requests in a pool of
their own: their tasks wait for one another (a copy waits for its range), so a pool is
never shared by two operations at once. Starting its threads cost a restore from an
object store 30-40 ms on this project's 2-core machine (``Thread.start`` waits until the
new thread runs, behind the busy ones): a 64 MiB restore without added latency spent
about a sixth of its time there. So a pool an operation is done with is kept, idle, for
the next one (a few per size, no more); a process forked from this one starts without
them (their threads do not exist there).

:func:`borrow_pool` lends one; :meth:`BorrowedPool.shutdown` waits for every task that
was submitted through it, as ``ThreadPoolExecutor.shutdown(wait=True)`` does, and gives
the pool back.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["BorrowedPool", "borrow_pool"]

T = TypeVar("T")

#: Idle pools kept per (workers, thread name prefix).
MAX_IDLE_POOLS = 2

_lock = threading.Lock()
_idle: dict[tuple[int, str], list[concurrent.futures.ThreadPoolExecutor]] = {}


def _forget_idle_pools() -> None:
    global _lock
    _idle.clear()
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_idle_pools)


def borrow_pool(workers: int, name: str) -> BorrowedPool:
    """A pool of ``workers`` threads named ``name-N`` for one operation (an idle one if
    there is one); give it back with :meth:`BorrowedPool.shutdown`."""
    key = (workers, name)
    with _lock:
        idle = _idle.get(key)
        executor = idle.pop() if idle else None
    if executor is None:
        executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name)
    return BorrowedPool(executor, key)


class BorrowedPool:
    """The ``submit``/``shutdown`` of a ``ThreadPoolExecutor`` lent by :func:`borrow_pool`."""

    def __init__(self, executor: concurrent.futures.ThreadPoolExecutor, key: tuple[int, str]):
        self._executor: concurrent.futures.ThreadPoolExecutor | None = executor
        self._key = key
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._executor is None:
                raise RuntimeError("cannot submit to a pool that was given back")
            future = self._executor.submit(fn, *args, **kwargs)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def shutdown(self, wait: bool = True) -> None:
        """Give the pool back once every task submitted through it has ended (``wait``
        False: at once, the pool shut down rather than kept)."""
        with self._lock:
            executor, self._executor = self._executor, None
            pending = list(self._pending)
        if executor is None:
            return
        if not wait:
            executor.shutdown(wait=False)
            return
        concurrent.futures.wait(pending)
        with _lock:
            idle = _idle.setdefault(self._key, [])
            if len(idle) < MAX_IDLE_POOLS:
                idle.append(executor)
                return
        executor.shutdown(wait=True)
