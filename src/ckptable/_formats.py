"""State codecs: how one level's state dict becomes a file and back.

A codec is a small object with a ``name`` (recorded in ``metadata.json``), a file
``suffix`` (``.pkl``, ``.msgpack``: part of the on-disk layout RLlib reads) and two
methods that stream a state to and from a binary file object. Codecs live in a
registry keyed by name; ``register_codec`` checks a codec when it is registered, not in
the middle of a save.

Built in:

- ``cloudpickle`` (alias ``pickle``): the default, RLlib's default too. Loading it runs
  whatever code the pickle names, so only load checkpoints you trust.
- ``msgpack``: portable across Python versions. Numpy arrays use msgpack-numpy's
  encoding, so the files are the ones RLlib's ``use_msgpack=True`` writes and reads;
  ckptable calls msgpack-numpy's hooks directly and never ``msgpack_numpy.patch()``
  (process-global). Note that msgpack-numpy's decoder unpickles object-dtype arrays.
"""

from __future__ import annotations

import importlib.util
import pickle
import types
from collections.abc import Mapping
from typing import IO, Any, Protocol, runtime_checkable

from ckptable.errors import CheckpointError

__all__ = [
    "CloudpickleCodec",
    "Codec",
    "MsgpackCodec",
    "codec_for_suffix",
    "get_codec",
    "register_codec",
    "registered_codecs",
]


@runtime_checkable
class Codec(Protocol):
    """Encodes and decodes one level's state to and from a binary stream."""

    #: Registry name, written to ``metadata.json`` as the level's ``format``.
    name: str
    #: File suffix of the state file, with the dot (``".pkl"``).
    suffix: str

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        """Write ``state`` to ``stream``."""

    def load(self, stream: IO[bytes]) -> Any:
        """Read one state from ``stream``; any exception means the file is unreadable."""


class CloudpickleCodec:
    """The default codec: cloudpickle, protocol 5, as RLlib writes ``state.pkl``."""

    name = "cloudpickle"
    suffix = ".pkl"

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        import cloudpickle

        cloudpickle.dump(state, stream, protocol=pickle.HIGHEST_PROTOCOL)

    def load(self, stream: IO[bytes]) -> Any:
        return pickle.load(stream)


class MsgpackCodec:
    """msgpack with msgpack-numpy's array encoding, without patching msgpack."""

    name = "msgpack"
    suffix = ".msgpack"

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        msgpack, msgpack_numpy = _import_msgpack()
        stream.write(msgpack.packb(state, default=msgpack_numpy.encode, use_bin_type=True))

    def load(self, stream: IO[bytes]) -> Any:
        msgpack, msgpack_numpy = _import_msgpack()
        return msgpack.unpackb(
            stream.read(), object_hook=msgpack_numpy.decode, strict_map_key=False, raw=False
        )


def _import_msgpack() -> tuple[types.ModuleType, types.ModuleType]:
    try:
        import msgpack
        import msgpack_numpy
    except ImportError:
        raise ImportError(
            "The msgpack format needs msgpack and msgpack-numpy: pip install 'ckptable[msgpack]'"
        ) from None
    return msgpack, msgpack_numpy


_REGISTRY: dict[str, Codec] = {}
_ALIASES: dict[str, str] = {"pickle": "cloudpickle"}


def register_codec(codec: Codec, *, clobber: bool = False) -> None:
    """Add ``codec`` to the registry under ``codec.name``.

    Raises:
        TypeError: if ``codec`` lacks ``name``, ``suffix``, ``dump`` or ``load``, or its
            suffix is not a ``.name`` suffix.
        ValueError: if the name or suffix is taken and ``clobber`` is False.
    """
    if not isinstance(codec, Codec):
        raise TypeError(
            f"{codec!r} is not a codec: it needs the attributes name and suffix and the "
            "methods dump(state, stream) and load(stream)."
        )
    name, suffix = codec.name, codec.suffix
    if not (isinstance(name, str) and name and isinstance(suffix, str)):
        raise TypeError(f"Codec {codec!r}: name and suffix must be non-empty strings.")
    if not (suffix.startswith(".") and len(suffix) > 1 and "/" not in suffix):
        raise TypeError(f"Codec {name!r}: suffix {suffix!r} must look like '.ext'.")
    if not clobber:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"A codec named {name!r} is registered already (clobber=True).")
        taken = [c.name for c in _REGISTRY.values() if c.suffix == suffix]
        if taken:
            raise ValueError(f"Suffix {suffix!r} is used by codec {taken[0]!r} already.")
    _REGISTRY[name] = codec


def get_codec(name: str) -> Codec:
    """The codec registered as ``name`` (``"cloudpickle"``, ``"pickle"``, ``"msgpack"``)."""
    codec = _REGISTRY.get(_ALIASES.get(name, name))
    if codec is None:
        known = ", ".join(sorted([*_REGISTRY, *_ALIASES]))
        raise CheckpointError(f"Unknown checkpoint format {name!r}; known formats: {known}.")
    if codec.name == "msgpack" and importlib.util.find_spec("msgpack_numpy") is None:
        _import_msgpack()  # raises the ImportError that says what to install
    return codec


def codec_for_suffix(suffix: str) -> Codec | None:
    """The registered codec writing files ending in ``suffix``, if any."""
    for codec in _REGISTRY.values():
        if codec.suffix == suffix:
            return codec
    return None


def registered_codecs() -> Mapping[str, Codec]:
    """A read-only view of the registry."""
    return types.MappingProxyType(_REGISTRY)


register_codec(CloudpickleCodec())
register_codec(MsgpackCodec())
