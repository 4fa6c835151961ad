"""ckptable: make any object tree checkpointable, RLlib-compatible and crash-safe.

Subclass ``Checkpointable``, and ``save_to_path``, ``restore_from_path`` and
``from_checkpoint`` save the whole tree into nested directories, restore all of it or one
component, and rebuild a fresh object from a checkpoint alone.
"""

import typing

if typing.TYPE_CHECKING:
    from ckptable._async import release_snapshot_memory, save_async
    from ckptable._checkpointable import Checkpointable
    from ckptable._components import check_component, get_subcomponents
    from ckptable._convert import convert_checkpoint
    from ckptable._formats import Codec, get_codec, register_codec, registered_codecs
    from ckptable._info import get_checkpoint_info
    from ckptable._safe import add_safe_classes
    from ckptable._verify import VerifyReport, verify_checkpoint
    from ckptable.errors import (
        ActorCheckpointError,
        CheckpointError,
        CheckpointNotFoundError,
        CorruptCheckpointError,
        IncompatibleCheckpointError,
        InvalidComponentNameError,
        MainModuleClassWarning,
        SetStateError,
        StateEncodingError,
        StepConflictError,
        TransferError,
        UnknownComponentError,
        UnknownComponentWarning,
        UnsafeCheckpointError,
        UnverifiedCheckpointWarning,
    )
    from ckptable.manager import CheckpointManager

#: Where each public name lives: imported on first use (PEP 562), so that importing
#: ckptable (which its pytest plugin does in every pytest session) costs next to nothing.
_EXPORTS = {
    "ActorCheckpointError": "ckptable.errors",
    "CheckpointError": "ckptable.errors",
    "CheckpointManager": "ckptable.manager",
    "CheckpointNotFoundError": "ckptable.errors",
    "Checkpointable": "ckptable._checkpointable",
    "Codec": "ckptable._formats",
    "CorruptCheckpointError": "ckptable.errors",
    "IncompatibleCheckpointError": "ckptable.errors",
    "InvalidComponentNameError": "ckptable.errors",
    "MainModuleClassWarning": "ckptable.errors",
    "SetStateError": "ckptable.errors",
    "StateEncodingError": "ckptable.errors",
    "StepConflictError": "ckptable.errors",
    "TransferError": "ckptable.errors",
    "UnknownComponentError": "ckptable.errors",
    "UnknownComponentWarning": "ckptable.errors",
    "UnsafeCheckpointError": "ckptable.errors",
    "UnverifiedCheckpointWarning": "ckptable.errors",
    "VerifyReport": "ckptable._verify",
    "add_safe_classes": "ckptable._safe",
    "check_component": "ckptable._components",
    "convert_checkpoint": "ckptable._convert",
    "get_checkpoint_info": "ckptable._info",
    "get_codec": "ckptable._formats",
    "get_subcomponents": "ckptable._components",
    "register_codec": "ckptable._formats",
    "registered_codecs": "ckptable._formats",
    "release_snapshot_memory": "ckptable._async",
    "save_async": "ckptable._async",
    "verify_checkpoint": "ckptable._verify",
}

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
    "MainModuleClassWarning",
    "SetStateError",
    "StateEncodingError",
    "StepConflictError",
    "TransferError",
    "UnknownComponentError",
    "UnknownComponentWarning",
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


#: Public submodules that ``ckptable.<name>`` reaches without an import of its own.
_SUBMODULES = frozenset({"errors", "manager", "testing"})


def __getattr__(name: str) -> object:
    if name == "__version__":
        from ckptable._version import package_version

        return package_version()
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"ckptable.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptable' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
