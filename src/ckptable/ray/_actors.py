"""Save and restore of components held by Ray actors: the pipeline of ``ckptable.ray``.

A component that is an actor manager (RLlib's ``FaultTolerantActorManager``,
:class:`~ckptable.ray.RayActorManager`, anything with ``healthy_actor_ids`` and
``foreach_actor``) has no state in the saving process: its actors hold it.

**Save** (:func:`save_actor_component`): the first healthy actor saves its state on its
own node, then the directory joins the saver's staging tree:

- checkpoint on shared storage (``s3://`` …): the actor writes into the staging tree
  directly, nothing is moved;
- actor on the saver's node: it writes into a private directory inside the staging tree,
  which is renamed into place;
- actor on another node: it writes into a temporary directory there, which the transfer
  hook moves into the staging tree and which is removed afterwards, whatever happened.

The moved tree is verified against the manifest the actor reports before the saver's
manifest pins it: against the transfer's receipt (the checksums its writer took of the
bytes it wrote; the built-in hooks return one), else by reading every file once more
(from the page cache). An actor that dies or fails on the way
is left for the next healthy one; none left raises :class:`ActorCheckpointError` with
each actor's reason.

**Restore** (:func:`restore_actor_component`): the component's directory (verified by the
restore's read step before anything is touched) is moved once to every node that holds a
healthy actor but cannot read it, then every healthy actor restores itself in one
parallel call. Any actor that fails raises :class:`ActorCheckpointError` listing them
all (after the others were restored), unless ``on_actor_failure="mark_unhealthy"``.

Nodes are told apart by Ray node id, never by IP (nodes on one machine share an IP).

Progress: the actors show no bars of their own; the transfers count in the bar of the
save or restore that runs them, and an actor component's tree counts once in a save's,
however it arrived.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import ray

from ckptable import _progress
from ckptable._components import runs_ckptable_method
from ckptable._manifest import (
    MANIFEST_FILE,
    LevelManifest,
    check_listing,
    checksum_of,
    read_verified,
)
from ckptable._storage import LocalStorage, Storage, resolve_storage
from ckptable._storage_concurrent import barrier
from ckptable.errors import (
    ActorCheckpointError,
    CheckpointError,
    TransferError,
    UnsafeCheckpointError,
)
from ckptable.ray._manager import call_error, mark_unhealthy
from ckptable.ray._nodes import current_node_id, pinned_to
from ckptable.ray._transfer import TransferReceipt, check_transfer_hook, get_default_transfer

if TYPE_CHECKING:
    from ckptable._commit import StagingSession

__all__ = ["restore_actor_component", "save_actor_component"]

logger = logging.getLogger("ckptable")

#: Seconds to wait for the removal of a temporary directory on another node.
_CLEANUP_TIMEOUT_S = 60.0
#: Name of the directory an actor saves into inside a temporary or private directory.
_SAVED = "checkpoint"


# --------------------------------------------------------------------------- calls


class _ActorFailed(Exception):
    """One actor's part failed (the actor died, its call raised, or a transfer broke)."""

    def __init__(self, actor_id: Any, reason: str) -> None:
        super().__init__(reason)
        self.actor_id = actor_id
        self.reason = reason


def _describe(error: BaseException) -> str:
    """One line for an actor's failure: the user's exception rather than Ray's wrapper."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        error = cause
    if isinstance(error, ray.exceptions.RayActorError):
        return f"the actor died ({type(error).__name__})"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _call(manager: Any, actor_ids: list[Any], func: Callable[..., Any]) -> dict[Any, Any]:
    """``func(actor)`` on each of ``actor_ids`` through the manager: id → result, or id →
    ``_ActorFailed`` for an actor whose call failed or that the manager skipped."""
    if not actor_ids:
        return {}  # RLlib's manager reads an empty list as "all actors"
    outcome: dict[Any, Any] = {}
    for result in manager.foreach_actor(func, remote_actor_ids=actor_ids):
        error = call_error(result)  # RLlib's get() returns the error, ckptable's raises it
        if error is None:
            outcome[result.actor_id] = result.get()
        else:
            outcome[result.actor_id] = _ActorFailed(result.actor_id, _describe(error))
    for actor_id in actor_ids:
        if actor_id not in outcome:
            outcome[actor_id] = _ActorFailed(actor_id, "the manager no longer counts it healthy")
    return outcome


def _call_one(manager: Any, actor_id: Any, func: Callable[..., Any]) -> Any:
    result = _call(manager, [actor_id], func)[actor_id]
    if isinstance(result, _ActorFailed):
        raise result
    return result


# --------------------------------------------------------------------------- in the actor


def _node_of_actor(actor: Any) -> str:
    return current_node_id()


def _save_in_actor(
    actor: Any,
    path: str,
    filesystem: Any,
    state_ref: Any,
    format_name: str,
) -> bytes | None:
    """Runs in the actor: save its state (or the given one) to ``path``; return the
    manifest ckptable wrote there (None for a class RLlib's save wrote, without one)."""
    state = ray.get(state_ref) if state_ref is not None else None
    # By the method the actor really has: Ray copies the driver's methods onto actor
    # classes, so the class's bases may say otherwise.
    if runs_ckptable_method(actor, "save_to_path"):
        # Not durable here: the saver flushes the whole staged tree before publishing.
        # No bar in the actor (it runs as inside an operation): the saver's has its bytes.
        with _progress.uncounted():
            actor.save_to_path(
                path, filesystem=filesystem, state=state, format=format_name, durable=False
            )
    elif format_name in ("cloudpickle", "msgpack"):
        actor.save_to_path(
            path, filesystem=filesystem, state=state, use_msgpack=format_name == "msgpack"
        )
    else:
        raise CheckpointError(
            f"The actor ({type(actor).__name__}) is not a ckptable Checkpointable and "
            f"cannot save in the {format_name!r} format.",
            path=path,
        )
    storage, root = resolve_storage(path, filesystem)
    manifest = storage.join(root, MANIFEST_FILE)
    return storage.read_bytes(manifest) if storage.kind(manifest) == "file" else None


def _restore_in_actor(
    actor: Any,
    paths: dict[str, str],
    filesystem: Any,
    component: str | None,
    options: dict[str, Any],
    kwargs: dict[str, Any],
) -> None:
    """Runs in the actor: restore from the copy on its node (``paths``: node id → path,
    ``"*"`` for shared storage that every node reads)."""
    path = paths.get(current_node_id(), paths.get("*"))
    if path is None:  # restarted on another node since it was asked where it runs
        raise ActorCheckpointError("The checkpoint was not moved to the actor's node.")
    if runs_ckptable_method(actor, "restore_from_path"):
        with _progress.uncounted():  # no bar in the actor: the restorer's has its bytes
            actor.restore_from_path(
                path, component=component, filesystem=filesystem, **options, **kwargs
            )
        return
    if options.get("safe"):
        raise UnsafeCheckpointError(
            f"The actor ({type(actor).__module__}.{type(actor).__qualname__}) is not a "
            "ckptable Checkpointable: it restores itself with its own code, which "
            "safe=True cannot restrict.",
            path=path,
        )
    actor.restore_from_path(path, component=component, filesystem=filesystem, **kwargs)


# --------------------------------------------------------------------------- on a node


@ray.remote(num_cpus=0)
def _make_temp_dir() -> str:
    return tempfile.mkdtemp(prefix="ckptable-actor-")


@ray.remote(num_cpus=0)
def _remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _temp_dir_on(node_id: str) -> str:
    return str(ray.get(_make_temp_dir.options(scheduling_strategy=pinned_to(node_id)).remote()))


def _remove_on(node_id: str, path: str) -> None:
    """Remove ``path`` on ``node_id``; a node that is gone took it along (logged)."""
    try:
        ray.get(
            _remove_dir.options(scheduling_strategy=pinned_to(node_id)).remote(path),
            timeout=_CLEANUP_TIMEOUT_S,
        )
    except Exception as exc:
        logger.warning("Could not remove %s on node %s: %s", path, node_id, exc)


def _resolve_transfer(transfer: Any) -> Any:
    return get_default_transfer() if transfer is None else check_transfer_hook(transfer)


# --------------------------------------------------------------------------- save


def save_actor_component(
    session: StagingSession,
    manager: Any,
    directory: str,
    state: Any,
) -> None:
    """Save the actor component ``manager`` into ``directory`` of the staging tree.

    ``state``: the component's entry of the parent's state, if it has one (the actor
    then saves that, as RLlib does with a given state); else the actor's own state.
    """
    where = session.describe(directory)
    actor_ids = list(manager.healthy_actor_ids())
    if not actor_ids:
        raise ActorCheckpointError(
            f"Cannot save {where}: its actor manager ({type(manager).__name__}) has no "
            "healthy actor.",
            path=session.target,
            component=session.component_path(directory),
        )
    transfer = _resolve_transfer(session.transfer)
    state_ref = ray.put(state) if state is not None else None
    failures: list[_ActorFailed] = []
    counted = _progress.mark()
    for actor_id in actor_ids:
        try:
            reported, moved, receipt = _save_through_actor(
                session, manager, actor_id, directory, state_ref, transfer
            )
            with _progress.uncounted():  # verifying a moved tree reads it once more
                _adopt(session, directory, reported, verify=moved, receipt=receipt)
            # The tree counts once, whether a transfer counted it as it arrived, or not.
            if _progress.current() is not None:
                _progress.rewind(counted + _bytes_under(session, directory))
            return
        except _ActorFailed as failure:
            failures.append(failure)
        except (CheckpointError, OSError) as exc:  # the moved tree did not check out
            failures.append(_ActorFailed(actor_id, _describe(exc)))
        with contextlib.suppress(OSError):
            session.storage.remove_tree(directory)
        _forget_files_under(session, directory)
        logger.warning(
            "Saving %s: actor %s failed (%s); trying the next healthy actor.",
            where,
            actor_id,
            failures[-1].reason,
        )
    raise ActorCheckpointError(
        f"Cannot save {where}: every healthy actor failed: {_list(failures)}.",
        path=session.target,
        component=session.component_path(directory),
    )


def _save_through_actor(
    session: StagingSession,
    manager: Any,
    actor_id: Any,
    directory: str,
    state_ref: Any,
    transfer: Any,
) -> tuple[bytes | None, bool, TransferReceipt | None]:
    """Have ``actor_id`` save into ``directory``: (the manifest it reports, whether the
    tree was moved between nodes and so must be verified, the transfer's receipt)."""
    storage = session.storage

    def save_at(path: str, filesystem: Any) -> Any:
        save = functools.partial(
            _save_in_actor,
            path=path,
            filesystem=filesystem,
            state_ref=state_ref,
            format_name=session.codec.name,
        )
        return _call_one(manager, actor_id, save)

    if not isinstance(storage, LocalStorage):  # shared storage: written in place
        return save_at(directory, storage.user_filesystem()), False, None

    actor_node = _call_one(manager, actor_id, _node_of_actor)
    here = current_node_id()
    if actor_node == here:
        parent, _ = storage.split(directory)
        private = storage.join(parent, f".ckptable-actor-{uuid.uuid4().hex}")
        storage.mkdir(private)
        barrier(storage)  # the actor writes into it: it must exist now, not queued
        try:
            reported = save_at(storage.join(private, _SAVED), None)
            storage.rename(storage.join(private, _SAVED), directory)
        finally:
            with contextlib.suppress(OSError):
                storage.remove_tree(private)
        return reported, False, None

    try:
        temp = _temp_dir_on(actor_node)
    except Exception as exc:
        raise _ActorFailed(actor_id, f"no temporary directory on its node: {exc}") from exc
    try:
        reported = save_at(f"{temp}/{_SAVED}", None)
        try:
            receipt = transfer.transfer(actor_node, f"{temp}/{_SAVED}", here, directory)
        except Exception as exc:
            raise _ActorFailed(actor_id, f"moving its directory failed: {_describe(exc)}") from exc
    finally:
        _remove_on(actor_node, temp)
    return reported, True, receipt if isinstance(receipt, TransferReceipt) else None


def _adopt(
    session: StagingSession,
    directory: str,
    reported: bytes | None,
    *,
    verify: bool,
    receipt: TransferReceipt | None = None,
) -> None:
    """Make the actor-written tree at ``directory`` part of the staged checkpoint.

    A tree ckptable wrote carries its manifests: they are checked against the one the
    actor reported (and, if the tree was moved, every file is checked: against the
    transfer's receipt, whose checksums its writer took from the bytes it wrote, or else
    by reading it) and recorded, so that the parent's manifest pins them and the files
    are flushed with the rest. A tree written by other code (RLlib's save) is
    checksummed as found.
    """
    storage = session.storage
    algorithm = session.algorithm
    received = receipt.files if receipt is not None and receipt.algorithm == algorithm else {}
    if reported is None or LevelManifest.from_bytes(reported, directory).algorithm != algorithm:
        session.seal(directory, rebuild=True)
        return

    def walk(level: str, data: bytes) -> None:
        manifest = LevelManifest.from_bytes(data, storage.display(level))
        entries = storage.listdir(level)
        check_listing(storage, level, manifest, entries)
        for file_name, entry in manifest.files.items():
            path = storage.join(level, file_name)
            if verify and received.get(_relative(path, directory)) != tuple(entry):
                read_verified(storage, path, entry, algorithm, keep=False)
            session.staging.files[path] = entry
            if file_name in manifest.skeletons:
                session.staging.skeletons[path] = manifest.skeletons[file_name]
        session.staging.trees[level] = manifest.tree_bytes
        for dir_name, digest in manifest.dirs.items():
            sub = storage.join(level, dir_name)
            sub_data = storage.read_bytes(storage.join(sub, MANIFEST_FILE))
            if checksum_of(algorithm, sub_data) != digest:
                raise TransferError(
                    f"{storage.display(sub)} differs from what the actor saved.",
                    path=session.target,
                )
            walk(sub, sub_data)
        manifest_path = storage.join(level, MANIFEST_FILE)
        session.staging.files[manifest_path] = (len(data), checksum_of(algorithm, data))

    on_disk = storage.read_bytes(storage.join(directory, MANIFEST_FILE))
    if on_disk != reported:
        raise TransferError(
            f"The manifest of {session.describe(directory)} differs from the one the actor saved.",
            path=session.target,
            component=session.component_path(directory),
        )
    walk(directory, reported)


def _relative(path: str, directory: str) -> str:
    """``path`` relative to ``directory`` (a local path inside it), ``/``-separated, as
    a transfer receipt names it."""
    return os.path.relpath(path, directory).replace(os.sep, "/")


def _forget_files_under(session: StagingSession, directory: str) -> None:
    prefix = session.storage.join(directory, "")
    for table in (session.staging.files, session.staging.skeletons, session.staging.trees):
        for path in [p for p in table if p.startswith(prefix) or p == directory]:
            del table[path]


def _bytes_under(session: StagingSession, directory: str) -> int:
    """Bytes of the files staged under ``directory`` (manifests not counted, as in a
    manifest's ``tree_bytes``)."""
    prefix = session.storage.join(directory, "")
    return sum(
        size
        for path, (size, _) in session.staging.files.items()
        if path.startswith(prefix) and session.storage.split(path)[1] != MANIFEST_FILE
    )


# --------------------------------------------------------------------------- restore


def restore_actor_component(
    manager: Any,
    storage: Storage,
    directory: str,
    *,
    component: str | None,
    where: str,
    options: dict[str, Any],
    kwargs: dict[str, Any],
    transfer: Any,
    on_actor_failure: str,
) -> None:
    """Restore every healthy actor of ``manager`` from the (verified) level ``directory``.

    ``where``: the component, for messages. ``options``: ckptable's restore options to
    pass to ckptable actors (the non-default ones); ``kwargs``: the caller's other
    keyword arguments, passed to every actor as RLlib does.
    """
    shown = storage.display(directory)
    actor_ids = list(manager.healthy_actor_ids())
    if not actor_ids:
        message = (
            f"Cannot restore {where}: its actor manager ({type(manager).__name__}) has no "
            "healthy actor."
        )
        if on_actor_failure == "mark_unhealthy":
            logger.warning("%s Nothing was restored.", message)
            return
        raise ActorCheckpointError(message, path=shown, component=where)

    failures: list[_ActorFailed] = []
    temps: dict[str, str] = {}
    try:
        if isinstance(storage, LocalStorage):
            paths, targets = _copies_for_actors(
                manager, actor_ids, directory, _resolve_transfer(transfer), temps, failures
            )
            filesystem = None
        else:
            paths, targets = {"*": directory}, actor_ids
            filesystem = storage.user_filesystem()
        if targets:
            restore = functools.partial(
                _restore_in_actor,
                paths=paths,
                filesystem=filesystem,
                component=component,
                options=options,
                kwargs=kwargs,
            )
            for outcome in _call(manager, targets, restore).values():
                if isinstance(outcome, _ActorFailed):
                    failures.append(outcome)
    finally:
        for node_id, temp in temps.items():
            _remove_on(node_id, temp)
    if not failures:
        return
    failures.sort(key=lambda failure: str(failure.actor_id))
    message = (
        f"Restoring {where} failed on {len(failures)} of {len(actor_ids)} healthy "
        f"actors: {_list(failures)}."
    )
    if on_actor_failure == "mark_unhealthy":
        for failure in failures:
            mark_unhealthy(manager, failure.actor_id)
        logger.warning("%s They were marked unhealthy.", message)
        return
    raise ActorCheckpointError(message, path=shown, component=where)


def _copies_for_actors(
    manager: Any,
    actor_ids: list[Any],
    directory: str,
    transfer: Any,
    temps: dict[str, str],
    failures: list[_ActorFailed],
) -> tuple[dict[str, str], list[Any]]:
    """Move ``directory`` once to each node with actors but not this one: (node id →
    path there; the actors that have a copy to restore from).
    Temporary directories made go into ``temps``; actors left without a copy into
    ``failures``."""
    here = current_node_id()
    paths: dict[str, str] = {here: directory}
    nodes = _call(manager, actor_ids, _node_of_actor)
    by_node: dict[str, list[Any]] = {}
    for actor_id, node in nodes.items():
        if isinstance(node, _ActorFailed):
            failures.append(node)
        else:
            by_node.setdefault(node, []).append(actor_id)
    targets: list[Any] = []
    for node, ids in by_node.items():
        if node != here:
            try:
                temps[node] = _temp_dir_on(node)
                paths[node] = f"{temps[node]}/{_SAVED}"
                transfer.transfer(here, directory, node, paths[node])
            except Exception as exc:
                reason = f"moving the checkpoint to its node failed: {_describe(exc)}"
                failures.extend(_ActorFailed(actor_id, reason) for actor_id in ids)
                continue
        targets.extend(ids)
    return paths, targets


def _list(failures: Iterable[_ActorFailed]) -> str:
    return "; ".join(f"actor {failure.actor_id}: {failure.reason}" for failure in failures)
