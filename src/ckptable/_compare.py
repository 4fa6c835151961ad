"""Array-aware comparison of two states: every difference, named by its key path.

Shared by ``ckptable.testing.assert_states_equal`` and the ``ckptable diff`` command.
States are trees of dicts, lists, tuples, sets, scalars, byte strings, numpy arrays and
user objects; ``==`` alone fails on them (an array's ``==`` is an array, NaN is not equal
to itself, one message for the whole tree says nothing about where). numpy is optional:
it is only touched when one of the two sides holds a numpy value, and then it is already
imported by whoever made that value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import reprlib
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

__all__ = ["KINDS", "Difference", "state_differences"]

#: The kinds of difference, in the order they are usually checked at one node.
KINDS = ("missing", "extra", "type", "shape", "dtype", "value", "length")


@dataclasses.dataclass(frozen=True)
class Difference:
    """One place where two states differ.

    Attributes:
        path: Where, as Python would index it: ``state['learner']['weights'][3]``
            (the ``where`` prefix, then keys, indices and ``.attribute`` names).
        kind: ``"missing"`` (only in expected), ``"extra"`` (only in actual),
            ``"type"``, ``"shape"``, ``"dtype"``, ``"value"`` or ``"length"``.
        detail: One human-readable line; values are given as ``actual != expected``.
    """

    path: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


def state_differences(
    actual: Any,
    expected: Any,
    *,
    where: str = "state",
    limit: int | None = None,
    same_types: bool = False,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> list[Difference]:
    """Every difference between two states, in tree order (expected's key order first).

    Mappings are compared key by key (missing and extra keys by name); lists and tuples
    item by item (a list equals a tuple unless ``same_types``); sets by membership;
    numpy arrays by shape, dtype, then values (NaN equals NaN, as in
    ``numpy.testing.assert_array_equal``; one difference per array, with the count of
    differing elements, the largest absolute difference and the first differing index);
    dataclasses field by field; objects of one class that keep ``object``'s identity
    ``__eq__`` attribute by attribute (``vars()``); anything else with ``==`` (an
    ``==`` that returns an array counts as equal when all its elements are true; one
    that raises counts as a difference naming the exception).

    Args:
        actual: The state found (``A`` of ``ckptable diff A B``).
        expected: The state wanted (``B``).
        where: Name of the root in the paths.
        limit: Stop after this many differences (at least 1); None for all.
        same_types: Also require the same type at every node (``list`` vs ``tuple``,
            ``numpy.float32`` vs ``float``, ``dict`` vs ``OrderedDict``).
        rtol: Relative tolerance for numbers and numeric arrays, as ``numpy.isclose``:
            equal if ``abs(actual - expected) <= atol + rtol * abs(expected)``.
        atol: Absolute tolerance, as above.

    Returns:
        The differences found; empty if the states are equal.

    Raises:
        ValueError: ``limit`` below 1 or a negative tolerance.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 or None, not {limit!r}")
    if rtol < 0 or atol < 0:
        raise ValueError(f"tolerances must not be negative (rtol={rtol!r}, atol={atol!r})")
    comparer = _Comparer(limit=limit, same_types=same_types, rtol=rtol, atol=atol)
    with contextlib.suppress(_Enough):
        comparer.compare(actual, expected, where)
    return comparer.found


class _Enough(Exception):
    """Raised inside the walk once ``limit`` differences are found."""


_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = 8
_repr.maxdict = 5
_repr.maxlevel = 3


def _is_numpy(value: Any) -> bool:
    module = type(value).__module__
    return module == "numpy" or module.startswith("numpy.")


def _is_ndarray(value: Any) -> bool:
    # Nothing holds an array unless numpy is imported already: never import it here.
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def _is_numpy_scalar(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.generic)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(
        value, (str, bytes, bytearray, memoryview)
    )


def _is_bytes(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview))


def _category(value: Any) -> str:
    """The comparison a node gets; two nodes of different categories never match."""
    if _is_ndarray(value):
        return "array"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, AbstractSet):
        return "set"
    if _is_sequence(value):
        return "sequence"
    return "scalar"


_CATEGORY_NAMES = {
    "array": "a numpy array",
    "mapping": "a mapping",
    "set": "a set",
    "sequence": "a list or tuple",
}


def _type_name(value: Any) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    module = "numpy" if _is_numpy(value) else cls.__module__
    return f"{module}.{cls.__qualname__}"


def _show(value: Any) -> str:
    """A short one-line rendering of a value for a message."""
    if _is_ndarray(value):
        if value.size <= 8 and value.dtype.kind in "biufcUS":
            return f"array({value.tolist()!r}, dtype={value.dtype})"
        return f"array(shape={value.shape}, dtype={value.dtype})"
    if _is_numpy_scalar(value):
        return _repr.repr(value.item()) if value.dtype.kind in "US" else str(value)
    text = _repr.repr(value)
    return text.replace("\n", " ")


def _index_text(index: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(i) for i in index) + ("," if len(index) == 1 else "") + ")"


class _Comparer:
    """One walk over two trees, collecting ``Difference``s until ``limit``."""

    def __init__(self, *, limit: int | None, same_types: bool, rtol: float, atol: float):
        self.limit = limit
        self.same_types = same_types
        self.rtol = rtol
        self.atol = atol
        self.found: list[Difference] = []
        self._active: set[tuple[int, int]] = set()

    def add(self, path: str, kind: str, detail: str) -> None:
        self.found.append(Difference(path, kind, detail))
        if self.limit is not None and len(self.found) >= self.limit:
            raise _Enough

    def compare(self, actual: Any, expected: Any, path: str) -> None:
        if actual is expected:
            return
        if self.same_types and type(actual) is not type(expected):
            self.add(path, "type", f"type {_type_name(actual)} != {_type_name(expected)}")
        category = _category(expected)
        if _category(actual) != category:
            if self.same_types:
                return  # the type difference says it already
            wanted = _CATEGORY_NAMES.get(category, _type_name(expected))
            self.add(path, "type", f"{_type_name(actual)} ({_show(actual)}), expected {wanted}")
            return
        if category == "scalar":
            self._scalars(actual, expected, path)
            return
        if category == "array":
            self._arrays(actual, expected, path)
            return
        key = (id(actual), id(expected))
        if key in self._active:  # a cycle: compared further up this branch
            return
        self._active.add(key)
        try:
            if category == "mapping":
                self._mappings(actual, expected, path)
            elif category == "set":
                self._sets(actual, expected, path)
            else:
                self._sequences(actual, expected, path)
        finally:
            self._active.discard(key)

    def _mappings(self, actual: Mapping[Any, Any], expected: Mapping[Any, Any], path: str) -> None:
        for key in expected:
            if key not in actual:
                self.add(f"{path}[{key!r}]", "missing", f"only in expected: {_show(expected[key])}")
        for key in actual:
            if key not in expected:
                self.add(f"{path}[{key!r}]", "extra", f"only in actual: {_show(actual[key])}")
        for key in expected:
            if key in actual:
                self.compare(actual[key], expected[key], f"{path}[{key!r}]")

    def _sets(self, actual: AbstractSet[Any], expected: AbstractSet[Any], path: str) -> None:
        missing = [item for item in expected if item not in actual]
        extra = [item for item in actual if item not in expected]
        parts = []
        if missing:
            parts.append(f"{len(missing)} only in expected: {_show(set(missing))}")
        if extra:
            parts.append(f"{len(extra)} only in actual: {_show(set(extra))}")
        if parts:
            self.add(path, "value", "sets differ: " + "; ".join(parts))

    def _sequences(self, actual: Sequence[Any], expected: Sequence[Any], path: str) -> None:
        if len(actual) != len(expected):
            common = min(len(actual), len(expected))
            if len(actual) > common:
                rest = f"extra items: {_show(list(actual[common:]))}"
            else:
                rest = f"missing items: {_show(list(expected[common:]))}"
            self.add(path, "length", f"{len(actual)} items, expected {len(expected)} ({rest})")
        for index, (item, wanted) in enumerate(zip(actual, expected, strict=False)):
            self.compare(item, wanted, f"{path}[{index}]")

    def _arrays(self, actual: Any, expected: Any, path: str) -> None:
        if actual.shape != expected.shape:
            self.add(path, "shape", f"shape {actual.shape} != {expected.shape}")
        if actual.dtype != expected.dtype:
            self.add(path, "dtype", f"dtype {actual.dtype} != {expected.dtype}")
        if actual.shape != expected.shape:
            return
        kinds = actual.dtype.kind + expected.dtype.kind
        if actual.dtype != expected.dtype and not (
            set(kinds) <= set("biufc") or set(kinds) <= set("US")
        ):
            return  # values of different kinds of dtype (text vs numbers) are not compared
        detail = _array_values_detail(actual, expected, self.rtol, self.atol, self.same_types)
        if detail:
            self.add(path, "value", detail)

    def _scalars(self, actual: Any, expected: Any, path: str) -> None:
        if type(actual) is type(expected) and not _is_numpy(expected):
            if dataclasses.is_dataclass(expected) and _dataclass_compares_fields(expected):
                for field in dataclasses.fields(expected):
                    if field.compare:
                        self._attribute(actual, expected, field.name, path)
                return
            if _uses_identity_eq(expected) and _has_attributes(expected):
                self._attributes(actual, expected, path)
                return
        equal, error = _equal(actual, expected, self.rtol, self.atol)
        if equal:
            return
        if type(actual) is type(expected) and _has_attributes(expected):
            # Locate the difference inside the object; an ``==`` that raised (on arrays,
            # say) leaves the verdict to the attributes, one that said False does not.
            inside = _Comparer(
                limit=self.limit, same_types=self.same_types, rtol=self.rtol, atol=self.atol
            )
            with contextlib.suppress(_Enough):
                inside._attributes(actual, expected, path)
            for difference in inside.found:
                self.add(difference.path, difference.kind, difference.detail)
            if inside.found or error:
                return
        self.add(path, "value", _scalar_detail(actual, expected, error))

    def _attributes(self, actual: Any, expected: Any, path: str) -> None:
        key = (id(actual), id(expected))
        if key in self._active:
            return
        self._active.add(key)
        try:
            mine, theirs = vars(actual), vars(expected)
            for name in theirs:
                if name not in mine:
                    self.add(
                        f"{path}.{name}", "missing", f"only in expected: {_show(theirs[name])}"
                    )
            for name in mine:
                if name not in theirs:
                    self.add(f"{path}.{name}", "extra", f"only in actual: {_show(mine[name])}")
            for name in theirs:
                if name in mine:
                    self.compare(mine[name], theirs[name], f"{path}.{name}")
        finally:
            self._active.discard(key)

    def _attribute(self, actual: Any, expected: Any, name: str, path: str) -> None:
        key = (id(actual), id(expected))
        if key in self._active:
            return
        self._active.add(key)
        try:
            self.compare(getattr(actual, name), getattr(expected, name), f"{path}.{name}")
        finally:
            self._active.discard(key)


def _has_attributes(value: Any) -> bool:
    """True for instances whose ``vars()`` is their state: not classes, functions,
    methods or modules (two of those are the same only if they are one object)."""
    return hasattr(value, "__dict__") and not isinstance(value, _NOT_INSTANCES)


_NOT_INSTANCES = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    functools.partial,
)


def _uses_identity_eq(value: Any) -> bool:
    """True if ``value``'s class keeps ``object``'s ``==`` (which is identity)."""
    eq: Any = type(value).__eq__
    return eq is object.__eq__


def _dataclass_compares_fields(value: Any) -> bool:
    """True if ``value``'s ``==`` is the one ``@dataclass`` generated (fields in order)."""
    params = getattr(type(value), "__dataclass_params__", None)
    return bool(getattr(params, "eq", False))


def _equal(actual: Any, expected: Any, rtol: float, atol: float) -> tuple[bool, str | None]:
    """``actual == expected`` made total: NaN equals NaN, tolerances apply to numbers, an
    array-valued result must be all true, and an exception is a difference (returned)."""
    try:
        result = actual == expected
        equal = _truth(result)
    except Exception as error:  # any failing __eq__ is a difference
        return False, f"{type(error).__name__}: {error}"
    if equal:
        return True, None
    numbers_ = _is_number(actual) and _is_number(expected)
    if numbers_ and (_both_nan(actual, expected) or _close(actual, expected, rtol, atol)):
        return True, None
    return False, None


def _close(actual: Any, expected: Any, rtol: float, atol: float) -> bool:
    """Within the tolerances, as ``numpy.isclose`` (False for exotic number types)."""
    if not (rtol or atol):
        return False
    try:
        return bool(abs(actual - expected) <= atol + rtol * abs(expected))
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        return False


def _truth(result: Any) -> bool:
    if isinstance(result, bool):
        return result
    if result is NotImplemented:
        return False
    all_ = getattr(result, "all", None)
    if callable(all_):  # an array (numpy's or another library's) of element results
        return bool(all_())
    return bool(result)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _both_nan(actual: Any, expected: Any) -> bool:
    def is_nan(value: Any) -> bool:
        if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
            return math.isnan(value.real) or math.isnan(value.imag)
        return isinstance(value, numbers.Real) and math.isnan(value)

    try:
        return is_nan(actual) and is_nan(expected)
    except (TypeError, ValueError, OverflowError):
        return False


def _scalar_detail(actual: Any, expected: Any, error: str | None) -> str:
    if error:
        return f"{_show(actual)} == {_show(expected)} raised {error}"
    detail = f"{_show(actual)} != {_show(expected)}"
    if type(actual) is not type(expected) and _type_name(actual) != _type_name(expected):
        detail += f" ({_type_name(actual)} vs {_type_name(expected)})"
    if _is_number(actual) and _is_number(expected):
        left, right = _python_number(actual), _python_number(expected)
        with contextlib.suppress(Exception):  # numbers that cannot subtract: no diff shown
            detail += f" (abs diff {_magnitude(abs(left - right))})"
    elif (isinstance(actual, str) and isinstance(expected, str)) or (
        _is_bytes(actual) and _is_bytes(expected)
    ):
        first = _first_difference(actual, expected)
        detail += f" (lengths {len(actual)} and {len(expected)}, first difference at {first})"
    return detail


def _magnitude(value: Any) -> str:
    """A difference for reading: floats to 6 significant digits, other numbers exact."""
    return repr(float(f"{value:.6g}")) if isinstance(value, float) else _show(value)


def _python_number(value: Any) -> Any:
    """A numpy scalar as a Python number (no overflow in differences of int64s)."""
    return value.item() if _is_numpy_scalar(value) else value


def _first_difference(actual: Any, expected: Any) -> int:
    left = actual.tobytes() if isinstance(actual, memoryview) else actual
    right = expected.tobytes() if isinstance(expected, memoryview) else expected
    for index, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return index
    return min(len(left), len(right))


def _array_values_detail(
    actual: Any, expected: Any, rtol: float, atol: float, same_types: bool
) -> str | None:
    """The value difference of two arrays of one shape, or None if all elements match."""
    numpy = sys.modules["numpy"]
    kinds = set(actual.dtype.kind + expected.dtype.kind)
    if kinds <= set("biufc"):
        differ = _numeric_mismatch(numpy, actual, expected, rtol, atol)
    elif kinds <= set("USmM") and actual.dtype.kind == expected.dtype.kind:
        differ = numpy.asarray(actual != expected)
        if kinds <= set("mM"):
            differ &= ~(numpy.isnat(actual) & numpy.isnat(expected))
    else:  # object and structured arrays: element by element, as any other value
        return _elementwise_detail(numpy, actual, expected, rtol, atol, same_types)
    count = int(numpy.count_nonzero(differ))
    if count == 0:
        return None
    first = tuple(int(i) for i in numpy.argwhere(differ)[0])
    parts = [f"{count} of {actual.size} elements differ"]
    if kinds <= set("iufc"):
        largest = _largest_abs_diff(numpy, actual[differ], expected[differ])
        if largest is not None:
            parts.append(f"max abs diff {largest}")
    head = ", ".join(parts)
    at = f"at index {_index_text(first)}" if actual.ndim else "value"
    return f"{head} (first {at}: {_show(actual[first])} != {_show(expected[first])})"


def _numeric_mismatch(numpy: Any, actual: Any, expected: Any, rtol: float, atol: float) -> Any:
    inexact = actual.dtype.kind in "fc" or expected.dtype.kind in "fc"
    if (rtol or atol) and "b" not in actual.dtype.kind + expected.dtype.kind:
        return ~numpy.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    differ = numpy.asarray(actual != expected)
    if inexact:
        with numpy.errstate(invalid="ignore"):
            differ &= ~(numpy.isnan(actual) & numpy.isnan(expected))
    return differ


def _largest_abs_diff(numpy: Any, actual: Any, expected: Any) -> str | None:
    complex_ = actual.dtype.kind == "c" or expected.dtype.kind == "c"
    wide = numpy.complex128 if complex_ else numpy.float64
    with numpy.errstate(invalid="ignore", over="ignore"):
        diffs = numpy.abs(actual.astype(wide) - expected.astype(wide))
    diffs = diffs[~numpy.isnan(diffs)]
    if diffs.size == 0:
        return None
    return _magnitude(float(diffs.max()))


def _elementwise_detail(
    numpy: Any, actual: Any, expected: Any, rtol: float, atol: float, same_types: bool
) -> str | None:
    count = 0
    first: tuple[tuple[int, ...], Difference] | None = None
    for index in _ndindex(numpy, actual.shape):
        found = state_differences(
            actual[index],
            expected[index],
            where="",
            limit=1,
            same_types=same_types,
            rtol=rtol,
            atol=atol,
        )
        if found:
            count += 1
            if first is None:
                first = (index, found[0])
    if first is None:
        return None
    index, difference = first
    at = f"at index {_index_text(index)}{difference.path}" if actual.ndim else "value"
    if not actual.ndim and difference.path:
        at = f"value{difference.path}"
    return f"{count} of {actual.size} elements differ (first {at}: {difference.detail})"


def _ndindex(numpy: Any, shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    for index in numpy.ndindex(*shape):
        yield tuple(int(i) for i in index)
