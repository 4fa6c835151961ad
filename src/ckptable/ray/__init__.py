"""Components held by Ray actors on many nodes, and the hooks that move checkpoints
between nodes (the extra ``ckptable[ray]``).

A component of a ``ckptable.Checkpointable`` may be an *actor manager* instead of a
Checkpointable: RLlib's ``FaultTolerantActorManager`` as it is, or ``RayActorManager``
over plain actor handles. Saving takes the first healthy actor's state (written on its own
node and moved in with a ``TransferHook``, or written straight to shared storage);
restoring pushes the checkpoint to every healthy actor. The documentation's guide
"Distributed checkpoints" (``docs/distributed.md``) shows how the parts fit.
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "ckptable.ray needs Ray, which is not installed: pip install 'ckptable[ray]'"
    ) from exc

from ckptable.ray._manager import (
    ActorManager,
    CallResult,
    FaultAwareApply,
    RayActorManager,
    RemoteCallResults,
    call_error,
    mark_unhealthy,
)
from ckptable.ray._nodes import current_node_id
from ckptable.ray._transfer import (
    TRANSFER_MARKER,
    LocalCopyTransfer,
    RayObjectStoreTransfer,
    RecordingTransfer,
    TransferCall,
    TransferHook,
    check_transfer_hook,
    get_default_transfer,
    set_default_transfer,
)

__all__ = [
    "TRANSFER_MARKER",
    "ActorManager",
    "CallResult",
    "FaultAwareApply",
    "LocalCopyTransfer",
    "RayActorManager",
    "RayObjectStoreTransfer",
    "RecordingTransfer",
    "RemoteCallResults",
    "TransferCall",
    "TransferHook",
    "call_error",
    "check_transfer_hook",
    "current_node_id",
    "get_default_transfer",
    "mark_unhealthy",
    "set_default_transfer",
]
