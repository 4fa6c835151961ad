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
  deleted.
- **Retention runs after a save is published**, never before, and always keeps the
  newest valid checkpoint. A deletion first takes a checkpoint out of the listing in one
  step (a rename to a hidden name on local disks; on object stores, a marker file, then
  the manifest), so a crash mid-deletion never leaves a half-deleted checkpoint that
  looks valid; the next manager finishes the deletion.

Async saves (``CheckpointManager.save_async``) snapshot the state before they return
(``ckptable._snapshot``); at most ``max_in_flight`` run at once (a further call waits
for the oldest); a failure is raised by the future and again by the manager's next
``save``, ``save_async`` or ``wait``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from ckptable._async import start_background_save
from ckptable._commit import CREATING_MARKER, OLD_MARKER, STAGING_MARKER, recover_leftovers
from ckptable._manifest import MANIFEST_FILE, check_listing, read_manifest, read_verified
from ckptable._save import extra_root_files
from ckptable._snapshot import SnapshotPool
from ckptable._storage import LocalStorage, resolve_storage
from ckptable._version import package_version
from ckptable.errors import CheckpointError, CorruptCheckpointError

__all__ = ["CHECKPOINT_PREFIX", "RECORD_FILE", "CheckpointManager"]

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


class CheckpointManager:
    """Numbered checkpoints of one object in ``directory``, with retention.

    Args:
        directory: Where the checkpoints go (local path or URI); created if missing.
        keep_last: Keep the newest ``keep_last`` checkpoints (None: no limit by age).
        keep_best: Keep the best ``keep_best`` checkpoints by ``metrics[metric]``
            (None: none kept for their metric). With both None, nothing is deleted.
            The newest checkpoint is always kept, whatever its rank.
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
        self._lock = threading.RLock()
        self._entries: dict[int, _Entry] = {}
        self._invalid: dict[str, str] = {}
        self._in_flight: list[concurrent.futures.Future[str]] = []
        self._errors: list[BaseException] = []
        self._pool = SnapshotPool(max_idle=max_in_flight)
        self.reload()

    # ------------------------------------------------------------------ listing

    def reload(self) -> None:
        """Read the directory again (another process may have saved or deleted)."""
        entries: dict[int, _Entry] = {}
        invalid: dict[str, str] = {}
        listing = self._listing()
        leftovers = {_LEFTOVER_PATTERN.match(name) for name in listing} - {None}
        if leftovers:
            # Saves killed midway: a two-step publish is completed (or its old tree
            # moved back) before the listing, and abandoned staging trees go.
            for target in sorted({m.group(1) for m in leftovers if m is not None}):
                recover_leftovers(self._storage, self._storage.join(self._root, target))
            listing = self._listing()
        for name, kind in sorted(listing.items()):
            if name.startswith("." + CHECKPOINT_PREFIX) and ".ckptable-deleting-" in name:
                self._remove_quietly(self._storage.join(self._root, name))
                continue
            match = _NAME_PATTERN.fullmatch(name)
            if match is None or kind != "dir":
                continue
            step = int(match.group(1))
            if name != self._name(step):
                continue  # not a name this manager writes (checkpoint_5 for step 5)
            try:
                entry = self._read_entry(step)
            except _BeingDeleted:
                self._remove_quietly(self._storage.join(self._root, name))
                continue
            except (CheckpointError, OSError, ValueError) as exc:
                invalid[self._path(step)] = str(exc)
                continue
            entries[step] = entry
        with self._lock:
            newly_invalid = set(invalid) - set(self._invalid)
            self._entries, self._invalid = entries, invalid
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
        (incomplete: a save still running, or interrupted; or damaged)."""
        with self._lock:
            return dict(self._invalid)

    # ------------------------------------------------------------------ saving

    def save(
        self, obj: Any, step: int, metrics: Mapping[str, Any] | None = None, **save_kwargs: Any
    ) -> str:
        """Save ``obj`` as ``step`` (replacing a checkpoint of the same step), then apply
        retention. Waits for the async saves in flight first.

        Args:
            obj: The ``Checkpointable`` to save.
            step: A non-negative int: the training step, epoch, iteration...
            metrics: JSON-encodable values saved with the checkpoint (numbers, strings);
                ``metrics[metric]`` ranks it for ``keep_best`` and ``best``.
            **save_kwargs: Passed on to ``obj.save_to_path`` (``format``, ``durable``, ...).

        Returns:
            The checkpoint's path.

        Raises:
            Exception: the error of an earlier async save that failed (raised once),
                before this save starts; else whatever ``save_to_path`` raises.
        """
        record = self._record(_checked_step(step), metrics)
        self.wait()
        return self._save_now(obj, record, save_kwargs)

    def save_async(
        self, obj: Any, step: int, metrics: Mapping[str, Any] | None = None, **save_kwargs: Any
    ) -> concurrent.futures.Future[str]:
        """Like ``save``, in a background thread; returns once the state is copied.

        Changes made to ``obj`` after this returns never reach the checkpoint. If
        ``max_in_flight`` saves are running, waits for the oldest first.

        Returns:
            A future whose ``result()`` is the checkpoint's path.

        Raises:
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
        future = start_background_save(
            obj,
            self._path(record["step"]),
            save_kwargs,
            pool=self._pool,
            save=lambda obj, _path, kwargs: self._save_now(obj, record, kwargs),
            name=f"ckptable-save-step-{record['step']}",
        )
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

    def restore_latest(self, obj: Any, **restore_kwargs: Any) -> int | None:
        """Restore ``obj`` from the newest checkpoint that reads back whole.

        A checkpoint found damaged while restoring (``CorruptCheckpointError``, which
        leaves ``obj`` untouched) is reported in ``invalid_checkpoints`` and a
        warning, and the next older one is tried.

        Args:
            obj: The ``Checkpointable`` to restore.
            **restore_kwargs: Passed on to ``obj.restore_from_path`` (``safe``,
                ``mmap``, ...). With ``component="a/b"``, only that component is restored,
                from its directory in the checkpoint.

        Returns:
            The step restored, or None if there is no valid checkpoint.
        """
        self.wait()
        component = restore_kwargs.get("component")
        for step in reversed(self.steps()):
            path = self._path(step)
            if component:  # RLlib's rule: a component restores from its own directory
                path = self._path(step, *component.split("/"))
            try:
                obj.restore_from_path(path, filesystem=self._filesystem, **restore_kwargs)
            except CorruptCheckpointError as exc:
                logger.warning("Not restoring %s: %s Trying the one before.", path, exc)
                with self._lock:
                    self._entries.pop(step, None)
                    self._invalid[path] = str(exc)
                continue
            return step
        return None

    # ------------------------------------------------------------------ internals

    def _save_now(self, obj: Any, record: dict[str, Any], save_kwargs: dict[str, Any]) -> str:
        step = record["step"]
        kwargs = dict(save_kwargs)
        kwargs.setdefault("filesystem", self._filesystem)
        record = {**record, "saved_at": time.time()}
        data = json.dumps(record, indent=1, sort_keys=True, default=_json_default).encode()
        with extra_root_files({RECORD_FILE: data}):
            path = str(obj.save_to_path(self._path(step), **kwargs))
        with self._lock:
            self._entries[step] = _Entry(step, record["metrics"], record["saved_at"])
            self._invalid.pop(self._path(step), None)
        self._apply_retention()
        return path

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

    def _apply_retention(self) -> None:
        """Delete the checkpoints that neither ``keep_last`` nor ``keep_best`` keeps
        (never the newest one)."""
        if self.keep_last is None and self.keep_best is None:
            return
        with self._lock:
            steps = sorted(self._entries)
            if not steps:
                return
            keep = {steps[-1]}
            if self.keep_last is not None:
                keep.update(steps[-self.keep_last :])
            if self.keep_best is not None:
                keep.update(self._ranked()[: self.keep_best])
            doomed = [step for step in steps if step not in keep]
            for step in doomed:
                self._entries.pop(step)
        for step in doomed:
            self._delete(step)

    def _delete(self, step: int) -> None:
        """Take the checkpoint out of the listing in one step, then remove it."""
        storage, directory = self._storage, self._storage.join(self._root, self._name(step))
        try:
            if storage.can_rename_dirs:
                hidden = storage.join(
                    self._root, f".{self._name(step)}.ckptable-deleting-{uuid.uuid4().hex[:12]}"
                )
                storage.rename(directory, hidden)
                directory = hidden
            else:
                storage.write_bytes(storage.join(directory, _DELETING_MARKER), b"")
                storage.remove_tree(storage.join(directory, MANIFEST_FILE))
            storage.remove_tree(directory)
        except OSError as exc:
            logger.warning("Could not delete the old checkpoint %s: %s", self._path(step), exc)

    def _remove_quietly(self, path: str) -> None:
        try:
            self._storage.remove_tree(path)
        except OSError as exc:
            logger.warning("Could not finish deleting %s: %s", self._storage.display(path), exc)

    def _read_entry(self, step: int) -> _Entry:
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
            return _Entry(step, None, None)  # saved into place by other means
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
