"""The manifest's bytes: compact JSON with sorted keys, built by hand for speed, must be
exactly what the JSON encoder writes (readers, and ``manifest_tree_bytes``, rely on it)."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import pytest

from ckptable._manifest import manifest_tree_bytes
from ckptable._manifest_format import MANIFEST_FILE, MANIFEST_VERSION, LevelManifest
from ckptable._storage import LocalStorage

#: Names a component's own code may write: quotes, backslashes, control characters,
#: non-ASCII (escaped as \\uXXXX, surrogate pairs beyond the BMP), JSON-looking text.
ODD_NAMES = [
    "state.pkl",
    'a"b',
    "back\\slash",
    "tab\there",
    "new\nline",
    "\x01\x1f",
    "ünïcode",
    "emoji-\U0001f600",
    '"tree_bytes":1,',
    ',"version":2}',
    "",
]


def _expected(manifest: LevelManifest) -> bytes:
    body: dict[str, object] = {
        "algorithm": manifest.algorithm,
        "dirs": manifest.dirs,
        "files": {name: [size, digest] for name, (size, digest) in manifest.files.items()},
        "version": MANIFEST_VERSION,
    }
    if manifest.nested:
        body["nested"] = True
    if manifest.skeletons:
        body["skeletons"] = manifest.skeletons
    if manifest.tree_bytes is not None:
        body["tree_bytes"] = manifest.tree_bytes
    text = json.dumps(body, separators=(",", ":"), sort_keys=True).encode("ascii")
    return b'{"ckptable_manifest": %s, "crc32": "%08x"}' % (text, zlib.crc32(text))


def _random_manifest(rng: random.Random) -> LevelManifest:
    def names(k: int) -> list[str]:
        return rng.sample(ODD_NAMES, k=min(k, len(ODD_NAMES)))

    files = {
        n: (rng.choice([0, 1, 2**40, 2**63 - 1]), f"{rng.getrandbits(64):016x}")
        for n in names(rng.randrange(5))
    }
    dirs = {n: f"{rng.getrandbits(64):016x}" for n in names(rng.randrange(4))}
    skeletons = {n: f"{rng.getrandbits(64):016x}" for n in list(files)[: rng.randrange(3)]}
    return LevelManifest(
        rng.choice(["xxh3_64", "crc32", "sha256"]),
        files,
        dirs,
        skeletons,
        rng.choice([None, 0, 12345, 2**50]),
        rng.random() < 0.5,
    )


def test_the_bytes_are_those_of_the_json_encoder_with_sorted_keys() -> None:
    rng = random.Random(20261205)
    for _ in range(500):
        manifest = _random_manifest(rng)
        assert manifest.to_bytes() == _expected(manifest)


def test_odd_names_survive_the_round_trip() -> None:
    files = {name: (index, f"{index:016x}") for index, name in enumerate(ODD_NAMES)}
    dirs = {name + "/d": f"{index:016x}" for index, name in enumerate(ODD_NAMES)}
    manifest = LevelManifest("xxh3_64", files, dirs, {"state.pkl": "ab" * 8}, 99, True)
    assert LevelManifest.from_bytes(manifest.to_bytes(), "m") == manifest


def test_the_tree_bytes_are_found_without_parsing_whatever_the_names(tmp_path: Path) -> None:
    names = {name: (1, "0" * 16) for name in ODD_NAMES}
    for tree_bytes in (None, 0, 7, 2**45):
        manifest = LevelManifest("xxh3_64", names, {'"tree_bytes":5': "1" * 16}, {}, tree_bytes)
        (tmp_path / MANIFEST_FILE).write_bytes(manifest.to_bytes())
        assert manifest_tree_bytes(LocalStorage(), str(tmp_path)) == tree_bytes


def test_a_size_that_is_not_a_count_is_refused_not_written() -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        LevelManifest("xxh3_64", {"f": (True, "0" * 16)}, {}).to_bytes()
