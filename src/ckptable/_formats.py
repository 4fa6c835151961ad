"""State codecs: how one level's state dict becomes a file and back.

A codec is a small object with a ``name`` (recorded in ``metadata.json``), a file
``suffix`` (``.pkl``, ``.msgpack``: part of the on-disk layout RLlib reads) and two
methods that stream a state to and from a binary file object. Codecs live in a
registry keyed by name; ``register_codec`` checks a codec when it is registered, not in
the middle of a save.

Built in:

- ``cloudpickle`` (alias ``pickle``): the default, RLlib's default too. Loading it runs
  whatever code the pickle names, so only load checkpoints you trust. Torch tensors are
  written as numpy arrays (big out-of-band payloads) plus a record naming torch's own
  rebuild function, and placed on devices by ``map_location`` when loaded: see
  :mod:`ckptable._torch`, which this codec plugs in (it imports torch only when torch
  is imported already, or a pickle names it).
- ``msgpack``: portable across Python versions. Numpy arrays use msgpack-numpy's
  encoding, so the files are the ones RLlib's ``use_msgpack=True`` writes and reads;
  ckptable calls msgpack-numpy's hooks directly and never ``msgpack_numpy.patch()``
  (process-global). Note that msgpack-numpy's decoder unpickles object-dtype arrays;
  in safe mode ckptable's own hook refuses them instead.
- ``safetensors`` (:mod:`ckptable._safetensors`): nested dicts of numpy arrays, torch
  tensors and JSON-like values as a standard ``.safetensors`` file, readable by any
  safetensors reader; loading runs no code. Imports numpy (and torch) only for states
  that hold arrays (tensors).

A codec may also have ``load_restricted(stream, *, allowed, allow_subclasses_of,
source)``, used by ``restore_from_path(..., safe=True)``; a codec without one cannot be
loaded in safe mode; and ``load_mapped(stream)``, used by ``mmap=True`` restores: it
decodes the regular local file open as ``stream`` (it has a ``fileno()``) with its big
data mapped from the file rather than read (and takes ``tensors=`` as ``load`` does, where
the codec ``accepts_tensors``). ``load_mapped`` must run no code the file names (safe
restores use it as well, for codecs that have a ``load_restricted``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import io
import pickle
import types
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Protocol, cast, runtime_checkable

from ckptable._torch import load_pickle, pickler_class
from ckptable._torch_placement import TensorPlacement
from ckptable.errors import CheckpointError

__all__ = [
    "CloudpickleCodec",
    "Codec",
    "MsgpackCodec",
    "accepts_buffers",
    "accepts_tensors",
    "codec_for_suffix",
    "explain_unencodable",
    "get_codec",
    "locate_unencodable",
    "maps_files",
    "reads_whole",
    "register_codec",
    "registered_codecs",
    "unpatched_msgpack",
]


@runtime_checkable
class Codec(Protocol):
    """Encodes and decodes one level's state to and from a binary stream.

    Register one with ``register_codec``; ``save_to_path(..., format=codec.name)`` then
    writes with it, and restores pick it by the ``format`` recorded in ``metadata.json``.
    A codec may also define ``load_restricted(stream, *, allowed, allow_subclasses_of,
    source)``, which ``restore_from_path(..., safe=True)`` uses; a codec without one
    cannot be loaded in safe mode.
    """

    name: str
    """Registry name, written to ``metadata.json`` as the level's ``format``."""
    suffix: str
    """File suffix of the state file, with the dot (``".pkl"``)."""

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        """Write ``state`` to ``stream``."""

    def load(self, stream: IO[bytes]) -> Any:
        """Read one state from ``stream``; any exception means the file is unreadable."""


class CloudpickleCodec:
    """The default codec: cloudpickle, protocol 5, as RLlib writes ``state.pkl``."""

    name = "cloudpickle"
    suffix = ".pkl"

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        # cloudpickle's Pickler, or its subclass that writes tensors as arrays once torch
        # is imported (``_torch.pickler_class``).
        pickler_class()(stream, protocol=pickle.HIGHEST_PROTOCOL).dump(state)

    #: Restores may pass the big byte payloads separately (see ``_pickle_scan``).
    accepts_buffers = True
    #: Restores pass the restore's ``TensorPlacement`` (``map_location``) as ``tensors``.
    accepts_tensors = True

    def load(
        self,
        stream: IO[bytes],
        *,
        buffers: Iterable[Any] | None = None,
        tensors: TensorPlacement | None = None,
    ) -> Any:
        """Unpickle, torch tensors placed by ``tensors`` (a default placement, which
        warns by itself when tensors had to move to the CPU, if None)."""
        return load_pickle(stream, buffers=buffers, placement=tensors)

    def load_restricted(
        self,
        stream: IO[bytes],
        *,
        allowed: Iterable[object] = (),
        allow_subclasses_of: type | None = None,
        source: str = "",
        buffers: Iterable[Any] | None = None,
        tensors: TensorPlacement | None = None,
    ) -> Any:
        """``load`` for ``safe=True``: only allowlisted globals may be named; tensors
        only in the records ckptable writes (``_safe_torch``), placed by ``tensors``."""
        from ckptable._safe import safe_pickle_load
        from ckptable._safe_torch import placing

        placement = TensorPlacement() if tensors is None else tensors
        with placing(placement):
            try:
                state = safe_pickle_load(
                    stream,
                    allowed=allowed,
                    allow_subclasses_of=allow_subclasses_of,
                    source=source,
                    buffers=buffers,
                )
            finally:
                placement.finish_file()
        if tensors is None:
            placement.warn(stacklevel=2)
        return state


class MsgpackCodec:
    """msgpack with msgpack-numpy's array encoding, without patching msgpack."""

    name = "msgpack"
    suffix = ".msgpack"
    #: ``load`` reads the whole stream into memory first (see :func:`reads_whole`).
    reads_whole = True

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        from ckptable._msgpack_encode import pack_to

        msgpack, msgpack_numpy = _import_msgpack()
        pack_to(stream, state, _msgpack_impl(msgpack), msgpack_numpy)

    def load(self, stream: IO[bytes]) -> Any:
        _, unpackb, msgpack_numpy = unpatched_msgpack()
        return _unpack(stream, msgpack_numpy.decode, unpackb)

    def load_restricted(
        self,
        stream: IO[bytes],
        *,
        allowed: Iterable[object] = (),
        allow_subclasses_of: type | None = None,
        source: str = "",
    ) -> Any:
        """``load`` for ``safe=True``: never reaches pickle (object arrays are refused)."""
        from ckptable._safe import safe_msgpack_decode

        _, unpackb, _ = unpatched_msgpack()
        hook = functools.partial(safe_msgpack_decode, source=source)
        return _unpack(stream, hook, unpackb)


def _unpack(
    stream: IO[bytes], hook: Callable[[dict[Any, Any]], Any], unpackb: Callable[..., Any]
) -> Any:
    """msgpack's ``unpackb`` of the rest of ``stream``, ``hook`` on every map; a big file
    held in memory of its own is decoded in place, its arrays views of that memory
    (:mod:`ckptable._msgpack_views`), anything else by msgpack itself."""
    data = _read_whole(stream)
    if isinstance(data, memoryview):
        from ckptable._msgpack_views import Unsuited, unpack_with_views

        try:
            return unpack_with_views(data, hook)
        except Unsuited:
            pass
    return unpackb(data, object_hook=hook, strict_map_key=False, raw=False)


def _read_whole(stream: IO[bytes]) -> Any:
    """The rest of ``stream``: ``rest_view(True)`` where the stream has it (a file an
    object store's prefetch fetched whole, or verified bytes held from it), a view of
    the memory it holds the file in (writable where the memory is the restore's own),
    which msgpack reads as well as bytes, without the copy ``read()`` would make; else
    ``read()`` (an ``io.BytesIO`` over bytes returns those bytes themselves)."""
    rest_view = getattr(stream, "rest_view", None)
    if callable(rest_view):
        return rest_view(True)
    return stream.read()


def _import_msgpack() -> tuple[types.ModuleType, types.ModuleType]:
    try:
        import msgpack
        import msgpack_numpy
    except ImportError:
        raise ImportError(
            "The msgpack format needs msgpack and msgpack-numpy: pip install 'ckptable[msgpack]'"
        ) from None
    return msgpack, msgpack_numpy


def _msgpack_impl(msgpack: types.ModuleType) -> types.ModuleType:
    """msgpack's implementation module: its C extension, else its pure-Python one."""
    return getattr(msgpack, "_cmsgpack", None) or importlib.import_module("msgpack.fallback")


def unpatched_msgpack() -> tuple[Callable[..., bytes], Callable[..., Any], types.ModuleType]:
    """``packb``, ``unpackb`` and msgpack-numpy, immune to ``msgpack_numpy.patch()``.

    ``patch()`` (RLlib calls it on import) replaces ``msgpack.unpackb`` with a wrapper
    that runs msgpack-numpy's decoder, which unpickles object arrays, *before* any
    ``object_hook`` given: safe mode must never go through it. The implementation
    module's own functions are not patched.
    """
    msgpack, msgpack_numpy = _import_msgpack()
    impl = _msgpack_impl(msgpack)

    def packb(obj: Any, **kwargs: Any) -> bytes:
        return impl.Packer(**kwargs).pack(obj)  # type: ignore[no-any-return]

    return packb, impl.unpackb, msgpack_numpy


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


def locate_unencodable(codec: Codec, state: Any, path: str = "state") -> str:
    """The key path (``state['a'][0]``) of the innermost value ``codec`` cannot encode.

    Called after an encoding failed, to say where: each container's items are tried on
    their own and the first failing one is followed down. Returns ``path`` itself if
    every item encodes (the container as a whole does not: a dict key, say).
    """
    return _locate(codec, state, path)[0]


def _locate(codec: Codec, state: Any, path: str) -> tuple[str, Any]:
    """``locate_unencodable``'s key path, and the value found there."""
    while True:
        if isinstance(state, dict):
            items: Iterable[tuple[str, Any]] = ((f"{path}[{k!r}]", v) for k, v in state.items())
        elif isinstance(state, (list, tuple)):
            items = ((f"{path}[{i}]", v) for i, v in enumerate(state))
        else:
            return path, state
        for item_path, value in items:
            try:
                codec.dump(value, cast(IO[bytes], _Discard()))
            except Exception:
                path, state = item_path, value
                break
        else:
            return path, state


#: The integers msgpack holds: int64 and uint64.
_MSGPACK_INT_RANGE = (-(2**63), 2**64 - 1)


def explain_unencodable(codec: Codec, state: Any) -> tuple[str, str]:
    """Where in ``state`` the value that ``codec`` cannot encode is, and why; then what
    to store instead. Called after an encoding failed.

    Returns ``(what, instead)``: ``"state['rng']['state'] cannot be encoded: it is an
    int of 128 bits, and msgpack holds integers of at most 64 bits ..."``, and what
    ``get_state`` could return instead (``""`` for codecs other than msgpack).
    """
    path, value = _locate(codec, state, "state")
    if codec.name != "msgpack":
        return f"{path} cannot be encoded (it is {_type_name(value)})", ""
    numpy_random = type(value).__module__.startswith("numpy.random")
    if isinstance(value, int) and not (_MSGPACK_INT_RANGE[0] <= value <= _MSGPACK_INT_RANGE[1]):
        what = (
            f"{path} cannot be encoded: it is an int of {value.bit_length()} bits, and "
            "msgpack holds integers of at most 64 bits (-2**63 to 2**64-1)"
        )
        note = (
            "; numpy's random generators hold such integers in rng.bit_generator.state"
            if "state" in path.removeprefix("state")
            else ""
        )
        instead = f"return the integer as a string (str(value), int(...) in set_state{note})"
        return what, instead
    what = (
        f"{path} cannot be encoded: it is {_type_name(value)}, and msgpack holds only "
        "dicts, lists, strings, bytes, numbers (integers of at most 64 bits), booleans, "
        "None, and numpy arrays and scalars"
    )
    if numpy_random:
        instead = (
            "return rng.bit_generator.state instead of the generator, with its 128-bit "
            "integers as strings, and set it back in set_state"
        )
    else:
        instead = "return the value as plain data (strings, numbers, lists, dicts, arrays)"
    return what, instead


def _type_name(value: Any) -> str:
    cls = type(value)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return f"a {name}"


class _Discard(io.RawIOBase):
    """A sink for trial encodings."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return memoryview(data).nbytes


def accepts_buffers(codec: Codec) -> bool:
    """Whether ``codec.load`` takes ``buffers=`` (pickle's out-of-band buffers): its big
    files can be read in one verified pass, or memory-mapped."""
    return bool(getattr(codec, "accepts_buffers", False))


def reads_whole(codec: Codec) -> bool:
    """Whether ``codec.load`` reads its whole stream into memory before decoding (as
    msgpack's does): a restore that verifies such a file keeps the bytes it checksummed
    and decodes from them, instead of reading the file a second time (a second download
    from an object store). It costs no memory the decode would not take anyway: the bytes
    of one level are dropped as its state is decoded."""
    return bool(getattr(codec, "reads_whole", False))


def accepts_tensors(codec: Codec) -> bool:
    """Whether ``codec.load`` (and ``load_restricted``) take ``tensors=``: the restore's
    :class:`~ckptable._torch_placement.TensorPlacement`, which applies ``map_location``."""
    return bool(getattr(codec, "accepts_tensors", False))


def decodes_untrusted(codec: Codec) -> bool:
    """Whether ``codec.load`` is safe on bytes nothing has verified yet (it runs no code
    the file names and allocates nothing the file's size does not back), so that a
    verified restore can checksum a big file in the same pass that decodes it, instead
    of reading it twice (``decodes_untrusted = True`` on the codec)."""
    return bool(getattr(codec, "decodes_untrusted", False))


def maps_files(codec: Codec) -> bool:
    """Whether ``codec`` has ``load_mapped(stream)``: ``mmap=True`` restores then map its
    files (from the local disk) instead of reading them."""
    return callable(getattr(codec, "load_mapped", None))


def get_codec(name: str) -> Codec:
    """The codec registered as ``name`` (``"cloudpickle"``, ``"pickle"``, ``"msgpack"``,
    ``"safetensors"``)."""
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


def _register_safetensors() -> None:
    # (Imported here, at the end: the module imports nothing of this one, and no numpy,
    # torch or safetensors either; those only when a state needs them.)
    from ckptable._safetensors import SafetensorsCodec

    register_codec(SafetensorsCodec())


_register_safetensors()
