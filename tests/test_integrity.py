"""Integrity: manifests, verification before decoding, and transactional restores.

Every damage is done to real files on disk. "Before unpickling" is checked by counting
the calls of ``pickle.load`` during the restore: verification of the whole tree comes
first, so a damaged file anywhere means no state is decoded at all.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

import ckptable
from ckptable import CorruptCheckpointError, verify_checkpoint
from ckptable._manifest import MANIFEST_FILE
from helpers import same_state
from trees import Leaf, Model, Node, blank_three_level_tree, states_of, three_level_tree


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    return path


@pytest.fixture
def unpickle_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the cloudpickle codec's decodes (``_formats.load_pickle``, the unpickler
    that places torch tensors) and any plain ``pickle.load`` during a test."""
    from ckptable import _formats

    calls: list[int] = []

    def counting(real: Any) -> Any:
        def counting_load(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return real(*args, **kwargs)

        return counting_load

    monkeypatch.setattr(pickle, "load", counting(pickle.load))
    monkeypatch.setattr(_formats, "load_pickle", counting(_formats.load_pickle))
    return calls


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def assert_refused(
    path: Path, calls: list[int], match: str | None = None
) -> CorruptCheckpointError:
    """Restoring ``path`` raises CorruptCheckpointError before any state is decoded and
    leaves the target object as it was."""
    target = blank_three_level_tree()
    before = states_of(target)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        target.restore_from_path(path)
    assert calls == [], "a state was unpickled before the damage was found"
    assert same_state(states_of(target), before)
    assert target.set_state_log == []
    return info.value


# --------------------------------------------------------------------------- the manifest


def test_every_directory_has_a_manifest_that_lists_it_exactly(saved: Path) -> None:
    directories = [saved, *(p for p in saved.rglob("*") if p.is_dir())]
    assert len(directories) == 5  # root, encoder, encoder/a, encoder/b, head
    for directory in directories:
        document = json.loads((directory / MANIFEST_FILE).read_text())
        body = document["ckptable_manifest"]
        files = {p.name for p in directory.iterdir() if p.is_file()} - {MANIFEST_FILE}
        dirs = {p.name for p in directory.iterdir() if p.is_dir()}
        assert set(body["files"]) == files
        assert set(body["dirs"]) == dirs
        for name, (size, _digest) in body["files"].items():
            assert (directory / name).stat().st_size == size


def test_verify_checkpoint_reports_what_it_checked(saved: Path) -> None:
    report = verify_checkpoint(saved)
    files = [p for p in all_files(saved) if p.name != MANIFEST_FILE]
    assert report.levels == 5
    assert report.files == len(files) == 15
    assert report.bytes == sum(p.stat().st_size for p in files)
    assert report.algorithms == ("xxh3_64",)
    assert report.verified and report.unverified == ()
    assert report.path == str(saved)


def test_a_copied_checkpoint_and_a_copied_component_still_verify(
    saved: Path, tmp_path: Path
) -> None:
    shutil.copytree(saved, tmp_path / "copy")
    shutil.copytree(saved / "encoder", tmp_path / "encoder_alone")
    assert verify_checkpoint(tmp_path / "copy").levels == 5
    assert verify_checkpoint(tmp_path / "encoder_alone").levels == 3
    restored = blank_three_level_tree()
    restored.restore_from_path(tmp_path / "copy")
    assert same_state(states_of(restored), states_of(three_level_tree()))


def test_crc32_is_used_without_xxhash_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptable import _checksums

    monkeypatch.setattr(_checksums, "_has_xxhash", lambda: False)
    three_level_tree().save_to_path(tmp_path / "ckpt")
    assert verify_checkpoint(tmp_path / "ckpt").algorithms == ("crc32",)
    # Such a checkpoint is read with or without xxhash; an xxh3 one needs xxhash.
    three_level_tree().save_to_path(tmp_path / "xxh")  # still crc32 here
    monkeypatch.undo()
    three_level_tree().save_to_path(tmp_path / "xxh")
    monkeypatch.setattr(_checksums, "_has_xxhash", lambda: False)
    with pytest.raises(ckptable.IncompatibleCheckpointError, match="pip install xxhash"):
        verify_checkpoint(tmp_path / "xxh")
    restored = blank_three_level_tree()
    restored.restore_from_path(tmp_path / "ckpt")
    assert same_state(states_of(restored), states_of(three_level_tree()))


# --------------------------------------------------------------------------- damage


@pytest.mark.parametrize("cut", ["0", "1", "half", "n-1"])
def test_every_truncated_file_is_found_before_unpickling(
    saved: Path, unpickle_calls: list[int], cut: str
) -> None:
    for path in all_files(saved):
        original = path.read_bytes()
        n = len(original)
        size = {"0": 0, "1": 1, "half": n // 2, "n-1": n - 1}[cut]
        path.write_bytes(original[:size])
        try:
            error = assert_refused(saved, unpickle_calls)
            with pytest.raises(CorruptCheckpointError):
                verify_checkpoint(saved)
        finally:
            path.write_bytes(original)
        where = path.name if path.name != MANIFEST_FILE else path.parent.name
        assert where in str(error) or path.parent.name in str(error), (path, str(error))
    verify_checkpoint(saved)  # all repaired


def test_hundreds_of_random_bit_flips_are_all_found_before_unpickling(
    saved: Path, unpickle_calls: list[int]
) -> None:
    rng = random.Random(1234)
    files = all_files(saved)
    for _ in range(300):
        path = rng.choice(files)
        data = bytearray(path.read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= 1 << rng.randrange(8)
        original = path.read_bytes()
        path.write_bytes(bytes(data))
        try:
            with pytest.raises(CorruptCheckpointError) as info:
                blank_three_level_tree().restore_from_path(saved)
            assert unpickle_calls == [], (path, offset)
            assert info.value.path is not None
        finally:
            path.write_bytes(original)
    verify_checkpoint(saved)


def test_a_deleted_component_directory_is_found(saved: Path, unpickle_calls: list[int]) -> None:
    shutil.rmtree(saved / "encoder" / "b")
    error = assert_refused(saved, unpickle_calls, match="missing")
    assert "encoder/b" in str(error) or error.path == str(saved / "encoder" / "b")


def test_extra_files_and_directories_are_found(saved: Path, unpickle_calls: list[int]) -> None:
    (saved / "encoder" / "notes.txt").write_text("added later")
    assert_refused(saved, unpickle_calls, match=r"notes\.txt.*not part of the checkpoint")
    (saved / "encoder" / "notes.txt").unlink()
    (saved / "head" / "extra").mkdir()
    assert_refused(saved, unpickle_calls, match=r"extra.*not part of the checkpoint")


def test_a_missing_file_is_found(saved: Path, unpickle_calls: list[int]) -> None:
    (saved / "head" / "class_and_ctor_args.pkl").unlink()
    assert_refused(saved, unpickle_calls, match=r"class_and_ctor_args\.pkl.*missing")


def test_files_swapped_within_a_level_and_between_components_are_found(
    saved: Path, unpickle_calls: list[int]
) -> None:
    a, b = saved / "encoder" / "a" / "state.pkl", saved / "encoder" / "b" / "state.pkl"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    assert_refused(saved, unpickle_calls, match=r"state\.pkl")
    a.write_bytes(a_bytes)
    b.write_bytes(b_bytes)
    state, meta = saved / "head" / "state.pkl", saved / "head" / "class_and_ctor_args.pkl"
    state_bytes, meta_bytes = state.read_bytes(), meta.read_bytes()
    state.write_bytes(meta_bytes)
    meta.write_bytes(state_bytes)
    assert_refused(saved, unpickle_calls)


def test_swapped_component_directories_are_found(saved: Path, unpickle_calls: list[int]) -> None:
    encoder = saved / "encoder"
    (encoder / "a").rename(encoder / "tmp")
    (encoder / "b").rename(encoder / "a")
    (encoder / "tmp").rename(encoder / "b")
    assert_refused(saved, unpickle_calls, match="replaced, swapped or altered")


def test_a_file_from_another_checkpoint_is_found(
    saved: Path, tmp_path: Path, unpickle_calls: list[int]
) -> None:
    other = three_level_tree()
    other.children["head"].steps = 99
    other.save_to_path(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "head" / "state.pkl", saved / "head" / "state.pkl")
    assert_refused(saved, unpickle_calls, match=r"head.*state\.pkl")


def test_a_ckptable_checkpoint_without_its_manifest_is_incomplete(
    saved: Path, unpickle_calls: list[int]
) -> None:
    (saved / MANIFEST_FILE).unlink()
    assert_refused(saved, unpickle_calls, match="did not finish")
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        verify_checkpoint(saved)
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        Node.from_checkpoint(saved)
    # A component's manifest is pinned by its parent's, so it cannot be dropped either.
    saved2 = saved.parent / "again"
    three_level_tree().save_to_path(saved2)
    (saved2 / "encoder" / "a" / MANIFEST_FILE).unlink()
    assert_refused(saved2, unpickle_calls, match="missing")


def test_verify_false_skips_the_checks(saved: Path) -> None:
    (saved / MANIFEST_FILE).unlink()
    (saved / "notes.txt").write_text("extra")
    restored = blank_three_level_tree()
    restored.restore_from_path(saved, verify=False)
    assert same_state(states_of(restored), states_of(three_level_tree()))


def test_partial_restore_from_a_component_directory_verifies_it(
    saved: Path, unpickle_calls: list[int]
) -> None:
    leaf = saved / "encoder" / "a" / "state.pkl"
    data = bytearray(leaf.read_bytes())
    data[-3] ^= 0x10
    leaf.write_bytes(bytes(data))
    target = blank_three_level_tree()
    before = states_of(target)
    with pytest.raises(CorruptCheckpointError, match=r"encoder/a/state\.pkl"):
        target.restore_from_path(saved / "encoder", component="encoder")
    with pytest.raises(CorruptCheckpointError, match=r"encoder/a/state\.pkl"):
        target.restore_from_path(saved / "encoder" / "a", component="encoder/a")
    assert unpickle_calls == []
    assert same_state(states_of(target), before)
    # The untouched sibling restores alone.
    target.restore_from_path(saved / "encoder" / "b", component="encoder/b")
    assert target.children["encoder"].children["b"].steps == 12


def test_from_checkpoint_verifies_the_class_file_before_unpickling_it(
    tmp_path: Path, unpickle_calls: list[int]
) -> None:
    path = tmp_path / "model"
    Model(layers=2).save_to_path(path)
    class_file = path / "class_and_ctor_args.pkl"
    data = bytearray(class_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    class_file.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"class_and_ctor_args\.pkl"):
        Model.from_checkpoint(path)
    assert unpickle_calls == []


def test_a_damaged_leaf_leaves_the_whole_tree_untouched(
    saved: Path, unpickle_calls: list[int]
) -> None:
    """The last level read is damaged: still nothing was decoded or applied."""
    deepest = sorted(saved.rglob("state.pkl"))[-1]
    deepest.write_bytes(deepest.read_bytes()[:-1] + b"\x00")
    assert_refused(saved, unpickle_calls)


def test_an_unreadable_leftover_in_a_level_is_refused(saved: Path) -> None:
    """A file the manifest does not know is extra even if it is named like one of ours."""
    (saved / "head" / "state.msgpack").write_bytes(b"\x80")
    with pytest.raises(CorruptCheckpointError, match=r"state\.msgpack"):
        blank_three_level_tree().restore_from_path(saved)


def test_large_files_are_verified_before_they_are_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unpickle_calls: list[int]
) -> None:
    """Files too big to keep in memory whole are checksummed in the pass that reads them
    for decoding (their skeleton kept, see test_big_arrays): a flip in the middle is
    still found before anything is unpickled."""
    from ckptable import _restore_session

    monkeypatch.setattr(_restore_session, "_KEEP_FILE_BYTES", 1024)
    tree = Node({"big": Leaf(200_000, scale=0.5)}, name="root")
    tree.save_to_path(tmp_path / "big")
    restored = Node({"big": Leaf(200_000)}, name="root")
    restored.restore_from_path(tmp_path / "big")
    assert (restored.children["big"].weights == tree.children["big"].weights).all()
    assert unpickle_calls  # it decoded
    unpickle_calls.clear()
    state = tmp_path / "big" / "big" / "state.pkl"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x40
    state.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        Node({"big": Leaf(200_000)}, name="root").restore_from_path(tmp_path / "big")
    assert unpickle_calls == []


def test_size_mismatch_is_reported_as_truncation(saved: Path) -> None:
    state = saved / "head" / "state.pkl"
    os.truncate(state, state.stat().st_size - 5)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        verify_checkpoint(saved)


def test_big_arrays_are_checksummed_in_parallel_chunks_correctly(
    tmp_path: Path, unpickle_calls: list[int]
) -> None:
    """Arrays above the pipeline threshold are checksummed on a helper thread chunk by
    chunk while written (and while read back): the result must equal a checksum of the
    whole file, and a flip in any chunk is still found."""
    import xxhash

    tree = Node({"big": Leaf(6_000_000, scale=0.25)}, name="root")  # 24 MB of float32
    tree.save_to_path(tmp_path / "big")
    state = tmp_path / "big" / "big" / "state.pkl"
    manifest = json.loads((tmp_path / "big" / "big" / MANIFEST_FILE).read_text())
    size, digest = manifest["ckptable_manifest"]["files"]["state.pkl"]
    data = state.read_bytes()
    assert size == len(data) > 20_000_000
    assert digest == xxhash.xxh3_64(data).hexdigest()
    verify_checkpoint(tmp_path / "big")
    for offset in (10, len(data) // 3, len(data) - 10):
        flip = bytearray(data)
        flip[offset] ^= 0x80
        state.write_bytes(bytes(flip))
        with pytest.raises(CorruptCheckpointError, match="checksum"):
            Node({"big": Leaf(6_000_000)}, name="root").restore_from_path(tmp_path / "big")
        assert unpickle_calls == []
    state.write_bytes(data)
    restored = Node({"big": Leaf(6_000_000)}, name="root")
    restored.restore_from_path(tmp_path / "big")
    assert (restored.children["big"].weights == tree.children["big"].weights).all()
