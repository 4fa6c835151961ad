"""The storages other than the local disk: any ``pyarrow.fs`` filesystem and any fsspec
filesystem, as a :class:`~ckptable._storage.Storage`.

Both are thin adapters over the library's own calls, with what they share in
``_RemoteStorage``: ``/``-separated paths, no directory rename (the commit step writes
in place, the root manifest last), no locks, nothing to flush. Neither library is
imported here: the filesystem objects come from the user or from ``resolve_storage``,
and ``pyarrow.fs`` is imported only where its types are needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import threading
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

from ckptable._positioned import read_fully
from ckptable._storage_concurrent import DEFAULT_REMOTE_CONCURRENCY, SPILL_BYTES
from ckptable._storage_filebuffer import copy_into
from ckptable._storage_s3fs import DIRECT_PUT_BYTES, MAX_PUT_BYTES, s3_requests

if TYPE_CHECKING:
    from ckptable._storage import EntryKind

__all__ = ["FsspecStorage", "PyArrowStorage"]


class _RemoteStorage:
    """What the storages other than the local disk share: ``/``-separated paths, no
    directory rename, no locks, nothing to flush (closing a stream commits it, as an
    object store's PUT does)."""

    # Object stores have no directory rename: the commit step writes in place there,
    # the root manifest last. Filesystems that could rename (a SubTreeFileSystem over
    # the local disk) are treated the same: without flock and O_NOFOLLOW here, the
    # staging-and-recovery scheme could not tell a crashed save from a running one.
    can_rename_dirs = False
    #: Requests a save or restore runs at once (see :mod:`ckptable._storage_concurrent`).
    io_concurrency = DEFAULT_REMOTE_CONCURRENCY

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
        # Object stores have no directories: a prefix exists once an object is under it.
        # pyarrow's create_dir writes a marker object there (a listing, a HEAD and a PUT
        # per level), which nothing needs.
        self._object_store = getattr(filesystem, "type_name", "") in _OBJECT_STORE_TYPES
        self._writer: Any = None

    def _write_filesystem(self) -> Any:
        """The filesystem to write with: the user's, or on S3 a copy of it that opens
        output streams lazily (``allow_delayed_open``), so that a small file is one
        ``PutObject`` instead of a multipart upload's three requests."""
        if self._writer is None:
            with _WRITER_LOCK:  # asked for by a save's pool threads at once
                if self._writer is None:
                    self._writer = _delayed_open_copy(self.filesystem)
        return self._writer

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

    def list_tree(self, path: str) -> list[tuple[str, str, int]]:
        """Everything below ``path`` in one recursive listing: ``(path, kind, size)``
        (one ``LIST`` per thousand objects on S3); empty if nothing is there."""
        import pyarrow.fs

        try:
            infos = self.filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [(info.path, self._kind(info) or "other", int(info.size or 0)) for info in infos]

    @contextlib.contextmanager
    def ranged(self, path: str) -> Iterator[Callable[[int, int], bytes]]:
        """``read_at(offset, length)`` on one open file, callable from many threads at
        once (pyarrow's ``ReadAt`` is thread-safe: on S3, one ranged GET each; the open
        is one HEAD)."""
        with self.filesystem.open_input_file(path) as stream:
            # A pyarrow Buffer (no copy): the reader copies it once, into its target.
            yield lambda offset, length: stream.read_at(length, offset)

    @contextlib.contextmanager
    def ranged_into(self, path: str) -> Iterator[Callable[[int, memoryview], int]]:
        """``read_into(offset, view)``: fill ``view`` with the file's bytes from
        ``offset`` (fewer at its end; returns how many), callable from many threads at
        once. pyarrow's ``readinto`` writes the response body straight into ``view`` (on
        S3 one ranged GET, without an intermediate copy); a reading position per open
        file, so each concurrent call has a file of its own (each open is one HEAD)."""
        idle: list[Any] = []
        opened: list[Any] = []
        lock = threading.Lock()

        def read_into(offset: int, view: memoryview) -> int:
            with lock:
                stream = idle.pop() if idle else None
            if stream is None:
                stream = self.filesystem.open_input_file(path)
                with lock:
                    opened.append(stream)
            try:
                stream.seek(offset)
                return read_fully(stream.readinto, view)
            finally:
                with lock:
                    idle.append(stream)

        try:
            yield read_into
        finally:
            for stream in opened:
                with contextlib.suppress(Exception):
                    stream.close()

    def makedirs(self, path: str) -> None:
        if not self._object_store:
            self.filesystem.create_dir(path, recursive=True)

    def mkdir(self, path: str) -> None:
        if not self._object_store:
            self.filesystem.create_dir(path, recursive=False)

    def write_bytes(self, path: str, data: bytes) -> None:
        with self._write_filesystem().open_output_stream(path) as stream:
            stream.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.open_read(path) as stream:
            return stream.read()

    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self._write_filesystem().open_output_stream(path)  # type: ignore[no-any-return]

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


_WRITER_LOCK = threading.Lock()

#: ``type_name`` of the pyarrow filesystems that are object stores (no directories).
_OBJECT_STORE_TYPES = frozenset({"s3", "gcs"})


def _delayed_open_copy(filesystem: Any) -> Any:
    """``filesystem`` with ``allow_delayed_open`` on, where it is an S3 filesystem that
    has it off (pyarrow rebuilds it from its own pickling arguments); else itself."""
    reduce = getattr(filesystem, "__reduce__", None)
    if getattr(filesystem, "type_name", "") != "s3" or reduce is None:
        return filesystem
    try:
        rebuild, (options, *rest) = reduce()
        if not isinstance(options, dict) or options.get("allow_delayed_open", True):
            return filesystem
        return rebuild({**options, "allow_delayed_open": True}, *rest)
    except Exception:  # another pyarrow's arguments: keep the user's filesystem
        return filesystem


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
        # s3fs: big files go up from, and come down into, the pipeline's own memory
        # (see ckptable._storage_s3fs); None for the other filesystems.
        self._s3 = s3_requests(filesystem)

    @property
    def takes_bytes(self) -> bool:
        """Whether ``write_bytes`` wants ``bytes``, not the ``bytearray`` the concurrent
        writes hold a file in: true for fsspec filesystems other than s3fs, whose
        clients may copy any other buffer again (botocore, under s3fs's ``pipe_file``,
        copied a ``bytearray`` body more than once: with ``tracemalloc``, one 64 MiB
        ``pipe_file`` on the S3 test server took 187 MiB of new memory for a
        ``bytearray``, 64-76 MiB for ``bytes``). s3fs is sent the held memory itself
        (:meth:`~ckptable._storage_s3fs.S3Requests.put`)."""
        return self._s3 is None

    @property
    def stream_bytes(self) -> int:
        """Files up to this size are written in one call (``pipe_file``: one request
        below two upload chunks, as s3fs itself does); longer ones stream through
        ``open`` (a multipart upload). See :mod:`ckptable._storage_concurrent`."""
        chunk = getattr(self.filesystem, "default_block_size", None)
        return 2 * chunk - 1 if isinstance(chunk, int) and chunk > 0 else SPILL_BYTES

    @property
    def _max_put(self) -> int:
        return min(self.stream_bytes, MAX_PUT_BYTES)

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

    def list_tree(self, path: str) -> list[tuple[str, str, int]]:
        """Everything below ``path`` in one recursive listing (``find``): ``(path, kind,
        size)``; empty if nothing is there."""
        self.filesystem.invalidate_cache(path)
        own = path.rstrip("/")
        try:
            found = self.filesystem.find(path, withdirs=True, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        entries: list[tuple[str, str, int]] = []
        for info in found.values():
            name = info["name"].rstrip("/")
            if name == own:
                if info.get("type") == "directory" or info["name"].endswith("/"):
                    continue
                return []  # a file: not a tree
            kind = _fsspec_kind(info, False) or "other"
            entries.append((name, kind, int(info.get("size") or 0)))
        return entries

    @contextlib.contextmanager
    def ranged(self, path: str) -> Iterator[Callable[[int, int], bytes]]:
        """``read_at(offset, length)``: one ranged read (``cat_file``) per call, callable
        from many threads at once."""
        yield lambda offset, length: bytes(
            self.filesystem.cat_file(path, start=offset, end=offset + length)
        )

    @contextlib.contextmanager
    def ranged_into(self, path: str) -> Iterator[Callable[[int, memoryview], int]]:
        """``read_into(offset, view)``: one ranged read into ``view``; returns the bytes
        filled (fewer at the file's end). Callable from many threads at once. On s3fs
        the response body is read into ``view`` as it arrives; elsewhere ``cat_file``'s
        bytes are copied into it (numpy's copy, without the GIL, where numpy is there)."""
        direct = self._s3
        if direct is not None:
            yield lambda offset, view: direct.read_into(path, offset, view)
            return

        def read_into(offset: int, view: memoryview) -> int:
            data = self.filesystem.cat_file(path, start=offset, end=offset + len(view))
            return copy_into(view, data)

        yield read_into

    def makedirs(self, path: str) -> None:
        if not self._bucketed:
            self.filesystem.makedirs(path, exist_ok=True)

    def mkdir(self, path: str) -> None:
        if not self._bucketed:
            self.filesystem.mkdir(path, create_parents=False)

    def write_bytes(self, path: str, data: bytes) -> None:
        direct = self._s3
        if direct is not None and DIRECT_PUT_BYTES <= len(data) <= self._max_put:
            # From ``data``'s own memory in one PutObject (as ``pipe_file`` sends a file
            # below two of its chunks; longer ones go as its multipart upload).
            direct.put(path, data)
        elif direct is not None and type(data) is not bytes:
            self.filesystem.pipe_file(path, bytes(data))
        else:
            self.filesystem.pipe_file(path, data)

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.filesystem.cat_file(path))

    def read_sized(self, path: str, size: int) -> bytes:
        """The file at ``path``, whose size a listing gave: one GET of ``size`` bytes
        (s3fs asks for the size first when it is not given one)."""
        if size == 0:
            return self.read_bytes(path)
        return bytes(self.filesystem.cat_file(path, start=0, end=size))

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
