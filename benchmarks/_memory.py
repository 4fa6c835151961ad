"""Memory gauges shared by the benchmark scripts (standard library only, so that
``bench_torch.py`` runs where only torch is installed): ``/proc`` status fields, the
peak resident set of one operation, and glibc's ``malloc_trim``."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["MALLOC_TRIM", "PeakRss", "proc_status"]


def proc_status(path: str = "/proc/self/status") -> dict[str, int]:
    """The ``kB`` fields of a ``/proc/<pid>/status`` file, in bytes ({} if unreadable)."""
    fields: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        return {}
    return fields


class PeakRss:
    """The extra memory an operation needs: the process's resident-set high-water mark
    (``VmHWM``) after it, minus its resident set before it.

    Linux resets the mark to the current resident set when ``5`` is written to
    ``/proc/self/clear_refs``, so each operation gets its own peak in this process, with
    no tracing overhead (tracemalloc would slow pure-Python code, and misses memory that
    Arrow's and the AWS SDK's allocators take). It counts every allocation of every
    thread, and pages of mapped files that are touched; not the page cache.
    ``available`` is False where the reset is not possible (not Linux, or too old).
    """

    def __init__(self) -> None:
        self.available = self._reset() and "VmHWM" in proc_status()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def start(self) -> int | None:
        """Reset the mark; return the resident set it starts from."""
        if not self.available or not self._reset():
            return None
        return proc_status().get("VmRSS")

    def extra(self, start: int | None) -> int | None:
        """Peak resident set since ``start()``, above what it started from."""
        peak = proc_status().get("VmHWM") if start is not None else None
        return None if peak is None or start is None else max(0, peak - start)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return function  # type: ignore[no-any-return]


MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand memory the process freed back to the kernel: glibc's heap (``malloc_trim``)
    and the idle payload memory ckptable keeps between restores (``_payload_pool``), so
    that every implementation's next operation starts from new pages alike."""
    from ckptable._payload_pool import release_idle

    release_idle()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
