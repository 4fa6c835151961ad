"""Saves really killed mid-way (SIGKILL) leave a checkpoint that restores whole.

A child process (``crash_child.py``) saves a ~100 MB tree (a root, three components, one
of them nested: five levels of RLlib's three files) over one checkpoint path again and
again, each time in the state of the next *generation*: every level stores its
generation and arrays that only that generation produces. The parent kills it at a random
moment and then checks:

1. the checkpoint restores (into a fresh tree, and through ``from_checkpoint``) and every
   level holds the same generation ``g``, with arrays exactly those of ``g``: the old or
   the new checkpoint, never a mix and never nothing;
2. ``g`` is the last generation the child reported saved, or the one it was saving;
3. one more save from the parent publishes a new generation, restores, and leaves the
   directory holding nothing but the checkpoint: the leftovers of the killed save
   (staging directory, old tree moved aside) are cleaned up.

Each check runs with the atomic swap (``renameat2(RENAME_EXCHANGE)``) and with the
two-step publish (``target -> old``, ``staging -> target``) that replaces it where the OS
cannot swap. Kill moments are spread over the duration of one save (as the child reports
it). Besides the random kills, ``test_kill_at_publish_step`` stops the child at each step
of the publish and kills it there: random kills would rarely hit the instant between the
two renames of the two-step publish.

Environment: ``CKPTABLE_CRASH_ROUNDS`` (rounds per variant of the slow test, default 25)
and ``CKPTABLE_CRASH_SEED`` (the kill delays' seed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable._storage import LocalStorage
from crash_child import MAX_GENERATION, CrashTree, Part, array_salt, fill

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL crash tests: Linux")

TESTS_DIR = Path(__file__).resolve().parent
CHILD = TESTS_DIR / "crash_child.py"

MEGABYTES = 100.0
QUICK_ROUNDS = 3
SLOW_ROUNDS = int(os.environ.get("CKPTABLE_CRASH_ROUNDS", "25"))
SEED = int(os.environ.get("CKPTABLE_CRASH_SEED", "20240611"))
#: Upper bound of every single wait (child start, first save, death, pipe drained).
TIMEOUT = 60.0
#: Kill delays are drawn from [0, SPREAD * the longest save seen].
SPREAD = 1.25
#: Failing rounds whose directories are kept for inspection (100 MB and more each).
KEEP_FAILED = 3

VARIANTS = {"exchange": (), "two-step": ("--no-exchange",)}
LEFTOVER_MARKERS = (".ckptable-staging-", ".ckptable-old-")


# --- the child process ------------------------------------------------------------------


class Child:
    """``crash_child.py`` running, its stdout read line by line on a thread."""

    def __init__(self, target: Path, flags: tuple[str, ...], log: Path, command: list[str]):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p
        )
        self.log = log
        self.lines: list[str] = []
        self.died_by_itself = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [*command, str(target), "--mb", str(MEGABYTES), *flags],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                text=True,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, word: str, timeout: float = TIMEOUT) -> list[str]:
        """Wait for the next line starting with ``word``; its fields."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"no {word!r} from the child within {timeout:.0f}s\n{self.report()}"
                ) from None
            if line is None:
                self.proc.wait(timeout=TIMEOUT)
                raise AssertionError(
                    f"the child ended (status {self.proc.returncode}) before {word!r}\n"
                    + self.report()
                )
            self.lines.append(line)
            if line.startswith("error"):
                raise AssertionError(f"the child reported {line!r}\n{self.report()}")
            if line.split()[:1] == [word]:
                return line.split()

    def kill(self) -> float:
        """SIGKILL, wait for death, then read everything it printed before dying.

        Returns the ``time.perf_counter()`` at which the signal was sent.
        """
        sent = time.perf_counter()
        self.died_by_itself = self.proc.poll() is not None
        if not self.died_by_itself:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT)
        self._drain()
        return sent

    def wait(self) -> int:
        """Wait for a child started with ``--max-saves`` to finish; read all its output."""
        self.proc.wait(timeout=TIMEOUT)
        self._drain()
        return self.proc.returncode

    def _drain(self) -> None:
        """Once the child is dead: read the rest of its stdout, up to the end."""
        self._reader.join(timeout=TIMEOUT)
        assert not self._reader.is_alive(), "the child's stdout is still open after its death"
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        self._reader.join(timeout=TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def last_saved(self) -> int:
        """The highest generation the child reported saved (``ready`` is generation 0)."""
        saved = [int(f[1]) for f in map(str.split, self.lines) if f[:1] in (["ready"], ["saved"])]
        return max(saved, default=-1)

    def report(self, tail: int = 8) -> str:
        stderr = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return (
            f"child stdout (last {tail} of {len(self.lines)} lines): {self.lines[-tail:]}\n"
            f"child stderr: {stderr or '(empty)'}"
        )


@contextlib.contextmanager
def child_process(
    target: Path, flags: tuple[str, ...], log: Path, command: list[str] | None = None
) -> Iterator[Child]:
    child = Child(target, flags, log, command or [sys.executable, str(CHILD)])
    try:
        yield child
    finally:
        child.close()


# --- what is on disk --------------------------------------------------------------------


def listing(root: Path, limit: int = 120) -> str:
    """The tree under ``root``: one line per entry, with file sizes."""
    if not root.is_dir():
        return f"{root} does not exist"
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        depth = len(rel.parts)
        lines.append(f"{'  ' * depth}{rel.name or root.name}/")
        for name in sorted(filenames):
            size = os.lstat(os.path.join(dirpath, name)).st_size
            lines.append(f"{'  ' * (depth + 1)}{name} ({size} bytes)")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... {len(lines) - limit} more"]
    return "\n".join(lines)


def disk_summary(parent: Path, name: str) -> str:
    """What a kill left beside the checkpoint, in a few words."""
    entries = sorted(os.listdir(parent))
    words = ["target" if name in entries else "NO TARGET"]
    for marker in LEFTOVER_MARKERS:
        count = sum(marker in entry for entry in entries)
        if count:
            words.append(f"{count} {marker.strip('.-').replace('ckptable-', '')}")
    others = [e for e in entries if e != name and not any(m in e for m in LEFTOVER_MARKERS)]
    if others:
        words.append(f"other: {others}")
    return " + ".join(words)


# --- what a restored tree holds ---------------------------------------------------------


def generation_of(level: str, name: str, array: np.ndarray, size: int) -> str:
    """Which generation an array seems to come from, for messages."""
    if array.dtype != np.float32 or array.ndim != 1 or not array.size:
        return f"a {array.dtype} array of shape {array.shape}"
    base = float(fill(0, array_salt(level, name), 1)[0])
    candidate = round(float(array[0]) - base)
    if 0 <= candidate <= MAX_GENERATION:
        whole = fill(candidate, array_salt(level, name), size)
        if array.shape == whole.shape and np.array_equal(array, whole):
            return f"generation {candidate}"
        return f"generation {candidate} at [0], but not all of it"
    return f"no generation ([0] is {array[0]})"


@functools.lru_cache(maxsize=16)
def expected_array(level: str, name: str, size: int, generation: int) -> np.ndarray:
    """Generation ``generation``'s array (cached: each round checks one generation 3 times,
    and filling 100 MB costs about as much as restoring it)."""
    array = fill(generation, array_salt(level, name), size)
    array.flags.writeable = False
    return array


def check_tree(tree: Part, how: str) -> int:
    """Every level of ``tree`` holds one same generation, arrays exactly; that generation."""
    levels = list(tree.levels())
    generations = {part.level or "<root>": part.generation for part in levels}
    found = set(generations.values())
    assert len(found) == 1, f"{how}: levels hold different generations: {generations}"
    (generation,) = found
    assert generation >= 0, f"{how}: no state was restored: {generations}"
    for part in levels:
        where = f"{how}: level {part.level or '<root>'!r}"
        assert part.restored_level == part.level, (
            f"{where} was restored from the state of level {part.restored_level!r}"
        )
        assert set(part.arrays) == set(part.sizes), (
            f"{where}: arrays {sorted(part.arrays)} != {sorted(part.sizes)}"
        )
        for name, size in part.sizes.items():
            expected = expected_array(part.level, name, size, generation)
            actual = part.arrays[name]
            ok = (
                isinstance(actual, np.ndarray)
                and actual.dtype == expected.dtype
                and actual.shape == expected.shape
                and np.array_equal(actual, expected)
            )
            holds = "" if ok else generation_of(part.level, name, np.asarray(actual), len(expected))
            assert ok, (
                f"{where}: array {name!r} is not that of generation {generation} (it holds {holds})"
            )
    return generation


# --- one kill -----------------------------------------------------------------------------


@dataclasses.dataclass
class Round:
    variant: str
    index: int
    delay: float
    killed_after: float = float("nan")
    last_saved: int = -1
    restored: int | None = None
    after_kill: str = ""
    listing_after_kill: str = ""
    child_report: str = ""
    save_durations: list[float] = dataclasses.field(default_factory=list)
    #: Restore with ``from_checkpoint`` first (else ``restore_from_path`` first).
    from_checkpoint_first: bool = False
    #: The publish step the child was paused at when killed (``test_kill_at_publish_step``).
    paused_at: str = ""

    def describe(self) -> str:
        when = (
            f"killed paused at {self.paused_at}"
            if self.paused_at
            else f"kill delay {self.delay * 1000:.1f} ms (killed "
            f"{self.killed_after * 1000:.1f} ms after 'ready'), seed {SEED}"
        )
        first = "from_checkpoint" if self.from_checkpoint_first else "restore_from_path"
        return (
            f"{self.variant} round {self.index}: {when}; {first} restored first; "
            f"last generation reported saved {self.last_saved}; "
            f"restored generation {self.restored}; on disk after the kill: {self.after_kill}"
        )


def check_after_crash(rnd: Round, parent: Path, target: Path) -> None:
    """Checks 1 to 3 on a checkpoint whose writer was killed."""

    # 1. It restores whole, into an existing tree and into a new one, to one generation.
    # The first restore is the one that finds (and must repair) what the kill left; each
    # of the two ways goes first in half of the rounds.
    def into_existing() -> Part:
        tree = CrashTree(MEGABYTES)
        tree.restore_from_path(target)
        return tree

    def rebuilt() -> Part:
        tree = CrashTree.from_checkpoint(target)
        assert type(tree) is CrashTree, f"from_checkpoint built a {type(tree)}"
        return tree

    ways = [("restore_from_path", into_existing), ("from_checkpoint", rebuilt)]
    if rnd.from_checkpoint_first:
        ways.reverse()
    trees, generations = {}, {}
    for how, restore in ways:
        trees[how] = restore()
        generations[how] = check_tree(trees[how], how)
    assert len(set(generations.values())) == 1, f"two restores disagree: {generations}"
    rnd.restored = generations["restore_from_path"]
    tree = trees["restore_from_path"]
    del trees

    # 2. The generation is the last one reported saved, or the one being saved. (All the
    # child's output was read after its death: a save that returned before the kill but
    # was not reported yet is the "one being saved".)
    assert rnd.last_saved <= rnd.restored <= rnd.last_saved + 1, (
        f"restored generation {rnd.restored}, but the child last reported saving "
        f"{rnd.last_saved}: it can only be that one or the next"
    )

    # 3. The next save publishes, restores, and cleans up what the killed save left.
    new = rnd.last_saved + 2
    tree.set_generation(new)
    tree.save_to_path(target)
    fresh = CrashTree(MEGABYTES)
    fresh.restore_from_path(target)
    assert check_tree(fresh, "restore after the next save") == new
    leftovers = sorted(set(os.listdir(parent)) - {target.name})
    assert not leftovers, (
        f"the next save left these beside the checkpoint: {leftovers} "
        "(leftovers of the killed save must be cleaned up by the next save)"
    )


def kill_round(
    workdir: Path,
    rnd: Round,
    flags: tuple[str, ...],
    command: list[str] | None = None,
) -> None:
    """Start the child, kill it ``rnd.delay`` s after ``ready``, check what is left."""
    parent = workdir / "checkpoints"
    parent.mkdir(parents=True)
    target = parent / "ckpt"
    with child_process(target, flags, workdir / "child.stderr", command) as child:
        child.expect("ready")
        start = time.perf_counter()
        time.sleep(rnd.delay)
        rnd.killed_after = child.kill() - start
        assert not child.died_by_itself, (
            f"the child ended by itself (status {child.proc.returncode}) before the kill\n"
            + child.report()
        )
        rnd.last_saved = child.last_saved()
        rnd.child_report = child.report()
        rnd.save_durations = save_durations(child.lines)
    rnd.after_kill = disk_summary(parent, target.name)
    rnd.listing_after_kill = listing(parent)
    check_after_crash(rnd, parent, target)


# --- how long a save takes -------------------------------------------------------------------

#: Per variant, the longest save a child reported so far (seconds): kill delays are
#: drawn from [0, SPREAD * this]. Save times vary a lot (the first save after ``ready``
#: took from 40 to 300 ms on one machine, process to process, before saves fsynced), so
#: the estimate starts with a calibration child and grows with every save a killed child
#: reported.
_longest_save: dict[str, float] = {}
#: Kill delays stay below SPREAD * this, whatever one stalled save took.
MAX_SAVE_ESTIMATE = 2.0


def save_durations(lines: list[str]) -> list[float]:
    return [float(f[2]) for f in map(str.split, lines) if f[:1] in (["ready"], ["saved"])]


def note_save_durations(variant: str, durations: list[float]) -> None:
    longest = max(durations, default=0.0)
    _longest_save[variant] = min(max(_longest_save.get(variant, 0.0), longest), MAX_SAVE_ESTIMATE)


def calibrate(variant: str, workdir: Path) -> None:
    """Measure a first estimate of a save's duration: a child saving 4 times."""
    if variant in _longest_save:
        return
    workdir.mkdir(parents=True)
    flags = (*VARIANTS[variant], "--max-saves", "4")
    with child_process(workdir / "ckpt", flags, workdir / "child.stderr") as child:
        status = child.wait()
        assert status == 0, f"calibration child failed\n{child.report()}"
    assert len(save_durations(child.lines)) == 5, child.report()
    note_save_durations(variant, save_durations(child.lines))
    shutil.rmtree(workdir)


@pytest.fixture
def two_step_if(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``two_step_if(variant)``: make the parent's saves two-step too, as the child's."""

    def apply(variant: str) -> None:
        if "--no-exchange" in VARIANTS[variant]:
            monkeypatch.setattr(LocalStorage, "exchange", lambda self, a, b: False)

    return apply


def run_rounds(
    tmp_path: Path, variant: str, rounds: int, command: list[str] | None = None
) -> list[Round]:
    """``rounds`` kills at delays spread evenly (with jitter) over one save."""
    calibrate(variant, tmp_path / "calibration")
    rng = random.Random(f"{SEED}:{variant}:{rounds}")
    fractions = [(i + rng.random()) / rounds for i in range(rounds)]
    rng.shuffle(fractions)
    save_ms = _longest_save[variant] * 1000
    print(f"\n{variant}: longest save so far {save_ms:.0f} ms, {rounds} kills")

    results, failures = [], []
    for index, fraction in enumerate(fractions):
        rnd = Round(variant, index, fraction * SPREAD * _longest_save[variant])
        rnd.from_checkpoint_first = index % 2 == 1
        workdir = tmp_path / f"{variant}-{index:02d}"
        try:
            kill_round(workdir, rnd, VARIANTS[variant], command)
        except Exception as exc:  # any error is a failed round; all rounds run
            failures.append((rnd, exc, listing(workdir / "checkpoints"), workdir))
            print(f"  FAILED {rnd.describe()}: {_first_line(exc)}")
            if len(failures) > KEEP_FAILED:
                shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"  ok {rnd.describe()}")
            shutil.rmtree(workdir, ignore_errors=True)
        results.append(rnd)
        note_save_durations(variant, rnd.save_durations)
    expected_array.cache_clear()

    if failures:
        details = [
            f"{rnd.describe()}\n"
            f"  {type(exc).__name__}: {exc}\n"
            f"  on disk right after the kill:\n{_indent(rnd.listing_after_kill or '-')}\n"
            f"  on disk at the failure (kept in {kept}):\n{_indent(now)}\n"
            f"{_indent(rnd.child_report)}"
            for rnd, exc, now, kept in failures[:KEEP_FAILED]
        ]
        more = len(failures) - KEEP_FAILED
        summary = "\n".join(f"  {rnd.describe()}: {_first_line(exc)}" for rnd, exc, *_ in failures)
        pytest.fail(
            f"{len(failures)} of {rounds} {variant} kill rounds failed:\n{summary}\n\n"
            + "\n\n".join(details)
            + (f"\n\n({more} more failing rounds not detailed)" if more > 0 else ""),
            pytrace=False,
        )
    return results


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kill_during_save(tmp_path: Path, variant: str, two_step_if: Any) -> None:
    two_step_if(variant)
    run_rounds(tmp_path, variant, QUICK_ROUNDS)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kill_during_save_many_times(tmp_path: Path, variant: str, two_step_if: Any) -> None:
    two_step_if(variant)
    results = run_rounds(tmp_path, variant, SLOW_ROUNDS)
    seen = sorted({r.after_kill for r in results})
    old = sum(r.restored == r.last_saved for r in results)
    print(
        f"{variant}: {old} kills kept the old generation, {len(results) - old} the new; "
        f"states left on disk: {seen}"
    )


#: (publish step, variant, restore with from_checkpoint first, the generation the
#: checkpoint must hold after the kill, what the kill leaves on disk)
PUBLISH_STEPS = [
    ("before-publish", "exchange", False, 0, "target + 1 staging"),
    ("after-exchange", "exchange", False, 1, "target + 1 staging"),
    ("before-publish", "two-step", False, 0, "target + 1 staging"),
    ("after-old-rename", "two-step", False, 0, "NO TARGET + 1 staging + 1 old"),
    ("after-old-rename", "two-step", True, 0, "NO TARGET + 1 staging + 1 old"),
]


@pytest.mark.parametrize(
    ("step", "variant", "from_checkpoint_first", "expected", "left"),
    PUBLISH_STEPS,
    ids=[
        f"{step}-{variant}" + ("-from_checkpoint" if first else "")
        for step, variant, first, *_ in PUBLISH_STEPS
    ],
)
def test_kill_at_publish_step(
    tmp_path: Path,
    step: str,
    variant: str,
    from_checkpoint_first: bool,
    expected: int,
    left: str,
    two_step_if: Any,
) -> None:
    """The child stops at one step of publishing generation 1 and is killed there."""
    two_step_if(variant)
    parent = tmp_path / "checkpoints"
    parent.mkdir()
    target = parent / "ckpt"
    rnd = Round(variant, 0, 0.0, from_checkpoint_first=from_checkpoint_first, paused_at=step)
    flags = (*VARIANTS[variant], "--pause-at", step)
    with child_process(target, flags, tmp_path / "child.stderr") as child:
        child.expect("ready")
        child.expect("paused")
        child.kill()
        assert not child.died_by_itself, f"the child ended by itself\n{child.report()}"
        rnd.last_saved = child.last_saved()
        report = child.report()
    rnd.after_kill = disk_summary(parent, target.name)
    rnd.listing_after_kill = listing(parent)
    context = f"{rnd.describe()}\non disk after the kill:\n{rnd.listing_after_kill}\n{report}"
    assert rnd.last_saved == 0, context
    assert rnd.after_kill == left, f"the pause did not stop where intended: {context}"
    try:
        check_after_crash(rnd, parent, target)
    except (AssertionError, ckptable.CheckpointError) as exc:
        what = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
        raise AssertionError(f"{what}\n{context}\non disk now:\n{listing(parent)}") from exc
    assert rnd.restored == expected, f"expected generation {expected}: {context}"
