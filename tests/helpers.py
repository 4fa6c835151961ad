"""Assertions, a plain state holder and I/O spies shared by the test modules."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ckptable import Checkpointable
from ckptable.testing import assert_states_equal as _assert_states_equal


def assert_states_equal(
    actual: Any, expected: Any, where: str = "state", *, same_types: bool = False
) -> None:
    """Deep equality of nested states with numpy arrays, naming every difference
    (``ckptable.testing.assert_states_equal``, with ``where`` positional as before).

    ``same_types`` also requires equal types at every node (numpy scalar types, list vs
    tuple), for comparing the files of two implementations byte-for-meaning.
    """
    __tracebackhide__ = True
    _assert_states_equal(actual, expected, where=where, same_types=same_types)


def reseal(path: Any) -> None:
    """Rewrite the manifests of the checkpoint at ``path`` to match its files as they are.

    Tests that craft a checkpoint's contents on purpose (as an attacker who can write the
    files can) use it, so that what they test is not caught by the checksums first.
    """
    import os

    from ckptable._manifest import preferred_algorithm, seal_directory
    from ckptable._storage import LocalStorage

    seal_directory(LocalStorage(), os.fspath(path), preferred_algorithm(), {}, str, True)


def same_state(actual: Any, expected: Any) -> bool:
    """``assert_states_equal`` as a predicate (for ``assert a == b``-style checks)."""
    try:
        assert_states_equal(actual, expected)
    except AssertionError:
        return False
    return True


class StateHolder(Checkpointable):
    """A level whose whole state is one dict, set as given (big arrays, tensors...)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state or {}

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return dict(self.state)

    def set_state(self, state: dict) -> None:
        self.state = state

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


def record_preads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """``(offset, bytes asked)`` of every ``os.preadv`` from now on (its first buffer), in
    the order the reading threads made them, not the file's."""
    reads: list[tuple[int, int]] = []
    real_preadv = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        reads.append((offset, len(buffers[0])))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    return reads


def fstat_reporting(monkeypatch: pytest.MonkeyPatch, size: Any) -> None:
    """Make ``os.fstat`` report ``size(real_size)`` bytes for every file (the rest of the
    result is the real one): a file cut short after its size was read."""
    real_fstat = os.fstat

    class Sized:
        def __init__(self, result: os.stat_result) -> None:
            self._result = result
            self.st_size = size(result.st_size)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._result, name)

    monkeypatch.setattr(os, "fstat", lambda fd: Sized(real_fstat(fd)))
