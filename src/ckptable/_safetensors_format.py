"""The safetensors codec's vocabulary, shared by writing and reading.

Why a module of its own: :mod:`ckptable._safetensors_encode` and
:mod:`ckptable._safetensors_decode` must agree on every dtype's name, item size and
numpy and torch counterparts, and on the name and version of ckptable's structure record
in ``__metadata__``; both take them from here (the format itself is described in
:mod:`ckptable._safetensors`). Nothing here imports numpy or torch: dtypes are named by
strings, resolved where a state or file needs them.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY", "DType"]

#: The ``__metadata__`` key holding ckptable's description of the state's structure.
METADATA_KEY = "ckptable"
#: The ``format`` and ``version`` of that description (a newer version is refused).
FORMAT_NAME = "ckptable.safetensors"
FORMAT_VERSION = 1


class DType(NamedTuple):
    """One safetensors dtype: its item size, the numpy dtype that holds it (None where
    numpy has none), torch's dtype attribute, and the numpy dtype its bytes are read into
    (the same as ``numpy``, or an integer of the same width for torch-only dtypes)."""

    itemsize: int
    numpy: str | None
    torch: str
    carrier: str


DTYPES: dict[str, DType] = {
    "F64": DType(8, "<f8", "float64", "<f8"),
    "F32": DType(4, "<f4", "float32", "<f4"),
    "F16": DType(2, "<f2", "float16", "<f2"),
    "BF16": DType(2, None, "bfloat16", "<i2"),
    "I64": DType(8, "<i8", "int64", "<i8"),
    "I32": DType(4, "<i4", "int32", "<i4"),
    "I16": DType(2, "<i2", "int16", "<i2"),
    "I8": DType(1, "i1", "int8", "i1"),
    "U64": DType(8, "<u8", "uint64", "<u8"),
    "U32": DType(4, "<u4", "uint32", "<u4"),
    "U16": DType(2, "<u2", "uint16", "<u2"),
    "U8": DType(1, "u1", "uint8", "u1"),
    "BOOL": DType(1, "?", "bool", "?"),
    "C64": DType(8, "<c8", "complex64", "<c8"),
    "F8_E4M3": DType(1, None, "float8_e4m3fn", "i1"),
    "F8_E5M2": DType(1, None, "float8_e5m2", "i1"),
    "F8_E4M3FNUZ": DType(1, None, "float8_e4m3fnuz", "i1"),
    "F8_E5M2FNUZ": DType(1, None, "float8_e5m2fnuz", "i1"),
    "F8_E8M0": DType(1, None, "float8_e8m0fnu", "i1"),
}
