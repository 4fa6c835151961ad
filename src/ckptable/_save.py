"""The save pipeline: collect → stage → publish.

1. **collect**: each level's state is taken with *one* ``get_state()`` call, and the
   states of its components are split off that one dict and handed down through
   ``save_to_path(state=...)``. RLlib calls ``get_state(components=name)`` once per
   component, which is quadratic on wide trees; here a whole local tree costs one call.
2. **stage**: the outermost ``save_to_path`` opens a staging directory
   (:mod:`ckptable._commit`) and records it in a context variable; every nested
   ``save_to_path`` (components are saved through their own method, so subclasses that
   override it keep working) sees that it writes inside that tree and writes in place.
3. **publish**: when the whole tree is written, the staging directory replaces the
   target in one step.

Per level the files are those of RLlib's layout: ``metadata.json`` (with ckptable's own
record under the ``"ckptable"`` key), ``class_and_ctor_args.pkl``, ``state.pkl`` or
``state.msgpack``, and one subdirectory per component.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import os
import pickle
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import cloudpickle

from ckptable._commit import staged_directory
from ckptable._components import uses_ckptable_method, validate_component_name
from ckptable._formats import Codec, get_codec
from ckptable._layout import (
    CHECKPOINT_VERSION,
    DEFAULT_METADATA_FILE,
    LAYOUT_VERSION,
    RECORD_KEY,
    checkpoint_file_names,
)
from ckptable._storage import LocalStorage, Storage, new_temporary_path, resolve_storage
from ckptable._version import package_version
from ckptable.errors import CheckpointError, StateEncodingError

if TYPE_CHECKING:
    from ckptable._checkpointable import Checkpointable

__all__ = ["save_checkpointable"]


@dataclasses.dataclass(frozen=True)
class _SaveSession:
    """The outermost save in progress: where its staging tree is and how it encodes."""

    storage: Storage
    staging_root: str
    codec: Codec
    #: The checkpoint path being written, as the user will see it (for error messages).
    target: str

    def owns(self, storage: Storage, path: str) -> bool:
        if not _same_storage(storage, self.storage):
            return False
        return path.startswith(self.storage.join(self.staging_root, ""))

    def owns_plain_path(self, path: Any, filesystem: Any) -> bool:
        """Fast check for the nested calls this session makes itself: a local path string
        inside the staging tree (skips resolving the path again, per component)."""
        return (
            isinstance(self.storage, LocalStorage)
            and isinstance(path, str)
            and path.startswith(self.staging_root)
            and path[len(self.staging_root) : len(self.staging_root) + 1] == os.sep
            and (filesystem is None or filesystem is self.storage.user_filesystem())
        )

    def component_path(self, path: str) -> str | None:
        """``"a/b"`` for a component directory inside the staging tree; None for the root."""
        return path[len(self.staging_root) + 1 :] or None

    def describe(self, path: str) -> str:
        """Where ``path`` is, for messages: the checkpoint and the component path."""
        component = self.component_path(path)
        return f"component {component!r} of {self.target}" if component else self.target


_PYTHON_VERSION = platform.python_version()

_current_save: contextvars.ContextVar[_SaveSession | None] = contextvars.ContextVar(
    "ckptable_current_save", default=None
)


def _same_storage(a: Storage, b: Storage) -> bool:
    if isinstance(a, LocalStorage) or isinstance(b, LocalStorage):
        return isinstance(a, LocalStorage) and isinstance(b, LocalStorage)
    fs_a, fs_b = a.user_filesystem(), b.user_filesystem()
    return fs_a is fs_b or bool(fs_a.equals(fs_b))


def save_checkpointable(
    obj: Checkpointable,
    path: Any,
    *,
    state: dict[str, Any] | None,
    filesystem: Any,
    use_msgpack: bool,
    format: str | None,
) -> str:
    """``Checkpointable.save_to_path``: see there."""
    session = _current_save.get()
    if session is not None and session.owns_plain_path(path, filesystem):
        _write_level(session, obj, path, state)
        return str(path)
    if path is None:
        path = new_temporary_path()
        filesystem = None
    storage, fs_path = resolve_storage(path, filesystem)
    if session is not None and session.owns(storage, fs_path):
        _write_level(session, obj, fs_path, state)
        return storage.display(fs_path)

    # A URI is returned as given (host, port and query kept); a local path made absolute.
    shown = storage.display(fs_path) if isinstance(storage, LocalStorage) else os.fspath(path)
    if isinstance(storage, LocalStorage) and os.path.islink(fs_path):
        fs_path = os.path.realpath(fs_path)  # replace the checkpoint the link points to
    codec = get_codec(format or ("msgpack" if use_msgpack else "cloudpickle"))
    with staged_directory(storage, fs_path, checkpoint_file_names(obj)) as staging:
        session = _SaveSession(storage, staging, codec, target=shown)
        token = _current_save.set(session)
        try:
            _write_level(session, obj, staging, state)
        finally:
            _current_save.reset(token)
    return shown


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
    if state_provided and not state:
        # RLlib's `state or self.get_state(not_components=...)`: an empty state asks the
        # object for its own state, without its components.
        state = obj.get_state(not_components=[name for name, _ in components])
    collected = state if state_provided else obj.get_state()
    if not isinstance(collected, Mapping):
        source = "the state= argument" if state_provided else f"{type(obj).__name__}.get_state()"
        raise CheckpointError(
            f"{source} ({session.describe(directory)}) is a {type(collected).__name__}, "
            "not a dict.",
            path=session.target,
            component=session.component_path(directory),
        )
    level_state = dict(collected)

    saved: list[str] = []
    metadata_files: dict[str, str] = {}
    for name, comp in components:
        if state_provided and name not in level_state:
            continue  # RLlib: a given state without this component's key skips it
        metadata_file = getattr(comp, "METADATA_FILE_NAME", DEFAULT_METADATA_FILE)
        if metadata_file != DEFAULT_METADATA_FILE:
            metadata_files[name] = metadata_file
        comp.save_to_path(
            storage.join(directory, name),
            filesystem=_filesystem_for(storage, comp),
            state=level_state.pop(name, None),
            use_msgpack=session.codec.name == "msgpack",
        )
        saved.append(name)

    _write_metadata(session, obj, directory, saved, metadata_files)
    _write_class_and_ctor_args(session, obj, directory)
    state_file = storage.join(directory, obj.STATE_FILE_NAME + session.codec.suffix)
    try:
        with storage.open_write(state_file) as stream:
            session.codec.dump(level_state, stream)
    except (TypeError, ValueError, AttributeError, RecursionError, pickle.PicklingError) as exc:
        raise StateEncodingError(
            f"Cannot encode the state of {type(obj).__name__} ({session.describe(directory)}) "
            f"with {session.codec.name}: {exc}",
            path=session.target,
            component=session.component_path(directory),
        ) from exc


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
        if not callable(getattr(comp, "save_to_path", None)):
            raise CheckpointError(
                f"Component {name!r} of {type(obj).__name__} ({where}) is a "
                f"{type(comp).__name__}, which has no save_to_path(); components must "
                "be Checkpointable.",
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
    cls = type(obj)
    metadata[RECORD_KEY] = {
        "layout_version": LAYOUT_VERSION,
        "format": session.codec.name,
        "state_file": obj.STATE_FILE_NAME + session.codec.suffix,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "components": saved,
        # Components that rename their metadata file (as RLlib's Algorithm does): the
        # restore reads their levels before their objects exist (created in set_state).
        "component_metadata_files": metadata_files,
        "ckptable_version": package_version(),
        "python_version": _PYTHON_VERSION,
        "cloudpickle_version": cloudpickle.__version__,
    }
    try:
        payload = json.dumps(metadata).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"The metadata of {cls.__name__} ({session.describe(directory)}) is not "
            f"JSON-serializable: {exc}",
            path=session.target,
            component=session.component_path(directory),
        ) from exc
    session.storage.write_bytes(session.storage.join(directory, obj.METADATA_FILE_NAME), payload)


def _write_class_and_ctor_args(session: _SaveSession, obj: Checkpointable, directory: str) -> None:
    record = {"class": type(obj), "ctor_args_and_kwargs": obj.get_ctor_args_and_kwargs()}
    try:
        payload = cloudpickle.dumps(record)
    except Exception as exc:  # cloudpickle raises many types for unpicklable objects
        raise StateEncodingError(
            f"Cannot pickle the class and constructor arguments of {type(obj).__name__} "
            f"({session.describe(directory)}): {exc}",
            path=session.target,
            component=session.component_path(directory),
        ) from exc
    session.storage.write_bytes(
        session.storage.join(directory, obj.CLASS_AND_CTOR_ARGS_FILE_NAME), payload
    )
