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

import pickletools
import re
from typing import Any

from packaging.version import Version

from ckptable._layout import DEFAULT_CLASS_FILE, read_metadata_file, record_of
from ckptable._storage import Storage, resolve_storage
from ckptable.errors import CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["get_checkpoint_info", "stored_class_name"]

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
