"""Shared fixtures."""

from __future__ import annotations

from typing import Any

import pytest

from helpers import assert_states_equal


@pytest.fixture
def states_equal() -> Any:
    """``assert_states_equal(actual, expected)``: numpy-aware deep equality."""
    return assert_states_equal
