"""A ``set_state`` that raises part-way: the error names the level, and rollback=True
gives every level already set its previous state back."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.trees import Leaf, Node, blank_three_level_tree, three_level_tree

from ckptable import CheckpointError, SetStateError


class Failing(Leaf):
    """A leaf whose ``set_state`` changes part of its state, then raises on the states
    the tests save (``steps`` not 0); its own previous states it takes back."""

    def set_state(self, state: dict) -> None:
        self.steps = state["steps"]
        if state["steps"] not in (0, 5):
            raise KeyError("missing_key")
        self.weights = np.asarray(state["weights"])


def _tree_with_failing_head() -> Node:
    encoder = Node({"a": Leaf(3), "b": Leaf(5)}, name="encoder")
    return Node({"encoder": encoder, "head": Failing(2)}, name="root")


def _snapshot(root: Node) -> dict[str, Any]:
    encoder = root.children["encoder"]
    return {
        "root": (dict(root.config), root.name),
        "encoder": (dict(encoder.config), encoder.name),
        "a": (encoder.children["a"].weights.copy(), encoder.children["a"].steps),
        "b": (encoder.children["b"].weights.copy(), encoder.children["b"].steps),
        "head": (root.children["head"].weights.copy(), root.children["head"].steps),
    }


def _assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for key in actual:
        for got, want in zip(actual[key], expected[key], strict=True):
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(got, want)
            else:
                assert got == want, key


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    tree = three_level_tree()
    tree.save_to_path(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_a_failing_set_state_names_the_level_class_and_version(saved: Path) -> None:
    target = _tree_with_failing_head()
    with pytest.raises(SetStateError) as caught:
        target.restore_from_path(saved)
    error = caught.value
    assert error.component == "head"
    assert error.class_name == f"{Failing.__module__}.Failing"
    assert isinstance(error.__cause__, KeyError)
    message = str(error)
    assert "component 'head'" in message
    assert "Failing.set_state" in message
    assert "state version 1" in message
    assert "missing_key" in message
    # Without rollback the message says truthfully what was left restored.
    assert "partly restored" in message and "rollback=True" in message
    assert not error.rolled_back
    assert target.children["encoder"].children["a"].steps == 11  # applied, and said so


def test_rollback_gives_every_applied_level_its_previous_state(saved: Path) -> None:
    target = _tree_with_failing_head()
    target.children["encoder"].children["a"].steps = 99
    target.children["encoder"].config["lr"] = 0.01
    target.children["head"].steps = 5
    before = _snapshot(target)
    with pytest.raises(SetStateError) as caught:
        target.restore_from_path(saved, rollback=True)
    assert caught.value.rolled_back
    assert "given back" in str(caught.value)
    _assert_same(_snapshot(target), before)


def test_rollback_of_a_failing_root_restores_the_children(saved: Path) -> None:
    class BadRoot(Node):
        def set_state(self, state: dict) -> None:
            self.name = "half-set"
            if state["config"]["lr"] == 0.5:  # the saved one
                raise RuntimeError("root refuses")
            super().set_state(state)

    encoder = Node({"a": Leaf(3), "b": Leaf(5)}, name="encoder")
    target = BadRoot({"encoder": encoder, "head": Leaf(2)}, name="root")
    before = _snapshot(target)
    with pytest.raises(SetStateError, match="the root level") as caught:
        target.restore_from_path(saved, rollback=True)
    assert caught.value.component is None
    assert isinstance(caught.value.__cause__, RuntimeError)
    _assert_same(_snapshot(target), before)


def test_rollback_copies_states_that_get_state_hands_out_live(saved: Path) -> None:
    """``get_state`` returning the object's own dict (changed in place by ``set_state``)
    must not defeat the rollback."""

    class Live(Leaf):
        def __init__(self, size: int = 4, *, scale: float = 1.0) -> None:
            super().__init__(size, scale=scale)
            self.state = {"weights": self.weights, "steps": 0}

        def get_state(self, *args: Any, **kw: Any) -> dict:
            return self.state

        def set_state(self, state: dict) -> None:
            self.state.update(state)

    encoder = Node({"a": Live(3), "b": Leaf(5)}, name="encoder")
    target = Node({"encoder": encoder, "head": Failing(2)}, name="root")
    with pytest.raises(SetStateError):
        target.restore_from_path(saved, rollback=True)
    assert encoder.children["a"].state["steps"] == 0


def test_a_late_component_that_fails_is_named(tmp_path: Path) -> None:
    """A component created by the parent's ``set_state`` fails: named, rolled back."""
    from tests.trees import Growing

    grown = Growing()
    grown.set_state({"names": ["x"]})
    grown.leaves["x"].steps = 3
    grown.save_to_path(tmp_path / "g")

    class FailingGrowing(Growing):
        def set_state(self, state: dict) -> None:
            for key in state["names"]:
                self.leaves.setdefault(key, Failing())

    with pytest.raises(SetStateError, match="component 'x'") as caught:
        FailingGrowing().restore_from_path(tmp_path / "g", rollback=True)
    assert caught.value.rolled_back


def test_set_state_error_pickles_with_its_attributes(saved: Path) -> None:
    target = _tree_with_failing_head()
    with pytest.raises(SetStateError) as caught:
        target.restore_from_path(saved, rollback=True)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value)
    assert copy.component == "head"
    assert copy.class_name == caught.value.class_name
    assert copy.rolled_back


def test_a_failing_get_state_under_rollback_sets_nothing(saved: Path) -> None:
    class NoGet(Leaf):
        def get_state(self, *args: Any, **kw: Any) -> dict:
            raise RuntimeError("cannot read")

    encoder = Node({"a": Leaf(3), "b": Leaf(5)}, name="encoder")
    target = Node({"encoder": encoder, "head": NoGet(2)}, name="root")
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match="get_state"):
        target.restore_from_path(saved, rollback=True)
    _assert_same(_snapshot(target), before)


class WithFailingHead(Node):
    """Builds its own components, so ``from_checkpoint`` rebuilds the whole tree."""

    def __init__(self) -> None:
        super().__init__({"head": Failing(2)}, name="holder")

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


def test_from_checkpoint_names_the_failing_level(tmp_path: Path) -> None:
    tree = WithFailingHead()
    tree.children["head"].steps = 7
    tree.save_to_path(tmp_path / "failing")
    with pytest.raises(SetStateError, match="component 'head'"):
        WithFailingHead.from_checkpoint(tmp_path / "failing")


def test_a_successful_restore_with_rollback_is_a_normal_restore(saved: Path) -> None:
    target = blank_three_level_tree()
    target.restore_from_path(saved, rollback=True)
    assert target.children["encoder"].children["a"].steps == 11
    assert target.children["head"].steps == 13


# --------------------------------------------------------------------------- deep trees


def _chain(depth: int) -> Node:
    root = Node({}, name="n0")
    current = root
    for i in range(1, depth):
        current.children["c"] = current = Node({}, name=f"n{i}")
    return root


@pytest.fixture
def deep_dir(tmp_path: Path) -> Any:
    yield tmp_path
    from ckptable._storage import LocalStorage

    # shutil.rmtree (and pytest's clean-up of old temporary directories) recurse once
    # per level; the library's removal does not.
    for entry in list(tmp_path.iterdir()):
        LocalStorage().remove_tree(str(entry))


def test_a_tree_too_deep_to_save_fails_cleanly(deep_dir: Path) -> None:
    tmp_path = deep_dir
    with pytest.raises(CheckpointError, match="too deeply.*Nothing was published"):
        _chain(1500).save_to_path(tmp_path / "deep")
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_too_deep_to_restore_fails_cleanly(deep_dir: Path) -> None:
    tmp_path = deep_dir
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        _chain(1500).save_to_path(tmp_path / "deep")
    finally:
        sys.setrecursionlimit(limit)
    target = _chain(1500)
    target.name = "untouched"
    with pytest.raises(CheckpointError, match="too deeply"):
        target.restore_from_path(tmp_path / "deep")
    assert target.name == "untouched"


def test_a_tree_deeper_than_the_recursion_limit_is_removed(tmp_path: Path) -> None:
    """Replacing or cleaning up such a tree removes it (shutil.rmtree recurses)."""
    from ckptable._storage import LocalStorage

    deep = tmp_path / "deep"
    deep.mkdir()
    current = deep
    for _ in range(1500):
        current = current / "c"
        current.mkdir()  # one level at a time: mkdir(parents=True) recurses
    (current / "state.pkl").write_bytes(b"x")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    os.symlink(outside, deep / "c" / "link")

    LocalStorage().remove_tree(str(deep))

    assert os.listdir(tmp_path) == ["outside.txt"]
    assert outside.read_text() == "keep"
