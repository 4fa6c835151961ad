"""The ``safetensors`` state codec: a level's state as a file any safetensors reader opens.

``save_to_path(path, format="safetensors")`` writes each level's state as
``state.safetensors``. ``safetensors.safe_open``, ``safetensors.numpy.load_file`` and
``safetensors.torch.load_file`` open it and see the state's arrays and tensors, named by
their key paths; ckptable reads it back as the exact state that was saved.

What fits: a (nested) dict with str keys whose leaves are numpy arrays and scalars, torch
tensors, or JSON-like values (None, bool, int, float including nan and ±inf, str, lists and
tuples of those, dicts and ``OrderedDict``s). Anything else (an object, a set, a non-str
key, an object-dtype array, a meta or sparse tensor, a dict subclass such as
``defaultdict``, a tuple subclass such as a namedtuple, a container holding itself) raises
``StateEncodingError`` naming its key path, before a byte is written.

The file is the standard format, written here directly (it is small, and what lets a save
stream at disk speed):

- 8 bytes: the header's length N, little-endian;
- N bytes: the JSON header, padded with spaces to a multiple of 8 (so the data starts
  8-aligned), holding ``{"dtype", "shape", "data_offsets"}`` for each tensor and the
  ``__metadata__`` map (str → str);
- the tensors' bytes, back to back, biggest item size first, so that every tensor starts
  at a multiple of its item size (mapped arrays are aligned).

Names: the key path joined with ``/``, each key escaped as in JSON Pointer (RFC 6901:
``~`` → ``~0``, ``/`` → ``~1``), list and tuple items by index:
``{"learner": {"module": {"encoder.0.weight": t}}}`` holds ``learner/module/encoder.0.weight``.
A name no reader could take (the reserved ``__metadata__``, or a key with a lone
surrogate) becomes ``~t<n>`` instead (``~t`` never comes out of the escaping).

Structure: ``__metadata__["ckptable"]`` holds one JSON document,
``{"format": "ckptable.safetensors", "version": 1, "tree": NODE}``, where NODE is a JSON
scalar (a None, bool, int, finite float or str leaf) or a one-tag object:
``{"d": {key: NODE}}`` dict, ``{"od": {...}}`` ``OrderedDict`` (``"meta"``: its
``_metadata`` attribute, as ``torch.nn.Module.state_dict()`` sets it), ``{"l": [NODE]}``
list, ``{"t": [NODE]}`` tuple, ``{"f": "nan" | "inf" | "-inf"}`` non-finite float,
``{"np": name}`` numpy array, ``{"ns": name}`` numpy scalar, ``{"pt": name}`` torch tensor
(``"grad": true`` if it required grad, ``"param": true`` for a ``torch.nn.Parameter``,
``"device": "cuda:0"`` if it was not on the CPU).

Exactness: tensors come back bit for bit, with their dtype and shape (0-d and empty
included), numpy as numpy and torch as torch, ``requires_grad`` and ``Parameter`` restored,
tensors placed by the restore's ``map_location`` (by default on their saved device, or
on the CPU with a warning where this machine lacks it).
Not kept: memory layout (a Fortran-ordered or strided array comes back C-contiguous), byte
order (a big-endian array comes back little-endian, same values), the sharing of memory
between arrays (each is written whole), the sign and payload of a float nan leaf.
dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL C64 and the fp8 types
F8_E4M3 F8_E5M2 F8_E4M3FNUZ F8_E5M2FNUZ F8_E8M0 (numpy has no bf16 or fp8: those are torch
tensors only).

Reading parses the header defensively (its length bounded by the file, every tensor's
dtype known, its size prod(shape) * itemsize, the tensors tiling the data region exactly,
no duplicate names, the structure valid and naming each tensor once); any violation is a
:class:`SafetensorsFormatError` (a ``ValueError``), which a restore reports as
``CorruptCheckpointError`` naming the file. Then each tensor is read with ``readinto``
straight into the memory of its final array. ``load_mapped`` (``mmap=True``) maps the
file copy-on-write instead: the arrays are backed by the file's pages and writable, and
writing to them never changes the file.

Nothing in a file can make the loader run code, so ``load_restricted`` is ``load``.
numpy is imported only for a state (or file) with arrays, torch only where the user has
imported it already (saving) or the file holds torch tensors (loading).

This module is the codec and its public names; the steps live in their own modules, each
with a docstring saying why:

1. :mod:`ckptable._safetensors_format`: the dtype table and the name and version of the
   structure record, which writing and reading share.
2. :mod:`ckptable._safetensors_encode`: checking that a state fits, the structure record,
   the header, streaming the tensors out.
3. :mod:`ckptable._safetensors_decode`: parsing and checking a header and its structure
   record defensively, reading tensors into their final memory, the mapped load.

The header limit, :data:`MAX_HEADER_BYTES`, is kept here and passed to both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from ckptable._safetensors_decode import SafetensorsFormatError, map_state, read_state
from ckptable._safetensors_encode import Planned, plan_file, write_file
from ckptable._safetensors_format import METADATA_KEY

if TYPE_CHECKING:
    from ckptable._torch_placement import TensorPlacement

__all__ = [
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "SafetensorsCodec",
    "SafetensorsFormatError",
]

#: The biggest header the reference reader (Rust) accepts; ckptable writes no bigger one.
MAX_HEADER_BYTES = 100_000_000


def encode(state: Any) -> tuple[bytes, list[Planned]]:
    """Check ``state`` and plan its file: the header and the tensors to write after it.

    Raises:
        StateEncodingError: a value does not fit (the message names its key path), or the
            header would exceed :data:`MAX_HEADER_BYTES`.
    """
    return plan_file(state, MAX_HEADER_BYTES)


class SafetensorsCodec:
    """Writes a state as a standard ``.safetensors`` file and reads it back exactly.

    See the module's documentation for what fits and how the file is laid out.
    """

    name = "safetensors"
    suffix = ".safetensors"
    #: Restores pass the restore's ``TensorPlacement`` (``map_location``) as ``tensors``.
    accepts_tensors = True
    #: Decoding runs no code and checks every length against the file's size before
    #: allocating: a verified restore checksums the file as it decodes it (one read).
    decodes_untrusted = True

    def dump(self, state: Any, stream: IO[bytes]) -> None:
        """Write ``state`` to ``stream``: the header, then each tensor's bytes straight
        from its memory. Everything is checked first: a state that does not fit raises
        ``StateEncodingError`` with nothing written."""
        header, tensors = encode(state)
        write_file(stream, header, tensors)

    def load(self, stream: IO[bytes], *, tensors: TensorPlacement | None = None) -> Any:
        """Read a state from ``stream``, each tensor read straight into its final array;
        torch tensors placed by ``tensors`` (the restore's ``map_location``; None: back
        on their saved devices where this machine has them, else on the CPU with a
        warning).

        Raises:
            SafetensorsFormatError: the file breaks the format (a ``ValueError``).
            IncompatibleCheckpointError: a newer ckptable wrote its structure record.
            ImportError: numpy (or, for torch tensors, torch) is not installed.
        """
        return read_state(stream, tensors, max_header=MAX_HEADER_BYTES)

    def load_restricted(
        self,
        stream: IO[bytes],
        *,
        allowed: Iterable[object] = (),
        allow_subclasses_of: type | None = None,
        source: str = "",
        tensors: TensorPlacement | None = None,
    ) -> Any:
        """``load``, for ``safe=True``: nothing in a safetensors file can run code."""
        return self.load(stream, tensors=tensors)

    def load_mapped(self, stream: IO[bytes], *, tensors: TensorPlacement | None = None) -> Any:
        """Read a state from the regular file open as ``stream``, its tensors mapped
        from the file (``mmap=True``) rather than read.

        The mapping is copy-on-write (``mmap.ACCESS_COPY``): the arrays are writable,
        what is written to them stays in this process's memory, and the file never
        changes. Pages are read when first touched. A tensor at an offset that is not a
        multiple of its item size (in files of other writers) is copied instead.
        """
        return map_state(stream, tensors, max_header=MAX_HEADER_BYTES)
