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
from collections.abc import Mapping
from typing import Any

from packaging.version import Version

from ckptable._components import validate_component_name
from ckptable._formats import codec_for_suffix
from ckptable._layout import DEFAULT_CLASS_FILE, read_metadata_file, record_of
from ckptable._manifest import (
    MANIFEST_FILE,
    refuse_special_entries,
)
from ckptable._storage import EntryKind, Storage, resolve_storage
from ckptable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

__all__ = [
    "counted_files",
    "get_checkpoint_info",
    "stored_class_name",
]

_METADATA_FILES = ("metadata.json", "rllib_checkpoint.json")
#: RLlib's old-stack suffix ``.msgpck``; every other suffix is looked up in the registry.
_FORMATS = {".msgpck": "msgpack"}
_LEARNER_MODULES = ("learner_group", "learner", "rl_module")
#: Longest ``checkpoint_version`` string taken as a version (RLlib writes ``"2.1"``).
_MAX_VERSION_CHARS = 64
#: Bytes of a class file read to find the class's import path: the ``"class"`` entry
#: comes first in the pickle, so a class pickled by reference is found long before.
_CLASS_SCAN_BYTES = 1 << 20
#: RLlib's 0.1 checkpoints: one ``checkpoint-<iteration>`` file.
_OLD_CHECKPOINT_FILE = re.compile(r"checkpoint-\d+")
#: Files that make a directory a checkpoint level (to name the directory of a file).
_LEVEL_FILES = (*_METADATA_FILES, DEFAULT_CLASS_FILE, MANIFEST_FILE)


def counted_files(entries: Mapping[str, EntryKind]) -> list[str]:
    """The files of one checkpoint level that count as the checkpoint's, sorted: every
    regular file but the manifest (ckptable's integrity record, reported apart).

    ``ckptable info``, ``verify_checkpoint`` and ``ckptable demo`` count files (and
    their bytes) with it, so their numbers agree.
    """
    return sorted(
        name for name, kind in entries.items() if kind == "file" and name != MANIFEST_FILE
    )


def get_checkpoint_info(path: Any, filesystem: Any = None) -> dict[str, Any]:
    """Describe the checkpoint at ``path`` (a directory, or an old ``checkpoint-N`` file).

    Nothing is unpickled or imported, and nothing outside the checkpoint is read: every
    component name is checked to be one plain directory name, and a level holding a
    symlink or special file (FIFO, socket, device) is refused before any file in it is
    opened. The tree is walked without recursion, however deep it is.

    Returns:
        A dict with ``checkpoint_dir``, ``checkpoint_version`` (a
        ``packaging.version.Version``), ``format`` (``"cloudpickle"`` or ``"msgpack"``),
        ``class`` (import path or None), ``components`` (name → the same dict, nested),
        ``metadata`` (the level's metadata JSON), ``type`` (``"Checkpointable"``,
        ``"Algorithm"`` or ``"Policy"``), ``state_file``, ``policy_ids`` and
        ``module_ids`` (sets, or None), and ``ckptable`` (ckptable's record, or None).

    Raises:
        CheckpointNotFoundError: nothing at ``path``; a file other than RLlib's old
            ``checkpoint-<iteration>`` file, such as ``ckpt/state.pkl`` (the message
            names the directory to pass); a ``CheckpointManager`` directory (the
            message says where its checkpoints are).
        CorruptCheckpointError: a directory that is no checkpoint of any known layout, a
            malformed metadata file (not JSON, or a value of the wrong type), or a
            component directory that is missing or cannot be read.
        InvalidComponentNameError: a metadata file names a component that is not a plain
            directory name (``..``, ``a/b``, NUL, ...).
        UnsafeCheckpointError: the checkpoint holds a symlink or special file.
    """
    storage, root = resolve_storage(path, filesystem)
    shown = storage.display(root)
    try:
        kind = storage.kind(root, follow_symlinks=True)
        if kind is None:
            raise CheckpointNotFoundError(f"No checkpoint at {shown}.", path=shown)
        if kind == "file":
            _refuse_file_unless_old_checkpoint(storage, root)
            parent = storage.split(root)[0]
            return _base_info(storage.display(parent), Version("0.1"), state_file=shown)
        if kind != "dir":
            raise CorruptCheckpointError(f"{shown} is neither a file nor a directory.", path=shown)
        refuse_non_checkpoint(storage, root)
        return _describe_tree(storage, root)
    except CheckpointError:
        raise
    except OSError as exc:
        raise CorruptCheckpointError(
            f"Cannot read the checkpoint {shown}: {exc}", path=shown
        ) from exc


def _refuse_file_unless_old_checkpoint(storage: Storage, path: str) -> None:
    """A file is a checkpoint only as RLlib's 0.1 ``checkpoint-<iteration>`` file; any
    other file (``state.pkl`` of a checkpoint, say) is refused, naming its directory.

    Raises:
        CheckpointNotFoundError: ``path`` is another file.
    """
    parent, name = storage.split(path)
    if _OLD_CHECKPOINT_FILE.fullmatch(name):
        return
    shown, directory = storage.display(path), storage.display(parent)
    try:
        in_checkpoint = any(storage.kind(storage.join(parent, f)) == "file" for f in _LEVEL_FILES)
    except OSError:
        in_checkpoint = False
    if in_checkpoint:
        text = (
            f"{shown} is a file, not a checkpoint directory; it is part of the checkpoint "
            f"{directory}: pass that directory instead."
        )
    else:
        text = (
            f"{shown} is a file, not a checkpoint directory (and {directory}, where it is, "
            "is no checkpoint either): pass a checkpoint's directory."
        )
    raise CheckpointNotFoundError(text, path=shown)


def refuse_non_checkpoint(storage: Storage, root: str) -> None:
    """Refuse, before anything is read, what is at ``root`` if it cannot be a checkpoint:
    a file (but RLlib's old ``checkpoint-<iteration>`` file), a ``CheckpointManager``'s
    directory (naming its newest complete checkpoint) or an empty directory. Nothing at
    ``root`` is left to the caller. ``info``, ``verify``, ``convert`` and ``diff`` (and
    their APIs) run it; restores raise the same error when they find no checkpoint.

    Raises:
        CheckpointNotFoundError: saying what is there and what to pass instead.
    """
    from ckptable._manager_listing import empty_directory_error, manager_directory_error

    kind = storage.kind(root, follow_symlinks=True)
    if kind == "file":
        _refuse_file_unless_old_checkpoint(storage, root)
        return
    if kind != "dir":
        return
    entries = storage.listdir(root)

    def todo(newest: str | None) -> str:
        if newest is None:
            return ""
        return f"Pass one of the checkpoints in it, e.g. the newest complete one: {newest}."

    error = manager_directory_error(storage, root, todo, entries=entries) or (
        empty_directory_error(storage, root, entries)
    )
    if error is not None:
        raise error


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


def _describe_tree(storage: Storage, root: str) -> dict[str, Any]:
    """Every level of the tree at ``root``, walked with an explicit stack (a chain of
    thousands of components does not exhaust Python's recursion limit)."""
    info, children = _describe_dir(storage, root, None)
    # (parent's components dict, name, directory, metadata file hint); children are
    # pushed in reverse so that they are described, and inserted, in their saved order.
    pending = [(info["components"], *child) for child in reversed(children)]
    while pending:
        into, name, directory, hint = pending.pop()
        child_info, grandchildren = _describe_dir(storage, directory, hint)
        into[name] = child_info
        pending.extend((child_info["components"], *g) for g in reversed(grandchildren))
    return info


def _describe_dir(
    storage: Storage, directory: str, metadata_file: str | None
) -> tuple[dict[str, Any], list[tuple[str, str, str | None]]]:
    """One level: its info (``components`` still empty) and its components, as
    ``(name, directory, metadata file hint)``, in their saved order."""
    shown = storage.display(directory)
    entries = storage.listdir(directory)
    refuse_special_entries(storage, directory, entries)
    files = {name for name, kind in entries.items() if kind == "file"}

    for name in sorted(files):  # RLlib 0.1: a single checkpoint-<iteration> file
        if re.match(r"checkpoint-\d+", name):
            return _base_info(shown, Version("0.1"), state_file=name), []

    metadata: dict[str, Any] = {}
    metadata_path = storage.join(directory, _METADATA_FILES[0])
    for name in (metadata_file, *_METADATA_FILES) if metadata_file else _METADATA_FILES:
        if name in files:
            metadata_path = storage.join(directory, name)
            metadata = read_metadata_file(storage, metadata_path)
            break
    where = storage.display(metadata_path)
    record = record_of(metadata)
    info = _base_info(shown, _checkpoint_version(metadata, where))
    info["metadata"] = metadata
    info["ckptable"] = record
    for key in ("type", "format"):  # rllib_checkpoint.json keys
        if key in metadata:
            info[key] = _text(metadata[key], where, key)
    for key in ("policy_ids", "module_ids"):
        if key in metadata:
            info[key] = _id_set(metadata[key], where, key)

    for suffix in (".pkl", ".msgpck"):  # an old-stack Policy checkpoint
        if "policy_state" + suffix in files:
            info.update(
                type="Policy",
                format=_format_of_suffix(suffix),
                state_file=_shown(storage, directory, "policy_state" + suffix),
            )
            return info, []

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
    recorded_format = _text((record or {}).get("format"), where, "ckptable.format")
    info["format"] = recorded_format or _format_of_suffix("." + ext)
    if info["format"] is None:
        raise CorruptCheckpointError(
            f"{info['state_file']}: no registered format reads files ending in '.{ext}', "
            f"and {where} records none.",
            path=info["state_file"],
        )
    if DEFAULT_CLASS_FILE in files or record:
        info["type"] = "Algorithm" if stem == "algorithm_state" else "Checkpointable"
        recorded_class = _text((record or {}).get("class"), where, "ckptable.class")
        info["class"] = (
            recorded_class
            if recorded_class is not None
            else _class_in_pickle(storage, storage.join(directory, DEFAULT_CLASS_FILE))
            if DEFAULT_CLASS_FILE in files
            else None
        )
    children = _component_dirs(storage, directory, entries, record, where)

    if entries.get("policies") == "dir":
        policies = storage.join(directory, "policies")
        listing = storage.listdir(policies)
        refuse_special_entries(storage, policies, listing)
        info["policy_ids"] = set(listing)
    modules = _learner_modules(storage, directory, entries)
    if modules is not None:
        info["module_ids"] = modules
    return info, children


def _checkpoint_version(metadata: dict[str, Any], where: str) -> Version:
    """The level's ``checkpoint_version`` (RLlib's default ``1.1`` if none is recorded).

    Raises:
        CorruptCheckpointError: a value that is no version (naming the metadata file).
    """
    value = metadata.get("checkpoint_version", "1.1")
    if not isinstance(value, bool) and isinstance(value, (str, int, float)):
        text = str(value)
        if len(text) <= _MAX_VERSION_CHARS:
            try:
                return Version(text)
            except ValueError:  # packaging's InvalidVersion
                pass
    raise CorruptCheckpointError(
        f"{where} is not valid metadata: its checkpoint_version {_brief(value)} is not a version.",
        path=where,
    )


def _text(value: Any, where: str, key: str) -> str | None:
    """``value`` if it is a string, None if it is absent (None).

    Raises:
        CorruptCheckpointError: any other type (naming the metadata file and key).
    """
    if value is None or isinstance(value, str):
        return value
    raise CorruptCheckpointError(
        f"{where} is not valid metadata: {key} is {_brief(value)}, not a string.", path=where
    )


def _id_set(value: Any, where: str, key: str) -> set[Any] | None:
    """``policy_ids`` / ``module_ids`` as RLlib reports them: a set (None stays None)."""
    if value is None:
        return None
    if isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value):
        return set(value)
    raise CorruptCheckpointError(
        f"{where} is not valid metadata: {key} is {_brief(value)}, not a list of ids.",
        path=where,
    )


def _brief(value: Any) -> str:
    """A short description of a crafted value, for a message."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _format_of_suffix(suffix: str) -> str | None:
    """The format of a state file ending in ``suffix`` (None if no codec reads it)."""
    if suffix in _FORMATS:
        return _FORMATS[suffix]
    codec = codec_for_suffix(suffix)
    return None if codec is None else codec.name


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


def _component_dirs(
    storage: Storage,
    directory: str,
    entries: dict[str, EntryKind],
    record: dict[str, Any] | None,
    where: str,
) -> list[tuple[str, str, str | None]]:
    """The level's components as ``(name, directory, metadata file hint)``.

    ckptable's record lists them; each name must be one plain directory name of this
    level (never ``..`` or a path), and its directory must be there. Without a record
    (RLlib wrote the level), a component is a subdirectory holding a class file.
    """
    if record is None:
        return [
            (name, storage.join(directory, name), None)
            for name, kind in sorted(entries.items())
            if kind == "dir"
            and storage.kind(storage.join(directory, name, DEFAULT_CLASS_FILE)) == "file"
        ]
    recorded = record.get("components", [])
    if not isinstance(recorded, list):
        raise CorruptCheckpointError(
            f"{where} is not valid metadata: ckptable.components is {_brief(recorded)}, "
            "not a list of component names.",
            path=where,
        )
    hints = record.get("component_metadata_files")
    hints = hints if isinstance(hints, dict) else {}
    shown = storage.display(directory)
    children: dict[str, tuple[str, str, str | None]] = {}
    for name in recorded:
        validate_component_name(name, path=where, where=where)
        child = storage.join(directory, name)
        if entries.get(name) != "dir":
            raise CorruptCheckpointError(
                f"The component directory {storage.display(child)} recorded in the "
                "checkpoint's metadata is missing.",
                path=shown,
                component=name,
            )
        hint = hints.get(name)
        children.setdefault(name, (name, child, hint if isinstance(hint, str) else None))
    return list(children.values())


def _learner_modules(
    storage: Storage, directory: str, entries: dict[str, EntryKind]
) -> set[str] | None:
    """The module ids under ``learner_group/learner/rl_module`` (RLlib's new stack),
    listed one directory at a time so that no symlink along the way is followed."""
    listing = entries
    current = directory
    for name in _LEARNER_MODULES:
        if listing.get(name) != "dir":
            return None
        current = storage.join(current, name)
        listing = storage.listdir(current)
        refuse_special_entries(storage, current, listing)
    return {name for name, kind in listing.items() if kind == "dir"}


def stored_class_name(
    storage: Storage, directory: str, metadata_file: str, class_file: str
) -> str | None:
    """The import path of the class a level was saved from, without unpickling; None if
    unknown (no such files, a class pickled by value, or a record that is no string)."""
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
    """The import path of the ``"class"`` entry of a class file, read from its opcodes
    (``pickletools.genops``: nothing is imported or executed).

    Only the file's first ``_CLASS_SCAN_BYTES`` are read. Returns None when the class was
    pickled by value (defined in ``__main__``) or the bytes cannot be parsed.
    """
    try:
        with storage.open_read(path) as stream:
            chunks: list[bytes] = []
            left = _CLASS_SCAN_BYTES
            while left > 0 and (chunk := stream.read(left)):
                chunks.append(chunk)
                left -= len(chunk)
        data = b"".join(chunks)
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
    except Exception:  # untrusted bytes: any parse failure means "unknown"
        return None
    return None
