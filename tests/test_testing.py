"""``ckptable.testing``: ``assert_states_equal`` and ``roundtrip``, without pytest."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptable import Checkpointable, CheckpointNotFoundError, UnknownComponentError
from ckptable.testing import assert_states_equal, roundtrip


class Leaf(Checkpointable):
    """Weights and a tuple of settings; ``forget`` names a key ``set_state`` drops."""

    def __init__(self, size: int = 3, forget: str | None = None) -> None:
        self.size, self.forget = size, forget
        self.weights = np.zeros(size, dtype=np.float32)
        self.settings: Any = (1, 2)

    def get_state(
        self,
        components: str | Collection[str] | None = None,
        *,
        not_components: str | Collection[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return {"weights": self.weights.copy(), "settings": self.settings}

    def set_state(self, state: dict[str, Any]) -> None:
        if self.forget != "weights":
            self.weights = np.array(state["weights"])
        if self.forget != "settings":
            self.settings = state["settings"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.size,), {"forget": self.forget}


class Tree(Checkpointable):
    """``a`` (a Leaf), ``b`` (a Tree of one Leaf ``c``) and a step counter."""

    def __init__(self, depth: int = 1, forget: str | None = None) -> None:
        self.depth, self.forget = depth, forget
        self.steps = 0
        self.children: dict[str, Any] = {"a": Leaf(forget=forget)}
        if depth:
            self.children["b"] = Tree(depth - 1)
            del self.children["b"].children["a"]
            self.children["b"].children["c"] = Leaf(4)

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.children.items())

    def get_state(
        self,
        components: str | Collection[str] | None = None,
        *,
        not_components: str | Collection[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps}
        state.update((name, child.get_state()) for name, child in self.children.items())
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.steps = state.get("steps", self.steps)
        for name, child in self.children.items():
            if name in state:
                child.set_state(state[name])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.depth,), {"forget": self.forget}


def trained(forget: str | None = None) -> Tree:
    tree = Tree(forget=forget)
    tree.steps = 7
    tree.children["a"].weights[:] = [1.0, 2.0, 3.0]
    tree.children["a"].settings = (5, 6)
    tree.children["b"].children["c"].weights[1] = 9.0
    return tree


# assert_states_equal


def test_equal_states_pass() -> None:
    state = {"w": np.arange(4.0), "n": [1, (2, 3)], "x": np.nan}
    assert_states_equal({"w": np.arange(4.0), "n": [1, [2, 3]], "x": np.nan}, state)


def test_message_lists_every_difference_one_per_line() -> None:
    with pytest.raises(AssertionError) as raised:
        assert_states_equal({"a": 1, "w": np.array([1.0, 5.0])}, {"w": np.ones(2), "b": 2})
    assert str(raised.value) == (
        "state differs from the expected state in 3 places:\n"
        "  state['b']: only in expected: 2\n"
        "  state['a']: only in actual: 1\n"
        "  state['w']: 1 of 2 elements differ, max abs diff 4.0 "
        "(first at index (1,): 5.0 != 1.0)"
    )


def test_one_difference_and_where_and_msg() -> None:
    with pytest.raises(AssertionError) as raised:
        assert_states_equal([1], [2], where="weights", msg="After the restore:")
    assert str(raised.value) == (
        "After the restore:\n"
        "weights differs from the expected state in 1 place:\n"
        "  weights[0]: 1 != 2 (abs diff 1)"
    )


def test_max_differences_cuts_the_list_and_says_so() -> None:
    actual, expected = list(range(30)), [-1] * 30
    with pytest.raises(AssertionError) as raised:
        assert_states_equal(actual, expected, max_differences=5)
    lines = str(raised.value).splitlines()
    assert (
        lines[0]
        == "state differs from the expected state in more than 5 places (the first 5 shown):"
    )
    assert len(lines) == 6
    with pytest.raises(AssertionError) as everything:
        assert_states_equal(actual, expected, max_differences=None)
    assert len(str(everything.value).splitlines()) == 31
    with pytest.raises(AssertionError) as exactly:
        assert_states_equal(actual[:5], expected[:5], max_differences=5)
    assert str(exactly.value).splitlines()[0].endswith("in 5 places:")


def test_same_types_and_tolerances_are_passed_on() -> None:
    assert_states_equal([1.0], (1.0,))
    with pytest.raises(AssertionError, match=r"state: type list != tuple"):
        assert_states_equal([1.0], (1.0,), same_types=True)
    assert_states_equal(np.array([1.0 + 1e-9]), np.array([1.0]), rtol=1e-6)
    assert_states_equal(1.0 + 1e-9, 1.0, atol=1e-6)
    with pytest.raises(AssertionError):
        assert_states_equal(np.array([1.0 + 1e-9]), np.array([1.0]))


def test_usable_without_pytest(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["pytest"] = None  # any import of pytest now fails
        import numpy as np
        from ckptable.testing import assert_states_equal, roundtrip
        from ckptable import Checkpointable

        class Counter(Checkpointable):
            def __init__(self):
                self.count = np.zeros(2)
            def get_state(self, components=None, *, not_components=None, **kwargs):
                return {"count": self.count}
            def set_state(self, state):
                self.count = state["count"]
            def get_ctor_args_and_kwargs(self):
                return (), {}

        counter = Counter()
        counter.count[1] = 3
        assert roundtrip(counter, sys.argv[1]).count[1] == 3
        try:
            assert_states_equal({"a": np.ones(2)}, {"a": np.zeros(2)})
        except AssertionError as error:
            print(error)
        assert "_pytest" not in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        pytest.fail(result.stderr)
    assert "state['a']: 2 of 2 elements differ" in result.stdout


# roundtrip


def test_roundtrip_returns_an_equal_new_object(tmp_path: Path) -> None:
    tree = trained()
    new = roundtrip(tree, tmp_path / "ckpt")
    assert new is not tree
    assert isinstance(new, Tree)
    assert new.steps == 7
    assert new.children["a"].settings == (5, 6)
    assert (tmp_path / "ckpt" / "a" / "state.pkl").is_file()


def test_roundtrip_fails_naming_the_key_set_state_forgot(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as raised:
        roundtrip(trained(forget="settings"), tmp_path / "ckpt")
    assert str(raised.value).splitlines() == [
        f"Roundtrip of {__name__}.Tree through {tmp_path / 'ckpt'} (format: default): "
        "the restored state is not the saved one.",
        "state differs from the expected state in 2 places:",
        "  state['a']['settings'][0]: 1 != 5 (abs diff 4)",
        "  state['a']['settings'][1]: 2 != 6 (abs diff 4)",
    ]


def test_roundtrip_in_msgpack(tmp_path: Path) -> None:
    new = roundtrip(trained(), tmp_path / "ckpt", format="msgpack")
    assert (tmp_path / "ckpt" / "a" / "state.msgpack").is_file()
    assert new.children["a"].settings == [5, 6]  # msgpack has no tuples


def test_roundtrip_in_msgpack_with_same_types_names_the_tuples(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as raised:
        roundtrip(trained(), tmp_path / "ckpt", format="msgpack", same_types=True)
    assert "(format: msgpack)" in str(raised.value)
    assert "state['a']['settings']: type list != tuple" in str(raised.value)
    assert "state['b']['c']['settings']: type list != tuple" in str(raised.value)


def test_roundtrip_with_use_msgpack(tmp_path: Path) -> None:
    roundtrip(trained(), tmp_path / "ckpt", use_msgpack=True)
    assert (tmp_path / "ckpt" / "state.msgpack").is_file()


def test_roundtrip_of_one_component_restores_only_it(tmp_path: Path) -> None:
    new = roundtrip(trained(), tmp_path / "ckpt", components="a")
    assert new.children["a"].settings == (5, 6)
    assert new.steps == 0  # the root's own state was not restored
    assert new.children["b"].children["c"].weights[1] == 0.0


def test_roundtrip_of_nested_and_several_components(tmp_path: Path) -> None:
    new = roundtrip(trained(), tmp_path / "ckpt", components=["b/c", "a"])
    assert new.children["b"].children["c"].weights[1] == 9.0
    assert new.children["a"].weights.tolist() == [1.0, 2.0, 3.0]
    assert new.steps == 0


def test_partial_roundtrip_checks_only_the_selected_components(tmp_path: Path) -> None:
    # "a" forgets its settings, but only b/c is restored and compared.
    roundtrip(trained(forget="settings"), tmp_path / "ok", components="b/c")
    with pytest.raises(AssertionError) as raised:
        roundtrip(trained(forget="settings"), tmp_path / "bad", components="a")
    assert "components: a)" in str(raised.value)
    assert "state['a'] differs from the expected state" in str(raised.value)
    assert "state['a']['settings'][0]: 1 != 5" in str(raised.value)


def test_partial_roundtrip_of_an_unknown_component_raises(tmp_path: Path) -> None:
    with pytest.raises((UnknownComponentError, CheckpointNotFoundError)):
        roundtrip(trained(), tmp_path / "ckpt", components="nope")


def test_compare_false_returns_the_object_without_checking(tmp_path: Path) -> None:
    new = roundtrip(trained(forget="settings"), tmp_path / "ckpt", compare=False)
    assert new.children["a"].settings == (1, 2)


def test_restore_kwargs_reach_from_checkpoint(tmp_path: Path) -> None:
    new = roundtrip(trained(), tmp_path / "ckpt", restore_kwargs={"safe": True, "depth": 1})
    assert new.depth == 1
    deeper = roundtrip(Tree(depth=2), tmp_path / "deeper", restore_kwargs={"depth": 2})
    assert deeper.children["b"].depth == 1


class Hidden(Tree):
    """A tree whose ``get_state`` keeps component ``a``'s state under another key."""

    def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().get_state(*args, **kwargs)
        state["renamed"] = state.pop("a")
        return state


def test_partial_roundtrip_needs_the_component_state_under_its_name(tmp_path: Path) -> None:
    hidden = Hidden()
    saved_state = Tree.get_state(hidden)  # saved as usual, compared from get_state()
    with pytest.raises(
        AssertionError, match=r"restored object's get_state\(\) has no state\['a'\]"
    ):
        roundtrip(hidden, tmp_path / "ckpt", components="a", state=saved_state)
