"""Step 2 of a save, one level: the files of one checkpoint level, and through the
components' own ``save_to_path`` every level below it.

Per level the files are those of RLlib's layout: ``metadata.json`` (with ckptable's own
record under the ``"ckptable"`` key), ``class_and_ctor_args.pkl``, ``state.pkl`` or
``state.msgpack``, and one subdirectory per component; then the level's manifest
(``_SaveSession.seal``). :mod:`ckptable._save` runs the whole save around this step.
"""

from __future__ import annotations

import json
import pickle
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import cloudpickle

from ckptable._components import (
    is_actor_manager,
    uses_ckptable_method,
    validate_component_name,
)
from ckptable._formats import explain_unencodable
from ckptable._layout import (
    CHECKPOINT_VERSION,
    DEFAULT_METADATA_FILE,
    LAYOUT_VERSION,
    RECORD_KEY,
    checkpoint_file_names,
    is_state_version,
)
from ckptable._save_warnings import _warn_if_main_module_class
from ckptable._storage import EntryKind, LocalStorage, Storage
from ckptable._storage_concurrent import barrier
from ckptable._version import package_version
from ckptable.errors import CheckpointError, StateEncodingError

if TYPE_CHECKING:
    from ckptable._checkpointable import Checkpointable
    from ckptable._save import _SaveSession

__all__ = ["collect_level_state"]

_PYTHON_VERSION = platform.python_version()


def _write_level(
    session: _SaveSession, obj: Checkpointable, directory: str, state: dict[str, Any] | None
) -> None:
    """Write one level (and, through the components' own ``save_to_path``, all below)."""
    storage = session.storage
    if directory != session.staging_root:
        storage.mkdir(directory)

    components = list(obj.get_checkpointable_components())
    if components:
        _check_components(session, obj, directory, components)

    state_provided = state is not None
    level_state = collect_level_state(
        obj,
        state,
        components,
        where=session.describe(directory),
        path=session.target,
        component=session.component_path(directory),
    )

    saved: list[str] = []
    actor_saved: list[str] = []  # recorded for `ckptable info`
    metadata_files: dict[str, str] = {}
    for name, comp in components:
        if state_provided and name not in level_state:
            continue  # RLlib: a given state without this component's key skips it
        metadata_file = getattr(comp, "METADATA_FILE_NAME", DEFAULT_METADATA_FILE)
        if metadata_file != DEFAULT_METADATA_FILE:
            metadata_files[name] = metadata_file
        comp_dir = storage.join(directory, name)
        own_code = is_actor_manager(comp) or not uses_ckptable_method(comp, "save_to_path")
        if own_code:
            # Code other than this pipeline's writes next, with the filesystem itself:
            # what was written so far (its directory, say) must be there first.
            barrier(storage)
        if is_actor_manager(comp):
            from ckptable.ray._actors import save_actor_component

            save_actor_component(session, comp, comp_dir, level_state.pop(name, None))
            saved.append(name)
            actor_saved.append(name)
            continue
        if not own_code:
            session.expect_call(comp)
        comp.save_to_path(
            comp_dir,
            filesystem=_filesystem_for(storage, comp),
            state=level_state.pop(name, None),
            use_msgpack=session.codec.name == "msgpack",
        )
        if own_code:
            # Its own code wrote (some of) the level: checksum what is there now.
            session.seal(comp_dir, rebuild=True)
        saved.append(name)

    _write_metadata(session, obj, directory, saved, metadata_files, actor_saved)
    _write_class_and_ctor_args(session, obj, directory)
    state_name = obj.STATE_FILE_NAME + session.codec.suffix
    state_file = storage.join(directory, state_name)
    try:
        pickled = getattr(session.codec, "accepts_buffers", False)
        with session.open_write(state_file, pickled=pickled) as stream:
            session.codec.dump(level_state, stream)  # type: ignore[arg-type]
    except (
        TypeError,
        ValueError,
        AttributeError,
        RecursionError,
        OverflowError,
        pickle.PicklingError,
    ) as exc:
        what, instead = explain_unencodable(session.codec, level_state)
        advice = (
            f" Save with the default format (cloudpickle), or have "
            f"{type(obj).__name__}.get_state {instead}."
            if instead
            else ""
        )
        raise StateEncodingError(
            f"Cannot encode the state of {type(obj).__name__} ({session.describe(directory)}) "
            f"with {session.codec.name}: {what} ({type(exc).__name__}: {exc}).{advice} "
            "Nothing was published.",
            path=session.target,
            component=session.component_path(directory),
        ) from exc
    # This level holds what was just written and nothing else: no listing needed.
    entries: dict[str, EntryKind] = dict.fromkeys(
        (obj.METADATA_FILE_NAME, obj.CLASS_AND_CTOR_ARGS_FILE_NAME, state_name), "file"
    )
    entries.update(dict.fromkeys(saved, "dir"))
    session.seal(directory, entries=entries)


def collect_level_state(
    obj: Any,
    state: Mapping[str, Any] | None,
    components: list[tuple[str, Any]],
    *,
    where: str,
    path: str | None = None,
    component: str | None = None,
) -> dict[str, Any]:
    """The state one level saves: ``state`` if given, else ``obj.get_state()``.

    RLlib's ``state or self.get_state(not_components=...)``: an empty given state asks
    the object for its own state, without its components. Shared with async saves'
    snapshots (``_snapshot.collect_tree_state``), which must gather what a save would.
    """
    provided = state is not None
    if provided and not state:
        state = obj.get_state(not_components=[name for name, _ in components])
    collected = state if provided else obj.get_state()
    if not isinstance(collected, Mapping):
        source = "the state= argument" if provided else f"{type(obj).__name__}.get_state()"
        raise CheckpointError(
            f"{source} ({where}) is a {type(collected).__name__}, not a dict.",
            path=path,
            component=component,
        )
    return dict(collected)


def _check_components(
    session: _SaveSession, obj: Checkpointable, directory: str, components: list[Any]
) -> None:
    """Names must be unique plain directory names; components must be Checkpointable."""
    where = session.describe(directory)
    parent = session.component_path(directory)
    own_files = checkpoint_file_names(obj)
    seen: set[str] = set()
    for name, comp in components:
        validate_component_name(name, path=session.target, where=where, reserved=own_files)
        if name in seen:
            raise CheckpointError(
                f"{type(obj).__name__} ({where}) lists component {name!r} twice.",
                path=session.target,
                component=_join(parent, name),
            )
        seen.add(name)
        if not callable(getattr(comp, "save_to_path", None)) and not is_actor_manager(comp):
            raise CheckpointError(
                f"Component {name!r} of {type(obj).__name__} ({where}) is a "
                f"{type(comp).__name__}, which has no save_to_path(); components must "
                "be Checkpointable (or managers of Ray actors: see ckptable.ray).",
                path=session.target,
                component=_join(parent, name),
            )


def _filesystem_for(storage: Storage, comp: Any) -> Any:
    """``filesystem=`` for ``comp.save_to_path``: ckptable's own method needs none for
    local paths (and so skips importing pyarrow); other code gets a pyarrow filesystem."""
    if isinstance(storage, LocalStorage) and uses_ckptable_method(comp, "save_to_path"):
        return None
    return storage.user_filesystem()


def _join(parent: str | None, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _write_metadata(
    session: _SaveSession,
    obj: Checkpointable,
    directory: str,
    saved: list[str],
    metadata_files: dict[str, str],
    actor_components: list[str],
) -> None:
    metadata = obj.get_metadata()
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{type(obj).__name__}.get_metadata() ({session.describe(directory)}) returned "
            f"{type(metadata).__name__}, not a dict.",
            path=session.target,
            component=session.component_path(directory),
        )
    metadata = dict(metadata)
    metadata.setdefault("checkpoint_version", CHECKPOINT_VERSION)
    try:
        payload = _metadata_json(
            session, obj, directory, metadata, saved, metadata_files, actor_components
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"The metadata of {type(obj).__name__} ({session.describe(directory)}) is not "
            f"JSON-serializable: {exc}",
            path=session.target,
            component=session.component_path(directory),
        ) from exc
    session.write_bytes(session.storage.join(directory, obj.METADATA_FILE_NAME), payload)


def _metadata_json(
    session: _SaveSession,
    obj: Checkpointable,
    directory: str,
    metadata: dict[str, Any],
    saved: list[str],
    metadata_files: dict[str, str],
    actor_components: list[str],
) -> bytes:
    """``json.dumps(metadata)`` with ckptable's record added under ``RECORD_KEY``, last.

    The record is the same for every level of a class with the same components: its
    JSON text is kept per save (``session.record_json``) and joined to the text of the
    object's own metadata (a wide tree's levels differ in that only, if at all).
    """
    cls = type(obj)
    key = (
        cls,
        obj.STATE_FILE_NAME,
        tuple(saved),
        tuple(actor_components),
        tuple(metadata_files.items()),
        getattr(cls, "STATE_VERSION", 1),
    )
    try:
        record = session.record_json.get(key)
    except TypeError:  # an unhashable STATE_VERSION: refused just below
        record = None
    if record is None:
        record = json.dumps(
            {
                "layout_version": LAYOUT_VERSION,
                "format": session.codec.name,
                "state_file": obj.STATE_FILE_NAME + session.codec.suffix,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "components": saved,
                # Components held by Ray actors (informational: `ckptable info` marks them).
                "actor_components": actor_components,
                "state_version": _declared_state_version(obj, session, directory),
                # Components that rename their metadata file (as RLlib's Algorithm does):
                # the restore reads their levels before their objects exist (created in
                # set_state).
                "component_metadata_files": metadata_files,
                "ckptable_version": package_version(),
                "python_version": _PYTHON_VERSION,
                "cloudpickle_version": cloudpickle.__version__,
            }
        )
        session.record_json[key] = record
    metadata.pop(RECORD_KEY, None)  # the object's own key of that name: replaced
    own = json.dumps(metadata)  # never empty: it has "checkpoint_version"
    text = f'{own[:-1]}, "{RECORD_KEY}": {record}}}'
    return text.encode("utf-8")


def _write_class_and_ctor_args(session: _SaveSession, obj: Checkpointable, directory: str) -> None:
    _warn_if_main_module_class(session, obj, directory)
    cls = type(obj)
    arguments = obj.get_ctor_args_and_kwargs()
    plain = _no_arguments(arguments)
    payload = session.class_records.get(cls) if plain else None
    if payload is None:
        payload = _pickle_class_record(session, obj, directory, arguments)
        if plain:
            session.class_records[cls] = payload
    session.write_bytes(session.storage.join(directory, obj.CLASS_AND_CTOR_ARGS_FILE_NAME), payload)


def _no_arguments(arguments: Any) -> bool:
    """Whether ``arguments`` is exactly ``((), {})`` (whose record pickles the same for
    every object of a class)."""
    return (
        type(arguments) is tuple
        and len(arguments) == 2
        and type(arguments[0]) is tuple
        and not arguments[0]
        and type(arguments[1]) is dict
        and not arguments[1]
    )


def _pickle_class_record(
    session: _SaveSession, obj: Checkpointable, directory: str, arguments: Any
) -> bytes:
    record = {"class": type(obj), "ctor_args_and_kwargs": arguments}
    try:
        return bytes(cloudpickle.dumps(record))
    except Exception as exc:  # cloudpickle raises many types for unpicklable objects
        raise StateEncodingError(
            f"Cannot pickle the class and constructor arguments of {type(obj).__name__} "
            f"({session.describe(directory)}): {exc}",
            path=session.target,
            component=session.component_path(directory),
        ) from exc


def _declared_state_version(obj: Any, session: _SaveSession, directory: str) -> int:
    version = getattr(type(obj), "STATE_VERSION", 1)
    if not is_state_version(version):
        raise CheckpointError(
            f"{type(obj).__name__}.STATE_VERSION ({session.describe(directory)}) is "
            f"{version!r}; it must be an int of at least 1.",
            path=session.target,
            component=session.component_path(directory),
        )
    return version
