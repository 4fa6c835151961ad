"""The ``ckptable`` command: inspect, verify, convert and compare checkpoints; run the demo.

Subcommands (``ckptable COMMAND -h`` for each)::

    ckptable info PATH [--json]          the component tree: classes, formats, sizes,
                                         versions, actor components, manifests; of a
                                         CheckpointManager directory, its checkpoints
    ckptable ls DIR [--json]             a CheckpointManager directory's checkpoints:
                                         steps, save times, metrics, latest, best
    ckptable verify PATH                 check every file against the manifests
    ckptable convert SRC DST --format F  rewrite every state in another format
             [--force] [--safe]          (--force: replace a checkpoint at DST)
    ckptable diff A B                    which components and state keys differ
    ckptable demo [--dir DIR] [--keep]   save and restore a tree with Ray actors

Errors a user can cause (a missing path, a corrupt checkpoint, an unknown format, a
missing optional package) print one line, ``ckptable: error: ...``, on stderr and exit
with 1 (checkpoint problems) or 2 (usage; ``diff`` uses 2 for every error, as diff(1)
does); ``--debug`` adds the traceback. Ctrl-C exits with 130.

The ``info`` description and its text and JSON forms live in :mod:`ckptable._cli_info`
(re-exported here); this module parses the command line, runs each subcommand and turns
errors into exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from typing import IO, Any, NoReturn

from ckptable._cli_info import (
    count_noun,
    describe_checkpoint,
    dump_json,
    format_info,
    human_bytes,
)
from ckptable._verify import verify_checkpoint
from ckptable.errors import CheckpointError

__all__ = [
    "count_noun",
    "describe_checkpoint",
    "dump_json",
    "format_info",
    "human_bytes",
    "main",
]

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

    ranking = _Parser(add_help=False)
    ranking.add_argument(
        "--metric",
        default=None,
        help="rank a manager's checkpoints by this metric (default: the one they record)",
    )
    ranking.add_argument(
        "--mode",
        choices=("max", "min"),
        default=None,
        help="with --metric: max if higher is better, min if lower is",
    )

    info = commands.add_parser(
        "info",
        parents=[debug, ranking],
        help="show a checkpoint's component tree, or a manager directory's checkpoints",
        description="Show a checkpoint's component tree: per level its class, state "
        "format, sizes, versions, whether Ray actors hold it, and whether it has a "
        "ckptable manifest (and, for a checkpoint a CheckpointManager saved, its step "
        "and metrics). Of a CheckpointManager directory, list its checkpoints as "
        "'ckptable ls' does. Nothing is unpickled.",
    )
    info.add_argument(
        "path", metavar="PATH", help="checkpoint directory, or manager directory, or URI"
    )
    info.add_argument("--json", action="store_true", help="print one JSON document")
    info.set_defaults(command="info", run=_run_info)

    ls = commands.add_parser(
        "ls",
        parents=[debug, ranking],
        help="list a CheckpointManager directory's checkpoints",
        description="List the checkpoints of a CheckpointManager directory: step, save "
        "time, status and metrics, the latest and the best; directories named like "
        "checkpoints that a manager does not list (incomplete, corrupt) are marked with "
        "the reason. Nothing on disk is changed; files are not checksummed (see verify).",
    )
    ls.add_argument("path", metavar="DIR", help="CheckpointManager directory or URI")
    ls.add_argument("--json", action="store_true", help="print one JSON document")
    ls.set_defaults(command="ls", run=_run_ls)

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
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the checkpoints in DIR afterwards (without --dir they are always kept, "
        "in a new temporary directory that the demo names at the end)",
    )
    demo.add_argument(
        "--rllib",
        action="store_true",
        help="RLlib's own PPO on CartPole, switched onto ckptable (ckptable.rllib.enable()): "
        "train, save, info, a corrupted copy refused, restore, train on. Needs "
        "pip install 'ckptable[rllib]'",
    )
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


def _unicode_ok(stream: Any) -> bool:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf16", "utf32")


# --------------------------------------------------------------------------- info


def _run_info(args: argparse.Namespace) -> int:
    from ckptable._cli_manager import is_manager_directory

    if is_manager_directory(args.path):
        return _run_ls(args)
    _refuse_ranking_options(args)
    doc = describe_checkpoint(args.path)
    if args.json:
        print(dump_json(doc))
    else:
        print(format_info(doc, unicode=_unicode_ok(sys.stdout)))
    return EXIT_OK


def _run_ls(args: argparse.Namespace) -> int:
    from ckptable._cli_manager import (
        describe_manager_directory,
        format_manager_info,
        is_checkpoint_directory,
    )

    if is_checkpoint_directory(args.path):
        raise UsageError(
            f"{args.path} is a checkpoint, not a CheckpointManager directory: "
            f"'ckptable info {args.path}' describes it"
        )
    if args.mode is not None and args.metric is None:
        raise UsageError("--mode needs --metric: the metric that --mode orders")
    doc = describe_manager_directory(args.path, metric=args.metric, mode=args.mode)
    if args.metric is not None and doc["mode"] is None:
        raise UsageError(
            f"--metric {args.metric} needs --mode: max if a higher {args.metric} is better, "
            "min if a lower one is (the checkpoints record no order for it)"
        )
    print(dump_json(doc) if args.json else format_manager_info(doc))
    return EXIT_OK


def _refuse_ranking_options(args: argparse.Namespace) -> None:
    if args.metric is not None or args.mode is not None:
        raise UsageError(
            f"--metric and --mode rank a CheckpointManager directory's checkpoints; "
            f"{args.path} is not one"
        )


# --------------------------------------------------------------------------- verify


def _run_verify(args: argparse.Namespace) -> int:
    report = verify_checkpoint(args.path)
    size = human_bytes(report.bytes)
    counts = f"{count_noun(report.levels, 'level')}, {count_noun(report.files, 'file')}"
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
            f"{count_noun(unverified, 'level')} only read"
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
    if args.rllib:
        from ckptable._demo_rllib import main as run_rllib_demo

        return run_rllib_demo(args)
    from ckptable._demo import run_demo

    return run_demo(directory=args.dir, keep=args.keep, out=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
