"""A manager's save and keep policies: its settings, checked when it is built, and the
save interval's decision for each step.

``retention_policy`` refuses invalid settings (``ValueError``: ``keep_last``,
``keep_best``, ``keep_period``, ``save_interval_steps``, ``max_in_flight``, ``metric``
without ``mode``, ``keep_every_seconds``) and returns the ``RetentionPolicy`` that
``ckptable._manager_retention`` applies after each save; ``skipped_by_interval`` says whether
``save_interval_steps`` skips a step (see ``CheckpointManager.save``).
"""

from __future__ import annotations

import datetime
import logging
import math

from ckptable._manager_retention import RetentionPolicy
from ckptable._manager_steps import is_int

__all__ = ["retention_policy", "skipped_by_interval"]

logger = logging.getLogger("ckptable")


def retention_policy(
    *,
    keep_last: int | None,
    keep_best: int | None,
    metric: str | None,
    mode: str | None,
    keep_period: int | None,
    keep_every_seconds: float | datetime.timedelta | None,
    save_interval_steps: int | None,
    max_in_flight: int,
) -> RetentionPolicy:
    """The retention policy of a manager built with these settings (see
    ``CheckpointManager``), ``keep_every_seconds`` in seconds.

    Raises:
        ValueError: for invalid settings (``metric`` without ``mode`` included).
    """
    for name, value in (
        ("keep_last", keep_last),
        ("keep_best", keep_best),
        ("keep_period", keep_period),
        ("save_interval_steps", save_interval_steps),
    ):
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{name} must be None or an int of at least 1, not {value!r}.")
    if keep_best is not None and metric is None:
        raise ValueError("keep_best needs metric=: the name of the metric to rank by.")
    if mode is not None and mode not in ("max", "min"):
        raise ValueError(f'mode must be "max" or "min", not {mode!r}.')
    if metric is not None and mode is None:
        raise ValueError(
            f'metric={metric!r} needs mode=: "max" if a higher {metric} is better '
            f'(a reward, an accuracy), "min" if a lower one is (a loss).'
        )
    if (
        keep_period is not None
        and save_interval_steps is not None
        and keep_period % save_interval_steps
    ):
        raise ValueError(
            f"keep_period={keep_period} is not a multiple of "
            f"save_interval_steps={save_interval_steps}: only steps that are "
            "multiples of both would be kept."
        )
    if not is_int(max_in_flight) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be an int of at least 1, not {max_in_flight!r}.")
    return RetentionPolicy(
        keep_last=keep_last,
        keep_best=keep_best,
        metric=metric,
        mode=mode,
        keep_period=keep_period,
        keep_every_seconds=_seconds(keep_every_seconds),
    )


def _seconds(value: float | datetime.timedelta | None) -> float | None:
    """``keep_every_seconds`` as a positive, finite number of seconds (or None)."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ValueError(
            "keep_every_seconds must be None, a positive number of seconds or a "
            f"datetime.timedelta, not {value!r}."
        )
    return float(seconds)


def skipped_by_interval(step: int, interval: int | None, *, force: bool) -> bool:
    """Whether ``save_interval_steps`` (``interval``) skips ``step`` (logged at debug
    level)."""
    if force or interval is None or step % interval == 0:
        return False
    logger.debug("Not saving step %d: save_interval_steps is %d.", step, interval)
    return True
