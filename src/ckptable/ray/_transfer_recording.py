"""The transfer hook's test double: :class:`RecordingTransfer` records each call, then
delegates or fails."""

from __future__ import annotations

import dataclasses

from ckptable.errors import TransferError
from ckptable.ray._transfer_hook import TransferHook, TransferReceipt, check_transfer_hook
from ckptable.ray._transfer_job import _Job, _reason
from ckptable.ray._transfer_ray import RayObjectStoreTransfer

__all__ = ["RecordingTransfer", "TransferCall"]


@dataclasses.dataclass(frozen=True)
class TransferCall:
    """One call of :meth:`RecordingTransfer.transfer`."""

    src_node_id: str
    src_path: str
    dst_node_id: str
    dst_path: str


class RecordingTransfer:
    """A transfer hook for tests: records every call in :attr:`calls`, then delegates to
    ``inner`` (default: a :class:`RayObjectStoreTransfer`) or, with ``fail``, raises it
    (as a :class:`~ckptable.errors.TransferError`, wrapping it if it is not one) without
    creating anything."""

    def __init__(
        self, inner: TransferHook | None = None, *, fail: BaseException | None = None
    ) -> None:
        self.inner: TransferHook = (
            RayObjectStoreTransfer() if inner is None else check_transfer_hook(inner)
        )
        self.fail = fail
        #: The calls so far, oldest first.
        self.calls: list[TransferCall] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner={self.inner!r}, fail={self.fail!r})"

    def transfer(
        self, src_node_id: str, src_path: str, dst_node_id: str, dst_path: str
    ) -> TransferReceipt | None:
        """Record the call, then fail as told or delegate to ``inner`` (returning what
        it returns)."""
        self.calls.append(TransferCall(src_node_id, src_path, dst_node_id, dst_path))
        if self.fail is None:
            return self.inner.transfer(src_node_id, src_path, dst_node_id, dst_path)
        if isinstance(self.fail, TransferError):
            raise self.fail
        job = _Job(src_node_id, src_path, dst_node_id, dst_path, "")
        raise job.error(_reason(self.fail)) from self.fail
