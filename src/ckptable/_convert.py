"""``convert_checkpoint``: rewrite a whole checkpoint tree's state files in another format.

RLlib's ``convert_to_msgpack_checkpoint`` builds the Algorithm to save it again; this
works on the files alone, for any tree ckptable or RLlib wrote, in either direction and
for any registered codec. The source is verified first; each level's state file is
decoded with its own codec and encoded with the new one; every other file is copied
as is (the class files stay pickles, as in RLlib's msgpack checkpoints); ckptable's
record in ``metadata.json`` is updated. The result is published like a save: staged,
given manifests, made durable, then renamed into place. ``dst`` must be new (or an
empty directory) unless ``overwrite=True``, which replaces only a checkpoint, and it may
not overlap ``src``.

Progress: one bar while the source is verified, one while it is converted; both count
the source's bytes (a re-encoded state file counts as the file it was read from), so
their total is the size the source's root manifest records.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

from ckptable._formats import (
    Codec,
    accepts_buffers,
    explain_unencodable,
    get_codec,
    registered_codecs,
)
from ckptable._info import refuse_non_checkpoint
from ckptable._layout import DEFAULT_METADATA_FILE, RECORD_KEY, read_metadata_file, record_of
from ckptable._manifest import MANIFEST_FILE, manifest_tree_bytes, refuse_special_entries
from ckptable._progress import advance, progress_bar, uncounted
from ckptable._restore import RestoreOptions, decode_file, require_directory, state_file_of
from ckptable._save import _SaveSession, publish_tree
from ckptable._storage import LocalStorage, Storage, resolve_storage
from ckptable._verify import verify_tree
from ckptable.errors import (
    CheckpointError,
    CorruptCheckpointError,
    StateEncodingError,
    UnverifiedCheckpointWarning,
)

__all__ = ["convert_checkpoint"]


def convert_checkpoint(
    src: Any,
    dst: Any,
    *,
    format: str = "msgpack",
    filesystem: Any = None,
    safe: bool = False,
    durable: bool = True,
    progress: bool | None = None,
    overwrite: bool = False,
) -> str:
    """Write a copy of the checkpoint at ``src`` to ``dst`` with every state in ``format``.

    Args:
        src: The checkpoint to convert (written by ckptable or RLlib).
        dst: Where to write the converted checkpoint: a new path or an empty directory.
            Anything else there is refused unless ``overwrite``; even then only a
            checkpoint is replaced (a directory of other files is never deleted). It may
            not be ``src``, lie inside it, or contain it.
        format: Name of a registered codec (``"msgpack"``, ``"cloudpickle"``).
        filesystem: A ``pyarrow.fs`` or fsspec filesystem for both paths.
        safe: Decode the source's pickle states with the restricted unpickler.
        durable: As in ``save_to_path``.
        progress: Show progress bars (bytes, rate, percentage) for the verification of
            ``src`` and for the conversion, as ``save_to_path`` does: None when stderr
            is a terminal.
        overwrite: Replace a checkpoint already at ``dst`` (``ckptable convert --force``).

    Returns:
        ``dst`` as ``save_to_path`` returns paths.

    Raises:
        CheckpointNotFoundError: ``src`` is nothing, a file, an empty directory or a
            ``CheckpointManager``'s directory (convert its checkpoints one by one).
        CheckpointError: ``dst`` exists and is not empty (without ``overwrite``), is not
            a checkpoint (with it), or overlaps ``src``; nothing is written.
        StateEncodingError: a value cannot be held by ``format``; the message names the
            component and the key path (``state['optimizer']['schedule']``).
        CorruptCheckpointError: ``src`` is damaged (verified before anything is written)
            or a file of it cannot be decoded.
        UnsafeCheckpointError: ``src`` holds a symlink or special file, or (``safe``) a
            pickle that needs a class outside the allowlist.
    """
    codec = get_codec(format)
    src_storage, src_root = resolve_storage(src, filesystem)
    dst_storage, dst_root = resolve_storage(dst, filesystem)
    try:
        refuse_non_checkpoint(src_storage, src_root)
    except CheckpointError:
        raise
    except OSError as exc:
        shown = src_storage.display(src_root)
        raise CorruptCheckpointError(f"Cannot read {shown}: {exc}", path=shown) from exc
    require_directory(src_storage, src_root)
    _check_destination(src_storage, src_root, dst_storage, dst_root, overwrite)
    total = manifest_tree_bytes(src_storage, src_root)
    with progress_bar(progress, "Verifying", total=total):
        report = verify_tree(src_storage, src_root)
    if report.unverified:
        warnings.warn(
            UnverifiedCheckpointWarning(
                f"{report.unverified[0]} has no ckptable manifest: converted without an "
                "integrity check.",
                path=report.unverified[0],
            ),
            stacklevel=2,
        )
    options = RestoreOptions(safe=safe)

    def write(session: _SaveSession) -> None:
        _convert_tree(session, src_storage, src_root, options)

    from ckptable._checkpointable import Checkpointable
    from ckptable._layout import checkpoint_file_names

    with progress_bar(progress, "Converting", total=total):
        return publish_tree(
            dst,
            dst_storage,
            dst_root,
            codec,
            durable,
            checkpoint_file_names(Checkpointable),
            write,
        )


def _check_destination(
    src_storage: Storage, src_root: str, dst_storage: Storage, dst_root: str, overwrite: bool
) -> None:
    """Refuse a destination that overlaps the source, or that holds anything (a file, a
    directory that is not empty) unless ``overwrite``. With ``overwrite``, the save
    pipeline's target check still refuses to replace anything but a checkpoint."""
    shown_src, shown_dst = src_storage.display(src_root), dst_storage.display(dst_root)
    overlap = _overlap(src_storage, src_root, dst_storage, dst_root)
    if overlap:
        raise CheckpointError(
            f"Cannot convert {shown_src} to {shown_dst}: the destination {overlap}. "
            "Convert to a new path (then move it into place if you want).",
            path=shown_dst,
        )
    kind = dst_storage.kind(dst_root, follow_symlinks=True)
    if kind is None or overwrite:
        return
    if kind == "dir" and not dst_storage.listdir(dst_root):
        return  # an empty directory: nothing to lose
    what = "a non-empty directory" if kind == "dir" else "a file" if kind == "file" else "there"
    raise CheckpointError(
        f"Cannot convert {shown_src} to {shown_dst}: {shown_dst} already exists ({what}) "
        "and is not replaced unless asked to (overwrite=True; ckptable convert --force). "
        "Even then, only a checkpoint is replaced.",
        path=shown_dst,
    )


def _overlap(src_storage: Storage, src_root: str, dst_storage: Storage, dst_root: str) -> str:
    """How ``dst_root`` overlaps ``src_root`` ("is the source itself", ...), or ``""``.

    Local paths are compared with symlinks resolved; other storages by their URIs.
    """
    if isinstance(src_storage, LocalStorage) and isinstance(dst_storage, LocalStorage):
        src_key = os.path.normcase(os.path.realpath(src_root))
        dst_key = os.path.normcase(os.path.realpath(dst_root))
        sep = os.sep
    elif type(src_storage) is type(dst_storage):
        src_key = src_storage.display(src_root).rstrip("/")
        dst_key = dst_storage.display(dst_root).rstrip("/")
        sep = "/"
    else:
        return ""
    if src_key == dst_key:
        return "is the source itself"
    if dst_key.startswith(src_key.rstrip(sep) + sep):
        return "lies inside the source"
    if src_key.startswith(dst_key.rstrip(sep) + sep):
        return "contains the source (replacing it would delete the source)"
    return ""


def _convert_tree(
    session: _SaveSession, src_storage: Storage, src_root: str, options: RestoreOptions
) -> None:
    """Convert every directory of the source, depth first with an explicit stack (any
    depth works); each is sealed once everything below it is written."""
    # (source directory, staged directory, metadata file hint, its children are done)
    pending: list[tuple[str, str, str | None, bool]] = [
        (src_root, session.staging_root, None, False)
    ]
    while pending:
        src_dir, dst_dir, hint, done = pending.pop()
        if done:
            session.seal(dst_dir)
            continue
        pending.append((src_dir, dst_dir, hint, True))
        below = _convert_level(session, src_storage, src_dir, dst_dir, options, hint)
        pending.extend((*child, False) for child in reversed(below))


def _convert_level(
    session: _SaveSession,
    src_storage: Storage,
    src_dir: str,
    dst_dir: str,
    options: RestoreOptions,
    metadata_file: str | None,
) -> list[tuple[str, str, str | None]]:
    """Convert one directory's files: its state file re-encoded, the rest copied.

    Returns its subdirectories as ``(source, staged directory, metadata file hint)``.
    """
    entries = src_storage.listdir(src_dir)
    refuse_special_entries(src_storage, src_dir, entries)
    meta_name = metadata_file or DEFAULT_METADATA_FILE
    meta_path = src_storage.join(src_dir, meta_name)
    metadata: dict[str, Any] = {}
    raw_metadata = b""
    if entries.get(meta_name) == "file":
        raw_metadata = src_storage.read_bytes(meta_path)
        metadata = read_metadata_file(src_storage, meta_path, raw_metadata)
    record = record_of(metadata)
    old_codec: Codec | None = None
    state_name = None
    try:
        old_codec, state_name = state_file_of(src_storage, src_dir, None, metadata, record, entries)
    except CorruptCheckpointError:
        if record is not None:
            raise
        # Not a checkpoint level (a component's own files): copied as it is.
    if (
        state_name is not None
        and old_codec is not None
        and (not state_name.endswith(old_codec.suffix) or state_name == old_codec.suffix)
    ):
        shown = src_storage.display(meta_path)
        raise CorruptCheckpointError(
            f"{shown} records the state file {state_name!r} in the format "
            f"{old_codec.name!r}, whose files end in {old_codec.suffix!r}.",
            path=shown,
        )
    new_codec = session.codec
    stem = state_name[: -len(old_codec.suffix)] if state_name and old_codec else None
    # Stale state files of another format beside the one in use (RLlib leaves them
    # when a level is saved again in another format) are left out.
    stale = {stem + suffix for suffix in _suffixes()} - {state_name} if stem else set()
    hints = record.get("component_metadata_files") if record else None
    hints = hints if isinstance(hints, dict) else {}

    dst_storage = session.storage
    if dst_dir != session.staging_root:
        dst_storage.mkdir(dst_dir)
    below: list[tuple[str, str, str | None]] = []
    for name, kind in sorted(entries.items()):
        src_path = src_storage.join(src_dir, name)
        if name == MANIFEST_FILE or name in stale:
            continue
        if kind == "dir":
            hint = hints.get(name)
            below.append(
                (src_path, dst_storage.join(dst_dir, name), hint if isinstance(hint, str) else None)
            )
        elif name == state_name and old_codec is not None and stem is not None:
            state = decode_file(src_storage, src_path, old_codec, None, options, count_reads=True)
            with uncounted():  # counted as it was read
                _write_state(
                    session,
                    dst_storage.join(dst_dir, stem + new_codec.suffix),
                    state,
                    src_storage.display(src_path),
                    old_codec.name,
                )
        elif name == meta_name and record is not None and stem is not None:
            converted = dict(metadata)
            converted[RECORD_KEY] = {
                **record,
                "format": new_codec.name,
                "state_file": stem + new_codec.suffix,
            }
            with uncounted():
                session.write_bytes(
                    dst_storage.join(dst_dir, name),
                    _metadata_bytes(src_storage, src_path, converted),
                )
            advance(len(raw_metadata))
        else:
            with (
                src_storage.open_read(src_path) as source,
                session.open_write(dst_storage.join(dst_dir, name)) as target,
            ):
                shutil.copyfileobj(source, target, 8 << 20)
    return below


def _metadata_bytes(storage: Storage, path: str, metadata: dict[str, Any]) -> bytes:
    """The converted metadata as JSON; metadata nested too deeply to write again is a
    ``CorruptCheckpointError`` naming the source file."""
    try:
        return json.dumps(metadata).encode("utf-8")
    except (RecursionError, ValueError, TypeError) as exc:
        shown = storage.display(path)
        raise CorruptCheckpointError(
            f"{shown} cannot be written again as JSON ({type(exc).__name__}: {exc}).",
            path=shown,
        ) from exc


def _write_state(
    session: _SaveSession, path: str, state: Any, source: str, source_format: str
) -> None:
    """Encode the state read from ``source`` (the source's state file, in
    ``source_format``) into ``path``."""
    codec = session.codec
    try:
        with session.open_write(path, pickled=accepts_buffers(codec)) as stream:
            codec.dump(state, stream)  # type: ignore[arg-type]
    except (CheckpointError, OSError):
        raise
    except Exception as exc:  # the encoder's error, for a value it cannot hold
        try:
            what, instead = explain_unencodable(codec, state)
        except Exception:  # a state nested too deeply to walk, say
            what, instead = "a value of the state cannot be encoded", ""
        component = session.component_path(session.storage.split(path)[0])
        level = f"component {component!r}" if component else "the root level"
        advice = (
            f" Keep the checkpoint in {source_format} (it converts as a whole), or have "
            f"the class's get_state {instead} and save the checkpoint again."
            if instead
            else ""
        )
        raise StateEncodingError(
            f"Cannot convert {level} of the checkpoint ({source}) to {codec.name}: {what} "
            f"({type(exc).__name__}: {exc}).{advice} Nothing was written to "
            f"{session.target}.",
            path=source,
            component=component,
        ) from exc


def _suffixes() -> set[str]:
    return {codec.suffix for codec in registered_codecs().values()}
