"""``ckptable.Checkpointable``: the RLlib-compatible abstract base class.

The methods here are the public surface of RLlib's
``ray.rllib.utils.checkpoints.Checkpointable`` (Ray 2.60), with the same names,
signatures and keyword arguments. The work is done by the two pipelines,
:mod:`ckptable._save` and :mod:`ckptable._restore`.
"""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from ckptable._components import check_component, get_subcomponents, warn_unknown_selection
from ckptable._restore import RestoreOptions, construct_from_checkpoint, restore_checkpointable
from ckptable._save import save_checkpointable, save_through_override
from ckptable._version import package_version
from ckptable.errors import IncompatibleCheckpointError

__all__ = ["Checkpointable"]

_C = TypeVar("_C", bound="Checkpointable")

StateDict = dict[str, Any]


class Checkpointable(abc.ABC):
    """An object whose state, and that of its checkpointable components, saves to a directory.

    Subclasses implement ``get_state`` and ``set_state``; one whose constructor takes
    arguments also returns them from ``get_ctor_args_and_kwargs`` (for
    ``from_checkpoint``); one with checkpointable parts lists them in
    ``get_checkpointable_components``. Then
    ``save_to_path`` writes the whole tree (one subdirectory per component),
    ``restore_from_path`` restores all of it or one component, and ``from_checkpoint``
    builds a new object from a checkpoint alone.
    """

    #: Base name of the level's state file (``state.pkl`` / ``state.msgpack``).
    STATE_FILE_NAME = "state"
    #: Pickle file holding the class and its constructor arguments.
    CLASS_AND_CTOR_ARGS_FILE_NAME = "class_and_ctor_args.pkl"
    #: JSON file holding ``get_metadata()`` plus ckptable's own record.
    METADATA_FILE_NAME = "metadata.json"
    #: Version of the state layout ``get_state`` returns, recorded with each save. Raise
    #: it when the layout changes and implement ``upgrade_state``: older checkpoints
    #: are upgraded as they are restored; newer ones are refused. Checkpoints without
    #: a recorded version (RLlib's) count as version 1.
    STATE_VERSION: int = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap a subclass's own ``save_to_path`` so that, called from outside any save,
        it runs inside the staging session: files it writes before or after
        ``super().save_to_path`` become part of the atomic, checksummed tree (it sees
        the staging directory as ``path``)."""
        super().__init_subclass__(**kwargs)
        override = cls.__dict__.get("save_to_path")
        if callable(override) and not getattr(override, "_ckptable_staged", False):
            cls.save_to_path = _staged(override)  # type: ignore[method-assign]

    def save_to_path(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        state: StateDict | None = None,
        filesystem: Any = None,
        use_msgpack: bool = False,
        format: str | None = None,
        durable: bool = True,
        transfer: Any = None,
        progress: bool | None = None,
    ) -> str:
        """Save the state of ``self`` (or ``state``) and all its components to ``path``.

        The tree is written into a staging directory beside ``path``, with a manifest
        (every file's size and checksum) in each directory, flushed to disk and published
        in one step when complete, replacing any checkpoint already at ``path`` whole.

        Args:
            path: Directory (or URI) to save to; a new temporary directory if None.
            state: A state to save instead of calling ``self.get_state()``. Components
                whose name is not a key of ``state`` are not saved (as in RLlib).
            filesystem: A ``pyarrow.fs.FileSystem`` or an fsspec filesystem to write
                with; by default inferred from ``path`` (a local path or a URI).
            use_msgpack: Write ``state.msgpack`` instead of ``state.pkl`` (RLlib's
                spelling of ``format="msgpack"``).
            format: Name of a registered codec (``"cloudpickle"``, ``"msgpack"``).
            durable: Flush every file and directory to disk before publishing (the
                default). False skips the flushes: faster, but after a power loss or OS
                crash the new checkpoint may be detected as corrupt (never loaded wrong)
                and the old one is gone. Process crashes are survived either way.
            transfer: A ``ckptable.ray.TransferHook`` that moves the directories of
                components held by Ray actors on other nodes (default:
                ``ckptable.ray.get_default_transfer()``). See ``docs/distributed.md``.
            progress: Show a progress bar (bytes written, rate) on stderr: None (the
                default) when stderr is a terminal, True also when it is not (needs
                ``tqdm``: ``pip install 'ckptable[progress]'``), False never. None
                follows the ``CKPTABLE_PROGRESS`` environment variable if it is set.
                The bar appears once the save has run for a second. See
                ``docs/progress.md``.

        Returns:
            The path the checkpoint was saved to.

        Raises:
            CheckpointError: if writing fails (disk full, permissions, ...); nothing is
                published and the previous checkpoint at ``path`` is unchanged (on
                object stores, which cannot rename directories, the previous checkpoint
                is deleted first and nothing is left that restores as one).
            ActorCheckpointError: a component held by Ray actors had no healthy actor,
                or every one of them failed to save it.
        """
        return save_checkpointable(
            self,
            path,
            state=state,
            filesystem=filesystem,
            use_msgpack=use_msgpack,
            format=format,
            durable=durable,
            transfer=transfer,
            progress=progress,
        )

    def restore_from_path(
        self,
        path: str | os.PathLike[str],
        *,
        component: str | None = None,
        filesystem: Any = None,
        verify: bool = True,
        safe: bool = False,
        mmap: bool = False,
        map_location: Any = None,
        transfer: Any = None,
        on_actor_failure: str = "raise",
        progress: bool | None = None,
        rollback: bool = False,
        **kwargs: Any,
    ) -> None:
        """Restore ``self``, or one of its components, from the checkpoint at ``path``.

        Every file that the restore uses is read and decoded before the first
        ``set_state`` runs: a missing or corrupt file raises and leaves ``self`` as it was.

        Args:
            path: The checkpoint directory; with ``component``, the directory of that
                component's own checkpoint (as in RLlib).
            component: A component path (``"a/b"``) to restore alone; the rest of
                ``self`` is untouched. An unknown name raises ``UnknownComponentError``.
            filesystem: A ``pyarrow.fs.FileSystem`` or an fsspec filesystem to read with.
            verify: Check every file against the checkpoint's manifest (size and
                checksum) before anything is decoded. Checkpoints written by RLlib have
                none: they are restored unverified, with an ``UnverifiedCheckpointWarning``.
            safe: Decode pickle files with a restricted unpickler that loads only plain
                containers, numbers, strings, numpy arrays, the classes of the objects
                being restored and classes given to ``ckptable.add_safe_classes``;
                anything else raises ``UnsafeCheckpointError`` before it runs.
            mmap: Map big arrays (1 MiB and more, in pickle files on the local disk)
                from their files as read-only arrays instead of reading them: the restore
                costs next to nothing, pages are read when used. With ``verify``, all
                but the arrays' bytes is verified (``verify_checkpoint`` checks those).
                Byte strings of 1 MiB or more come back as read-only ``memoryview``.
                Torch tensors (which have no read-only form) are mapped copy-on-write:
                writable, and a write never reaches the file.
            map_location: Where torch tensors go, with ``torch.load``'s meanings: a
                device string (``"cpu"``, ``"cuda:0"``) or ``torch.device`` for all of
                them; a dict of saved device strings to target devices
                (``{"cuda:1": "cuda:0"}``; devices it does not name follow the default);
                or a callable ``(tensor, saved_device) -> tensor``, called with each
                tensor built on the CPU and the string of the device it was saved from,
                that returns it moved (or None for the default). Default (None): each
                tensor goes back to the device it was saved from if this machine has
                it, else to the CPU, with one ``UserWarning`` per restore counting the
                tensors moved. Also for tensors pickled by torch itself (older
                checkpoints, RLlib's). See ``docs/torch.md``.
            transfer: A ``ckptable.ray.TransferHook`` that moves the directories of
                components held by Ray actors to the actors' nodes (default:
                ``ckptable.ray.get_default_transfer()``).
            on_actor_failure: ``"raise"``: an actor that fails to restore raises
                ``ActorCheckpointError`` listing every failed actor (after the others
                were restored); ``"mark_unhealthy"``: they are marked unhealthy in their
                manager and a warning is logged.
            progress: Show a progress bar (bytes read, rate, and the percentage where
                the checkpoint's manifest records its size), as in ``save_to_path``.
            rollback: If a ``set_state`` raises part-way (after other levels were set),
                give every level already set, and the failed one, back the state it had
                before this restore (each level's own state is taken with ``get_state``
                and deep-copied before its ``set_state``: it costs a copy of the state).
                Components held by Ray actors are restored before any ``set_state`` and
                are not rolled back; a component that restores itself with its own
                ``restore_from_path`` is not either.
            **kwargs: Passed on to the components' ``restore_from_path`` calls.

        Raises:
            CheckpointNotFoundError: if ``path`` is not a directory.
            CorruptCheckpointError: a file is missing, extra, truncated or altered.
            UnsafeCheckpointError: with ``safe=True``, the checkpoint names code outside
                the allowlist; or it holds a symlink or special file.
            UnknownComponentError: ``component`` names no component of ``self``.
            ActorCheckpointError: a component held by Ray actors has no healthy actor,
                or actors failed to restore (see ``on_actor_failure``).
            SetStateError: a ``set_state`` raised; it names the level, its class and
                state version, says what became of the levels set before it, and has
                the original exception as its cause.
            CheckpointError: ``map_location`` sends tensors to a device this machine
                does not have, or its callable returned something else than the
                tensor moved (before any ``set_state``).
            TypeError: ``map_location`` is not one of the types above.
        """
        restore_checkpointable(
            self,
            path,
            component=component,
            filesystem=filesystem,
            options=RestoreOptions(
                verify=verify,
                safe=safe,
                mmap=mmap,
                transfer=transfer,
                on_actor_failure=on_actor_failure,
                progress=progress,
                rollback=rollback,
                map_location=map_location,
            ),
            kwargs=kwargs,
        )

    @classmethod
    def from_checkpoint(
        cls: type[_C],
        path: str | os.PathLike[str],
        filesystem: Any = None,
        *,
        verify: bool = True,
        safe: bool = False,
        mmap: bool = False,
        map_location: Any = None,
        progress: bool | None = None,
        **kwargs: Any,
    ) -> _C:
        """Build a new object from the checkpoint at ``path`` and restore its state.

        Args:
            path: The checkpoint directory.
            filesystem: A ``pyarrow.fs.FileSystem`` or an fsspec filesystem to read with.
            verify: As in ``restore_from_path``; the class file is verified before it
                is unpickled.
            safe: As in ``restore_from_path``; the class file may then name only
                ``cls`` or a subclass of it that is already imported (plus the
                allowlist), and its constructor arguments only allowlisted types.
            mmap: As in ``restore_from_path``.
            map_location: As in ``restore_from_path``; it also places tensors among the
                stored constructor arguments.
            progress: As in ``restore_from_path``.
            **kwargs: Keyword arguments naming constructor parameters override the
                stored constructor arguments; the others go on to ``restore_from_path``.
                (``verify``, ``safe``, ``mmap``, ``map_location`` and ``progress`` are
                ckptable's own: a constructor parameter of any of these names cannot be
                overridden here.)

        The class file is verified and decoded before the constructor runs; the state
        files are verified by the restore that follows, before any ``set_state``.

        Raises:
            IncompatibleCheckpointError: if the stored class is not a subclass of ``cls``.
        """
        options = RestoreOptions(
            verify=verify, safe=safe, mmap=mmap, progress=progress, map_location=map_location
        )
        return construct_from_checkpoint(cls, path, filesystem, options, kwargs)

    @abc.abstractmethod
    def get_state(
        self,
        components: str | Collection[str] | None = None,
        *,
        not_components: str | Collection[str] | None = None,
        **kwargs: Any,
    ) -> StateDict:
        """Return the state as a dict; components' states under their component names.

        Args:
            components: Only these keys (``"a"`` or ``"a/sub"``); all if None.
            not_components: Keys to leave out even if selected by ``components``.
            **kwargs: Forward-compatibility arguments.
        """

    @abc.abstractmethod
    def set_state(self, state: StateDict) -> None:
        """Set the state from ``state``; keys that are missing are left as they are."""

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The ``(args, kwargs)`` that rebuild ``self`` from its class.

        ``from_checkpoint`` calls the stored class with them. The default, ``((), {})``,
        fits a class whose constructor needs no arguments; a class whose constructor
        takes some overrides it (RLlib's base class declares it abstract: classes
        written for RLlib override it and keep working unchanged).
        """
        return (), {}

    def upgrade_state(self, state: StateDict, from_version: int) -> StateDict:
        """Turn a state saved at ``from_version`` into one of ``STATE_VERSION``.

        Called on restore, for every level saved with an older ``STATE_VERSION``, after
        all files are read and before any ``set_state``: a failure leaves the object
        as it was. ``state`` holds this level's own keys only (components have their
        own versions). The default refuses: a class that raises its version must say
        how to upgrade.

        Raises:
            IncompatibleCheckpointError: the default, always.
        """
        cls = type(self)
        raise IncompatibleCheckpointError(
            f"The checkpoint holds state version {from_version} of "
            f"{cls.__module__}.{cls.__qualname__}, which is at version "
            f"{cls.STATE_VERSION} and defines no upgrade_state() to upgrade it."
        )

    def get_metadata(self) -> dict[str, Any]:
        """JSON-serializable facts written to ``METADATA_FILE_NAME``; not needed to restore.

        Subclasses extending it should call ``super().get_metadata()``.
        """
        return {
            "class_and_ctor_args_file": self.CLASS_AND_CTOR_ARGS_FILE_NAME,
            "state_file": self.STATE_FILE_NAME,
            "ckptable_version": package_version(),
        }

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        """``(name, component)`` pairs of the parts saved into their own subdirectories."""
        return []

    def _check_component(
        self,
        name: str,
        components: str | Collection[str] | None,
        not_components: str | Collection[str] | None,
    ) -> bool:
        """True if ``name`` is selected by ``components`` and not in ``not_components``.

        A selection that names no component of this object but is close to one (a
        typo: ``"optimzer"``) is warned about (``UnknownComponentWarning``, once per
        class and name); as in RLlib, it selects nothing and nothing is raised.
        """
        if components is not None or not_components is not None:
            warn_unknown_selection(self, name, components, not_components)
        return check_component(name, components, not_components)

    def _get_subcomponents(
        self, name: str, components: str | Collection[str] | None
    ) -> list[str] | None:
        """The selections below ``name`` (``"name/x"`` → ``"x"``), or None for all."""
        return get_subcomponents(name, components)


def _staged(override: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(override)
    def save_to_path(self: Checkpointable, path: Any = None, **kwargs: Any) -> Any:
        return save_through_override(self, override, path, kwargs)

    save_to_path._ckptable_staged = True  # type: ignore[attr-defined]
    return save_to_path
