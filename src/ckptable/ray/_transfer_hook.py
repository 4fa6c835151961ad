"""The transfer hook's contract: the :class:`TransferHook` protocol, the receipt a hook
may return, and the check that a hook meets the protocol, made the moment a hook is
handed over rather than mid-save."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Protocol, TypeVar, runtime_checkable

__all__ = ["TransferHook", "TransferReceipt", "check_transfer_hook"]

_Hook = TypeVar("_Hook")


@dataclasses.dataclass(frozen=True)
class TransferReceipt:
    """What a transfer wrote, as its writer saw the bytes it wrote.

    ``files`` maps the path of every file, relative to ``dst_path`` (``/``-separated,
    decoded as ``os.fsdecode`` does), to its size and its ``algorithm`` checksum. A hook
    that returns one lets a save check a moved actor component against the manifest the
    actor reported without reading every file again; a hook that returns None gets its
    tree read and checked instead. The built-in hooks return one.
    """

    algorithm: str
    files: Mapping[str, tuple[int, str]]


@runtime_checkable
class TransferHook(Protocol):
    """Moves a directory tree between Ray nodes.

    ``transfer`` copies the tree ``src_path`` on node ``src_node_id`` to ``dst_path`` on
    node ``dst_node_id`` (Ray node ids, hex, as ``ray.get_runtime_context().get_node_id()``
    gives them). ``dst_path`` must not exist yet; its parent directories are created.
    The tree must appear at ``dst_path`` complete or not at all, and any failure must
    raise :class:`~ckptable.errors.TransferError` and leave nothing at ``dst_path``.
    It returns None, or a :class:`TransferReceipt` of what it wrote.
    """

    def transfer(
        self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str
    ) -> TransferReceipt | None:
        """Copy the tree ``src_path`` on ``src_node_id`` to ``dst_path`` on ``dst_node_id``."""
        ...


def check_transfer_hook(hook: _Hook) -> _Hook:
    """Return ``hook`` if it can serve as a :class:`TransferHook`, else raise TypeError.

    Checked when a hook is handed over (``set_default_transfer``, ``transfer=``), so
    that a wrong one fails there and not after a save has written its components.
    """
    expected = "transfer(src_node_id, src_path, dst_node_id, dst_path) -> None"
    if isinstance(hook, type):
        raise TypeError(
            f"{hook.__qualname__} is a class; a transfer hook is an instance with a method "
            f"{expected}: pass {hook.__qualname__}(...)."
        )
    method = getattr(hook, "transfer", None)
    if not callable(method):
        raise TypeError(f"{hook!r} is not a transfer hook: it has no callable method {expected}.")
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return hook  # no signature to inspect (a builtin): trust it
    try:
        signature.bind("src_node_id", "src_path", "dst_node_id", "dst_path")
    except TypeError as exc:
        raise TypeError(
            f"{hook!r} is not a transfer hook: its method transfer{signature} cannot be "
            f"called as {expected} ({exc})."
        ) from None
    return hook
