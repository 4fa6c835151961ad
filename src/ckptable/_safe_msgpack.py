"""Safe loading, part 5: msgpack decoding that never unpickles.

Why: msgpack-numpy's decoder calls ``pickle.loads`` on object-dtype arrays, and builds
any other array with ``numpy.ndarray(buffer=...)``, which makes object arrays from raw
bytes when the file claims an object dtype under another kind.
:func:`safe_msgpack_decode` refuses every array or scalar whose dtype holds objects
before msgpack-numpy sees it, and otherwise delegates to ``msgpack_numpy.decode``.
msgpack, msgpack-numpy and numpy are imported only when something is decoded.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, cast

from ckptable.errors import UnsafeCheckpointError

__all__ = ["safe_msgpack_decode"]


def _import_msgpack_numpy() -> types.ModuleType:
    try:
        import msgpack  # noqa: F401  (msgpack_numpy needs it; say so if it is missing)
        import msgpack_numpy
    except ImportError:
        raise ImportError(
            "The msgpack format needs msgpack and msgpack-numpy: pip install 'ckptable[msgpack]'"
        ) from None
    return cast(types.ModuleType, msgpack_numpy)


def safe_msgpack_decode(
    obj: Any, chain: Callable[[Any], Any] | None = None, *, source: str = ""
) -> Any:
    """``msgpack_numpy.decode`` that never unpickles: an ``object_hook`` for ``unpackb``.

    Arrays and scalars whose dtype holds Python objects are refused before msgpack-numpy
    sees them: it would ``pickle.loads`` an object array (``kind == b"O"``), or build
    one from raw bytes if the file gives an object dtype under another kind. Everything
    else is decoded exactly as ``msgpack_numpy.decode(obj, chain)`` does. Pass
    ``functools.partial(safe_msgpack_decode, source=path)`` to name the file in errors.

    Raises:
        UnsafeCheckpointError: For an array or scalar with an object dtype.
        ImportError: If msgpack or msgpack-numpy is not installed.
    """
    msgpack_numpy = _import_msgpack_numpy()
    if isinstance(obj, dict) and b"nd" in obj:
        _check_msgpack_array(obj, source)
    return msgpack_numpy.decode(obj, chain=chain)


def _check_msgpack_array(obj: dict[Any, Any], source: str) -> None:
    """Refuse what ``msgpack_numpy.decode`` would build with an object dtype.

    Mirrors decode's reading of the dict (same keys, same order, same ``KeyError`` =
    "not an array" rule), then builds the dtype it would build.
    """
    import numpy

    where = f"Unsafe msgpack checkpoint{' ' + source if source else ''}"
    try:
        if obj[b"nd"] is True:
            kind = obj.get(b"kind")
            if kind == b"O":
                raise UnsafeCheckpointError(
                    f"{where}: it holds a numpy array of Python objects, which "
                    "msgpack-numpy stores as a pickle; safe loading never unpickles",
                    path=source or None,
                )
            if kind == b"V":
                descr: Any = [
                    tuple(t.decode() if type(t) is bytes else t for t in d) for d in obj[b"type"]
                ]
            else:
                descr = obj[b"type"]
        else:
            descr = obj[b"type"]
        dtype = _unpack_dtype(numpy, descr)
    except KeyError:
        return  # decode returns obj unchanged (or passes it to chain)
    if dtype.hasobject:
        raise UnsafeCheckpointError(
            f"{where}: it holds numpy data of dtype {dtype}, which contains Python "
            "objects; building it from the file's bytes would read them as raw pointers",
            path=source or None,
        )


def _unpack_dtype(numpy: Any, descr: Any) -> Any:
    """``msgpack_numpy._unpack_dtype``: a dtype from a (possibly nested) descr."""
    if isinstance(descr, (list, tuple)):
        descr = [(sub[0], _unpack_dtype(numpy, sub[1]), *tuple(sub[2:])) for sub in descr]
    return numpy.dtype(descr)
