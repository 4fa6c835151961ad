"""A tree that shows ckptable's records anywhere is ckptable's and verifies as such:
deleting the root's manifest and metadata does not turn it into an unverified RLlib
checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.trees import Model, blank_three_level_tree, three_level_tree

from ckptable import CorruptCheckpointError, verify_checkpoint
from ckptable._manifest import MANIFEST_FILE


@pytest.fixture
def stripped(tmp_path: Path) -> Path:
    """A ckptable checkpoint whose root manifest and root metadata.json were deleted,
    and whose root state was then damaged (nothing checks it any more)."""
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    (path / MANIFEST_FILE).unlink()
    (path / "metadata.json").unlink()
    state = path / "state.pkl"
    data = bytearray(state.read_bytes())
    data[-5] ^= 0x01
    state.write_bytes(bytes(data))
    return path


def test_restore_refuses_a_tree_whose_root_lost_its_manifest(stripped: Path) -> None:
    target = blank_three_level_tree()
    with pytest.raises(CorruptCheckpointError, match="manifest") as caught:
        target.restore_from_path(stripped)
    assert "encoder" in str(caught.value) or "head" in str(caught.value)
    assert target.children["head"].steps == 0  # untouched


def test_verify_refuses_it(stripped: Path) -> None:
    with pytest.raises(CorruptCheckpointError, match="deleted or lost"):
        verify_checkpoint(stripped)


def test_the_command_does_not_print_ok(stripped: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ckptable.cli", "verify", str(stripped)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ok" not in done.stdout.lower().split()
    assert "deleted or lost" in done.stderr


def test_from_checkpoint_refuses_it(tmp_path: Path) -> None:
    path = tmp_path / "model"
    Model(layers=2).save_to_path(path)
    (path / MANIFEST_FILE).unlink()
    (path / "metadata.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="deleted or lost"):
        Model.from_checkpoint(path)


def test_only_component_manifests_saved_inside_a_parent_are_marked_nested(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)

    def body(manifest: Path) -> dict:
        raw = manifest.read_bytes()
        return json.loads(raw[len(b'{"ckptable_manifest": ') : raw.rindex(b', "crc32"')])

    assert "nested" not in body(path / MANIFEST_FILE)
    assert body(path / "encoder" / MANIFEST_FILE)["nested"] is True
    assert body(path / "encoder" / "a" / MANIFEST_FILE)["nested"] is True
    # A component saved on its own is a root: not nested.
    three_level_tree().children["head"].save_to_path(tmp_path / "head")
    assert "nested" not in body(tmp_path / "head" / MANIFEST_FILE)
