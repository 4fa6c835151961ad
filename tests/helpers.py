"""Assertions shared by the test modules."""

from __future__ import annotations

from typing import Any

import numpy as np


def assert_states_equal(
    actual: Any, expected: Any, where: str = "state", *, same_types: bool = False
) -> None:
    """Deep equality of nested states with numpy arrays, naming the first difference.

    ``same_types`` also requires equal types at every node (numpy scalar types, list vs
    tuple), for comparing the files of two implementations byte-for-meaning.
    """
    if same_types:
        assert type(actual) is type(expected), (
            f"{where}: {type(actual).__name__} is not {type(expected).__name__}"
        )
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {type(actual).__name__} is not a dict"
        assert set(actual) == set(expected), f"{where}: keys {set(actual)} != {set(expected)}"
        for key in expected:
            assert_states_equal(
                actual[key], expected[key], f"{where}[{key!r}]", same_types=same_types
            )
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: {len(actual)} != {len(expected)} items"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_states_equal(a, e, f"{where}[{i}]", same_types=same_types)
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{where}: not an array"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


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
