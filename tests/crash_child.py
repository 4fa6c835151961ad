"""A process that saves a ~100 MB checkpoint tree over and over, to be killed mid-save.

``tests/test_crash.py`` starts it, waits for ``ready``, sends SIGKILL at a random moment
and checks what the kill left on disk. It is also the home of the tree it saves, which
the test imports to restore into: the classes must be importable as ``crash_child.*``
(not ``__main__.*``), so that ``from_checkpoint`` finds them by reference.

Usage::

    python tests/crash_child.py PATH [--no-exchange] [--mb 100] [--max-saves N]
                                     [--pause-at POINT]

Every state is a pure function of a generation counter ``g``: each level stores
``generation == g`` and arrays filled by :func:`fill`, salted per array, so that every
state file of the tree can be checked for belonging to one generation. The child saves
generation 0, prints ``ready``, then saves generations 1, 2, ... forever (or ``N``
times). Protocol on stdout, one flushed line per event::

    ready 0 <seconds>       generation 0 is on disk; the save of generation 1 starts
    saved <g> <seconds>     save_to_path of generation g returned (and took <seconds>)
    paused <point>          --pause-at: the save of generation 1 stopped at <point>

``--no-exchange`` forces the two-step publish (rename the old tree aside, then the new
one into place) by making ``LocalStorage.exchange`` report that it cannot swap.

``--pause-at`` stops the first save after ``ready`` at one step of the publish and
sleeps there until killed, so that a test can kill it at a known point:

- ``before-publish``: the staging tree is complete, nothing is moved yet;
- ``after-exchange``: the swap is done; the staging path holds the old tree;
- ``after-old-rename`` (with ``--no-exchange``): the old tree is renamed aside and the
  target path does not exist.

If the save finishes without reaching the point (the library publishes differently),
the child prints ``error: ...`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np

from ckptable import Checkpointable

Sel = str | Collection[str] | None

# Values stay below 2**24, so every float32 below is exact.
_PATTERN_PERIOD = 1009
_SALT_STRIDE = 4096
MAX_GENERATION = _SALT_STRIDE - _PATTERN_PERIOD - 1

#: The tree's layout at 100 MB: level -> {array name: share of the total size}.
#: Five levels (root, three components, one nested), three files each, 100 MB of arrays.
LAYOUT: dict[str, dict[str, float]] = {
    "": {"embedding": 0.10},
    "policy": {"w1": 0.20, "w2": 0.20},
    "value": {"w": 0.15},
    "optimizer": {"step_sizes": 0.05},
    "optimizer/moments": {"m": 0.15, "v": 0.15},
}
PATH_SALTS = {level: i for i, level in enumerate(LAYOUT)}


@functools.cache
def _pattern(n: int) -> np.ndarray:
    """``[0, 1, ..., 1008, 0, 1, ...]``, ``n`` float32."""
    base = np.resize(np.arange(_PATTERN_PERIOD, dtype=np.float32), n)
    base.flags.writeable = False
    return base


def fill(generation: int, salt: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """The array of ``n`` float32 that generation ``generation`` stores under ``salt``
    (written into ``out`` if given: allocating 100 MB costs more than filling it).

    Every element depends on both: an array of another generation, or of another
    array of the tree, differs from it in every element.
    """
    if not 0 <= generation <= MAX_GENERATION:
        raise ValueError(f"generation {generation} out of range 0..{MAX_GENERATION}")
    return np.add(_pattern(n), np.float32(salt * _SALT_STRIDE + generation), out=out)


def array_sizes(megabytes: float) -> dict[str, dict[str, int]]:
    """Number of float32 elements of every array of every level, for a tree of ~``megabytes``."""
    total = megabytes * 1e6 / 4
    return {
        level: {name: max(1, int(total * share)) for name, share in arrays.items()}
        for level, arrays in LAYOUT.items()
    }


def array_salt(level: str, name: str) -> int:
    return PATH_SALTS[level] * 8 + sorted(LAYOUT[level]).index(name)


def expected_arrays(
    level: str,
    sizes: dict[str, int],
    generation: int,
    reuse: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Generation ``generation``'s arrays of ``level``; written into the arrays of
    ``reuse`` that fit (writable float32 of the right size), others newly allocated."""
    arrays = {}
    for name, n in sizes.items():
        out = (reuse or {}).get(name)
        fits = (
            isinstance(out, np.ndarray)
            and out.dtype == np.float32
            and out.shape == (n,)
            and out.flags.writeable
            and out.flags.c_contiguous
        )
        arrays[name] = fill(generation, array_salt(level, name), n, out if fits else None)
    return arrays


class Part(Checkpointable):
    """One level: a generation counter, some arrays and (maybe) components.

    ``generation`` is -1 and ``arrays`` empty until a state is set.
    """

    def __init__(
        self,
        level: str,
        sizes: dict[str, int],
        children: dict[str, Part] | None = None,
    ) -> None:
        self.level = level
        self.sizes = dict(sizes)
        self.children = dict(children or {})
        self.generation = -1
        self.arrays: dict[str, np.ndarray] = {}
        #: The level named in the state last set (a check that it came from the right file).
        self.restored_level: str | None = None

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.children.items())

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> dict:
        state: dict[str, Any] = {
            "level": self.level,
            "generation": self.generation,
            "arrays": dict(self.arrays),
        }
        for key, child in self.children.items():
            if self._check_component(key, components, not_components):
                state[key] = child.get_state(
                    components=self._get_subcomponents(key, components),
                    not_components=self._get_subcomponents(key, not_components),
                )
        return state

    def set_state(self, state: dict) -> None:
        self.generation = state["generation"]
        self.arrays = dict(state["arrays"])
        self.restored_level = state["level"]
        for key, child in self.children.items():
            if key in state:
                child.set_state(state[key])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        # A component is rebuilt by its parent; only the root is built from these.
        return (self.level, self.sizes), {"children": None}

    def set_generation(self, generation: int) -> None:
        """Take generation ``generation``'s state, here and in every component.

        The arrays are overwritten in place where they can be: only between saves.
        """
        self.generation = generation
        self.arrays = expected_arrays(self.level, self.sizes, generation, reuse=self.arrays)
        for child in self.children.values():
            child.set_generation(generation)

    def levels(self) -> Iterator[Part]:
        yield self
        for child in self.children.values():
            yield from child.levels()


class CrashTree(Part):
    """The root: built from ``megabytes`` alone, so ``from_checkpoint`` rebuilds the tree."""

    def __init__(self, megabytes: float = 100.0) -> None:
        self.megabytes = megabytes
        sizes = array_sizes(megabytes)
        moments = Part("optimizer/moments", sizes["optimizer/moments"])
        super().__init__(
            "",
            sizes[""],
            children={
                "policy": Part("policy", sizes["policy"]),
                "value": Part("value", sizes["value"]),
                "optimizer": Part("optimizer", sizes["optimizer"], {"moments": moments}),
            },
        )

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (self.megabytes,), {}


def tree_at(generation: int, megabytes: float = 100.0) -> CrashTree:
    tree = CrashTree(megabytes)
    tree.set_generation(generation)
    return tree


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _install_pause(point: str, armed: list[bool]) -> None:
    """Make the publish step ``point`` stop (sleep until killed) while ``armed[0]``."""
    from ckptable._storage import LocalStorage

    def pause() -> None:
        if armed[0]:
            _emit(f"paused {point}")
            while True:
                time.sleep(3600)

    if point == "before-publish":
        exchange = LocalStorage.exchange

        def exchange_paused(self: Any, a: str, b: str) -> bool:
            pause()
            return exchange(self, a, b)

        LocalStorage.exchange = exchange_paused  # type: ignore[method-assign]
    elif point == "after-exchange":
        exchange = LocalStorage.exchange

        def exchange_then_pause(self: Any, a: str, b: str) -> bool:
            swapped = exchange(self, a, b)
            if swapped:
                pause()
            return swapped

        LocalStorage.exchange = exchange_then_pause  # type: ignore[method-assign]
    elif point == "after-old-rename":
        rename = LocalStorage.rename

        def rename_then_pause(self: Any, src: str, dst: str) -> None:
            rename(self, src, dst)
            if ".ckptable-old-" in os.path.basename(dst):
                pause()

        LocalStorage.rename = rename_then_pause  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown pause point {point!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("path")
    parser.add_argument("--no-exchange", action="store_true")
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--max-saves", type=int, default=0, help="stop after N saves (0: never)")
    parser.add_argument(
        "--pause-at", choices=["before-publish", "after-exchange", "after-old-rename"]
    )
    args = parser.parse_args(argv)

    if args.no_exchange:
        from ckptable._storage import LocalStorage

        LocalStorage.exchange = lambda self, a, b: False  # type: ignore[method-assign]
    armed = [False]
    if args.pause_at:
        _install_pause(args.pause_at, armed)

    tree = tree_at(0, args.mb)
    start = time.perf_counter()
    tree.save_to_path(args.path)
    took = time.perf_counter() - start
    # Generation 1 is filled before "ready": the kill delays count from its save's start.
    generation = 1
    tree.set_generation(generation)
    _emit(f"ready 0 {took:.4f}")

    armed[0] = bool(args.pause_at)
    while True:
        start = time.perf_counter()
        tree.save_to_path(args.path)
        took = time.perf_counter() - start
        if armed[0]:
            _emit(f"error: the save of generation {generation} never reached {args.pause_at}")
            return 3
        _emit(f"saved {generation} {took:.4f}")
        if generation == args.max_saves:
            break
        generation += 1
        tree.set_generation(generation)
    return 0


if __name__ == "__main__":
    # Run as a script this module is ``__main__``; import it by name so that the tree
    # classes are pickled as ``crash_child.CrashTree`` and found again by the parent.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import crash_child

    sys.exit(crash_child.main())
