"""Compatibility with RLlib's ``ray.rllib.utils.checkpoints.Checkpointable`` (Ray 2.60).

ckptable is a drop-in replacement: a class written against RLlib's base works unchanged
on ckptable's, and checkpoints cross between the two in both directions. Every test
builds the same class tree on both bases (``rllib_trees.RL`` / ``rllib_trees.CK``), or
on a mix of them, and uses RLlib's behaviour as the reference.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cloudpickle
import msgpack
import msgpack_numpy
import pyarrow.fs
import pytest
import ray.cloudpickle
from packaging.version import Version
from ray.rllib.utils.checkpoints import get_checkpoint_info as rllib_get_checkpoint_info

import ckptable
import rllib_trees
from ckptable._manifest import MANIFEST_FILE
from helpers import assert_states_equal
from rllib_trees import (
    CK,
    HOOK_EXTRA_FILE,
    MIXED,
    RL,
    CKPolicy,
    RetiredThing,
    RLPolicy,
    Unpicklable,
    classes_of,
)

pytestmark = pytest.mark.rllib

FORMATS = pytest.mark.parametrize("use_msgpack", [False, True], ids=["pickle", "msgpack"])
BOTH_BASES = pytest.mark.parametrize("ns", [RL, CK], ids=["rllib", "ckptable"])
ROOTS = pytest.mark.parametrize("cls_name", ["Root", "AlgoRoot"])
DYNAMIC_ROOTS = pytest.mark.parametrize(
    "cls_name", ["Dynamic", "DynamicAlgoNamed", "DynamicRenamedClassFile"]
)
MIXED_TREES = pytest.mark.parametrize("ns", MIXED, ids=[ns.name for ns in MIXED])

#: Keys of RLlib's metadata.json that ckptable's must carry with the same values.
RLLIB_METADATA_KEYS = ("class_and_ctor_args_file", "state_file", "checkpoint_version")


# --------------------------------------------------------------------------- helpers


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Deep equality that also compares types (numpy dtypes, scalar types, list vs tuple)."""
    assert_states_equal(actual, expected, where, same_types=True)


def differs(actual: Any, expected: Any) -> bool:
    try:
        assert_same(actual, expected)
    except AssertionError:
        return True
    return False


def build(cls: type, variant: int, /, **ctor: Any) -> Any:
    """``cls(**ctor)`` in a state (picked by ``variant``) that differs from a fresh one."""
    obj = cls(**ctor)
    if hasattr(obj, "populate"):
        obj.populate()
    obj.mutate(variant)
    return obj


def other(ns: SimpleNamespace) -> SimpleNamespace:
    return CK if ns is RL else RL


def tree_files(root: str | Path) -> list[str]:
    """Every file and directory below ``root``, as sorted relative POSIX paths; ckptable's
    manifests (its one documented addition to RLlib's layout) left out."""
    root = Path(root)
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.name != MANIFEST_FILE
    )


def decode_state_file(path: Path) -> Any:
    """Decode a state file independently of both libraries."""
    if path.suffix == ".msgpack":
        return msgpack.unpackb(
            path.read_bytes(), object_hook=msgpack_numpy.decode, strict_map_key=False
        )
    with path.open("rb") as f:
        return pickle.load(f)


def level_states(root: str | Path) -> dict[str, Any]:
    """Every level's decoded state file, keyed by its path relative to ``root``."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): decode_state_file(p)
        for p in root.rglob("*")
        if p.suffix in (".pkl", ".msgpack") and p.name != "class_and_ctor_args.pkl"
    }


def class_records(root: str | Path) -> dict[str, Any]:
    """Every level's class_and_ctor_args.pkl as (class name, ctor args), by directory."""
    root = Path(root)
    records = {}
    for p in root.rglob("class_and_ctor_args.pkl"):
        with p.open("rb") as f:
            record = pickle.load(f)
        assert set(record) == {"class", "ctor_args_and_kwargs"}, p
        records[p.parent.relative_to(root).as_posix()] = (
            record["class"].__name__,
            record["ctor_args_and_kwargs"],
        )
    return records


def metadata_files(root: str | Path) -> dict[str, dict[str, Any]]:
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): json.loads(p.read_text())
        for p in root.rglob("*.json")
        if p.name != MANIFEST_FILE
    }


def get_in(state: dict[str, Any], component: str) -> Any:
    for name in component.split("/"):
        state = state[name]
    return state


def set_in(state: dict[str, Any], component: str, value: Any) -> None:
    *parents, last = component.split("/")
    for name in parents:
        state = state[name]
    state[last] = value


def save_both(
    tmp_path: Path, cls_name: str, variant: int, *, use_msgpack: bool = False
) -> tuple[Path, Path]:
    """Save the same tree built on RLlib's base and on ckptable's; return both paths."""
    rl = build(getattr(RL, cls_name), variant)
    ck = build(getattr(CK, cls_name), variant)
    assert_same(ck.get_state(), rl.get_state())
    rl_path = rl.save_to_path(tmp_path / "rl", use_msgpack=use_msgpack)
    ck_path = ck.save_to_path(tmp_path / "ck", use_msgpack=use_msgpack)
    return Path(rl_path), Path(ck_path)


# --------------------------------------------------------------------------- the classes


@pytest.mark.parametrize(
    "cls",
    [cls for ns in (RL, CK, *MIXED) for cls in classes_of(ns)] + [RLPolicy, RetiredThing],
    ids=lambda cls: cls.__qualname__,
)
def test_tree_classes_pickle_by_reference(cls: type) -> None:
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert cloudpickle.loads(cloudpickle.dumps(cls)) is cls
    assert ray.cloudpickle.loads(ray.cloudpickle.dumps(cls)) is cls


def test_tree_classes_use_the_intended_bases() -> None:
    assert issubclass(RL.Root, rllib_trees.RLlibCheckpointable)
    assert not issubclass(RL.Root, ckptable.Checkpointable)
    assert issubclass(CK.Leaf, ckptable.Checkpointable)
    assert not issubclass(CK.Leaf, rllib_trees.RLlibCheckpointable)
    mixed = rllib_trees.CK_RL_CK
    assert issubclass(mixed.Root, ckptable.Checkpointable)
    assert issubclass(mixed.Mid, rllib_trees.RLlibCheckpointable)
    assert issubclass(mixed.Leaf, ckptable.Checkpointable)


# --------------------------------------------------------------------------- RLlib → ckptable


@FORMATS
@ROOTS
def test_rllib_written_tree_restores_into_ckptable_object(
    tmp_path: Path, use_msgpack: bool, cls_name: str
) -> None:
    src = build(getattr(RL, cls_name), 11)
    path = src.save_to_path(tmp_path / "rllib", use_msgpack=use_msgpack)
    dst = getattr(CK, cls_name)()
    assert differs(dst.get_state(), src.get_state())

    with pytest.warns(ckptable.UnverifiedCheckpointWarning, match="without an integrity check"):
        dst.restore_from_path(path)

    assert_same(dst.get_state(), src.get_state())


def test_rllib_written_checkpoint_verifies_as_unverified_and_still_refuses_links(
    tmp_path: Path,
) -> None:
    """No manifest: every file is read (so an unreadable one still fails) and every level
    is reported unverified; symlinks are refused as in ckptable's own checkpoints."""
    src = build(RL.Root, 3)
    path = Path(src.save_to_path(tmp_path / "rllib"))
    report = ckptable.verify_checkpoint(path)
    directories = [path, *(p for p in path.rglob("*") if p.is_dir())]
    assert not report.verified
    assert sorted(report.unverified) == sorted(str(d) for d in directories)
    assert report.files == sum(1 for p in path.rglob("*") if p.is_file())
    state = next(path.rglob("state.pkl"))
    state.unlink()
    state.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ckptable.UnsafeCheckpointError, match="symlink"):
        CK.Root().restore_from_path(path)


# --------------------------------------------------------------------------- ckptable → RLlib


@FORMATS
@ROOTS
def test_ckptable_written_tree_restores_into_rllib_object(
    tmp_path: Path, use_msgpack: bool, cls_name: str
) -> None:
    src = build(getattr(CK, cls_name), 13)
    path = src.save_to_path(tmp_path / "ckptable", use_msgpack=use_msgpack)
    dst = getattr(RL, cls_name)()
    assert differs(dst.get_state(), src.get_state())

    dst.restore_from_path(path)

    assert_same(dst.get_state(), src.get_state())


@FORMATS
def test_rllib_from_checkpoint_loads_ckptable_checkpoint_of_a_class_moved_back_to_rllib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_msgpack: bool
) -> None:
    # A user on ckptable writes checkpoints, then goes back to RLlib's base class.
    monkeypatch.setattr(rllib_trees, "Policy", CKPolicy)
    src = build(CKPolicy, 4, seed=3, scale=0.5, label="ckptable-era")
    path = src.save_to_path(tmp_path / "ckpt", use_msgpack=use_msgpack)
    monkeypatch.setattr(rllib_trees, "Policy", RLPolicy)

    restored = RLPolicy.from_checkpoint(path)

    assert type(restored) is RLPolicy
    assert restored.get_ctor_args_and_kwargs() == src.get_ctor_args_and_kwargs()
    assert_same(restored.get_state(), src.get_state())


def test_rllib_get_checkpoint_info_reads_ckptable_algorithm_named_checkpoint_like_rllib(
    tmp_path: Path,
) -> None:
    rl_path, ck_path = save_both(tmp_path, "AlgoRoot", 2, use_msgpack=True)
    rl_info = rllib_get_checkpoint_info(str(rl_path))
    ck_info = rllib_get_checkpoint_info(str(ck_path))
    for key in ("type", "format", "checkpoint_version", "policy_ids", "module_ids"):
        assert ck_info[key] == rl_info[key], key
    assert Path(ck_info["state_file"]).relative_to(ck_path) == Path(
        rl_info["state_file"]
    ).relative_to(rl_path)


# --------------------------------------------------------------------------- on-disk layout


@FORMATS
@ROOTS
def test_ckptable_writes_the_same_files_and_directories_as_rllib(
    tmp_path: Path, use_msgpack: bool, cls_name: str
) -> None:
    rl_path, ck_path = save_both(tmp_path, cls_name, 5, use_msgpack=use_msgpack)
    suffix = ".msgpack" if use_msgpack else ".pkl"
    rl_files = tree_files(rl_path)
    assert f"mid/leaf/state{suffix}" in rl_files
    assert f"other/module/module_state{suffix}" in rl_files

    assert tree_files(ck_path) == rl_files
    assert sorted(os.listdir(tmp_path)) == ["ck", "rl"]  # nothing left beside the targets


@FORMATS
def test_ckptable_writes_the_same_files_and_states_as_rllib_through_component_overrides(
    tmp_path: Path, use_msgpack: bool
) -> None:
    rl_path, ck_path = save_both(tmp_path, "HookedRoot", 5, use_msgpack=use_msgpack)
    rl_files = tree_files(rl_path)
    assert f"hooked/{HOOK_EXTRA_FILE}" in rl_files
    assert "wrapped/class_and_ctor_args.pkl" in rl_files

    assert tree_files(ck_path) == rl_files
    assert_same(level_states(ck_path), level_states(rl_path))


@FORMATS
@ROOTS
def test_ckptable_metadata_json_carries_rllib_keys_with_rllib_values(
    tmp_path: Path, use_msgpack: bool, cls_name: str
) -> None:
    rl_path, ck_path = save_both(tmp_path, cls_name, 5, use_msgpack=use_msgpack)
    rl_meta, ck_meta = metadata_files(rl_path), metadata_files(ck_path)
    assert set(ck_meta) == set(rl_meta)
    assert len(rl_meta) == len(class_records(rl_path))  # one metadata file per level
    for name, rl_level in rl_meta.items():
        for key in RLLIB_METADATA_KEYS:
            assert ck_meta[name][key] == rl_level[key], (name, key)
        assert "ckptable" in ck_meta[name]


@FORMATS
@ROOTS
def test_ckptable_level_state_files_hold_what_rllib_writes(
    tmp_path: Path, use_msgpack: bool, cls_name: str
) -> None:
    rl_path, ck_path = save_both(tmp_path, cls_name, 6, use_msgpack=use_msgpack)
    rl_states = level_states(rl_path)
    assert "mid" not in next(s for name, s in rl_states.items() if "/" not in name)

    assert_same(level_states(ck_path), rl_states)


@ROOTS
def test_ckptable_class_files_hold_class_and_ctor_args_like_rllib(
    tmp_path: Path, cls_name: str
) -> None:
    rl_path, ck_path = save_both(tmp_path, cls_name, 6)
    assert_same(class_records(ck_path), class_records(rl_path))


@BOTH_BASES
def test_save_to_path_returns_the_checkpoint_path_as_str(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    out = build(ns.Root, 1).save_to_path(tmp_path / "ckpt")
    assert out == str(tmp_path / "ckpt")


def test_ckptable_get_checkpoint_info_describes_rllib_written_tree(tmp_path: Path) -> None:
    path = build(RL.Root, 3).save_to_path(tmp_path / "rllib", use_msgpack=True)
    info = ckptable.get_checkpoint_info(path)
    assert info["class"] == f"{rllib_trees.__name__}.RL.Root"
    assert info["format"] == "msgpack"
    assert info["checkpoint_version"] == Version("2.1")
    assert set(info["components"]) == {"mid", "other"}
    assert set(info["components"]["mid"]["components"]) == {"leaf", "aux", "module"}
    assert info["components"]["other"]["components"]["module"]["class"] == (
        f"{rllib_trees.__name__}.RL.Module"
    )


# --------------------------------------------------------------------------- partial restore

COMPONENT_PATHS = pytest.mark.parametrize("component", ["mid/leaf", "other/module", "mid"])


def _check_partial_restore(
    tmp_path: Path, writer: SimpleNamespace, reader: SimpleNamespace, component: str, fmt: bool
) -> None:
    src = build(writer.Root, 3)
    path = Path(src.save_to_path(tmp_path / "ckpt", use_msgpack=fmt))
    dst = build(reader.Root, 8)
    expected = dst.get_state()
    set_in(expected, component, get_in(src.get_state(), component))
    assert differs(dst.get_state(), expected)

    dst.restore_from_path(path / component, component=component)

    assert_same(dst.get_state(), expected)


@FORMATS
@COMPONENT_PATHS
def test_component_of_rllib_checkpoint_restores_alone_into_ckptable_object(
    tmp_path: Path, component: str, use_msgpack: bool
) -> None:
    _check_partial_restore(tmp_path, RL, CK, component, use_msgpack)


@FORMATS
@COMPONENT_PATHS
def test_component_of_ckptable_checkpoint_restores_alone_into_rllib_object(
    tmp_path: Path, component: str, use_msgpack: bool
) -> None:
    _check_partial_restore(tmp_path, CK, RL, component, use_msgpack)


@MIXED_TREES
@COMPONENT_PATHS
def test_component_of_mixed_tree_checkpoint_restores_alone(
    tmp_path: Path, ns: SimpleNamespace, component: str
) -> None:
    _check_partial_restore(tmp_path, ns, ns, component, False)


@BOTH_BASES
def test_component_directory_of_checkpoint_loads_with_from_checkpoint(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    src = build(ns.Root, 3)
    path = Path(src.save_to_path(tmp_path / "ckpt"))

    mid = ns.Mid.from_checkpoint(path / "other")

    assert type(mid) is ns.Mid
    assert (mid.name, mid.width) == ("other", 3)
    assert_same(mid.get_state(), src.other.get_state())


# --------------------------------------------------------------------------- save_to_path(state=)


def _given_state(obj: Any) -> dict[str, Any]:
    """A full state without ``other`` and ``mid/aux``, with values get_state() lacks."""
    state = obj.get_state()
    del state["other"]
    del state["mid"]["aux"]
    state["iteration"] = -5
    state["mid"]["leaf"]["counter"] = -6
    return state


@FORMATS
def test_save_with_given_state_writes_the_same_files_as_rllib(
    tmp_path: Path, use_msgpack: bool
) -> None:
    rl, ck = build(RL.Root, 4), build(CK.Root, 4)
    rl_path = rl.save_to_path(tmp_path / "rl", state=_given_state(rl), use_msgpack=use_msgpack)
    ck_path = ck.save_to_path(tmp_path / "ck", state=_given_state(ck), use_msgpack=use_msgpack)
    rl_files = tree_files(rl_path)
    assert not [f for f in rl_files if f.startswith(("other", "mid/aux"))]

    assert tree_files(ck_path) == rl_files
    assert_same(level_states(ck_path), level_states(rl_path))


@FORMATS
def test_save_with_given_state_restores_like_rllib_checkpoint(
    tmp_path: Path, use_msgpack: bool
) -> None:
    rl, ck = build(RL.Root, 4), build(CK.Root, 4)
    rl_path = rl.save_to_path(tmp_path / "rl", state=_given_state(rl), use_msgpack=use_msgpack)
    ck_path = ck.save_to_path(tmp_path / "ck", state=_given_state(ck), use_msgpack=use_msgpack)
    from_rl, from_ck = CK.Root(), CK.Root()
    from_rl.restore_from_path(rl_path)
    from_ck.restore_from_path(ck_path)

    assert from_ck.iteration == -5
    assert from_ck.mid.leaf.counter == -6
    assert_same(from_ck.other.get_state(), CK.Root().other.get_state())  # not saved
    assert_same(from_ck.get_state(), from_rl.get_state())


@pytest.mark.parametrize("where", ["root", "component"])
def test_save_with_empty_given_state_writes_the_same_level_states_as_rllib(
    tmp_path: Path, where: str
) -> None:
    # RLlib: `state = state or self.get_state(...)` -- an empty dict is replaced by the
    # object's own state for that level (its components are still skipped).
    def empty(obj: Any) -> dict[str, Any]:
        if where == "root":
            return {}
        state = obj.get_state()
        state["mid"] = {}
        return state

    rl, ck = build(RL.Root, 4), build(CK.Root, 4)
    rl_path = rl.save_to_path(tmp_path / "rl", state=empty(rl))
    ck_path = ck.save_to_path(tmp_path / "ck", state=empty(ck))

    assert tree_files(ck_path) == tree_files(rl_path)
    assert_same(level_states(ck_path), level_states(rl_path))


# --------------------------------------------------------------------------- from_checkpoint

CTOR_OVERRIDES = [
    pytest.param({}, id="none"),
    pytest.param({"seed": 42}, id="first-positional"),
    pytest.param({"scale": 0.25}, id="second-positional"),
    pytest.param({"label": "new"}, id="keyword-only"),
    pytest.param({"seed": 9, "scale": 3.0, "label": "all", "width": 6}, id="all"),
]


@pytest.mark.parametrize("overrides", CTOR_OVERRIDES)
def test_from_checkpoint_ctor_overrides_build_the_same_object_as_rllib(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    built = {}
    for ns in (RL, CK):
        src = build(ns.Root, 6, seed=1, scale=2.0, label="orig", width=3)
        path = src.save_to_path(tmp_path / ns.name)
        obj = ns.Root.from_checkpoint(path, **overrides)
        assert type(obj) is ns.Root
        assert_same(obj.get_state(), src.get_state())
        built[ns.name] = obj

    expected = {"seed": 1, "scale": 2.0, "label": "orig", "width": 3, **overrides}
    ck, rl = built["CK"], built["RL"]
    assert (ck.seed, ck.scale, ck.label, ck.width) == tuple(expected.values())
    assert_same(ck.get_ctor_args_and_kwargs(), rl.get_ctor_args_and_kwargs())


@BOTH_BASES
def test_from_checkpoint_passes_other_kwargs_to_component_restore_from_path(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    path = build(ns.HookedRoot, 2, seed=1).save_to_path(tmp_path / "ckpt")

    obj = ns.HookedRoot.from_checkpoint(path, seed=5, sync_mode="fast")

    assert obj.seed == 5
    assert [call["kwargs"] for call in obj.hooked.restore_calls] == [{"sync_mode": "fast"}]


@BOTH_BASES
def test_restore_from_path_passes_extra_kwargs_to_component_restore_from_path(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    path = build(ns.HookedRoot, 2).save_to_path(tmp_path / "ckpt")
    obj = ns.HookedRoot()

    obj.restore_from_path(path, sync_mode="slow", retries=2)

    assert [call["kwargs"] for call in obj.hooked.restore_calls] == [
        {"sync_mode": "slow", "retries": 2}
    ]


@BOTH_BASES
def test_from_checkpoint_of_another_class_raises_value_error(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    path = build(ns.Root, 1).save_to_path(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="subclass"):
        ns.Mid.from_checkpoint(path)


@BOTH_BASES
def test_restore_from_missing_path_raises_file_not_found_error(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    with pytest.raises(FileNotFoundError):
        ns.Root().restore_from_path(tmp_path / "missing")


# --------------------------------------------------------------------------- dynamic components


@FORMATS
@DYNAMIC_ROOTS
@pytest.mark.parametrize(
    ("writer", "reader"),
    [(RL, CK), (CK, RL), (CK, CK)],
    ids=["rllib-to-ckptable", "ckptable-to-rllib", "ckptable-to-ckptable"],
)
def test_components_created_by_set_state_are_restored_across_bases(
    tmp_path: Path,
    use_msgpack: bool,
    cls_name: str,
    writer: SimpleNamespace,
    reader: SimpleNamespace,
) -> None:
    src = build(getattr(writer, cls_name), 7)
    path = src.save_to_path(tmp_path / "ckpt", use_msgpack=use_msgpack)
    dst = getattr(reader, cls_name)()
    assert dst.modules == {}

    dst.restore_from_path(path)

    assert sorted(dst.modules) == ["policy_a", "policy_b"]
    assert_same(dst.get_state(), src.get_state())


# --------------------------------------------------------------------------- migration


def _old_rllib_checkpoint(tmp_path: Path, use_msgpack: bool = False) -> tuple[Any, str]:
    """An RLlib-era checkpoint of the user's ``Policy`` (still on RLlib's base)."""
    assert rllib_trees.Policy is RLPolicy
    src = build(RLPolicy, 12, seed=3, scale=0.5, label="rllib-era")
    return src, src.save_to_path(tmp_path / "old", use_msgpack=use_msgpack)


@FORMATS
def test_migrated_user_class_loads_old_rllib_checkpoint_with_from_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_msgpack: bool
) -> None:
    src, path = _old_rllib_checkpoint(tmp_path, use_msgpack)
    monkeypatch.setattr(rllib_trees, "Policy", CKPolicy)  # the user changed the import

    restored = CKPolicy.from_checkpoint(path)

    assert type(restored) is CKPolicy
    assert isinstance(restored.mid.leaf, ckptable.Checkpointable)
    assert restored.get_ctor_args_and_kwargs() == src.get_ctor_args_and_kwargs()
    assert_same(restored.get_state(), src.get_state())


def test_migrated_user_class_loads_old_rllib_checkpoint_through_ckptable_base_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, path = _old_rllib_checkpoint(tmp_path)
    monkeypatch.setattr(rllib_trees, "Policy", CKPolicy)

    restored = ckptable.Checkpointable.from_checkpoint(path)

    assert type(restored) is CKPolicy
    assert_same(restored.get_state(), src.get_state())


def test_migrated_user_class_applies_ctor_overrides_to_old_rllib_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, path = _old_rllib_checkpoint(tmp_path)
    monkeypatch.setattr(rllib_trees, "Policy", CKPolicy)

    restored = CKPolicy.from_checkpoint(path, seed=99, label="ckptable-era")

    assert (restored.seed, restored.scale, restored.label) == (99, 0.5, "ckptable-era")
    assert_same(restored.get_state(), src.get_state())


# --------------------------------------------------------------------------- overrides + super()


@BOTH_BASES
def test_overridden_save_to_path_of_root_writes_its_extra_file(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    src = build(ns.Hooked, 4)
    path = src.save_to_path(tmp_path / "ckpt")

    assert src.save_calls == 1
    extra = json.loads((Path(path) / HOOK_EXTRA_FILE).read_text())
    assert extra == {"bias": src.bias, "name": "hooked"}


@BOTH_BASES
def test_overridden_restore_from_path_of_root_runs_after_the_state_is_restored(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    src = build(ns.Hooked, 4)
    path = src.save_to_path(tmp_path / "ckpt")

    obj = ns.Hooked.from_checkpoint(path)

    assert obj.restore_calls == [
        {"component": None, "kwargs": {}, "extra": {"bias": src.bias, "name": "hooked"}}
    ]
    assert_same(obj.synced, src.leaf.weights)
    assert_same(obj.get_state(), src.get_state())


@BOTH_BASES
def test_overridden_save_to_path_of_component_is_called_during_parent_save(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    src = build(ns.HookedRoot, 4)
    path = Path(src.save_to_path(tmp_path / "ckpt"))

    assert src.hooked.save_calls == 1
    extra = json.loads((path / "hooked" / HOOK_EXTRA_FILE).read_text())
    assert extra == {"bias": src.hooked.bias, "name": "hooked"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@BOTH_BASES
def test_overridden_restore_from_path_of_component_is_called_during_parent_restore(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    src = build(ns.HookedRoot, 4)
    path = src.save_to_path(tmp_path / "ckpt")
    dst = ns.HookedRoot()

    dst.restore_from_path(path)

    assert dst.hooked.restore_calls == [
        {"component": None, "kwargs": {}, "extra": {"bias": src.hooked.bias, "name": "hooked"}}
    ]
    assert_same(dst.hooked.synced, src.hooked.leaf.weights)
    assert_same(dst.get_state(), src.get_state())


@BOTH_BASES
def test_overridden_component_restore_runs_on_checkpoint_written_by_the_other_base(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    src = build(other(ns).HookedRoot, 4)
    path = src.save_to_path(tmp_path / "ckpt")
    dst = ns.HookedRoot()

    dst.restore_from_path(path)

    assert [call["extra"] for call in dst.hooked.restore_calls] == [
        {"bias": src.hooked.bias, "name": "hooked"}
    ]
    assert_same(dst.hooked.synced, src.hooked.leaf.weights)
    assert_same(dst.get_state(), src.get_state())


@BOTH_BASES
def test_component_save_and_restore_overrides_receive_a_pyarrow_filesystem(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    # RLlib resolves the filesystem once at the top and hands it to every component's
    # save_to_path / restore_from_path, so component overrides may use it directly.
    src = build(ns.HookedRoot, 4)
    path = src.save_to_path(tmp_path / "ckpt")
    dst = ns.HookedRoot()
    dst.restore_from_path(path)

    received = src.hooked.filesystems["save"] + dst.hooked.filesystems["restore"]
    assert len(received) == 2
    assert all(isinstance(fs, pyarrow.fs.FileSystem) for fs in received), received


@BOTH_BASES
@pytest.mark.parametrize(("component", "passed_on"), [("hooked", None), ("hooked/leaf", "leaf")])
def test_partial_restore_through_overridden_component_calls_its_override(
    tmp_path: Path, ns: SimpleNamespace, component: str, passed_on: str | None
) -> None:
    src = build(ns.HookedRoot, 4)
    path = Path(src.save_to_path(tmp_path / "ckpt"))
    dst = build(ns.HookedRoot, 9)
    expected = dst.get_state()
    set_in(expected, component, get_in(src.get_state(), component))

    dst.restore_from_path(path / component, component=component)

    assert [call["component"] for call in dst.hooked.restore_calls] == [passed_on]
    assert_same(dst.hooked.synced, src.hooked.leaf.weights)
    assert_same(dst.get_state(), expected)


# --------------------------------------------------------------------------- mixed trees


@FORMATS
@MIXED_TREES
@pytest.mark.parametrize(
    "cls_name",
    ["Root", "Dynamic", "DynamicAlgoNamed", "DynamicRenamedClassFile", "HookedRoot"],
)
def test_mixed_tree_saves_and_restores(
    tmp_path: Path, ns: SimpleNamespace, cls_name: str, use_msgpack: bool
) -> None:
    src = build(getattr(ns, cls_name), 5)
    path = src.save_to_path(tmp_path / "ckpt", use_msgpack=use_msgpack)
    dst = getattr(ns, cls_name)()
    assert differs(dst.get_state(), src.get_state())

    dst.restore_from_path(path)

    assert_same(dst.get_state(), src.get_state())


@MIXED_TREES
def test_mixed_tree_writes_the_same_files_and_states_as_a_pure_rllib_tree(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    rl_path = build(RL.Root, 5).save_to_path(tmp_path / "rl")
    mixed_path = build(ns.Root, 5).save_to_path(tmp_path / "mixed")

    assert tree_files(mixed_path) == tree_files(rl_path)
    assert_same(level_states(mixed_path), level_states(rl_path))
    assert sorted(os.listdir(tmp_path)) == ["mixed", "rl"]


@MIXED_TREES
@pytest.mark.parametrize("reader", [RL, CK], ids=["rllib", "ckptable"])
def test_mixed_tree_checkpoint_restores_into_a_pure_tree(
    tmp_path: Path, ns: SimpleNamespace, reader: SimpleNamespace
) -> None:
    src = build(ns.Root, 5)
    path = src.save_to_path(tmp_path / "ckpt")
    dst = reader.Root()

    dst.restore_from_path(path)

    assert_same(dst.get_state(), src.get_state())


@MIXED_TREES
def test_mixed_tree_from_checkpoint_rebuilds_it(tmp_path: Path, ns: SimpleNamespace) -> None:
    src = build(ns.Root, 5, seed=2, label="mixed")
    path = src.save_to_path(tmp_path / "ckpt")

    obj = ns.Root.from_checkpoint(path, label="relabelled")

    assert type(obj) is ns.Root
    assert (obj.seed, obj.label) == (2, "relabelled")
    assert_same(obj.get_state(), src.get_state())


@MIXED_TREES
def test_mixed_tree_calls_overridden_component_save_and_restore_once(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    src = build(ns.HookedRoot, 4)
    path = src.save_to_path(tmp_path / "ckpt")
    dst = ns.HookedRoot()

    dst.restore_from_path(path)

    assert src.hooked.save_calls == 1
    assert [call["extra"] for call in dst.hooked.restore_calls] == [
        {"bias": src.hooked.bias, "name": "hooked"}
    ]
    assert_same(dst.hooked.synced, src.hooked.leaf.weights)


@MIXED_TREES
def test_mixed_tree_saved_twice_to_one_path_holds_the_second_state(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    src = build(ns.Root, 1)
    path = src.save_to_path(tmp_path / "ckpt")
    first_files = tree_files(path)
    src.mutate(2)
    src.save_to_path(path)
    dst = ns.Root()

    dst.restore_from_path(path)

    assert_same(dst.get_state(), src.get_state())
    assert tree_files(path) == first_files
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# --------------------------------------------------------------------------- odd corners


@pytest.mark.parametrize(
    "first_msgpack", [False, True], ids=["pickle-then-msgpack", "msgpack-then-pickle"]
)
def test_level_with_both_state_files_restores_the_file_rllib_picks(
    tmp_path: Path, first_msgpack: bool
) -> None:
    # RLlib writes in place, so saving twice in different formats leaves both files.
    src = build(RL.Root, 1)
    path = src.save_to_path(tmp_path / "ckpt", use_msgpack=first_msgpack)
    src.mutate(2)
    src.save_to_path(path, use_msgpack=not first_msgpack)
    assert {"state.pkl", "state.msgpack"} <= set(os.listdir(path))
    rl, ck = RL.Root(), CK.Root()

    rl.restore_from_path(path)
    ck.restore_from_path(path)

    assert_same(ck.get_state(), rl.get_state())


@BOTH_BASES
def test_checkpoint_saved_through_pyarrow_filesystem_restores_in_the_other_base(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    src = build(ns.Root, 3)
    out = src.save_to_path("ckpt", filesystem=fs)
    assert out == "ckpt"
    assert (tmp_path / "ckpt" / "mid" / "leaf" / "state.pkl").is_file()
    dst = other(ns).Root()

    dst.restore_from_path("ckpt", filesystem=fs)

    assert_same(dst.get_state(), src.get_state())


@BOTH_BASES
def test_checkpoint_saved_to_file_uri_restores_in_the_other_base(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    uri = (tmp_path / "ckpt").as_uri()
    src = build(ns.Root, 3)
    out = src.save_to_path(uri)
    assert out == str(tmp_path / "ckpt")
    dst = other(ns).Root()

    dst.restore_from_path(uri)

    assert_same(dst.get_state(), src.get_state())


@BOTH_BASES
def test_save_without_path_writes_a_temporary_checkpoint_the_other_base_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ns: SimpleNamespace
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    src = build(ns.Root, 3)

    out = src.save_to_path()

    assert Path(out).parent == tmp_path
    dst = other(ns).Root()
    dst.restore_from_path(out)
    assert_same(dst.get_state(), src.get_state())


@BOTH_BASES
def test_checkpoint_without_metadata_files_restores_in_the_other_base(
    tmp_path: Path, ns: SimpleNamespace
) -> None:
    # RLlib: "the METADATA_FILE_NAME file is not required to restore the state".
    src = build(ns.Root, 3)
    path = Path(src.save_to_path(tmp_path / "ckpt"))
    for metadata in path.rglob("*.json"):
        metadata.unlink()
    dst = other(ns).Root()

    dst.restore_from_path(path)

    assert_same(dst.get_state(), src.get_state())


@BOTH_BASES
def test_stale_component_directory_the_object_lacks_does_not_stop_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ns: SimpleNamespace
) -> None:
    # An old RLlib checkpoint holds a component ("legacy") the user's class no longer
    # has, whose state refers to a class the user has since deleted. RLlib restores only
    # the components the object has and never opens that directory.
    src = build(RL.Root, 3)
    path = Path(src.save_to_path(tmp_path / "ckpt"))
    legacy = RL.Leaf("legacy")
    legacy.info["thing"] = RetiredThing(1)
    legacy.save_to_path(path / "legacy")
    monkeypatch.delattr(rllib_trees, "RetiredThing")
    dst = ns.Root()

    dst.restore_from_path(path)

    assert_same(dst.get_state(), src.get_state())


@FORMATS
@BOTH_BASES
def test_state_that_cannot_be_encoded_raises_type_error(
    tmp_path: Path, ns: SimpleNamespace, use_msgpack: bool
) -> None:
    # RLlib lets the encoder's TypeError through (pickle and msgpack alike), so callers
    # may catch TypeError around a save.
    src = build(ns.Root, 3)
    src.mid.leaf.info["handle"] = Unpicklable()

    with pytest.raises(TypeError):
        src.save_to_path(tmp_path / "ckpt", use_msgpack=use_msgpack)
