"""Safe loading, part 3: numpy arrays, dtypes and scalars that are memory-safe.

Why: numpy's unpickling functions trust the file's bytes. A crafted pickle naming only
allowlisted numpy globals can corrupt memory, or read it (arrays of raw pointers, arrays
over uninitialised memory). This module holds numpy's argument rules (registered beside
the others of :mod:`ckptable._safe_rules`) and the checks of the states ``BUILD`` gives
numpy objects, which close these holes:

- ``numpy._core.multiarray._reconstruct(subtype, shape, dtype)`` allocates ``shape`` and
  leaves it uninitialised, for the ``BUILD`` (``ndarray.__setstate__``) that follows to
  replace. Here it always makes a zero-size array; one asked for with a non-zero shape
  is *pending* until its ``BUILD``, and a pickle that ends with an array still pending is
  refused (:class:`UnbuiltArrays`). ``copyreg._reconstructor`` and ``NEWOBJ`` never make
  numpy objects.
- ``ndarray.__setstate__`` frees an array's memory while views of it may exist, reads an
  object array's list past its end if it is short, and builds object arrays from raw
  bytes. It is applied once, only to an array ``_reconstruct`` made in this load, and
  only with a state whose shape, dtype and data agree exactly (bytes of exactly
  ``size * itemsize``, or a list of exactly ``size`` objects for object dtypes).
- ``numpy.dtype.__setstate__`` takes the type flags from the file, so a structured
  dtype with an object field can claim to hold no objects, and ``_frombuffer`` then
  builds an object array from raw bytes. A dtype's state is applied to a private copy
  (:func:`dtype_with_state`), which must equal a dtype numpy's own constructor builds
  from the same layout; the copy then replaces the original on the stack and in the
  memo (:class:`DtypeMemo`), so a dtype already in use never changes under an array.
- ``numpy.ndarray`` itself is never called or ``__new__``-ed (``ndarray(shape, object,
  buffer)`` reads object pointers from bytes). ``_frombuffer`` only takes bytes-like
  buffers (never an array: no views of arrays the pickle may reset), a dtype without
  objects and a shape that covers the buffer exactly; ``scalar(dtype, data)`` takes
  exactly ``itemsize`` bytes, or, for a structured dtype with objects, a 0-d array of
  that very dtype (numpy reads a zero-size one past its end).

numpy is never imported here: its objects can only exist once it has been imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ckptable._buffer_views import note_array_buffer
from ckptable._safe_allowlist import imported_numpy
from ckptable._safe_rules import BYTES_LIKE, Rule, arity, brief, register_rules
from ckptable.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    from ckptable._safe_unpickler import SafeUnpickler

__all__ = [
    "DtypeMemo",
    "UnbuiltArrays",
    "dtype_with_state",
    "rule_reconstruct",
]

#: numpy 2's limit on an array's dimensions (numpy 1's is 32: it refuses more itself).
_MAX_DIMS = 64


def _shape_size(shape: object) -> int | None:
    """The number of items of a shape (a tuple or list of ints >= 0); None if invalid."""
    if type(shape) not in (tuple, list) or len(shape) > _MAX_DIMS:  # type: ignore[arg-type]
        return None
    size = 1
    for dim in shape:  # type: ignore[attr-defined]
        if type(dim) is not int or dim < 0:
            return None
        size *= dim
    return size


def _rule_dtype(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """numpy.dtype(typecode[, align[, copy]]), as numpy's own pickles call it."""
    problem = arity(args, 1, 3)
    if problem is not None:
        return problem
    if not isinstance(args[0], (str, bytes)) or len(args[0]) > 256:
        return "numpy.dtype() takes a type code (text)"
    if not all(type(flag) is bool or (type(flag) is int and flag in (0, 1)) for flag in args[1:]):
        return "its align and copy flags must be booleans"
    return None


def _rule_ndarray(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return "numpy.ndarray is never called: it reads object pointers or uninitialised memory"


def rule_reconstruct(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """numpy's ``_reconstruct(subtype, shape, dtype)`` (see ``UnbuiltArrays.make``)."""
    problem = arity(args, 3, 3)
    if problem is not None:
        return problem
    numpy = imported_numpy()
    subtype, shape, dtype = args
    if not (
        numpy is not None
        and isinstance(subtype, type)
        and issubclass(subtype, numpy.ndarray)
        and u._globals.get(id(subtype)) is subtype
    ):
        return "its first argument must be numpy.ndarray or a subclass the pickle named"
    if _shape_size(shape) is None:
        return f"its shape must be a tuple of at most {_MAX_DIMS} ints >= 0"
    if not (
        isinstance(dtype, numpy.dtype) or (isinstance(dtype, (str, bytes)) and len(dtype) <= 64)
    ):
        return "its dtype must be a numpy dtype or a type code"
    return None


def _rule_scalar(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """numpy's ``scalar(dtype, data)``: exactly ``itemsize`` bytes of data, or for a
    structured dtype with objects a 0-d array of that dtype (numpy reads one item of
    ``dtype`` from the array's memory, past the end of an empty one)."""
    numpy = imported_numpy()
    if len(args) != 2:
        return "numpy writes scalar(dtype, data); without data it makes a zeroed item of any size"
    dtype, data = args
    if numpy is None or not isinstance(dtype, numpy.dtype):
        return f"its dtype is a {type(dtype).__name__}"
    if dtype.hasobject:
        if dtype.names is None:
            return "a scalar of Python objects (numpy never pickles one)"
        if (
            type(data) is not numpy.ndarray
            or data.dtype != dtype
            or data.dtype.itemsize != dtype.itemsize
            or data.shape != ()
            or id(data) in u._arrays.pending
        ):
            return "a structured scalar with objects is made from a 0-d array of its dtype"
        return None
    if not isinstance(data, (bytes, str)) or len(data) != dtype.itemsize:
        length = len(data) if isinstance(data, (bytes, str)) else type(data).__name__
        return f"its data must be exactly {dtype.itemsize} bytes for {dtype}, not {length}"
    return None


def _rule_frombuffer(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """numpy's ``_frombuffer(buffer, dtype, shape, order)``: a view of exactly the buffer."""
    problem = arity(args, 4, 4)
    if problem is not None:
        return problem
    numpy = imported_numpy()
    buffer, dtype, shape, order = args
    note_array_buffer(buffer)  # (see _buffer_views)
    if not isinstance(buffer, BYTES_LIKE):
        return (
            "its buffer must be bytes, a bytearray or a pickle buffer, not a "
            f"{type(buffer).__name__} (a view of an array could outlive its memory)"
        )
    with memoryview(cast(Any, buffer)) as view:
        nbytes, contiguous = view.nbytes, view.contiguous
    if not contiguous:
        return "its buffer is not contiguous"
    if numpy is None or not isinstance(dtype, numpy.dtype):
        return f"its dtype is a {type(dtype).__name__}"
    if dtype.hasobject:
        return f"its dtype {dtype} holds Python objects, which raw bytes would fake as pointers"
    if dtype.itemsize == 0:
        return f"its dtype {dtype} has no size"
    size = _shape_size(shape)
    if size is None:
        return f"its shape must be a tuple of at most {_MAX_DIMS} ints >= 0"
    if size * dtype.itemsize != nbytes:
        return f"{size} items of {dtype.itemsize} bytes over a buffer of {nbytes} bytes"
    if type(order) is not str or order not in ("C", "F", "A"):
        return f"the order {brief(order)}"
    return None


#: The rules of numpy's allowlisted callables, by where each is found.
_NUMPY_RULES: dict[tuple[str, str], Rule] = {
    ("numpy", "dtype"): _rule_dtype,
    ("numpy", "ndarray"): _rule_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): rule_reconstruct,
    ("numpy._core.multiarray", "scalar"): _rule_scalar,
    ("numpy._core.numeric", "_frombuffer"): _rule_frombuffer,
}

register_rules(_NUMPY_RULES)


# --------------------------------------------------------------------------------------
# Arrays: made empty by _reconstruct, given their state once by BUILD
# --------------------------------------------------------------------------------------


class UnbuiltArrays:
    """The arrays ``_reconstruct`` made in one load whose ``BUILD`` has not come yet.

    Only these arrays may be given a state, once. Of those, the ones asked for with a
    non-zero size are made empty and kept *pending*: the pickle is refused if it ends
    before their ``BUILD`` (see :meth:`unfinished`).
    """

    __slots__ = ("pending", "unbuilt")

    def __init__(self) -> None:
        self.unbuilt: dict[int, Any] = {}
        self.pending: dict[int, tuple[Any, Any, Any]] = {}

    def make(self, reconstruct: Any, args: tuple[Any, ...]) -> Any:
        """``_reconstruct(subtype, shape, dtype)``, always with no memory to leak.

        numpy leaves the array's memory uninitialised for the BUILD that follows; its own
        pickles ask for shape ``(0,)``. A non-zero size is made empty and kept pending
        until its BUILD, which gives it its real shape and data.
        """
        subtype, shape, dtype = args
        size = _shape_size(shape)
        array = reconstruct(subtype, shape if size == 0 else (0,), dtype)
        self.unbuilt[id(array)] = array
        if size:
            self.pending[id(array)] = (array, shape, dtype)
        return array

    def build(
        self,
        numpy: Any,
        inst: Any,
        state: Any,
        refuse: Callable[[str], UnsafeCheckpointError],
        corrupt: Callable[[str], CorruptCheckpointError],
    ) -> None:
        """``inst.__setstate__(state)`` for an array ``_reconstruct`` made, once."""
        if self.unbuilt.get(id(inst)) is not inst:
            raise refuse(
                "the pickle sets the state of an array that already holds data or was not "
                "made by numpy's _reconstruct; numpy would free memory that views of it "
                "still use"
            )
        if getattr(type(inst), "__setstate__", None) is numpy.ndarray.__setstate__:
            problem = _array_state_problem(numpy, state)
            if problem is not None:
                raise refuse(f"refusing the state of a numpy array: {problem}")
        del self.unbuilt[id(inst)]
        self.pending.pop(id(inst), None)
        try:
            cast(Any, inst).__setstate__(state)
        except CheckpointError:
            raise
        except Exception as exc:
            raise corrupt(
                f"setting the state of a numpy array failed: {type(exc).__name__}: {exc}"
            ) from exc

    def unfinished(self) -> tuple[Any, Any] | None:
        """The shape and dtype of an array still pending, if any."""
        if not self.pending:
            return None
        _, shape, dtype = next(iter(self.pending.values()))
        return shape, dtype


def _array_state_problem(numpy: Any, state: Any) -> str | None:
    """Why ``ndarray.__setstate__(state)`` is refused: the state's shape, dtype and data
    must agree exactly (numpy reads a short object list past its end)."""
    if type(state) is not tuple or len(state) not in (4, 5):
        return "it is not numpy's (version, shape, dtype, is_fortran, data) tuple"
    if len(state) == 5 and (type(state[0]) is not int or state[0] not in (0, 1)):
        return f"the pickle version {brief(state[0])}"
    shape, dtype, fortran, data = state[-4:]
    size = _shape_size(shape)
    if size is None:
        return f"its shape must be a tuple of at most {_MAX_DIMS} ints >= 0"
    if not isinstance(dtype, numpy.dtype):
        return f"its dtype is a {type(dtype).__name__}"
    if not (type(fortran) is bool or (type(fortran) is int and fortran in (0, 1))):
        return "its is_fortran flag must be a boolean"
    if dtype.hasobject:
        if type(data) is not list or len(data) != size:
            return (
                f"an array of {dtype} holds Python objects: its data must be a list of "
                f"exactly {size} items, not {brief(data)}"
            )
        return None
    if not isinstance(data, (bytes, str)) or len(data) != size * dtype.itemsize:
        length = f"{len(data)} bytes" if isinstance(data, (bytes, str)) else brief(data)
        return (
            f"{size} items of {dtype} need exactly {size * dtype.itemsize} bytes of data, "
            f"not {length}"
        )
    return None


# --------------------------------------------------------------------------------------
# Dtypes: state applied to a private copy, which replaces the original
# --------------------------------------------------------------------------------------


def dtype_with_state(
    numpy: Any, inst: Any, state: Any, refuse: Callable[[str], UnsafeCheckpointError]
) -> Any:
    """``inst.__setstate__(state)`` applied to a private copy, checked for consistency.

    ``inst`` itself is never changed: arrays may already use it. (``numpy.dtype(inst,
    copy=True)`` would return ``inst`` itself; a dtype string with ``copy=True`` always
    makes a new object, as in numpy's own ``__reduce__``.)
    """
    fresh = numpy.dtype(inst.str, False, True)
    if fresh is inst:
        raise refuse("numpy did not copy a dtype whose state the pickle sets")
    try:
        fresh.__setstate__(state)
    except Exception as exc:
        raise refuse(
            f"the pickle builds an inconsistent numpy dtype (numpy refuses its state: "
            f"{type(exc).__name__}: {exc})"
        ) from exc
    problem = _dtype_problem(numpy, fresh, 0)
    if problem is not None:
        raise refuse(f"the pickle builds an inconsistent numpy dtype ({problem})")
    return fresh


def _dtype_problem(numpy: Any, dtype: Any, depth: int) -> str | None:
    """Why ``dtype`` differs from the one numpy's constructor builds for its layout.

    ``None`` if it does not: its flags (objects or not), sizes and offsets are then the
    ones numpy checked itself.
    """
    if depth > 32:
        return "nested too deeply"
    if not isinstance(dtype, numpy.dtype):
        return f"a field type is a {type(dtype).__name__}, not a dtype"
    names, fields, subdtype = dtype.names, dtype.fields, dtype.subdtype
    try:
        if subdtype is not None:
            if names is not None or fields is not None:
                return "both a subarray and fields"
            base, shape = subdtype
            problem = _dtype_problem(numpy, base, depth + 1)
            if problem is not None:
                return problem
            canonical = numpy.dtype((base, shape))
        elif names is not None or fields is not None:
            problem = _fields_problem(numpy, names, fields, depth)
            if problem is not None:
                return problem
            entries = [fields[name] for name in names]
            spec: dict[str, Any] = {
                "names": list(names),
                "formats": [entry[0] for entry in entries],
                "offsets": [entry[1] for entry in entries],
                "itemsize": dtype.itemsize,
            }
            if any(len(entry) == 3 for entry in entries):
                spec["titles"] = [entry[2] if len(entry) == 3 else None for entry in entries]
            canonical = numpy.dtype(spec, align=dtype.isalignedstruct)
        else:
            canonical = numpy.dtype(dtype.str)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        return f"numpy refuses its layout: {exc}"
    for attribute in ("num", "str", "itemsize", "alignment", "flags", "names", "fields"):
        actual, expected = getattr(dtype, attribute), getattr(canonical, attribute)
        if actual != expected:
            return f"{attribute} is {actual!r}, not {expected!r}"
    if canonical != dtype:
        return f"it is not {canonical!r}"
    return None


def _fields_problem(numpy: Any, names: Any, fields: Any, depth: int) -> str | None:
    if names is None or fields is None:
        return "names without fields or fields without names"
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        return "field names that are not distinct strings"
    titles = 0
    for name in names:
        entry = fields.get(name)
        if not isinstance(entry, tuple) or len(entry) not in (2, 3):
            return f"field {name!r} is {entry!r}"
        if type(entry[1]) is not int:
            return f"field {name!r} has the offset {entry[1]!r}"
        titles += len(entry) == 3 and entry[2] is not None
        problem = _dtype_problem(numpy, entry[0], depth + 1)
        if problem is not None:
            return problem
    if len(fields) != len(names) + titles:
        return "fields that are not among its names"
    return None


class DtypeMemo(dict[int, Any]):
    """The unpickler's memo, remembering under which keys each dtype was stored.

    So that a dtype whose state is applied to a private copy (see ``dtype_with_state``) can
    be replaced by that copy wherever the pickle will fetch it from.
    """

    __slots__ = ("dtype_keys", "dtype_type")

    def __init__(self) -> None:
        super().__init__()
        self.dtype_type: type | None = None
        self.dtype_keys: dict[int, tuple[object, list[int]]] = {}

    def __setitem__(self, key: int, value: Any) -> None:
        super().__setitem__(key, value)
        if self.dtype_type is not None and isinstance(value, self.dtype_type):
            entry = self.dtype_keys.setdefault(id(value), (value, []))
            entry[1].append(key)

    def replace(self, old: object, new: object) -> None:
        """Store ``new`` under every key that holds ``old``."""
        entry = self.dtype_keys.pop(id(old), None)
        if entry is None or entry[0] is not old:
            return
        for key in entry[1]:
            if self.get(key) is old:
                self[key] = new
