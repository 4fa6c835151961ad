"""``convert_checkpoint``: whole trees between formats, both ways, RLlib's trees included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable import (
    CheckpointError,
    CorruptCheckpointError,
    StateEncodingError,
    convert_checkpoint,
    verify_checkpoint,
)
from rllib_trees import CK, RL
from test_rllib_compat import build, level_states, tree_files
from trees import Model, Node, trained_model


def state_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("state.*"))


def test_a_tree_converts_to_msgpack_and_back(tmp_path: Path, states_equal: Any) -> None:
    model = trained_model()
    model.save_to_path(tmp_path / "pickle")

    returned = convert_checkpoint(tmp_path / "pickle", tmp_path / "msgpack")

    assert returned == str(tmp_path / "msgpack")
    assert all(name.endswith("state.msgpack") for name in state_files(tmp_path / "msgpack"))
    assert len(state_files(tmp_path / "msgpack")) == len(state_files(tmp_path / "pickle"))
    verify_checkpoint(tmp_path / "msgpack")
    record = json.loads((tmp_path / "msgpack" / "metadata.json").read_text())["ckptable"]
    assert (record["format"], record["state_file"]) == ("msgpack", "state.msgpack")
    assert ckptable.get_checkpoint_info(tmp_path / "msgpack")["format"] == "msgpack"
    # The class files stay pickles, byte for byte (as in RLlib's msgpack checkpoints).
    for name in ("class_and_ctor_args.pkl", "optimizer/class_and_ctor_args.pkl"):
        assert (tmp_path / "msgpack" / name).read_bytes() == (
            tmp_path / "pickle" / name
        ).read_bytes()
    states_equal(Model.from_checkpoint(tmp_path / "msgpack").get_state(), model.get_state())

    convert_checkpoint(tmp_path / "msgpack", tmp_path / "back", format="cloudpickle")

    assert all(name.endswith("state.pkl") for name in state_files(tmp_path / "back"))
    states_equal(Model.from_checkpoint(tmp_path / "back").get_state(), model.get_state())


def test_big_arrays_convert(tmp_path: Path, states_equal: Any) -> None:
    tree = Node({}, name="big")
    tree.config["w"] = np.random.default_rng(0).random(1 << 20)
    tree.save_to_path(tmp_path / "a")
    convert_checkpoint(tmp_path / "a", tmp_path / "b")
    restored = Node({}, name="x")
    restored.restore_from_path(tmp_path / "b")
    np.testing.assert_array_equal(restored.config["w"], tree.config["w"])


def test_converting_a_checkpoint_onto_itself_is_refused(tmp_path: Path) -> None:
    """The source is read while the destination is written: never the same tree."""
    model = trained_model()
    model.save_to_path(tmp_path / "ckpt")
    before = sorted(state_files(tmp_path / "ckpt"))

    with pytest.raises(CheckpointError, match="source"):
        convert_checkpoint(tmp_path / "ckpt", tmp_path / "ckpt", overwrite=True)

    assert sorted(state_files(tmp_path / "ckpt")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # nothing left beside it


@pytest.mark.rllib
def test_rllib_reads_what_it_converts_to_msgpack_and_ckptable_converts_rllibs(
    tmp_path: Path,
) -> None:
    """A ckptable tree converted to msgpack restores in RLlib (whose msgpack restore
    reads msgpack-numpy's encoding); an RLlib tree converted restores in ckptable."""
    original = build(CK.Root, 1)
    original.save_to_path(tmp_path / "ck")
    convert_checkpoint(tmp_path / "ck", tmp_path / "ck_msgpack")
    into_rllib = build(RL.Root, 2)
    into_rllib.restore_from_path(str(tmp_path / "ck_msgpack"))
    assert level_states(tmp_path / "ck_msgpack").keys() == {
        k.replace(".pkl", ".msgpack") for k in level_states(tmp_path / "ck")
    }
    from helpers import assert_states_equal

    assert_states_equal(into_rllib.get_state(), original.get_state())

    rllib_tree = build(RL.Root, 3)
    rllib_tree.save_to_path(str(tmp_path / "rl"))
    with pytest.warns(ckptable.UnverifiedCheckpointWarning):
        convert_checkpoint(tmp_path / "rl", tmp_path / "rl_msgpack")
    assert tree_files(tmp_path / "rl_msgpack") == [
        name.replace("state.pkl", "state.msgpack") for name in tree_files(tmp_path / "rl")
    ]
    into_ckptable = build(CK.Root, 4)
    into_ckptable.restore_from_path(tmp_path / "rl_msgpack")
    assert_states_equal(into_ckptable.get_state(), rllib_tree.get_state())


class Schedule:
    """A value msgpack cannot hold."""


def test_a_value_the_format_cannot_hold_is_named_by_its_key_path(tmp_path: Path) -> None:
    model = trained_model()
    model.optimizer.config["schedule"] = [0.1, Schedule()]
    model.save_to_path(tmp_path / "pickle")
    before = tree_files(tmp_path / "pickle")

    with pytest.raises(StateEncodingError) as info:
        convert_checkpoint(tmp_path / "pickle", tmp_path / "msgpack")

    message = str(info.value)
    assert "component 'optimizer'" in message
    assert "state['config']['schedule'][1]" in message
    assert info.value.component == "optimizer"
    assert not (tmp_path / "msgpack").exists()
    assert tree_files(tmp_path / "pickle") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickle"]


def test_saving_names_the_key_path_too(tmp_path: Path) -> None:
    model = trained_model()
    model.optimizer.config["schedule"] = {"steps": Schedule()}
    with pytest.raises(StateEncodingError, match=r"state\['config'\]\['schedule'\]\['steps'\]"):
        model.save_to_path(tmp_path / "ckpt", use_msgpack=True)


def test_a_damaged_source_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "src")
    state = tmp_path / "src" / "layer0" / "state.pkl"
    data = bytearray(state.read_bytes())
    data[-3] ^= 1
    state.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="layer0"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_a_destination_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="dst"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "notes.txt").read_text() == "mine"


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "src")
    with pytest.raises(CheckpointError, match="Unknown checkpoint format 'yaml'"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", format="yaml")


def test_safe_conversion_refuses_code_in_the_source(tmp_path: Path) -> None:
    model = trained_model()
    model.optimizer.config["schedule"] = Schedule()
    model.save_to_path(tmp_path / "src")
    with pytest.raises(ckptable.UnsafeCheckpointError, match="Schedule"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", safe=True)
    assert not (tmp_path / "dst").exists()
