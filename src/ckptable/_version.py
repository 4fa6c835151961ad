"""The installed ckptable version, looked up once (it is written into every level)."""

from __future__ import annotations

import functools

__all__ = ["package_version"]


@functools.cache
def package_version() -> str:
    """ckptable's version from the installed distribution; ``0+unknown`` from a bare tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckptable")
    except PackageNotFoundError:
        return "0+unknown"
