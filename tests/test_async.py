"""Async saves: the state is copied before the call returns; errors surface later."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable import Checkpointable, CheckpointError, CheckpointManager, StateEncodingError
from ckptable._async import _default_pool
from trees import Leaf, Node, Sel


class Held(Checkpointable):
    """A tree whose background save can be held midway: ``get_ctor_args_and_kwargs``
    (called by the save after the state was taken) waits for ``release``."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.weights = np.arange(size, dtype=np.float64)
        self.history: list[int] = [1, 2, 3]
        self.config = {"lr": 0.1}
        self.child = Leaf(4)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("child", self.child)]

    def get_state(self, components: Sel = None, *, not_components: Sel = None, **kw: Any) -> dict:
        # Live references, not copies: what an async save must guard against.
        state: dict[str, Any] = {
            "weights": self.weights,
            "history": self.history,
            "config": self.config,
        }
        if self._check_component("child", components, not_components):
            state["child"] = {"weights": self.child.weights, "steps": self.child.steps}
        return state

    def set_state(self, state: dict) -> None:
        self.weights = state["weights"]
        self.history = state["history"]
        self.config = state["config"]
        if "child" in state:
            self.child.set_state(state["child"])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        self.entered.set()
        if not self.release.wait(timeout=60):
            raise TimeoutError("the test never released the save")
        return (len(self.weights),), {}

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()


def mutate(tree: Held) -> None:
    tree.weights[:] = -1.0
    tree.history.append(99)
    tree.config["lr"] = 5.0
    tree.child.weights[:] = -7.0
    tree.child.steps = 1000


def expected_state(size: int = 1 << 20) -> dict:
    return {
        "weights": np.arange(size, dtype=np.float64),
        "history": [1, 2, 3],
        "config": {"lr": 0.1},
        "child": {"weights": np.arange(4, dtype=np.float32), "steps": 0},
    }


def test_changes_after_the_call_never_reach_the_checkpoint(
    tmp_path: Path, states_equal: Any
) -> None:
    tree = Held()
    tree.hold()

    future = ckptable.save_async(tree, tmp_path / "ckpt")
    assert tree.entered.wait(30)  # the background save is running...
    mutate(tree)  # ...and the caller changes everything in place
    tree.release.set()

    assert future.result(timeout=60) == str(tmp_path / "ckpt")
    restored = Held.from_checkpoint(tmp_path / "ckpt")
    states_equal(restored.get_state(), expected_state())


def test_components_missing_from_their_parents_state_are_taken_at_the_call(
    tmp_path: Path, states_equal: Any
) -> None:
    class Partial(Node):
        """Leaves its children out of its own state (they are asked for theirs)."""

        def get_state(self, components: Sel = None, **kw: Any) -> dict:
            return {"name": self.name}

    leaf = Leaf(3, scale=2.0)
    tree = Partial({"leaf": leaf}, name="p")
    future = ckptable.save_async(tree, tmp_path / "ckpt")
    leaf.weights = leaf.weights + 100  # rebinding after the call
    future.result(timeout=60)

    fresh = Leaf(3)
    fresh.restore_from_path(tmp_path / "ckpt" / "leaf")
    states_equal(fresh.weights, np.arange(3, dtype=np.float32) * 2.0)


def test_the_checkpoint_matches_a_synchronous_save(tmp_path: Path, states_equal: Any) -> None:
    from trees import blank_three_level_tree, three_level_tree

    tree = three_level_tree()
    ckptable.save_async(tree, tmp_path / "async").result(timeout=60)
    tree.save_to_path(tmp_path / "sync")

    def files(name: str) -> set[str]:
        return {str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*")}

    assert files("async") == files("sync")
    restored = {}
    for name in ("async", "sync"):
        ckptable.verify_checkpoint(tmp_path / name)
        restored[name] = blank_three_level_tree()
        restored[name].restore_from_path(tmp_path / name)
    states_equal(restored["async"].get_state(), restored["sync"].get_state())
    states_equal(restored["async"].get_state(), tree.get_state())


def test_save_kwargs_go_through(tmp_path: Path, states_equal: Any) -> None:
    tree = Held(16)
    path = ckptable.save_async(tree, tmp_path / "m", format="msgpack", durable=False).result(60)
    assert (Path(path) / "state.msgpack").exists()
    states_equal(Held.from_checkpoint(path).get_state(), expected_state(16))
    given = {
        "weights": np.zeros(16),
        "history": [],
        "config": {},
        "child": {"weights": np.ones(4), "steps": 1},
    }
    tree.hold()
    future = ckptable.save_async(tree, tmp_path / "s", state=given)
    assert tree.entered.wait(30)
    given["weights"][:] = 3  # the given state is copied too
    tree.release.set()
    path = future.result(60)
    states_equal(Held.from_checkpoint(path).get_state(), {**given, "weights": np.zeros(16)})


def test_unknown_keywords_and_unpicklable_states_fail_in_the_caller(tmp_path: Path) -> None:
    tree = Held(16)
    with pytest.raises(TypeError, match="formt"):
        ckptable.save_async(tree, tmp_path / "x", formt="msgpack")
    tree.config["lock"] = threading.Lock()
    with pytest.raises(StateEncodingError, match=r"state\['config'\]\['lock'\]"):
        ckptable.save_async(tree, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_failing_save_raises_from_result(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    future = ckptable.save_async(Held(16), tmp_path / "file" / "ckpt")
    with pytest.raises(CheckpointError, match="file"):
        future.result(timeout=60)


def test_the_snapshot_memory_is_reused_and_can_be_freed(tmp_path: Path) -> None:
    tree = Held(1 << 21)  # 16 MiB
    ckptable.save_async(tree, tmp_path / "a").result(60)
    assert _default_pool.idle_bytes >= tree.weights.nbytes
    arena = _default_pool._idle[0]
    ckptable.save_async(tree, tmp_path / "b").result(60)
    assert _default_pool._idle == [arena]  # the same memory, used again
    ckptable.release_snapshot_memory()
    assert _default_pool.idle_bytes == 0


def test_the_process_finishes_saves_in_flight_before_it_exits(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ckptable
        from trees import Model
        model = Model(layers=3, width=1 << 18)
        model.epoch = 41
        ckptable.save_async(model, {str(tmp_path / "ckpt")!r})
        print("returned", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    from trees import Model

    ckptable.verify_checkpoint(tmp_path / "ckpt")
    assert Model.from_checkpoint(tmp_path / "ckpt").epoch == 41


# --------------------------------------------------------------------------- the manager


def test_manager_save_async_records_the_step(tmp_path: Path, states_equal: Any) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    tree = Held(64)
    futures = []
    for step in range(4):
        futures.append(manager.save_async(tree, step, {"step": step}))
        tree.history.append(step)
    manager.wait()

    assert [f.result() for f in futures] == [manager.path(s) for s in range(4)]
    assert manager.steps() == [2, 3]
    assert manager.metrics(3) == {"step": 3}
    restored = Held.from_checkpoint(manager.latest())
    assert restored.history == [1, 2, 3, 0, 1, 2]


def test_at_most_one_save_in_flight_unless_asked(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    tree = Held(64)
    tree.hold()
    first = manager.save_async(tree, 1)
    assert tree.entered.wait(30)
    started = threading.Event()
    second: list[concurrent.futures.Future[str]] = []

    def start_second() -> None:
        started.set()
        second.append(manager.save_async(Held(64), 2))

    caller = threading.Thread(target=start_second)
    caller.start()
    assert started.wait(10)
    caller.join(timeout=1.0)
    assert caller.is_alive() and not first.done()  # the second call waits for the first
    tree.release.set()
    caller.join(timeout=60)
    assert not caller.is_alive()
    manager.wait()
    assert first.done() and second[0].done()
    assert manager.steps() == [1, 2]


def test_max_in_flight_two_runs_two_saves_at_once(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_in_flight=2)
    trees = [Held(64), Held(64)]
    for tree in trees:
        tree.hold()
    futures = [manager.save_async(tree, step) for step, tree in enumerate(trees)]
    assert all(tree.entered.wait(30) for tree in trees)  # both running together
    for tree in trees:
        tree.release.set()
    manager.wait()
    assert [f.result() for f in futures] == [manager.path(0), manager.path(1)]


def test_a_failed_async_save_is_raised_by_the_next_save_and_by_wait(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    good = Held(64)

    class Failing(Held):
        def get_metadata(self) -> dict[str, Any]:
            raise RuntimeError("metadata exploded")

    future = manager.save_async(Failing(64), 1)
    with pytest.raises(RuntimeError, match="metadata exploded"):
        future.result(timeout=60)
    with pytest.raises(RuntimeError, match="metadata exploded"):
        manager.save(good, 2)  # raised before this save starts...
    assert manager.steps() == []
    manager.save(good, 2)  # ...once
    assert manager.steps() == [2]

    manager.save_async(Failing(64), 3)
    with pytest.raises(RuntimeError, match="metadata exploded"):
        manager.wait()
    manager.wait()
    manager.save_async(Failing(64), 4)
    concurrent.futures.wait(manager._in_flight)
    with pytest.raises(RuntimeError, match="metadata exploded"):
        manager.save_async(good, 5)
    assert manager.steps() == [2]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000002"]


def test_close_waits_and_frees_the_snapshot_memory(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save_async(Held(1 << 16), 1)
    assert manager.steps() == [1]
    assert manager._pool.idle_bytes == 0
