"""The ``ckptable`` command: inspect, verify, convert and compare checkpoints; run the demo.

Subcommands (``ckptable COMMAND -h`` for each)::

    ckptable info PATH [--json]          the component tree: classes, formats, sizes,
                                         versions, actor components, manifests
    ckptable verify PATH                 check every file against the manifests
    ckptable convert SRC DST --format F  rewrite every state in another format
             [--force] [--safe]          (--force: replace a checkpoint at DST)
    ckptable diff A B                    which components and state keys differ
    ckptable demo [--dir DIR] [--keep]   save and restore a tree with Ray actors

Errors a user can cause (a missing path, a corrupt checkpoint, an unknown format, a
missing optional package) print one line, ``ckptable: error: ...``, on stderr and exit
with 1 (checkpoint problems) or 2 (usage; ``diff`` uses 2 for every error, as diff(1)
does); ``--debug`` adds the traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import IO, Any, NoReturn

from ckptable._info import get_checkpoint_info, verify_checkpoint
from ckptable._layout import record_of
from ckptable._manifest import MANIFEST_FILE, LevelManifest, refuse_special_entries
from ckptable._storage import Storage, resolve_storage
from ckptable.errors import CheckpointError, CorruptCheckpointError

__all__ = ["describe_checkpoint", "dump_json", "format_info", "human_bytes", "main"]

PROG = "ckptable"

#: Exit codes.
EXIT_OK = 0
EXIT_CHECKPOINT = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in the command line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``ckptable: error: ...``), not the usage
    block, and it is raised (``main`` returns the exit code instead of exiting)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} -h')")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the ``ckptable`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 for a checkpoint problem (missing, corrupt,
        unreadable; ``diff``: the checkpoints differ), 2 for a usage mistake (``diff``:
        any error), 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # -h and --version print and "exit" with 0
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    errors_exit = EXIT_USAGE if args.command == "diff" else EXIT_CHECKPOINT
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code: int = args.run(args)
            return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `ckptable info ... | head`: the reader went away; say nothing more.
        _silence_stdout()
        return EXIT_CHECKPOINT
    except UsageError as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    except ImportError as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    except CheckpointError as exc:
        return _fail(args, str(exc), errors_exit)
    except OSError as exc:
        return _fail(args, _os_error_text(exc), errors_exit)
    except Exception as exc:  # a bug, or user code the demo runs: still one line
        text = f"unexpected {type(exc).__name__}: {exc}"
        if not args.debug:
            text += " (run with --debug for the traceback)"
        return _fail(args, text, errors_exit)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (subcommands and their options)."""
    from ckptable._version import package_version

    debug = _Parser(add_help=False)
    # Accepted before or after the subcommand; SUPPRESS keeps a subcommand's default
    # from overwriting a --debug given before it.
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    parser = _Parser(
        prog=PROG,
        description="Inspect, verify, convert and compare ckptable and RLlib checkpoints.",
        epilog="Paths may be local directories or URIs (s3://..., gs://..., memory://...).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    info = commands.add_parser(
        "info",
        parents=[debug],
        help="show a checkpoint's component tree",
        description="Show a checkpoint's component tree: per level its class, state "
        "format, sizes, versions, whether Ray actors hold it, and whether it has a "
        "ckptable manifest. Nothing is unpickled.",
    )
    info.add_argument("path", metavar="PATH", help="checkpoint directory or URI")
    info.add_argument("--json", action="store_true", help="print one JSON document")
    info.set_defaults(command="info", run=_run_info)

    verify = commands.add_parser(
        "verify",
        parents=[debug],
        help="check every file against the checkpoint's manifests",
        description="Read every file of the checkpoint and compare its size and checksum "
        "with the manifests, without decoding anything. Exit 0 if intact, 1 if not.",
    )
    verify.add_argument("path", metavar="PATH", help="checkpoint directory or URI")
    verify.set_defaults(command="verify", run=_run_verify)

    convert = commands.add_parser(
        "convert",
        parents=[debug],
        help="write a copy of a checkpoint with every state in another format",
        description="Write a copy of SRC to DST with every level's state re-encoded in "
        "FORMAT; the source is verified first, DST is published whole. DST must be new "
        "or an empty directory (--force replaces a checkpoint there, never other files) "
        "and may not be SRC, inside it, or contain it.",
    )
    convert.add_argument("src", metavar="SRC", help="checkpoint to convert")
    convert.add_argument("dst", metavar="DST", help="where to write the converted copy")
    convert.add_argument(
        "--format",
        default="msgpack",
        metavar="FORMAT",
        help="msgpack (default), cloudpickle (or its alias pickle), or a registered format",
    )
    convert.add_argument(
        "--force",
        "--overwrite",
        dest="overwrite",
        action="store_true",
        help="replace a checkpoint already at DST (a directory of other files is refused)",
    )
    convert.add_argument(
        "--safe",
        action="store_true",
        help="decode the source's pickles with the restricted unpickler (untrusted input)",
    )
    convert.set_defaults(command="convert", run=_run_convert)

    diff = commands.add_parser(
        "diff",
        parents=[debug],
        help="compare the states of two checkpoints",
        description="Compare two checkpoints level by level: components found in only "
        "one, and every state key that differs (arrays by shape, dtype and values). "
        "States are decoded without constructing any object, with the restricted "
        "unpickler unless --unsafe. Exit 0 if equal, 1 if they differ, 2 on errors.",
    )
    diff.add_argument("a", metavar="A", help="first checkpoint")
    diff.add_argument("b", metavar="B", help="second checkpoint")
    diff.add_argument(
        "--rtol", type=_non_negative_float, default=0.0, help="relative tolerance (default 0)"
    )
    diff.add_argument(
        "--atol", type=_non_negative_float, default=0.0, help="absolute tolerance (default 0)"
    )
    diff.add_argument(
        "--limit",
        type=_non_negative_int,
        default=20,
        metavar="N",
        help="differences shown per component (default 20; 0 for all)",
    )
    diff.add_argument("--json", action="store_true", help="print one JSON document")
    diff.add_argument(
        "--unsafe",
        action="store_true",
        help="allow any pickle (runs code from the files: only for checkpoints you trust)",
    )
    diff.set_defaults(command="diff", run=_run_diff)

    demo = commands.add_parser(
        "demo",
        parents=[debug],
        help="save and restore a tree with local and Ray actor components",
        description="Start a local Ray, build a trainer with a learner (numpy arrays, "
        "an optimizer) and two Ray actor runners, train, save, show the tree, change "
        "everything, restore, check every state (inside the actors too) and verify. "
        "Needs Ray: pip install 'ckptable[cli]'.",
    )
    demo.add_argument(
        "--dir",
        metavar="DIR",
        default=None,
        help="directory to write the checkpoint in (default: a temporary directory)",
    )
    demo.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    demo.set_defaults(command="demo", run=_run_demo)
    return parser


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


# --------------------------------------------------------------------------- output helpers


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_line(text: str) -> None:
    print(f"{PROG}: error: {_one_line(text)}", file=sys.stderr, flush=True)


def _warning_line(text: str) -> None:
    print(f"{PROG}: warning: {_one_line(text)}", file=sys.stderr, flush=True)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    """Warnings (an unverified RLlib checkpoint, say) as one line each."""
    _warning_line(str(message))


def _fail(args: argparse.Namespace, text: str, code: int) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    _error_line(text)
    return code


def _os_error_text(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


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


def _count(number: int, noun: str) -> str:
    """``1 level``, ``3 levels``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _unicode_ok(stream: Any) -> bool:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf16", "utf32")


# --------------------------------------------------------------------------- info


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
    return top


def _scan_level(storage: Storage, directory: str) -> tuple[_Scan, list[str]]:
    """List ``directory`` and size its files: from its manifest where it lists them (one
    read per level, no stat per file on object stores), else from the filesystem.
    Returns the level (children not filled in) and its subdirectories' names."""
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
    own_bytes = own_files = 0
    subdirectories: list[str] = []
    for name, kind in sorted(entries.items()):
        if kind == "dir":
            subdirectories.append(name)
        elif kind == "file":
            own_files += 1
            if name == MANIFEST_FILE and manifest_bytes is not None:
                own_bytes += manifest_bytes
            elif name in recorded:
                own_bytes += recorded[name][0]
            else:
                own_bytes += storage.size(storage.join(directory, name))
    scan = _Scan(own_bytes, own_files, algorithm, manifest_bytes is not None, {})
    return scan, subdirectories


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
        CheckpointNotFoundError: nothing at ``path``.
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
        },
        "tree": tree,
    }


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


def _printable(text: str) -> str:
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
        f"  {_count(doc['levels'], 'level')}, {_count(doc['files'], 'file')}, "
        f"{human_bytes(doc['bytes'])}; {checked}"
    )
    for key in ("policy_ids", "module_ids"):
        if doc[key]:
            lines.append(f"  {key}: {', '.join(doc[key])}")
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
                _printable(prefix + connector + name),
                _printable(str(level["class"] or "?")),
                _printable(str(level["format"] or "?")),
                human_bytes(level["own_bytes"]),
                human_bytes(level["total_bytes"]),
                _printable(f"v{state_version}" if state_version is not None else "-"),
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
    return "\n".join(_printable(line) for line in lines)


def _run_info(args: argparse.Namespace) -> int:
    doc = describe_checkpoint(args.path)
    if args.json:
        print(dump_json(doc))
    else:
        print(format_info(doc, unicode=_unicode_ok(sys.stdout)))
    return EXIT_OK


# --------------------------------------------------------------------------- verify


def _run_verify(args: argparse.Namespace) -> int:
    report = verify_checkpoint(args.path)
    size = human_bytes(report.bytes)
    counts = f"{_count(report.levels, 'level')}, {_count(report.files, 'file')}"
    if report.verified:
        algorithms = ", ".join(report.algorithms)
        print(f"ok: {report.path}: {counts}, {size} checked against the manifests ({algorithms})")
        return EXIT_OK
    unverified = len(report.unverified)
    if unverified == report.levels:
        print(f"readable: {report.path}: {counts}, {size} read; not verified (no manifests)")
    else:
        algorithms = ", ".join(report.algorithms)
        print(
            f"ok: {report.path}: {counts}, {size} checked ({algorithms}); "
            f"{_count(unverified, 'level')} only read"
        )
    shown = ", ".join(report.unverified[:3]) + (" ..." if unverified > 3 else "")
    _warning_line(
        f"{unverified} of {report.levels} levels have no ckptable manifest (written by "
        f"RLlib or another tool) and were read but not verified: {shown}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------- convert


def _run_convert(args: argparse.Namespace) -> int:
    from ckptable._convert import convert_checkpoint
    from ckptable._formats import get_codec

    try:
        codec = get_codec(args.format)
    except CheckpointError as exc:  # an unknown format is a usage mistake
        raise UsageError(f"argument --format: {exc}") from exc
    written = convert_checkpoint(
        args.src, args.dst, format=codec.name, safe=args.safe, overwrite=args.overwrite
    )
    print(f"converted {args.src} to {codec.name}: {written}")
    return EXIT_OK


# --------------------------------------------------------------------------- diff


def _run_diff(args: argparse.Namespace) -> int:
    from ckptable._diff import diff_checkpoints, format_diff

    result = diff_checkpoints(
        args.a,
        args.b,
        safe=not args.unsafe,
        rtol=args.rtol,
        atol=args.atol,
        limit=args.limit or None,
        warn=_warning_line,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_diff(result))
    return EXIT_OK if result.equal else EXIT_CHECKPOINT


# --------------------------------------------------------------------------- demo


def _run_demo(args: argparse.Namespace) -> int:
    from ckptable._demo import run_demo

    return run_demo(directory=args.dir, keep=args.keep, out=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
