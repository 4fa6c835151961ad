"""Crafted states, class files and metadata files end as ``ckptable.errors`` exceptions
naming the file, from ``restore_from_path`` and ``from_checkpoint`` (resealed, so the
checksums do not catch them first: an attacker who writes the files rewrites those too)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from tests.helpers import reseal
from tests.trees import Leaf, Model, blank_three_level_tree, three_level_tree

from ckptable import CheckpointError, CorruptCheckpointError, IncompatibleCheckpointError
from ckptable._manifest import MANIFEST_FILE


class _Raises:
    """Unpickles by calling ``func(*args)``: a pickle that makes the decoder raise."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def _deep_list(depth: int) -> bytes:
    # Nested lists too deep for the unpickler's recursion (built without recursion).
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


CRAFTED_STATES = {
    "zero-division": pickle.dumps(_Raises(divmod, 1, 0)),
    "index-error": pickle.dumps(_Raises(list.pop, [])),
    "key-error": pickle.dumps(_Raises(dict.pop, {}, "k")),
    "runtime-error": pickle.dumps(_Raises(next, iter(()))),
    "not-a-dict": pickle.dumps([1, 2, 3]),
    "deep": _deep_list(200_000),
}


@pytest.mark.parametrize("crafted", sorted(CRAFTED_STATES))
def test_a_crafted_state_file_is_a_checkpoint_error_naming_it(tmp_path: Path, crafted: str) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    (path / "encoder" / "a" / "state.pkl").write_bytes(CRAFTED_STATES[crafted])
    reseal(path)
    target = blank_three_level_tree()
    with pytest.raises(CheckpointError, match=r"encoder/a/state\.pkl"):
        target.restore_from_path(path)
    assert target.children["encoder"].children["a"].steps == 0


@pytest.mark.parametrize(
    "record",
    [
        {"class": "not-a-class", "ctor_args_and_kwargs": ((), {})},
        {"class": Leaf, "ctor_args_and_kwargs": 5},
        {"class": Leaf, "ctor_args_and_kwargs": ("ab", "cd")},
        {"class": Leaf, "ctor_args_and_kwargs": ((), {"no_such_parameter": 1})},
        {"class": Leaf, "ctor_args_and_kwargs": (("x", "y", "z"), {})},
        [1, 2],
        {},
    ],
    ids=["not-a-class", "args-int", "args-strings", "bad-kwarg", "too-many-args", "list", "empty"],
)
def test_a_crafted_class_file_is_a_checkpoint_error_naming_it(tmp_path: Path, record: Any) -> None:
    path = tmp_path / "leaf"
    Leaf().save_to_path(path)
    (path / "class_and_ctor_args.pkl").write_bytes(cloudpickle.dumps(record))
    reseal(path)
    with pytest.raises(CheckpointError, match=r"class_and_ctor_args\.pkl"):
        Leaf.from_checkpoint(path)


def test_a_constructor_that_rejects_the_stored_arguments_is_incompatible(
    tmp_path: Path,
) -> None:
    path = tmp_path / "model"
    Model(layers=2).save_to_path(path)
    (path / "class_and_ctor_args.pkl").write_bytes(
        cloudpickle.dumps({"class": Model, "ctor_args_and_kwargs": ((), {"layers": "two"})})
    )
    reseal(path)
    with pytest.raises(IncompatibleCheckpointError, match=r"Building .*Model") as caught:
        Model.from_checkpoint(path)
    assert isinstance(caught.value.__cause__, TypeError)


METADATA_MUTATIONS = {
    "component-files-list": lambda record: record.update(component_metadata_files=["x"]),
    "component-files-path": lambda record: record.update(
        component_metadata_files={"encoder": "../../etc/passwd"}
    ),
    "components-dict": lambda record: record.update(components={"encoder": 1}),
    "components-traversal": lambda record: record.update(components=["../other"]),
    "components-unhashable": lambda record: record.update(components=[["a"]]),
    "format-list": lambda record: record.update(format=["pickle"]),
    "state-file-traversal": lambda record: record.update(state_file="../state.pkl"),
    "state-version-str": lambda record: record.update(state_version="2"),
    "state-version-huge": lambda record: record.update(state_version=10**400),
}


@pytest.mark.parametrize("mutation", sorted(METADATA_MUTATIONS))
def test_a_crafted_metadata_record_is_a_checkpoint_error(tmp_path: Path, mutation: str) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    metadata_path = path / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    METADATA_MUTATIONS[mutation](metadata["ckptable"])
    metadata_path.write_text(json.dumps(metadata))
    reseal(path)
    target = blank_three_level_tree()
    if mutation in ("component-files-list", "component-files-path"):
        # A metadata-file hint that is not a plain name is ignored: the default is used.
        target.restore_from_path(path)
        assert target.children["encoder"].children["a"].steps == 11
        return
    with pytest.raises(CheckpointError) as caught:
        target.restore_from_path(path)
    assert str(path) in str(caught.value)
    assert target.children["head"].steps == 0


def test_a_metadata_file_that_is_not_json_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    (path / "encoder" / "metadata.json").write_bytes(b"\xff\xfe{")
    reseal(path)
    with pytest.raises(CorruptCheckpointError, match=r"encoder/metadata\.json"):
        blank_three_level_tree().restore_from_path(path)


def _rewrite_manifest(manifest: Path, change: Any) -> None:
    """Change a manifest's body and give it a matching CRC (as an attacker can)."""
    import zlib

    raw = manifest.read_bytes()
    prefix, suffix = b'{"ckptable_manifest": ', b', "crc32": "'
    body = json.loads(raw[len(prefix) : raw.rindex(suffix)])
    change(body)
    body_bytes = json.dumps(body, indent=1, sort_keys=True).encode("ascii")
    manifest.write_bytes(prefix + body_bytes + suffix + b"%08x" % zlib.crc32(body_bytes) + b'"}')


@pytest.mark.parametrize(
    ("what", "change"),
    [
        ("size-overflows", lambda body: body["files"]["state.pkl"].__setitem__(0, 1e400)),
        ("size-negative", lambda body: body["files"]["state.pkl"].__setitem__(0, -1)),
        ("size-float", lambda body: body["files"]["state.pkl"].__setitem__(0, 12.5)),
        ("tree-bytes-too-long", lambda body: body.__setitem__("tree_bytes", int("9" * 5000))),
    ],
)
def test_a_crafted_manifest_is_a_checkpoint_error(tmp_path: Path, what: str, change: Any) -> None:
    import sys

    sys.set_int_max_str_digits(0)  # to write the 5,000-digit number (reading refuses it)
    try:
        path = tmp_path / "ckpt"
        three_level_tree().save_to_path(path)
        _rewrite_manifest(path / MANIFEST_FILE, change)
    finally:
        sys.set_int_max_str_digits(4300)
    target = blank_three_level_tree()
    with pytest.raises(CorruptCheckpointError, match="manifest"):
        target.restore_from_path(path, progress=True)
    assert target.children["head"].steps == 0
