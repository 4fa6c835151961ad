"""Versioned state: ``STATE_VERSION`` is recorded; older states go through ``upgrade_state``
before any ``set_state``; newer ones are refused with both versions named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ckptable import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from helpers import StateHolder, reseal


class Versioned(StateHolder):
    """Version 1 stored ``{"weights": [...]}``; version 2 stores ``{"w": [...], "n": len}``."""

    STATE_VERSION = 2

    def __init__(self, children: dict[str, Versioned] | None = None) -> None:
        super().__init__()
        self.children = children or {}
        self.upgrades: list[int] = []

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.children.items())

    def upgrade_state(self, state: dict, from_version: int) -> dict:
        self.upgrades.append(from_version)
        if from_version == 1:
            weights = state.pop("weights")
            state = {**state, "w": weights, "n": len(weights)}
        return state


def save_as_version(
    monkeypatch: pytest.MonkeyPatch, obj: Versioned, path: Path, version: int
) -> None:
    """Save ``obj`` as the code at ``version`` would have."""
    with monkeypatch.context() as patch:
        patch.setattr(Versioned, "STATE_VERSION", version)
        obj.save_to_path(path)


def old_tree() -> Versioned:
    tree = Versioned({"child": Versioned()})
    tree.state = {"weights": [1, 2, 3]}
    tree.children["child"].state = {"weights": [4]}
    return tree


def test_the_state_version_is_recorded(tmp_path: Path) -> None:
    Versioned().save_to_path(tmp_path / "ckpt")
    metadata = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())
    assert metadata["ckptable"]["state_version"] == 2


def test_an_older_state_is_upgraded_at_every_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_as_version(monkeypatch, old_tree(), tmp_path / "ckpt", 1)
    restored = Versioned({"child": Versioned()})

    restored.restore_from_path(tmp_path / "ckpt")

    assert restored.state == {"w": [1, 2, 3], "n": 3}
    assert restored.children["child"].state == {"w": [4], "n": 1}
    assert restored.upgrades == [1] and restored.children["child"].upgrades == [1]


def test_a_current_state_is_not_upgraded(tmp_path: Path) -> None:
    tree = Versioned()
    tree.state = {"w": [1], "n": 1}
    tree.save_to_path(tmp_path / "ckpt")
    restored = Versioned()
    restored.restore_from_path(tmp_path / "ckpt")
    assert restored.upgrades == [] and restored.state == {"w": [1], "n": 1}


def test_from_checkpoint_and_a_partial_restore_upgrade_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_as_version(monkeypatch, old_tree(), tmp_path / "ckpt", 1)

    assert Versioned.from_checkpoint(tmp_path / "ckpt").state == {"w": [1, 2, 3], "n": 3}
    partial = Versioned({"child": Versioned()})
    partial.restore_from_path(tmp_path / "ckpt" / "child", component="child")
    assert partial.children["child"].state == {"w": [4], "n": 1}


def test_a_newer_state_is_refused_naming_both_versions_and_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = Versioned({"child": Versioned()})
    save_as_version(monkeypatch, tree, tmp_path / "ckpt", 2)
    with monkeypatch.context() as patch:
        patch.setattr(Versioned, "STATE_VERSION", 3)
        Versioned().save_to_path(tmp_path / "ckpt" / "child")  # only the child is newer
    reseal(tmp_path / "ckpt")
    target = Versioned({"child": Versioned()})
    target.state = {"untouched": True}

    with pytest.raises(IncompatibleCheckpointError, match=r"version 3.*version 2") as info:
        target.restore_from_path(tmp_path / "ckpt")

    assert "child" in str(info.value.path)
    assert target.state == {"untouched": True} and target.children["child"].state == {}


def test_a_failing_upgrade_leaves_the_whole_tree_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = old_tree()
    tree.state = {"no_weights": 1}  # the root's upgrade will fail with a KeyError
    save_as_version(monkeypatch, tree, tmp_path / "ckpt", 1)
    target = Versioned({"child": Versioned()})

    with pytest.raises(IncompatibleCheckpointError, match=r"from state version 1 to 2") as info:
        target.restore_from_path(tmp_path / "ckpt")

    assert isinstance(info.value.__cause__, KeyError)
    assert target.state == {} and target.children["child"].state == {}


def test_a_class_that_raised_its_version_without_an_upgrade_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_as_version(monkeypatch, old_tree(), tmp_path / "ckpt", 1)
    monkeypatch.delattr(Versioned, "upgrade_state")
    with pytest.raises(IncompatibleCheckpointError, match=r"version 1 .* version 2 .*upgrade"):
        Versioned({"child": Versioned()}).restore_from_path(tmp_path / "ckpt")


def test_an_upgrade_must_return_a_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_as_version(monkeypatch, old_tree(), tmp_path / "ckpt", 1)
    monkeypatch.setattr(Versioned, "upgrade_state", lambda self, state, version: None)
    with pytest.raises(CheckpointError, match="returned NoneType"):
        Versioned({"child": Versioned()}).restore_from_path(tmp_path / "ckpt")


def test_checkpoints_without_a_recorded_version_count_as_version_1(tmp_path: Path) -> None:
    """RLlib records no version: its checkpoints are upgraded from version 1."""
    from ray.rllib.utils.checkpoints import Checkpointable as RLlibCheckpointable

    class Old(RLlibCheckpointable):
        def get_state(self, components: Any = None, *, not_components: Any = None, **k: Any):
            return {"weights": [9, 9]}

        def set_state(self, state: dict) -> None:
            pass

        def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
            return (), {}

    Old().save_to_path(str(tmp_path / "rllib"))
    restored = Versioned()
    with pytest.warns(UserWarning, match="no ckptable manifest"):
        restored.restore_from_path(tmp_path / "rllib")
    assert restored.state == {"w": [9, 9], "n": 2} and restored.upgrades == [1]


@pytest.mark.parametrize("version", [0, "2", 1.5, True])
def test_a_bad_declared_version_is_refused_on_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: Any
) -> None:
    monkeypatch.setattr(Versioned, "STATE_VERSION", version)
    with pytest.raises(CheckpointError, match="STATE_VERSION"):
        Versioned().save_to_path(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_bad_recorded_version_is_corrupt(tmp_path: Path) -> None:
    Versioned().save_to_path(tmp_path / "ckpt")
    metadata_file = tmp_path / "ckpt" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["ckptable"]["state_version"] = "two"
    metadata_file.write_text(json.dumps(metadata))
    reseal(tmp_path / "ckpt")
    with pytest.raises(CorruptCheckpointError, match="state version 'two'"):
        Versioned().restore_from_path(tmp_path / "ckpt")
