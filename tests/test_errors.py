"""Bad input: a ckptable error that names the file or component, and nothing lost."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import pytest

import ckptable
from ckptable import errors
from helpers import reseal
from trees import (
    Leaf,
    Model,
    Node,
    SubModel,
    Unrelated,
    blank_three_level_tree,
    three_level_tree,
    trained_model,
)

ALL_ERRORS = [
    errors.CheckpointError,
    errors.CheckpointNotFoundError,
    errors.CorruptCheckpointError,
    errors.IncompatibleCheckpointError,
    errors.UnknownComponentError,
    errors.InvalidComponentNameError,
    errors.StateEncodingError,
    errors.UnsafeCheckpointError,
    errors.ActorCheckpointError,
    errors.TransferError,
]


# --------------------------------------------------------------------------- the classes


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_errors_survive_pickling_with_message_path_and_component(cls: type) -> None:
    error = cls("component 'a/b' of /ckpt is broken", path="/ckpt", component="a/b")

    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is cls
    assert str(copy) == "component 'a/b' of /ckpt is broken"
    assert (copy.path, copy.component) == ("/ckpt", "a/b")


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_errors_derive_from_checkpoint_error_and_are_exported(cls: type) -> None:
    assert issubclass(cls, errors.CheckpointError)
    assert getattr(ckptable, cls.__name__) is cls


def test_not_found_is_a_file_not_found_error_and_drop_in_value_errors_are_value_errors() -> None:
    assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(errors.IncompatibleCheckpointError, ValueError)
    assert issubclass(errors.UnknownComponentError, ValueError)
    assert issubclass(errors.StateEncodingError, TypeError)


# --------------------------------------------------------------------------- not found


def test_restore_from_a_missing_path_raises_not_found_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"

    with pytest.raises(ckptable.CheckpointNotFoundError, match=str(missing)) as info:
        Leaf().restore_from_path(missing)

    assert info.value.path == str(missing)


def test_from_checkpoint_of_a_missing_path_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Model.from_checkpoint(tmp_path / "nothing")


def test_restore_from_a_file_raises_not_found(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    with pytest.raises(ckptable.CheckpointNotFoundError):
        Leaf().restore_from_path(tmp_path / "file")


# --------------------------------------------------------------------------- components


def test_unknown_component_path_raises_naming_it_and_the_known_names(tmp_path: Path) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt")
    fresh = blank_three_level_tree()

    with pytest.raises(ckptable.UnknownComponentError, match="'encoder/typo'") as info:
        fresh.restore_from_path(tmp_path / "ckpt" / "encoder", component="encoder/typo")

    assert "it has: a, b" in str(info.value)
    assert info.value.component == "encoder/typo"


def test_unknown_top_level_component_raises(tmp_path: Path) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt")

    with pytest.raises(ckptable.UnknownComponentError, match="no component 'typo'"):
        blank_three_level_tree().restore_from_path(tmp_path / "ckpt", component="typo")


@pytest.mark.parametrize("component", ["", "..", "encoder/../head", "/encoder", "a\x00b"])
def test_malformed_component_paths_are_unknown_components(tmp_path: Path, component: str) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt")

    with pytest.raises(ckptable.UnknownComponentError):
        blank_three_level_tree().restore_from_path(tmp_path / "ckpt", component=component)


BAD_NAMES = ["", ".", "..", "a/b", "a\\b", "/abs", "nul\x00byte", "x" * 300, ".ckptable-x",
             "metadata.json", "state.pkl", "class_and_ctor_args.pkl", 7]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_invalid_component_names_are_refused_on_save_and_nothing_is_written(
    tmp_path: Path, name: Any
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = Node({name: Leaf()})

    with pytest.raises(ckptable.InvalidComponentNameError) as info:
        root.save_to_path(tmp_path / "ckpt")

    assert info.value.component == str(name)
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert os.listdir(outside) == []


def test_invalid_names_in_nested_components_are_refused_too(tmp_path: Path) -> None:
    root = Node({"ok": Node({"..": Leaf()})})

    with pytest.raises(ckptable.InvalidComponentNameError, match="'..'.*ok"):
        root.save_to_path(tmp_path / "ckpt")

    assert os.listdir(tmp_path) == []


def test_duplicate_component_names_are_refused(tmp_path: Path) -> None:
    class Twice(Node):
        def get_checkpointable_components(self) -> list:
            return [("a", Leaf()), ("a", Leaf())]

    with pytest.raises(ckptable.CheckpointError, match="twice"):
        Twice().save_to_path(tmp_path / "ckpt")


def test_a_component_that_is_not_checkpointable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ckptable.CheckpointError, match="components must be Checkpointable"):
        Node({"thing": object()}).save_to_path(tmp_path / "ckpt")  # type: ignore[dict-item]


def test_metadata_that_is_not_json_is_refused(tmp_path: Path) -> None:
    class BadMeta(Leaf):
        def get_metadata(self) -> dict:
            return {**super().get_metadata(), "when": object()}

    with pytest.raises(ckptable.CheckpointError, match="not JSON-serializable"):
        BadMeta().save_to_path(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- crafted checkpoints


def test_component_names_from_a_crafted_checkpoint_are_refused_before_reading(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "secret"
    Leaf().save_to_path(outside)
    path = tmp_path / "ckpt"
    Node({"a": Leaf()}).save_to_path(path)
    metadata = json.loads((path / "metadata.json").read_text())
    metadata["ckptable"]["components"] = ["../secret"]
    (path / "metadata.json").write_text(json.dumps(metadata))
    reseal(path)  # a crafted checkpoint with matching checksums: the names still fail

    fresh = Node({"a": Leaf()})
    with pytest.raises(ckptable.CorruptCheckpointError, match="../secret"):
        fresh.restore_from_path(path)
    assert fresh.set_state_log == []


def test_a_deleted_component_directory_is_found_before_any_state_is_set(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    import shutil

    shutil.rmtree(path / "encoder" / "b")
    fresh = blank_three_level_tree()
    before = fresh.get_state()

    with pytest.raises(ckptable.CorruptCheckpointError, match="encoder/b") as info:
        fresh.restore_from_path(path)

    assert info.value.component == "b"
    assert fresh.set_state_log == [] and fresh.children["encoder"].set_state_log == []
    assert fresh.children["encoder"].children["a"].steps == before["encoder"]["a"]["steps"]


def test_a_missing_state_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    os.unlink(path / "head" / "state.pkl")

    with pytest.raises(ckptable.CorruptCheckpointError, match="head"):
        blank_three_level_tree().restore_from_path(path)


def test_garbled_metadata_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    (path / "encoder" / "metadata.json").write_bytes(b"{not json")

    with pytest.raises(ckptable.CorruptCheckpointError, match="encoder/metadata.json"):
        blank_three_level_tree().restore_from_path(path)


def _state_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("state.*"))


@pytest.mark.parametrize("use_msgpack", [False, True], ids=["pickle", "msgpack"])
@pytest.mark.parametrize("keep", ["empty", "one byte", "half", "all but one"])
def test_truncated_state_files_are_corrupt_and_nothing_is_set(
    tmp_path: Path, use_msgpack: bool, keep: str
) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path, use_msgpack=use_msgpack)
    for state_file in _state_files(path):
        data = state_file.read_bytes()
        size = {"empty": 0, "one byte": 1, "half": len(data) // 2, "all but one": len(data) - 1}
        fresh = Model()
        state_file.write_bytes(data[: size[keep]])
        try:
            with pytest.raises(ckptable.CorruptCheckpointError, match="state") as info:
                fresh.restore_from_path(path)
            assert info.value.path == str(state_file)
            assert fresh.epoch == 0 and fresh.optimizer.set_state_log == []
        finally:
            state_file.write_bytes(data)


@pytest.mark.parametrize("use_msgpack", [False, True], ids=["pickle", "msgpack"])
def test_garbage_state_files_are_corrupt(tmp_path: Path, use_msgpack: bool) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path, use_msgpack=use_msgpack)
    rng = random.Random(7)
    state_file = _state_files(path)[0]
    for _ in range(20):
        state_file.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        with pytest.raises(ckptable.CheckpointError):
            Model().restore_from_path(path)


def test_a_corrupt_class_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path)
    (path / "class_and_ctor_args.pkl").write_bytes(b"\x80\x05garbage")

    with pytest.raises(ckptable.CorruptCheckpointError, match="class_and_ctor_args.pkl"):
        Model.from_checkpoint(path)


def test_a_class_file_without_class_record_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path)
    (path / "class_and_ctor_args.pkl").write_bytes(pickle.dumps({"something": "else"}))
    reseal(path)

    with pytest.raises(ckptable.CorruptCheckpointError, match="class and its constructor"):
        Model.from_checkpoint(path)


def test_a_stored_class_that_cannot_be_imported_is_incompatible(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path)
    data = (path / "class_and_ctor_args.pkl").read_bytes()
    (path / "class_and_ctor_args.pkl").write_bytes(data.replace(b"trees", b"gone_", 1))
    reseal(path)

    with pytest.raises(ckptable.IncompatibleCheckpointError, match="gone_"):
        Model.from_checkpoint(path)


def test_a_missing_class_file_is_corrupt_for_from_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path)
    os.unlink(path / "class_and_ctor_args.pkl")

    with pytest.raises(ckptable.CorruptCheckpointError, match="which class to build"):
        Model.from_checkpoint(path)


# --------------------------------------------------------------------------- classes


def test_from_checkpoint_of_an_unrelated_class_is_incompatible(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "ckpt")

    with pytest.raises(ckptable.IncompatibleCheckpointError, match="trees.Model.*trees.Unrelated"):
        Unrelated.from_checkpoint(tmp_path / "ckpt")


def test_from_checkpoint_with_a_subclass_of_the_stored_class_is_incompatible(
    tmp_path: Path,
) -> None:
    trained_model().save_to_path(tmp_path / "ckpt")

    with pytest.raises(ValueError, match="not a subclass"):
        SubModel.from_checkpoint(tmp_path / "ckpt")


def test_from_checkpoint_with_a_base_class_builds_the_stored_subclass(tmp_path: Path) -> None:
    SubModel(3).save_to_path(tmp_path / "ckpt")

    restored = Model.from_checkpoint(tmp_path / "ckpt")

    assert type(restored) is SubModel and restored.layers_count == 3


def test_a_state_file_holding_no_dict_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path, use_msgpack=True)
    (path / "state.msgpack").write_bytes(b"\x07")  # a valid msgpack document: the int 7
    reseal(path)

    fresh = Model()
    with pytest.raises(ckptable.CorruptCheckpointError, match="holds a int, not a state dict"):
        fresh.restore_from_path(path)
    assert fresh.optimizer.set_state_log == []


def test_get_state_returning_no_dict_is_refused(tmp_path: Path) -> None:
    class ListState(Leaf):
        def get_state(self, components: Any = None, **kwargs: Any) -> Any:
            return [1, 2]

    with pytest.raises(ckptable.CheckpointError, match=r"ListState.get_state\(\).*list"):
        ListState().save_to_path(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def test_restoring_into_a_component_that_is_not_checkpointable_is_refused(
    tmp_path: Path,
) -> None:
    Node({"thing": Leaf()}).save_to_path(tmp_path / "ckpt")
    fresh = Node({"thing": object()})  # type: ignore[dict-item]

    with pytest.raises(ckptable.CheckpointError, match="'thing'.*no restore_from_path"):
        fresh.restore_from_path(tmp_path / "ckpt")
    assert fresh.set_state_log == []


def test_partial_restore_given_the_whole_checkpoint_says_which_directory_to_pass(
    tmp_path: Path,
) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt")
    fresh = blank_three_level_tree()

    with pytest.raises(ckptable.IncompatibleCheckpointError, match="encoder/b") as info:
        fresh.restore_from_path(tmp_path / "ckpt", component="encoder/b")

    assert str(tmp_path / "ckpt" / "encoder" / "b") in str(info.value)
    assert fresh.children["encoder"].children["b"].steps == 0


def test_save_errors_name_the_checkpoint_path_and_the_component(tmp_path: Path) -> None:
    root = Node({"ok": Node({"..": Leaf()})})

    with pytest.raises(ckptable.InvalidComponentNameError) as info:
        root.save_to_path(tmp_path / "ckpt")

    assert info.value.path == str(tmp_path / "ckpt")
    assert f"component 'ok' of {tmp_path / 'ckpt'}" in str(info.value)


def test_one_object_under_two_names_is_saved_twice(tmp_path: Path) -> None:
    shared = Leaf(2, scale=3.0)
    Node({"a": shared, "b": shared}).save_to_path(tmp_path / "ckpt")

    fresh = Node({"a": Leaf(2), "b": Leaf(2)})
    fresh.restore_from_path(tmp_path / "ckpt")
    assert fresh.children["a"].weights.tolist() == fresh.children["b"].weights.tolist() == [0, 3]
