"""The local disk as a :class:`~ckptable._storage.Storage`: plain OS calls, the fast path.

What the other storages do not have, and why it is here:

- **locks**: a save holds ``flock`` on its staging directory, so that a later save can
  tell a crashed one (lock free: its leftovers are garbage) from a running one;
- **durability**: ``fsync`` (``F_FULLFSYNC`` on macOS), and ``syncfs(2)`` to flush a
  whole tree in one call;
- **the regular-file open**: checkpoint files are opened with ``O_NOFOLLOW`` and without
  blocking, and what was opened must be a regular file (never a symlink or a FIFO);
- **deep trees**: removal falls back to an explicit walk where ``shutil.rmtree`` runs
  out of recursion;
- **atomic swap**: ``renameat2(RENAME_EXCHANGE)`` through ctypes, where the OS has it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import stat
import time
from typing import IO, TYPE_CHECKING, Any

from ckptable.errors import UnsafeCheckpointError

if TYPE_CHECKING:
    from ckptable._storage import EntryKind

try:
    import fcntl
except ImportError:  # Windows: no flock; saves then run without staging locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["LocalStorage"]


class LocalStorage:
    """The local disk through plain OS calls. Paths are absolute OS paths."""

    can_rename_dirs = True

    def join(self, base: str, *names: str) -> str:
        # Names are validated single segments: plain concatenation is os.path.join here.
        if not names:
            return base
        if len(names) == 1 and not base.endswith(os.sep):
            return base + os.sep + names[0]  # the common case, once per file written
        return os.sep.join((base.rstrip(os.sep), *names))

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
        from ckptable import _storage  # looked up there: the fault-injection tests patch it

        return _storage._renameat2_exchange(a, b)

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
