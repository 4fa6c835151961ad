"""Progress bars for long saves, restores, verifications, conversions and transfers.

**One operation, one bar.** The outermost operation (``save_to_path``,
``restore_from_path``, ``from_checkpoint``, ``verify_checkpoint``, ``convert_checkpoint``,
a transfer hook called directly) decides whether there is a bar and records it in a
context variable. Everything below it (components saved through their own
``save_to_path``, the transfers of actor components, the verification inside a restore)
counts into that bar with :func:`advance` and never opens one of its own, also when the
outermost operation decided on none. A thread starts with an empty context, so two saves
in two threads (an async save, say) each get their own bar.

**When.** ``progress=None`` (auto) shows a bar only if stderr is a terminal; ``True`` also
when it is not; ``False`` never. The environment variable ``CKPTABLE_PROGRESS`` sets what
None means (``0``/``off``/``false``, ``1``/``on``/``true``, ``auto``); an explicit argument
wins over it. A bar appears only once its operation has run for :data:`DELAY_SECONDS`
(tqdm's ``delay``), so short operations never flash one.

**What.** Bytes, counted where the pipelines move them anyway: per chunk of a big file
and per small file, never per byte. With no bar, counting is one context-variable lookup;
with one, counts are summed and handed to tqdm at most every :data:`_FLUSH_SECONDS` or
:data:`_FLUSH_BYTES`, so that thousands of small files do not make thousands of tqdm
updates.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import IO, Any, TypeVar

__all__ = [
    "DELAY_SECONDS",
    "ENV_VAR",
    "Bar",
    "advance",
    "counted",
    "counted_open",
    "current",
    "mark",
    "progress_bar",
    "rewind",
    "uncounted",
]

#: The environment variable that sets what ``progress=None`` means.
ENV_VAR = "CKPTABLE_PROGRESS"
#: Seconds an operation runs before its bar appears (tests lower it).
DELAY_SECONDS = 1.0

#: Counts are handed to tqdm once this much is pending, or this long after the last time.
_FLUSH_BYTES = 1 << 20
_FLUSH_SECONDS = 0.05

_INSTALL_HINT = "pip install 'ckptable[progress]'"
_ON = frozenset({"1", "on", "true"})
_OFF = frozenset({"0", "off", "false"})
_AUTO = frozenset({"", "auto"})

_S = TypeVar("_S")


class Bar:
    """The bar of one operation: a ``tqdm`` counting bytes."""

    def __init__(self, bar: Any, *, has_total: bool = False) -> None:
        self._bar = bar
        self._has_total = has_total
        #: Counted, not yet handed to tqdm.
        self._pending = 0
        self._flush_at = 0.0

    @property
    def count(self) -> int:
        """Bytes counted so far."""
        return int(self._bar.n) + self._pending

    def update(self, n: int) -> None:
        """Count ``n`` more bytes (negative: take back bytes counted twice)."""
        self._pending += n
        if abs(self._pending) >= _FLUSH_BYTES or time.monotonic() >= self._flush_at:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, 0
        self._flush_at = time.monotonic() + _FLUSH_SECONDS
        if pending:
            self._bar.update(pending)

    def set_count(self, n: int) -> None:
        """Make the count ``n`` (after work that is counted otherwise, or repeated)."""
        self._pending += n - self.count
        self._flush()

    def set_total(self, total: int | None) -> None:
        """The bytes the operation will count in all (None: unknown, no percentage)."""
        self._bar.total = total
        self._has_total = total is not None

    def add_to_total(self, n: int) -> None:
        """``n`` more bytes will be counted than the total said (a transfer inside a
        restore); nothing if the bar has no total."""
        if self._has_total:
            self._bar.total += n

    def close(self) -> None:
        self._flush()
        bar, now = self._bar, time.time()
        if bar.last_print_t < bar.start_t + bar.delay <= now:
            # It outlasted the delay but counted nothing since (its last seconds went
            # to flushing or set_state, say): its line still shows what it did.
            bar.refresh()
            bar.last_print_t = now
        bar.close()


#: The bar that counts in this context (None: nothing counts) ...
_current: contextvars.ContextVar[Bar | None] = contextvars.ContextVar(
    "ckptable_progress", default=None
)
#: ... and whether an operation is in progress, which decided on it (with or without).
_in_operation: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ckptable_in_operation", default=False
)


@contextlib.contextmanager
def progress_bar(
    progress: bool | None, description: str, *, total: int | None = None
) -> Iterator[Bar | None]:
    """Open the bar of a new operation; close it at the end, also after an exception
    (which passes through unchanged).

    Yields the bar if this call opened one, else None: when no bar is wanted, or inside
    another operation (what is counted then goes to that operation's bar, if it has one).
    ``total``: bytes the operation will count, if known (0: known to grow, by
    :meth:`Bar.add_to_total`).

    Raises:
        TypeError: ``progress`` is not True, False or None.
        ImportError: ``progress=True`` and tqdm is not installed.
    """
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, not {progress!r}")
    if _in_operation.get():
        yield None
        return
    bar = _open(progress, description, total)
    with _operation(bar):
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()


@contextlib.contextmanager
def _operation(bar: Bar | None) -> Iterator[None]:
    """Inside, ``bar`` counts and no other bar opens."""
    token, inside = _current.set(bar), _in_operation.set(True)
    try:
        yield
    finally:
        _in_operation.reset(inside)
        _current.reset(token)


def current() -> Bar | None:
    """The bar that counts for the operation in progress in this context, if any."""
    return _current.get()


def advance(n: int) -> None:
    """Count ``n`` bytes in the current operation's bar (nothing without one)."""
    bar = _current.get()
    if bar is not None:
        bar.update(n)


def mark() -> int:
    """The current bar's count, to :func:`rewind` to before work is done again."""
    bar = _current.get()
    return bar.count if bar is not None else 0


def rewind(count: int) -> None:
    """Set the current bar's count back to ``count`` (from :func:`mark`)."""
    bar = _current.get()
    if bar is not None:
        bar.set_count(count)


def uncounted() -> contextlib.AbstractContextManager[None]:
    """Count nothing inside (work whose bytes are counted otherwise), and open no bar."""
    return _operation(None)


def counted(stream: _S) -> _S:
    """``stream`` (binary, readable), counting what is read from it into the current
    bar; ``stream`` itself if there is none."""
    if current() is None:
        return stream
    return _CountingReader(stream)  # type: ignore[return-value]


@contextlib.contextmanager
def counted_open(opened: contextlib.AbstractContextManager[IO[bytes]]) -> Iterator[IO[bytes]]:
    """A stream opened by ``opened``, read with :func:`counted`."""
    with opened as stream:
        yield counted(stream)


class _CountingReader:
    """A read-only binary stream that counts the bytes read through it (any other
    attribute is the wrapped stream's, ``fileno`` included: a reader that goes around
    it to the file descriptor counts what it reads itself, as ``counts_reads`` asks)."""

    counts_reads = True

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def read(self, size: int | None = -1) -> bytes:
        data: bytes = self._stream.read(size)
        advance(len(data))
        return data

    def readinto(self, buffer: Any) -> int | None:
        n: int | None = self._stream.readinto(buffer)
        if n:
            advance(n)
        return n

    def readline(self, size: int | None = -1) -> bytes:
        data: bytes = self._stream.readline(size)
        advance(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._stream, name)
        if name == "payload_view":  # (reads without read(): see _storage_filebuffer)

            def payload_view(n: int) -> Any:
                view = found(n)
                if view is not None:
                    advance(n)
                return view

            return payload_view
        if name == "rest_view":

            def rest_view(take: bool) -> Any:
                view = found(take)
                advance(len(view))
                return view

            return rest_view
        return found


def _open(progress: bool | None, description: str, total: int | None) -> Bar | None:
    """A bar as ``progress`` and the environment ask (None if none is wanted)."""
    setting = progress if progress is not None else _environment_setting()
    if setting is False or (setting is None and not _stderr_is_terminal()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        if progress:
            raise ImportError(
                f"progress=True needs tqdm, which is not installed: {_INSTALL_HINT}"
            ) from None
        if setting:
            warnings.warn(
                f"{ENV_VAR}={os.environ.get(ENV_VAR)} asks for progress bars, but tqdm is "
                f"not installed: {_INSTALL_HINT}",
                stacklevel=5,
            )
        return None
    # The bar follows the terminal's size; tqdm prints nothing at all on one that reports
    # no size (a pseudo-terminal nobody sized: 0 x 0), so that one gets 80 x 24.
    sized = _terminal_columns() > 0
    bar = tqdm(
        desc=description,
        total=total,
        unit="B",
        unit_scale=True,
        delay=DELAY_SECONDS,
        dynamic_ncols=sized,
        ncols=None if sized else 80,
        nrows=None if sized else 24,
        leave=True,
    )
    return Bar(bar, has_total=total is not None)


def _environment_setting() -> bool | None:
    """``CKPTABLE_PROGRESS``: True (always), False (never) or None (auto, also unset).
    An unknown value warns and counts as auto: a typo must not break a save."""
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value not in _AUTO:
        warnings.warn(
            f"Ignoring {ENV_VAR}={raw!r}: use 1/on/true (always show progress bars), "
            "0/off/false (never) or auto (on a terminal; the default).",
            stacklevel=5,
        )
    return None


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a terminal, no fileno, closed
        return 0


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
