"""ckptable: make any object tree checkpointable, RLlib-compatible and crash-safe.

Subclass :class:`Checkpointable`, and ``save_to_path``, ``restore_from_path`` and
``from_checkpoint`` save the whole tree into nested directories, restore all of it or one
component, and rebuild a fresh object from a checkpoint alone.
"""

from ckptable._async import release_snapshot_memory, save_async
from ckptable._checkpointable import Checkpointable
from ckptable._components import check_component, get_subcomponents
from ckptable._convert import convert_checkpoint
from ckptable._formats import Codec, get_codec, register_codec, registered_codecs
from ckptable._info import VerifyReport, get_checkpoint_info, verify_checkpoint
from ckptable._safe import add_safe_classes
from ckptable.errors import (
    ActorCheckpointError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    InvalidComponentNameError,
    StateEncodingError,
    TransferError,
    UnknownComponentError,
    UnsafeCheckpointError,
    UnverifiedCheckpointWarning,
)
from ckptable.manager import CheckpointManager

__all__ = [
    "ActorCheckpointError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "Checkpointable",
    "Codec",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "InvalidComponentNameError",
    "StateEncodingError",
    "TransferError",
    "UnknownComponentError",
    "UnsafeCheckpointError",
    "UnverifiedCheckpointWarning",
    "VerifyReport",
    "__version__",
    "add_safe_classes",
    "check_component",
    "convert_checkpoint",
    "get_checkpoint_info",
    "get_codec",
    "get_subcomponents",
    "register_codec",
    "registered_codecs",
    "release_snapshot_memory",
    "save_async",
    "verify_checkpoint",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from ckptable._version import package_version

        return package_version()
    raise AttributeError(f"module 'ckptable' has no attribute {name!r}")
