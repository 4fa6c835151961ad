"""The exceptions ckptable raises.

Every error names the checkpoint path and, where one is involved, the component path,
both as text in the message and as the attributes ``path`` and ``component``. All of
them pickle (they cross Ray process boundaries) and keep those attributes.

The hierarchy:

    CheckpointError                      base of everything below
    ├── CheckpointNotFoundError          also a FileNotFoundError: no checkpoint there
    ├── CorruptCheckpointError           a file is missing, truncated, garbled or extra
    ├── IncompatibleCheckpointError      also a ValueError: wrong class or version
    ├── UnknownComponentError            also a ValueError: no component of that name
    ├── InvalidComponentNameError        also a ValueError: a name that is not a plain
    │                                    directory name (empty, '..', 'a/b', NUL, ...)
    ├── StateEncodingError               also a TypeError: a state (or constructor
    │                                    arguments) the format cannot encode
    ├── UnsafeCheckpointError            loading would run code outside the allowlist,
    │                                    or the checkpoint holds a symlink or special file
    ├── StepConflictError                also a ValueError: a CheckpointManager save of a
    │                                    step at or below the newest (overwrite=False)
    ├── SetStateError                    a level's set_state (user code) raised during a
    │                                    restore; the original exception is its cause
    ├── ActorCheckpointError             Ray actor components failed to save/restore
    └── TransferError                    moving a directory between nodes failed

Three warnings, all subclasses of ``UserWarning``: ``UnverifiedCheckpointWarning``, when
a checkpoint without ckptable's manifest (written by RLlib) is restored without an
integrity check; ``MainModuleClassWarning``, when a save stores a class defined in
``__main__`` (by value: ``from_checkpoint`` in another program will not accept it as
that program's class); ``UnknownComponentWarning``, when ``components=`` or
``not_components=`` names no component of the object but is close to one (a typo,
which RLlib's rules ignore silently).

The ``ValueError`` and ``TypeError`` bases keep ``except ValueError`` / ``except
TypeError`` working for code written against RLlib, which raises those in these places.
"""

from __future__ import annotations

__all__ = [
    "ActorCheckpointError",
    "CheckpointError",
    "CheckpointNotFoundError",
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
]


class CheckpointError(Exception):
    """Base class of every ckptable error.

    Args:
        message: What went wrong, naming the file or component.
        path: The checkpoint (or file) path concerned, if any.
        component: The component path (``"a/b"``) concerned, if any.
    """

    def __init__(
        self, message: str, *, path: str | None = None, component: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.component = component

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no checkpoint at the given path."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated, garbled, or should not be there."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """The checkpoint cannot be restored into the class or code version at hand."""


class UnknownComponentError(CheckpointError, ValueError):
    """A component path names no component of the object (RLlib silently skips it)."""


class InvalidComponentNameError(CheckpointError, ValueError):
    """A component name is not usable as a single directory name."""


class StateEncodingError(CheckpointError, TypeError):
    """A state, or the constructor arguments, cannot be encoded in the chosen format."""


class UnsafeCheckpointError(CheckpointError):
    """Loading the checkpoint would import or call something outside the allowlist."""


class StepConflictError(CheckpointError, ValueError):
    """A save's step is at or below the newest checkpoint's step in the directory (or is
    being saved already), and the call did not pass ``overwrite=True``.

    Also a ``ValueError``, like the manager's other refusals of a step. ``step`` and
    ``newest_step`` are kept as attributes.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        step: int | None = None,
        newest_step: int | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.step = step
        self.newest_step = newest_step


class SetStateError(CheckpointError):
    """A level's ``set_state`` (or a component's own ``restore_from_path``) raised.

    The message names the level (``component``: None for the root), the class, the
    state version restored, and what became of the levels applied before it: given
    back their previous states (``rolled_back`` True, with ``rollback=True``) or left
    restored. The exception ``set_state`` raised is the ``__cause__``.

    Args:
        message: What went wrong.
        path: The checkpoint level being applied.
        component: Its component path (None for the root level).
        class_name: The import path of the object's class.
        rolled_back: Whether the levels applied before it were rolled back.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        component: str | None = None,
        class_name: str | None = None,
        rolled_back: bool = False,
    ) -> None:
        super().__init__(message, path=path, component=component)
        self.class_name = class_name
        self.rolled_back = rolled_back


class ActorCheckpointError(CheckpointError):
    """Saving or restoring a component held by Ray actors failed."""


class TransferError(CheckpointError):
    """Moving a checkpoint directory between nodes failed."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint without ckptable's manifest (written by RLlib or another tool) was
    restored without an integrity check."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class MainModuleClassWarning(UserWarning):
    """A checkpoint stores a class defined in ``__main__`` (the script being run).

    cloudpickle stores such a class by value, a copy of its code, in the level's
    ``class_and_ctor_args.pkl``. ``from_checkpoint`` in another program then builds
    that copy, which is not the other program's class of the same name (refused when
    called on it), and ``safe=True`` refuses to load code. Defining the class in a module
    that is imported avoids both. Warned once per class and process.

    Args:
        message: What was stored, where, and what to do.
        class_name: The class's name (``"__main__.Model"``).
    """

    def __init__(self, message: str, *, class_name: str | None = None) -> None:
        super().__init__(message)
        self.class_name = class_name


class UnknownComponentWarning(UserWarning):
    """``components=`` or ``not_components=`` (seen by ``Checkpointable._check_component``)
    names no component of the object, and is close to one: a typo such as
    ``"optimzer"``. RLlib's selection rules ignore such names silently, and so does the
    selection (nothing is raised, the drop-in behaviour is kept); the warning says which
    name was meant. Warned once per class and name.

    Args:
        message: The name, the object's class and the close component names.
        component: The name given.
    """

    def __init__(self, message: str, *, component: str | None = None) -> None:
        super().__init__(message)
        self.component = component
