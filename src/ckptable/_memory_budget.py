"""How much memory a save or a restore may hold ahead of its pipeline.

A restore from an object store fetches files ahead (``_storage_prefetch``), and a save to
one holds the bytes it hands to its uploads (``_storage_concurrent``). Both take a quarter
of the memory available now, within bounds of their own, and within what the process's
control group (a container) has left under its limit: the memory the kernel can give
without swapping, not the machine's size.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["cgroup_memory_left", "memory_available", "memory_budget"]


def memory_budget(floor: int, ceiling: int) -> int:
    """A quarter of :func:`memory_available`, at least ``floor`` (also where nothing is
    known) and at most ``ceiling``."""
    available = memory_available()
    if available is None:
        return floor
    return max(floor, min(ceiling, available // 4))


def memory_available() -> int | None:
    """The memory the kernel can give without swapping (``MemAvailable``, or the free
    memory where that is not known), and no more than what the process's control group
    has left under its limit (a container's); None where nothing is known."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    left = cgroup_memory_left()
    if left is not None:
        found.append(left)
    return min(found) if found else None


def cgroup_memory_left(
    cgroup_file: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> int | None:
    """Bytes the process's memory control group may still use (limit minus usage:
    cgroup v2's ``memory.max``/``memory.current``, or v1's), None where it has no limit
    or none can be read."""
    try:
        with open(cgroup_file) as groups:
            lines = groups.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            files = ("memory.max", "memory.current")
            base = root
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            base = f"{root}/memory"
        else:
            continue
        for directory in (base + path, base):
            try:
                with open(f"{directory}/{files[0]}") as limit_file:
                    limit = limit_file.read().strip()
                with open(f"{directory}/{files[1]}") as usage_file:
                    usage = int(usage_file.read().strip())
            except (OSError, ValueError):
                continue
            if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
                return None
            return max(0, int(limit) - usage)
    return None
