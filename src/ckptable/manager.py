"""``CheckpointManager``: numbered checkpoints in one directory, with retention.

Layout: ``directory/checkpoint_<step, 6 digits or more>/`` is an ordinary checkpoint of
the saved object (``from_checkpoint`` and RLlib read it as it is) plus one file,
``checkpoint_manager.json`` (the step and its metrics), written into the checkpoint's
staging tree so that it is published, checksummed and made durable with it. So:

- **Nothing to get out of sync.** The manager's state (steps, metrics) is the
  directory's contents; a new manager (a restarted process) reads it back. There is no
  index file that a crash could leave behind the checkpoints.
- **A checkpoint is listed only if it is complete**: its root manifest (written last,
  the commit record) reads and lists exactly what is there. Anything else named like a
  checkpoint (a save still running elsewhere, a damaged copy) is reported in
  ``CheckpointManager.invalid_checkpoints`` and a warning, never listed, never
  deleted, never counted by retention.
- **Steps only move forward.** A save of a step at or below the newest one in the
  directory (another process's included) raises ``StepConflictError`` before anything is
  written, unless the call says ``overwrite=True``: retention would otherwise delete
  the older step right away, and a same step silently replaces a checkpoint.
- **Retention runs after a save is published**, never before, from the directory as it
  is then (read again, not remembered), and always keeps the newest valid checkpoint and
  the one just written: a returned path exists. It keeps the union of what its rules
  keep: the newest ``keep_last``, the best ``keep_best`` by ``metric`` (``mode`` is
  required with a metric), every ``keep_period``-th step and the first checkpoint of
  every ``keep_every_seconds`` of wall-clock time, by the save time each checkpoint
  records, so that a restarted manager keeps the same ones. A deletion first takes a
  checkpoint out of the listing in one step (a rename to a hidden name on local disks;
  on object stores, a marker file, then the manifest), so a crash mid-deletion never
  leaves a half-deleted checkpoint that looks valid; the next manager finishes it.
- **Save interval.** With ``save_interval_steps``, ``should_save(step)`` tells a loop
  whether a step is due, and ``save`` of a step off the interval writes nothing and
  returns None unless ``force=True`` (Orbax's convention; see ``CheckpointManager.save``).
- **Several processes may share the directory.** On a local disk a save holds an
  advisory ``flock`` on the directory itself (no lock file: nothing to be mistaken for
  a checkpoint) from its step check to the end of its retention, so saves from several
  processes (or managers) take turns, each sees the others' checkpoints, and none deletes
  what another just wrote. Object stores have no locks: the directory is listed again
  right before the step check and before retention, which narrows the window but cannot
  close it; give each writer its own directory there.
- **Damage is not emptiness.** ``restore_latest`` falls back from a damaged checkpoint
  to the one before; when checkpoints are there but none restores, it raises
  ``CorruptCheckpointError`` listing each one and why (``corrupt_ok=True`` returns None
  instead). A checkpoint that listed as valid but failed to restore stays out of this
  manager's listing and retention until it is replaced.

Async saves (``CheckpointManager.save_async``) check the step and snapshot the state
before they return (``ckptable._snapshot``); at most ``max_in_flight`` run at once (a
further call waits for the oldest); a failure is raised by the future and again by the
manager's next ``save``, ``save_async`` or ``wait``.

This module is the manager's public face; the steps it runs live beside it, one a
module: ``_manager_policies`` (the settings, checked, and the save interval),
``_manager_listing`` (reading the directory), ``_manager_steps`` (a save's record and step
check), ``_manager_retention`` (what goes after a save, and its deletion),
``_manager_sharing`` (the directory lock between processes) and ``_manager_restore``
(``restore_latest``: the newest checkpoint that reads back whole).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import threading
from collections.abc import Mapping
from typing import Any, Literal, cast

from ckptable._async import start_background_save
from ckptable._manager_listing import (
    CHECKPOINT_PREFIX,
    RECORD_FILE,
    Layout,
    Listing,
    read_directory,
)
from ckptable._manager_policies import retention_policy, skipped_by_interval
from ckptable._manager_restore import restore_latest_checkpoint
from ckptable._manager_retention import finish_deletions, ranked, retire
from ckptable._manager_sharing import DirectoryLock
from ckptable._manager_steps import (
    Reservations,
    check_step,
    checked_step,
    encode_record,
    new_record,
)
from ckptable._save import extra_root_files
from ckptable._snapshot import SnapshotPool
from ckptable._storage import LocalStorage, resolve_storage
from ckptable.errors import (
    CheckpointError,
    StepConflictError,
)

__all__ = ["CHECKPOINT_PREFIX", "RECORD_FILE", "CheckpointManager", "StepConflictError"]

logger = logging.getLogger("ckptable")


class CheckpointManager:
    """Numbered checkpoints of one object in ``directory``, with save and keep policies.

    Retention keeps the union of what ``keep_last``, ``keep_best``, ``keep_period`` and
    ``keep_every_seconds`` keep, and always the newest checkpoint and the one a save
    just wrote. Only ``keep_last`` and ``keep_best`` ever delete anything: without
    either, every checkpoint stays. Incomplete or damaged checkpoints are never
    deleted nor counted.

    Args:
        directory: Where the checkpoints go (local path or URI); created if missing.
            Several processes may save into the same local directory (see the module
            documentation for object stores).
        keep_last: Keep the newest ``keep_last`` checkpoints (Orbax's ``max_to_keep``;
            None: no limit by age).
        keep_best: Keep the best ``keep_best`` checkpoints by ``metrics[metric]``
            (None: none kept for their metric).
        metric: Name of the metric that ranks checkpoints; required with ``keep_best``
            and used by ``best``.
        mode: ``"max"`` (a higher ``metric`` is better: a reward, an accuracy) or
            ``"min"`` (lower is better: a loss). Required with ``metric``: there is no
            default, because either one is wrong for half the metrics.
        keep_period: Keep every checkpoint whose step is a multiple of ``keep_period``
            for ever, whatever ``keep_last`` and ``keep_best`` say (Orbax's
            ``keep_period``). A multiple of ``save_interval_steps`` when both are given.
        keep_every_seconds: Keep for ever the first checkpoint saved in each interval of
            this many seconds of wall-clock time (a float or a ``datetime.timedelta``;
            intervals counted from the Unix epoch, like Orbax's ``keep_time_interval``).
            Decided from the save time each checkpoint records, so it survives
            restarts; checkpoints saved without a manager record none and are not kept
            by it.
        save_interval_steps: Save only steps that are multiples of this (None: every
            step). ``should_save(step)`` answers for a loop, and ``save`` of any other
            step writes nothing and returns None unless ``force=True``.
        filesystem: A ``pyarrow.fs.FileSystem`` or fsspec filesystem for ``directory``
            (default: inferred from it, as ``save_to_path`` does).
        max_in_flight: How many async saves may run at once; a further
            ``save_async`` waits for the oldest first.

    Raises:
        ValueError: for invalid settings (``metric`` without ``mode`` included).
    """

    def __init__(
        self,
        directory: Any,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: Literal["max", "min"] | None = None,
        keep_period: int | None = None,
        keep_every_seconds: float | datetime.timedelta | None = None,
        save_interval_steps: int | None = None,
        filesystem: Any = None,
        max_in_flight: int = 1,
    ) -> None:
        self._policy = retention_policy(
            keep_last=keep_last,
            keep_best=keep_best,
            metric=metric,
            mode=mode,
            keep_period=keep_period,
            keep_every_seconds=keep_every_seconds,
            save_interval_steps=save_interval_steps,
            max_in_flight=max_in_flight,
        )
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self.keep_period = keep_period
        self.keep_every_seconds = self._policy.keep_every_seconds
        self.save_interval_steps = save_interval_steps
        self.max_in_flight = max_in_flight
        self._filesystem = filesystem
        storage, root = resolve_storage(directory, filesystem)
        storage.makedirs(root)
        paths_in_filesystem = filesystem is not None and not isinstance(storage, LocalStorage)
        self._layout = Layout(storage, root, paths_in_filesystem)
        #: The directory, as paths of its checkpoints are spelled (see ``path``).
        self.directory = root if paths_in_filesystem else storage.display(root)
        self._directory_lock = DirectoryLock(storage, root, storage.display(root))
        #: Guards everything below; held while the directory is read into it.
        self._lock = threading.RLock()
        #: The directory as last read (``_scan``), less what restores found corrupt.
        self._listed = Listing()
        #: Steps of this manager's saves between their step check and their return.
        self._reservations = Reservations()
        #: Hidden names of the deletions this manager is carrying out right now.
        self._deleting: set[str] = set()
        self._in_flight: list[concurrent.futures.Future[str | None]] = []
        self._errors: list[BaseException] = []
        self._pool = SnapshotPool(max_idle=max_in_flight)
        self.reload()

    # ------------------------------------------------------------------ listing

    def reload(self) -> None:
        """Read the directory again (another process may have saved or deleted).

        Saves and ``restore_latest`` read it themselves; ``steps``, ``latest``, ``best``
        and ``metrics`` answer from the last reading. Deletions that a killed process
        left unfinished are finished here, unless another process is saving right now.
        """
        with self._directory_lock.hold(blocking=False) as held, self._lock:
            self._scan(cleanup=held, reread=True)

    def steps(self) -> list[int]:
        """The steps of the valid checkpoints, oldest first."""
        with self._lock:
            return sorted(self._listed.entries)

    def latest(self) -> str | None:
        """Path of the newest valid checkpoint, or None."""
        steps = self.steps()
        return self._layout.path(steps[-1]) if steps else None

    def latest_step(self) -> int | None:
        """Step of the newest valid checkpoint, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best(self) -> str | None:
        """Path of the best checkpoint by ``metric`` (ties: the newest), or None.

        Checkpoints whose metrics lack ``metric`` (or hold NaN) are not ranked.

        Raises:
            ValueError: the manager has no ``metric``.
        """
        if self.metric is None:
            raise ValueError("best() needs the manager's metric=: the name to rank by.")
        with self._lock:
            best = ranked(self._listed.entries, self.metric, self.mode)
        return self._layout.path(best[0]) if best else None

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with ``step`` (None if saved without).

        Raises:
            KeyError: no valid checkpoint has that step.
        """
        with self._lock:
            return self._listed.entries[step].metrics

    def path(self, step: int) -> str:
        """Where the checkpoint of ``step`` is (or would be)."""
        return self._layout.path(checked_step(step))

    def should_save(self, step: int) -> bool:
        """Whether a save of ``step`` is due: ``step`` is a multiple of
        ``save_interval_steps`` (any step, without one) and comes after the newest
        checkpoint listed and this manager's saves in flight.

        It answers from the last reading of the directory (no request to storage), so a
        loop may ask every step. After a restart, steps continue from the restored one
        on the same grid: the interval counts steps, not saves.
        """
        step = checked_step(step)
        if self.save_interval_steps is not None and step % self.save_interval_steps:
            return False
        with self._lock:
            taken = set(self._listed.entries) | set(self._reservations.reserved)
        return not taken or step > max(taken)

    def invalid_checkpoints(self) -> dict[str, str]:
        """Directories named like checkpoints that are not listed, with the reason
        (incomplete: a save still running, or interrupted; damaged; or found corrupt
        by ``restore_latest``). They are never deleted nor counted by retention."""
        with self._lock:
            return dict(self._listed.invalid)

    # ------------------------------------------------------------------ saving

    def save(
        self,
        obj: Any,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        force: bool = False,
        **save_kwargs: Any,
    ) -> str | None:
        """Save ``obj`` as ``step``, then apply retention. Waits for the async saves in
        flight first.

        The step must come after the newest checkpoint in the directory, whoever saved
        it (the directory is read again first). Retention then keeps the new checkpoint
        whatever its rank: the path returned exists.

        With ``save_interval_steps``, a step that is not a multiple of it is skipped:
        nothing is written and None is returned, unless ``force=True`` (a last save
        before exiting, a save on preemption). This is Orbax's convention, chosen so
        that the interval lives in one place: a loop may call ``save`` every step, or
        ask ``should_save(step)`` first to skip building its metrics; a skipped step is
        the policy at work, not an error. Without ``save_interval_steps`` every call
        saves and returns the path.

        Args:
            obj: The ``Checkpointable`` to save.
            step: A non-negative int: the training step, epoch, iteration...
            metrics: JSON-encodable values saved with the checkpoint (numbers, strings);
                ``metrics[metric]`` ranks it for ``keep_best`` and ``best``.
            overwrite: Allow a step at or below the newest one: a checkpoint of the same
                step (or a damaged directory of its name) is replaced; an older step is
                kept by this save's retention and counted by age at the next.
            force: Save even a step that ``save_interval_steps`` skips.
            **save_kwargs: Passed on to ``obj.save_to_path`` (``format``, ``durable``, ...).

        Returns:
            The checkpoint's path; None if ``save_interval_steps`` skipped the step.

        Raises:
            StepConflictError: ``step`` is at or below the newest step, or a directory
                of its name exists, and ``overwrite`` is False. Nothing is written.
            Exception: the error of an earlier async save that failed (raised once),
                before this save starts; else whatever ``save_to_path`` raises.
        """
        record = self._new_record(step, metrics)
        if skipped_by_interval(record["step"], self.save_interval_steps, force=force):
            self._raise_pending_error()
            return None
        self.wait()
        return self._save_now(obj, record, save_kwargs, overwrite=overwrite, reserved=False)

    def save_async(
        self,
        obj: Any,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        force: bool = False,
        **save_kwargs: Any,
    ) -> concurrent.futures.Future[str | None]:
        """Like ``save``, in a background thread; returns once the step is checked and the
        state is copied.

        A step that ``save_interval_steps`` skips (without ``force``) returns at once a
        finished future whose result is None; nothing is copied.

        Changes made to ``obj`` after this returns never reach the checkpoint. If
        ``max_in_flight`` saves are running, waits for the oldest first. The step is
        checked here against the directory and this manager's saves in flight, and again
        by the background save (another process may have saved a newer step meanwhile:
        then the future raises ``StepConflictError`` and nothing is written).

        Returns:
            A future whose ``result()`` is the checkpoint's path (None: skipped).

        Raises:
            StepConflictError: as in ``save``.
            Exception: the error of an earlier async save that failed (raised once).
        """
        record = self._new_record(step, metrics)
        self._raise_pending_error()
        if skipped_by_interval(record["step"], self.save_interval_steps, force=force):
            skipped: concurrent.futures.Future[str | None] = concurrent.futures.Future()
            skipped.set_result(None)
            return skipped
        while True:
            with self._lock:
                self._in_flight = [f for f in self._in_flight if not f.done()]
                if len(self._in_flight) < self.max_in_flight:
                    break
                oldest = self._in_flight[0]
            concurrent.futures.wait([oldest])
        self._raise_pending_error()
        with self._lock:
            self._scan(cleanup=False)
            self._check_step(record["step"], overwrite=overwrite, own_reservation=False)
            self._reservations.reserve(record["step"])
        try:
            started = start_background_save(
                obj,
                self._layout.path(record["step"]),
                save_kwargs,
                pool=self._pool,
                save=lambda obj, _path, kwargs: self._save_now(
                    obj, record, kwargs, overwrite=overwrite, reserved=True
                ),
                name=f"ckptable-save-step-{record['step']}",
            )
            # The future's result is read only: a str is a ``str | None``.
            future = cast("concurrent.futures.Future[str | None]", started)
        except BaseException:
            with self._lock:
                self._reservations.release(record["step"])
            raise
        with self._lock:
            self._in_flight.append(future)
        future.add_done_callback(self._note_failure)
        return future

    def wait(self) -> None:
        """Wait for every async save in flight.

        Raises:
            Exception: the error of an async save that failed (each raised once).
        """
        with self._lock:
            pending = list(self._in_flight)
        concurrent.futures.wait(pending)
        with self._lock:
            self._in_flight = [f for f in self._in_flight if not f.done()]
        self._raise_pending_error()

    def close(self) -> None:
        """Wait for the saves in flight and free the memory kept for async snapshots."""
        try:
            self.wait()
        finally:
            self._pool.clear()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ restoring

    def restore_latest(
        self, obj: Any, *, corrupt_ok: bool = False, **restore_kwargs: Any
    ) -> int | None:
        """Restore ``obj`` from the newest checkpoint that reads back whole.

        The directory is read again first. A checkpoint found damaged while restoring
        (``CorruptCheckpointError``, which leaves ``obj`` untouched) is reported in
        ``invalid_checkpoints`` and a warning, and the next older one is tried; this
        manager no longer lists it (nor counts it for retention) until it is replaced.

        Args:
            obj: The ``Checkpointable`` to restore.
            corrupt_ok: When checkpoints are there but none restores, log a warning and
                return None (start over) instead of raising.
            **restore_kwargs: Passed on unchanged to ``obj.restore_from_path``
                (``safe``, ``mmap``, ``verify``, ``rollback``, ...). With
                ``component="a/b"``, only that component is restored, from its
                directory in the checkpoint.

        Returns:
            The step restored, or None if the directory holds nothing named like a
            checkpoint (or, with ``corrupt_ok``, nothing that restores).

        Raises:
            CorruptCheckpointError: checkpoints are there but none restores; the
                message lists each one and why. They are left in place.
            Exception: any other error of ``restore_from_path``, as it is.
        """
        return restore_latest_checkpoint(
            self, obj, corrupt_ok=corrupt_ok, restore_kwargs=restore_kwargs
        )

    # ------------------------------------------------------------------ internals

    def _scan(self, *, cleanup: bool, reread: bool = False) -> None:
        """Read the directory into the listing (with ``self._lock`` held); see
        ``read_directory`` for ``cleanup`` and ``reread``."""
        self._listed = read_directory(
            self._layout, self._listed, deleting=self._deleting, cleanup=cleanup, reread=reread
        )
        self._reservations.forget_unlisted(self._listed.entries)

    def _save_now(
        self,
        obj: Any,
        record: dict[str, Any],
        save_kwargs: dict[str, Any],
        *,
        overwrite: bool,
        reserved: bool,
    ) -> str:
        """Check the step, save, apply retention: the whole of one save, under the
        directory lock (``reserved``: the caller has reserved the step already)."""
        step = record["step"]
        path = self._layout.path(step)
        kwargs = dict(save_kwargs)
        kwargs.setdefault("filesystem", self._filesystem)
        try:
            with self._directory_lock.hold():
                with self._lock:
                    self._scan(cleanup=True)
                    self._check_step(step, overwrite=overwrite, own_reservation=reserved)
                    if not reserved:
                        self._reservations.reserve(step)
                        reserved = True
                with extra_root_files({RECORD_FILE: encode_record(record)}):
                    saved = str(obj.save_to_path(path, **kwargs))
                with self._lock:
                    self._listed.corrupt.pop(path, None)
                    self._scan(cleanup=True)  # others' checkpoints count; ours is listed
                    doomed = retire(
                        self._layout,
                        self._listed.entries,
                        self._policy,
                        kept={step, *self._reservations.reserved},
                        deleting=self._deleting,
                    )
                    listed = step in self._listed.entries
                finish_deletions(
                    self._layout.storage, doomed, deleting=self._deleting, lock=self._lock
                )
        finally:
            if reserved:
                with self._lock:
                    self._reservations.release(step)
        if not listed:  # never expected: the directory lock keeps others' retention out
            raise CheckpointError(
                f"The checkpoint just saved at {path} does not list "
                f"({self.invalid_checkpoints().get(path, 'it is missing')}).",
                path=path,
            )
        return saved

    def _new_record(self, step: int, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
        return new_record(
            checked_step(step),
            metrics,
            metric=self.metric,
            mode=self.mode,
            keep_best=self.keep_best,
        )

    def _check_step(self, step: int, *, overwrite: bool, own_reservation: bool) -> None:
        """``check_step`` against the listing and this manager's reservations
        (``self._lock`` held, the directory just read)."""
        check_step(
            self._layout,
            self._listed,
            self._reservations,
            step,
            overwrite=overwrite,
            own_reservation=own_reservation,
        )

    def _note_failure(self, future: concurrent.futures.Future[str | None]) -> None:
        error = future.exception()
        if error is not None:
            with self._lock:
                self._errors.append(error)

    def _raise_pending_error(self) -> None:
        with self._lock:
            if not self._errors:
                return
            error = self._errors.pop(0)
        raise error

    def __repr__(self) -> str:
        settings = [
            f"keep_last={self.keep_last}",
            f"keep_best={self.keep_best}",
            f"metric={self.metric!r}",
            f"mode={self.mode!r}",
        ]
        for name in ("keep_period", "keep_every_seconds", "save_interval_steps"):
            value = getattr(self, name)
            if value is not None:
                settings.append(f"{name}={value!r}")
        return f"CheckpointManager({self.directory!r}, {', '.join(settings)})"
