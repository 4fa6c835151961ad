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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import posixpath
import shutil
import stat
import sys
import tempfile
import time
import urllib.parse
import uuid
from typing import IO, Any, Literal, Protocol

from ckptable.errors import CheckpointError, UnsafeCheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock; saves then run without staging locks
    fcntl = None  # type: ignore[assignment]

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


class LocalStorage:
    """The local disk through plain OS calls. Paths are absolute OS paths."""

    can_rename_dirs = True

    def join(self, base: str, *names: str) -> str:
        # Names are validated single segments: plain concatenation is os.path.join here.
        return os.sep.join((base.rstrip(os.sep), *names)) if names else base

    def split(self, path: str) -> tuple[str, str]:
        return os.path.split(path.rstrip(os.sep) or os.sep)

    def display(self, path: str) -> str:
        return path

    def kind(self, path: str, *, follow_symlinks: bool = False) -> EntryKind:
        """What is at ``path``; a symlink is ``"other"`` unless ``follow_symlinks``."""
        try:
            mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _kind_of_mode(mode)

    def size(self, path: str) -> int:
        return os.stat(path, follow_symlinks=False).st_size

    def listdir(self, path: str) -> dict[str, EntryKind]:
        with os.scandir(path) as it:
            return {entry.name: _kind_of_entry(entry) for entry in it}

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        fd = os.open(path, _WRITE_FLAGS, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def read_bytes(self, path: str) -> bytes:
        fd = _open_regular(path)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)

    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        # Unbuffered: the codecs write in large frames, so a buffer only adds a copy.
        return os.fdopen(os.open(path, _WRITE_FLAGS, 0o644), "wb", buffering=0)

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return os.fdopen(_open_regular(path), "rb", buffering=0)

    def remove_tree(self, path: str) -> None:
        if self.kind(path) == "dir":
            # shutil.rmtree does not follow symlinks inside the tree; it recurses once
            # per level (Python < 3.12), so trees deeper than the recursion limit are
            # removed by an explicit walk.
            try:
                shutil.rmtree(path)
            except RecursionError:
                _remove_deep_tree(path)
        elif self.kind(path) is not None:
            os.unlink(path)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        """Swap two directories atomically; False where the OS cannot."""
        return _renameat2_exchange(a, b)

    def fsync(self, path: str) -> None:
        if os.name == "nt" and os.path.isdir(path):
            return  # Windows cannot open a directory to flush it
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        try:
            if _FULLFSYNC is not None:
                fcntl.fcntl(fd, _FULLFSYNC)  # macOS: fsync alone stops at the drive cache
            else:
                os.fsync(fd)
        finally:
            os.close(fd)

    def age_seconds(self, path: str) -> float:
        try:
            return time.time() - os.stat(path, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return 0.0

    def identity(self, path: str) -> Any:
        try:
            st = os.stat(path)
        except OSError:
            return None
        # The change time tells a directory from a later one that reuses its inode number
        # (saves delete old trees, and new staging directories get their numbers).
        return (st.st_dev, st.st_ino, st.st_ctime_ns)

    def syncfs(self, path: str) -> bool:
        """``syncfs(2)``: one flush for thousands of files (an fsync each costs a journal
        commit each). Linux only; since 5.8 it reports writeback errors."""
        function = _libc_function("syncfs", (ctypes.c_int,))
        if function is None:
            return False
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        try:
            if function(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
        finally:
            os.close(fd)
        return True

    def lock_directory(self, path: str, *, blocking: bool = False) -> Any:
        """``flock`` on the directory; raises ``BlockingIOError`` if held and not
        ``blocking``; None where there is no ``flock`` (Windows)."""
        if fcntl is None:
            return None
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlock(self, handle: Any) -> None:
        if handle is not None:
            os.close(handle)  # closing the descriptor releases the flock

    def is_abandoned(self, path: str) -> bool:
        if fcntl is None:
            return False  # no locks: cannot tell a running save from a crashed one
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _DIRECTORY)
        except FileNotFoundError:
            return False  # gone already: nothing to clean
        except OSError:
            return True  # a symlink or a file under a staging name: garbage
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a save in progress holds it
        except OSError:
            return False  # a filesystem without locks: cannot tell
        finally:
            os.close(fd)
        return True

    def user_filesystem(self) -> Any:
        """A ``pyarrow.fs.LocalFileSystem`` if pyarrow is installed (RLlib always passes
        a pyarrow filesystem to components, and code written for it may use one)."""
        return _pyarrow_local_filesystem()

    def __reduce__(self) -> tuple[Any, ...]:
        return (LocalStorage, ())


@functools.cache
def _pyarrow_local_filesystem() -> Any:
    try:
        import pyarrow.fs
    except ImportError:
        return None
    return pyarrow.fs.LocalFileSystem()


# O_EXCL: a save never writes into an existing file. O_NOFOLLOW: a checkpoint file is
# never read through a symlink.
_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)


def _remove_deep_tree(root: str) -> None:
    """Remove the tree at ``root`` without recursion and without following symlinks
    (a symlink is unlinked, never entered): every directory is listed once, its files
    removed, its subdirectories visited; the directories go last, deepest first."""
    directories: list[str] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        directories.append(directory)
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
    for directory in reversed(directories):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(directory)


def _open_regular(path: str) -> int:
    """Open ``path`` for reading only if it is a regular file (never a symlink).

    Without blocking: opening a FIFO for reading would wait for a writer, for ever. What
    was opened is checked, not what was listed, so a file swapped for a FIFO after the
    listing is refused too (``O_NONBLOCK`` does nothing to reads of regular files).
    """
    fd = os.open(path, _READ_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    raise UnsafeCheckpointError(
        f"{path} is a special file (FIFO, socket or device), not a regular file: a "
        "checkpoint holds only regular files and directories, so it is not read.",
        path=path,
    )


def _kind_of_mode(mode: int) -> EntryKind:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


def _kind_of_entry(entry: os.DirEntry[str]) -> EntryKind:
    if entry.is_symlink():
        return "other"
    if entry.is_file(follow_symlinks=False):
        return "file"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    return "other"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _libc_function(name: str, argtypes: tuple[Any, ...]) -> Any:
    """A libc function through ctypes (returning int, setting errno), or None."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    function = getattr(ctypes.CDLL(libc_name, use_errno=True), name, None)
    if function is not None:
        function.argtypes = list(argtypes)
        function.restype = ctypes.c_int
    return function


def _renameat2_exchange(a: str, b: str) -> bool:
    """``renameat2(RENAME_EXCHANGE)``: Linux ≥ 3.15 with glibc ≥ 2.28; False elsewhere."""
    renameat2 = _libc_function(
        "renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    )
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the filesystem or kernel cannot: the caller falls back
    raise OSError(err, os.strerror(err), a, None, b)


class _RemoteStorage:
    """What the storages other than the local disk share: ``/``-separated paths, no
    directory rename, no locks, nothing to flush (closing a stream commits it, as an
    object store's PUT does)."""

    # Object stores have no directory rename: the commit step writes in place there,
    # the root manifest last. Filesystems that could rename (a SubTreeFileSystem over
    # the local disk) are treated the same: without flock and O_NOFOLLOW here, the
    # staging-and-recovery scheme could not tell a crashed save from a running one.
    can_rename_dirs = False

    def join(self, base: str, *names: str) -> str:
        return "/".join([base.rstrip("/"), *names]) if base else "/".join(names)

    def split(self, path: str) -> tuple[str, str]:
        return posixpath.split(path.rstrip("/"))

    def exchange(self, a: str, b: str) -> bool:
        return False

    def fsync(self, path: str) -> None:
        pass  # closing an output stream commits it (an object store's PUT)

    def syncfs(self, path: str) -> bool:
        return True

    def lock_directory(self, path: str, *, blocking: bool = False) -> Any:
        return None

    def unlock(self, handle: Any) -> None:
        pass

    def age_seconds(self, path: str) -> float:
        return 0.0

    def identity(self, path: str) -> Any:
        return None

    def is_abandoned(self, path: str) -> bool:
        return False


class PyArrowStorage(_RemoteStorage):
    """Any ``pyarrow.fs.FileSystem`` (S3, GCS, HDFS, a SubTreeFileSystem, ...).

    Paths are the filesystem-relative paths pyarrow uses (``bucket/key`` for S3).
    """

    def __init__(self, filesystem: Any, uri_prefix: str = "", uri_query: str = "") -> None:
        self.filesystem = filesystem
        self.uri_prefix = uri_prefix
        # A URI's query (``?endpoint_override=...&scheme=http``) is part of every path
        # shown: a component's own ``save_to_path`` is called with a shown path, and must
        # open the same store with it, not the default endpoint.
        self.uri_query = uri_query

    def display(self, path: str) -> str:
        return self.uri_prefix + path + self.uri_query

    def kind(self, path: str, *, follow_symlinks: bool = False) -> EntryKind:
        return self._kind(self.filesystem.get_file_info(path))

    @staticmethod
    def _kind(info: Any) -> EntryKind:
        import pyarrow.fs

        if info.type == pyarrow.fs.FileType.NotFound:
            return None
        if info.type == pyarrow.fs.FileType.File:
            return "file"
        if info.type == pyarrow.fs.FileType.Directory:
            return "dir"
        return "other"

    def size(self, path: str) -> int:
        return int(self.filesystem.get_file_info(path).size)

    def listdir(self, path: str) -> dict[str, EntryKind]:
        import pyarrow.fs

        infos = self.filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=False))
        return {info.base_name: self._kind(info) for info in infos}

    def makedirs(self, path: str) -> None:
        self.filesystem.create_dir(path, recursive=True)

    def mkdir(self, path: str) -> None:
        self.filesystem.create_dir(path, recursive=False)

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.filesystem.open_output_stream(path) as stream:
            stream.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.open_read(path) as stream:
            return stream.read()

    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self.filesystem.open_output_stream(path)  # type: ignore[no-any-return]

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        # A random-access file, not open_input_stream: the stream is not seekable, so an
        # unsized read() (msgpack, a user's codec) fetches it in small pieces, one request
        # each (64 MiB from S3: 14 s instead of 0.17 s). Opening costs the same one HEAD.
        return self.filesystem.open_input_file(path)  # type: ignore[no-any-return]

    def remove_tree(self, path: str) -> None:
        kind = self.kind(path)
        if kind == "dir":
            self.filesystem.delete_dir(path)
        elif kind is not None:
            self.filesystem.delete_file(path)

    def rename(self, src: str, dst: str) -> None:
        self.filesystem.move(src, dst)

    def user_filesystem(self) -> Any:
        return self.filesystem

    def __reduce__(self) -> tuple[Any, ...]:
        return (PyArrowStorage, (self.filesystem, self.uri_prefix, self.uri_query))


class FsspecStorage(_RemoteStorage):
    """Any fsspec filesystem: s3fs, gcsfs, adlfs, the ``memory://`` filesystem, ...

    Paths are the filesystem's own, without protocol (``bucket/key`` for s3fs, ``/a/b``
    for the memory filesystem). On an object store a directory is a prefix that has
    objects under it: it exists once a file is written below it.
    """

    def __init__(self, filesystem: Any, *, wrapper: Any = None) -> None:
        self.filesystem = filesystem
        # The pyarrow filesystem handed to components (see user_filesystem); the user's
        # own when they passed a PyFileSystem over this fsspec filesystem.
        self._wrapper = wrapper
        # s3fs, gcsfs and adlfs (the filesystems with split_path) have buckets at the top
        # and no directories below: making one is a no-op there, and fsspec's makedirs
        # would create a missing bucket, which a save must never do.
        self._bucketed = callable(getattr(filesystem, "split_path", None))

    def display(self, path: str) -> str:
        return str(self.filesystem.unstrip_protocol(path))

    def kind(self, path: str, *, follow_symlinks: bool = False) -> EntryKind:
        try:
            info = self.filesystem.info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _fsspec_kind(info, follow_symlinks)

    def size(self, path: str) -> int:
        return int(self.filesystem.size(path))

    def listdir(self, path: str) -> dict[str, EntryKind]:
        # Listed afresh, not from the listings cache of s3fs and its kind: another
        # process (a save on another worker) may have rewritten the prefix since.
        self.filesystem.invalidate_cache(path)
        own = path.rstrip("/")
        entries: dict[str, EntryKind] = {}
        for info in self.filesystem.ls(path, detail=True):
            name = info["name"].rstrip("/")
            if name == own:
                # The directory's own marker object (``dir/``, as pyarrow's create_dir
                # writes on S3) is no entry of it; a file lists itself.
                if info["name"].endswith("/") or info.get("type") == "directory":
                    continue
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            entries[posixpath.basename(name)] = _fsspec_kind(info, False)
        return entries

    def makedirs(self, path: str) -> None:
        if not self._bucketed:
            self.filesystem.makedirs(path, exist_ok=True)

    def mkdir(self, path: str) -> None:
        if not self._bucketed:
            self.filesystem.mkdir(path, create_parents=False)

    def write_bytes(self, path: str, data: bytes) -> None:
        self.filesystem.pipe_file(path, data)

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.filesystem.cat_file(path))

    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self.filesystem.open(path, "wb")  # type: ignore[no-any-return]

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self.filesystem.open(path, "rb")  # type: ignore[no-any-return]

    def remove_tree(self, path: str) -> None:
        kind = self.kind(path)
        if kind == "dir":
            self.filesystem.rm(path, recursive=True)
        elif kind is not None:
            self.filesystem.rm_file(path)

    def rename(self, src: str, dst: str) -> None:
        self.filesystem.mv(src, dst, recursive=True)

    def user_filesystem(self) -> Any:
        """A ``pyarrow.fs.PyFileSystem`` over the fsspec filesystem where pyarrow is
        installed: components written for RLlib call pyarrow's methods (``create_dir``,
        ``open_output_stream``) on the filesystem they get, and ckptable's own methods
        unwrap it again. Without pyarrow, the fsspec filesystem itself."""
        if self._wrapper is None:
            try:
                import pyarrow.fs
            except ImportError:
                self._wrapper = self.filesystem
            else:
                self._wrapper = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.filesystem))
        return self._wrapper

    def __reduce__(self) -> tuple[Any, ...]:
        # fsspec filesystems pickle themselves (their constructor arguments).
        return (FsspecStorage, (self.filesystem,))


def _fsspec_kind(info: dict[str, Any], follow_symlinks: bool) -> EntryKind:
    if info.get("islink") and not follow_symlinks:
        return "other"  # as on the local disk: a checkpoint is never read through a link
    kind = info.get("type")
    if kind == "file":
        return "file"
    if kind == "directory":
        return "dir"
    return "other"


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
