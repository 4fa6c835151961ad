"""``convert_checkpoint``: rewrite a whole checkpoint tree's state files in another format.

RLlib's ``convert_to_msgpack_checkpoint`` builds the Algorithm to save it again; this
works on the files alone, for any tree ckptable or RLlib wrote, in either direction and
for any registered codec. The source is verified first; each level's state file is
decoded with its own codec and encoded with the new one; every other file is copied
as is (the class files stay pickles, as in RLlib's msgpack checkpoints); ckptable's
record in ``metadata.json`` is updated. The result is published like a save: staged,
given manifests, made durable, then renamed into place (``dst`` may be ``src``).

Progress: one bar while the source is verified, one while it is converted; both count
the source's bytes (a re-encoded state file counts as the file it was read from), so
their total is the size the source's root manifest records.
"""

from __future__ import annotations

import json
import shutil
import warnings
from typing import Any

from ckptable._formats import (
    Codec,
    accepts_buffers,
    get_codec,
    locate_unencodable,
    registered_codecs,
)
from ckptable._info import verify_tree
from ckptable._layout import DEFAULT_METADATA_FILE, RECORD_KEY, read_metadata_file, record_of
from ckptable._manifest import MANIFEST_FILE, manifest_tree_bytes, refuse_special_entries
from ckptable._progress import advance, progress_bar, uncounted
from ckptable._restore import RestoreOptions, decode_file, require_directory, state_file_of
from ckptable._save import _SaveSession, publish_tree
from ckptable._storage import Storage, resolve_storage
from ckptable.errors import (
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
) -> str:
    """Write a copy of the checkpoint at ``src`` to ``dst`` with every state in ``format``.

    Args:
        src: The checkpoint to convert (written by ckptable or RLlib).
        dst: Where to write the converted checkpoint; replaced whole if it is a
            checkpoint already. May be ``src`` itself.
        format: Name of a registered codec (``"msgpack"``, ``"cloudpickle"``).
        filesystem: A ``pyarrow.fs`` or fsspec filesystem for both paths.
        safe: Decode the source's pickle states with the restricted unpickler.
        durable: As in ``save_to_path``.
        progress: Show progress bars (bytes, rate, percentage) for the verification of
            ``src`` and for the conversion, as ``save_to_path`` does: None when stderr
            is a terminal.

    Returns:
        ``dst`` as ``save_to_path`` returns paths.

    Raises:
        StateEncodingError: a value cannot be held by ``format``; the message names the
            component and the key path (``state['optimizer']['schedule']``).
        CorruptCheckpointError: ``src`` is damaged (verified before anything is written).
    """
    codec = get_codec(format)
    src_storage, src_root = resolve_storage(src, filesystem)
    dst_storage, dst_root = resolve_storage(dst, filesystem)
    require_directory(src_storage, src_root)
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
        _convert_level(session, src_storage, src_root, session.staging_root, options, None)

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


def _convert_level(
    session: _SaveSession,
    src_storage: Storage,
    src_dir: str,
    dst_dir: str,
    options: RestoreOptions,
    metadata_file: str | None,
) -> None:
    """Convert one directory: its state file re-encoded, the rest copied; then below it."""
    entries = src_storage.listdir(src_dir)
    refuse_special_entries(src_storage, src_dir, entries)
    meta_name = metadata_file or DEFAULT_METADATA_FILE
    metadata = None
    raw_metadata = b""
    if entries.get(meta_name) == "file":
        meta_path = src_storage.join(src_dir, meta_name)
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
    new_codec = session.codec
    stem = state_name[: -len(old_codec.suffix)] if state_name and old_codec else None
    # Stale state files of another format beside the one in use (RLlib leaves them
    # when a level is saved again in another format) are left out.
    stale = {stem + suffix for suffix in _suffixes()} - {state_name} if stem else set()

    dst_storage = session.storage
    if dst_dir != session.staging_root:
        dst_storage.mkdir(dst_dir)
    for name, kind in sorted(entries.items()):
        src_path = src_storage.join(src_dir, name)
        if name == MANIFEST_FILE or name in stale:
            continue
        if kind == "dir":
            hints = (record or {}).get("component_metadata_files", {})
            hint = hints.get(name) if isinstance(hints, dict) else None
            _convert_level(
                session,
                src_storage,
                src_path,
                dst_storage.join(dst_dir, name),
                options,
                hint if isinstance(hint, str) else None,
            )
        elif name == state_name and old_codec is not None and stem is not None:
            state = decode_file(src_storage, src_path, old_codec, None, options, count_reads=True)
            with uncounted():  # counted as it was read
                _write_state(session, dst_storage.join(dst_dir, stem + new_codec.suffix), state)
        elif name == meta_name and record is not None and stem is not None:
            assert metadata is not None
            converted = dict(metadata)
            converted[RECORD_KEY] = {
                **record,
                "format": new_codec.name,
                "state_file": stem + new_codec.suffix,
            }
            with uncounted():
                session.write_bytes(
                    dst_storage.join(dst_dir, name), json.dumps(converted).encode("utf-8")
                )
            advance(len(raw_metadata))
        else:
            with (
                src_storage.open_read(src_path) as source,
                session.open_write(dst_storage.join(dst_dir, name)) as target,
            ):
                shutil.copyfileobj(source, target, 8 << 20)
    session.seal(dst_dir)


def _write_state(session: _SaveSession, path: str, state: Any) -> None:
    codec = session.codec
    try:
        with session.open_write(path, pickled=accepts_buffers(codec)) as stream:
            codec.dump(state, stream)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        where = locate_unencodable(codec, state)
        component = session.component_path(session.storage.split(path)[0])
        raise StateEncodingError(
            f"Cannot convert {session.describe(session.storage.split(path)[0])} to "
            f"{codec.name}: {where} cannot be encoded ({exc}).",
            path=session.target,
            component=component,
        ) from exc


def _suffixes() -> set[str]:
    return {codec.suffix for codec in registered_codecs().values()}
