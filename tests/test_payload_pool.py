"""Payload memory kept between restores (``_payload_pool``).

A block comes back to the pool only once nothing refers to its memory: the arrays of
one restore that are still in use are never handed to the next; those that were dropped
are reused as they are (no new pages to fault in), or unmapped at once past the bound on
idle memory. The idle memory can be released, and a forked process starts without it.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptable import _payload_pool
from ckptable._payload_pool import idle_bytes, payload_memory, release_idle
from helpers import StateHolder

MiB = 1 << 20


@pytest.fixture(autouse=True)
def empty_pool() -> Iterator[None]:
    gc.collect()
    release_idle()
    yield
    gc.collect()
    release_idle()


def address(view: Any) -> int:
    """Where a view's (or an array's) memory starts."""
    if isinstance(view, np.ndarray):
        return int(view.ctypes.data)
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def mapped(start: int) -> bool:
    """Whether ``start`` is inside a mapping of this process (``/proc/self/maps``: the
    kernel merges neighbouring anonymous mappings into one line)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(bound, 16) for bound in line.split(None, 1)[0].split("-"))
            if low <= start < high:
                return True
    return False


def test_memory_nothing_refers_to_is_reused_as_it_is() -> None:
    first = payload_memory(3 * MiB + 5)
    assert len(first) == 3 * MiB + 5 and not first.readonly
    start = address(first)
    assert start % mmap.PAGESIZE == 0
    first[:4] = b"abcd"
    array = np.frombuffer(first, dtype=np.uint8)
    del first
    assert idle_bytes() == 0  # the array still uses it
    del array
    assert idle_bytes() == 3 * MiB + mmap.PAGESIZE  # page-rounded
    again = payload_memory(3 * MiB)  # a little smaller: the same block serves it
    assert address(again) == start and idle_bytes() == 0
    assert len(again) == 3 * MiB


def test_memory_in_use_is_never_lent_again() -> None:
    held = [np.frombuffer(payload_memory(MiB), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(held):
        array[:] = i
    others = [payload_memory(MiB) for _ in range(3)]
    assert not {address(a) for a in held} & {address(view) for view in others}
    for view in others:
        view[:] = b"\xff" * MiB
    for i, array in enumerate(held):
        assert (array == i).all()


def test_a_much_bigger_block_is_not_used_for_a_small_payload() -> None:
    big = payload_memory(8 * MiB)
    start = address(big)
    del big
    small = payload_memory(MiB)
    assert address(small) != start
    assert idle_bytes() == 8 * MiB


def test_memory_past_the_idle_bound_is_unmapped_when_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_payload_pool, "MAX_IDLE_BYTES", 3 * MiB)
    views = [payload_memory(MiB) for _ in range(5)]
    starts = [address(view) for view in views]
    assert all(mapped(start) for start in starts)
    del views
    # Given back as the last reference went, without another request to the pool.
    assert _payload_pool._idle_total == 3 * MiB
    assert sum(not mapped(start) for start in starts) == 2
    assert release_idle() == 3 * MiB
    assert idle_bytes() == 0 and not any(mapped(start) for start in starts)


def test_memory_dropped_in_another_thread_comes_back() -> None:
    view = payload_memory(MiB)
    holder = [np.frombuffer(view, dtype=np.uint8)]
    del view
    worker = threading.Thread(target=holder.clear)
    worker.start()
    worker.join()
    assert idle_bytes() == MiB


def test_idle_memory_past_the_hot_bound_is_given_to_the_kernel_to_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    advised: list[int] = []
    real_madvise = mmap.mmap.madvise

    class Watched(mmap.mmap):
        def madvise(self, option: int, *args: int) -> None:
            advised.append(len(self))
            real_madvise(self, option, *args)

    monkeypatch.setattr(_payload_pool.mmap, "mmap", Watched)
    monkeypatch.setattr(_payload_pool, "MAX_HOT_BYTES", 2 * MiB)
    views = [payload_memory(MiB) for _ in range(4)]
    for view in views:
        view[:] = b"\x01" * MiB
    del views, view
    assert idle_bytes() == 4 * MiB
    assert advised == [MiB, MiB]  # two kept as they are, two marked MADV_FREE
    again = [payload_memory(MiB) for _ in range(4)]  # all four reused, as they are
    assert idle_bytes() == 0 and advised == [MiB, MiB]
    for view in again:
        view[:] = b"\x02" * MiB
        assert view[MiB - 1] == 2


def test_a_payload_that_cannot_be_mapped_is_a_memory_error() -> None:
    with pytest.raises(MemoryError):
        payload_memory(1 << 62)


def test_a_forked_process_starts_without_the_pool() -> None:
    view = payload_memory(MiB)
    del view
    assert idle_bytes() == MiB
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.write(write, str(idle_bytes()).encode())
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 100)
    os.close(read)
    os.waitpid(pid, 0)
    assert got == b"0"
    assert idle_bytes() == MiB


class Copying(StateHolder):
    """Keeps copies of what it is given, as RLlib's torch modules do (numpy -> torch)."""

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state({key: np.array(value) for key, value in state.items()})


def _tree(rng: np.random.Generator) -> dict[str, Any]:
    return {"w": rng.random(MiB // 4), "b": rng.random(2 * MiB // 8).astype(np.float32)}


def test_a_second_restore_reuses_the_memory_the_first_one_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptable._pickle_scan as scan_module

    source = Copying(_tree(np.random.default_rng(0)))
    path = source.save_to_path(tmp_path / "ckpt")
    lent: list[int] = []
    real = scan_module._new_payload_buffer

    def watching(n: int) -> memoryview:
        view = real(n)
        lent.append(address(view))
        return view

    monkeypatch.setattr(scan_module, "_new_payload_buffer", watching)
    target = Copying()
    target.restore_from_path(path)
    first = list(lent)
    lent.clear()
    target.restore_from_path(path)
    assert len(first) == 2 and sorted(first) == sorted(lent)
    for key in ("w", "b"):
        assert np.array_equal(target.state[key], source.state[key])


def test_arrays_a_state_keeps_are_not_overwritten_by_the_next_restore(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    one = StateHolder(_tree(rng)).save_to_path(tmp_path / "one")
    two = StateHolder(_tree(rng)).save_to_path(tmp_path / "two")
    kept = StateHolder.from_checkpoint(one)
    expected = {key: np.array(value) for key, value in kept.state.items()}
    for _ in range(3):
        other = StateHolder.from_checkpoint(two)
        del other
        gc.collect()
    for key, value in expected.items():
        assert np.array_equal(kept.state[key], value)
        assert kept.state[key].flags.writeable
        assert kept.state[key].ctypes.data % mmap.PAGESIZE == 0
