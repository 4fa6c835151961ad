"""Save and restore of whole trees, single components, given states and constructors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable import Checkpointable
from trees import (
    Growing,
    Leaf,
    Model,
    Node,
    blank_three_level_tree,
    three_level_tree,
    trained_model,
)


def files_under(path: Path) -> set[str]:
    """Files and directories below ``path``, without ckptable's manifests (one per level,
    checked in test_integrity)."""
    return {
        str(p.relative_to(path)) for p in path.rglob("*") if p.name != ".ckptable-manifest.json"
    }


def test_nested_tree_round_trip_restores_every_level(tmp_path: Path, states_equal: Any) -> None:
    tree = three_level_tree()
    tree.save_to_path(tmp_path / "ckpt")

    fresh = blank_three_level_tree()
    fresh.restore_from_path(tmp_path / "ckpt")

    states_equal(fresh.get_state(), tree.get_state())
    assert fresh.children["encoder"].children["b"].steps == 12


def test_each_level_has_rllib_files_and_a_directory_per_component(tmp_path: Path) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt")

    level_files = {"metadata.json", "class_and_ctor_args.pkl", "state.pkl"}
    expected = set(level_files)
    for comp in ("encoder", "head", "encoder/a", "encoder/b"):
        expected |= {comp} | {f"{comp}/{name}" for name in level_files}
    assert files_under(tmp_path / "ckpt") == expected


def test_metadata_records_versions_format_class_and_components(tmp_path: Path) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt", use_msgpack=True)

    metadata = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())
    assert metadata["checkpoint_version"] == "2.1"
    assert metadata["state_file"] == "state"
    assert metadata["class_and_ctor_args_file"] == "class_and_ctor_args.pkl"
    record = metadata["ckptable"]
    assert record["format"] == "msgpack"
    assert record["state_file"] == "state.msgpack"
    assert record["class"] == "trees.Node"
    assert record["components"] == ["encoder", "head"]
    assert record["ckptable_version"] == ckptable.__version__
    assert record["python_version"].count(".") == 2
    import cloudpickle

    assert record["cloudpickle_version"] == cloudpickle.__version__


def test_save_calls_get_state_once_for_the_whole_tree(tmp_path: Path) -> None:
    tree = three_level_tree()
    tree.save_to_path(tmp_path / "ckpt")

    encoder = tree.children["encoder"]
    assert tree.get_state_calls == 1
    assert encoder.get_state_calls == 1  # called by the root's get_state, not by the save
    assert encoder.children["a"].get_state_calls == 1


def test_save_of_a_wide_tree_calls_each_get_state_once(tmp_path: Path) -> None:
    leaves = {f"leaf{i}": Leaf(2) for i in range(200)}
    root = Node(leaves)
    root.save_to_path(tmp_path / "ckpt")

    assert root.get_state_calls == 1
    assert {leaf.get_state_calls for leaf in leaves.values()} == {1}


def test_restore_sets_children_before_their_parent(tmp_path: Path) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt")
    fresh = blank_three_level_tree()
    order: list[str] = []
    for node in (fresh, fresh.children["encoder"]):
        original = node.set_state

        def logged(state: dict, _node: Node = node, _original: Any = original) -> None:
            order.append(_node.name)
            _original(state)

        node.set_state = logged  # type: ignore[method-assign]

    fresh.restore_from_path(tmp_path / "ckpt")

    assert order == ["encoder", "root"]


def test_partial_restore_of_a_leaf_component_leaves_the_rest_untouched(tmp_path: Path) -> None:
    tree = three_level_tree()
    tree.save_to_path(tmp_path / "ckpt")
    fresh = blank_three_level_tree()
    before = fresh.get_state()

    fresh.restore_from_path(tmp_path / "ckpt" / "encoder" / "b", component="encoder/b")

    assert fresh.children["encoder"].children["b"].steps == 12
    np.testing.assert_array_equal(
        fresh.children["encoder"].children["b"].weights,
        tree.children["encoder"].children["b"].weights,
    )
    after = fresh.get_state()
    np.testing.assert_array_equal(
        after["encoder"]["a"]["weights"], before["encoder"]["a"]["weights"]
    )
    assert after["head"]["steps"] == before["head"]["steps"] == 0
    assert after["config"] == before["config"]


def test_partial_restore_of_a_middle_component_restores_its_subtree(
    tmp_path: Path, states_equal: Any
) -> None:
    tree = three_level_tree()
    tree.save_to_path(tmp_path / "ckpt")
    fresh = blank_three_level_tree()

    fresh.restore_from_path(tmp_path / "ckpt" / "encoder", component="encoder")

    states_equal(fresh.children["encoder"].get_state(), tree.children["encoder"].get_state())
    assert fresh.children["head"].steps == 0
    assert fresh.config["lr"] == 0.1


def test_state_argument_is_saved_instead_of_get_state(tmp_path: Path) -> None:
    tree = three_level_tree()
    state = tree.get_state()
    state["config"] = {"lr": 42.0}
    state["encoder"]["a"]["steps"] = 1000
    tree.get_state_calls = 0

    tree.save_to_path(tmp_path / "ckpt", state=state)

    assert tree.get_state_calls == 0
    fresh = blank_three_level_tree()
    fresh.restore_from_path(tmp_path / "ckpt")
    assert fresh.config == {"lr": 42.0}
    assert fresh.children["encoder"].children["a"].steps == 1000


def test_state_argument_without_a_component_key_skips_that_component(tmp_path: Path) -> None:
    tree = three_level_tree()
    state = tree.get_state()
    del state["head"]

    tree.save_to_path(tmp_path / "ckpt", state=state)

    assert not (tmp_path / "ckpt" / "head").exists()
    assert (tmp_path / "ckpt" / "encoder" / "a" / "state.pkl").is_file()
    fresh = blank_three_level_tree()
    fresh.restore_from_path(tmp_path / "ckpt")  # not saved → not restored, no error
    assert fresh.children["head"].steps == 0
    assert fresh.children["encoder"].children["b"].steps == 12


def test_state_argument_is_not_mutated(tmp_path: Path) -> None:
    tree = three_level_tree()
    state = tree.get_state()
    keys = set(state)

    tree.save_to_path(tmp_path / "ckpt", state=state)

    assert set(state) == keys


def test_from_checkpoint_rebuilds_the_stored_class_with_its_state(
    tmp_path: Path, states_equal: Any
) -> None:
    model = trained_model(layers=3, width=6)
    model.save_to_path(tmp_path / "ckpt")

    restored = Model.from_checkpoint(tmp_path / "ckpt")

    assert type(restored) is Model
    assert (restored.layers_count, restored.width, restored.name) == (3, 6, "trained")
    states_equal(restored.get_state(), model.get_state())


def test_from_checkpoint_keyword_overrides_a_positionally_stored_argument(tmp_path: Path) -> None:
    trained_model(layers=2, width=4).save_to_path(tmp_path / "ckpt")

    restored = Model.from_checkpoint(tmp_path / "ckpt", width=9)

    assert restored.width == 9
    assert restored.layers_count == 2
    assert restored.get_ctor_args_and_kwargs() == ((2, 9), {"name": "trained"})


def test_from_checkpoint_keyword_overrides_a_stored_keyword_argument(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "ckpt")

    restored = Model.from_checkpoint(tmp_path / "ckpt", name="renamed")

    assert restored.name == "renamed"
    assert restored.epoch == 9


class RecordingLeaf(Leaf):
    """A component that overrides restore_from_path (as RLlib's Algorithm does)."""

    calls: list[tuple[str, dict]] = []

    def restore_from_path(
        self, path: Any, *, component: Any = None, filesystem: Any = None, **kwargs: Any
    ) -> None:
        RecordingLeaf.calls.append((os.fspath(path), dict(kwargs)))
        super().restore_from_path(path, component=component, filesystem=filesystem, **kwargs)
        self.steps += 1000  # extra work after the restore


def test_component_overriding_restore_from_path_is_called_with_its_directory(
    tmp_path: Path,
) -> None:
    RecordingLeaf.calls = []
    saved = Node({"rec": RecordingLeaf(3)})
    saved.children["rec"].steps = 5
    saved.save_to_path(tmp_path / "ckpt")
    fresh = Node({"rec": RecordingLeaf(3)})

    fresh.restore_from_path(tmp_path / "ckpt", some_option=True)

    assert RecordingLeaf.calls == [(str(tmp_path / "ckpt" / "rec"), {"some_option": True})]
    assert fresh.children["rec"].steps == 1005


def test_from_checkpoint_passes_other_keywords_on_to_restore_from_path(tmp_path: Path) -> None:
    RecordingLeaf.calls = []
    RecordingLeaf(3).save_to_path(tmp_path / "ckpt")

    RecordingLeaf.from_checkpoint(tmp_path / "ckpt", scale=2.0, extra="x")

    assert RecordingLeaf.calls == [(str(tmp_path / "ckpt"), {"extra": "x"})]


def test_components_created_by_set_state_are_restored_too(tmp_path: Path) -> None:
    growing = Growing()
    growing.leaves = {"x": Leaf(2, scale=5.0), "y": Leaf(3, scale=6.0)}
    growing.leaves["y"].steps = 8
    growing.save_to_path(tmp_path / "ckpt")

    fresh = Growing()
    fresh.restore_from_path(tmp_path / "ckpt")

    assert sorted(fresh.leaves) == ["x", "y"]
    assert fresh.leaves["y"].steps == 8
    np.testing.assert_array_equal(fresh.leaves["x"].weights, growing.leaves["x"].weights)


def test_from_checkpoint_restores_components_created_by_set_state(tmp_path: Path) -> None:
    growing = Growing()
    growing.leaves = {"only": Leaf(2, scale=4.0)}
    growing.leaves["only"].steps = 3
    growing.save_to_path(tmp_path / "ckpt")

    restored = Growing.from_checkpoint(tmp_path / "ckpt")

    assert restored.leaves["only"].steps == 3


def test_path_none_saves_into_a_fresh_temporary_directory(tmp_path: Path) -> None:
    tree = three_level_tree()
    first = tree.save_to_path()
    second = tree.save_to_path()
    try:
        assert first != second
        assert Path(first).is_absolute() and (Path(first) / "encoder" / "a").is_dir()
        fresh = blank_three_level_tree()
        fresh.restore_from_path(first)
        assert fresh.children["head"].steps == 13
    finally:
        import shutil

        shutil.rmtree(first)
        shutil.rmtree(second)


def test_saving_over_a_checkpoint_leaves_no_stale_components_or_state_files(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ckpt"
    Node({"old": Leaf(), "kept": Leaf()}).save_to_path(path, use_msgpack=True)

    Node({"kept": Leaf(), "new": Leaf()}).save_to_path(path)

    assert files_under(path) == {
        "metadata.json", "class_and_ctor_args.pkl", "state.pkl",
        "kept", "kept/metadata.json", "kept/class_and_ctor_args.pkl", "kept/state.pkl",
        "new", "new/metadata.json", "new/class_and_ctor_args.pkl", "new/state.pkl",
    }  # fmt: skip
    assert os.listdir(tmp_path) == ["ckpt"]  # no staging or old directories left over


def test_a_failing_save_leaves_the_old_checkpoint_and_no_staging_directory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    before = {p: (path / p).read_bytes() for p in files_under(path) if (path / p).is_file()}

    broken = three_level_tree()

    def fail(*args: Any, **kwargs: Any) -> dict:
        raise RuntimeError("get_state failed")

    broken.children["encoder"].children["b"].get_state = fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="get_state failed"):
        broken.save_to_path(path)

    after = {p: (path / p).read_bytes() for p in files_under(path) if (path / p).is_file()}
    assert after == before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_saving_into_an_empty_existing_directory_works(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    Leaf().save_to_path(tmp_path / "empty")

    assert (tmp_path / "empty" / "state.pkl").is_file()


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")

    with pytest.raises(ckptable.CheckpointError, match="not a checkpoint"):
        Leaf().save_to_path(target)

    assert (target / "precious.txt").read_text() == "keep me"
    assert os.listdir(target) == ["precious.txt"]


def test_relative_and_str_paths_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    returned = trained_model().save_to_path("rel/ckpt")

    assert returned == str(tmp_path / "rel" / "ckpt")
    assert Model.from_checkpoint("rel/ckpt").epoch == 9


def test_file_uri_paths_work(tmp_path: Path) -> None:
    uri = (tmp_path / "ckpt").as_uri()
    trained_model().save_to_path(uri)

    assert Model.from_checkpoint(uri).epoch == 9


def test_msgpack_round_trip_keeps_arrays_and_nested_values(
    tmp_path: Path, states_equal: Any
) -> None:
    model = trained_model()
    model.save_to_path(tmp_path / "ckpt", use_msgpack=True)

    assert (tmp_path / "ckpt" / "state.msgpack").is_file()
    assert not (tmp_path / "ckpt" / "state.pkl").exists()
    restored = Model.from_checkpoint(tmp_path / "ckpt")
    states_equal(restored.get_state(), model.get_state())


def test_format_argument_names_a_codec(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "ckpt", format="msgpack")

    assert (tmp_path / "ckpt" / "optimizer" / "moments" / "state.msgpack").is_file()


def test_unknown_format_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ckptable.CheckpointError, match="Unknown checkpoint format 'yaml'"):
        trained_model().save_to_path(tmp_path / "ckpt", format="yaml")

    assert os.listdir(tmp_path) == []


class Renamed(Checkpointable):
    """A class with its own file names, as RLlib's Algorithm and RLModule have."""

    STATE_FILE_NAME = "module_state"
    METADATA_FILE_NAME = "rllib_checkpoint.json"

    def __init__(self) -> None:
        self.value = 0

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {"value": self.value}

    def set_state(self, state: dict) -> None:
        self.value = state["value"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


def test_classes_with_their_own_file_names_round_trip(tmp_path: Path) -> None:
    tree = Node({"mod": Renamed()})
    tree.children["mod"].value = 17
    tree.save_to_path(tmp_path / "ckpt")

    assert (tmp_path / "ckpt" / "mod" / "module_state.pkl").is_file()
    assert (tmp_path / "ckpt" / "mod" / "rllib_checkpoint.json").is_file()
    fresh = Node({"mod": Renamed()})
    fresh.restore_from_path(tmp_path / "ckpt")
    assert fresh.children["mod"].value == 17


def test_a_symlink_to_a_checkpoint_can_be_saved_over_and_restored(tmp_path: Path) -> None:
    real = tmp_path / "step_10"
    Node({"old": Leaf()}).save_to_path(real)
    (tmp_path / "latest").symlink_to(real)

    returned = Node({"new": Leaf(3, scale=2.0)}).save_to_path(tmp_path / "latest")

    assert returned == str(tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink()
    assert sorted(p.name for p in real.iterdir() if p.is_dir()) == ["new"]
    fresh = Node({"new": Leaf(3)})
    fresh.restore_from_path(tmp_path / "latest")
    assert fresh.children["new"].weights.tolist() == [0.0, 2.0, 4.0]
    assert ckptable.get_checkpoint_info(tmp_path / "latest")["class"] == "trees.Node"
