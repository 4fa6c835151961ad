"""The manifest file: what one checkpoint level holds, in bytes that check themselves.

Every directory of a checkpoint ckptable writes holds a ``.ckptable-manifest.json``:

- ``files``: each file's name, size and checksum;
- ``dirs``: each subdirectory's name and the checksum of *its* manifest.

So the root manifest pins the whole tree (a Merkle tree: a swapped, added or deleted
component directory changes a checksum one level up), and every component directory
is verifiable on its own, as a partial restore or a copied-out component needs. The root
manifest is written last: on an object store, where there is no atomic rename, it is the
commit record, and a directory without one is never a complete checkpoint.

The checksum algorithm (:mod:`ckptable._checksums`) is recorded in the manifest, so a
reader knows which one to use. A manifest carries a CRC-32 of its own body, so a damaged
manifest is reported as such and not as a damaged file.

This module is the record and its bytes; :mod:`ckptable._seal` builds and writes
manifests, :mod:`ckptable._manifest` checks a level against its manifest.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

from ckptable._layout import loads_json
from ckptable.errors import CorruptCheckpointError, IncompatibleCheckpointError

__all__ = ["MANIFEST_FILE", "MANIFEST_VERSION", "LevelManifest"]

#: The manifest's file name in every level (hidden, and under the reserved prefix, so it
#: can never clash with a component name; RLlib ignores files it does not know).
MANIFEST_FILE = ".ckptable-manifest.json"
MANIFEST_VERSION = 1


#: A JSON string literal, ASCII (``\\uXXXX`` escapes), as ``json.dumps`` writes it.
_quote = json.encoder.encode_basestring_ascii


@dataclasses.dataclass
class LevelManifest:
    """The parsed manifest of one level."""

    algorithm: str
    #: File name → (size in bytes, checksum).
    files: dict[str, tuple[int, str]]
    #: Subdirectory name → checksum of the subdirectory's manifest file.
    dirs: dict[str, str]
    #: Big pickle file name → checksum of its skeleton (every byte but the big byte
    #: payloads): what ``mmap=True`` verifies without reading the payloads.
    skeletons: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Bytes of the files this manifest and all manifests below it list (None: not
    #: recorded). Informational: the total of a progress bar, known from one file.
    tree_bytes: int | None = None
    #: Written inside the save of a parent level (whose manifest pins this one), not
    #: published on its own: a parent without a manifest then lost it.
    nested: bool = False

    def to_bytes(self) -> bytes:
        # The body is compact JSON with sorted keys (``_manifest.manifest_tree_bytes``
        # relies on it): exactly ``json.dumps(body, separators=(",", ":"),
        # sort_keys=True)``, built by hand because for a document this small setting up
        # the JSON encoder costs more than the text (a wide tree writes one per level).
        body_bytes = self._body_text().encode("ascii")
        # One JSON document; the CRC covers the body's exact bytes, so checking it needs
        # no re-encoding. No trailing newline: any truncation breaks the document.
        return b"".join(
            (_PREFIX, body_bytes, _SUFFIX_START, b"%08x" % zlib.crc32(body_bytes), _SUFFIX_END)
        )

    def _body_text(self) -> str:
        quote = _quote
        parts = [
            '{"algorithm":',
            quote(self.algorithm),
            ',"dirs":{',
            ",".join(
                [quote(name) + ":" + quote(digest) for name, digest in sorted(self.dirs.items())]
            ),
            '},"files":{',
            ",".join(
                [
                    f"{quote(name)}:[{_size(size)},{quote(digest)}]"
                    for name, (size, digest) in sorted(self.files.items())
                ]
            ),
            "}",
        ]
        if self.nested:
            parts.append(',"nested":true')
        if self.skeletons:
            skeletons = ",".join(
                [
                    quote(name) + ":" + quote(digest)
                    for name, digest in sorted(self.skeletons.items())
                ]
            )
            parts.append(f',"skeletons":{{{skeletons}}}')
        if self.tree_bytes is not None:
            parts.append(f',"tree_bytes":{_size(self.tree_bytes)}')
        parts.append(f',"version":{MANIFEST_VERSION}}}')
        return "".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, shown: str) -> LevelManifest:
        """Parse and self-check a manifest file's bytes (``shown`` names it in errors)."""
        suffix_length = len(_SUFFIX_START) + 8 + len(_SUFFIX_END)
        body_bytes = data[len(_PREFIX) : len(data) - suffix_length]
        stored_crc = data[len(data) - suffix_length + len(_SUFFIX_START) : -len(_SUFFIX_END)]
        if not (
            data.startswith(_PREFIX)
            and data.endswith(_SUFFIX_END)
            and data[len(data) - suffix_length :].startswith(_SUFFIX_START)
        ):
            raise CorruptCheckpointError(
                f"The manifest {shown} is unreadable (not a ckptable manifest, or truncated).",
                path=shown,
            )
        if b"%08x" % zlib.crc32(body_bytes) != stored_crc:
            raise CorruptCheckpointError(
                f"The manifest {shown} is damaged (its own checksum does not match).", path=shown
            )
        try:
            body = loads_json(body_bytes)
            if not isinstance(body, dict):
                raise TypeError("the manifest body is not an object")
        except (ValueError, TypeError) as exc:
            raise CorruptCheckpointError(
                f"The manifest {shown} is unreadable ({type(exc).__name__}: {exc}).", path=shown
            ) from exc
        version = body.get("version")
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise IncompatibleCheckpointError(
                f"The manifest {shown} has version {version!r}; this ckptable reads "
                f"versions up to {MANIFEST_VERSION}. Upgrade ckptable.",
                path=shown,
            )
        try:
            files = {str(n): (_size(s), str(d)) for n, (s, d) in body["files"].items()}
            dirs = {str(n): str(d) for n, d in body["dirs"].items()}
            algorithm = str(body["algorithm"])
            skeletons = {str(n): str(d) for n, d in body.get("skeletons", {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise CorruptCheckpointError(
                f"The manifest {shown} is malformed ({type(exc).__name__}: {exc}).", path=shown
            ) from exc
        tree_bytes = body.get("tree_bytes")
        if isinstance(tree_bytes, bool) or not isinstance(tree_bytes, int) or tree_bytes < 0:
            tree_bytes = None  # absent (older manifests), or not a count: unknown
        skeletons = {n: d for n, d in skeletons.items() if n in files}
        return cls(algorithm, files, dirs, skeletons, tree_bytes, body.get("nested") is True)


#: A manifest file is ``{"ckptable_manifest": <body>, "crc32": "<crc of body bytes>"}``.
_PREFIX = b'{"ckptable_manifest": '
_SUFFIX_START = b', "crc32": "'
_SUFFIX_END = b'"}'


def _size(value: object) -> int:
    """A file size from a manifest: a non-negative int, nothing else (not a float, whose
    ``int()`` could overflow or round, nor a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a file size must be a non-negative integer, not {value!r}")
    return value
