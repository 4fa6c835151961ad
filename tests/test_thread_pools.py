"""Pools lent to one save or restore at a time (``_thread_pools``): kept between
operations (no thread start per restore), never shared by two at once, drained before
they are given back, and not inherited by a forked child."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest

from ckptable import _thread_pools
from ckptable._thread_pools import MAX_IDLE_POOLS, borrow_pool


def _thread_name() -> str:
    return threading.current_thread().name


def test_a_pool_given_back_is_lent_again_with_its_threads() -> None:
    first = borrow_pool(2, "ckptable-test-reuse")
    names = {first.submit(_thread_name).result() for _ in range(4)}
    first.shutdown()
    second = borrow_pool(2, "ckptable-test-reuse")
    threads = threading.active_count()
    assert second.submit(_thread_name).result() in names
    assert threading.active_count() == threads  # no thread started
    second.shutdown()


def test_two_operations_at_once_get_two_pools() -> None:
    a = borrow_pool(1, "ckptable-test-two")
    b = borrow_pool(1, "ckptable-test-two")
    release = threading.Event()
    blocked = a.submit(release.wait, 10)
    # b's task runs although a's only thread is busy: b has threads of its own.
    assert b.submit(lambda: "ran").result(timeout=10) == "ran"
    release.set()
    assert blocked.result(timeout=10)
    a.shutdown()
    b.shutdown()


def test_giving_back_waits_for_every_task_and_refuses_new_ones() -> None:
    pool = borrow_pool(2, "ckptable-test-drain")
    done: list[int] = []

    def slow(index: int) -> None:
        time.sleep(0.05)
        done.append(index)

    for index in range(6):
        pool.submit(slow, index)
    pool.shutdown()
    assert sorted(done) == list(range(6))
    with pytest.raises(RuntimeError, match="given back"):
        pool.submit(slow, 7)
    pool.shutdown()  # a second call does nothing


def test_only_a_few_idle_pools_are_kept() -> None:
    key = (1, "ckptable-test-few")
    pools = [borrow_pool(*key) for _ in range(MAX_IDLE_POOLS + 2)]
    for pool in pools:
        pool.submit(_thread_name).result()
        pool.shutdown()
    assert len(_thread_pools._idle[key]) == MAX_IDLE_POOLS


def _child_runs_a_task(queue: Any) -> None:
    pool = borrow_pool(2, "ckptable-test-fork")
    queue.put(pool.submit(lambda: "ran in the child").result(timeout=10))
    pool.shutdown()


def test_a_forked_child_starts_its_own_threads() -> None:
    """The parent's idle pool has threads the child does not: lent there, it would
    never run a task."""
    pool = borrow_pool(2, "ckptable-test-fork")
    pool.submit(_thread_name).result()
    pool.shutdown()
    assert _thread_pools._idle[(2, "ckptable-test-fork")]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_runs_a_task, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=30) == "ran in the child"
    finally:
        child.join(30)
    assert child.exitcode == 0
