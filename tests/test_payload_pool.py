"""Payload memory kept between restores (``_payload_pool``).

A block comes back to the pool only once nothing refers to it: the arrays of one restore
that are still in use are never handed to the next; those that were dropped are reused
as they are (no new pages to fault in). The idle memory is bounded, can be released, and
a forked process starts without it.
"""

from __future__ import annotations

import gc
import mmap
import os
import weakref
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


def block_of(thing: Any) -> Any:
    """The pool block an array's (or a view's) memory belongs to."""
    base = thing
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_memory_nothing_refers_to_is_reused_as_it_is() -> None:
    first = payload_memory(3 * MiB + 5)
    assert len(first) == 3 * MiB + 5 and not first.readonly
    assert isinstance(first.obj, mmap.mmap)
    block, size = weakref.ref(first.obj), len(first.obj)  # (a reference would keep it lent)
    first[:4] = b"abcd"
    array = np.frombuffer(first, dtype=np.uint8)
    del first
    assert idle_bytes() == 0  # the array still uses it
    del array
    assert idle_bytes() == size
    again = payload_memory(3 * MiB)  # a little smaller: the same block serves it
    assert again.obj is block() and idle_bytes() == 0
    assert len(again) == 3 * MiB


def test_memory_in_use_is_never_lent_again() -> None:
    held = [np.frombuffer(payload_memory(MiB), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(held):
        array[:] = i
    others = [payload_memory(MiB) for _ in range(3)]
    blocks = {id(block_of(a)) for a in held}
    assert not blocks & {id(view.obj) for view in others}
    for view in others:
        view[:] = b"\xff" * MiB
    for i, array in enumerate(held):
        assert (array == i).all()


def test_a_much_bigger_block_is_not_used_for_a_small_payload() -> None:
    big = payload_memory(8 * MiB)
    block = weakref.ref(big.obj)
    del big
    small = payload_memory(MiB)
    assert small.obj is not block()
    assert idle_bytes() == 8 * MiB


def test_idle_memory_is_bounded_and_can_be_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_payload_pool, "MAX_IDLE_BYTES", 3 * MiB)
    views = [payload_memory(MiB) for _ in range(5)]
    blocks = [weakref.ref(view.obj) for view in views]
    del views
    assert idle_bytes() == 3 * MiB
    assert sum(block() is None for block in blocks) == 2  # unmapped beyond the bound
    assert release_idle() == 3 * MiB
    assert idle_bytes() == 0 and all(block() is None for block in blocks)


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


def test_a_second_restore_reuses_the_memory_the_first_one_let_go(tmp_path: Path) -> None:
    source = Copying(_tree(np.random.default_rng(0)))
    path = source.save_to_path(tmp_path / "ckpt")
    lent: list[memoryview] = []
    real = _payload_pool.payload_memory

    def watching(n: int) -> memoryview:
        lent.append(real(n))
        return lent[-1]

    import ckptable._pickle_scan as scan_module

    original = scan_module._new_payload_buffer
    scan_module._new_payload_buffer = watching
    try:
        target = Copying()
        target.restore_from_path(path)
        first = [id(view.obj) for view in lent]
        lent.clear()
        target.restore_from_path(path)
        second = [id(view.obj) for view in lent]
    finally:
        scan_module._new_payload_buffer = original
    assert len(first) == 2 and sorted(first) == sorted(second)
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
