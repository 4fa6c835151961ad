"""On the destination: the reader task's items, fetched from its streaming generator
through Ray's object store, in order, a few ahead of the writer."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray

from ckptable.errors import TransferError
from ckptable.ray._transfer_job import _reason

__all__ = ["END_GRACE_S", "Deadline", "Fetcher"]


#: How often waits with a deadline look at the clock.
_WAIT_STEP_S = 0.2

#: How long :meth:`Fetcher.close` lets a reader that is not needed any more end by
#: itself before it is cancelled (by default; ``RayObjectStoreTransfer`` passes its
#: ``reader_end_grace_s``).
END_GRACE_S = 1.0

#: How long :meth:`Fetcher.close` then waits for the cancelled reader's stream to end.
_CANCELLED_WAIT_S = 5.0


class Fetcher:
    """The reader's items, in order, each fetched to this node (``ray.get``).

    A helper thread takes the reader's object refs as it yields them, and up to
    ``depth`` items are fetched ahead on helper threads, so that pulling the next chunk
    from the source node overlaps writing this one (one after the other, the pulls took
    about 60% of a transfer's time and the writes 30%). Only the items in that window and
    the one being written are referenced here; dropping a reference frees the item's
    object-store copies on both nodes. Waiting for the reader's next ref on a thread of
    its own also leaves the writer free to take the contents from a direct connection
    meanwhile (``_transfer_direct``), and to ask :meth:`reader_failure` whether the
    reader failed.

    :meth:`close` ends it. If the writer stops early, the reader is not left paused:
    its remaining refs are taken and dropped, unfetched, so that a reader which failed
    or is about to end ends by itself; one still running after ``end_grace_s`` is
    cancelled (a KeyboardInterrupt in its task's main thread, raised when the call it
    is in returns, which ends it also while backpressure holds it; its worker process
    lives on). Not cancelled at once: Ray 2.60 crashes the worker that owns a task when
    the task's cancellation crosses its completion (``task_manager.cc``: "Tried to
    complete task that was not pending"), and that worker is the writer's. The grace
    makes that unlikely, not impossible: a reader that ends just as it runs out is
    still cancelled. :meth:`close` returns when the helper thread has ended, or at the
    latest ``_CANCELLED_WAIT_S`` after the cancel (at once past the ``deadline``); the
    thread, a daemon, keeps dropping refs until the reader's stream ends. With a
    ``deadline``
    (``time.monotonic()``), waiting past it raises TransferError; :meth:`reader_failure`
    returns that error then.
    """

    def __init__(
        self,
        reader: Any,
        depth: int,
        deadline: Deadline | None = None,
        end_grace_s: float = END_GRACE_S,
    ) -> None:
        self._reader = reader
        self._end_grace_s = end_grace_s
        self._depth = depth
        self._deadline = deadline
        self._pool = concurrent.futures.ThreadPoolExecutor(
            depth, thread_name_prefix="ckptable-fetch"
        )
        self._window: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self._changed = threading.Condition()
        self._exhausted = False  # the reader yields no more refs
        self._failure: BaseException | None = None  # raised by the generator itself
        self._closed = False
        self._finished = False  # every item was taken
        self._thread = threading.Thread(
            target=self._take_refs, name="ckptable-fetch-refs", daemon=True
        )
        self._thread.start()

    def _take_refs(self) -> None:
        refs = iter(self._reader)
        try:
            while True:
                with self._changed:
                    while len(self._window) >= self._depth and not self._closed:
                        self._changed.wait()
                try:
                    ref = next(refs)
                except StopIteration:
                    return
                with self._changed:
                    if not self._closed:  # once closed, the refs are dropped unfetched
                        self._window.append(self._pool.submit(ray.get, ref))
                        self._changed.notify_all()
                del ref
        except BaseException as exc:  # the generator broke: the reader failed
            with self._changed:
                self._failure = exc
        finally:
            with self._changed:
                self._exhausted = True
                self._changed.notify_all()

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._changed:
                while not self._window and not self._exhausted:
                    if self._deadline is not None:
                        self._deadline.check()
                    self._changed.wait(_WAIT_STEP_S if self._deadline is not None else None)
                if not self._window:
                    if self._failure is not None:
                        raise _source_error(self._failure)
                    break
                future = self._window.popleft()
                self._changed.notify_all()
            try:
                item = self._result(future)
            except ray.exceptions.RayError as exc:
                raise _source_error(exc) from exc
            del future
            yield item
            del item
        self._finished = True

    def _result(self, future: concurrent.futures.Future[Any]) -> Any:
        if self._deadline is None:
            return future.result()
        while True:
            self._deadline.check()
            try:
                return future.result(timeout=_WAIT_STEP_S)
            except concurrent.futures.TimeoutError:
                continue

    def reader_failure(self, timeout_s: float) -> TransferError | None:
        """The reader's failure if Ray reports one within ``timeout_s`` (its next item is
        an error, or its stream broke), else None; or the deadline's error once it is
        past. Takes no item."""
        if self._deadline is not None:
            if self._deadline.passed():
                return self._deadline.error()
            timeout_s = min(timeout_s, self._deadline.left())
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._window and not self._exhausted:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            if not self._window:
                return None if self._failure is None else _source_error(self._failure)
            future = self._window[0]
        try:
            error = future.exception(timeout=max(0.0, deadline - time.monotonic()))
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            return None
        return _source_error(error) if isinstance(error, ray.exceptions.RayError) else None

    def close(self) -> None:
        with self._changed:
            self._closed = True
            for future in self._window:
                future.cancel()
            self._window.clear()
            self._changed.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._finished:
            return
        self._thread.join(self._end_grace_s)  # a reader that failed, or is ending, ends
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                ray.cancel(self._reader, force=False)
            if self._deadline is None or not self._deadline.passed():
                self._thread.join(_CANCELLED_WAIT_S)


class Deadline:
    """The time by which a transfer must finish (``timeout_s`` from now)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._at = time.monotonic() + timeout_s

    def left(self) -> float:
        return max(0.0, self._at - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self._at

    def error(self) -> TransferError:
        return TransferError(f"it did not finish within {self.timeout_s} s")

    def check(self) -> None:
        """Raise :meth:`error` if the deadline has passed."""
        if self.passed():
            raise self.error()

    def items(self, items: Iterator[Any]) -> Iterator[Any]:
        """``items``, checking the deadline before each."""
        for item in items:
            self.check()
            yield item


def _source_error(exc: BaseException) -> TransferError:
    error = TransferError(f"on the source node: {_reason(exc)}")
    error.__cause__ = exc
    return error
