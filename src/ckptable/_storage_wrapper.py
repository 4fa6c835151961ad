"""A storage that hands every call to another one: the base of the wrappers the
pipelines put around a storage for one save or restore
(:class:`~ckptable._storage_concurrent.ConcurrentWrites`,
:class:`~ckptable._storage_prefetch.PrefetchedReads`), which override the calls they
change and inherit the rest.

A wrapper pickles as the storage it wraps (what travels to a Ray actor is the storage,
not the pool of one save or restore).
"""

from __future__ import annotations

import contextlib
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptable._storage import EntryKind, Storage

__all__ = ["StorageWrapper"]


class StorageWrapper:
    """Every :class:`~ckptable._storage.Storage` call, handed to ``inner``."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.can_rename_dirs = inner.can_rename_dirs

    def join(self, base: str, *names: str) -> str:
        return self.inner.join(base, *names)

    def split(self, path: str) -> tuple[str, str]:
        return self.inner.split(path)

    def display(self, path: str) -> str:
        return self.inner.display(path)

    def kind(self, path: str, *, follow_symlinks: bool = False) -> EntryKind:
        return self.inner.kind(path, follow_symlinks=follow_symlinks)

    def listdir(self, path: str) -> dict[str, EntryKind]:
        return self.inner.listdir(path)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def makedirs(self, path: str) -> None:
        self.inner.makedirs(path)

    def mkdir(self, path: str) -> None:
        self.inner.mkdir(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        self.inner.write_bytes(path, data)

    def read_bytes(self, path: str) -> bytes:
        return self.inner.read_bytes(path)

    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self.inner.open_write(path)

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self.inner.open_read(path)

    def remove_tree(self, path: str) -> None:
        self.inner.remove_tree(path)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        return self.inner.exchange(a, b)

    def fsync(self, path: str) -> None:
        self.inner.fsync(path)

    def syncfs(self, path: str) -> bool:
        return self.inner.syncfs(path)

    def lock_directory(self, path: str, *, blocking: bool = False) -> Any:
        return self.inner.lock_directory(path, blocking=blocking)

    def unlock(self, handle: Any) -> None:
        self.inner.unlock(handle)

    def age_seconds(self, path: str) -> float:
        return self.inner.age_seconds(path)

    def identity(self, path: str) -> Any:
        return self.inner.identity(path)

    def is_abandoned(self, path: str) -> bool:
        return self.inner.is_abandoned(path)

    def user_filesystem(self) -> Any:
        return self.inner.user_filesystem()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inner_of, (self.inner,))


def _inner_of(storage: Storage) -> Storage:
    return storage
