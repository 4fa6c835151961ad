"""One transfer's job and its destination side: the arguments checked, the temporary
sibling of ``dst_path`` the tree is written into, the rename that publishes it (never over
an existing path), and the cleanup of a failed one. Every built-in hook shares these.

On failure a transfer raises a :class:`~ckptable.errors.TransferError` that names both
nodes and both paths (:meth:`_Job.error`), with the cause in a line (:func:`_reason`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import ray

from ckptable._storage import _libc_function
from ckptable.errors import TransferError

__all__ = ["TRANSFER_MARKER"]

_T = TypeVar("_T")

#: (``.<name>.ckptable-transfer-<token>``): a leftover scan can recognise one.
TRANSFER_MARKER = ".ckptable-transfer-"


@dataclasses.dataclass(frozen=True)
class _Job:
    """One transfer's arguments, checked, and its temporary sibling of ``dst_path``."""

    src_node_id: str
    src_path: str
    dst_node_id: str
    dst_path: str
    tmp_path: str
    #: Where the writer reports its progress (empty: nobody watches).
    progress_key: str = ""

    @classmethod
    def checked(
        cls,
        src_node_id: Any,
        src_path: Any,
        dst_node_id: Any,
        dst_path: Any,
        *,
        one_filesystem: bool = False,
    ) -> _Job:
        """The job, or TypeError / TransferError for arguments no transfer can use.

        ``one_filesystem``: both paths are on one filesystem whatever the node ids say,
        so neither may contain the other (else the copy would copy itself).
        """
        for name, value in (("src_node_id", src_node_id), ("dst_node_id", dst_node_id)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a Ray node id (a hex str), not {value!r}")
        paths = []
        for name, value in (("src_path", src_path), ("dst_path", dst_path)):
            try:
                path = os.fspath(value)
            except TypeError:
                raise TypeError(f"{name} must be a str path, not {value!r}") from None
            if not isinstance(path, str):
                raise TypeError(f"{name} must be a str path, not {value!r}")
            paths.append(os.path.normpath(path))
        src, dst = paths
        job = cls(src_node_id, src, dst_node_id, dst, "")
        for path in paths:
            if not os.path.isabs(path):
                # Each task resolves a relative path against its own working directory.
                raise job.error(f"{path!r} is not an absolute path")
        parent, name = os.path.split(dst)
        if not name:
            raise job.error("the destination is a filesystem root")
        same_tree = os.path.commonpath([src, dst]) in (src, dst)
        if same_tree and (one_filesystem or src_node_id == dst_node_id):
            raise job.error("one path contains the other")
        token = uuid.uuid4().hex[:16]
        return dataclasses.replace(
            job, tmp_path=os.path.join(parent, f".{name}{TRANSFER_MARKER}{token}")
        )

    def error(self, reason: str) -> TransferError:
        return TransferError(
            f"Could not transfer {self.src_path} on node {self.src_node_id} to "
            f"{self.dst_path} on node {self.dst_node_id}: {reason}",
            path=self.dst_path,
        )


def _reason(exc: BaseException) -> str:
    """What went wrong, in a line or two, for a TransferError's message."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            return _reason(cause)
    if isinstance(exc, TransferError):
        return str(exc)
    text = str(exc).strip()
    if isinstance(exc, ray.exceptions.RayError):
        text = text.splitlines()[0] if text else ""
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename is not None:
            # The stream's paths are bytes: show them as the str paths they stand for.
            names = [os.fsdecode(exc.filename)]
            if exc.filename2 is not None:
                names.append(os.fsdecode(exc.filename2))
            return f"{exc.strerror}: {' -> '.join(names)}"
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _receive_tree(job: _Job, write: Callable[[str], _T]) -> _T:
    """On the destination: make ``job.tmp_path``, let ``write`` fill it, rename it to
    ``job.dst_path`` and return what ``write`` returned; on any failure remove it and
    raise TransferError."""
    try:
        if os.path.lexists(job.dst_path):
            raise TransferError(f"{job.dst_path} already exists")
        os.makedirs(os.path.dirname(job.dst_path), exist_ok=True)
        os.mkdir(job.tmp_path, 0o755)
    except TransferError as exc:
        raise job.error(str(exc)) from None
    except OSError as exc:
        raise job.error(_reason(exc)) from exc
    try:
        result = write(job.tmp_path)
        try:
            _rename_no_replace(job.tmp_path, job.dst_path)
        except FileExistsError:
            raise TransferError(f"{job.dst_path} appeared meanwhile") from None
    except BaseException as exc:
        _remove_tree_quietly(job.tmp_path)
        if isinstance(exc, Exception):
            raise job.error(_reason(exc)) from exc
        raise
    return result


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_no_replace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists: with
    ``renameat2(RENAME_NOREPLACE)`` where the OS has it, else a check and a rename (which
    would only replace an empty directory created between the two)."""
    renameat2 = _libc_function(
        "renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    )
    if renameat2 is not None:
        flags = _RENAME_NOREPLACE
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), src, None, dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _remove_tree_quietly(path: str) -> None:
    """Remove a temporary directory (never following symlinks), ignoring failures."""
    if TRANSFER_MARKER not in os.path.basename(path):
        return  # only ever a transfer's own temporary directory
    shutil.rmtree(path, ignore_errors=True)
