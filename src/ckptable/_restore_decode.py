"""Step 2 of a restore: decode the state files read in step 1.

Only when the whole tree is verified are the state files decoded, with the restricted
unpickler in safe mode. Any failure to decode a file, whatever the decoder raised, ends
as a :mod:`ckptable.errors` exception naming the file — before any ``set_state``.
"""

from __future__ import annotations

import io
import logging
import pickle
from typing import TYPE_CHECKING, Any

from ckptable._buffer_views import decode_with_views
from ckptable._checksums import VerifyingReader
from ckptable._components import (
    force_list,
)
from ckptable._formats import Codec, accepts_buffers, accepts_tensors, maps_files
from ckptable._manifest import (
    MANIFEST_FILE,
    open_regular,
    read_manifest,
    read_verified,
    require_manifest_unless_foreign,
)
from ckptable._pickle_scan import ScannedPickle, map_pickle, read_pickle_unverified
from ckptable._positioned import MemoryReader
from ckptable._progress import counted_open
from ckptable._restore_session import KEEP_TOTAL_BYTES, Level, RestoreOptions, RestoreSession
from ckptable._storage import LocalStorage, Storage
from ckptable._torch_placement import TensorPlacement
from ckptable.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "decode_file",
    "decode_tree",
    "parse_class_record",
    "read_class_file",
]

logger = logging.getLogger("ckptable")


def decode_tree(session: RestoreSession, level: Level) -> None:
    """Step 2: decode the state of ``level`` and of every level below it."""
    if level.deferred:
        return
    for child in level.children.values():
        decode_tree(session, child)
    if level.codec is None:
        return
    path = session.storage.join(level.path, level.state_file)
    mapped = False
    try:
        if level.raw_state is None and accepts_buffers(level.codec):
            if session.options.mmap:
                level.raw_state = map_pickle(session.storage, path)  # unverified: mapped as is
            elif not level.verified:
                # No manifest vouches for it (RLlib's levels, verify=False): read in the
                # bounded scan, every length checked against the file before allocating.
                level.raw_state = read_pickle_unverified(
                    session.storage, path, skeleton_limit=KEEP_TOTAL_BYTES
                )
        elif level.raw_state is None and session.options.mmap:
            # A codec that maps its files itself (safetensors): step 1 verified the file
            # whole (if it had a manifest); its data is mapped here, not read again.
            mapped = maps_files(level.codec) and isinstance(session.storage, LocalStorage)
        state = decode_file(
            session.storage,
            path,
            level.codec,
            level.raw_state,
            session.options,
            allowed=session.allowed,
            count_reads=not level.verified or level.check_when_decoded is not None,
            tensors=session.tensor_placement(),
            mapped=mapped,
            check=level.check_when_decoded,
        )
    except CheckpointError:
        if not level.read_ahead:
            raise
        level.deferred, level.children = True, {}
        return
    finally:
        level.raw_state = None
    if not isinstance(state, dict):
        shown = session.storage.display(path)
        if level.read_ahead:
            level.deferred, level.children = True, {}
            return
        raise CorruptCheckpointError(
            f"{shown} holds a {type(state).__name__}, not a state dict.", path=shown
        )
    level.state = state


def decode_file(
    storage: Storage,
    path: str,
    codec: Codec,
    raw: bytes | memoryview | ScannedPickle | None,
    options: RestoreOptions,
    *,
    allowed: set[type] | frozenset[type] = frozenset(),
    allow_subclasses_of: type | None = None,
    count_reads: bool = False,
    tensors: TensorPlacement | None = None,
    mapped: bool = False,
    check: tuple[tuple[int, str], str] | None = None,
) -> Any:
    """Decode one file (from ``raw`` if step 1 kept its bytes or scanned it); errors name
    the file. ``count_reads``: count what is read from the file in the progress bar (a
    file no manifest verified, which step 1 did not read). ``tensors``: the restore's
    placement of torch tensors (``map_location``), which counts the tensors moved to the
    CPU for the restore's one warning; without it, one made from
    ``options.map_location`` warns for this file alone. ``mapped``: decode with the
    codec's ``load_mapped`` (``mmap=True``; ``path`` is a local file). ``check``: the
    file's manifest record ``((size, checksum), algorithm)``, checked as it is decoded
    (a codec safe on unverified bytes; the state is returned only if it matched)."""
    shown = storage.display(path)
    extra: dict[str, Any] = {}
    own_placement = tensors is None and accepts_tensors(codec)
    if accepts_tensors(codec):
        extra["tensors"] = tensors if tensors is not None else TensorPlacement(options.map_location)

    def decode(buffers: list[Any] | None) -> Any:
        if buffers is not None:
            extra["buffers"] = iter(buffers)
        return _decode(storage, path, codec, raw, options, shown, extra, allowed,
                       allow_subclasses_of, count_reads, mapped, check)  # fmt: skip

    if isinstance(raw, ScannedPickle):
        state = decode_with_views(decode, raw.buffers)
    else:
        state = decode(None)
    if own_placement:
        extra["tensors"].warn(stacklevel=4)  # the caller of from_checkpoint, say
    return state


def _decode(
    storage: Storage,
    path: str,
    codec: Codec,
    raw: bytes | memoryview | ScannedPickle | None,
    options: RestoreOptions,
    shown: str,
    extra: dict[str, Any],
    allowed: set[type] | frozenset[type],
    allow_subclasses_of: type | None,
    count_reads: bool,
    mapped: bool = False,
    check: tuple[tuple[int, str], str] | None = None,
) -> Any:
    """:func:`decode_file`'s body: every failure becomes an error naming the file."""
    try:
        if mapped:
            opened = open_regular(storage, path)
        else:
            opened = _open_source(storage, path, raw, count_reads)
        with opened as opened_stream:
            stream: Any = opened_stream
            if mapped and (not options.safe or hasattr(codec, "load_restricted")):
                # load_mapped runs no code the file names (the protocol's contract).
                return codec.load_mapped(stream, **extra)  # type: ignore[attr-defined]
            checked = None
            if check is not None and raw is None:
                # A codec safe on unverified bytes (decodes_untrusted): checksummed as
                # it is decoded, the state returned only if the file matched.
                checked = _verifying(stream, check, storage, path, shown)
                stream = checked
            if not options.safe:
                state = codec.load(stream, **extra)
            else:
                load_restricted = getattr(codec, "load_restricted", None)
                if load_restricted is None:
                    raise UnsafeCheckpointError(
                        f"{shown}: the {codec.name!r} format has no restricted loader, so "
                        "it cannot be loaded with safe=True.",
                        path=shown,
                    )
                state = load_restricted(
                    stream,
                    allowed=allowed,
                    allow_subclasses_of=allow_subclasses_of,
                    source=shown,
                    **extra,
                )
            if checked is not None:
                checked.finish()
            return state
    except CheckpointError as exc:
        if exc.path is None:
            exc.path = shown
        raise
    except (ImportError, AttributeError) as exc:
        raise IncompatibleCheckpointError(
            f"Cannot load {shown}: it refers to code this Python environment lacks ({exc}).",
            path=shown,
        ) from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"Cannot read {shown}: {exc}", path=shown) from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        MemoryError,
        OverflowError,
        UnicodeDecodeError,
    ) as exc:
        raise CorruptCheckpointError(
            f"{shown} is truncated or corrupt ({type(exc).__name__}: {exc}).", path=shown
        ) from exc
    except RecursionError as exc:
        raise CorruptCheckpointError(
            f"{shown} nests its data too deeply to decode ({exc}).", path=shown
        ) from exc
    except Exception as exc:
        # Whatever else decoding raised (a decoder's own error types; in a crafted or
        # damaged pickle, any exception a called function raises): the file is at fault.
        raise CorruptCheckpointError(
            f"{shown} cannot be decoded ({type(exc).__name__}: {exc}).", path=shown
        ) from exc


def _verifying(
    stream: Any, check: tuple[tuple[int, str], str], storage: Storage, path: str, shown: str
) -> VerifyingReader:
    """``stream`` checksummed as it is read, against the manifest record ``check``."""
    expected, algorithm = check

    def reread() -> None:
        read_verified(storage, path, expected, algorithm, keep=False)

    return VerifyingReader(stream, expected, algorithm, shown, reread)


def _open_source(
    storage: Storage, path: str, raw: bytes | memoryview | ScannedPickle | None, count_reads: bool
) -> Any:
    if isinstance(raw, ScannedPickle):
        return raw.open()
    if isinstance(raw, memoryview):
        return _HeldBytes(raw)
    if raw is not None:
        return io.BytesIO(raw)
    if count_reads:
        return counted_open(storage.open_read(path))
    return storage.open_read(path)


class _HeldBytes(MemoryReader):
    """A read-only stream over a file's verified bytes held as a ``memoryview`` (of the
    memory an object store's file was fetched into): ``rest_view()``, as a file fetched
    whole has it, gives a decoder that takes a buffer those bytes without a copy (the
    msgpack codec); ``read`` copies, as any stream's."""

    def rest_view(self, take: bool) -> memoryview:
        """The bytes from the position to the end (the position moves there)."""
        rest = self._data[self._pos :]
        self._pos = len(self._data)
        return rest


def read_class_file(
    storage: Storage, root: str, class_file: str, options: RestoreOptions
) -> bytes | None:
    """The class file's bytes, verified against the root manifest (None if unverified)."""
    if not options.verify:
        return None
    entries = storage.listdir(root)
    name = storage.split(class_file)[1]
    if MANIFEST_FILE not in entries:
        require_manifest_unless_foreign(storage, root, None, entries)
        return None
    manifest = read_manifest(storage, root)
    expected = manifest.files.get(name)
    if expected is None:
        shown = storage.display(class_file)
        raise CorruptCheckpointError(
            f"{shown} is not listed in the checkpoint's manifest.", path=shown
        )
    return read_verified(storage, class_file, expected, manifest.algorithm, keep=True)


def parse_class_record(info: Any, shown: str) -> tuple[type, list[Any], dict[str, Any]]:
    try:
        ctor = info["class"]
        args, ctor_kwargs = info["ctor_args_and_kwargs"]
        ctor_kwargs = dict(ctor_kwargs or {})
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"{shown} does not hold a class and its constructor arguments.", path=shown
        ) from exc
    if not isinstance(ctor, type):
        raise CorruptCheckpointError(f"{shown} names {ctor!r}, which is not a class.", path=shown)
    return ctor, force_list(args), ctor_kwargs
