"""Progress bars: on a terminal for long saves, restores, verifications, conversions and
transfers; never otherwise; ``progress=`` and ``CKPTABLE_PROGRESS`` decide when asked.

A pseudo-terminal (``os.openpty``) stands in for the user's terminal: it is stderr of a
real subprocess, or, in this process, ``sys.stderr`` is its slave end (set inside the test
body: pytest's capture sets ``sys.stderr`` again after fixtures ran). What reaches it is
read from the master end. Most tests lower the delay before a bar appears (a test hook,
``_progress.DELAY_SECONDS``) instead of sleeping through it; two keep the real second.
The exact count a bar ends with is read off tqdm's ``close`` (recorded, then run as it is).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import ray
import tqdm

import ckptable
from ckptable import _progress
from ckptable._manifest import manifest_tree_bytes
from ckptable._storage import LocalStorage
from ckptable.ray import LocalCopyTransfer, RayObjectStoreTransfer
from ray_actors import Algo, foreach
from ray_cluster import RayCluster
from trees import Leaf, Model, Node

# The slowed transfer below runs inside Ray workers, which cannot import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1 << 20


# --------------------------------------------------------------------------- terminals


class Stderr:
    """``with`` it, ``sys.stderr`` is ``self.stream``."""

    stream: IO[str]

    def __enter__(self) -> Stderr:
        self._saved = sys.stderr
        sys.stderr = self.stream
        return self

    def __exit__(self, *exc_info: Any) -> None:
        sys.stderr = self._saved
        self.stream.flush()


class Terminal(Stderr):
    """A pseudo-terminal of ``columns`` x 24 (0: one nobody sized); collects its output."""

    def __init__(self, columns: int = 120) -> None:
        self.master, slave = os.openpty()
        if columns:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.slave: IO[str] = open(slave, "w", encoding="utf-8")  # noqa: SIM115
        self.stream = self.slave
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the slave end is closed
                return
            if not data:
                return
            self._chunks.append(data)

    def output(self) -> str:
        """Everything written to the terminal (which is closed then)."""
        if not self.slave.closed:
            self.slave.close()
            self._reader.join(timeout=10)
            os.close(self.master)
        return b"".join(self._chunks).decode("utf-8", "replace")


@pytest.fixture(autouse=True)
def no_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``CKPTABLE_PROGRESS`` from the environment the tests run in."""
    monkeypatch.delenv(_progress.ENV_VAR, raising=False)


@pytest.fixture
def no_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bars appear at once (the delay is tested on its own)."""
    monkeypatch.setattr(_progress, "DELAY_SECONDS", 0.0)


class LogFile(Stderr):
    """A file (not a terminal)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stream = open(path, "w", encoding="utf-8")  # noqa: SIM115

    def output(self) -> str:
        self.stream.flush()
        return self.path.read_text()


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    """A terminal, to make ``sys.stderr`` with ``with terminal:``."""
    term = Terminal()
    yield term
    term.output()


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[LogFile]:
    """A file, to make ``sys.stderr`` with ``with log_file:``."""
    log = LogFile(tmp_path / "stderr.log")
    yield log
    log.stream.close()


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every tqdm bar closed from now on: its description and final count and total."""
    closed: list[dict[str, Any]] = []
    close = tqdm.tqdm.close

    def recording_close(self: Any) -> None:
        if not getattr(self, "disable", True):  # a bar's first close
            closed.append({"desc": self.desc, "n": self.n, "total": self.total})
        close(self)

    monkeypatch.setattr(tqdm.tqdm, "close", recording_close)
    return closed


def big_tree(mib: int) -> Node:
    """``mib`` MiB of float32 in four leaves, and a small nested component."""
    leaves: dict[str, Any] = {}
    for index in range(4):
        leaf = Leaf(mib * MiB // 16)
        leaf.weights = np.random.default_rng(index).random(leaf.size, dtype=np.float32)
        leaves[f"leaf{index}"] = leaf
    return Node({**leaves, "small": Node({"leaf": Leaf(10)})})


def small_tree() -> Node:
    return Node({"a": Leaf(8), "b": Node({"c": Leaf(4)})})


def big_model(mib: int) -> Model:
    """A Model (``from_checkpoint`` rebuilds its whole tree) of about ``mib`` MiB."""
    return Model(layers=2, width=mib * MiB // 12)


def checkpoint_bytes(path: Any) -> int:
    """The bytes of every file of the checkpoint, as its manifests list them."""
    return ckptable.verify_checkpoint(path, progress=False).bytes


# --------------------------------------------------------------------------- on a terminal


def test_a_long_save_and_restore_on_a_terminal_show_bytes_rate_and_percentage(
    terminal: Terminal, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    tree = big_tree(256)
    restored = big_tree(1)

    with terminal:
        path = tree.save_to_path(tmp_path / "ckpt", durable=False)
        restored.restore_from_path(path)

    shown = terminal.output()
    size = checkpoint_bytes(path)
    assert size > 256 * MiB
    # Bytes (scaled: MB) and a rate, and, where the manifests give the total, a percentage.
    assert re.search(r"Saving: [\d.]+MB \[[\d:]+, [\d.]+[kMG]?B/s\]", shown), shown
    assert re.search(r"Restoring: 100%\|.*\| [\d.]+M/[\d.]+M \[.*B/s\]", shown), shown
    assert shown.endswith("\n")  # the last bar's line is finished
    # One bar each, counting every byte of the checkpoint exactly once.
    assert bars == [
        {"desc": "Saving", "n": size, "total": None},
        {"desc": "Restoring", "n": size, "total": size},
    ]
    np.testing.assert_array_equal(
        restored.children["leaf3"].weights, tree.children["leaf3"].weights
    )


def test_on_a_terminal_of_a_real_process_the_bar_appears_after_a_second(tmp_path: Path) -> None:
    """The real delay, in a real process whose stderr is a terminal: a save that takes
    longer than a second shows its bar; a short one shows nothing."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from trees import Leaf, Node

        class Slow(Node):
            def get_state(self, *args, **kwargs):
                time.sleep(1.3)  # the work takes more than a second
                return super().get_state(*args, **kwargs)

        Slow({{"leaf": Leaf(1 << 22)}}).save_to_path({str(tmp_path / "long")!r})
        print("long save done", file=sys.stderr, flush=True)
        Node({{"leaf": Leaf(4)}}).save_to_path({str(tmp_path / "short")!r})
        """
    )
    term = Terminal(columns=0)  # as nobody sized it: tqdm alone would print nothing on it
    env = {key: value for key, value in os.environ.items() if key != _progress.ENV_VAR}
    try:
        subprocess.run(
            [sys.executable, "-c", script], stderr=term.slave, env=env, check=True, timeout=120
        )
    finally:
        shown = term.output()

    long_save, _, short_save = shown.partition("long save done")
    assert re.search(r"Saving: 16\.8MB \[[\d:]+, [\d.]+[kMG]?B/s\]", long_save), shown
    assert short_save.strip() == "", shown


def test_short_operations_show_nothing_on_a_terminal(
    terminal: Terminal, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    tree = Model()

    with terminal:
        path = tree.save_to_path(tmp_path / "ckpt")
        tree.restore_from_path(path)
        Model.from_checkpoint(path)
        ckptable.verify_checkpoint(path)
        ckptable.convert_checkpoint(path, tmp_path / "converted", format="cloudpickle")

    assert terminal.output() == ""
    # The bars existed (on a terminal), but none ran for the second it takes to appear.
    assert [bar["desc"] for bar in bars] == [
        "Saving",
        "Restoring",
        "Restoring",
        "Verifying",
        "Verifying",
        "Converting",
    ]


def test_nothing_is_shown_when_stderr_is_not_a_terminal(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    tree = big_tree(8)

    with log_file:
        path = tree.save_to_path(tmp_path / "ckpt")
        tree.restore_from_path(path)
        ckptable.verify_checkpoint(path)

    assert log_file.output() == ""
    assert bars == []  # no bar was even made


def test_a_pipe_is_not_a_terminal(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from ckptable import _progress
        from trees import Leaf, Node
        _progress.DELAY_SECONDS = 0.0
        Node({{"leaf": Leaf(1 << 20)}}).save_to_path({str(tmp_path / "ckpt")!r})
        print("saved", file=sys.stderr)
        """
    )
    env = {key: value for key, value in os.environ.items() if key != _progress.ENV_VAR}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "saved\n"


# --------------------------------------------------------------------------- control


@pytest.mark.parametrize(
    ("argument", "setting"),
    [(False, None), (None, "0"), (None, "off"), (None, "FALSE"), (False, "1")],
)
def test_progress_false_or_the_environment_turn_bars_off_on_a_terminal(
    terminal: Terminal,
    no_delay: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argument: bool | None,
    setting: str | None,
) -> None:
    if setting is not None:
        monkeypatch.setenv(_progress.ENV_VAR, setting)
    tree = big_tree(4)

    with terminal:
        path = tree.save_to_path(tmp_path / "ckpt", progress=argument)
        tree.restore_from_path(path, progress=argument)
        ckptable.verify_checkpoint(path, progress=argument)

    assert terminal.output() == ""


@pytest.mark.parametrize(
    ("argument", "setting"),
    [(True, None), (None, "1"), (None, " on "), (None, "true"), (True, "0"), (True, "off")],
)
def test_progress_true_or_the_environment_turn_bars_on_off_a_terminal(
    log_file: LogFile,
    no_delay: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argument: bool | None,
    setting: str | None,
) -> None:
    if setting is not None:
        monkeypatch.setenv(_progress.ENV_VAR, setting)
    tree = big_tree(4)

    with log_file:
        path = tree.save_to_path(tmp_path / "ckpt", progress=argument)
        tree.restore_from_path(path, progress=argument)

    written = log_file.output()
    assert "Saving: " in written and "Restoring: 100%" in written, written
    assert "B/s]" in written


def test_auto_in_the_environment_is_the_default(
    terminal: Terminal, no_delay: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(_progress.ENV_VAR, "auto")
    with terminal:
        small_tree().save_to_path(tmp_path / "ckpt")
    assert "Saving: " in terminal.output()


def test_an_unknown_environment_value_warns_and_means_auto(
    terminal: Terminal, no_delay: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(_progress.ENV_VAR, "sometimes")

    with (
        terminal,
        pytest.warns(UserWarning, match=r"CKPTABLE_PROGRESS='sometimes'.*1/on/true"),
    ):
        small_tree().save_to_path(tmp_path / "ckpt")

    assert "Saving: " in terminal.output()  # auto, on a terminal


def test_a_bad_progress_argument_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        small_tree().save_to_path(tmp_path / "ckpt", progress="yes")  # type: ignore[arg-type]
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        RayObjectStoreTransfer(progress=1)  # type: ignore[arg-type]


def test_without_tqdm_auto_is_silent_and_progress_true_says_what_to_install(
    terminal: Terminal, no_delay: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    tree = small_tree()

    with terminal:
        path = tree.save_to_path(tmp_path / "ckpt")  # auto, on a terminal: no bar, no error
        tree.restore_from_path(path)
        with pytest.raises(ImportError, match=re.escape("pip install 'ckptable[progress]'")):
            tree.save_to_path(tmp_path / "other", progress=True)
        monkeypatch.setenv(_progress.ENV_VAR, "1")
        with pytest.warns(UserWarning, match=re.escape("pip install 'ckptable[progress]'")):
            tree.save_to_path(tmp_path / "ckpt")

    assert not (tmp_path / "other").exists()
    assert terminal.output() == ""


# --------------------------------------------------------------------------- counting


def test_verify_convert_and_from_checkpoint_count_every_byte_once(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = big_model(16).save_to_path(tmp_path / "ckpt", progress=False)
    size = checkpoint_bytes(path)
    assert bars == []

    with log_file:
        report = ckptable.verify_checkpoint(path, progress=True)
        Model.from_checkpoint(path, progress=True)
        ckptable.convert_checkpoint(path, tmp_path / "msgpack", format="msgpack", progress=True)
        Model.from_checkpoint(tmp_path / "msgpack", progress=True)

    converted = checkpoint_bytes(tmp_path / "msgpack")
    assert bars == [
        {"desc": "Verifying", "n": size, "total": size},
        {"desc": "Restoring", "n": size, "total": size},
        # A conversion verifies the source, then counts it as it reads it.
        {"desc": "Verifying", "n": size, "total": size},
        {"desc": "Converting", "n": size, "total": size},
        {"desc": "Restoring", "n": converted, "total": converted},
    ]
    assert report.bytes == size
    assert "Converting: 100%" in log_file.output()


@pytest.mark.parametrize("verify", [True, False])
def test_safetensors_levels_count_every_byte_once(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path, verify: bool
) -> None:
    """Big tensors of a safetensors file are read around the counting stream (parallel
    reads of its file descriptor): they are counted all the same, once."""
    path = big_tree(32).save_to_path(tmp_path / "ckpt", format="safetensors", progress=False)
    size = checkpoint_bytes(path)
    with log_file:
        big_tree(1).restore_from_path(path, verify=verify, progress=True)
        ckptable.convert_checkpoint(path, tmp_path / "pickled", format="cloudpickle", progress=True)
    if verify:
        assert bars[0] == {"desc": "Restoring", "n": size, "total": size}
    else:  # no manifests read: no total, and what is decoded is counted
        tensors = sum(file.stat().st_size for file in Path(path).rglob("state.safetensors"))
        assert bars[0]["desc"] == "Restoring" and bars[0]["total"] is None
        assert tensors <= bars[0]["n"] <= size
    assert bars[-1] == {"desc": "Converting", "n": size, "total": size}


def test_manifests_record_the_bytes_of_their_trees(tmp_path: Path) -> None:
    """The totals come from one file: each manifest records the bytes of its tree."""
    path = big_tree(4).save_to_path(tmp_path / "ckpt")
    storage = LocalStorage()
    for directory in (path, f"{path}/small", f"{path}/small/leaf", f"{path}/leaf0"):
        assert manifest_tree_bytes(storage, directory) == checkpoint_bytes(directory)


def test_a_partial_restore_counts_the_component_s_tree(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    tree = big_tree(4)
    path = tree.save_to_path(tmp_path / "ckpt", progress=False)
    component = Path(path) / "small"

    with log_file:
        tree.restore_from_path(component, component="small", progress=True)

    size = checkpoint_bytes(component)
    assert bars == [{"desc": "Restoring", "n": size, "total": size}]


def test_a_checkpoint_without_manifests_counts_what_is_decoded(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    """``verify=False`` (and RLlib's checkpoints, which have no manifests): no total; the
    state files count as they are decoded."""
    tree = big_tree(8)
    path = tree.save_to_path(tmp_path / "ckpt", progress=False)
    state_files = sum(p.stat().st_size for p in Path(path).rglob("state.pkl"))

    with log_file:
        tree.restore_from_path(path, verify=False, progress=True)

    assert bars == [{"desc": "Restoring", "n": state_files, "total": None}]


class Overriding(Node):
    """Saves through its own ``save_to_path`` (a file of its own around ckptable's)."""

    def save_to_path(self, path: Any = None, **kwargs: Any) -> Any:
        result = super().save_to_path(path, **kwargs)
        with open(os.path.join(str(result), "notes.txt"), "wb") as notes:
            notes.write(b"n" * 5000)
        return result

    def restore_from_path(self, path: Any, **kwargs: Any) -> None:
        super().restore_from_path(path, **kwargs)


def test_nested_components_feed_the_one_bar_of_the_outermost_save(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    inner = Overriding({"deep": Leaf(MiB)})
    tree = Overriding({"inner": inner, "plain": Leaf(MiB)})
    restored = Overriding({"inner": Overriding({"deep": Leaf(MiB)}), "plain": Leaf(MiB)})

    with log_file:
        path = tree.save_to_path(tmp_path / "ckpt", progress=True)
        restored.restore_from_path(path, progress=True)

    size = checkpoint_bytes(path)
    assert (Path(path) / "inner" / "notes.txt").stat().st_size == 5000  # counted too
    assert bars == [
        {"desc": "Saving", "n": size, "total": None},
        {"desc": "Restoring", "n": size, "total": size},
    ]
    assert "Saving: " in log_file.output()


class Boom(Exception):
    """Raised while a state is being written."""


class Exploding:
    """Fails to pickle: after the arrays before it were written."""

    error = Boom("no pickling me")

    def __reduce__(self) -> Any:
        raise self.error


def test_a_failing_save_or_restore_closes_its_bar_and_its_exception_passes_unchanged(
    terminal: Terminal, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    tree = big_tree(32)
    state = tree.get_state()
    state["leaf3"]["steps"] = Exploding()

    with terminal, pytest.raises(Boom) as info:
        tree.save_to_path(tmp_path / "ckpt", state=state)

    assert info.value is Exploding.error
    assert not (tmp_path / "ckpt").exists()
    assert len(tqdm.tqdm._instances) == 0  # nothing left open
    assert len(bars) == 1 and bars[0]["desc"] == "Saving" and bars[0]["n"] >= 24 * MiB
    # A failing restore too.
    path = tree.save_to_path(tmp_path / "ckpt", progress=False)
    state_file = Path(path) / "leaf2" / "state.pkl"
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 1
    state_file.write_bytes(bytes(data))
    with terminal, pytest.raises(ckptable.CorruptCheckpointError, match="leaf2"):
        tree.restore_from_path(path)
    assert len(tqdm.tqdm._instances) == 0
    assert [bar["desc"] for bar in bars] == ["Saving", "Restoring"]
    shown = terminal.output()
    assert "Saving: " in shown and "Restoring: " in shown and shown.endswith("\n")


class Meeting(Node):
    """Waits in ``get_state`` until the other save is in progress too."""

    both_saving = threading.Barrier(2, timeout=30)
    #: Name → the progress bar its save counted in.
    seen: dict[str, Any] = {}

    def get_state(self, *args: Any, **kwargs: Any) -> Any:
        self.seen[self.name] = _progress.current()
        self.both_saving.wait()
        return super().get_state(*args, **kwargs)


def test_two_saves_in_two_threads_get_a_bar_each(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    Meeting.both_saving.reset()
    Meeting.seen.clear()
    seen = Meeting.seen
    trees = {
        "one": Meeting({"leaf": Leaf(MiB)}, name="one"),
        "two": Meeting({"leaf": Leaf(3 * MiB)}, name="two"),
    }
    errors: list[BaseException] = []

    def save(name: str) -> None:
        try:
            trees[name].save_to_path(tmp_path / name, progress=True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(name,)) for name in trees]
    with log_file:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert errors == []
    assert seen["one"] is not None and seen["two"] is not None
    assert seen["one"] is not seen["two"]
    assert sorted(bar["n"] for bar in bars) == sorted(
        checkpoint_bytes(tmp_path / name) for name in trees
    )
    assert [bar["desc"] for bar in bars] == ["Saving", "Saving"]
    assert _progress.current() is None  # nothing leaked into this thread


def test_an_async_save_gets_its_own_bar_beside_the_caller_s_restore(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    tree = big_tree(8)
    path = tree.save_to_path(tmp_path / "first", progress=False)

    with log_file:
        # The background save starts inside the caller's restore, and still gets a bar.
        with _progress.progress_bar(True, "Caller"):
            future = ckptable.save_async(tree, tmp_path / "async", progress=True)
            tree.restore_from_path(path, progress=True)  # counts in "Caller"
        future.result(timeout=60)

    saved = checkpoint_bytes(tmp_path / "async")
    assert sorted((bar["desc"], bar["n"]) for bar in bars) == [
        ("Caller", checkpoint_bytes(path)),
        ("Saving", saved),
    ]


def test_a_local_copy_transfer_called_directly_has_a_bar(
    log_file: LogFile, no_delay: None, bars: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = big_tree(4).save_to_path(tmp_path / "ckpt", progress=False)

    with log_file:
        LocalCopyTransfer(progress=True).transfer("node", path, "node", str(tmp_path / "copy"))

    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    assert bars == [{"desc": "Transferring", "n": size, "total": size}]
    assert "Transferring: 100%" in log_file.output()
    assert LocalCopyTransfer(progress=True) != LocalCopyTransfer()


# --------------------------------------------------------------------------- Ray


class SlowReader(RayObjectStoreTransfer):
    """Reads its chunks slowly (in the reader task), so the driver sees them arrive."""

    def _read_source(self, src_path: str, algorithm: str) -> Iterator[Any]:
        for item in super()._read_source(src_path, algorithm):
            yield item
            time.sleep(0.05)


def test_a_transfer_between_two_nodes_shows_its_bytes_as_they_arrive(
    ray_cluster: RayCluster,
    log_file: LogFile,
    no_delay: None,
    bars: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "big.bin").write_bytes(os.urandom(20 * MiB + 123))
    for index in range(10):
        (source / "sub" / f"{index}.bin").write_bytes(os.urandom(index * 1000))
    size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    worker_a, worker_b = ray_cluster.worker_node_ids
    hook = SlowReader(chunk_bytes=MiB, progress=True)

    with log_file:
        hook.transfer(worker_a, str(source), worker_b, str(tmp_path / "copy"))

    assert (tmp_path / "copy" / "big.bin").read_bytes() == (source / "big.bin").read_bytes()
    assert bars == [{"desc": "Transferring", "n": size, "total": size}]
    # The driver showed the bytes while they arrived, not only at the end.
    shown = log_file.output()
    percentages = {int(p) for p in re.findall(r"(\d+)%\|", shown)}
    assert percentages & set(range(1, 100)), shown
    assert 100 in percentages


def test_actor_components_count_their_transfers_in_the_save_s_and_restore_s_bar(
    ray_cluster: RayCluster,
    log_file: LogFile,
    no_delay: None,
    bars: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    worker = ray_cluster.worker_node_ids[0]
    algo = Algo("ckptable", (worker,))
    try:
        foreach(algo.runners, lambda actor: actor.fill_payload(6 * MiB))
        with log_file:
            path = algo.save_to_path(tmp_path / "ckpt", progress=True)
            algo.restore_from_path(path, progress=True)
    finally:
        algo.kill_actors()

    size = checkpoint_bytes(path)
    # A transfer moves every file, the manifests too.
    moved = sum(p.stat().st_size for p in (Path(path) / "runners").rglob("*") if p.is_file())
    assert moved > 6 * MiB
    assert bars == [
        # The actor's tree arrived by a transfer, and counts once.
        {"desc": "Saving", "n": size, "total": None},
        # Read and verified here, then moved to the actor's node.
        {"desc": "Restoring", "n": size + moved, "total": size + moved},
    ]
