"""The step of a save, before anything is written: its record, its check and its
reservation.

A save's step and metrics are checked and encoded in the caller (``new_record``), so that
a bad value fails there, not in a background save. Then, with the directory just read,
``check_step`` enforces that steps only move forward: a step at or below the newest one
in the directory (another process's included) or in flight in this manager raises
``StepConflictError`` unless the save says ``overwrite=True``. From that check until the
save returns, its step is reserved (``Reservations``): counted by later checks and
never deleted by retention (``ckptable._manager_retention``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ckptable._manager_listing import Layout, Listing
from ckptable._version import package_version
from ckptable.errors import StepConflictError

__all__ = [
    "Reservations",
    "check_step",
    "checked_step",
    "encode_record",
    "is_int",
    "new_record",
]

logger = logging.getLogger("ckptable")

_RECORD_VERSION = 1


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_step(step: Any) -> int:
    if not is_int(step) or step < 0:
        raise ValueError(f"step must be a non-negative int, not {step!r}.")
    return int(step)


def new_record(
    step: int,
    metrics: Mapping[str, Any] | None,
    *,
    metric: str | None,
    mode: str | None,
    keep_best: int | None,
) -> dict[str, Any]:
    """The record of a save of ``step`` (without its save time), its metrics checked now
    (warning if ``keep_best`` will not rank it by ``metric``). The manager's ``metric``
    and ``mode`` are recorded too, so that ``ckptable info`` of the directory can name
    the best checkpoint."""
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping or None, not {type(metrics).__name__}.")
    values = None if metrics is None else {str(k): v for k, v in metrics.items()}
    try:
        # Encoded now, so that a value JSON cannot hold fails in the caller.
        values = json.loads(json.dumps(values, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The metrics of step {step} cannot be saved as JSON: {exc}") from exc
    if metric is not None and keep_best is not None and (values is None or metric not in values):
        logger.warning(
            "Step %d is saved without the metric %r: keep_best does not rank it.",
            step,
            metric,
        )
    record: dict[str, Any] = {
        "version": _RECORD_VERSION,
        "step": step,
        "metrics": values,
        "ckptable_version": package_version(),
    }
    if metric is not None:
        record.update(metric=metric, mode=mode)
    return record


def encode_record(record: dict[str, Any]) -> bytes:
    """The record file's contents, stamped with the time now (the save's time)."""
    record = {**record, "saved_at": time.time()}
    return json.dumps(record, indent=1, sort_keys=True, default=_json_default).encode()


def _json_default(value: Any) -> Any:
    """numpy scalars (and anything with ``.item()``) as plain numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(TypeError, ValueError):
            return item()
    raise TypeError(f"{type(value).__name__} is not JSON-encodable")


@dataclasses.dataclass
class Reservations:
    """The steps of a manager's saves between their step check and their return."""

    #: Counted by the step check and never deleted by retention.
    reserved: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    #: Steps this manager reserved (and saved, while listed): checked against each other
    #: in the callers, so a background save's second check skips them.
    ours: set[int] = dataclasses.field(default_factory=set)

    def reserve(self, step: int) -> None:
        self.reserved[step] += 1
        self.ours.add(step)

    def release(self, step: int) -> None:
        self.reserved[step] -= 1
        if self.reserved[step] <= 0:
            del self.reserved[step]

    def forget_unlisted(self, listed: Iterable[int]) -> None:
        """Drop from ``ours`` the steps neither listed nor reserved any more."""
        self.ours &= set(listed) | set(self.reserved)


def check_step(
    layout: Layout,
    listing: Listing,
    reservations: Reservations,
    step: int,
    *,
    overwrite: bool,
    own_reservation: bool,
) -> None:
    """Refuse ``step`` unless it comes after every step in the directory (``listing``,
    just read) and in flight in this manager (``reservations``).

    ``own_reservation``: the second check, by a background save whose caller checked
    and reserved the step; this manager's own steps were checked then, so only other
    writers' count now.
    """
    if overwrite:
        return
    if own_reservation:
        taken = set(listing.entries) - reservations.ours
    else:
        taken = set(listing.entries) | set(reservations.reserved)
    newest = max(taken, default=None)
    path = layout.path(step)
    if step in taken:
        where = path if step in listing.entries else f"{path}, in flight"
        raise StepConflictError(
            f"Step {step} has a checkpoint already ({where}). Pass overwrite=True to replace it.",
            path=path,
            step=step,
            newest_step=newest,
        )
    if path in listing.invalid:
        raise StepConflictError(
            f"{path} exists and is not a valid checkpoint ({listing.invalid[path]}); "
            "it is left for you to inspect. Pass overwrite=True to replace it.",
            path=path,
            step=step,
            newest_step=newest,
        )
    if newest is not None and step < newest:
        raise StepConflictError(
            f"Step {step} is older than the newest checkpoint, step {newest} "
            f"({layout.path(newest)}): its checkpoint would be out of order (and "
            "retention by age would delete it first). Pass overwrite=True to save it "
            "anyway.",
            path=path,
            step=step,
            newest_step=newest,
        )
