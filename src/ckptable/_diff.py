"""``ckptable diff``: compare two checkpoints level by level, without building objects.

Each checkpoint is read with the restore pipeline's own steps (``read_level`` lists and
verifies every level against its manifest, ``decode_tree`` decodes the state files) but
with no object to restore into: no class is imported to be constructed, and with
``safe=True`` (the default of the command) the restricted unpickler refuses any pickle
that would import something outside ckptable's allowlist. Then the decoded states of the
levels found in both are compared with ``ckptable._compare.state_differences``
(arrays by shape, dtype and values).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ckptable._compare import Difference, state_differences
from ckptable._info import refuse_non_checkpoint, stored_class_name
from ckptable._layout import DEFAULT_CLASS_FILE, DEFAULT_METADATA_FILE
from ckptable._restore import (
    Level,
    RestoreOptions,
    RestoreSession,
    decode_tree,
    read_level,
    require_directory,
)
from ckptable._storage import Storage, resolve_storage
from ckptable.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["DecodedLevel", "DiffResult", "diff_checkpoints", "format_diff", "load_states"]

#: Metadata file names a root level may have (RLlib's Algorithm renames it).
_METADATA_FILES = (DEFAULT_METADATA_FILE, "rllib_checkpoint.json")


@dataclasses.dataclass(frozen=True)
class DecodedLevel:
    """One level of a checkpoint: where it is, its class and its decoded state."""

    component: str
    path: str
    class_name: str | None
    format: str | None
    state: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DecodedTree:
    """Every level of a checkpoint by component path (``""`` for the root)."""

    path: str
    levels: dict[str, DecodedLevel]
    #: Levels without a manifest (written by RLlib): read, not verified.
    unverified: tuple[str, ...]


def load_states(path: Any, *, safe: bool = True, filesystem: Any = None) -> DecodedTree:
    """Read, verify and decode every level of the checkpoint at ``path``.

    Args:
        path: A checkpoint directory or URI.
        safe: Decode pickles with the restricted unpickler (nothing outside the allowlist
            is imported); False allows any pickle, which runs code from the files.
        filesystem: As in ``restore_from_path``.

    Returns:
        The decoded levels, by component path.

    Raises:
        CheckpointNotFoundError: nothing at ``path``, a file, an empty directory or a
            ``CheckpointManager``'s directory (the message names its newest checkpoint).
        CorruptCheckpointError: a file is damaged, or a level has no state file.
        UnsafeCheckpointError: with ``safe``, a state needs a class outside the allowlist.
    """
    storage, root = resolve_storage(path, filesystem)
    try:
        refuse_non_checkpoint(storage, root)
    except CheckpointError:
        raise
    except OSError as exc:
        shown = storage.display(root)
        raise CorruptCheckpointError(f"Cannot read {shown}: {exc}", path=shown) from exc
    require_directory(storage, root)
    session = RestoreSession(storage, {}, RestoreOptions(safe=safe))
    try:
        level = read_level(session, root, None, _metadata_file(storage, root))
        decode_tree(session, level)
        levels: dict[str, DecodedLevel] = {}
        for component, found in _walk(session, level, ""):
            levels[component] = _decoded(storage, component, found)
    except OSError as exc:
        shown = storage.display(root)
        raise CorruptCheckpointError(
            f"Cannot read the checkpoint {shown}: {exc}", path=shown
        ) from exc
    except RecursionError as exc:
        shown = storage.display(root)
        raise CheckpointError(
            f"The checkpoint {shown} nests its components too deeply to compare with "
            f"Python's recursion limit ({exc}).",
            path=shown,
        ) from exc
    return DecodedTree(storage.display(root), levels, tuple(session.unverified))


def _metadata_file(storage: Storage, directory: str) -> str | None:
    entries = storage.listdir(directory)
    return next((name for name in _METADATA_FILES if entries.get(name) == "file"), None)


def _walk(session: RestoreSession, level: Level, component: str) -> Iterator[tuple[str, Level]]:
    if level.deferred:
        # A level RLlib wrote that was only read ahead and did not decode (it would be
        # restored only if its component appeared): read it again for its real error.
        level = read_level(session, level.path, None, _metadata_file(session.storage, level.path))
        decode_tree(session, level)
    yield component, level
    for name, child in sorted(level.children.items()):
        yield from _walk(session, child, f"{component}/{name}" if component else name)


def _decoded(storage: Storage, component: str, level: Level) -> DecodedLevel:
    record = level.record
    if record is not None and isinstance(record.get("class"), str):
        class_name: str | None = str(record["class"])
    else:
        class_name = stored_class_name(
            storage, level.path, DEFAULT_METADATA_FILE, DEFAULT_CLASS_FILE
        )
    shown = storage.display(level.path)
    if not isinstance(level.state, dict):
        raise CorruptCheckpointError(f"{shown} has no decodable state.", path=shown)
    return DecodedLevel(
        component,
        shown,
        class_name,
        level.codec.name if level.codec is not None else None,
        level.state,
    )


# --------------------------------------------------------------------------- comparing


@dataclasses.dataclass(frozen=True)
class ComponentDifference:
    """A difference inside one component's state (or of its class: kind ``"class"``)."""

    component: str
    difference: Difference


@dataclasses.dataclass(frozen=True)
class DiffResult:
    """What ``ckptable diff A B`` found."""

    a: str
    b: str
    #: Components (paths) only in A / only in B; the topmost of each missing subtree.
    only_in_a: list[str]
    only_in_b: list[str]
    #: Components found in both, compared.
    compared: list[str]
    differences: list[ComponentDifference]
    #: Components whose differences were cut at ``limit``.
    truncated: list[str]
    classes: dict[str, tuple[str | None, str | None]]

    @property
    def equal(self) -> bool:
        """True if both hold the same components with equal states."""
        return not (self.only_in_a or self.only_in_b or self.differences)

    def to_json(self) -> dict[str, Any]:
        """The document ``ckptable diff --json`` prints (keys in ``docs/cli.md``)."""
        return {
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "compared": self.compared,
            "differences": [
                {
                    "component": item.component,
                    "path": item.difference.path,
                    "kind": item.difference.kind,
                    "detail": _detail(item.difference),
                }
                for item in self.differences
            ],
            "truncated": self.truncated,
        }


def diff_checkpoints(
    a: Any,
    b: Any,
    *,
    safe: bool = True,
    rtol: float = 0.0,
    atol: float = 0.0,
    limit: int | None = None,
    filesystem: Any = None,
    warn: Callable[[str], None] | None = None,
) -> DiffResult:
    """Compare the checkpoints ``a`` and ``b`` level by level.

    Args:
        a: The first checkpoint (the "actual" side of each difference).
        b: The second checkpoint.
        safe: Decode with the restricted unpickler (see ``load_states``).
        rtol: Relative tolerance for numbers and arrays.
        atol: Absolute tolerance for numbers and arrays.
        limit: Most differences reported per component; None for all.
        filesystem: As in ``restore_from_path``, for both paths.
        warn: Called with a message when a checkpoint has levels without a manifest.

    Returns:
        The components found in only one of them and every difference of the others.

    Raises:
        UnsafeCheckpointError: with ``safe``, a state needs a class outside the
            allowlist; the message says how to allow it.
    """
    trees = []
    for path in (a, b):
        try:
            tree = load_states(path, safe=safe, filesystem=filesystem)
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(
                f"{exc} (ckptable diff decodes states in safe mode; pass --unsafe to allow "
                "any pickle, which runs code from the files, only for checkpoints you trust)",
                path=exc.path,
                component=exc.component,
            ) from exc
        if tree.unverified and warn is not None:
            warn(
                f"{tree.path}: {len(tree.unverified)} levels have no ckptable manifest "
                "(written by RLlib or another tool): compared without an integrity check"
            )
        trees.append(tree)
    left, right = trees
    only_a = _topmost(c for c in left.levels if c not in right.levels)
    only_b = _topmost(c for c in right.levels if c not in left.levels)
    compared = [c for c in left.levels if c in right.levels]
    differences: list[ComponentDifference] = []
    truncated: list[str] = []
    classes: dict[str, tuple[str | None, str | None]] = {}
    for component in compared:
        mine, theirs = left.levels[component], right.levels[component]
        classes[component] = (mine.class_name, theirs.class_name)
        if mine.class_name != theirs.class_name:
            differences.append(
                ComponentDifference(
                    component,
                    Difference(
                        "class", "class", f"{mine.class_name or '?'} != {theirs.class_name or '?'}"
                    ),
                )
            )
        found = state_differences(
            mine.state, theirs.state, where="state", limit=limit, rtol=rtol, atol=atol
        )
        if limit is not None and len(found) >= limit:
            truncated.append(component)
        differences.extend(ComponentDifference(component, item) for item in found)
    return DiffResult(
        left.path, right.path, only_a, only_b, compared, differences, truncated, classes
    )


def _topmost(components: Iterable[str]) -> list[str]:
    """The given component paths without those inside another one given."""
    found = sorted(components)
    return [c for c in found if not any(c.startswith(other + "/") for other in found)]


def _detail(difference: Difference) -> str:
    """The detail line in the terms of the command (A and B, not actual and expected)."""
    detail = difference.detail
    for old, new in (("only in expected", "only in B"), ("only in actual", "only in A")):
        if detail.startswith(old):
            return new + detail[len(old) :]
    return detail


def format_diff(result: DiffResult) -> str:
    """The text ``ckptable diff`` prints."""
    lines = [f"A: {result.a}", f"B: {result.b}"]
    for component in result.only_in_a:
        lines.append(f"only in A: {component}")
    for component in result.only_in_b:
        lines.append(f"only in B: {component}")
    by_component: dict[str, list[Difference]] = {}
    for item in result.differences:
        by_component.setdefault(item.component, []).append(item.difference)
    for component, found in by_component.items():
        name = component or "(root)"
        class_name = result.classes.get(component, (None, None))[0]
        shown = f"{name} ({class_name})" if class_name else name
        count = f"{len(found)}{'+' if component in result.truncated else ''}"
        lines.append(f"{shown}: {count} difference{'s' if len(found) != 1 else ''}")
        for difference in found:
            lines.append(f"  {difference.path}: {_detail(difference)}")
        if component in result.truncated:
            lines.append(f"  ... stopped after {len(found)} (--limit N shows more, 0 all)")
    differing = len(by_component)
    if result.equal:
        lines.append(f"equal: {len(result.compared)} components, same states")
    else:
        lines.append(
            f"differ: {differing} of {len(result.compared)} components compared differ; "
            f"{len(result.only_in_a)} only in A, {len(result.only_in_b)} only in B"
        )
    return "\n".join(lines)
