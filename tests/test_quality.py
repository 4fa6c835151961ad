"""The code is typed (mypy --strict) and linted (ruff), checked with the test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", "src", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean_for_the_library() -> None:
    result = run("ruff", "format", "--check", "src")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_the_library() -> None:
    result = run("mypy", "src/ckptable")
    assert result.returncode == 0, result.stdout + result.stderr
