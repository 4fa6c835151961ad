"""Out-of-band pickle buffers that are views of downloaded memory, and the check that
each became an array.

The pickle walk hands a big ``BYTEARRAY8`` payload to the decoder as a buffer of its
own (``pickle.load(..., buffers=...)``). Read from a local file, that buffer is a new
``bytearray``, exactly what pickle itself would have made. Downloaded whole from an
object store, it is a writable ``memoryview`` of the download
(``_storage_filebuffer``), which saves a copy of every byte. For numpy's arrays, which
protocol 5 writes as such payloads and rebuilds with ``_frombuffer``, that makes no
difference. A ``bytearray`` value of the state, pickled the same way, would come back a
``memoryview``, though: so the decoders note each buffer numpy's ``_frombuffer``
takes (:func:`note_array_buffer`), and :func:`decode_with_views` decodes once more,
with ``bytearray`` copies, where a view went anywhere else.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "FROMBUFFER",
    "decode_with_views",
    "is_view",
    "note_array_buffer",
    "watched",
    "watching",
]

_T = TypeVar("_T")

#: Where pickle finds numpy's ``_frombuffer`` (numpy 1 and numpy 2).
FROMBUFFER = frozenset(
    {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
)

_taken: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar(
    "ckptable_buffer_views", default=None
)


def is_view(buffer: Any) -> bool:
    """Whether ``buffer`` is a writable view (not a ``bytearray``, nor a mapped file's
    read-only view, which ``mmap=True`` hands out as such on purpose)."""
    return isinstance(buffer, memoryview) and not buffer.readonly


def note_array_buffer(buffer: Any) -> None:
    """numpy's ``_frombuffer`` is given ``buffer`` in the decode being watched."""
    taken = _taken.get()
    if taken is not None:
        taken.add(id(buffer))


def watching() -> bool:
    """Whether a decode is being watched here (:func:`decode_with_views` with views):
    only then need numpy's ``_frombuffer`` be :func:`watched` (a call per array)."""
    return _taken.get() is not None


def watched(frombuffer: Callable[..., Any]) -> Callable[..., Any]:
    """``frombuffer`` (numpy's ``_frombuffer``), noting the buffer it gets."""

    def _frombuffer(buffer: Any, *args: Any, **kwargs: Any) -> Any:
        note_array_buffer(buffer)
        return frombuffer(buffer, *args, **kwargs)

    return _frombuffer


def decode_with_views(decode: Callable[[list[Any]], _T], buffers: list[Any]) -> _T:
    """``decode(buffers)``; where a writable view among ``buffers`` did not go to numpy's
    ``_frombuffer`` (a ``bytearray`` value, or a reconstructor that takes only a
    ``bytearray``), ``decode`` again with every view copied into a ``bytearray``, the
    objects pickle itself would have made. Also when the first decode failed that way:
    then the error raised is the second decode's, if it fails too."""
    if not any(is_view(buffer) for buffer in buffers):
        return decode(buffers)
    taken: set[int] = set()
    token = _taken.set(taken)
    try:
        decoded = decode(buffers)
    except Exception:
        if all(id(buffer) in taken for buffer in buffers if is_view(buffer)):
            raise
        decoded = _NOT_DECODED
    finally:
        _taken.reset(token)
    if decoded is not _NOT_DECODED and all(
        id(buffer) in taken for buffer in buffers if is_view(buffer)
    ):
        return decoded
    del decoded
    return decode([bytearray(buffer) if is_view(buffer) else buffer for buffer in buffers])


_NOT_DECODED: Any = object()
