"""``ckptable info`` / ``ckptable ls`` of a ``CheckpointManager``'s directory: its
checkpoints with their step, save time and metrics, the latest and the best, and the
directories named like checkpoints that a manager does not list (incomplete, corrupt,
being deleted), each with the reason (and its metrics, where its record still reads).

The directory is read as a manager reads it (``ckptable._manager_listing``: a checkpoint
is listed when its root manifest reads and lists exactly what is there, and its record
names its step), but nothing on disk is changed, so it is safe beside a training
process. Like ``ckptable info`` of a checkpoint, nothing is unpickled; the files of each
checkpoint are not checksummed (that is ``ckptable verify``'s job), but their sizes are
compared with the manifests (a stat a file).
"""

from __future__ import annotations

from typing import Any

from ckptable._cli_info import count_noun, format_metrics, printable, utc_time
from ckptable._info import refuse_non_checkpoint
from ckptable._manager_listing import (
    Layout,
    holds_checkpoint_files,
    looks_like_manager_directory,
    survey_directory,
)
from ckptable._manager_retention import ranked
from ckptable._storage import LocalStorage, resolve_storage
from ckptable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

__all__ = [
    "describe_manager_directory",
    "format_manager_info",
    "is_checkpoint_directory",
    "is_manager_directory",
]

#: What a leftover hidden name in a manager's directory is, by its marker.
_LEFTOVERS = {
    ".ckptable-staging-": "a save in progress, or interrupted",
    ".ckptable-creating-": "a save in progress, or interrupted",
    ".ckptable-old-": "a replaced checkpoint, or an interrupted publish",
    ".ckptable-deleting-": "a deletion in progress, or interrupted",
}


def is_manager_directory(path: Any, filesystem: Any = None) -> bool:
    """Whether ``path`` is a ``CheckpointManager``'s directory (see
    ``looks_like_manager_directory``); False for a file, a checkpoint or nothing."""
    storage, root = resolve_storage(path, filesystem)
    try:
        return storage.kind(root, follow_symlinks=True) == "dir" and (
            looks_like_manager_directory(storage, root)
        )
    except OSError:
        return False


def is_checkpoint_directory(path: Any, filesystem: Any = None) -> bool:
    """Whether ``path`` is a directory holding a checkpoint level's own files."""
    storage, root = resolve_storage(path, filesystem)
    try:
        return storage.kind(root, follow_symlinks=True) == "dir" and holds_checkpoint_files(
            storage.listdir(root)
        )
    except OSError:
        return False


def describe_manager_directory(
    path: Any,
    filesystem: Any = None,
    *,
    metric: str | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """What ``ckptable info --json`` prints for a manager's directory.

    ``latest`` and ``best`` are what ``CheckpointManager.latest()`` and ``best()`` of a
    new manager would answer. The best is ranked by ``metric`` and ``mode``, by default
    those the newest checkpoint recorded (its manager's); without either, no best.

    Raises:
        CheckpointNotFoundError: nothing at ``path``, a file, a checkpoint, or a
            directory that is not empty and holds nothing a manager writes.
        CorruptCheckpointError: ``path`` cannot be listed.
    """
    storage, root = resolve_storage(path, filesystem)
    shown = storage.display(root)
    try:
        kind = storage.kind(root, follow_symlinks=True)
        if kind == "file":
            refuse_non_checkpoint(storage, root)  # names the checkpoint it is part of
        if kind != "dir":
            what = "a file" if kind == "file" else "nothing"
            raise CheckpointNotFoundError(
                f"No CheckpointManager directory at {shown}: there is {what} there.", path=shown
            )
        entries = storage.listdir(root)
        if holds_checkpoint_files(entries):
            raise CheckpointNotFoundError(
                f"No CheckpointManager directory at {shown}: it is a checkpoint "
                f"('ckptable info {shown}' describes it).",
                path=shown,
            )
        if entries and not looks_like_manager_directory(storage, root, entries):
            raise CheckpointNotFoundError(
                f"No CheckpointManager directory at {shown}: it holds no checkpoint_<step> "
                "directories, nor what a manager's save leaves (and is not empty, as a new "
                "manager's directory is).",
                path=shown,
            )
        paths_in_filesystem = filesystem is not None and not isinstance(storage, LocalStorage)
        layout = Layout(storage, root, paths_in_filesystem)
        survey = survey_directory(layout)
    except CheckpointError:
        raise
    except OSError as exc:
        raise CorruptCheckpointError(f"Cannot list {shown}: {exc}", path=shown) from exc

    newest = survey.entries[max(survey.entries)] if survey.entries else None
    if metric is None and newest is not None:
        metric = newest.metric
    if mode is None:
        mode = newest.mode if newest is not None and newest.metric == metric else None
    best = ranked(survey.entries, metric, mode)[:1] if metric and mode else []

    checkpoints = []
    for step in sorted({*survey.entries, *survey.unlisted}):
        entry = survey.entries.get(step)
        if entry is not None:
            checkpoints.append(
                {
                    "step": step,
                    "path": layout.path(step),
                    "status": "ok",
                    "saved_at": entry.saved_at,
                    "saved_at_utc": utc_time(entry.saved_at),
                    "metrics": entry.metrics,
                    "reason": None,
                }
            )
        else:
            unlisted = survey.unlisted[step]
            checkpoints.append(
                {
                    "step": step,
                    "path": unlisted.path,
                    "status": unlisted.status,
                    "saved_at": unlisted.saved_at,
                    "saved_at_utc": utc_time(unlisted.saved_at),
                    "metrics": unlisted.metrics,
                    "reason": unlisted.reason,
                }
            )
    latest = max(survey.entries, default=None)
    return {
        "path": root if paths_in_filesystem else shown,
        "type": "CheckpointManager",
        "steps": sorted(survey.entries),
        "latest": None if latest is None else {"step": latest, "path": layout.path(latest)},
        "best": (
            {"step": best[0], "path": layout.path(best[0]), "metric": metric, "mode": mode}
            if best
            else None
        ),
        "metric": metric,
        "mode": mode,
        "checkpoints": checkpoints,
        "leftovers": [{"name": name, "what": _leftover_kind(name)} for name in survey.leftovers],
    }


def _leftover_kind(name: str) -> str:
    for marker, what in _LEFTOVERS.items():
        if marker in name:
            return what
    return "left by ckptable"


def format_manager_info(doc: dict[str, Any]) -> str:
    """The text ``ckptable info`` (and ``ckptable ls``) prints for a manager's directory."""
    checkpoints = doc["checkpoints"]
    listed = doc["steps"]
    unlisted = [c for c in checkpoints if c["status"] != "ok"]
    lines = [printable(doc["path"])]
    summary = f"  CheckpointManager directory: {count_noun(len(listed), 'checkpoint')}"
    if listed:
        summary += f" (steps {listed[0]} to {listed[-1]})" if len(listed) > 1 else ""
    elif not checkpoints and not doc["leftovers"]:
        summary += " (an empty directory: no save has completed in it yet)"
    if unlisted:
        summary += f"; {len(unlisted)} not listed (see below)"
    lines.append(summary)
    latest, best = doc["latest"], doc["best"]
    if latest is not None:
        lines.append(f"  latest: step {latest['step']}  {printable(latest['path'])}")
    if best is not None:
        lines.append(
            f"  best:   step {best['step']} by {printable(best['metric'])} "
            f"({best['mode']})  {printable(best['path'])}"
        )
    elif doc["metric"] is None and listed:
        lines.append("  best:   - (no metric recorded; pass --metric and --mode)")
    if not checkpoints:
        return "\n".join(lines)
    lines.append("")
    rows = [["STEP", "SAVED (UTC)", "STATUS", "METRICS"]]
    best_step = best["step"] if best else None
    latest_step = latest["step"] if latest else None
    for checkpoint in checkpoints:
        status = checkpoint["status"]
        marks = [
            m for m, s in (("latest", latest_step), ("best", best_step)) if s == checkpoint["step"]
        ]
        if marks:
            status += ", " + ", ".join(marks)
        rows.append(
            [
                str(checkpoint["step"]),
                checkpoint["saved_at_utc"] or "-",
                status,
                format_metrics(checkpoint["metrics"])
                if status.startswith("ok") or checkpoint["metrics"] is not None
                else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]), row[3]]
        lines.append(("  " + "  ".join(cells)).rstrip())
    if unlisted:
        lines.append("")
        lines.append("  not listed (never deleted nor counted by retention):")
        for checkpoint in unlisted:
            lines.append(
                f"    step {checkpoint['step']}: {checkpoint['status']}: "
                f"{printable(' '.join(str(checkpoint['reason']).split()))}"
            )
    if doc["leftovers"]:
        lines.append("")
        lines.append("  left beside the checkpoints:")
        for leftover in doc["leftovers"]:
            lines.append(f"    {printable(leftover['name'])}: {leftover['what']}")
    return "\n".join(lines)
