"""Step 1 of a restore: list, verify and read every level the restore uses.

The levels of the checkpoint tree that the restore uses are listed; a symlink or special
file anywhere is refused unopened. Where a level has a manifest (ckptable wrote it), the
listing must match it and every file is read and checked against its size and checksum;
the parent's manifest pins each component directory's manifest. A level ckptable wrote
without a manifest is an unfinished save and is refused; a level RLlib wrote has none and
is restored unverified. See :mod:`ckptable._restore` for the whole pipeline.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ckptable._components import (
    is_actor_manager,
    is_ckptable_object,
    validate_component_name,
)
from ckptable._formats import (
    Codec,
    accepts_buffers,
    codec_for_suffix,
    decodes_untrusted,
    get_codec,
    reads_whole,
)
from ckptable._layout import (
    DEFAULT_CLASS_FILE,
    DEFAULT_METADATA_FILE,
    DEFAULT_STATE_FILE,
    is_state_version,
    read_metadata_file,
    record_of,
)
from ckptable._manifest import (
    MANIFEST_FILE,
    LevelManifest,
    check_listing,
    read_manifest,
    read_verified,
    read_verified_view,
    refuse_special_entries,
    require_manifest_unless_foreign,
)
from ckptable._pickle_scan import ScannedPickle, read_pickle_verified
from ckptable._restore_session import KEEP_TOTAL_BYTES, Level, RestoreOptions, RestoreSession
from ckptable._storage import Storage
from ckptable._verify import verify_tree
from ckptable.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    InvalidComponentNameError,
    UnsafeCheckpointError,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "check_restorable",
    "check_state_version",
    "read_level",
    "refuse_foreign_in_safe_mode",
    "state_file_of",
]

logger = logging.getLogger("ckptable")


def read_level(
    session: RestoreSession,
    directory: str,
    obj: Any | None,
    metadata_file: str | None = None,
    expected_manifest: tuple[str, str] | None = None,
    read_ahead: bool = False,
) -> Level:
    """Step 1 for the level at ``directory`` and every level below it that is used: list,
    verify, read the metadata and find the state file (decoded later, by ``decode_tree``).

    ``obj`` (the object the level will be restored into, if known) supplies the file
    names; without it they come from the level's metadata (found under ``metadata_file``,
    which the parent's record names, or the default name) or RLlib's defaults.
    ``expected_manifest``: the parent manifest's ``(algorithm, checksum)`` of this level's
    manifest.
    """
    storage = session.storage
    if obj is not None and not is_ckptable_object(obj):
        return _check_foreign_level(session, directory, expected_manifest)
    entries = storage.listdir(directory)
    refuse_special_entries(storage, directory, entries)
    if obj is not None:
        session.allowed.add(type(obj))

    manifest = None
    raw: dict[str, bytes] = {}
    big: dict[str, tuple[int, str]] = {}
    if session.options.verify and (MANIFEST_FILE in entries or expected_manifest):
        manifest = read_manifest(storage, directory, expected_manifest)
        raw, big = _verify_files(session, directory, manifest, entries)

    meta_name = getattr(obj, "METADATA_FILE_NAME", None) or metadata_file or DEFAULT_METADATA_FILE
    metadata = None
    if entries.get(meta_name) == "file":
        metadata = read_metadata_file(
            storage, storage.join(directory, meta_name), raw.get(meta_name)
        )
    record = record_of(metadata)
    if obj is not None:
        check_state_version(storage, directory, obj, record)
    if session.options.verify and manifest is None:
        require_manifest_unless_foreign(
            storage, directory, record, entries, meta_name if metadata is not None else None
        )
        session.unverified.append(storage.display(directory))

    try:
        codec, state_name = state_file_of(storage, directory, obj, metadata, record, entries)
    except CorruptCheckpointError:
        if not read_ahead:
            raise
        # Verified (if it has a manifest) but not in ckptable's layout: a component with
        # file names of its own, or code of its own. Read when the component appears.
        _verify_big_files(session, directory, manifest, big, None)
        return Level(directory, metadata, None, {}, deferred=True)
    check_when_decoded = None
    if (
        manifest is not None
        and state_name in big
        and decodes_untrusted(codec)
        and not session.options.mmap
    ):
        # Checksummed by step 2 as it decodes it: the file is read once, not twice.
        check_when_decoded = (big.pop(state_name), manifest.algorithm)
    prepared = _verify_big_files(session, directory, manifest, big, (state_name, codec))

    comps: dict[str, Any] = {}
    if obj is not None and callable(getattr(obj, "get_checkpointable_components", None)):
        comps = dict(obj.get_checkpointable_components())
    children: dict[str, Level] = {}
    for name in _child_names(storage, directory, record, entries, comps):
        child_obj = comps.get(name)
        child_dir = storage.join(directory, name)
        if child_obj is not None:
            check_restorable(session, obj, name, child_obj, child_dir)
        expected = (manifest.algorithm, manifest.dirs[name]) if manifest else None
        if child_obj is None and record is None:
            children[name] = _read_ahead(session, child_dir, expected)
        elif child_obj is None:
            # Listed by ckptable but not (yet) a component: created by set_state.
            children[name] = read_level(
                session,
                child_dir,
                None,
                _metadata_file_hint(record, name),
                expected,
                read_ahead=True,
            )
        else:
            children[name] = read_level(
                session, child_dir, child_obj, _metadata_file_hint(record, name), expected
            )
    if manifest is not None:
        # Directories the manifest pins that no component reads (written by a save
        # override, say): verified too, so that nothing in the tree goes unchecked.
        for name, digest in manifest.dirs.items():
            if name not in children:
                verify_tree(
                    storage,
                    storage.join(directory, name),
                    (manifest.algorithm, digest),
                    read_unverified=False,
                )
    subdirs = frozenset(name for name, kind in entries.items() if kind == "dir")
    return Level(
        directory,
        metadata,
        None,
        children,
        subdirs=subdirs,
        state_file=state_name,
        codec=codec,
        raw_state=prepared if prepared is not None else raw.get(state_name),
        read_ahead=read_ahead,
        verified=manifest is not None,
        check_when_decoded=check_when_decoded,
    )


def _metadata_file_hint(record: dict[str, Any] | None, name: str) -> str | None:
    """The metadata file name the parent's record gives for component ``name`` (a class
    may rename it), if it gives a plain file name; else None (the default is used)."""
    hints = (record or {}).get("component_metadata_files")
    hint = hints.get(name) if isinstance(hints, dict) else None
    if not isinstance(hint, str) or not hint or "/" in hint or "\\" in hint or "\0" in hint:
        return None
    return None if hint in (".", "..") else hint


def _check_foreign_level(
    session: RestoreSession, directory: str, expected_manifest: tuple[str, str] | None
) -> Level:
    """A component restored by code other than ckptable's (RLlib's own classes, say)
    reads its files itself: they are only verified here, whole subtree, not decoded."""
    storage = session.storage
    if session.options.verify:
        report = verify_tree(storage, directory, expected_manifest, read_unverified=False)
        session.unverified.extend(report.unverified)
    else:
        refuse_special_entries(storage, directory, storage.listdir(directory))
    return Level(directory, None, None, {})


def _verify_files(
    session: RestoreSession,
    directory: str,
    manifest: LevelManifest,
    entries: dict[str, Any],
) -> tuple[dict[str, bytes], dict[str, tuple[int, str]]]:
    """Check the listing and every small file of a level.

    Returns the small files' bytes, and the big files (name → manifest entry), left for
    ``_verify_big_files`` once the state file is known: that one is verified as it is
    read for decoding.
    """
    storage = session.storage
    check_listing(storage, directory, manifest, entries)
    kept: dict[str, bytes] = {}
    big: dict[str, tuple[int, str]] = {}
    for name, expected in manifest.files.items():
        # Pickles with a recorded skeleton hold big arrays: read in the one pass that
        # verifies them, straight into the arrays (not kept as bytes, then copied).
        if name in manifest.skeletons or not session.keep(expected[0]):
            big[name] = expected
            continue
        data = read_verified(
            storage, storage.join(directory, name), expected, manifest.algorithm, keep=True
        )
        if data is not None:
            kept[name] = data
    return kept, big


def _verify_big_files(
    session: RestoreSession,
    directory: str,
    manifest: LevelManifest | None,
    big: dict[str, tuple[int, str]],
    state_file: tuple[str, Codec] | None,
) -> ScannedPickle | bytes | memoryview | None:
    """Verify the big files of a level; the state file in the same pass that reads it for
    decoding: a pickle's big arrays straight into their final memory (or mapped, with
    ``mmap=True``); the bytes of a codec that decodes from memory anyway (``reads_whole``:
    msgpack) kept. Returns that state file's scan or bytes, if there are any."""
    if manifest is None:
        return None
    storage = session.storage
    prepared: ScannedPickle | bytes | memoryview | None = None
    for name, expected in big.items():
        path = storage.join(directory, name)
        if state_file is not None and name == state_file[0] and reads_whole(state_file[1]):
            prepared = read_verified_view(storage, path, expected, manifest.algorithm)
        elif state_file is not None and name == state_file[0] and accepts_buffers(state_file[1]):
            prepared = read_pickle_verified(
                storage,
                path,
                expected,
                manifest.algorithm,
                skeleton=manifest.skeletons.get(name),
                mmap=session.options.mmap,
                skeleton_limit=KEEP_TOTAL_BYTES,
            )
        else:
            read_verified(storage, path, expected, manifest.algorithm, keep=False)
    return prepared


def check_restorable(
    session: RestoreSession, parent: Any, name: str, comp: Any, directory: str
) -> None:
    if is_actor_manager(comp):
        return  # its actors restore themselves, with the caller's options
    if not callable(getattr(comp, "restore_from_path", None)):
        raise CheckpointError(
            f"Component {name!r} of {type(parent).__name__} is a {type(comp).__name__}, "
            "which has no restore_from_path(); components must be Checkpointable (or "
            "managers of Ray actors: see ckptable.ray).",
            path=session.storage.display(directory),
            component=name,
        )
    refuse_foreign_in_safe_mode(session.options, comp, session.storage.display(directory), name)


def refuse_foreign_in_safe_mode(
    options: RestoreOptions, comp: Any, shown: str, component: str | None
) -> None:
    if options.safe and not is_ckptable_object(comp):
        raise UnsafeCheckpointError(
            f"Component {component!r} ({type(comp).__module__}.{type(comp).__qualname__}) "
            "is not a ckptable Checkpointable: it restores itself with its own code, which "
            "safe=True cannot restrict.",
            path=shown,
            component=component,
        )


def _read_ahead(
    session: RestoreSession, directory: str, expected_manifest: tuple[str, str] | None
) -> Level:
    """Read a level RLlib wrote for a component the object does not have (yet).

    It may appear during the parent's ``set_state``; or it is a stale directory that
    RLlib's in-place saves leave behind, which RLlib ignores. A level that does not read
    (file names of a class of its own, code that is gone) is deferred: read when such a
    component appears, ignored otherwise.
    """
    try:
        return read_level(session, directory, None, None, expected_manifest, read_ahead=True)
    except UnsafeCheckpointError:
        raise
    except CheckpointError:
        storage = session.storage
        if expected_manifest is not None or storage.kind(storage.join(directory, MANIFEST_FILE)):
            raise  # a verified level that fails is damaged, not foreign
        return Level(directory, None, None, {}, deferred=True)


def state_file_of(
    storage: Storage,
    directory: str,
    obj: Any | None,
    metadata: dict[str, Any] | None,
    record: dict[str, Any] | None,
    entries: dict[str, Any],
) -> tuple[Codec, str]:
    """Which state file the level has, and the codec that reads it."""
    shown = storage.display(directory)
    if record is not None:
        name = record.get("state_file")
        try:
            codec = get_codec(str(record.get("format")))
        except CheckpointError as exc:
            raise IncompatibleCheckpointError(f"{shown}: {exc}", path=shown) from exc
        if not isinstance(name, str) or entries.get(name) != "file":
            raise CorruptCheckpointError(
                f"The state file {name!r} recorded in the metadata of {shown} is missing.",
                path=shown,
            )
        return codec, name
    base = getattr(obj, "STATE_FILE_NAME", None) or (metadata or {}).get("state_file")
    base = base if isinstance(base, str) else DEFAULT_STATE_FILE
    # RLlib's rule: the msgpack file wins if present, else the pickle file.
    for suffix in (".msgpack", ".pkl"):
        found = codec_for_suffix(suffix)
        if found is not None and entries.get(base + suffix) == "file":
            return found, base + suffix
    raise CorruptCheckpointError(
        f"The checkpoint level {shown} has no state file {base}.pkl or {base}.msgpack.",
        path=shown,
    )


def _child_names(
    storage: Storage,
    directory: str,
    record: dict[str, Any] | None,
    entries: dict[str, Any],
    comps: dict[str, Any],
) -> list[str]:
    shown = storage.display(directory)
    if record is not None:
        names = record.get("components", [])
        if not isinstance(names, list):
            raise CorruptCheckpointError(
                f"Bad component list in the metadata of {shown}.", path=shown
            )
        for name in names:
            try:
                validate_component_name(name, path=shown)
            except InvalidComponentNameError as exc:
                raise CorruptCheckpointError(str(exc), path=shown, component=str(name)) from exc
            if entries.get(name) != "dir":
                raise CorruptCheckpointError(
                    f"The component directory {storage.display(storage.join(directory, name))} "
                    "recorded in the checkpoint's metadata is missing.",
                    path=shown,
                    component=name,
                )
        return list(names)
    # Written by RLlib: every component directory of the object, plus any other
    # directory that looks like a checkpoint level (a component that may appear later).
    names = []
    for name, kind in entries.items():
        if kind != "dir":
            continue
        if (
            name in comps
            or storage.kind(storage.join(directory, name, DEFAULT_CLASS_FILE)) == "file"
        ):
            names.append(name)
    return names


def _stored_state_version(storage: Storage, directory: str, record: dict[str, Any] | None) -> int:
    """The ``STATE_VERSION`` a level was saved with (1 if none is recorded: RLlib's)."""
    version = (record or {}).get("state_version", 1)
    if not is_state_version(version):
        shown = storage.display(directory)
        raise CorruptCheckpointError(
            f"The metadata of {shown} records a bad state version {version!r}.", path=shown
        )
    return version


def check_state_version(
    storage: Storage, directory: str, obj: Any, record: dict[str, Any] | None
) -> tuple[int, int]:
    """The level's stored and ``obj``'s current ``STATE_VERSION``; refuses a level saved by
    newer code than ``obj``'s class (before anything is set)."""
    stored = _stored_state_version(storage, directory, record)
    cls = type(obj)
    current = getattr(cls, "STATE_VERSION", 1)
    if stored > current:
        shown = storage.display(directory)
        raise IncompatibleCheckpointError(
            f"{shown} holds state version {stored} of {cls.__module__}.{cls.__qualname__}, "
            f"newer than version {current} this code knows: restore it with the newer code.",
            path=shown,
        )
    return stored, current
