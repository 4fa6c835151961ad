"""Moving a directory tree from one Ray node to another: the transfer hook.

A save whose components are Ray actors has each actor write its part on its own node;
those directories then have to reach the node that publishes the checkpoint. A
*transfer hook* does that move. It is one method,
``transfer(src_node_id, src_path, dst_node_id, dst_path)``, so that a cluster with a
shared filesystem, rsync, or an object store can plug in its own (see
:class:`TransferHook`); :func:`check_transfer_hook` checks one the moment it is handed
over, not in the middle of a save.

Built-ins, all with the same contract (``dst_path`` must not exist; its parents are
created; the tree appears there complete or not at all, written under the temporary
sibling ``.<name>.ckptable-transfer-<token>`` and renamed in one step; any failure is a
:class:`~ckptable.errors.TransferError` that leaves neither ``dst_path`` nor the sibling
behind; only regular files and directories are moved, a symlink or special file is
refused):

- :class:`RayObjectStoreTransfer` (the default): streams the files from a task on the
  source node to a task on the destination node, in bounded chunks: over a direct
  connection between the two tasks, set up through Ray, or through Ray's object store
  where none can be made. No size limit and a few chunks of memory, where Ray's own
  ``sync_dir_between_nodes`` packs the whole directory in memory, refuses more than
  1 GiB and extracts tar members without a filter.
- :class:`LocalCopyTransfer`: plain file I/O in the calling process, for one node or
  nodes that share a filesystem.
- :class:`RecordingTransfer`: a test double that records the calls, then delegates or
  fails.

The built-ins return a :class:`TransferReceipt`: every file's size and checksum as their
writer wrote it, which a save compares with the actor's manifest instead of reading the
moved tree again. A custom hook may return None.

Nodes are told apart by Ray node id (hex), never by IP: every node of a
``ray.cluster_utils.Cluster`` (and of several containers on one host) shares one IP.

Progress: the built-ins count the bytes that arrive in the bar of the save or restore
that calls them, or, called directly, in a bar of their own (``progress=``, as in
``save_to_path``), its total from the source's listing.

The steps, one module each, in the order a transfer runs them::

    _transfer_hook       TransferHook (Protocol), TransferReceipt, check_transfer_hook
    _transfer_job        the job: arguments checked, temporary sibling, rename, cleanup
    _transfer_read       on the source: the listing, then the files read into the stream
    _transfer_ray        RayObjectStoreTransfer: the reader and writer tasks
    _transfer_direct     the file contents over a direct connection between the tasks
    _transfer_fetch      the reader's items fetched through the object store
    _transfer_write      on the destination: the stream validated, written and checked
    _transfer_progress   the writer's reports, the driver's bar
    _transfer_local      LocalCopyTransfer: reader and writer joined in this process
    _transfer_recording  RecordingTransfer, the test double
    _transfer            this module: the public names and the process-wide default
"""

from __future__ import annotations

import threading

from ckptable.ray._transfer_hook import TransferHook, TransferReceipt, check_transfer_hook
from ckptable.ray._transfer_job import TRANSFER_MARKER
from ckptable.ray._transfer_local import LocalCopyTransfer
from ckptable.ray._transfer_ray import RayObjectStoreTransfer
from ckptable.ray._transfer_recording import RecordingTransfer, TransferCall

__all__ = [
    "TRANSFER_MARKER",
    "LocalCopyTransfer",
    "RayObjectStoreTransfer",
    "RecordingTransfer",
    "TransferCall",
    "TransferHook",
    "TransferReceipt",
    "check_transfer_hook",
    "get_default_transfer",
    "set_default_transfer",
]


_default_lock = threading.Lock()
_default_hook: TransferHook | None = None


def set_default_transfer(hook: TransferHook | None) -> None:
    """Make ``hook`` the process-wide default transfer hook (checked first);
    ``None`` goes back to a fresh :class:`RayObjectStoreTransfer`.

    Process-wide means this process only: Ray workers and actors keep their own.
    """
    global _default_hook
    new = RayObjectStoreTransfer() if hook is None else check_transfer_hook(hook)
    with _default_lock:
        _default_hook = new


def get_default_transfer() -> TransferHook:
    """The process-wide default transfer hook (a :class:`RayObjectStoreTransfer` unless
    :func:`set_default_transfer` said otherwise)."""
    global _default_hook
    with _default_lock:
        if _default_hook is None:
            _default_hook = RayObjectStoreTransfer()
        return _default_hook
