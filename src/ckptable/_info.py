"""``get_checkpoint_info``: what a checkpoint holds, without loading (or unpickling) it.

It understands ckptable's layout and all of RLlib's: the ``Checkpointable`` layout
(``metadata.json``/``rllib_checkpoint.json``, ``class_and_ctor_args.pkl``, ``state.*``),
the 1.x Algorithm layout (``rllib_checkpoint.json``, ``algorithm_state.*``,
``policies/``), Policy checkpoints (``policy_state.*``) and the 0.1 ``checkpoint-N`` file.
The keys RLlib's own ``get_checkpoint_info`` returns (``type``, ``format``,
``checkpoint_version``, ``checkpoint_dir``, ``state_file``, ``policy_ids``,
``module_ids``) are there, plus ``class``, ``components`` and ``metadata``.

Class names come from ckptable's record in ``metadata.json`` or, for RLlib checkpoints,
from reading the opcodes of ``class_and_ctor_args.pkl`` with ``pickletools`` — nothing is
imported or executed.
"""

from __future__ import annotations

import dataclasses
import pickletools
import re
from typing import Any

from packaging.version import Version

from ckptable._commit import recover_leftovers
from ckptable._layout import DEFAULT_CLASS_FILE, read_metadata_file, record_of
from ckptable._manifest import (
    MANIFEST_FILE,
    check_listing,
    hash_file,
    manifest_tree_bytes,
    read_manifest,
    read_verified,
    refuse_special_entries,
    require_manifest_unless_foreign,
)
from ckptable._progress import progress_bar
from ckptable._storage import Storage, resolve_storage
from ckptable.errors import CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["VerifyReport", "get_checkpoint_info", "stored_class_name", "verify_checkpoint"]

_METADATA_FILES = ("metadata.json", "rllib_checkpoint.json")
_FORMATS = {".pkl": "cloudpickle", ".msgpack": "msgpack", ".msgpck": "msgpack"}
_LEARNER_MODULES = ("learner_group", "learner", "rl_module")


def get_checkpoint_info(path: Any, filesystem: Any = None) -> dict[str, Any]:
    """Describe the checkpoint at ``path`` (a directory, or an old ``checkpoint-N`` file).

    Returns:
        A dict with ``checkpoint_dir``, ``checkpoint_version`` (a
        ``packaging.version.Version``), ``format`` (``"cloudpickle"`` or ``"msgpack"``),
        ``class`` (import path or None), ``components`` (name → the same dict, nested),
        ``metadata`` (the level's metadata JSON), ``type`` (``"Checkpointable"``,
        ``"Algorithm"`` or ``"Policy"``), ``state_file``, ``policy_ids`` and
        ``module_ids`` (sets, or None), and ``ckptable`` (ckptable's record, or None).

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptCheckpointError: a directory that is no checkpoint of any known layout.
    """
    storage, root = resolve_storage(path, filesystem)
    kind = storage.kind(root, follow_symlinks=True)
    shown = storage.display(root)
    if kind is None:
        raise CheckpointNotFoundError(f"No checkpoint at {shown}.", path=shown)
    if kind == "file":
        parent = storage.split(root)[0]
        return _base_info(storage.display(parent), Version("0.1"), state_file=shown)
    if kind != "dir":
        raise CorruptCheckpointError(f"{shown} is neither a file nor a directory.", path=shown)
    return _describe_dir(storage, root)


def _base_info(checkpoint_dir: str, version: Version, **extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": "Algorithm",
        "format": "cloudpickle",
        "checkpoint_version": version,
        "checkpoint_dir": checkpoint_dir,
        "state_file": None,
        "policy_ids": None,
        "module_ids": None,
        "class": None,
        "components": {},
        "metadata": {},
        "ckptable": None,
    }
    info.update(extra)
    return info


def _describe_dir(
    storage: Storage, directory: str, metadata_file: str | None = None
) -> dict[str, Any]:
    shown = storage.display(directory)
    entries = storage.listdir(directory)
    files = {name for name, kind in entries.items() if kind == "file"}

    for name in sorted(files):  # RLlib 0.1: a single checkpoint-<iteration> file
        if re.match(r"checkpoint-\d+", name):
            return _base_info(shown, Version("0.1"), state_file=name)

    metadata: dict[str, Any] = {}
    for name in (metadata_file, *_METADATA_FILES) if metadata_file else _METADATA_FILES:
        if name in files:
            metadata = read_metadata_file(storage, storage.join(directory, name))
            break
    record = record_of(metadata)
    info = _base_info(shown, Version(str(metadata.get("checkpoint_version", "1.1"))))
    info["metadata"] = metadata
    info["ckptable"] = record
    for key in ("type", "format", "policy_ids", "module_ids"):  # rllib_checkpoint.json keys
        if key in metadata:
            info[key] = (
                set(metadata[key]) if key.endswith("_ids") and metadata[key] else metadata[key]
            )

    for suffix in (".pkl", ".msgpck"):  # an old-stack Policy checkpoint
        if "policy_state" + suffix in files:
            info.update(
                type="Policy",
                format=_FORMATS[suffix],
                state_file=_shown(storage, directory, "policy_state" + suffix),
            )
            return info

    state_file = _find_state_file(files, metadata, record)
    if state_file is None:
        raise CorruptCheckpointError(
            f"{shown} is not a checkpoint: it has no class_and_ctor_args.pkl, no "
            "state.[pkl|msgpack], no algorithm_state.[pkl|msgpack|msgpck] and no "
            "checkpoint-N file.",
            path=shown,
        )
    stem, _, ext = state_file.rpartition(".")
    info["state_file"] = _shown(storage, directory, state_file)
    info["format"] = record["format"] if record else _FORMATS["." + ext]
    if DEFAULT_CLASS_FILE in files or record:
        info["type"] = "Algorithm" if stem == "algorithm_state" else "Checkpointable"
        info["class"] = (
            record["class"]
            if record
            else _class_in_pickle(storage, storage.join(directory, DEFAULT_CLASS_FILE))
        )
    info["components"] = _describe_components(storage, directory, entries, record)

    if entries.get("policies") == "dir":
        info["policy_ids"] = set(storage.listdir(storage.join(directory, "policies")))
    modules = storage.join(directory, *_LEARNER_MODULES)
    if storage.kind(modules) == "dir":
        info["module_ids"] = {
            name for name, kind in storage.listdir(modules).items() if kind == "dir"
        }
    return info


def _find_state_file(
    files: set[str], metadata: dict[str, Any], record: dict[str, Any] | None
) -> str | None:
    if record and isinstance(record.get("state_file"), str) and record["state_file"] in files:
        return str(record["state_file"])
    stems = [metadata.get("state_file"), "state", "algorithm_state", "module_state"]
    for stem in stems:
        if not isinstance(stem, str):
            continue
        for suffix in (".msgpack", ".msgpck", ".pkl"):
            if stem + suffix in files:
                return stem + suffix
    return None


def _describe_components(
    storage: Storage, directory: str, entries: dict[str, Any], record: dict[str, Any] | None
) -> dict[str, Any]:
    if record is not None:
        names = [n for n in record.get("components", []) if isinstance(n, str)]
    else:
        names = [
            name
            for name, kind in sorted(entries.items())
            if kind == "dir"
            and storage.kind(storage.join(directory, name, DEFAULT_CLASS_FILE)) == "file"
        ]
    components = {}
    for name in names:
        child = storage.join(directory, name)
        if storage.kind(child) != "dir":
            raise CorruptCheckpointError(
                f"The component directory {storage.display(child)} recorded in the "
                "checkpoint's metadata is missing.",
                path=storage.display(directory),
                component=name,
            )
        hint = (record or {}).get("component_metadata_files", {}).get(name)
        components[name] = _describe_dir(storage, child, hint if isinstance(hint, str) else None)
    return components


def stored_class_name(
    storage: Storage, directory: str, metadata_file: str, class_file: str
) -> str | None:
    """The import path of the class a level was saved from, without unpickling; None if
    unknown (no such files, or a class pickled by value)."""
    entries = storage.listdir(directory)
    if entries.get(metadata_file) == "file":
        record = record_of(read_metadata_file(storage, storage.join(directory, metadata_file)))
        if record is not None and isinstance(record.get("class"), str):
            return str(record["class"])
    if entries.get(class_file) == "file":
        return _class_in_pickle(storage, storage.join(directory, class_file))
    return None


def _shown(storage: Storage, directory: str, name: str) -> str:
    return storage.display(storage.join(directory, name))


def _class_in_pickle(storage: Storage, path: str) -> str | None:
    """The import path of the ``"class"`` entry of a class file, read from its opcodes.

    Returns None when the class was pickled by value (defined in ``__main__``) or the
    file cannot be parsed.
    """
    try:
        data = storage.read_bytes(path)
        strings: list[str] = []
        seen_class_key = False
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                if arg == "class" and not seen_class_key:
                    seen_class_key = True
                    strings = []
                    continue
                strings.append(str(arg))
            elif seen_class_key and opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                if "cloudpickle" in strings[-2]:
                    return None  # a cloudpickle helper: the class was pickled by value
                return f"{strings[-2]}.{strings[-1]}"
            elif seen_class_key and opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                return f"{module}.{name}"
            elif seen_class_key and opcode.name in ("REDUCE", "BUILD", "TUPLE", "TUPLE2"):
                return None  # built by a function call: pickled by value
    except (OSError, ValueError, EOFError):
        return None
    return None


# --------------------------------------------------------------------------- verification


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What ``verify_checkpoint`` checked."""

    #: The checkpoint, as given (URIs kept).
    path: str
    #: Directories (the root and every component level) checked.
    levels: int
    #: Files read and checked, manifests not counted.
    files: int
    #: Bytes in those files.
    bytes: int
    #: Checksum algorithms the manifests use (empty if none had one).
    algorithms: tuple[str, ...]
    #: Levels without a manifest (written by RLlib or another tool): read, not verified.
    unverified: tuple[str, ...]

    @property
    def verified(self) -> bool:
        """True if every level had a manifest and matched it."""
        return not self.unverified


def verify_checkpoint(
    path: Any, filesystem: Any = None, *, progress: bool | None = None
) -> VerifyReport:
    """Check the checkpoint at ``path`` against its manifests without loading anything.

    Every file of every level is read and its size and checksum compared; listings must
    match exactly (no missing, extra or swapped files or component directories); nothing
    is decoded or unpickled. Levels RLlib wrote have no manifest: they are read (so an
    unreadable file still fails) and listed in ``report.unverified``.

    Args:
        path: The checkpoint directory (or URI).
        filesystem: A ``pyarrow.fs.FileSystem`` or an fsspec filesystem to read with.
        progress: Show a progress bar (bytes read, rate, percentage), as
            ``Checkpointable.save_to_path`` does: None when stderr is a terminal.

    Raises:
        CheckpointNotFoundError: no directory at ``path``.
        CorruptCheckpointError: anything differs from the manifests, or a level ckptable
            wrote lacks its manifest (an unfinished save).
        UnsafeCheckpointError: the checkpoint holds a symlink or special file.
    """
    storage, root = resolve_storage(path, filesystem)
    try:
        with progress_bar(progress, "Verifying") as bar:
            if bar is not None:
                bar.set_total(manifest_tree_bytes(storage, root))
            return verify_tree(storage, root)
    except OSError as exc:
        shown = storage.display(root)
        raise CorruptCheckpointError(
            f"Cannot read the checkpoint {shown}: {exc}", path=shown
        ) from exc


def verify_tree(
    storage: Storage,
    root: str,
    expected_manifest: tuple[str, str] | None = None,
    *,
    read_unverified: bool = True,
) -> VerifyReport:
    """``verify_checkpoint`` on a resolved storage path; ``expected_manifest``: the
    parent manifest's ``(algorithm, checksum)`` of the root's manifest.
    ``read_unverified=False`` lists levels without a manifest but does not read their
    files (a restore reads them anyway; their byte count is then 0)."""
    if storage.kind(root, follow_symlinks=True) != "dir":
        recover_leftovers(storage, root)
        if storage.kind(root, follow_symlinks=True) != "dir":
            shown = storage.display(root)
            raise CheckpointNotFoundError(f"No checkpoint directory at {shown}.", path=shown)
    counts = {"levels": 0, "files": 0, "bytes": 0}
    algorithms: set[str] = set()
    unverified: list[str] = []

    def walk(directory: str, expected: tuple[str, str] | None) -> None:
        entries = storage.listdir(directory)
        refuse_special_entries(storage, directory, entries)
        counts["levels"] += 1
        if MANIFEST_FILE in entries or expected is not None:
            manifest = read_manifest(storage, directory, expected)
            check_listing(storage, directory, manifest, entries)
            algorithms.add(manifest.algorithm)
            for name, size_digest in sorted(manifest.files.items()):
                path = storage.join(directory, name)
                read_verified(storage, path, size_digest, manifest.algorithm, keep=False)
                counts["files"] += 1
                counts["bytes"] += size_digest[0]
            for name, digest in sorted(manifest.dirs.items()):
                walk(storage.join(directory, name), (manifest.algorithm, digest))
            return
        require_manifest_unless_foreign(storage, directory, None, entries)
        unverified.append(storage.display(directory))
        for name, kind in sorted(entries.items()):
            path = storage.join(directory, name)
            if kind == "file" and not read_unverified:
                counts["files"] += 1
            elif kind == "file":
                try:
                    size, _ = hash_file(storage, path, "crc32")
                except OSError as exc:
                    shown = storage.display(path)
                    raise CorruptCheckpointError(f"Cannot read {shown}: {exc}", path=shown) from exc
                counts["files"] += 1
                counts["bytes"] += size
            elif kind == "dir":
                walk(path, None)

    walk(root, expected_manifest)
    return VerifyReport(
        storage.display(root),
        counts["levels"],
        counts["files"],
        counts["bytes"],
        tuple(sorted(algorithms)),
        tuple(unverified),
    )
