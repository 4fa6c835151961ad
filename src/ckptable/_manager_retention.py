"""Retention, the last step of a save: rank, choose what goes, delete it in one step.

It runs after a save is published, from the directory as it is then (just read by
``ckptable._manager_listing``), and never before, so a returned path exists. Only valid
checkpoints count and only they go: invalid ones neither take a valid one's place nor are
deleted. Always kept: the newest, the one just saved, and those of the manager's saves
still in progress.

What is kept is the union of what each rule of the ``RetentionPolicy`` keeps
(``keep_last``, ``keep_best``, ``keep_period``, ``keep_every_seconds``); only
``keep_last`` and ``keep_best`` ever delete anything, the other two only protect. Every
rule reads what the checkpoints themselves record (their step, metrics and save time),
so it decides the same after a restart.

A deletion first takes a checkpoint out of the listing in one step (a rename to a hidden
name on local disks; on object stores, a marker file, then the manifest), so a crash
mid-deletion never leaves a half-deleted checkpoint that looks valid; the next reading
of the directory finishes it. The tree is removed afterwards (``finish_deletions``).
"""

from __future__ import annotations

import dataclasses
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

__all__ = ["RetentionPolicy", "finish_deletions", "ranked", "retire"]

logger = logging.getLogger("ckptable")


def ranked(entries: Mapping[int, Entry], metric: str | None, mode: str | None) -> list[int]:
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


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints a manager keeps (see ``CheckpointManager`` for each setting)."""

    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: str | None = None
    keep_period: int | None = None
    keep_every_seconds: float | None = None

    @property
    def deletes(self) -> bool:
        """Whether any rule limits the number of checkpoints (else nothing goes)."""
        return self.keep_last is not None or self.keep_best is not None

    def kept(self, entries: Mapping[int, Entry]) -> set[int]:
        """The steps of ``entries`` that some rule keeps (the newest among them); all of
        them when no rule deletes anything."""
        steps = sorted(entries)
        if not steps or not self.deletes:
            return set(steps)
        keep = {steps[-1]}
        if self.keep_last is not None:
            keep.update(steps[-self.keep_last :])
        if self.keep_best is not None:
            keep.update(ranked(entries, self.metric, self.mode)[: self.keep_best])
        if self.keep_period is not None:
            keep.update(step for step in steps if step % self.keep_period == 0)
        if self.keep_every_seconds is not None:
            keep.update(first_of_each_interval(entries, self.keep_every_seconds))
        return keep


def first_of_each_interval(entries: Mapping[int, Entry], seconds: float) -> set[int]:
    """The first checkpoint saved in each interval of ``seconds`` of wall-clock time
    (intervals counted from the Unix epoch), by the save time each checkpoint records.

    The rule is stateless: a checkpoint's interval never changes and the first of an
    interval is never deleted by it, so every manager, before or after a restart, keeps
    the same ones. Checkpoints without a recorded save time (saved without a manager)
    are not kept by it.
    """
    first: dict[int, tuple[float, int]] = {}
    for step, entry in entries.items():
        if entry.saved_at is None or not math.isfinite(entry.saved_at):
            continue
        interval = math.floor(entry.saved_at / seconds)
        candidate = (entry.saved_at, step)
        if interval not in first or candidate < first[interval]:
            first[interval] = candidate
    return {step for _, step in first.values()}


def retire(
    layout: Layout,
    entries: dict[int, Entry],
    policy: RetentionPolicy,
    *,
    kept: Iterable[int],
    deleting: set[str],
) -> list[str]:
    """Take the checkpoints that ``policy`` does not keep out of the listing
    (``entries``, just read, and the directory); return what is left to remove.

    Kept whatever the policy says: the newest and ``kept`` (the one just saved, those of
    the manager's saves in progress). ``deleting`` gains the hidden names taken.
    """
    if not policy.deletes or not entries:
        return []
    keep = policy.kept(entries) | set(kept)
    doomed = [step for step in sorted(entries) if step not in keep]
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
