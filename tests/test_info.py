"""get_checkpoint_info: ckptable's layout and RLlib's, without unpickling anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.version import Version

import ckptable
from trees import Leaf, three_level_tree, trained_model

RLLIB_KEYS = ("type", "format", "checkpoint_version", "checkpoint_dir", "state_file",
              "policy_ids", "module_ids")  # fmt: skip


def test_info_of_a_ckptable_checkpoint_describes_the_whole_tree(tmp_path: Path) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt")

    info = ckptable.get_checkpoint_info(tmp_path / "ckpt")

    assert info["checkpoint_dir"] == str(tmp_path / "ckpt")
    assert info["checkpoint_version"] == Version("2.1")
    assert info["format"] == "cloudpickle"
    assert info["class"] == "trees.Node"
    assert info["type"] == "Checkpointable"
    assert info["state_file"] == str(tmp_path / "ckpt" / "state.pkl")
    assert info["metadata"]["state_file"] == "state"
    assert info["ckptable"]["components"] == ["encoder", "head"]
    assert set(info["components"]) == {"encoder", "head"}
    encoder = info["components"]["encoder"]
    assert encoder["class"] == "trees.Node"
    assert set(encoder["components"]) == {"a", "b"}
    assert encoder["components"]["a"]["class"] == "trees.Leaf"
    assert encoder["components"]["a"]["components"] == {}
    assert encoder["components"]["a"]["checkpoint_dir"] == str(tmp_path / "ckpt/encoder/a")


def test_info_reports_the_msgpack_format(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "ckpt", use_msgpack=True)

    info = ckptable.get_checkpoint_info(str(tmp_path / "ckpt"))

    assert info["format"] == "msgpack"
    assert info["components"]["optimizer"]["components"]["moments"]["format"] == "msgpack"


def test_info_does_not_unpickle_anything(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    Leaf().save_to_path(path)
    marker = tmp_path / "executed"
    # A pickle that would create the marker file if it were loaded.
    payload = (
        b"\x80\x04cbuiltins\nexec\n"
        + b"X" + len(f"open({str(marker)!r}, 'w')".encode()).to_bytes(4, "little")
        + f"open({str(marker)!r}, 'w')".encode()
        + b"\x85R."
    )  # fmt: skip
    (path / "class_and_ctor_args.pkl").write_bytes(payload)
    (path / "state.pkl").write_bytes(payload)
    metadata = json.loads((path / "metadata.json").read_text())
    del metadata["ckptable"]  # look like RLlib: the class comes from the pickle
    (path / "metadata.json").write_text(json.dumps(metadata))

    info = ckptable.get_checkpoint_info(path)

    assert not marker.exists()
    assert info["class"] is None


def test_info_of_a_missing_path_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(ckptable.CheckpointNotFoundError):
        ckptable.get_checkpoint_info(tmp_path / "nothing")


def test_info_of_a_directory_that_is_no_checkpoint_is_corrupt(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")

    with pytest.raises(ckptable.CorruptCheckpointError, match="is not a checkpoint"):
        ckptable.get_checkpoint_info(tmp_path)


def test_info_of_a_missing_recorded_component_is_corrupt(tmp_path: Path) -> None:
    three_level_tree().save_to_path(tmp_path / "ckpt")
    import shutil

    shutil.rmtree(tmp_path / "ckpt" / "head")

    with pytest.raises(ckptable.CorruptCheckpointError, match="head"):
        ckptable.get_checkpoint_info(tmp_path / "ckpt")


# --------------------------------------------------------------------------- RLlib's layouts


def make_v01_algorithm(path: Path) -> Path:
    path.mkdir()
    (path / "checkpoint-25").write_bytes(b"old")
    return path


def make_v1_algorithm(path: Path, ext: str = "pkl") -> Path:
    path.mkdir()
    (path / f"algorithm_state.{ext}").write_bytes(b"state")
    (path / "rllib_checkpoint.json").write_text(json.dumps({
        "type": "Algorithm", "checkpoint_version": "1.1",
        "format": "cloudpickle" if ext == "pkl" else "msgpack",
        "ray_version": "2.5.0", "ray_commit": "x",
    }))  # fmt: skip
    for pid in ("default_policy", "other"):
        (path / "policies" / pid).mkdir(parents=True)
        (path / "policies" / pid / "policy_state.pkl").write_bytes(b"p")
    return path


def make_policy(path: Path) -> Path:
    path.mkdir()
    (path / "policy_state.pkl").write_bytes(b"p")
    (path / "rllib_checkpoint.json").write_text(
        json.dumps({"type": "Policy", "checkpoint_version": "1.1", "format": "cloudpickle"})
    )
    return path


def make_new_stack_algorithm(path: Path) -> Path:
    """The layout of RLlib's new API stack: Checkpointable levels with learner modules."""
    Leaf().save_to_path(path)
    (path / "metadata.json").rename(path / "rllib_checkpoint.json")
    (path / "state.pkl").rename(path / "algorithm_state.pkl")
    metadata = json.loads((path / "rllib_checkpoint.json").read_text())
    metadata.update(state_file="algorithm_state", checkpoint_version="2.1")
    del metadata["ckptable"]
    (path / "rllib_checkpoint.json").write_text(json.dumps(metadata))
    for module_id in ("module_1", "module_2"):
        Leaf().save_to_path(path / "learner_group" / "learner" / "rl_module" / module_id)
    (path / "learner_group" / "learner" / "rl_module" / "notes.json").write_text("{}")
    class_file = (path / "class_and_ctor_args.pkl").read_bytes()
    for level in ("learner_group", "learner_group/learner", "learner_group/learner/rl_module"):
        (path / level / "class_and_ctor_args.pkl").write_bytes(class_file)
        (path / level / "state.pkl").write_bytes((path / "algorithm_state.pkl").read_bytes())
    return path


LAYOUTS = {
    "v0.1 checkpoint-N": make_v01_algorithm,
    "v1 algorithm pkl": make_v1_algorithm,
    "v1 algorithm msgpck": lambda p: make_v1_algorithm(p, "msgpck"),
    "policy": make_policy,
    "new stack algorithm": make_new_stack_algorithm,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_info_of_rllib_layouts_matches_rllibs_own_get_checkpoint_info(
    tmp_path: Path, layout: str
) -> None:
    from ray.rllib.utils.checkpoints import get_checkpoint_info as rllib_info

    path = LAYOUTS[layout](tmp_path / "ckpt")

    ours = ckptable.get_checkpoint_info(path)
    theirs = rllib_info(str(path))

    for key in RLLIB_KEYS:
        expected = theirs[key]
        if key in ("policy_ids", "module_ids") and expected is not None:
            expected = set(expected)
        assert ours[key] == expected, key


def test_info_reads_old_layout_details(tmp_path: Path) -> None:
    v01 = ckptable.get_checkpoint_info(make_v01_algorithm(tmp_path / "a"))
    v1 = ckptable.get_checkpoint_info(make_v1_algorithm(tmp_path / "b"))
    policy = ckptable.get_checkpoint_info(make_policy(tmp_path / "c"))
    new = ckptable.get_checkpoint_info(make_new_stack_algorithm(tmp_path / "d"))

    assert (v01["checkpoint_version"], v01["state_file"]) == (Version("0.1"), "checkpoint-25")
    assert v1["type"] == "Algorithm" and v1["policy_ids"] == {"default_policy", "other"}
    assert v1["checkpoint_version"] == Version("1.1")
    assert policy["type"] == "Policy"
    assert new["module_ids"] == {"module_1", "module_2"}
    assert new["class"] == "trees.Leaf"  # read from the pickle's opcodes
    learner = new["components"]["learner_group"]["components"]["learner"]
    assert set(learner["components"]["rl_module"]["components"]) == {"module_1", "module_2"}


def test_info_of_an_old_checkpoint_file_path(tmp_path: Path) -> None:
    make_v01_algorithm(tmp_path / "ckpt")

    info = ckptable.get_checkpoint_info(tmp_path / "ckpt" / "checkpoint-25")

    assert info["checkpoint_version"] == Version("0.1")
    assert info["checkpoint_dir"] == str(tmp_path / "ckpt")


@pytest.mark.rllib
def test_info_of_a_checkpoint_written_by_rllib_names_classes_and_components(
    tmp_path: Path,
) -> None:
    from ray.rllib.utils.checkpoints import Checkpointable as RLlibCheckpointable

    from rllib_small import RLlibNode

    assert issubclass(RLlibNode, RLlibCheckpointable)
    RLlibNode().save_to_path(str(tmp_path / "ckpt"))

    info = ckptable.get_checkpoint_info(tmp_path / "ckpt")

    assert info["ckptable"] is None
    assert info["class"] == "rllib_small.RLlibNode"
    assert set(info["components"]) == {"left", "right"}
    assert info["components"]["left"]["class"] == "rllib_small.RLlibLeaf"


def test_info_reports_no_class_for_a_class_pickled_by_value(tmp_path: Path) -> None:
    import cloudpickle

    path = tmp_path / "ckpt"
    Leaf().save_to_path(path)
    by_value = type("LocalLeaf", (Leaf,), {"__module__": "__main__"})
    (path / "class_and_ctor_args.pkl").write_bytes(
        cloudpickle.dumps({"class": by_value, "ctor_args_and_kwargs": ((), {})})
    )
    metadata = json.loads((path / "metadata.json").read_text())
    del metadata["ckptable"]
    (path / "metadata.json").write_text(json.dumps(metadata))

    assert ckptable.get_checkpoint_info(path)["class"] is None


# --------------------------------------------------------------------------- wrong paths


def test_info_of_a_file_of_a_checkpoint_names_the_directory(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "ckpt")
    state = tmp_path / "ckpt" / "optimizer" / "state.pkl"

    for call in (ckptable.get_checkpoint_info, ckptable.verify_checkpoint):
        with pytest.raises(ckptable.CheckpointNotFoundError) as caught:
            call(state)
        assert str(caught.value) == (
            f"{state} is a file, not a checkpoint directory; it is part of the checkpoint "
            f"{tmp_path / 'ckpt' / 'optimizer'}: pass that directory instead."
        )
        assert caught.value.path == str(state)


def test_info_of_a_manager_directory_says_what_it_is_and_where_the_checkpoints_are(
    tmp_path: Path,
) -> None:
    manager = ckptable.CheckpointManager(tmp_path / "run")
    manager.save(trained_model(), 3)

    with pytest.raises(ckptable.CheckpointNotFoundError) as caught:
        ckptable.get_checkpoint_info(tmp_path / "run")

    message = str(caught.value)
    assert f"{tmp_path / 'run'} is a CheckpointManager directory, not a checkpoint" in message
    assert f"'ckptable ls {tmp_path / 'run'}'" in message
    assert ckptable.get_checkpoint_info(manager.path(3))["class"] == "trees.Model"
