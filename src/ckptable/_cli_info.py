"""``ckptable info``: a checkpoint described as one JSON-ready document, and that
document as text.

:func:`describe_checkpoint` joins two walks of the checkpoint: ``get_checkpoint_info``
(classes, formats, metadata and versions of every component level) and a scan of every
directory (sizes, file counts, whether a ckptable manifest is there and its checksum
algorithm). Sizes come from a level's manifest where it lists the files (one read per
level on an object store, no stat per file), else from the filesystem. Nothing is
unpickled, symlinks and special files are refused, and every walk (the scan, the tree,
the JSON writer, the text table) uses an explicit stack, so a chain of thousands of
components works.

:func:`dump_json` writes the document for ``--json``; :func:`format_info` writes the
header and the component table that ``ckptable info`` prints, with the names and
classes the files hold escaped so that they cannot drive the terminal.
:mod:`ckptable.cli` runs the command and re-exports these names.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterator
from typing import Any

from ckptable._info import counted_files, get_checkpoint_info
from ckptable._layout import read_metadata_file, record_of
from ckptable._manifest import MANIFEST_FILE, LevelManifest, refuse_special_entries
from ckptable._storage import Storage, resolve_storage
from ckptable.errors import CheckpointError, CorruptCheckpointError

__all__ = [
    "count_noun",
    "describe_checkpoint",
    "dump_json",
    "format_info",
    "format_metrics",
    "human_bytes",
    "printable",
    "utc_time",
]


# --------------------------------------------------------------------------- scan


@dataclasses.dataclass
class _Scan:
    """Sizes and the manifest of one directory, with its subdirectories; the totals
    (this directory and everything below it) are filled in by ``_scan``."""

    own_bytes: int
    own_files: int
    algorithm: str | None
    has_manifest: bool
    children: dict[str, _Scan]
    total_bytes: int = 0
    total_files: int = 0
    #: The size of the level's manifest (not counted in ``own_bytes``).
    manifest_bytes: int = 0
    total_manifest_bytes: int = 0


def _scan(storage: Storage, root: str) -> _Scan:
    """Size the tree at ``root`` (every directory, component or not), walked with an
    explicit stack so that any depth works; symlinks and special files are refused."""
    top, names = _scan_level(storage, root)
    order = [top]  # parents before their children
    pending = [(top, root, names)]
    while pending:
        parent, directory, subdirectories = pending.pop()
        for name in subdirectories:
            path = storage.join(directory, name)
            scan, below = _scan_level(storage, path)
            parent.children[name] = scan
            order.append(scan)
            pending.append((scan, path, below))
    for scan in reversed(order):  # children first: their totals are known
        scan.total_bytes = scan.own_bytes + sum(c.total_bytes for c in scan.children.values())
        scan.total_files = scan.own_files + sum(c.total_files for c in scan.children.values())
        scan.total_manifest_bytes = scan.manifest_bytes + sum(
            c.total_manifest_bytes for c in scan.children.values()
        )
    return top


def _scan_level(storage: Storage, directory: str) -> tuple[_Scan, list[str]]:
    """List ``directory`` and size its files: from its manifest where it lists them (one
    read per level, no stat per file on object stores), else from the filesystem.
    Files are counted as ``verify_checkpoint`` counts them (``counted_files``: the
    manifest apart). Returns the level (children not filled in) and its subdirectories'
    names."""
    entries = storage.listdir(directory)
    refuse_special_entries(storage, directory, entries)
    recorded: dict[str, tuple[int, str]] = {}
    algorithm = None
    manifest_bytes = None
    if entries.get(MANIFEST_FILE) == "file":
        path = storage.join(directory, MANIFEST_FILE)
        data = storage.read_bytes(path)
        manifest_bytes = len(data)
        try:
            manifest = LevelManifest.from_bytes(data, storage.display(path))
        except (CheckpointError, RecursionError, OverflowError, ValueError, TypeError):
            pass  # sized from the filesystem; `ckptable verify` says what is wrong
        else:
            recorded, algorithm = manifest.files, manifest.algorithm
    files = counted_files(entries)
    own_bytes = sum(
        recorded[name][0] if name in recorded else storage.size(storage.join(directory, name))
        for name in files
    )
    subdirectories = sorted(name for name, kind in entries.items() if kind == "dir")
    scan = _Scan(own_bytes, len(files), algorithm, manifest_bytes is not None, {})
    scan.manifest_bytes = manifest_bytes or 0
    return scan, subdirectories


# --------------------------------------------------------------------------- describe


def describe_checkpoint(path: Any, filesystem: Any = None) -> dict[str, Any]:
    """What ``ckptable info --json`` prints: ``ckptable.get_checkpoint_info`` made
    JSON-ready, with each level's sizes, versions, actor flag and integrity record.

    Like ``get_checkpoint_info``, it unpickles nothing, reads nothing outside the
    checkpoint (symlinks and special files are refused, component names checked) and
    handles trees of any depth.

    Args:
        path: A checkpoint directory or URI (or an old ``checkpoint-N`` file).
        filesystem: As in ``get_checkpoint_info``.

    Returns:
        A JSON-serializable dict; its keys are documented in ``docs/cli.md``.

    Raises:
        CheckpointNotFoundError: nothing at ``path``; a file other than an old
            ``checkpoint-N`` file (the message names the directory to pass); a
            ``CheckpointManager`` directory (``ckptable._cli_manager`` describes it).
        CorruptCheckpointError: ``path`` is no checkpoint of any known layout, or a
            file of it is malformed or unreadable.
        InvalidComponentNameError: a metadata file names an impossible component.
        UnsafeCheckpointError: the checkpoint holds a symlink or special file.
    """
    info = get_checkpoint_info(path, filesystem)
    storage, root = resolve_storage(path, filesystem)
    try:
        if storage.kind(root, follow_symlinks=True) == "file":
            root = storage.split(root)[0]  # RLlib 0.1: a checkpoint-N file
        scan = _scan(storage, root)
    except CheckpointError:
        raise
    except OSError as exc:
        shown = storage.display(root)
        raise CorruptCheckpointError(
            f"Cannot read the checkpoint {shown}: {exc}", path=shown
        ) from exc
    tree = _describe_tree(info, scan)
    managed = _managed_record(storage, root)
    levels = list(_walk_levels(tree))
    with_manifest = sum(1 for level in levels if level["integrity"]["manifest"])
    algorithms = sorted(
        {level["integrity"]["algorithm"] for level in levels if level["integrity"]["algorithm"]}
    )
    return {
        "path": info["checkpoint_dir"],
        "type": info["type"],
        "format": info["format"],
        "class": info["class"],
        "checkpoint_version": str(info["checkpoint_version"]),
        "policy_ids": _sorted_or_none(info["policy_ids"]),
        "module_ids": _sorted_or_none(info["module_ids"]),
        "levels": len(levels),
        "files": scan.total_files,
        "bytes": scan.total_bytes,
        "integrity": {
            "levels_with_manifest": with_manifest,
            "levels_without_manifest": len(levels) - with_manifest,
            "algorithms": algorithms,
            "manifest_bytes": scan.total_manifest_bytes,
        },
        "manager": managed,
        "tree": tree,
    }


def _managed_record(storage: Storage, root: str) -> dict[str, Any] | None:
    """What the record of a ``CheckpointManager`` says of the checkpoint at ``root`` (its
    step, metrics and save time, and the manager's directory), or None if a manager did
    not save it. Values of the wrong type (a crafted record) are shown as None."""
    from ckptable._manager_listing import RECORD_FILE

    path = storage.join(root, RECORD_FILE)
    if storage.kind(path) != "file":
        return None
    record = read_metadata_file(storage, path)
    step, metrics, saved_at = record.get("step"), record.get("metrics"), record.get("saved_at")
    metric, mode = record.get("metric"), record.get("mode")
    saved = (
        saved_at if isinstance(saved_at, (int, float)) and not isinstance(saved_at, bool) else None
    )
    return {
        "directory": storage.display(storage.split(root)[0]),
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "metrics": metrics if isinstance(metrics, dict) else None,
        "saved_at": saved,
        "saved_at_utc": utc_time(saved),
        "metric": metric if isinstance(metric, str) else None,
        "mode": mode if mode in ("max", "min") else None,
    }


def utc_time(seconds: float | None) -> str | None:
    """A save time (seconds since the epoch) as ``2025-01-31 12:00:00`` in UTC."""
    if seconds is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):  # a crafted time out of range
        return None
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def format_metrics(metrics: dict[str, Any] | None) -> str:
    """Metrics as ``loss=0.25 reward=3`` (numbers to 6 significant digits)."""
    if not metrics:
        return "-"
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            text = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return printable(" ".join(parts))


def _sorted_or_none(ids: Any) -> list[str] | None:
    return None if ids is None else sorted(str(i) for i in ids)


def _describe_tree(info: dict[str, Any], scan: _Scan) -> dict[str, Any]:
    """The ``tree`` of ``describe_checkpoint``: every level, built with an explicit stack."""
    tree = _describe_level(info, scan, "", actor=False)
    pending = [(tree, info, scan)]
    while pending:
        level, level_info, level_scan = pending.pop()
        actor_names = (record_of(level_info.get("metadata")) or {}).get("actor_components")
        children = []
        for name, child_info in (level_info.get("components") or {}).items():
            child_scan = level_scan.children.get(name) or _Scan(0, 0, None, False, {})
            child_actor = None if not isinstance(actor_names, list) else name in actor_names
            component = f"{level['component']}/{name}" if level["component"] else name
            child = _describe_level(child_info, child_scan, component, actor=child_actor)
            level["components"][name] = child
            children.append((child, child_info, child_scan))
        pending.extend(reversed(children))
    return tree


def _describe_level(
    info: dict[str, Any], scan: _Scan, component: str, *, actor: bool | None
) -> dict[str, Any]:
    """One level of the ``tree`` (its ``components`` still empty)."""
    metadata = info.get("metadata") or {}
    record = record_of(metadata)
    if record is not None:
        writer: str | None = "ckptable"
    elif "ray_version" in metadata:
        writer = "rllib"
    else:
        writer = None
    state_file = info.get("state_file")
    return {
        "name": component.rsplit("/", 1)[-1],
        "component": component,
        "path": info["checkpoint_dir"],
        "class": info.get("class"),
        "type": info.get("type"),
        "format": info.get("format"),
        "state_file": state_file.replace("\\", "/").rsplit("/", 1)[-1] if state_file else None,
        "actor": actor,
        "writer": writer,
        "versions": {
            "checkpoint_version": str(info["checkpoint_version"]),
            "layout_version": (record or {}).get("layout_version"),
            "state_version": (record or {}).get("state_version", 1 if record else None),
            "ckptable_version": (record or {}).get(
                "ckptable_version", metadata.get("ckptable_version")
            ),
            "ray_version": metadata.get("ray_version"),
            "python_version": (record or {}).get("python_version"),
        },
        "integrity": {"manifest": scan.has_manifest, "algorithm": scan.algorithm},
        "own_bytes": scan.own_bytes,
        "own_files": scan.own_files,
        "total_bytes": scan.total_bytes,
        "total_files": scan.total_files,
        "metadata": metadata,
        "components": {},
    }


def _walk_levels(level: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every level of a ``tree``, parents before children, in saved order."""
    pending = [level]
    while pending:
        current = pending.pop()
        yield current
        pending.extend(reversed(list(current["components"].values())))


# --------------------------------------------------------------------------- JSON


#: Nesting depth beyond which ``dump_json`` indents no further.
_MAX_JSON_INDENT_DEPTH = 64


def dump_json(value: Any, indent: int = 2) -> str:
    """``json.dumps(value, indent=indent, default=str)``, written without recursion: a
    ``describe_checkpoint`` document nests two levels per component, which is deeper
    than ``json``'s own encoders go for a chain of a thousand components.

    Indentation stops growing below ``_MAX_JSON_INDENT_DEPTH`` levels of nesting (the
    document stays valid JSON): indenting every line of a chain of thousands of
    components by its depth would make the output grow with the square of the depth.
    """
    parts: list[str] = []
    # Each item: text to write, or a value to write at an indentation depth.
    pending: list[tuple[str, Any, int]] = [("value", value, 0)]
    while pending:
        what, item, depth = pending.pop()
        if what == "text":
            parts.append(item)
            continue
        inner = min(depth + 1, _MAX_JSON_INDENT_DEPTH)
        if isinstance(item, dict) and item:
            pad = "\n" + " " * (indent * inner)
            todo: list[tuple[str, Any, int]] = [("text", "{", 0)]
            for index, (key, child) in enumerate(item.items()):
                comma = "," if index else ""
                todo.append(("text", f"{comma}{pad}{json.dumps(_json_key(key))}: ", 0))
                todo.append(("value", child, depth + 1))
            todo.append(("text", "\n" + " " * (indent * (inner - 1)) + "}", 0))
            pending.extend(reversed(todo))
        elif isinstance(item, (list, tuple)) and item:
            pad = "\n" + " " * (indent * inner)
            todo = [("text", "[", 0)]
            for index, child in enumerate(item):
                todo.append(("text", f"{',' if index else ''}{pad}", 0))
                todo.append(("value", child, depth + 1))
            todo.append(("text", "\n" + " " * (indent * (inner - 1)) + "]", 0))
            pending.extend(reversed(todo))
        elif isinstance(item, dict):
            parts.append("{}")
        elif isinstance(item, (list, tuple)):
            parts.append("[]")
        else:
            parts.append(json.dumps(item, default=str))
    return "".join(parts)


def _json_key(key: Any) -> str:
    """A dict key as ``json`` writes it (``None`` and booleans as ``null``/``true``)."""
    if isinstance(key, str):
        return key
    return json.dumps(key) if key is None or isinstance(key, bool) else str(key)


# --------------------------------------------------------------------------- text


def human_bytes(size: int) -> str:
    """``size`` for reading: ``512 B``, ``1.5 KiB``, ``6.0 MiB``, ``1.20 GiB``."""
    if size < 1024:
        return f"{size} B"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.2f} {unit}" if unit in ("GiB", "TiB") else f"{value:.1f} {unit}"


def count_noun(number: int, noun: str) -> str:
    """``1 level``, ``3 levels``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): names and classes
    come from the checkpoint's files, which must not drive the terminal."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def format_info(doc: dict[str, Any], *, unicode: bool = True) -> str:
    """The text ``ckptable info`` prints for a ``describe_checkpoint`` document."""
    tree = doc["tree"]
    versions = tree["versions"]
    lines = [doc["path"]]
    facts = [f"{doc['type']} checkpoint", f"checkpoint_version {doc['checkpoint_version']}"]
    if tree["writer"] == "ckptable":
        by = f"written by ckptable {versions['ckptable_version'] or '?'}"
        extra = [f"layout {versions['layout_version']}"]
        if versions["python_version"]:
            extra.append(f"Python {versions['python_version']}")
        if versions["ray_version"]:
            extra.append(f"Ray {versions['ray_version']}")
        facts.append(f"{by} ({', '.join(extra)})")
    elif tree["writer"] == "rllib":
        facts.append(f"written by RLlib (Ray {versions['ray_version']})")
    lines.append("  " + ", ".join(facts))
    integrity = doc["integrity"]
    algorithms = ", ".join(integrity["algorithms"])
    if integrity["levels_without_manifest"] == 0:
        checked = f"every level has a manifest ({algorithms})"
    elif integrity["levels_with_manifest"] == 0:
        checked = "no ckptable manifests (written by RLlib or another tool): not verifiable"
    else:
        checked = (
            f"{integrity['levels_without_manifest']} of {doc['levels']} levels have no "
            f"manifest (the others: {algorithms})"
        )
    lines.append(
        f"  {count_noun(doc['levels'], 'level')}, {count_noun(doc['files'], 'file')}, "
        f"{human_bytes(doc['bytes'])}; {checked}"
    )
    for key in ("policy_ids", "module_ids"):
        if doc[key]:
            lines.append(f"  {key}: {', '.join(doc[key])}")
    managed = doc.get("manager")
    if managed is not None:
        step = managed["step"] if managed["step"] is not None else "?"
        saved = f", saved {managed['saved_at_utc']} UTC" if managed["saved_at_utc"] else ""
        lines.append(
            f"  step {step} of the CheckpointManager directory {managed['directory']}{saved}; "
            f"metrics: {format_metrics(managed['metrics'])}"
        )
    lines.append("")

    branch, last, pipe, space = ("├── ", "└── ", "│   ", "    ")
    if not unicode:
        branch, last, pipe, space = ("|-- ", "`-- ", "|   ", "    ")
    rows: list[list[str]] = [["COMPONENT", "CLASS", "FORMAT", "OWN", "TOTAL", "STATE", "CHECK"]]

    # (level, prefix, connector, inner): written parents first, children in saved order.
    pending: list[tuple[dict[str, Any], str, str, str]] = [(tree, "", "", "")]
    while pending:
        level, prefix, connector, inner = pending.pop()
        name = level["name"] or "(root)"
        if level["actor"]:
            name += " [actor]"
        state_version = level["versions"]["state_version"]
        rows.append(
            [
                printable(prefix + connector + name),
                printable(str(level["class"] or "?")),
                printable(str(level["format"] or "?")),
                human_bytes(level["own_bytes"]),
                human_bytes(level["total_bytes"]),
                printable(f"v{state_version}" if state_version is not None else "-"),
                "manifest" if level["integrity"]["manifest"] else "none",
            ]
        )
        children = list(level["components"].values())
        for index in reversed(range(len(children))):
            is_last = index == len(children) - 1
            pending.append(
                (
                    children[index],
                    inner,
                    last if is_last else branch,
                    inner + (space if is_last else pipe),
                )
            )

    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {3, 4}  # sizes align right
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(printable(line) for line in lines)
