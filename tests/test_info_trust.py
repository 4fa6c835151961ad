"""Untrusted checkpoints: ``get_checkpoint_info``, ``verify_checkpoint``, ``convert_checkpoint``
and the ``ckptable`` command on crafted files.

An attacker who can write a checkpoint's files can also rewrite its manifests, so the
crafted trees here are resealed (``reseal``) where a manifest would otherwise catch them:
what is tested is that every crafted value ends as a ``ckptable.errors`` exception that
names the file (on the command line: one ``ckptable: error:`` line, exit 1), that nothing
outside the checkpoint is read, that no special file is opened, that a tree of any depth
works, and that ``convert`` never replaces what it was not asked to replace.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import ckptable
from ckptable import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidComponentNameError,
    UnsafeCheckpointError,
    convert_checkpoint,
    verify_checkpoint,
)
from ckptable.cli import describe_checkpoint, format_info, main
from helpers import reseal
from test_info import make_new_stack_algorithm, make_v1_algorithm
from trees import Leaf, Node, three_level_tree, trained_model

MANIFEST = ".ckptable-manifest.json"
TESTS = Path(__file__).resolve().parent
#: The ckptable this process imported (a subprocess must import the same one).
SRC = Path(ckptable.__file__).resolve().parent.parent


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``ckptable ARGV`` in this process: exit code, stdout, stderr."""
    with (
        contextlib.redirect_stdout(io.StringIO()) as out,
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_cli_error(argv: list[str], names: str) -> str:
    """The command fails with exit 1 and one error line that names ``names``."""
    code, _out, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert code == 1, (argv, err)
    assert lines and lines[-1].startswith("ckptable: error: "), err
    assert "unexpected" not in err, err
    assert names in lines[-1], (names, err)
    return lines[-1]


def edit_metadata(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


def files_below(root: Path) -> Iterator[Path]:
    """Every file below ``root``, found without recursion (``Path.rglob`` recurses, and
    fails on the deep trees below)."""
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield Path(entry.path)


def rllib_like(root: Path) -> None:
    """Drop ckptable's manifests and records: the tree then looks like RLlib wrote it,
    and no checksum stands between a crafted file and the reader."""
    for path in list(files_below(root)):
        if path.name == MANIFEST:
            path.unlink()
        elif path.name == "metadata.json":
            edit_metadata(path, lambda m: m.pop("ckptable", None))


def write_manifest(path: Path, body: bytes) -> None:
    """A manifest file with ``body`` and a matching self-checksum (as an attacker can)."""
    crc = b"%08x" % zlib.crc32(body)
    path.write_bytes(b'{"ckptable_manifest": ' + body + b', "crc32": "' + crc + b'"}')


# --------------------------------------------------------------------------- crafted metadata


#: (where, key path, value): a value of the wrong type or shape in a level's metadata.
CRAFTED_METADATA = [
    ("", ("checkpoint_version",), None),
    ("", ("checkpoint_version",), ["2", "1"]),
    ("", ("checkpoint_version",), "abc"),
    ("", ("checkpoint_version",), "9" * 5000),
    ("", ("checkpoint_version",), True),
    ("encoder", ("checkpoint_version",), {"major": 2}),
    ("", ("ckptable", "format"), ["cloudpickle"]),
    ("", ("ckptable", "format"), True),
    ("encoder/a", ("ckptable", "format"), {"x": 1}),
    ("", ("ckptable", "class"), ["trees", "Node"]),
    ("", ("ckptable", "components"), None),
    ("", ("ckptable", "components"), 3),
    ("", ("ckptable", "components"), "encoder"),
    ("", ("ckptable", "components"), {"encoder": 1}),
    ("encoder", ("ckptable", "components"), [None]),
    ("encoder", ("ckptable", "components"), [["a"]]),
    ("", ("type",), ["Algorithm"]),
    ("", ("format",), 7),
    ("", ("policy_ids",), 5),
    ("", ("policy_ids",), [["p"]]),
    ("encoder", ("module_ids",), "m"),
]


def _set(metadata: dict[str, Any], *, keys: tuple[str, ...], value: Any) -> None:
    target = metadata
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value


@pytest.mark.parametrize(
    ("where", "keys", "value"),
    CRAFTED_METADATA,
    ids=[f"{w or 'root'}:{'.'.join(k)}={str(v)[:12]}" for w, k, v in CRAFTED_METADATA],
)
def test_crafted_metadata_is_a_checkpoint_error_naming_the_file(
    tmp_path: Path, where: str, keys: tuple[str, ...], value: Any
) -> None:
    root = tmp_path / "ckpt"
    three_level_tree().save_to_path(root)
    metadata = root / where / "metadata.json"
    edit_metadata(metadata, partial(_set, keys=keys, value=value))
    reseal(root)

    for call in (ckptable.get_checkpoint_info, describe_checkpoint):
        with pytest.raises(CheckpointError) as caught:
            call(root)
        assert str(metadata) in str(caught.value)
        assert caught.value.path == str(metadata)
    assert_cli_error(["info", str(root)], str(metadata))
    assert_cli_error(["info", "--json", str(root)], str(metadata))


@pytest.mark.parametrize("rllib", [False, True], ids=["ckptable", "rllib-layout"])
def test_metadata_nested_too_deeply_is_corrupt_not_a_recursion_error(
    tmp_path: Path, rllib: bool
) -> None:
    root = tmp_path / "ckpt"
    three_level_tree().save_to_path(root)
    if rllib:
        rllib_like(root)
    metadata = root / "encoder" / "metadata.json"
    metadata.write_text("[" * 100_000 + "]" * 100_000)
    if not rllib:
        reseal(root)

    for call in (ckptable.get_checkpoint_info, describe_checkpoint):
        with pytest.raises(CorruptCheckpointError, match="nested too deeply") as caught:
            call(root)
        assert str(metadata) in str(caught.value)
    assert_cli_error(["info", str(root)], str(metadata))
    # verify decodes no state: a JSON file it cannot parse is no ckptable record (RLlib
    # layout), or intact as resealed; either way no RecursionError comes out.
    verify_checkpoint(root)


def test_a_sweep_of_crafted_values_never_escapes_the_error_tree(tmp_path: Path) -> None:
    """Every JSON type at every key of every level's metadata, with and without
    manifests: info, describe, verify and the command raise ckptable errors only."""
    base = tmp_path / "base"
    three_level_tree().save_to_path(base)
    values: list[Any] = [None, False, -1, 10**30, 1.5, "", "x", "../x", "a\x00b", [], [1],
                         ["../x"], [""], [".."], ["a", "a"], {}, {"a": [1]}]  # fmt: skip
    failures: list[str] = []
    for manifest in (True, False):
        for level in ("", "encoder", "encoder/a"):
            original = json.loads((base / level / "metadata.json").read_text())
            keys: list[tuple[str, ...]] = [(k,) for k in original]
            if manifest:
                keys += [("ckptable", k) for k in original["ckptable"]]
            for key in keys:
                for value in values:
                    work = tmp_path / "work"
                    shutil.rmtree(work, ignore_errors=True)
                    shutil.copytree(base, work)
                    if not manifest:
                        rllib_like(work)
                    edit = partial(_set, keys=key, value=value)
                    edit_metadata(work / level / "metadata.json", edit)
                    if manifest:
                        reseal(work)
                    for name, call in (
                        ("info", ckptable.get_checkpoint_info),
                        ("describe", lambda p: json.dumps(describe_checkpoint(p), default=str)),
                        ("text", lambda p: format_info(describe_checkpoint(p))),
                        ("verify", verify_checkpoint),
                    ):
                        try:
                            call(work)
                        except CheckpointError:
                            pass
                        except Exception as exc:  # what the test looks for
                            failures.append(f"{name} {level}:{key}={value!r}: {exc!r}")
                    code, _out, err = run_cli("info", "--json", str(work))
                    if code not in (0, 1) or "unexpected" in err:
                        failures.append(f"cli {level}:{key}={value!r}: {err.strip()}")
    assert not failures, "\n".join(failures[:20])


def test_crafted_manifests_are_corrupt_manifests_not_overflows(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    three_level_tree().save_to_path(root)
    manifest = root / MANIFEST  # the root's: no parent manifest pins its checksum
    raw = manifest.read_bytes()
    body = json.loads(raw[len(b'{"ckptable_manifest": ') : raw.rindex(b', "crc32"')])
    name = sorted(body["files"])[0]
    crafted = json.dumps({**body, "files": {**body["files"], name: [0, "x"]}})
    write_manifest(manifest, crafted.replace("[0,", "[1e400,").encode())

    with pytest.raises(CorruptCheckpointError) as caught:
        verify_checkpoint(root)
    assert str(manifest) in str(caught.value)
    assert_cli_error(["verify", str(root)], str(manifest))
    describe_checkpoint(root)  # info does not verify: it still describes the tree


def test_a_tree_bytes_count_too_long_for_an_int_does_not_break_convert(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    trained_model().save_to_path(root)
    manifest = root / MANIFEST
    raw = manifest.read_bytes()
    body_bytes = raw[len(b'{"ckptable_manifest": ') : raw.rindex(b', "crc32"')]
    count = json.loads(body_bytes)["tree_bytes"]
    crafted = body_bytes.replace(b'"tree_bytes":%d' % count, b'"tree_bytes":' + b"9" * 5000)
    write_manifest(manifest, crafted)

    with pytest.raises(CorruptCheckpointError) as caught:
        convert_checkpoint(root, tmp_path / "out")
    assert str(manifest) in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert_cli_error(["convert", str(root), str(tmp_path / "out")], str(manifest))


def test_verify_of_a_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="nothing"):
        verify_checkpoint(tmp_path / "nothing")


# --------------------------------------------------------------------------- reading outside


@pytest.mark.parametrize("name", ["../other", "..", "/etc", "a/../../other", "x\x00y"])
def test_a_component_named_outside_the_checkpoint_is_refused(tmp_path: Path, name: str) -> None:
    three_level_tree().save_to_path(tmp_path / "other")
    root = tmp_path / "ckpt"
    three_level_tree().save_to_path(root)
    edit_metadata(root / "metadata.json", lambda m: m["ckptable"]["components"].append(name))
    reseal(root)

    for call in (ckptable.get_checkpoint_info, describe_checkpoint):
        with pytest.raises(InvalidComponentNameError) as caught:
            call(root)
        assert str(root / "metadata.json") in str(caught.value)
    assert_cli_error(["info", str(root)], str(root / "metadata.json"))


def _outside(tmp_path: Path, inside: Path) -> None:
    """Move the directory ``inside`` out of the checkpoint and leave a symlink to it."""
    target = tmp_path / "outside" / inside.name
    target.parent.mkdir(exist_ok=True)
    shutil.move(inside, target)
    inside.symlink_to(target, target_is_directory=True)


def test_symlinked_learner_group_is_refused(tmp_path: Path) -> None:
    root = make_new_stack_algorithm(tmp_path / "algo")
    _outside(tmp_path, root / "learner_group")

    for call in (ckptable.get_checkpoint_info, describe_checkpoint):
        with pytest.raises(UnsafeCheckpointError) as caught:
            call(root)
        assert str(root / "learner_group") in str(caught.value)
    assert_cli_error(["info", "--json", str(root)], str(root / "learner_group"))


def test_symlinked_rl_module_below_a_plain_directory_is_refused(tmp_path: Path) -> None:
    root = make_new_stack_algorithm(tmp_path / "algo")
    # learner_group without a class file is no component: info still lists the module
    # ids below it, one directory at a time, without following a link on the way.
    (root / "learner_group" / "class_and_ctor_args.pkl").unlink()
    _outside(tmp_path, root / "learner_group" / "learner")

    with pytest.raises(UnsafeCheckpointError) as caught:
        ckptable.get_checkpoint_info(root)
    assert str(root / "learner_group" / "learner") in str(caught.value)


def test_symlinked_policy_directory_is_refused(tmp_path: Path) -> None:
    root = make_v1_algorithm(tmp_path / "algo")
    _outside(tmp_path, root / "policies" / "other")

    with pytest.raises(UnsafeCheckpointError) as caught:
        ckptable.get_checkpoint_info(root)
    assert str(root / "policies" / "other") in str(caught.value)
    assert_cli_error(["info", str(root)], str(root / "policies" / "other"))


def test_symlinked_component_of_an_rllib_level_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    three_level_tree().save_to_path(root)
    rllib_like(root)
    _outside(tmp_path, root / "head")

    for call in (ckptable.get_checkpoint_info, describe_checkpoint):
        with pytest.raises(UnsafeCheckpointError) as caught:
            call(root)
        assert str(root / "head") in str(caught.value)
    assert_cli_error(["info", str(root)], str(root / "head"))


FIFO_PLACES = [
    "metadata.json",
    "class_and_ctor_args.pkl",
    "state.pkl",
    MANIFEST,
    "encoder/metadata.json",
    "encoder/a/state.pkl",
]


#: (file replaced by a FIFO, whether the tree looks like RLlib's: no manifests, no record).
FIFO_CASES = [(place, False) for place in FIFO_PLACES] + [
    (place, True) for place in FIFO_PLACES if place != MANIFEST
]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize(
    ("place", "rllib"),
    FIFO_CASES,
    ids=[f"{place}-{'rllib-layout' if rllib else 'ckptable'}" for place, rllib in FIFO_CASES],
)
def test_a_fifo_in_place_of_a_file_is_refused_without_hanging(
    tmp_path: Path, place: str, rllib: bool
) -> None:
    root = tmp_path / "ckpt"
    three_level_tree().save_to_path(root)
    copy = tmp_path / "copy"
    three_level_tree().save_to_path(copy)
    if rllib:
        rllib_like(root)
    (root / place).unlink()
    os.mkfifo(root / place)

    script = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from ckptable.cli import main
        for argv in (["info", {str(root)!r}], ["info", "--json", {str(root)!r}],
                     ["verify", {str(root)!r}],
                     ["convert", {str(root)!r}, {str(tmp_path / "out")!r}],
                     ["diff", {str(root)!r}, {str(copy)!r}]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            print(argv[0], code, (err.getvalue().strip().splitlines() or [""])[-1], flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5, result.stdout
    for line in lines:
        command, code, message = line.split(" ", 2)
        assert code == ("2" if command == "diff" else "1"), line
        assert message.startswith("ckptable: error: "), line
        assert "unexpected" not in message, line
        assert str(root / place) in message, line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- deep trees

DEPTH = 1100  # deeper than Python's default recursion limit (1000)


@pytest.fixture
def deep_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for a chain of ``DEPTH`` nested components; removed with ``rm -rf``
    (``shutil.rmtree`` recurses, and would fail on it)."""
    directory = tmp_path / "deep"
    directory.mkdir()
    yield directory
    subprocess.run(["rm", "-rf", str(directory)], check=False)


def build_chain(directory: Path, depth: int) -> tuple[Path, list[Path]]:
    """``root/a/a/.../a``: ``depth`` real levels (a Node holding ``a``, and a Leaf at the
    bottom), sealed bottom up as a save seals them."""
    from ckptable._manifest import preferred_algorithm, seal_directory
    from ckptable._storage import LocalStorage

    Node({"a": Leaf()}).save_to_path(directory / "template")
    templates = [directory / "template", directory / "template" / "a"]
    levels = []
    level = directory / "chain"
    for index in range(depth):
        level.mkdir()
        template = templates[index == depth - 1]
        for file in template.iterdir():
            if file.is_file() and file.name != MANIFEST:
                shutil.copyfile(file, level / file.name)
        levels.append(level)
        level = level / "a"
    known: dict[str, tuple[int, str]] = {}
    for level in reversed(levels):
        seal_directory(LocalStorage(), str(level), preferred_algorithm(), known, str)
    return levels[0], levels


def test_a_chain_deeper_than_the_recursion_limit_is_described_and_verified(
    deep_dir: Path,
) -> None:
    root, levels = build_chain(deep_dir, DEPTH)

    info = ckptable.get_checkpoint_info(root)
    node, depth = info, 1
    while node["components"]:
        node, depth = node["components"]["a"], depth + 1
    assert depth == DEPTH and node["class"] == "trees.Leaf"

    doc = describe_checkpoint(root)
    assert doc["levels"] == DEPTH and doc["integrity"]["levels_without_manifest"] == 0
    assert len(format_info(doc).splitlines()) == DEPTH + 5  # 4 header lines + column names
    code, out, err = run_cli("info", "--json", str(root))
    assert code == 0, err
    assert out.count('"component": ') == DEPTH

    report = verify_checkpoint(root)
    assert report.levels == DEPTH and report.verified
    code, out, err = run_cli("verify", str(root))
    assert code == 0 and out.startswith("ok: "), err

    convert_checkpoint(root, deep_dir / "converted")
    assert verify_checkpoint(deep_dir / "converted").levels == DEPTH

    # Damage at the bottom is still found, and named.
    bottom = levels[-1] / "state.pkl"
    bottom.write_bytes(bottom.read_bytes() + b"x")
    with pytest.raises(CorruptCheckpointError) as caught:
        verify_checkpoint(root)
    assert str(bottom) in str(caught.value)


def test_a_chain_deeper_than_the_recursion_limit_without_manifests(deep_dir: Path) -> None:
    root, _levels = build_chain(deep_dir, DEPTH)
    rllib_like(root)

    assert describe_checkpoint(root)["levels"] == DEPTH
    report = verify_checkpoint(root)
    assert report.levels == DEPTH and len(report.unverified) == DEPTH


def test_info_escapes_control_characters_from_the_files(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    Node({"evil\x1b[2J": Leaf()}).save_to_path(root)

    code, out, err = run_cli("info", str(root))

    assert code == 0, err
    assert "\x1b" not in out
    assert "evil\\x1b[2J" in out


# --------------------------------------------------------------------------- convert


def test_convert_refuses_an_existing_destination_unless_forced(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    trained_model().save_to_path(src)
    three_level_tree().save_to_path(dst)  # an unrelated checkpoint
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}

    with pytest.raises(CheckpointError, match="already exists") as caught:
        convert_checkpoint(src, dst)
    assert str(dst) in str(caught.value)
    assert_cli_error(["convert", str(src), str(dst)], str(dst))
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before

    convert_checkpoint(src, dst, overwrite=True)
    assert ckptable.get_checkpoint_info(dst)["class"] == "trees.Model"
    assert ckptable.get_checkpoint_info(dst)["format"] == "msgpack"

    code, _out, err = run_cli("convert", str(src), str(dst), "--format", "pickle", "--force")
    assert code == 0, err
    assert ckptable.get_checkpoint_info(dst)["format"] == "cloudpickle"


def test_convert_refuses_a_file_and_any_non_empty_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    trained_model().save_to_path(src)
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")

    for dst in (a_file, notes):
        with pytest.raises(CheckpointError, match="already exists") as caught:
            convert_checkpoint(src, dst)
        assert str(dst) in str(caught.value)
        # Forced, still only a checkpoint is replaced: a user's files never are.
        with pytest.raises(CheckpointError) as caught:
            convert_checkpoint(src, dst, overwrite=True)
        assert str(dst) in str(caught.value)
        assert_cli_error(["convert", str(src), str(dst), "--force"], str(dst))
    assert a_file.read_text() == "mine"
    assert (notes / "todo.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(src, empty)  # an empty directory holds nothing to lose
    assert verify_checkpoint(empty).verified


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_refuses_a_destination_overlapping_the_source(
    tmp_path: Path, overwrite: bool
) -> None:
    src = tmp_path / "src"
    trained_model().save_to_path(src)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}

    for source, dst, why in (
        (src, src, "the source itself"),
        (src, link, "the source itself"),
        (src, src / "converted", "inside the source"),
        (src, src / "layer0" / "converted", "inside the source"),
        (src / "optimizer", src, "contains the source"),
    ):
        with pytest.raises(CheckpointError, match=why) as caught:
            convert_checkpoint(source, dst, overwrite=overwrite)
        assert str(dst) in str(caught.value)
    assert_cli_error(["convert", str(src), str(src), "--force"], str(src))
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert verify_checkpoint(src).verified
