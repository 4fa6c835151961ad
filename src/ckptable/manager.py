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
  the one just written: a returned path exists. A deletion first takes a checkpoint out
  of the listing in one step (a rename to a hidden name on local disks; on object
  stores, a marker file, then the manifest), so a crash mid-deletion never leaves a
  half-deleted checkpoint that looks valid; the next manager finishes the deletion.
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
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from ckptable._async import start_background_save
from ckptable._commit import CREATING_MARKER, OLD_MARKER, STAGING_MARKER, recover_leftovers
from ckptable._manifest import MANIFEST_FILE, check_listing, read_manifest, read_verified
from ckptable._save import extra_root_files
from ckptable._snapshot import SnapshotPool
from ckptable._storage import LocalStorage, Storage, resolve_storage
from ckptable._version import package_version
from ckptable.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StepConflictError,
)

__all__ = ["CHECKPOINT_PREFIX", "RECORD_FILE", "CheckpointManager", "StepConflictError"]

logger = logging.getLogger("ckptable")

#: Checkpoint directories are named ``checkpoint_<step>`` (zero-padded to 6 digits).
CHECKPOINT_PREFIX = "checkpoint_"
#: The manager's record inside each checkpoint: its step, metrics and save time.
RECORD_FILE = "checkpoint_manager.json"
_RECORD_VERSION = 1
_STEP_DIGITS = 6
_NAME_PATTERN = re.compile(r"checkpoint_(\d+)")
#: A checkpoint being deleted is renamed to ``.checkpoint_<step>.ckptable-deleting-<token>``
#: (local disks) or holds this marker file (object stores).
_DELETING_MARKER = ".ckptable-deleting"
_DELETING_INFIX = ".ckptable-deleting-"
#: What an interrupted save of ``checkpoint_<step>`` leaves beside it (see ``_commit``).
_LEFTOVER_PATTERN = re.compile(
    r"\.(checkpoint_\d+)(?:"
    + "|".join(re.escape(m) for m in (STAGING_MARKER, OLD_MARKER, CREATING_MARKER))
    + ")"
)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One listed checkpoint."""

    step: int
    metrics: dict[str, Any] | None
    saved_at: float | None
    #: ``Storage.identity`` of its directory when it was read (None: cannot tell), so that
    #: a later listing re-reads only checkpoints that changed.
    identity: Any = dataclasses.field(default=None, compare=False)


class _DirectoryLock:
    """The advisory lock on a manager's directory: exclusive between processes (and
    between managers), shared by the threads of one manager (its async saves run side by
    side, as ``max_in_flight`` allows).

    It is a ``flock`` on the directory itself, released when the last holder of the
    manager lets go or the process dies. Storages without locks (object stores; a local
    filesystem that refuses ``flock``, with a warning) are held without one.
    """

    def __init__(self, storage: Storage, root: str, shown: str) -> None:
        # A symlinked local directory is locked where it points (the flock opens no links).
        self._root = os.path.realpath(root) if isinstance(storage, LocalStorage) else root
        self._storage, self._shown = storage, shown
        self._changed = threading.Condition(threading.Lock())
        self._holders = 0
        self._acquiring = False
        self._handle: Any = None
        self._warned = False

    @contextlib.contextmanager
    def hold(self, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the lock in the body; yield False only when not ``blocking`` and another
        process (or manager) holds it, or this manager is still waiting for it."""
        held = self._acquire(blocking)
        try:
            yield held
        finally:
            if held:
                self._release()

    def _acquire(self, blocking: bool) -> bool:
        with self._changed:
            while self._acquiring:  # one thread waits for the flock; the others join it
                if not blocking:
                    return False
                self._changed.wait()
            if self._holders:
                self._holders += 1
                return True
            self._acquiring = True
        handle, held = None, True
        try:
            handle = self._storage.lock_directory(self._root, blocking=blocking)
        except BlockingIOError:
            held = False
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "Cannot lock %s (%s): saves from several processes into it are not "
                    "coordinated.",
                    self._shown,
                    exc,
                )
        except BaseException:
            held = False
            raise
        finally:
            with self._changed:
                self._acquiring = False
                if held:
                    self._handle, self._holders = handle, 1
                self._changed.notify_all()
        return held

    def _release(self) -> None:
        with self._changed:
            self._holders -= 1
            if self._holders == 0:
                handle, self._handle = self._handle, None
                self._storage.unlock(handle)


class CheckpointManager:
    """Numbered checkpoints of one object in ``directory``, with retention.

    Args:
        directory: Where the checkpoints go (local path or URI); created if missing.
            Several processes may save into the same local directory (see the module
            documentation for object stores).
        keep_last: Keep the newest ``keep_last`` checkpoints (None: no limit by age).
        keep_best: Keep the best ``keep_best`` checkpoints by ``metrics[metric]``
            (None: none kept for their metric). With both None, nothing is deleted.
            The newest checkpoint, and the one a save just wrote, are always kept.
        metric: Name of the metric that ranks checkpoints; required with ``keep_best``
            and used by ``best``.
        mode: ``"max"`` (higher is better) or ``"min"``.
        filesystem: A ``pyarrow.fs.FileSystem`` or fsspec filesystem for ``directory``
            (default: inferred from it, as ``save_to_path`` does).
        max_in_flight: How many async saves may run at once; a further
            ``save_async`` waits for the oldest first.

    Raises:
        ValueError: for invalid retention settings.
    """

    def __init__(
        self,
        directory: Any,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: Literal["max", "min"] = "max",
        filesystem: Any = None,
        max_in_flight: int = 1,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or an int of at least 1, not {value!r}.")
        if keep_best is not None and metric is None:
            raise ValueError("keep_best needs metric=: the name of the metric to rank by.")
        if mode not in ("max", "min"):
            raise ValueError(f'mode must be "max" or "min", not {mode!r}.')
        if not _is_int(max_in_flight) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int of at least 1, not {max_in_flight!r}.")
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self.max_in_flight = max_in_flight
        self._filesystem = filesystem
        self._storage, self._root = resolve_storage(directory, filesystem)
        self._storage.makedirs(self._root)
        self._paths_in_filesystem = filesystem is not None and not isinstance(
            self._storage, LocalStorage
        )
        #: The directory, as paths of its checkpoints are spelled (see ``path``).
        self.directory = (
            self._root if self._paths_in_filesystem else self._storage.display(self._root)
        )
        self._directory_lock = _DirectoryLock(
            self._storage, self._root, self._storage.display(self._root)
        )
        #: Guards everything below; held while the directory is read into it.
        self._lock = threading.RLock()
        self._entries: dict[int, _Entry] = {}
        self._invalid: dict[str, str] = {}
        #: Checkpoints that listed as valid but failed to restore: path → (identity of
        #: the directory then, reason). Not listed again until the directory changes.
        self._corrupt: dict[str, tuple[Any, str]] = {}
        #: Steps of this manager's saves between their step check and their return:
        #: counted by the step check and never deleted by retention.
        self._reserved: collections.Counter[int] = collections.Counter()
        #: Steps this manager reserved (and saved, while listed): checked against each
        #: other in the callers, so a background save's second check skips them.
        self._ours: set[int] = set()
        #: Hidden names of the deletions this manager is carrying out right now.
        self._deleting: set[str] = set()
        self._in_flight: list[concurrent.futures.Future[str]] = []
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

    def _scan(self, *, cleanup: bool, reread: bool = False) -> None:
        """Read the directory into the listing (with ``self._lock`` held).

        Args:
            cleanup: Also finish deletions that a killed process left (only while the
                directory lock is held, so as not to race a deletion in progress).
            reread: Read every checkpoint's record again; else a checkpoint read before
                whose directory has not changed keeps its entry.
        """
        storage = self._storage
        listing = self._listing()
        leftovers = {_LEFTOVER_PATTERN.match(name) for name in listing} - {None}
        if leftovers:
            # Saves killed midway: a two-step publish is completed (or its old tree
            # moved back) before the listing, and abandoned staging trees go. Safe
            # beside saves in progress (their staging directories are locked).
            for target in sorted({m.group(1) for m in leftovers if m is not None}):
                recover_leftovers(storage, storage.join(self._root, target))
            listing = self._listing()
        entries: dict[int, _Entry] = {}
        invalid: dict[str, str] = {}
        for name, kind in sorted(listing.items()):
            if name.startswith("." + CHECKPOINT_PREFIX) and _DELETING_INFIX in name:
                if cleanup and name not in self._deleting:
                    self._remove_quietly(storage.join(self._root, name))
                continue
            match = _NAME_PATTERN.fullmatch(name)
            if match is None or kind != "dir":
                continue
            step = int(match.group(1))
            if name != self._name(step):
                continue  # not a name this manager writes (checkpoint_5 for step 5)
            path, directory = self._path(step), storage.join(self._root, name)
            identity = storage.identity(directory)
            corrupt = self._corrupt.get(path)
            if corrupt is not None and corrupt[0] == identity:
                invalid[path] = corrupt[1]
                continue
            known = self._entries.get(step)
            if not reread and known is not None and known.identity == identity:
                entries[step] = known
                continue
            try:
                entries[step] = self._read_entry(step, identity)
            except _BeingDeleted:
                if cleanup:
                    self._remove_quietly(directory)
            except (CheckpointError, OSError, ValueError) as exc:
                invalid[path] = str(exc)
        newly_invalid = set(invalid) - set(self._invalid)
        self._entries, self._invalid = entries, invalid
        self._corrupt = {p: c for p, c in self._corrupt.items() if p in invalid}
        self._ours &= set(entries) | set(self._reserved)
        for path in sorted(newly_invalid):
            logger.warning("Not listing %s: %s", path, invalid[path])

    def _listing(self) -> dict[str, Any]:
        try:
            return dict(self._storage.listdir(self._root))
        except FileNotFoundError:  # an object store "directory" with nothing in it yet
            return {}

    def steps(self) -> list[int]:
        """The steps of the valid checkpoints, oldest first."""
        with self._lock:
            return sorted(self._entries)

    def latest(self) -> str | None:
        """Path of the newest valid checkpoint, or None."""
        steps = self.steps()
        return self._path(steps[-1]) if steps else None

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
        ranked = self._ranked()
        return self._path(ranked[0]) if ranked else None

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with ``step`` (None if saved without).

        Raises:
            KeyError: no valid checkpoint has that step.
        """
        with self._lock:
            return self._entries[step].metrics

    def path(self, step: int) -> str:
        """Where the checkpoint of ``step`` is (or would be)."""
        return self._path(_checked_step(step))

    def invalid_checkpoints(self) -> dict[str, str]:
        """Directories named like checkpoints that are not listed, with the reason
        (incomplete: a save still running, or interrupted; damaged; or found corrupt
        by ``restore_latest``). They are never deleted nor counted by retention."""
        with self._lock:
            return dict(self._invalid)

    # ------------------------------------------------------------------ saving

    def save(
        self,
        obj: Any,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        **save_kwargs: Any,
    ) -> str:
        """Save ``obj`` as ``step``, then apply retention. Waits for the async saves in
        flight first.

        The step must come after the newest checkpoint in the directory, whoever saved
        it (the directory is read again first). Retention then keeps the new checkpoint
        whatever its rank: the path returned exists.

        Args:
            obj: The ``Checkpointable`` to save.
            step: A non-negative int: the training step, epoch, iteration...
            metrics: JSON-encodable values saved with the checkpoint (numbers, strings);
                ``metrics[metric]`` ranks it for ``keep_best`` and ``best``.
            overwrite: Allow a step at or below the newest one: a checkpoint of the same
                step (or a damaged directory of its name) is replaced; an older step is
                kept by this save's retention and counted by age at the next.
            **save_kwargs: Passed on to ``obj.save_to_path`` (``format``, ``durable``, ...).

        Returns:
            The checkpoint's path.

        Raises:
            StepConflictError: ``step`` is at or below the newest step, or a directory
                of its name exists, and ``overwrite`` is False. Nothing is written.
            Exception: the error of an earlier async save that failed (raised once),
                before this save starts; else whatever ``save_to_path`` raises.
        """
        record = self._record(_checked_step(step), metrics)
        self.wait()
        return self._save_now(obj, record, save_kwargs, overwrite=overwrite, reserved=False)

    def save_async(
        self,
        obj: Any,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        **save_kwargs: Any,
    ) -> concurrent.futures.Future[str]:
        """Like ``save``, in a background thread; returns once the step is checked and the
        state is copied.

        Changes made to ``obj`` after this returns never reach the checkpoint. If
        ``max_in_flight`` saves are running, waits for the oldest first. The step is
        checked here against the directory and this manager's saves in flight, and again
        by the background save (another process may have saved a newer step meanwhile:
        then the future raises ``StepConflictError`` and nothing is written).

        Returns:
            A future whose ``result()`` is the checkpoint's path.

        Raises:
            StepConflictError: as in ``save``.
            Exception: the error of an earlier async save that failed (raised once).
        """
        record = self._record(_checked_step(step), metrics)
        self._raise_pending_error()
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
            self._reserve_step(record["step"])
        try:
            future = start_background_save(
                obj,
                self._path(record["step"]),
                save_kwargs,
                pool=self._pool,
                save=lambda obj, _path, kwargs: self._save_now(
                    obj, record, kwargs, overwrite=overwrite, reserved=True
                ),
                name=f"ckptable-save-step-{record['step']}",
            )
        except BaseException:
            self._release_step(record["step"])
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
        self.wait()
        for round_ in range(1, _RESTORE_ROUNDS + 1):
            with self._lock:
                self._scan(cleanup=False)
            last_round = round_ == _RESTORE_ROUNDS
            step = self._restore_newest(obj, restore_kwargs, last_round=last_round)
            if step is not _LIST_AGAIN:
                break
        if isinstance(step, int):
            return step
        invalid = self.invalid_checkpoints()
        if not invalid:
            return None
        listed = "; ".join(f"{path}: {reason}" for path, reason in sorted(invalid.items()))
        message = f"No checkpoint in {self.directory} restores ({listed})."
        if corrupt_ok:
            logger.warning("%s Starting over (corrupt_ok=True).", message)
            return None
        raise CorruptCheckpointError(
            f"{message} They are left in place: move them away, or pass corrupt_ok=True "
            "to start over beside them.",
            path=self.directory,
        )

    # ------------------------------------------------------------------ internals

    def _restore_newest(
        self, obj: Any, restore_kwargs: dict[str, Any], *, last_round: bool
    ) -> int | object | None:
        """Restore the newest listed checkpoint that reads back whole: its step; None if
        none does; ``_LIST_AGAIN`` if one was deleted meanwhile (another process's
        retention, which also means newer checkpoints came) and this is not the last
        round."""
        component = restore_kwargs.get("component")
        for step in reversed(self.steps()):
            path = self._path(step)
            if component:  # RLlib's rule: a component restores from its own directory
                path = self._path(step, *component.split("/"))
            try:
                obj.restore_from_path(path, filesystem=self._filesystem, **restore_kwargs)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                if self._is_gone(step):  # not damage: it was deleted meanwhile
                    with self._lock:
                        self._entries.pop(step, None)
                    if last_round:
                        continue
                    return _LIST_AGAIN
                if not isinstance(exc, CorruptCheckpointError):
                    raise
                logger.warning("Not restoring %s: %s Trying the one before.", path, exc)
                self._mark_corrupt(step, str(exc))
                continue
            return step
        return None

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
        path = self._path(step)
        kwargs = dict(save_kwargs)
        kwargs.setdefault("filesystem", self._filesystem)
        try:
            with self._directory_lock.hold():
                with self._lock:
                    self._scan(cleanup=True)
                    self._check_step(step, overwrite=overwrite, own_reservation=reserved)
                    if not reserved:
                        self._reserve_step(step)
                        reserved = True
                record = {**record, "saved_at": time.time()}
                data = json.dumps(record, indent=1, sort_keys=True, default=_json_default)
                with extra_root_files({RECORD_FILE: data.encode()}):
                    saved = str(obj.save_to_path(path, **kwargs))
                with self._lock:
                    self._corrupt.pop(path, None)
                    self._scan(cleanup=True)  # others' checkpoints count; ours is listed
                    doomed = self._retire_for_retention(step)
                    listed = step in self._entries
                self._finish_deletions(doomed)
        finally:
            if reserved:
                self._release_step(step)
        if not listed:  # never expected: the directory lock keeps others' retention out
            raise CheckpointError(
                f"The checkpoint just saved at {path} does not list "
                f"({self.invalid_checkpoints().get(path, 'it is missing')}).",
                path=path,
            )
        return saved

    def _check_step(self, step: int, *, overwrite: bool, own_reservation: bool) -> None:
        """Refuse ``step`` unless it comes after every step in the directory and in
        flight in this manager (``self._lock`` held, the directory just read).

        ``own_reservation``: the second check, by a background save whose caller checked
        and reserved the step; this manager's own steps were checked then, so only other
        writers' count now.
        """
        if overwrite:
            return
        if own_reservation:
            taken = set(self._entries) - self._ours
        else:
            taken = set(self._entries) | set(self._reserved)
        newest = max(taken, default=None)
        path = self._path(step)
        if step in taken:
            where = path if step in self._entries else f"{path}, in flight"
            raise StepConflictError(
                f"Step {step} has a checkpoint already ({where}). Pass overwrite=True to "
                "replace it.",
                path=path,
                step=step,
                newest_step=newest,
            )
        if path in self._invalid:
            raise StepConflictError(
                f"{path} exists and is not a valid checkpoint ({self._invalid[path]}); "
                "it is left for you to inspect. Pass overwrite=True to replace it.",
                path=path,
                step=step,
                newest_step=newest,
            )
        if newest is not None and step < newest:
            raise StepConflictError(
                f"Step {step} is older than the newest checkpoint, step {newest} "
                f"({self._path(newest)}): its checkpoint would be out of order (and "
                "retention by age would delete it first). Pass overwrite=True to save it "
                "anyway.",
                path=path,
                step=step,
                newest_step=newest,
            )

    def _reserve_step(self, step: int) -> None:
        with self._lock:
            self._reserved[step] += 1
            self._ours.add(step)

    def _release_step(self, step: int) -> None:
        with self._lock:
            self._reserved[step] -= 1
            if self._reserved[step] <= 0:
                del self._reserved[step]

    def _record(self, step: int, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
        if metrics is not None and not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping or None, not {type(metrics).__name__}.")
        values = None if metrics is None else {str(k): v for k, v in metrics.items()}
        try:
            # Encoded now, so that a value JSON cannot hold fails in the caller.
            values = json.loads(json.dumps(values, default=_json_default))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"The metrics of step {step} cannot be saved as JSON: {exc}") from exc
        if (
            self.metric is not None
            and self.keep_best is not None
            and (values is None or self.metric not in values)
        ):
            logger.warning(
                "Step %d is saved without the metric %r: keep_best does not rank it.",
                step,
                self.metric,
            )
        return {
            "version": _RECORD_VERSION,
            "step": step,
            "metrics": values,
            "ckptable_version": package_version(),
        }

    def _note_failure(self, future: concurrent.futures.Future[str]) -> None:
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

    def _ranked(self) -> list[int]:
        """Steps with a usable metric, best first (ties: newest first)."""
        metric = self.metric
        with self._lock:
            scored = [
                (float(e.metrics[metric]), step)
                for step, e in self._entries.items()
                if metric is not None and e.metrics and _is_score(e.metrics.get(metric))
            ]
        sign = -1.0 if self.mode == "max" else 1.0
        return [step for _, step in sorted(scored, key=lambda s: (sign * s[0], -s[1]))]

    def _retire_for_retention(self, just_saved: int) -> list[str]:
        """Take the checkpoints that neither ``keep_last`` nor ``keep_best`` keeps out of
        the listing (``self._lock`` held, the directory just read); return what is left
        to remove.

        Only valid checkpoints count and only they go: invalid ones neither take a valid
        one's place nor are deleted. Always kept: the newest, the one just saved, and
        those of this manager's saves still in progress.
        """
        if self.keep_last is None and self.keep_best is None:
            return []
        steps = sorted(self._entries)
        if not steps:
            return []
        keep = {steps[-1], just_saved, *self._reserved}
        if self.keep_last is not None:
            keep.update(steps[-self.keep_last :])
        if self.keep_best is not None:
            keep.update(self._ranked()[: self.keep_best])
        doomed = [step for step in steps if step not in keep]
        retired = []
        for step in doomed:
            del self._entries[step]
            hidden = self._take_out_of_listing(step)
            if hidden is not None:
                retired.append(hidden)
        return retired

    def _take_out_of_listing(self, step: int) -> str | None:
        """First step of a deletion, in one step: a rename to a hidden name (local
        disks), or the deletion marker and then the manifest (object stores). Returns the
        tree left to remove (None: the checkpoint stays, with a warning)."""
        storage, directory = self._storage, self._storage.join(self._root, self._name(step))
        try:
            if not storage.can_rename_dirs:
                storage.write_bytes(storage.join(directory, _DELETING_MARKER), b"")
                storage.remove_tree(storage.join(directory, MANIFEST_FILE))
                return directory
            name = f".{self._name(step)}{_DELETING_INFIX}{uuid.uuid4().hex[:12]}"
            self._deleting.add(name)
            storage.rename(directory, storage.join(self._root, name))
            return storage.join(self._root, name)
        except OSError as exc:
            logger.warning("Could not delete the old checkpoint %s: %s", self._path(step), exc)
            return None

    def _finish_deletions(self, trees: list[str]) -> None:
        """Remove the trees that retention took out of the listing."""
        for tree in trees:
            try:
                self._storage.remove_tree(tree)
            except OSError as exc:
                logger.warning(
                    "Could not delete %s (%s); the next manager will.",
                    self._storage.display(tree),
                    exc,
                )
            finally:
                with self._lock:
                    self._deleting.discard(self._storage.split(tree)[1])

    def _remove_quietly(self, path: str) -> None:
        try:
            self._storage.remove_tree(path)
        except FileNotFoundError:
            pass  # another process finished it first
        except OSError as exc:
            logger.warning("Could not finish deleting %s: %s", self._storage.display(path), exc)

    def _mark_corrupt(self, step: int, reason: str) -> None:
        """Unlist a checkpoint that failed to restore, until its directory changes."""
        path = self._path(step)
        identity = self._storage.identity(self._storage.join(self._root, self._name(step)))
        with self._lock:
            self._entries.pop(step, None)
            self._invalid[path] = reason
            self._corrupt[path] = (identity, reason)

    def _is_gone(self, step: int) -> bool:
        """Whether ``checkpoint_<step>`` has no directory any more."""
        directory = self._storage.join(self._root, self._name(step))
        try:
            return self._storage.kind(directory) != "dir"
        except OSError:
            return False

    def _read_entry(self, step: int, identity: Any) -> _Entry:
        """The listed form of ``checkpoint_<step>``, if it is complete (see module doc)."""
        storage = self._storage
        directory = storage.join(self._root, self._name(step))
        entries = storage.listdir(directory)
        if _DELETING_MARKER in entries:
            raise _BeingDeleted
        if MANIFEST_FILE not in entries:
            raise CorruptCheckpointError(
                f"{storage.display(directory)} has no manifest: its save did not finish (or "
                "is still running elsewhere).",
                path=storage.display(directory),
            )
        manifest = read_manifest(storage, directory)
        check_listing(storage, directory, manifest, entries)
        if RECORD_FILE not in manifest.files:
            return _Entry(step, None, None, identity)  # saved into place by other means
        record_path = storage.join(directory, RECORD_FILE)
        raw = read_verified(
            storage, record_path, manifest.files[RECORD_FILE], manifest.algorithm, keep=True
        )
        record = json.loads(raw or b"")
        if not isinstance(record, dict) or record.get("step") != step:
            raise CorruptCheckpointError(
                f"{storage.display(record_path)} is not the record of step {step} "
                f"(it says {record.get('step') if isinstance(record, dict) else record!r}): "
                "the directory was renamed or copied from elsewhere.",
                path=storage.display(record_path),
            )
        metrics = record.get("metrics")
        saved_at = record.get("saved_at")
        return _Entry(
            step,
            metrics if isinstance(metrics, dict) else None,
            float(saved_at) if isinstance(saved_at, (int, float)) else None,
            identity,
        )

    def _name(self, step: int) -> str:
        return f"{CHECKPOINT_PREFIX}{step:0{_STEP_DIGITS}d}"

    def _path(self, step: int, *component: str) -> str:
        """A checkpoint's path as the user spells it: with their filesystem, a path in
        its terms (what ``save_to_path`` returns then); else a local path or a URI."""
        path = self._storage.join(self._root, self._name(step), *component)
        return path if self._paths_in_filesystem else self._storage.display(path)

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({self.directory!r}, keep_last={self.keep_last}, "
            f"keep_best={self.keep_best}, metric={self.metric!r}, mode={self.mode!r})"
        )


#: ``restore_latest`` lists the directory again this many times at most when checkpoints
#: are deleted under it (each time, another process saved newer ones meanwhile).
_RESTORE_ROUNDS = 3
#: What ``_restore_newest`` returns when a checkpoint was deleted while it tried it.
_LIST_AGAIN = object()


class _BeingDeleted(Exception):
    """A checkpoint directory holding the deletion marker."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_step(step: Any) -> int:
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be a non-negative int, not {step!r}.")
    return int(step)


def _is_score(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and not math.isnan(value))


def _json_default(value: Any) -> Any:
    """numpy scalars (and anything with ``.item()``) as plain numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(TypeError, ValueError):
            return item()
    raise TypeError(f"{type(value).__name__} is not JSON-encodable")
