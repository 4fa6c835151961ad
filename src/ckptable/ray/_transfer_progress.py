"""Progress of a transfer: the writer reports the bytes that arrive, the driver shows
them in the bar of the save or restore that runs it (or in one of its own)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import ray

from ckptable._progress import Bar
from ckptable.ray._transfer_read import _listed_bytes

#: How often the writer reports its progress, and the driver looks, at most (seconds).
_PROGRESS_INTERVAL_S = 0.2
#: Namespace of the progress reports in Ray's internal key-value store.
_PROGRESS_NAMESPACE = "ckptable-progress"


def _checked_progress(progress: Any) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, not {progress!r}")
    return progress


def _counting(
    items: Iterator[Any], on_total: Callable[[int], None], on_chunk: Callable[[int], None]
) -> Iterator[Any]:
    """Pass a transfer stream on unchanged, telling ``on_total`` the bytes its listing
    announces and ``on_chunk`` the size of each chunk as the writer takes it. Never
    raises for a malformed item: the writer refuses those."""
    for item in items:
        if isinstance(item, (tuple, list)):
            if len(item) == 4 and item[0] == "listing":
                on_total(_listed_bytes(item[3]))
        elif size := _chunk_bytes(item):
            on_chunk(size)
        yield item


def _chunk_bytes(item: Any) -> int:
    try:
        return memoryview(item).nbytes
    except TypeError:
        return 0


class _ProgressReporter:
    """In the writer task: counts the bytes that arrive and reports ``"<bytes> <total>"``
    under ``key`` in Ray's internal key-value store, at most every
    ``_PROGRESS_INTERVAL_S`` (a report is a few bytes; the data never leaves the two
    nodes). Best effort: a report that fails is skipped, never the transfer."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.written = 0
        self.total = 0
        self._reported_at = 0.0

    def counting(self, items: Iterator[Any]) -> Iterator[Any]:
        return _counting(items, self._on_total, self._on_chunk)

    def _on_total(self, total: int) -> None:
        self.total = total
        self._report()

    def _on_chunk(self, size: int) -> None:
        self.written += size
        if time.monotonic() - self._reported_at >= _PROGRESS_INTERVAL_S:
            self._report()

    def _report(self) -> None:
        self._reported_at = time.monotonic()
        with contextlib.suppress(Exception):
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(
                self.key, f"{self.written} {self.total}", namespace=_PROGRESS_NAMESPACE
            )


class _ProgressWatch:
    """In the driver: shows the writer's reports in ``bar`` (the total once, added to
    the bar's), and removes the report when the transfer ends."""

    def __init__(self, bar: Bar) -> None:
        self.key = f"transfer-{uuid.uuid4().hex}"
        self._bar = bar
        self._shown = 0
        self._total_added = False

    def poll(self) -> None:
        report = None
        with contextlib.suppress(Exception):
            from ray.experimental.internal_kv import _internal_kv_get

            report = _internal_kv_get(self.key, namespace=_PROGRESS_NAMESPACE)
        if not report:
            return
        try:
            written, total = (int(part) for part in report.split())
        except ValueError:
            return
        if not self._total_added:
            self._bar.add_to_total(total)
            self._total_added = True
        self._show(written)

    def finish(self, written: Any) -> None:
        """The writer's final count (its return value), exact where reports lagged."""
        if isinstance(written, int):
            if not self._total_added:
                self._bar.add_to_total(written)
                self._total_added = True
            self._show(written)

    def _show(self, written: int) -> None:
        self._bar.update(written - self._shown)
        self._shown = written

    def close(self) -> None:
        with contextlib.suppress(Exception):
            from ray.experimental.internal_kv import _internal_kv_del

            _internal_kv_del(self.key, namespace=_PROGRESS_NAMESPACE)


def _await_writer(writer: Any, timeout_s: float | None, watch: _ProgressWatch | None) -> Any:
    """The writer's result (``ray.get``); with a ``watch``, waited for in short steps
    that show its progress. Raises ``GetTimeoutError`` after ``timeout_s``, unless the
    writer finished as the time ran out: then it is not cancelled (in Ray 2.60 a cancel
    that crosses a task's completion crashes the worker that owns it, here the
    caller's), and what it did is reported, not a timeout that did not happen."""
    if watch is None:
        try:
            return ray.get(writer, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait([writer], timeout=0)
            if not ready:
                raise
            return ray.get(writer)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        step = _PROGRESS_INTERVAL_S
        if deadline is not None:
            step = max(0.0, min(step, deadline - time.monotonic()))
        ready, _ = ray.wait([writer], timeout=step)
        watch.poll()
        if ready:
            return ray.get(writer)
        if deadline is not None and time.monotonic() >= deadline:
            raise ray.exceptions.GetTimeoutError(f"the writer did not finish in {timeout_s} s")
