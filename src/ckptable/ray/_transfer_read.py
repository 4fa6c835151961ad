"""The source side of a transfer: the tree listed, then read into a stream.

The stream: ("listing", version, algorithm, entries), then chunks (buffers), then
("end", checksums, total_bytes). Paths are bytes (any name the OS allows, also those
that are not UTF-8); a directory is listed before its contents.
"""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Iterator
from typing import Any

from ckptable._manifest import new_checksum
from ckptable.errors import TransferError

_STREAM_VERSION = 1
_DIR, _FILE = "d", "f"
_OPEN_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _listed_bytes(entries: Any) -> int:
    """The bytes of the files a listing's ``entries`` announce (0 if they are malformed:
    the writer refuses them then)."""
    try:
        return sum(
            size
            for _, kind, size in entries
            if kind == _FILE and isinstance(size, int) and size > 0
        )
    except (TypeError, ValueError):
        return 0


def _stream_tree(root: str, chunk_bytes: int, algorithm: str | None) -> Iterator[Any]:
    """Yield the stream of the tree ``root``: listing, chunks, checksums.

    All files' contents go back to back through one reused buffer; a chunk is yielded
    when the buffer is full (so small files share one). Yielding the same buffer again
    is safe because each item is serialized (or written, locally) before the generator
    resumes; were it not, the checksums would tell. A file that changes size while it
    is read is an error.
    """
    root_b = os.fsencode(root)
    if not stat.S_ISDIR(os.stat(root_b).st_mode):
        raise TransferError(f"{root} is not a directory")
    entries = _list_tree(root_b)
    yield ("listing", _STREAM_VERSION, algorithm, entries)
    files = [(rel, size) for rel, kind, size in entries if kind == _FILE]
    total = sum(size for _, size in files)
    capacity = min(chunk_bytes, total) or 1
    view = memoryview(bytearray(capacity))
    used = 0
    checksums: list[str] = []
    for rel, size in files:
        path = root_b + b"/" + rel
        fd = os.open(path, _OPEN_READ)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                raise TransferError(f"{os.fsdecode(path)} changed while it was transferred")
            checksum = new_checksum(algorithm) if algorithm else None
            remaining = size
            while remaining:
                if used == capacity:
                    yield pickle.PickleBuffer(view)
                    used = 0
                piece = view[used : used + min(remaining, capacity - used)]
                count = os.readv(fd, [piece])
                if count == 0:
                    raise TransferError(f"{os.fsdecode(path)} shrank while it was transferred")
                if checksum is not None:
                    checksum.update(piece[:count])
                used += count
                remaining -= count
            if os.read(fd, 1):
                raise TransferError(f"{os.fsdecode(path)} grew while it was transferred")
        finally:
            os.close(fd)
        checksums.append(checksum.hexdigest() if checksum is not None else "")
    if used:
        yield pickle.PickleBuffer(view[:used])
    yield ("end", checksums, total)


def _list_tree(root: bytes) -> list[tuple[bytes, str, int]]:
    """``(relative path, kind, size)`` of everything under ``root``, each directory
    before its contents, names sorted; a symlink or special file is an error."""
    entries: list[tuple[bytes, str, int]] = []
    pending = [b""]
    while pending:
        directory = pending.pop()
        with os.scandir(root + b"/" + directory if directory else root) as scan:
            children = sorted(scan, key=lambda entry: entry.name)
        subdirectories = []
        for child in children:
            rel = directory + b"/" + child.name if directory else child.name
            mode = child.stat(follow_symlinks=False).st_mode
            if b"\\" in child.name:
                raise TransferError(
                    f"{os.fsdecode(child.path)}: names with a backslash are not transferred"
                )
            if stat.S_ISDIR(mode):
                entries.append((rel, _DIR, 0))
                subdirectories.append(rel)
            elif stat.S_ISREG(mode):
                entries.append((rel, _FILE, child.stat(follow_symlinks=False).st_size))
            else:
                raise TransferError(
                    f"{os.fsdecode(child.path)} is {_describe_mode(mode)}; only regular files "
                    "and directories are transferred"
                )
        pending.extend(reversed(subdirectories))
    return entries


def _describe_mode(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
