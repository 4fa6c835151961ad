"""``ckptable._compare.state_differences``: every difference of two states, by key path."""

from __future__ import annotations

import collections
import dataclasses
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from ckptable._compare import KINDS, Difference, state_differences


def one(actual: Any, expected: Any, **options: Any) -> Difference:
    """The single difference between two states."""
    found = state_differences(actual, expected, **options)
    assert len(found) == 1, found
    return found[0]


def test_equal_nested_states_have_no_difference() -> None:
    state = {
        "learner": {"weights": np.arange(12.0).reshape(3, 4), "step": 3},
        "buffer": [1, (2, 3), {"x": b"raw"}],
        "tags": {"a", "b"},
        "name": "agent",
        "none": None,
    }
    copy = {
        "learner": {"weights": np.arange(12.0).reshape(3, 4), "step": 3},
        "buffer": [1, (2, 3), {"x": b"raw"}],
        "tags": {"b", "a"},
        "name": "agent",
        "none": None,
    }
    assert state_differences(copy, state) == []


def test_missing_and_extra_keys_are_named() -> None:
    found = state_differences({"a": 1, "c": 3}, {"a": 1, "b": 2})
    assert found == [
        Difference("state['b']", "missing", "only in expected: 2"),
        Difference("state['c']", "extra", "only in actual: 3"),
    ]


def test_paths_follow_keys_and_indices_under_where() -> None:
    found = one({"learner": [{"w": 1}, {"w": 2}]}, {"learner": [{"w": 1}, {"w": 5}]}, where="s")
    assert found.path == "s['learner'][1]['w']"
    assert found.kind == "value"
    assert found.detail == "2 != 5 (abs diff 3)"


def test_array_value_difference_counts_elements_and_names_the_first() -> None:
    expected = np.zeros((10, 100))
    actual = expected.copy()
    actual[2, 7] = 1.0
    actual[3, 1] = -0.5
    actual[9, 99] = 0.25
    found = one({"w": actual}, {"w": expected})
    assert found.path == "state['w']"
    assert found.kind == "value"
    assert found.detail == (
        "3 of 1000 elements differ, max abs diff 1.0 (first at index (2, 7): 1.0 != 0.0)"
    )


def test_nan_equals_nan_in_arrays_and_scalars() -> None:
    assert state_differences(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == []
    assert state_differences(float("nan"), float("nan")) == []
    assert state_differences(np.float32("nan"), float("nan")) == []
    assert state_differences(complex(1, float("nan")), complex(1, float("nan"))) == []


def test_nan_against_a_number_differs_without_a_max_abs_diff() -> None:
    found = one(np.array([np.nan, 2.0]), np.array([1.0, 2.0]))
    assert found.detail == "1 of 2 elements differ (first at index (0,): nan != 1.0)"
    assert one(float("nan"), 1.0).kind == "value"


def test_shape_difference_stops_the_value_comparison() -> None:
    found = one(np.zeros((2, 3)), np.zeros((3, 2)))
    assert (found.kind, found.detail) == ("shape", "shape (2, 3) != (3, 2)")


def test_dtype_difference_is_reported_and_values_still_compared() -> None:
    found = state_differences(
        np.array([1.0, 2.0], dtype=np.float32), np.array([1.0, 2.5], dtype=np.float64)
    )
    assert [f.kind for f in found] == ["dtype", "value"]
    assert found[0].detail == "dtype float32 != float64"
    assert found[1].detail.startswith("1 of 2 elements differ, max abs diff 0.5")
    same_values = state_differences(np.array([1, 2], dtype=np.int32), np.array([1, 2]))
    assert [f.kind for f in same_values] == ["dtype"]


def test_text_against_numbers_is_only_a_dtype_difference() -> None:
    found = one(np.array(["1"]), np.array([1]))
    assert found.kind == "dtype"


def test_zero_dimensional_arrays() -> None:
    assert state_differences(np.array(1.5), np.array(1.5)) == []
    found = one(np.array(1.0), np.array(2.0))
    assert found.detail == "1 of 1 elements differ, max abs diff 1.0 (first value: 1.0 != 2.0)"


def test_integer_arrays_report_the_true_difference() -> None:
    big = np.iinfo(np.int64).max
    found = one(np.array([big], dtype=np.int64), np.array([-big], dtype=np.int64))
    assert "max abs diff 1.84467e+19" in found.detail
    unsigned = one(np.array([1], dtype=np.uint8), np.array([2], dtype=np.uint8))
    assert "max abs diff 1.0" in unsigned.detail


def test_bool_and_string_arrays() -> None:
    found = one(np.array([True, False]), np.array([True, True]))
    assert found.detail == "1 of 2 elements differ (first at index (1,): False != True)"
    text = one(np.array(["a", "b"]), np.array(["a", "c"]))
    assert text.detail == "1 of 2 elements differ (first at index (1,): 'b' != 'c')"


def test_complex_arrays() -> None:
    found = one(np.array([1 + 1j, 2j]), np.array([1 + 2j, 2j]))
    assert found.detail == (
        "1 of 2 elements differ, max abs diff 1.0 (first at index (0,): (1+1j) != (1+2j))"
    )


def test_datetime_arrays_treat_nat_as_equal() -> None:
    dates = np.array(["2024-01-01", "NaT"], dtype="datetime64[D]")
    assert state_differences(dates.copy(), dates) == []
    later = np.array(["2024-01-02", "NaT"], dtype="datetime64[D]")
    assert one(later, dates).detail.startswith("1 of 2 elements differ (first at index (0,)")


def test_object_arrays_compare_elements_as_states() -> None:
    expected = np.array([{"a": 1}, [1, 2], None], dtype=object)
    assert state_differences(np.array([{"a": 1}, [1, 2], None], dtype=object), expected) == []
    actual = np.array([{"a": 2}, [1, 2], None], dtype=object)
    found = one(actual, expected)
    assert found.detail == "1 of 3 elements differ (first at index (0,)['a']: 2 != 1 (abs diff 1))"


def test_object_array_with_nested_arrays() -> None:
    expected = np.empty(2, dtype=object)
    expected[0], expected[1] = np.zeros(3), np.ones(2)
    actual = np.empty(2, dtype=object)
    actual[0], actual[1] = np.zeros(3), np.array([1.0, 3.0])
    found = one(actual, expected)
    assert found.detail.startswith("1 of 2 elements differ (first at index (1,): 1 of 2 elements")


def test_zero_dimensional_object_array() -> None:
    expected = np.array({"k": 1}, dtype=object)
    found = one(np.array({"k": 2}, dtype=object), expected)
    assert found.detail == "1 of 1 elements differ (first value['k']: 2 != 1 (abs diff 1))"


def test_structured_arrays() -> None:
    dtype = [("a", "i4"), ("b", "f8")]
    expected = np.array([(1, 2.0), (3, 4.0)], dtype=dtype)
    assert state_differences(expected.copy(), expected) == []
    actual = expected.copy()
    actual["b"][1] = 5.0
    assert one(actual, expected).detail.startswith("1 of 2 elements differ (first at index (1,)")


def test_array_against_a_list_is_a_type_difference() -> None:
    found = one([1.0, 2.0], np.array([1.0, 2.0]))
    assert (found.kind, found.detail) == ("type", "list ([1.0, 2.0]), expected a numpy array")
    assert one(np.array([1.0]), [1.0]).kind == "type"


def test_numpy_scalars_equal_python_numbers_unless_same_types() -> None:
    assert state_differences(np.float64(1.5), 1.5) == []
    assert state_differences(np.int32(3), 3) == []
    found = one(np.float32(1.5), 1.5, same_types=True)
    assert (found.kind, found.detail) == ("type", "type numpy.float32 != float")


def test_numpy_scalar_difference_does_not_overflow() -> None:
    found = one(np.int64(2**62), np.int64(-(2**62)))
    assert found.detail.endswith("(abs diff 9223372036854775808)")


def test_list_equals_tuple_unless_same_types() -> None:
    assert state_differences([1, 2], (1, 2)) == []
    found = one({"t": [1, 2]}, {"t": (1, 2)}, same_types=True)
    assert (found.path, found.kind, found.detail) == ("state['t']", "type", "type list != tuple")


def test_same_types_still_compares_contents_of_like_containers() -> None:
    found = state_differences([1, 3], (1, 2), same_types=True)
    assert [(f.path, f.kind) for f in found] == [("state", "type"), ("state[1]", "value")]


def test_same_types_distinguishes_mapping_classes() -> None:
    found = one(collections.OrderedDict(a=1), {"a": 1}, same_types=True)
    assert found.detail == "type collections.OrderedDict != dict"
    assert state_differences(collections.OrderedDict(a=1), {"a": 1}) == []


def test_length_difference_names_the_extra_and_missing_items() -> None:
    longer = state_differences([1, 2, 3, 4], [1, 2, 3])
    assert longer == [Difference("state", "length", "4 items, expected 3 (extra items: [4])")]
    shorter = state_differences([1, 9], [1, 2, 3])
    assert shorter == [
        Difference("state", "length", "2 items, expected 3 (missing items: [3])"),
        Difference("state[1]", "value", "9 != 2 (abs diff 7)"),
    ]


def test_sets_by_membership() -> None:
    assert state_differences({1, 2}, frozenset({2, 1})) == []
    found = one({1, 2}, {1, 3})
    assert found.detail == "sets differ: 1 only in expected: {3}; 1 only in actual: {2}"


def test_bytes_name_the_first_differing_offset() -> None:
    found = one(b"abcdef", b"abcxef")
    assert found.detail == "b'abcdef' != b'abcxef' (lengths 6 and 6, first difference at 3)"
    assert state_differences(memoryview(b"abc"), b"abc") == []
    assert state_differences(bytearray(b"abc"), b"abc") == []


def test_long_strings_are_shortened_and_located() -> None:
    found = one("x" * 500 + "a", "x" * 500 + "b")
    assert len(found.detail) < 300
    assert found.detail.endswith("(lengths 501 and 501, first difference at 500)")


def test_unrelated_scalar_types_show_their_types() -> None:
    assert one(1, "1").detail == "1 != '1' (int vs str)"


def test_container_against_scalar_is_a_type_difference() -> None:
    found = one(None, {"a": 1})
    assert (found.kind, found.detail) == ("type", "NoneType (None), expected a mapping")


def test_limit_stops_after_that_many_differences() -> None:
    actual = {f"k{i}": i for i in range(10)}
    expected = {f"k{i}": -i - 1 for i in range(10)}
    assert len(state_differences(actual, expected)) == 10
    limited = state_differences(actual, expected, limit=3)
    assert [f.path for f in limited] == ["state['k0']", "state['k1']", "state['k2']"]


def test_limit_and_tolerances_are_checked() -> None:
    with pytest.raises(ValueError, match="limit"):
        state_differences(1, 2, limit=0)
    with pytest.raises(ValueError, match="tolerances"):
        state_differences(1, 2, rtol=-1.0)


def test_tolerances_for_arrays_and_scalars() -> None:
    expected = np.array([1.0, 100.0])
    actual = expected + np.array([1e-7, 1e-5])
    assert len(state_differences(actual, expected)) == 1
    assert state_differences(actual, expected, rtol=1e-6) == []
    assert state_differences(actual, expected, atol=1e-4) == []
    assert one(actual, expected, atol=1e-6).detail.startswith("1 of 2 elements differ")
    assert state_differences(1.0 + 1e-9, 1.0, rtol=1e-6) == []
    assert one(1.1, 1.0, rtol=1e-6).kind == "value"


def test_tolerances_keep_nan_equal_to_nan() -> None:
    assert state_differences(np.array([np.nan]), np.array([np.nan]), atol=1.0) == []


@dataclasses.dataclass
class Layer:
    weights: Any
    name: str = "layer"
    cache: Any = dataclasses.field(default=None, compare=False)


def test_dataclasses_with_arrays_compare_field_by_field() -> None:
    # The generated __eq__ raises on arrays; the fields are compared instead.
    assert state_differences(Layer(np.ones(3), cache=1), Layer(np.ones(3), cache=2)) == []
    found = one(Layer(np.zeros(3)), Layer(np.ones(3)))
    assert found.path == "state.weights"
    assert found.detail.startswith("3 of 3 elements differ")


class Plain:
    """No __eq__ of its own: identity, so the attributes decide."""

    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


def test_objects_without_eq_compare_attribute_by_attribute() -> None:
    assert state_differences(Plain(a=1, w=np.ones(2)), Plain(a=1, w=np.ones(2))) == []
    found = state_differences(Plain(a=1, b=2), Plain(a=2, c=3))
    assert [(f.path, f.kind) for f in found] == [
        ("state.c", "missing"),
        ("state.b", "extra"),
        ("state.a", "value"),
    ]


class RaisingEq:
    """``==`` that raises (as ``bool(array == array)`` does)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        raise ValueError("The truth value of an array is ambiguous")

    __hash__ = None  # type: ignore[assignment]


def test_eq_that_raises_falls_back_to_the_attributes() -> None:
    assert state_differences(RaisingEq(np.ones(2)), RaisingEq(np.ones(2))) == []
    found = one(RaisingEq(1), RaisingEq(2))
    assert (found.path, found.detail) == ("state.value", "1 != 2 (abs diff 1)")


class Opaque:
    """``==`` that raises, and no attributes to compare instead."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("cannot compare")

    def __repr__(self) -> str:
        return "Opaque()"


def test_eq_that_raises_without_attributes_is_a_difference() -> None:
    found = one(Opaque(), Opaque())
    assert found.detail == "Opaque() == Opaque() raised RuntimeError: cannot compare"


class ArrayEq:
    """``==`` that returns an array, as tensors and arrays do."""

    def __init__(self, values: Any) -> None:
        self.values = np.asarray(values)

    def __eq__(self, other: object) -> Any:
        return self.values == other.values  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


def test_eq_that_returns_an_array_must_be_all_true() -> None:
    assert state_differences(ArrayEq([1, 2]), ArrayEq([1, 2])) == []
    found = one(ArrayEq([1, 2]), ArrayEq([1, 3]))
    assert found.path == "state.values"
    assert found.detail.startswith("1 of 2 elements differ")


class NeverEqual:
    """``==`` says False though the attributes agree: the object's word counts."""

    def __init__(self) -> None:
        self.value = 1

    def __eq__(self, other: object) -> bool:
        return False

    def __repr__(self) -> str:
        return "NeverEqual()"

    __hash__ = None  # type: ignore[assignment]


def test_eq_that_says_false_is_a_difference_even_with_equal_attributes() -> None:
    found = one(NeverEqual(), NeverEqual())
    assert (found.path, found.detail) == ("state", "NeverEqual() != NeverEqual()")


def test_cyclic_structures_terminate() -> None:
    actual: list[Any] = [1]
    actual.append(actual)
    expected: list[Any] = [1]
    expected.append(expected)
    assert state_differences(actual, expected) == []


def test_the_same_object_is_equal_to_itself() -> None:
    array = np.array([np.nan])
    opaque = Opaque()
    assert state_differences({"a": array, "o": opaque}, {"a": array, "o": opaque}) == []


def test_every_kind_is_listed() -> None:
    assert set(KINDS) == {"missing", "extra", "type", "shape", "dtype", "value", "length"}


def test_differences_print_as_path_and_detail() -> None:
    assert str(Difference("state['a']", "value", "1 != 2")) == "state['a']: 1 != 2"


def test_comparing_without_arrays_never_imports_numpy() -> None:
    code = (
        "import sys\n"
        "from ckptable._compare import state_differences\n"
        "found = state_differences({'a': [1, 2.5, {'b'}], 'c': b'x'}, {'a': [1, 2.0, {'b'}]})\n"
        "assert [d.kind for d in found] == ['extra', 'value'], found\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_functions_and_classes_are_equal_only_to_themselves() -> None:
    # Their vars() are no state: two lambdas with empty __dict__ are not equal.
    first, second = (lambda x: x), (lambda x: x)
    assert one({"f": first}, {"f": second}).path == "state['f']"
    assert state_differences({"f": first, "c": int}, {"f": first, "c": int}) == []
    assert one(int, float).detail == "<class 'int'> != <class 'float'>"
