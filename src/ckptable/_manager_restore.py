"""A manager's restore: the newest checkpoint that reads back whole
(``CheckpointManager.restore_latest``).

The directory is read again, and checkpoints are tried newest first. One found damaged
(``CorruptCheckpointError``) is reported in ``invalid_checkpoints`` and a warning, and
unlisted until it is replaced; one deleted meanwhile (another process's retention) means
newer checkpoints came, so the directory is listed again, ``_RESTORE_ROUNDS`` times at
most. When checkpoints are there but none restores, the error lists each one and why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ckptable._manager_listing import is_gone
from ckptable.errors import CheckpointNotFoundError, CorruptCheckpointError

if TYPE_CHECKING:
    from ckptable.manager import CheckpointManager

__all__ = ["restore_latest_checkpoint"]

logger = logging.getLogger("ckptable")

#: ``restore_latest`` lists the directory again this many times at most when checkpoints
#: are deleted under it (each time, another process saved newer ones meanwhile).
_RESTORE_ROUNDS = 3
#: What ``_restore_newest`` returns when a checkpoint was deleted while it tried it.
_LIST_AGAIN = object()


def restore_latest_checkpoint(
    manager: CheckpointManager, obj: Any, *, corrupt_ok: bool, restore_kwargs: dict[str, Any]
) -> int | None:
    """``manager.restore_latest(obj, corrupt_ok=..., **restore_kwargs)`` (see there)."""
    manager.wait()
    for round_ in range(1, _RESTORE_ROUNDS + 1):
        with manager._lock:
            manager._scan(cleanup=False)
        last_round = round_ == _RESTORE_ROUNDS
        step = _restore_newest(manager, obj, restore_kwargs, last_round=last_round)
        if step is not _LIST_AGAIN:
            break
    if isinstance(step, int):
        return step
    invalid = manager.invalid_checkpoints()
    if not invalid:
        return None
    listed = "; ".join(f"{path}: {reason}" for path, reason in sorted(invalid.items()))
    message = f"No checkpoint in {manager.directory} restores ({listed})."
    if corrupt_ok:
        logger.warning("%s Starting over (corrupt_ok=True).", message)
        return None
    raise CorruptCheckpointError(
        f"{message} They are left in place: move them away, or pass corrupt_ok=True "
        "to start over beside them.",
        path=manager.directory,
    )


def _restore_newest(
    manager: CheckpointManager, obj: Any, restore_kwargs: dict[str, Any], *, last_round: bool
) -> int | object | None:
    """Restore the newest listed checkpoint that reads back whole: its step; None if
    none does; ``_LIST_AGAIN`` if one was deleted meanwhile (another process's
    retention, which also means newer checkpoints came) and this is not the last
    round."""
    component = restore_kwargs.get("component")
    for step in reversed(manager.steps()):
        path = manager._layout.path(step)
        if component:  # RLlib's rule: a component restores from its own directory
            path = manager._layout.path(step, *component.split("/"))
        try:
            obj.restore_from_path(path, filesystem=manager._filesystem, **restore_kwargs)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            if is_gone(manager._layout, step):  # not damage: it was deleted meanwhile
                with manager._lock:
                    manager._listed.entries.pop(step, None)
                if last_round:
                    continue
                return _LIST_AGAIN
            if not isinstance(exc, CorruptCheckpointError):
                raise
            logger.warning("Not restoring %s: %s Trying the one before.", path, exc)
            _mark_corrupt(manager, step, str(exc))
            continue
        return step
    return None


def _mark_corrupt(manager: CheckpointManager, step: int, reason: str) -> None:
    """Unlist a checkpoint that failed to restore, until its directory changes."""
    identity = manager._layout.storage.identity(manager._layout.location(step))
    with manager._lock:
        manager._listed.mark_corrupt(step, manager._layout.path(step), identity, reason)
