"""Where checkpoint files live: the local disk (fast path), a ``pyarrow.fs`` filesystem or
an fsspec filesystem.

Both pipelines talk to a :class:`Storage` and never to ``os``, ``pyarrow`` or ``fsspec``
directly. ``resolve_storage(path, filesystem)`` picks one the way RLlib does: an explicit
``filesystem`` wins; otherwise a URI's scheme decides (``file://`` and plain paths are
local; other schemes go to ``pyarrow.fs.FileSystem.from_uri``, and those pyarrow does not
know, such as ``memory://``, to fsspec). Local filesystem objects of either library take
the local fast path too.

A storage says whether it can rename directories (``can_rename_dirs``): the commit step
stages beside the target and renames where it can, and writes in place elsewhere.

This module is the interface: what a storage is (:class:`Storage`, ``EntryKind``) and
how a path picks one (:func:`resolve_storage` and its URI handling). The storages live
in their own modules, and every name is importable from here too:

1. :mod:`ckptable._storage_local`: :class:`LocalStorage`, plain OS calls with locks,
   ``syncfs``, the regular-file open and the removal of trees of any depth.
2. :mod:`ckptable._storage_remote`: :class:`PyArrowStorage` and :class:`FsspecStorage`,
   the adapters to the two filesystem libraries (pyarrow and fsspec are imported only
   where a path or filesystem needs them).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import urllib.parse
import uuid
from typing import IO, Any, Literal, Protocol

from ckptable._storage_local import LocalStorage

# Also reached through this module: ckptable.ray calls libc with _libc_function, and
# LocalStorage.exchange calls _renameat2_exchange from here (where tests patch it).
from ckptable._storage_local import _libc_function as _libc_function
from ckptable._storage_local import _renameat2_exchange as _renameat2_exchange
from ckptable._storage_remote import FsspecStorage, PyArrowStorage
from ckptable.errors import CheckpointError

__all__ = [
    "EntryKind",
    "FsspecStorage",
    "LocalStorage",
    "PyArrowStorage",
    "Storage",
    "new_temporary_path",
    "resolve_storage",
]

#: What a path is: ``"file"``, ``"dir"``, ``"other"`` (symlink, FIFO, device, ...) or
#: ``None`` when nothing is there.
EntryKind = Literal["file", "dir", "other"] | None


class Storage(Protocol):
    """The few filesystem operations the save and restore pipelines need."""

    #: True if ``rename`` moves a whole directory atomically (not so on object stores).
    can_rename_dirs: bool

    def join(self, base: str, *names: str) -> str: ...
    def split(self, path: str) -> tuple[str, str]: ...
    def display(self, path: str) -> str: ...
    def kind(self, path: str, *, follow_symlinks: bool = False) -> EntryKind: ...
    def listdir(self, path: str) -> dict[str, EntryKind]: ...
    def size(self, path: str) -> int: ...
    def makedirs(self, path: str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...
    def read_bytes(self, path: str) -> bytes: ...
    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def remove_tree(self, path: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def exchange(self, a: str, b: str) -> bool: ...
    def fsync(self, path: str) -> None:
        """Make a file or directory durable (no-op where closing a file commits it)."""
        ...

    def syncfs(self, path: str) -> bool:
        """Flush the whole filesystem holding ``path`` in one call; False if unsupported."""
        ...

    def lock_directory(self, path: str, *, blocking: bool = False) -> Any:
        """Hold an exclusive lock on the directory ``path`` (released by ``unlock``, or when
        the process dies); None where the storage has no locks."""
        ...

    def unlock(self, handle: Any) -> None: ...
    def age_seconds(self, path: str) -> float:
        """Seconds since ``path`` last changed (0 where the storage cannot tell)."""
        ...

    def identity(self, path: str) -> Any:
        """What ``path`` is now (device, inode, change time); None where the storage cannot tell.
        A restore compares it before and after reading, to notice a concurrent save."""
        ...

    def is_abandoned(self, path: str) -> bool:
        """True if nobody holds the lock of ``path`` (its writer finished or died); False
        where the storage cannot tell."""
        ...

    def user_filesystem(self) -> Any:
        """The filesystem object to pass as ``filesystem=`` to a component's own methods."""
        ...


_LOCAL = LocalStorage()

#: Installs both libraries a checkpoint URI may need.
_CLOUD_HINT = "pip install 'ckptable[cloud]'"


def _is_pyarrow_filesystem(obj: object) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("pyarrow")


def _is_fsspec_filesystem(obj: object) -> bool:
    # Whoever made an fsspec filesystem imported fsspec: no import needed to check.
    fsspec = sys.modules.get("fsspec")
    return fsspec is not None and isinstance(obj, fsspec.AbstractFileSystem)


def resolve_storage(path: Any, filesystem: Any = None) -> tuple[Storage, str]:
    """Map a user's ``path`` (str, ``os.PathLike`` or URI) and ``filesystem`` (a
    ``pyarrow.fs.FileSystem``, an fsspec filesystem or None) to a storage.

    Returns:
        The storage and the path in that storage's own terms (absolute for local paths).

    Raises:
        CheckpointError: for an empty path, a filesystem of neither library, or a URI
            scheme that neither pyarrow nor fsspec knows.
        ImportError: if the URI needs a package that is not installed (named in the
            message, with the ``pip install`` that brings it).
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise CheckpointError(f"A checkpoint path must be a non-empty str or path, not {path!r}.")
    if filesystem is not None:
        return _resolve_filesystem(path, filesystem)
    scheme = urllib.parse.urlsplit(path).scheme
    if not scheme or scheme == "file" or (len(scheme) == 1 and os.name == "nt"):
        return _LOCAL, os.path.abspath(_strip_file_scheme(path))
    return _resolve_uri(path, scheme)


def _resolve_filesystem(path: str, filesystem: Any) -> tuple[Storage, str]:
    if _is_pyarrow_filesystem(filesystem):
        if filesystem.type_name == "local":
            return _LOCAL, os.path.abspath(_strip_file_scheme(path))
        inner = _fsspec_inside(filesystem)
        if inner is not None:
            return _fsspec_storage(path, inner, wrapper=filesystem)
        return PyArrowStorage(filesystem), path
    if _is_fsspec_filesystem(filesystem):
        return _fsspec_storage(path, filesystem)
    raise CheckpointError(
        f"filesystem={filesystem!r} is not a pyarrow.fs.FileSystem nor an fsspec "
        "filesystem; pass one of those, or a URI as the path."
    )


def _fsspec_inside(filesystem: Any) -> Any:
    """The fsspec filesystem a ``PyFileSystem(FSSpecHandler(fs))`` wraps, else None.

    Unwrapped, so that what :meth:`FsspecStorage.user_filesystem` hands to components
    comes back to the same kind of storage (and fsspec is called without pyarrow's
    layer)."""
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.PyFileSystem) and isinstance(
        filesystem.handler, pyarrow.fs.FSSpecHandler
    ):
        return filesystem.handler.fs
    return None


def _fsspec_storage(path: str, fs: Any, *, wrapper: Any = None) -> tuple[Storage, str]:
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return _LOCAL, os.path.abspath(_strip_file_scheme(path))
    return FsspecStorage(fs, wrapper=wrapper), str(fs._strip_protocol(path))


def _resolve_uri(path: str, scheme: str) -> tuple[Storage, str]:
    """pyarrow's filesystem for the URI if it knows the scheme (as RLlib), else fsspec's."""
    try:
        import pyarrow.fs
    except ImportError:
        return _resolve_fsspec_uri(path, scheme, None)
    try:
        fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    except ImportError as exc:  # pyarrow hands hf:// and fsspec+ URIs to fsspec
        raise ImportError(
            f"The checkpoint URI {path!r} needs a package that is not installed: {exc}"
        ) from exc
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError) as exc:
        if isinstance(exc, pyarrow.ArrowInvalid) and "Unrecognized filesystem" not in str(exc):
            raise CheckpointError(
                f"Cannot open the filesystem of {path!r}: {exc}", path=path
            ) from exc
        # Not a scheme pyarrow knows (memory://, az://, ...), or one it was built without.
        return _resolve_fsspec_uri(path, scheme, str(exc))
    except Exception as exc:  # OSError (no libhdfs), ...
        raise CheckpointError(f"Cannot open the filesystem of {path!r}: {exc}", path=path) from exc
    inner = _fsspec_inside(fs)  # fsspec+memory:// and the like
    if inner is not None:
        return FsspecStorage(inner, wrapper=fs), fs_path
    query = urllib.parse.urlsplit(path).query
    storage = PyArrowStorage(fs, uri_prefix=f"{scheme}://", uri_query=f"?{query}" if query else "")
    return storage, fs_path


def _resolve_fsspec_uri(path: str, scheme: str, pyarrow_error: str | None) -> tuple[Storage, str]:
    """fsspec's filesystem for the URI; ``pyarrow_error`` is why pyarrow could not (None:
    pyarrow is not installed)."""
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        if pyarrow_error is None:
            raise ImportError(
                f"Checkpoint URIs like {path!r} need pyarrow or fsspec: {_CLOUD_HINT}"
            ) from None
        raise CheckpointError(
            f"Unknown URI scheme {scheme!r} in {path!r}: pyarrow has no filesystem for it "
            f"({pyarrow_error}), and fsspec, which might, is not installed ({_CLOUD_HINT}).",
            path=path,
        ) from None
    try:
        fsspec.get_filesystem_class(scheme)  # ValueError if unknown, ImportError if missing
        fs, fs_path = fsspec.core.url_to_fs(path)
    except ImportError as exc:
        package = known_implementations.get(scheme, {}).get("class", "").partition(".")[0]
        hint = f"pip install {package}" if package and package != "fsspec" else str(exc)
        if pyarrow_error is None and scheme in ("s3", "gs", "gcs", "hdfs"):
            hint += " (or pip install pyarrow, which has this filesystem built in)"
        raise ImportError(
            f"The checkpoint URI {path!r} needs a package that is not installed: {hint}. "
            f"(fsspec: {exc})"
        ) from exc
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise CheckpointError(
                f"Unknown URI scheme {scheme!r} in {path!r}: neither pyarrow nor fsspec has a "
                "filesystem for it.",
                path=path,
            ) from exc
        raise CheckpointError(f"Cannot open the filesystem of {path!r}: {exc}", path=path) from exc
    except Exception as exc:  # an implementation's own errors (bad options, ...)
        raise CheckpointError(f"Cannot open the filesystem of {path!r}: {exc}", path=path) from exc
    return _fsspec_storage(fs_path, fs)


def _strip_file_scheme(path: str) -> str:
    if path.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlsplit(path).path)
    return os.path.expanduser(path)


def new_temporary_path() -> str:
    """A fresh, not yet existing path in the temp directory (``save_to_path(None)``)."""
    return os.path.join(tempfile.gettempdir(), str(uuid.uuid4()))
