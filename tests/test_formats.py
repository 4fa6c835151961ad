"""The codec registry and the built-in codecs."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

import ckptable
from ckptable import CorruptCheckpointError, get_codec, register_codec, registered_codecs
from ckptable._formats import _REGISTRY
from trees import Leaf, Model, trained_model


class JsonCodec:
    name = "json-test"
    suffix = ".json-test"

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        stream.write(json.dumps(state, default=lambda a: a.tolist()).encode())

    def load(self, stream: IO[bytes]) -> Any:
        return json.loads(stream.read())


@pytest.fixture
def json_codec() -> Any:
    codec = JsonCodec()
    register_codec(codec)
    yield codec
    _REGISTRY.pop(codec.name, None)


def test_built_in_codecs_are_registered() -> None:
    assert set(registered_codecs()) >= {"cloudpickle", "msgpack"}
    assert get_codec("pickle") is get_codec("cloudpickle")
    assert get_codec("msgpack").suffix == ".msgpack"


def test_the_registry_view_is_read_only() -> None:
    with pytest.raises(TypeError):
        registered_codecs()["x"] = JsonCodec()  # type: ignore[index]


def test_a_registered_codec_is_used_by_format(tmp_path: Path, json_codec: Any) -> None:
    model = trained_model()
    model.save_to_path(tmp_path / "ckpt", format="json-test")

    assert (tmp_path / "ckpt" / "layer0" / "state.json-test").is_file()
    restored = Model.from_checkpoint(tmp_path / "ckpt")
    assert restored.epoch == 9
    assert restored.layers["layer1"].steps == 41


def test_registering_a_name_twice_needs_clobber(json_codec: Any) -> None:
    with pytest.raises(ValueError, match="registered already"):
        register_codec(JsonCodec())
    register_codec(JsonCodec(), clobber=True)


def test_registering_a_taken_suffix_is_refused(json_codec: Any) -> None:
    class Other(JsonCodec):
        name = "other-json"

    with pytest.raises(ValueError, match="Suffix '.json-test' is used by codec 'json-test'"):
        register_codec(Other())


@pytest.mark.parametrize(
    "bad",
    [object(), type("NoSuffix", (), {"name": "x", "dump": None, "load": None})()],
    ids=["plain object", "no suffix"],
)
def test_registering_something_that_is_no_codec_is_refused_at_once(bad: Any) -> None:
    with pytest.raises(TypeError, match="not a codec"):
        register_codec(bad)


def test_a_codec_with_a_bad_suffix_is_refused() -> None:
    class BadSuffix(JsonCodec):
        name = "bad-suffix"
        suffix = "json/x"

    with pytest.raises(TypeError, match="suffix"):
        register_codec(BadSuffix())


def test_msgpack_codec_never_patches_msgpack_globally(tmp_path: Path) -> None:
    import msgpack

    packer, unpackb = msgpack.Packer, msgpack.unpackb
    trained_model().save_to_path(tmp_path / "ckpt", use_msgpack=True)
    Model.from_checkpoint(tmp_path / "ckpt")

    assert msgpack.Packer is packer and msgpack.unpackb is unpackb
    # In a fresh interpreter (here RLlib, imported by other test modules, has patched
    # msgpack already): after a msgpack save and restore, msgpack is still msgpack's.
    import subprocess
    import sys

    code = (
        "import msgpack, tempfile, os; from trees import trained_model, Model\n"
        "d = tempfile.mkdtemp(); trained_model().save_to_path(d + '/c', use_msgpack=True)\n"
        "Model.from_checkpoint(d + '/c')\n"
        "print(msgpack.Packer.__module__, msgpack.unpackb.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    ).stdout
    assert "msgpack_numpy" not in out and out.startswith("msgpack")


def test_msgpack_files_use_msgpack_numpys_encoding() -> None:
    import msgpack
    import msgpack_numpy

    state = {"w": np.arange(6, dtype=np.float64).reshape(2, 3), "n": 3, "s": "x"}
    stream = io.BytesIO()
    get_codec("msgpack").dump(state, stream)

    decoded = msgpack.unpackb(stream.getvalue(), object_hook=msgpack_numpy.decode)
    np.testing.assert_array_equal(decoded["w"], state["w"])
    assert stream.getvalue() == msgpack.packb(state, default=msgpack_numpy.encode)


def test_unencodable_state_names_the_component(tmp_path: Path) -> None:
    model = trained_model()
    model.optimizer.config["fn"] = lambda x: x  # msgpack cannot hold a function

    with pytest.raises(ckptable.CheckpointError, match="optimizer.*msgpack"):
        model.save_to_path(tmp_path / "ckpt", use_msgpack=True)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- hostile msgpack


def _msgpack_level(tmp_path: Path, payload: bytes) -> Path:
    """A checkpoint whose root state file is ``payload`` (resealed: only the decoder
    stands between the bytes and memory)."""
    from helpers import reseal

    Leaf().save_to_path(tmp_path / "ckpt", use_msgpack=True)
    (tmp_path / "ckpt" / "state.msgpack").write_bytes(payload)
    reseal(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xdd\xff\xff\xff\xff",  # an array of 4 billion items
        b"\xdf\xff\xff\xff\xff",  # a map of 4 billion pairs
        b"\xc6\xff\xff\xff\xff" + b"x" * 10,  # 4 GiB of bytes
        b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # a 4 GiB string
        b"\xc9\xff\xff\xff\xff\x01",  # a 4 GiB extension value
        b"\x81\xa1a" + b"\x91" * 100_000 + b"\xc0",  # nested 100,000 deep
        bytes(range(256)) * 4,  # garbage
        b"",
    ],
    ids=["array", "map", "bin", "str", "ext", "deep", "garbage", "empty"],
)
def test_hostile_msgpack_fails_fast_without_memory(tmp_path: Path, payload: bytes) -> None:
    import tracemalloc

    path = _msgpack_level(tmp_path, payload)
    target = Leaf()
    before = target.get_state()
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match=r"state\.msgpack"):
            target.restore_from_path(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert str(target.get_state()) == str(before)


@pytest.mark.parametrize("safe", [False, True])
def test_a_msgpack_array_claiming_a_huge_shape_fails_fast(tmp_path: Path, safe: bool) -> None:
    import tracemalloc

    import msgpack

    fake = {b"nd": True, b"type": "<f8", b"kind": b"", b"shape": [1 << 40], b"data": b"x" * 8}
    path = _msgpack_level(tmp_path, msgpack.packb({"weights": fake}, use_bin_type=True))
    tracemalloc.start()
    try:
        with pytest.raises(ckptable.CheckpointError, match=r"state\.msgpack"):
            Leaf().restore_from_path(path, safe=safe)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
