"""Reading checkpoint files that cannot be trusted: damaged lengths and special files.

Two classes of defect, each tested with the real thing (no mocks of the damage):

- **A length read from a file is checked before it allocates.** A flipped bit in the
  8-byte length of a big array's ``BYTEARRAY8`` payload in ``state.pkl`` (set to
  ``2**62``, ``2**64 - 1``, just past the end of the file, 0) must end as a
  ``CorruptCheckpointError`` naming ``state.pkl``, the object untouched, whether the
  file is verified against its manifest, read unverified, or mapped (``mmap=True``);
  never a ``MemoryError`` or ``SystemError``, and no buffer bigger than the file is
  ever asked for. ``CheckpointManager.restore_latest`` then falls back a step.
- **No file of a checkpoint is opened before it is known to be a regular file.** A FIFO
  in place of the manifest, ``state.pkl``, ``metadata.json`` or
  ``class_and_ctor_args.pkl`` blocks any ``open`` of it forever; restores, verification
  and the CLI, with a progress bar on (which reads the manifest's size first), must
  refuse it promptly with an ``UnsafeCheckpointError`` naming it. Each call runs under a
  time limit, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

import ckptable
from ckptable import (
    Checkpointable,
    CheckpointManager,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnverifiedCheckpointWarning,
    _pickle_scan,
)
from ckptable._manifest import MANIFEST_FILE, manifest_tree_bytes
from ckptable._pickle_scan import PAYLOAD_MIN_BYTES, ScanError, scan_pickle
from ckptable._storage import LocalStorage
from helpers import assert_states_equal, reseal
from test_big_arrays import Arrays as Box  # a state of big arrays and small values

#: Bytes of the big array: over the threshold above which a payload gets its own buffer.
BIG = 2 * PAYLOAD_MIN_BYTES
#: Bytes of an array whose file a restore never keeps whole in memory: it is verified as
#: it is scanned, whether or not the manifest records its skeleton.
UNKEPT = 17 << 20
#: Seconds any one call may take before it counts as hung.
HANG_SECONDS = 30.0


class Holder(Checkpointable):
    """A parent whose ``Box`` component holds the big array (a level below the root)."""

    def __init__(self) -> None:
        self.box = Box()
        self.step = 0

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("box", self.box)]

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = state["step"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


def big_state(step: int = 1, nbytes: int = BIG) -> dict[str, Any]:
    # 0xFF is no pickle opcode: a length set to 0 makes the array's bytes an invalid
    # opcode, not code that runs.
    return {"big": np.full(nbytes, 0xFF, dtype=np.uint8), "step": step}


def length_offset(state_file: Path, nbytes: int = BIG) -> int:
    """Offset of the 8-byte length of the big array's ``BYTEARRAY8`` payload."""
    data = state_file.read_bytes()
    marker = pickle.BYTEARRAY8 + nbytes.to_bytes(8, "little")
    assert data.count(marker) == 1, "the big array is not one BYTEARRAY8 payload"
    return data.index(marker) + 1


def flip_length(state_file: Path, value: str, nbytes: int = BIG) -> int:
    """Overwrite the big payload's length in place; returns the file's size."""
    offset = length_offset(state_file, nbytes)
    size = state_file.stat().st_size
    new = {
        "2**62": 2**62,
        "2**63-1": 2**63 - 1,
        "2**64-1": 2**64 - 1,
        "file_size+1": size + 1,
        "one_past_the_end": size - (offset + 8) + 1,
        "zero": 0,
    }[value]
    with open(state_file, "r+b") as stream:
        stream.seek(offset)
        stream.write(new.to_bytes(8, "little"))
    assert state_file.stat().st_size == size
    return size


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of every payload buffer the scanner asks for."""
    asked: list[int] = []
    real = _pickle_scan._new_payload_buffer

    def spy(n: int) -> bytearray:
        asked.append(n)
        return real(n)

    monkeypatch.setattr(_pickle_scan, "_new_payload_buffer", spy)
    return asked


FLIPS = ["2**62", "2**63-1", "2**64-1", "file_size+1", "one_past_the_end", "zero"]
MODES = {
    "verified": {},
    "verified_safe": {"safe": True},
    "unverified": {"verify": False},
    "mapped": {"mmap": True},
    "mapped_unverified": {"mmap": True, "verify": False},
}


def assert_names(exc: BaseException, name: str) -> None:
    assert name in str(exc), str(exc)
    path = getattr(exc, "path", None)
    assert path is not None and Path(path).name == name, path


# --------------------------------------------------------------------------- flipped lengths


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("flip", FLIPS)
def test_a_flipped_big_payload_length_is_corrupt_not_an_allocation(
    tmp_path: Path, flip: str, mode: str, allocations: list[int]
) -> None:
    path = Box(big_state()).save_to_path(tmp_path / "ckpt")
    size = flip_length(Path(path) / "state.pkl", flip)
    box = Box({"untouched": True})

    with pytest.raises(CorruptCheckpointError) as caught:
        box.restore_from_path(path, **MODES[mode])

    assert_names(caught.value, "state.pkl")
    assert box.state == {"untouched": True}
    assert all(n <= size for n in allocations), allocations


@pytest.mark.parametrize("mode", ["verified", "mapped"])
@pytest.mark.parametrize("flip", ["2**62", "2**64-1", "file_size+1"])
def test_a_flipped_length_the_manifest_vouches_for_is_still_corrupt(
    tmp_path: Path, flip: str, mode: str, allocations: list[int]
) -> None:
    # The bit flipped before the manifest was written (or the manifest was rewritten):
    # the checksums match, yet the length runs past the end of the file. (A file this
    # big is not kept in memory whole: it is verified as it is scanned.)
    path = Box(big_state(nbytes=UNKEPT)).save_to_path(tmp_path / "ckpt")
    size = flip_length(Path(path) / "state.pkl", flip, UNKEPT)
    reseal(path)
    box = Box({"untouched": True})

    with pytest.raises(CorruptCheckpointError) as caught:
        box.restore_from_path(path, **MODES[mode])

    assert_names(caught.value, "state.pkl")
    assert box.state == {"untouched": True}
    assert all(n <= size for n in allocations), allocations


def test_a_flipped_length_below_the_root_is_corrupt(tmp_path: Path, allocations: list[int]) -> None:
    holder = Holder()
    holder.box.state = big_state()
    path = holder.save_to_path(tmp_path / "ckpt")
    size = flip_length(Path(path) / "box" / "state.pkl", "2**62")
    fresh = Holder()

    with pytest.raises(CorruptCheckpointError) as caught:
        fresh.restore_from_path(path)

    assert_names(caught.value, "state.pkl")
    assert "box" in str(caught.value)
    assert fresh.box.state == {} and fresh.step == 0
    assert all(n <= size for n in allocations), allocations
    with pytest.raises(CorruptCheckpointError, match="state.pkl"):
        Holder.from_checkpoint(path)


def test_a_flipped_frame_length_is_corrupt(tmp_path: Path, allocations: list[int]) -> None:
    path = Box(big_state()).save_to_path(tmp_path / "ckpt")
    state_file = Path(path) / "state.pkl"
    data = bytearray(state_file.read_bytes())
    assert data[2] == pickle.FRAME[0]  # PROTO 5, then the first frame's 8-byte length
    data[3:11] = (2**62).to_bytes(8, "little")
    state_file.write_bytes(bytes(data))
    for options in MODES.values():
        box = Box({"untouched": True})
        with pytest.raises(CorruptCheckpointError) as caught:
            box.restore_from_path(path, **options)
        assert_names(caught.value, "state.pkl")
        assert box.state == {"untouched": True}
    assert all(n <= len(data) for n in allocations), allocations


def test_restore_latest_falls_back_past_a_flipped_length(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run")
    manager.save(Box(big_state(step=1)), step=1)
    manager.save(Box(big_state(step=2)), step=2)
    flip_length(Path(manager.latest() or "") / "state.pkl", "2**62")
    box = Box({"untouched": True})

    restored = manager.restore_latest(box)

    assert restored == 1
    assert box.state["step"] == 1
    np.testing.assert_array_equal(box.state["big"], big_state()["big"])
    (invalid,) = manager.invalid_checkpoints().values()
    assert "state.pkl" in invalid


def write_rllib_level(directory: Path, state: dict[str, Any]) -> None:
    """The files RLlib's ``Checkpointable`` writes for ``Box``: no manifest, no record."""
    directory.mkdir()
    metadata = {
        "class_and_ctor_args_file": "class_and_ctor_args.pkl",
        "state_file": "state",
        "ray_version": "2.60.0",
        "ray_commit": "unknown",
        "checkpoint_version": "2.1",
    }
    (directory / "metadata.json").write_text(json.dumps(metadata))
    with open(directory / "class_and_ctor_args.pkl", "wb") as stream:
        cloudpickle.dump({"class": Box, "ctor_args_and_kwargs": ((), {})}, stream)
    with open(directory / "state.pkl", "wb") as stream:
        pickle.dump(state, stream, protocol=5)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("flip", ["2**62", "2**64-1", "file_size+1"])
def test_a_flipped_length_in_a_level_rllib_wrote_is_corrupt(
    tmp_path: Path, flip: str, mmap: bool, allocations: list[int]
) -> None:
    path = tmp_path / "rllib"
    write_rllib_level(path, big_state())
    size = flip_length(path / "state.pkl", flip)
    box = Box({"untouched": True})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
        with pytest.raises(CorruptCheckpointError) as caught:
            box.restore_from_path(path, mmap=mmap)

    assert_names(caught.value, "state.pkl")
    assert box.state == {"untouched": True}
    assert all(n <= size for n in allocations), allocations


@pytest.mark.parametrize("flip", ["2**62", "2**64-1", "file_size+1"])
def test_the_walk_checks_a_length_before_allocating_it(flip: str, allocations: list[int]) -> None:
    data = pickle.dumps(big_state(), protocol=5)
    marker = pickle.BYTEARRAY8 + BIG.to_bytes(8, "little")
    offset = data.index(marker) + 1
    value = {"2**62": 2**62, "2**64-1": 2**64 - 1, "file_size+1": len(data) + 1}[flip]
    damaged = data[:offset] + value.to_bytes(8, "little") + data[offset + 8 :]

    for mode in ("read", "skeleton"):
        with pytest.raises(ScanError, match="past the end"):
            scan_pickle(io.BytesIO(damaged), mode)  # type: ignore[arg-type]
    assert allocations == []


def test_an_unverified_pickle_is_read_with_its_lengths_checked(
    tmp_path: Path, allocations: list[int]
) -> None:
    state_file = tmp_path / "state.pkl"
    state_file.write_bytes(pickle.dumps(big_state(), protocol=5))
    storage = LocalStorage()

    scanned = _pickle_scan.read_pickle_unverified(storage, str(state_file), skeleton_limit=None)
    assert scanned is not None and len(scanned.buffers) == 1
    assert_states_equal(pickle.load(scanned.open(), buffers=scanned.buffers), big_state())

    size = flip_length(state_file, "2**62")
    allocations.clear()
    with pytest.raises(CorruptCheckpointError) as caught:
        _pickle_scan.read_pickle_unverified(storage, str(state_file), skeleton_limit=None)
    assert_names(caught.value, "state.pkl")
    assert all(n <= size for n in allocations), allocations


def test_an_intact_checkpoint_still_restores_every_way(tmp_path: Path) -> None:
    path = Box(big_state()).save_to_path(tmp_path / "ckpt")
    for options in MODES.values():
        box = Box()
        box.restore_from_path(path, **options)
        assert_states_equal(box.state, big_state())


# --------------------------------------------------------------------------- special files


def call_with_timeout(function: Callable[[], Any], fifos: list[Path]) -> BaseException | None:
    """Run ``function`` in a thread for at most ``HANG_SECONDS``; returns what it raised.

    If it hangs (blocked opening a FIFO), the FIFOs are opened for writing and closed
    (the blocked reader then sees an empty file and goes on) and the test fails."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            function()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):  # (nobody is blocked reading this one)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(HANG_SECONDS)
        pytest.fail(f"hung for {HANG_SECONDS} s on a FIFO in the checkpoint")
    return outcome[0]


FIFO_TARGETS = [MANIFEST_FILE, "state.pkl", "metadata.json", "class_and_ctor_args.pkl"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return Path(Box(big_state()).save_to_path(tmp_path / "ckpt"))


def put_fifo(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


OPERATIONS: dict[str, Callable[[Path], Any]] = {
    "restore": lambda p: Box({"untouched": True}).restore_from_path(p, progress=True),
    "restore_mmap": lambda p: Box().restore_from_path(p, progress=True, mmap=True),
    "restore_unverified": lambda p: Box().restore_from_path(p, progress=True, verify=False),
    "restore_safe": lambda p: Box().restore_from_path(p, progress=True, safe=True),
    "from_checkpoint": lambda p: Box.from_checkpoint(p, progress=True),
    "verify_checkpoint": lambda p: ckptable.verify_checkpoint(p, progress=True),
}

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


@needs_fifo
@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("target", FIFO_TARGETS)
def test_a_fifo_in_the_checkpoint_is_refused_not_waited_on(
    checkpoint: Path, target: str, operation: str
) -> None:
    fifo = put_fifo(checkpoint / target)

    raised = call_with_timeout(lambda: OPERATIONS[operation](checkpoint), [fifo])

    assert isinstance(raised, UnsafeCheckpointError), repr(raised)
    assert_names(raised, target)


@needs_fifo
def test_a_fifo_manifest_is_refused_with_the_bar_on_from_the_environment(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTABLE_PROGRESS", "1")
    fifo = put_fifo(checkpoint / MANIFEST_FILE)
    box = Box({"untouched": True})

    for call in (lambda: box.restore_from_path(checkpoint),
                 lambda: ckptable.verify_checkpoint(checkpoint)):  # fmt: skip
        raised = call_with_timeout(call, [fifo])
        assert isinstance(raised, UnsafeCheckpointError), repr(raised)
        assert_names(raised, MANIFEST_FILE)
    assert box.state == {"untouched": True}


@needs_fifo
def test_the_manifest_size_for_the_bar_never_opens_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / MANIFEST_FILE
    os.mkfifo(fifo)
    result: list[int | None] = []

    raised = call_with_timeout(
        lambda: result.append(manifest_tree_bytes(LocalStorage(), str(tmp_path))), [fifo]
    )

    assert raised is None and result == [None]


@needs_fifo
@pytest.mark.parametrize("special", ["fifo", "symlink"])
@pytest.mark.parametrize("reader", ["verified", "verified_mapped", "unverified", "mapped",
                                    "skeleton"])  # fmt: skip
def test_the_pickle_readers_open_only_regular_files(
    tmp_path: Path, reader: str, special: str
) -> None:
    # Called on the special file directly: the listing that refuses it first can be
    # raced (a FIFO or symlink put in place between the listing and the open).
    fifo = tmp_path / "state.pkl"
    if special == "fifo":
        os.mkfifo(fifo)
    else:
        target = tmp_path / "elsewhere.pkl"
        target.write_bytes(pickle.dumps(big_state(), protocol=5))
        fifo.symlink_to(target)
    storage, path = LocalStorage(), str(fifo)
    calls: dict[str, Callable[[], Any]] = {
        "verified": lambda: _pickle_scan.read_pickle_verified(
            storage, path, (10, "0"), "crc32", skeleton=None, mmap=False, skeleton_limit=1 << 20
        ),
        "verified_mapped": lambda: _pickle_scan.read_pickle_verified(
            storage, path, (10, "0"), "crc32", skeleton="0", mmap=True, skeleton_limit=1 << 20
        ),
        "unverified": lambda: _pickle_scan.read_pickle_unverified(
            storage, path, skeleton_limit=None
        ),
        "mapped": lambda: _pickle_scan.map_pickle(storage, path),
        "skeleton": lambda: _pickle_scan.skeleton_checksum(storage, path, "crc32"),
    }

    raised = call_with_timeout(calls[reader], [fifo])

    assert isinstance(raised, UnsafeCheckpointError), repr(raised)
    assert_names(raised, "state.pkl")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CKPTABLE_PROGRESS="1")
    try:
        return subprocess.run(
            [sys.executable, "-m", "ckptable.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=HANG_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`ckptable {' '.join(args)}` hung for {HANG_SECONDS} s on a FIFO")


@needs_fifo
@pytest.mark.parametrize("target", FIFO_TARGETS)
def test_ckptable_verify_refuses_a_fifo_promptly(checkpoint: Path, target: str) -> None:
    put_fifo(checkpoint / target)

    result = run_cli("verify", str(checkpoint))

    assert result.returncode != 0
    assert str(checkpoint / target) in result.stderr, result.stderr
    assert "special file" in result.stderr, result.stderr


@needs_fifo
@pytest.mark.parametrize("target", FIFO_TARGETS)
def test_ckptable_info_refuses_a_fifo_promptly(checkpoint: Path, target: str) -> None:
    fifo = put_fifo(checkpoint / target)

    raised = call_with_timeout(lambda: ckptable.get_checkpoint_info(checkpoint), [fifo])
    assert isinstance(raised, UnsafeCheckpointError), repr(raised)
    assert_names(raised, target)

    result = run_cli("info", str(checkpoint))
    assert result.returncode != 0
    assert str(checkpoint / target) in result.stderr, result.stderr
    assert "special file" in result.stderr, result.stderr


def test_a_scanned_skeleton_never_hands_pickle_more_than_it_holds() -> None:
    # pickle asks its stream for what a length inside a frame says, before it knows
    # whether that much follows: the skeleton's reader must not allocate it.
    reader = _pickle_scan.ScannedPickle([b"ab", b"cd"], [], 4).open()
    assert reader.read(2**62) == b"abcd"
    assert reader.read(2**62) == b""


def test_through_a_pyarrow_filesystem_too(tmp_path: Path, allocations: list[int]) -> None:
    # Not the local fast path: the kind of a file comes from the storage, the size of an
    # unverified one from its seekable stream.
    import pyarrow.fs

    filesystem = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    Box(big_state()).save_to_path("ckpt", filesystem=filesystem)
    size = flip_length(tmp_path / "ckpt" / "state.pkl", "2**62")
    for options in ({}, {"verify": False}):
        box = Box({"untouched": True})
        with pytest.raises(CorruptCheckpointError) as caught:
            box.restore_from_path("ckpt", filesystem=filesystem, **options)
        assert_names(caught.value, "state.pkl")
        assert box.state == {"untouched": True}
    assert all(n <= size for n in allocations), allocations

    if hasattr(os, "mkfifo"):
        Box(big_state()).save_to_path("fifo", filesystem=filesystem)
        fifo = put_fifo(tmp_path / "fifo" / MANIFEST_FILE)
        raised = call_with_timeout(
            lambda: Box().restore_from_path("fifo", filesystem=filesystem, progress=True), [fifo]
        )
        assert isinstance(raised, UnsafeCheckpointError), repr(raised)
        assert_names(raised, MANIFEST_FILE)


def test_an_unverified_restore_allocates_no_more_than_the_file(tmp_path: Path) -> None:
    import tracemalloc

    path = Box(big_state()).save_to_path(tmp_path / "ckpt")
    state_file = Path(path) / "state.pkl"
    offset = length_offset(state_file)
    size = state_file.stat().st_size
    with open(state_file, "r+b") as stream:  # a length pickle can allocate, then finds less
        stream.seek(offset)
        stream.write((16 * size).to_bytes(8, "little"))
    box = Box({"untouched": True})

    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="state.pkl"):
            box.restore_from_path(path, verify=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert box.state == {"untouched": True}
    assert peak < 4 * size, f"{peak} bytes allocated for a file of {size}"


#: Bytes of an array pickle writes outside its frames (over 64 KiB) in a file read
#: whole before its walk (under ``SMALL_FILE_BYTES``).
SMALL_OUT_OF_FRAME = 200_000


@pytest.mark.parametrize("rllib", [False, True])
@pytest.mark.parametrize("factor", [16, 2**40])
def test_a_small_unverified_file_is_walked_before_it_is_decoded(
    tmp_path: Path, rllib: bool, factor: int
) -> None:
    """A file under ``SMALL_FILE_BYTES`` is read whole, in memory: a damaged length in it
    is still caught by the walk before pickle allocates what it says."""
    import tracemalloc

    from ckptable._pickle_scan import SMALL_FILE_BYTES

    state = big_state(nbytes=SMALL_OUT_OF_FRAME)
    if rllib:
        path = tmp_path / "rllib"
        write_rllib_level(path, state)
    else:
        path = Path(Box(state).save_to_path(tmp_path / "ckpt"))
    state_file = path / "state.pkl"
    size = state_file.stat().st_size
    assert size < SMALL_FILE_BYTES
    # Read whole and handed to the decoder as bytes (not walked on the file).
    read = _pickle_scan.read_pickle_unverified(LocalStorage(), str(state_file), skeleton_limit=None)
    assert read == state_file.read_bytes()
    intact = Box()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
        intact.restore_from_path(path, verify=False)
    assert_states_equal(intact.state, state)

    offset = length_offset(state_file, SMALL_OUT_OF_FRAME)
    with open(state_file, "r+b") as stream:
        stream.seek(offset)
        stream.write((factor * size).to_bytes(8, "little"))
    box = Box({"untouched": True})
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
            with pytest.raises(CorruptCheckpointError) as caught:
                box.restore_from_path(path, verify=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_names(caught.value, "state.pkl")
    assert "past the end" in str(caught.value)
    assert box.state == {"untouched": True}
    # (Under a mebibyte of the restore's own, whatever the damaged length claims.)
    assert peak < 8 * size, f"{peak} bytes allocated for a file of {size}"
