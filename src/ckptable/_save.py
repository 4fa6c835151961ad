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

The outermost save opens the progress bar (:mod:`ckptable._progress`); every file
written, and every chunk of a big one, counts in it, nested saves included.

The files of one level are written by :mod:`ckptable._save_level`. On object stores the
writes run concurrently behind the pipeline (:mod:`ckptable._storage_concurrent`); the
root's manifest, the commit record, is written only once every other file is stored.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ckptable._commit import Staging, staged_directory
from ckptable._formats import Codec, get_codec
from ckptable._layout import (
    checkpoint_file_names,
)
from ckptable._manifest import checksum_of, preferred_algorithm, seal_directory
from ckptable._pickle_scan import PAYLOAD_MIN_BYTES, skeleton_checksum
from ckptable._progress import advance, progress_bar
from ckptable._save_level import _write_level, collect_level_state
from ckptable._save_stream import RecordingStream
from ckptable._storage import (
    EntryKind,
    LocalStorage,
    Storage,
    new_temporary_path,
    resolve_storage,
)
from ckptable._storage_concurrent import barrier, io_concurrency, writing_concurrently
from ckptable.errors import CheckpointError

if TYPE_CHECKING:
    from ckptable._checkpointable import Checkpointable

__all__ = [
    "collect_level_state",
    "extra_root_files",
    "publish_tree",
    "save_checkpointable",
    "save_through_override",
]


@dataclasses.dataclass(frozen=True)
class _SaveSession:
    """The outermost save in progress: where its staging tree is and how it encodes."""

    storage: Storage
    staging: Staging
    codec: Codec
    #: The checkpoint path being written, as the user will see it (for error messages).
    target: str
    #: Checksum algorithm of the manifests.
    algorithm: str = dataclasses.field(default_factory=preferred_algorithm)
    #: The transfer hook for actor components on other nodes (None: the default one).
    transfer: Any = None
    #: ``class_and_ctor_args.pkl`` of the classes built without arguments, pickled once
    #: per save (a wide tree has many levels of one class).
    class_records: dict[type, bytes] = dataclasses.field(default_factory=dict)
    #: The JSON text of ckptable's record in ``metadata.json``, per class and components
    #: (``_save_level._metadata_json``): the same for most levels of a wide tree.
    record_json: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict)
    #: The root's manifest is written once, by the caller, after files it adds itself
    #: (a save override's, ``extra_root_files``): on an object store the commit record
    #: must not exist before them.
    defer_root_seal: bool = False
    #: The component whose ``save_to_path`` the pipeline is calling (``expect_call``).
    _expected_call: list[object] = dataclasses.field(default_factory=list)

    def expect_call(self, component: object) -> None:
        """The pipeline is about to call ``component.save_to_path`` itself."""
        self._expected_call[:] = [component]

    def called_by_pipeline(self, obj: object) -> bool:
        """Whether this nested save of ``obj`` is the call the pipeline announced (and
        not one from other code: a save override's ``super()`` call, say)."""
        expected = self._expected_call
        if expected and expected[0] is obj:
            expected.clear()
            return True
        return False

    @property
    def staging_root(self) -> str:
        return self.staging.root

    def owns(self, storage: Storage, path: str) -> bool:
        """True if ``path`` is the staging tree or inside it."""
        if not _same_storage(storage, self.storage):
            return False
        return path == self.staging_root or path.startswith(
            self.storage.join(self.staging_root, "")
        )

    def owns_plain_path(self, path: Any, filesystem: Any) -> bool:
        """Fast check for the nested calls this session makes itself: a local path string
        inside the staging tree (skips resolving the path again, per component)."""
        return (
            isinstance(self.storage, LocalStorage)
            and isinstance(path, str)
            and path.startswith(self.staging_root)
            and path[len(self.staging_root) : len(self.staging_root) + 1] in ("", os.sep)
            and (filesystem is None or filesystem is self.storage.user_filesystem())
        )

    def component_path(self, path: str) -> str | None:
        """``"a/b"`` for a component directory inside the staging tree; None for the root."""
        return path[len(self.staging_root) + 1 :] or None

    def describe(self, path: str) -> str:
        """Where ``path`` is, for messages: the checkpoint and the component path."""
        component = self.component_path(path)
        return f"component {component!r} of {self.target}" if component else self.target

    def shown(self, path: str) -> str:
        """A staging path as the user will find it once published."""
        relative = path[len(self.staging_root) + 1 :]
        return self.storage.join(self.target, relative) if relative else self.target

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file and record its size and checksum for the manifest."""
        self.storage.write_bytes(path, data)
        self.staging.files[path] = (len(data), checksum_of(self.algorithm, data))
        advance(len(data))

    def open_write(self, path: str, *, pickled: bool = False) -> RecordingStream:
        """A stream (a context manager) whose file is recorded for the manifest, with
        its size and checksum, when the ``with`` block ends without an error.

        ``pickled``: the file is a pickle; if it is big, its skeleton's checksum is
        recorded too (what a memory-mapped restore verifies).
        """
        record = self._record_pickle if pickled else self._record_file
        return RecordingStream(self.storage, path, self.algorithm, record)

    def _record_file(self, path: str, size: int, digest: str) -> None:
        self.staging.files[path] = (size, digest)

    def _record_pickle(self, path: str, size: int, digest: str) -> None:
        self.staging.files[path] = (size, digest)
        if size >= PAYLOAD_MIN_BYTES and isinstance(self.storage, LocalStorage):
            skeleton = skeleton_checksum(self.storage, path, self.algorithm)
            if skeleton is not None:
                self.staging.skeletons[path] = skeleton

    def seal(
        self,
        directory: str,
        *,
        rebuild: bool = False,
        entries: dict[str, EntryKind] | None = None,
        final: bool = False,
    ) -> None:
        """Write the manifest of a finished level (the root's last of all); every level
        below the root is marked ``nested`` (its parent's manifest pins it).

        ``entries``: what the level holds, when this session wrote all of it (see
        ``_seal.build_manifest``). The root's manifest is the commit record: it is
        written only once every other file is stored (writes may run concurrently:
        :mod:`ckptable._storage_concurrent`), and stored before this returns; with
        ``defer_root_seal``, only by the call that says it is the ``final`` one."""
        root = directory == self.staging_root
        if root and self.defer_root_seal and not final:
            return
        if root:
            barrier(self.storage)
        seal_directory(
            self.storage,
            directory,
            self.algorithm,
            self.staging.files,
            self.shown,
            rebuild,
            self.staging.skeletons,
            self.staging.trees,
            nested=not root,
            entries=entries,
        )
        if root:
            barrier(self.storage)


_current_save: contextvars.ContextVar[_SaveSession | None] = contextvars.ContextVar(
    "ckptable_current_save", default=None
)


_extra_root_files: contextvars.ContextVar[Mapping[str, bytes] | None] = contextvars.ContextVar(
    "ckptable_extra_root_files", default=None
)


@contextlib.contextmanager
def extra_root_files(files: Mapping[str, bytes]) -> Iterator[None]:
    """Add ``files`` (name → content) to the root of the checkpoints that outermost saves
    publish in this context: staged, checksummed and published with the tree, so they
    exist exactly when the checkpoint does (``CheckpointManager``'s record)."""
    token = _extra_root_files.set(files)
    try:
        yield
    finally:
        _extra_root_files.reset(token)


def _same_storage(a: Storage, b: Storage) -> bool:
    if isinstance(a, LocalStorage) or isinstance(b, LocalStorage):
        return isinstance(a, LocalStorage) and isinstance(b, LocalStorage)
    fs_a, fs_b = a.user_filesystem(), b.user_filesystem()
    if fs_a is fs_b:
        return True
    equals = getattr(fs_a, "equals", None)  # pyarrow's; fsspec filesystems compare with ==
    return bool(equals(fs_b)) if callable(equals) else bool(fs_a == fs_b)


def save_checkpointable(
    obj: Checkpointable,
    path: Any,
    *,
    state: dict[str, Any] | None,
    filesystem: Any,
    use_msgpack: bool,
    format: str | None,
    durable: bool = True,
    transfer: Any = None,
    progress: bool | None = None,
) -> str:
    """``Checkpointable.save_to_path``: see there."""
    session = _current_save.get()
    if session is not None and session.owns_plain_path(path, filesystem):
        _write_nested_level(session, obj, path, state)
        return str(path)
    if path is None:
        path, filesystem = new_temporary_path(), None
    storage, fs_path = resolve_storage(path, filesystem)
    if session is not None and session.owns(storage, fs_path):
        _write_nested_level(session, obj, fs_path, state)
        return storage.display(fs_path)
    codec = get_codec(format or ("msgpack" if use_msgpack else "cloudpickle"))

    def write(session: _SaveSession) -> None:
        _write_level(session, obj, session.staging_root, state)

    return publish_tree(
        path,
        storage,
        fs_path,
        codec,
        durable,
        checkpoint_file_names(obj),
        write,
        transfer,
        progress,
    )


def _write_nested_level(
    session: _SaveSession, obj: Checkpointable, path: str, state: dict[str, Any] | None
) -> None:
    """A ``save_to_path`` inside a save in progress: write the level in place. Called by
    code other than the pipeline (a save override that goes on to read or write the
    tree), the writes still queued are done first (``_storage_batched``)."""
    from_pipeline = session.called_by_pipeline(obj)
    _write_level(session, obj, path, state)
    if not from_pipeline:
        barrier(session.storage)


def save_through_override(
    obj: Checkpointable, method: Callable[..., Any], path: Any, kwargs: dict[str, Any]
) -> str:
    """Run a subclass's own ``save_to_path`` inside a staging session.

    A subclass that overrides ``save_to_path`` may write files of its own before or after
    calling ``super().save_to_path``. Called from outside any save, the override runs
    with the staging directory as ``path``, so that those files are part of the atomic,
    checksummed tree too; nested calls (a component's override) just run.
    """
    session = _current_save.get()
    # The session flushes, not the override: code written for RLlib takes no durable=.
    durable = bool(kwargs.pop("durable", True))
    transfer = kwargs.pop("transfer", None)
    progress = kwargs.pop("progress", None)
    filesystem = kwargs.get("filesystem")
    if session is not None and (
        session.owns_plain_path(path, filesystem)
        or (path is not None and session.owns(*resolve_storage(path, filesystem)))
    ):
        return method(obj, path, **kwargs)  # type: ignore[no-any-return]
    if path is None:
        path, filesystem = new_temporary_path(), None
        kwargs = {**kwargs, "filesystem": None}
    storage, fs_path = resolve_storage(path, filesystem)
    format = kwargs.get("format")
    codec = get_codec(format or ("msgpack" if kwargs.get("use_msgpack") else "cloudpickle"))

    def write(session: _SaveSession) -> None:
        method(obj, storage.display(session.staging_root), **kwargs)
        # Whatever the override wrote around its super() call: checksum it too.
        session.seal(session.staging_root, rebuild=True, final=True)

    return publish_tree(
        path,
        storage,
        fs_path,
        codec,
        durable,
        checkpoint_file_names(obj),
        write,
        transfer,
        progress,
        reseal_root=True,
    )


def publish_tree(
    path: Any,
    storage: Storage,
    fs_path: str,
    codec: Codec,
    durable: bool,
    checkpoint_files: Iterable[str],
    write: Callable[[_SaveSession], None],
    transfer: Any = None,
    progress: bool | None = None,
    *,
    reseal_root: bool = False,
) -> str:
    """Stage, write (``write``), make durable and publish one whole checkpoint.

    ``checkpoint_files``: the file names that mark a checkpoint level, which may be
    replaced (anything else at ``fs_path`` is refused). ``transfer``: the hook that moves
    actor components' directories between nodes (None: ``ckptable.ray``'s default).
    ``progress``: whether to show a progress bar (None: on a terminal).
    ``reseal_root``: ``write`` seals the root itself, last (``final=True``).
    """
    # A URI is returned as given (host, port and query kept); a local path made absolute.
    shown = storage.display(fs_path) if isinstance(storage, LocalStorage) else os.fspath(path)
    if isinstance(storage, LocalStorage) and os.path.islink(fs_path):
        fs_path = os.path.realpath(fs_path)  # replace the checkpoint the link points to
    # Before anything is touched: a bad CKPTABLE_IO_CONCURRENCY must not cost the
    # checkpoint an object store's in-place save removes first.
    workers = io_concurrency(storage)
    extra = _extra_root_files.get()
    try:
        with (
            progress_bar(progress, "Saving"),
            staged_directory(storage, fs_path, checkpoint_files, durable=durable) as staging,
            writing_concurrently(storage, workers) as writer,
        ):
            session = _SaveSession(
                writer,
                staging,
                codec,
                target=shown,
                transfer=transfer,
                defer_root_seal=reseal_root or bool(extra),
            )
            token = _current_save.set(session)
            try:
                write(session)
                if extra:
                    for name, data in extra.items():
                        session.write_bytes(storage.join(session.staging_root, name), data)
                    session.seal(session.staging_root, final=True)
            finally:
                _current_save.reset(token)
    except OSError as exc:
        raise CheckpointError(
            f"Saving the checkpoint {shown} failed: {exc}. Nothing was published; the "
            "checkpoint that was there before (if any) is unchanged.",
            path=shown,
        ) from exc
    except RecursionError as exc:
        raise CheckpointError(
            f"Saving the checkpoint {shown} failed: the object tree nests its components "
            f"too deeply for Python's recursion limit ({exc}). Nothing was published.",
            path=shown,
        ) from exc
    return shown
