"""The destination side of a transfer: a stream validated and written into the
temporary directory, every file's size and checksum compared with the reader's, and the
receipt of what was written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ckptable._manifest import new_checksum
from ckptable.errors import TransferError
from ckptable.ray._transfer_hook import TransferReceipt
from ckptable.ray._transfer_read import _DIR, _FILE, _STREAM_VERSION

_OPEN_WRITE = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def _write_tree(
    items: Iterator[Any], root: str, algorithm: str | None, *, compare: bool = True
) -> TransferReceipt | None:
    """Write the stream ``items`` into the existing, empty directory ``root``; return
    the receipt of what was written (None without ``algorithm``).

    The listing is validated whole before anything is created; each file is opened with
    ``O_EXCL | O_NOFOLLOW`` inside directories this function created, so nothing is
    written outside ``root``. Every file is checksummed (``algorithm``) as it is
    written, and with ``compare`` its size and checksum are compared with the reader's
    (without: a reader in this process that shares the writer's buffers, which sends no
    checksums).
    """
    header = next(items, None)
    if (
        not isinstance(header, (tuple, list))
        or len(header) != 4
        or header[0] != "listing"
        or header[1] != _STREAM_VERSION
    ):
        raise TransferError(f"the stream does not start with a listing: {_preview(header)}")
    if compare and header[2] != algorithm:
        raise TransferError(f"the reader used checksum {header[2]!r}, not {algorithm!r}")
    root_b = os.fsencode(root)
    files: list[tuple[bytes, int]] = []
    for path, kind, size in _validated_members(header[3], root_b):
        if kind == _DIR:
            os.mkdir(path, 0o755)
        else:
            files.append((path, size))
    sink = _FileSink(files, algorithm)
    try:
        end: Any = None
        for item in items:
            if end is not None:
                raise TransferError(f"the stream goes on after its end: {_preview(item)}")
            if isinstance(item, (tuple, list)):
                end = item
                continue
            sink.write(_as_bytes_view(item))
        if (
            not isinstance(end, (tuple, list))
            or len(end) != 3
            or end[0] != "end"
            or not isinstance(end[1], (tuple, list))
        ):
            raise TransferError(f"the stream ended without its end record: {_preview(end)}")
        sink.finish(list(end[1]) if compare else None, end[2])
    finally:
        sink.close()
    return sink.receipt(root_b)


def _validated_members(entries: Any, root: bytes) -> list[tuple[bytes, str, int]]:
    """The listing as ``(absolute path, kind, size)``, after checking every entry; a bad
    one is an error, before anything is created."""
    if not isinstance(entries, (tuple, list)):
        raise TransferError(f"the listing is not a list: {_preview(entries)}")
    directories: set[bytes] = set()
    seen: set[bytes] = set()
    members: list[tuple[bytes, str, int]] = []
    prefix = root + b"/"
    for entry in entries:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise TransferError(f"bad listing entry {_preview(entry)}")
        rel, kind, size = entry
        problem = _member_problem(rel)
        if problem is None and rel in seen:
            problem = "listed twice"
        parent = rel.rpartition(b"/")[0] if problem is None else b""
        if problem is None and parent and parent not in directories:
            problem = "its directory is not listed before it"
        if problem is None and kind not in (_DIR, _FILE):
            problem = f"unknown kind {kind!r}"
        if (
            problem is None
            and kind == _FILE
            and (isinstance(size, bool) or not isinstance(size, int) or size < 0)
        ):
            problem = f"bad size {size!r}"
        path = prefix + rel if problem is None else b""
        if problem is None and not os.path.normpath(path).startswith(prefix):
            problem = "it leads outside the destination"
        if problem is not None:
            raise TransferError(f"refused member path {rel!r}: {problem}")
        seen.add(rel)
        if kind == _DIR:
            directories.add(rel)
        members.append((path, kind, size if kind == _FILE else 0))
    return members


def _member_problem(rel: Any) -> str | None:
    """Why ``rel`` is not a plain relative path inside the tree, or None if it is."""
    if not isinstance(rel, bytes):
        return "not bytes"
    if not rel:
        return "empty"
    if b"\x00" in rel:
        return "contains NUL"
    if b"\\" in rel:
        return "contains a backslash"
    if rel.startswith(b"/"):
        return "absolute"
    if any(part in (b"", b".", b"..") for part in rel.split(b"/")):
        return "an empty, '.' or '..' part"
    return None


class _FileSink:
    """Writes the back-to-back contents of ``files`` as chunks arrive, one file open at
    a time, and checks each file's size and checksum."""

    def __init__(self, files: list[tuple[bytes, int]], algorithm: str | None) -> None:
        self._files = files
        self._algorithm = algorithm
        self._next = 0
        self._fd = -1
        self._remaining = 0
        self._checksum: Any = None
        self._checksums: list[str] = []
        self._written = 0
        self._open_empty_files()

    def _open_next(self) -> None:
        path, size = self._files[self._next]
        self._next += 1
        self._fd = os.open(path, _OPEN_WRITE, 0o644)
        self._remaining = size
        self._checksum = new_checksum(self._algorithm) if self._algorithm else None
        if size == 0:
            self._close_current()

    def _close_current(self) -> None:
        os.close(self._fd)
        self._fd = -1
        checksum = self._checksum
        self._checksums.append(checksum.hexdigest() if checksum is not None else "")

    def _open_empty_files(self) -> None:
        """Create the files of size 0 that come next (they get no bytes)."""
        while self._fd < 0 and self._next < len(self._files) and self._files[self._next][1] == 0:
            self._open_next()

    def write(self, data: memoryview) -> None:
        while data:
            if self._fd < 0:
                if self._next == len(self._files):
                    raise TransferError("the stream holds more data than the listed files")
                self._open_next()
            piece = data[: self._remaining]
            if self._checksum is not None:
                self._checksum.update(piece)
            try:
                while piece:
                    written = os.write(self._fd, piece)
                    piece = piece[written:]
            except OSError as exc:
                path = os.fsdecode(self._files[self._next - 1][0])
                raise TransferError(f"writing {path} failed: {exc.strerror or exc}") from exc
            taken = min(self._remaining, len(data))
            self._remaining -= taken
            self._written += taken
            data = data[taken:]
            if self._remaining == 0:
                self._close_current()
                self._open_empty_files()

    def finish(self, checksums: list[Any] | None, total: Any) -> None:
        """Check that every file is complete and, unless ``checksums`` is None, that the
        reader's checksums are the writer's."""
        if self._fd >= 0 or self._next < len(self._files):
            current = self._files[self._next - 1 if self._fd >= 0 else self._next][0]
            raise TransferError(
                f"the stream ended early, after {self._written} bytes of {total} "
                f"(in file {self._next} of {len(self._files)}: {os.fsdecode(current)})"
            )
        if total != self._written:
            raise TransferError(
                f"the reader sent {total} bytes, the writer received {self._written}"
            )
        if checksums is not None and checksums != self._checksums:
            for (path, _), sent, got in zip(self._files, checksums, self._checksums, strict=False):
                if sent != got:
                    raise TransferError(
                        f"checksum mismatch for {os.fsdecode(path)}: sent {sent!r}, "
                        f"received {got!r}"
                    )
            raise TransferError(
                f"the reader sent {len(checksums)} checksums for {len(self._files)} files"
            )

    def receipt(self, root: bytes) -> TransferReceipt | None:
        """What was written, by path relative to ``root`` (after :meth:`finish`)."""
        if not self._algorithm:
            return None
        start = len(root) + 1
        return TransferReceipt(
            self._algorithm,
            {
                os.fsdecode(path[start:]): (size, checksum)
                for (path, size), checksum in zip(self._files, self._checksums, strict=True)
            },
        )

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _as_bytes_view(item: Any) -> memoryview:
    """A chunk as a flat byte view, without copying."""
    try:
        view = memoryview(item)
    except TypeError:
        raise TransferError(f"the stream holds {_preview(item)} where a chunk belongs") from None
    if not view.c_contiguous:
        raise TransferError("the stream holds a non-contiguous chunk")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _preview(item: Any) -> str:
    text = (
        repr(item) if not isinstance(item, (bytes, bytearray, memoryview)) else type(item).__name__
    )
    return text if len(text) <= 200 else text[:200] + "..."
