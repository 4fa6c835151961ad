"""Retention, the last step of a save: rank, choose what goes, delete it in one step.

It runs after a save is published, from the directory as it is then (just read by
``ckptable._manager_listing``), and never before, so a returned path exists. Only valid
checkpoints count and only they go: invalid ones neither take a valid one's place nor are
deleted. Always kept: the newest, the one just saved, and those of the manager's saves
still in progress.

A deletion first takes a checkpoint out of the listing in one step (a rename to a hidden
name on local disks; on object stores, a marker file, then the manifest), so a crash
mid-deletion never leaves a half-deleted checkpoint that looks valid; the next reading
of the directory finishes it. The tree is removed afterwards (``finish_deletions``).
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from ckptable._manager_listing import DELETING_INFIX, DELETING_MARKER, Entry, Layout
from ckptable._manager_steps import is_int
from ckptable._manifest import MANIFEST_FILE
from ckptable._storage import Storage

__all__ = ["finish_deletions", "ranked", "retire"]

logger = logging.getLogger("ckptable")


def ranked(entries: Mapping[int, Entry], metric: str | None, mode: str) -> list[int]:
    """Steps with a usable ``metric``, best first by ``mode`` (ties: newest first)."""
    scored = [
        (float(e.metrics[metric]), step)
        for step, e in entries.items()
        if metric is not None and e.metrics and _is_score(e.metrics.get(metric))
    ]
    sign = -1.0 if mode == "max" else 1.0
    return [step for _, step in sorted(scored, key=lambda s: (sign * s[0], -s[1]))]


def _is_score(value: Any) -> bool:
    return is_int(value) or (isinstance(value, float) and not math.isnan(value))


def retire(
    layout: Layout,
    entries: dict[int, Entry],
    *,
    keep_last: int | None,
    keep_best: int | None,
    metric: str | None,
    mode: str,
    kept: Iterable[int],
    deleting: set[str],
) -> list[str]:
    """Take the checkpoints that neither ``keep_last`` nor ``keep_best`` keeps out of the
    listing (``entries``, just read, and the directory); return what is left to remove.

    Kept whatever their rank: the newest and ``kept`` (the one just saved, those of the
    manager's saves in progress). ``deleting`` gains the hidden names taken.
    """
    if keep_last is None and keep_best is None:
        return []
    steps = sorted(entries)
    if not steps:
        return []
    keep = {steps[-1], *kept}
    if keep_last is not None:
        keep.update(steps[-keep_last:])
    if keep_best is not None:
        keep.update(ranked(entries, metric, mode)[:keep_best])
    doomed = [step for step in steps if step not in keep]
    retired = []
    for step in doomed:
        del entries[step]
        hidden = _take_out_of_listing(layout, step, deleting)
        if hidden is not None:
            retired.append(hidden)
    return retired


def _take_out_of_listing(layout: Layout, step: int, deleting: set[str]) -> str | None:
    """First step of a deletion, in one step: a rename to a hidden name (local disks), or
    the deletion marker and then the manifest (object stores). Returns the tree left to
    remove (None: the checkpoint stays, with a warning)."""
    storage, directory = layout.storage, layout.location(step)
    try:
        if not storage.can_rename_dirs:
            storage.write_bytes(storage.join(directory, DELETING_MARKER), b"")
            storage.remove_tree(storage.join(directory, MANIFEST_FILE))
            return directory
        name = f".{layout.name(step)}{DELETING_INFIX}{uuid.uuid4().hex[:12]}"
        deleting.add(name)
        storage.rename(directory, storage.join(layout.root, name))
        return storage.join(layout.root, name)
    except OSError as exc:
        logger.warning("Could not delete the old checkpoint %s: %s", layout.path(step), exc)
        return None


def finish_deletions(
    storage: Storage, trees: list[str], *, deleting: set[str], lock: threading.RLock
) -> None:
    """Remove the trees that ``retire`` took out of the listing, dropping each from
    ``deleting`` (guarded by ``lock``) once done with."""
    for tree in trees:
        try:
            storage.remove_tree(tree)
        except OSError as exc:
            logger.warning(
                "Could not delete %s (%s); the next manager will.",
                storage.display(tree),
                exc,
            )
        finally:
            with lock:
                deleting.discard(storage.split(tree)[1])
