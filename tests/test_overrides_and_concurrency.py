"""Save overrides, concurrent saves and restores, and the edges of verification.

Regression tests for cases a review found: an override that writes files around its
``super().save_to_path`` call, a save started from another thread inside a running save,
a restore racing saves of the same path, a damaged level under an RLlib-written parent,
filesystems without locks.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import reseal

import ckptable
from ckptable import Checkpointable, CorruptCheckpointError, UnsafeCheckpointError, _storage
from ckptable._manifest import MANIFEST_FILE


class Leaf(Checkpointable):
    def __init__(self, v: int = 0) -> None:
        self.v = v

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {"v": self.v}

    def set_state(self, state: dict) -> None:
        self.v = state.get("v", self.v)

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (self.v,), {}


class Pair(Checkpointable):
    """Root with two leaves ``a`` (= v) and ``b`` (= v + 1) and some padding."""

    def __init__(self, v: int = 0, pad: int = 0) -> None:
        self.v, self.pad = v, pad
        self.a, self.b = Leaf(v), Leaf(v + 1)

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("a", self.a), ("b", self.b)]

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        state: dict[str, Any] = {"v": self.v, "pad": b"x" * self.pad}
        for name, comp in self.get_checkpointable_components():
            if self._check_component(name, components, not_components):
                state[name] = comp.get_state()
        return state

    def set_state(self, state: dict) -> None:
        self.v = state.get("v", self.v)
        for name, comp in self.get_checkpointable_components():
            if name in state:
                comp.set_state(state[name])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (self.v,), {"pad": self.pad}

    def consistent(self) -> bool:
        return self.a.v == self.v and self.b.v == self.v + 1


class WithSideFiles(Pair):
    """A save override that writes files of its own around ckptable's."""

    def save_to_path(self, path: Any = None, **kwargs: Any) -> str:
        out = super().save_to_path(path, **kwargs)
        os.makedirs(os.path.join(path, "side"))
        Path(path, "side", "data.bin").write_bytes(b"A" * 64)
        Path(path, "top.bin").write_bytes(b"B" * 64)
        return out


class Tagged(Pair):
    """A save override that edits the metadata ckptable wrote."""

    def save_to_path(self, path: Any = None, **kwargs: Any) -> str:
        out = super().save_to_path(path, **kwargs)
        metadata_file = Path(path, "metadata.json")
        metadata = json.loads(metadata_file.read_text())
        metadata["tag"] = "best"
        metadata_file.write_text(json.dumps(metadata))
        return out


class RLlibSignature(Pair):
    """An override with RLlib's exact signature: no ``durable`` parameter."""

    def save_to_path(  # type: ignore[override]
        self,
        path: Any = None,
        *,
        state: Any = None,
        filesystem: Any = None,
        use_msgpack: bool = False,
    ) -> str:
        return super().save_to_path(
            path, state=state, filesystem=filesystem, use_msgpack=use_msgpack
        )


def flip(path: Path, offset: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- overrides


def test_files_an_override_writes_around_super_are_part_of_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    WithSideFiles(1).save_to_path(path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    report = ckptable.verify_checkpoint(path)
    assert report.levels == 4  # root, a, b, side
    restored = WithSideFiles(0)
    restored.restore_from_path(path)
    assert restored.v == 1 and restored.consistent()
    for damaged in ("top.bin", "side/data.bin"):
        flip(path / damaged)
        with pytest.raises(CorruptCheckpointError, match=damaged):
            WithSideFiles(0).restore_from_path(path)
        flip(path / damaged)
    with (path / "side" / "data.bin").open("ab") as f:
        f.write(b"more")
    with pytest.raises(CorruptCheckpointError, match="data.bin"):
        WithSideFiles(0).restore_from_path(path)


def test_an_override_that_edits_ckptables_files_still_restores(tmp_path: Path) -> None:
    Tagged(1).save_to_path(tmp_path / "ckpt")
    restored = Tagged(0)
    restored.restore_from_path(tmp_path / "ckpt")
    assert restored.v == 1
    assert json.loads((tmp_path / "ckpt" / "metadata.json").read_text())["tag"] == "best"


def test_an_override_with_rllibs_signature_accepts_durable(tmp_path: Path) -> None:
    RLlibSignature(3).save_to_path(tmp_path / "ckpt", durable=False)
    restored = RLlibSignature(0)
    restored.restore_from_path(tmp_path / "ckpt")
    assert restored.v == 3


def test_a_component_saved_from_another_thread_during_a_save_does_not_deadlock(
    tmp_path: Path,
) -> None:
    """The thread starts without the save's context: it saves the component as an
    outermost save of its own, into the running save's staging directory."""

    class Threaded(Leaf):
        def save_to_path(self, path: Any = None, **kwargs: Any) -> str:
            result: list[Any] = []
            worker = threading.Thread(
                target=lambda: result.append(Leaf.save_to_path(self, path, **kwargs))
            )
            worker.start()
            worker.join(timeout=60)
            assert not worker.is_alive(), "the component's save deadlocked"
            return str(result[0])

    root = Pair(4)
    root.a = Threaded(4)
    root.save_to_path(tmp_path / "ckpt")
    restored = Pair(0)
    restored.restore_from_path(tmp_path / "ckpt")
    assert restored.a.v == 4 and restored.b.v == 5


# --------------------------------------------------------------------------- verification edges


class GrowsX(Checkpointable):
    """Creates component ``x`` in set_state (a late component)."""

    def __init__(self, has: bool = False, k: int = 0, make: Any = None) -> None:
        self.make = make or Leaf
        self.x = self.make(5) if has else None
        self.k = k

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("x", self.x)] if self.x is not None else []

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {"k": self.k}

    def set_state(self, state: dict) -> None:
        self.k = state["k"]
        if self.x is None:
            self.x = self.make()

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


def test_a_damaged_level_under_an_rllib_written_parent_is_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    GrowsX(True, k=42).save_to_path(path)
    # The root as RLlib writes it (no manifest, no record); x keeps its manifest.
    (path / MANIFEST_FILE).unlink()
    metadata = json.loads((path / "metadata.json").read_text())
    del metadata["ckptable"]
    (path / "metadata.json").write_text(json.dumps(metadata))
    # x as ckptable publishes a component saved on its own under RLlib's parent: its
    # manifest is a root's, not one written inside a parent's save (those mark the tree
    # as ckptable's whole: test_provenance.py).
    reseal(path / "x")
    flip(path / "x" / "state.pkl", -3)
    target = GrowsX(False, k=0)
    with pytest.raises(CorruptCheckpointError, match=r"x/state\.pkl"):
        target.restore_from_path(path)
    assert target.k == 0 and target.x is None


class Foreign:
    """Not a ckptable class: saves and restores itself with plain pickle."""

    def __init__(self, v: int = 0) -> None:
        self.v = v
        self.restored = False

    def save_to_path(self, path: str, **kwargs: Any) -> str:
        os.makedirs(path, exist_ok=True)
        Path(path, "blob.pkl").write_bytes(pickle.dumps({"v": self.v}))
        return path

    def restore_from_path(self, path: str, **kwargs: Any) -> None:
        self.restored = True
        self.v = pickle.loads(Path(path, "blob.pkl").read_bytes())["v"]

    def get_state(self, *args: Any, **kwargs: Any) -> dict:
        return {"v": self.v}

    def set_state(self, state: dict) -> None:
        self.v = state["v"]


def test_safe_mode_refuses_a_foreign_component_created_during_set_state(tmp_path: Path) -> None:
    GrowsX(True, make=Foreign).save_to_path(tmp_path / "ckpt")
    target = GrowsX(False, make=Foreign)
    with pytest.raises(UnsafeCheckpointError, match="'x'"):
        target.restore_from_path(tmp_path / "ckpt", safe=True)
    assert target.x is not None and not target.x.restored
    target = GrowsX(False, make=Foreign)
    target.restore_from_path(tmp_path / "ckpt")
    assert target.x is not None and target.x.v == 5


class RenamedMetadata(Pair):
    METADATA_FILE_NAME = "rllib_checkpoint.json"  # as RLlib's Algorithm


def test_a_renamed_metadata_file_still_marks_an_unfinished_save(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    RenamedMetadata(1).save_to_path(path)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        ckptable.verify_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        RenamedMetadata.from_checkpoint(path)


# --------------------------------------------------------------------------- filesystems


def test_a_filesystem_without_locks_still_saves_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(self: Any, path: str, *, blocking: bool = False) -> Any:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(_storage.LocalStorage, "lock_directory", no_locks)
    Pair(1).save_to_path(tmp_path / "ckpt")
    Pair(2).save_to_path(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["ckpt"]
    restored = Pair(0)
    restored.restore_from_path(tmp_path / "ckpt")
    assert restored.v == 2


def test_every_file_and_directory_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few files: an fsync each, including those an override or a component of
    another library wrote."""
    flushed: list[str] = []
    real = _storage.LocalStorage.fsync

    def recording(self: Any, path: str) -> None:
        flushed.append(path)
        real(self, path)

    monkeypatch.setattr(_storage.LocalStorage, "fsync", recording)
    root = WithSideFiles(1)
    root.b = Foreign(2)  # type: ignore[assignment]
    root.save_to_path(tmp_path / "ckpt")
    staging = {
        p.split(".ckptable-staging-", 1)[1].partition(os.sep)[2]
        for p in flushed
        if ".ckptable-staging-" in p
    }
    on_disk = {str(p.relative_to(tmp_path / "ckpt")) for p in (tmp_path / "ckpt").rglob("*")} | {""}
    assert on_disk <= staging, sorted(on_disk - staging)
    assert str(tmp_path) in flushed  # the parent, after the rename


# --------------------------------------------------------------------------- concurrency


def _saver(path: str, base: int, count: int) -> None:
    for k in range(count):
        Pair(base + k, pad=100_000).save_to_path(path, durable=False)


def test_restores_racing_saves_of_the_same_path_never_mix_or_fail(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    Pair(0, pad=100_000).save_to_path(path)
    context = multiprocessing.get_context("spawn")
    savers = [context.Process(target=_saver, args=(path, base, 60)) for base in (1000, 2000)]
    for saver in savers:
        saver.start()
    restores = 0
    try:
        while any(saver.is_alive() for saver in savers) or restores < 20:
            restored = Pair(-1)
            restored.restore_from_path(path)
            assert restored.consistent(), (restored.v, restored.a.v, restored.b.v)
            restores += 1
    finally:
        for saver in savers:
            saver.join(timeout=120)
            if saver.is_alive():
                saver.kill()
    assert all(saver.exitcode == 0 for saver in savers)
    print(f"{restores} restores raced {2 * 60} saves")
    assert os.listdir(tmp_path) == ["ckpt"]
