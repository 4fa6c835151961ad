""":class:`LocalCopyTransfer`: the same reader and writer as the default hook, joined in
the calling process, for one node or nodes that share a filesystem."""

from __future__ import annotations

from ckptable._manifest import preferred_algorithm
from ckptable._progress import advance, current, progress_bar
from ckptable.ray._transfer_hook import TransferReceipt
from ckptable.ray._transfer_job import _Job, _receive_tree
from ckptable.ray._transfer_progress import _checked_progress, _counting
from ckptable.ray._transfer_read import _stream_tree
from ckptable.ray._transfer_write import _write_tree

__all__ = ["LocalCopyTransfer"]

_MiB = 1 << 20


class LocalCopyTransfer:
    """Copy the tree with plain file I/O in the calling process.

    For transfers within one node, or between nodes that share a filesystem (NFS and
    the like), where ``src_path`` is readable and ``dst_path`` writable from here. The
    node ids are not compared: nodes that share a filesystem have different ids, and only
    the caller knows which paths they share. Same contract as the other built-ins
    (temporary sibling and rename, symlinks and special files refused, TransferError),
    and the same reader and writer as :class:`RayObjectStoreTransfer`, joined by a
    generator instead of the object store. The writer checksums what it writes, for the
    receipt it returns (nothing to compare: both ends see the same buffer).

    Args:
        progress: A progress bar for transfers called directly, as for
            :class:`RayObjectStoreTransfer`.
    """

    #: Size of the one buffer the copy goes through.
    chunk_bytes = 8 * _MiB

    def __init__(self, progress: bool | None = None) -> None:
        self.progress = _checked_progress(progress)

    def __repr__(self) -> str:
        shown = "" if self.progress is None else f"progress={self.progress}"
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return bool(self.progress == other.progress)

    def __hash__(self) -> int:
        return hash((type(self), self.progress))

    def transfer(
        self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str
    ) -> TransferReceipt | None:
        """Copy ``src_path`` to ``dst_path``, both reachable from this process; return
        the receipt of what was written."""
        job = _Job.checked(src_node_id, src_path, dst_node_id, dst_path, one_filesystem=True)

        def write(tmp_path: str) -> TransferReceipt | None:
            items = _stream_tree(job.src_path, self.chunk_bytes, None)
            bar = current()
            if bar is not None:
                items = _counting(items, bar.add_to_total, advance)
            return _write_tree(items, tmp_path, preferred_algorithm(), compare=False)

        with progress_bar(self.progress, "Transferring", total=0):
            return _receive_tree(job, write)
