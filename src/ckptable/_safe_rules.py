"""Safe loading, part 2: what each allowlisted callable may be called with.

Why: an allowlist of *names* is not enough, since every allowlisted callable is also
called with arguments from the file. Even builtins turn a few bytes of pickle into
gigabytes (``bytearray(10**12)``), and numpy's unpickling functions trust the file's
bytes (see :mod:`ckptable._safe_numpy`). So every call a pickle makes (``REDUCE``,
``NEWOBJ``, ``NEWOBJ_EX``, ``INST``, ``OBJ``) of a built-in allowlist entry goes through a
*rule* for that callable first: the arguments' types, count and sizes that its own
pickles use, sizes bounded by the bytes actually in the file (no int ever says how much
to allocate), no codec lookups beyond a few text codecs (``_codecs.encode``, used by
protocol 2 for bytes, is limited to latin-1, UTF-8 and ASCII text, so no codec module is
imported), no object dtypes from raw bytes. A call the rule refuses raises
:class:`~ckptable.errors.UnsafeCheckpointError`; an error the callable itself raises on
accepted arguments becomes :class:`~ckptable.errors.CorruptCheckpointError`. User
subclasses of allowlisted types that inherit their constructor get the same rule.

The rules form a registry keyed by the callable they check (its place in
``BUILTIN_ALLOWED``'s values): :func:`register_rules` adds a module's table of rules.
This module registers the rules of the builtins and the standard library (at its end);
:mod:`ckptable._safe_numpy` registers numpy's beside them, and a module of rules for
another library (torch's tensor rebuild functions, say) plugs in the same way, imported
by :mod:`ckptable._safe_unpickler`, which refuses to import while an allowlist entry has
no rule. :func:`own_rule` finds the rule of an object at load time.
"""

from __future__ import annotations

import collections
import datetime
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ckptable._safe_allowlist import BUILTIN_ALLOWED, imported_numpy, resolve_builtin

if TYPE_CHECKING:
    from ckptable._safe_unpickler import SafeUnpickler

__all__ = [
    "BYTES_LIKE",
    "TEXT_CODECS",
    "TEXT_ERRORS",
    "Rule",
    "arity",
    "brief",
    "brief_args",
    "name_of",
    "own_rule",
    "register_rules",
    "rule_any",
    "rule_codecs_encode",
    "rule_getattr",
    "rule_names",
]

#: Why the call ``target(*args)`` (or ``target.__new__(target, *args)``) is refused, or
#: None if it may run. ``target`` is what the pickle calls: the allowlisted callable, or
#: a class that inherits its constructor from one. Keyword arguments are always refused.
Rule = Callable[["SafeUnpickler", Any, tuple[Any, ...]], str | None]


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

#: The rule of each built-in allowlist entry, by where it is found (``BUILTIN_ALLOWED``'s
#: values), as the modules of rules registered them.
_RULES_BY_TARGET: dict[tuple[str, str], Rule] = {}


def register_rules(rules: Mapping[tuple[str, str], Rule]) -> None:
    """Add the rules of allowlisted callables, keyed by where each is found.

    Raises:
        ValueError: If a target is not in the built-in allowlist, or already has a rule
            (a rule never silently replaces another).
    """
    targets = set(BUILTIN_ALLOWED.values())
    for target in rules:
        if target not in targets:
            raise ValueError(f"{target} is not a target of the built-in allowlist")
        if target in _RULES_BY_TARGET:
            raise ValueError(f"{target} already has a rule")
    _RULES_BY_TARGET.update(rules)


def rule_names() -> dict[tuple[str, str], Rule]:
    """The rule of every built-in allowlist entry, by the name a pickle uses.

    Raises:
        KeyError: For an allowlist entry without a registered rule.
    """
    return {key: _RULES_BY_TARGET[target] for key, target in BUILTIN_ALLOWED.items()}


#: The rules by the id of their (resolved) object, for the modules imported so far.
_RULES: dict[int, tuple[object, Rule]] = {}
#: The entries not resolved yet: name -> the top-level package to wait for.
_UNRESOLVED: dict[tuple[str, str], str] = {
    key: target[0].split(".")[0] for key, target in BUILTIN_ALLOWED.items()
}


def _rules() -> dict[int, tuple[object, Rule]]:
    """The rules of the allowlist entries whose modules are imported (only those objects
    can exist); never imports a module that is not imported yet. (Idempotent: threads
    that race here resolve the same objects.)"""
    if _UNRESOLVED:
        for key, package in list(_UNRESOLVED.items()):
            if package in sys.modules:
                obj = resolve_builtin(key)
                _RULES[id(obj)] = (obj, _RULES_BY_TARGET[BUILTIN_ALLOWED[key]])
                _UNRESOLVED.pop(key, None)
    return _RULES


def own_rule(obj: object) -> Rule | None:
    """The rule of ``obj`` itself if it is a built-in allowlist entry."""
    entry = _rules().get(id(obj))
    return entry[1] if entry is not None and entry[0] is obj else None


# --------------------------------------------------------------------------------------
# What the rules share
# --------------------------------------------------------------------------------------

#: The codecs protocol 2 may name in ``_codecs.encode`` (it writes bytes as latin-1 text).
TEXT_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"})
#: The built-in codec error handlers (any other name is looked up in a registry).
TEXT_ERRORS = frozenset(
    {"strict", "ignore", "replace", "surrogateescape", "surrogatepass", "backslashreplace"}
    | {"xmlcharrefreplace", "namereplace"}
)

#: Containers whose size is the file's: what container constructors may copy from (a
#: lazy ``range(10**12)`` may not be expanded).
_DATA: tuple[type, ...] = (
    list, tuple, set, frozenset, dict, str, bytes, bytearray, collections.deque,
)  # fmt: skip
BYTES_LIKE: tuple[type, ...] = (bytes, bytearray, memoryview, pickle.PickleBuffer)
_NUMBER_OR_TEXT: tuple[type, ...] = (int, float, str, bytes, bytearray)  # bool is an int
#: ``str(Fraction)``: what its pickles held before Python 3.12 (no exponent: 10**exp).
_FRACTION_TEXT = re.compile(r"\s*[-+]?[0-9]+(?:/[0-9]+)?\s*")


def name_of(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return f"<{type(obj).__name__}>"


def brief(value: object) -> str:
    """A short description of an argument for a message (never a huge repr)."""
    if isinstance(value, int) and value.bit_length() > 64:
        text = f"<int of {value.bit_length()} bits>"
    elif value is None or isinstance(value, (int, float, complex)):
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:24]) + ("..." if len(value) > 24 else "")
    elif type(value) is tuple and len(value) <= 4 and all(type(x) is int for x in value):
        text = repr(value) if all(x.bit_length() <= 64 for x in value) else "<tuple>"
    elif isinstance(value, type):
        text = name_of(value)
    elif (numpy := imported_numpy()) is not None and isinstance(value, numpy.dtype):
        text = f"dtype({str(value)!r})"
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def brief_args(args: tuple[Any, ...]) -> str:
    return ", ".join(brief(arg) for arg in args[:4]) + (", ..." if len(args) > 4 else "")


def _is_numpy_class(obj: object) -> bool:
    numpy = imported_numpy()
    return (
        numpy is not None
        and isinstance(obj, type)
        and issubclass(obj, (numpy.ndarray, numpy.generic, numpy.dtype))
    )


def arity(args: tuple[Any, ...], low: int, high: int) -> str | None:
    if low <= len(args) <= high:
        return None
    accepted = f"{low}" if low == high else f"{low} to {high}"
    return f"{len(args)} arguments, where {accepted} are accepted"


def _not_data(value: object) -> str:
    return (
        f"it would be built from a {type(value).__name__}; only lists, tuples, sets, "
        "dicts, strings and bytes (whose size is the file's) are accepted"
    )


def _text_codec_problem(args: tuple[Any, ...]) -> str | None:
    """For ``(data, encoding[, errors])``: only built-in text codecs and handlers."""
    encoding = args[1]
    errors = args[2] if len(args) > 2 else "strict"
    if not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in TEXT_CODECS:
        return f"the codec {brief(encoding)} (only {sorted(TEXT_CODECS)} are looked up)"
    if not isinstance(errors, str) or errors not in TEXT_ERRORS:
        return f"the error handler {brief(errors)}"
    return None


# --------------------------------------------------------------------------------------
# The rules of the builtins and the standard library
# --------------------------------------------------------------------------------------


def rule_any(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """``object``: its ``__new__`` makes an empty instance whatever the arguments."""
    return None


def _rule_not_callable(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return "it is not callable"


def _rule_container(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """dict, list, tuple, set, frozenset, OrderedDict, Counter: from one data container."""
    problem = arity(args, 0, 1)
    if problem is None and args and not isinstance(args[0], _DATA):
        return _not_data(args[0])
    return problem


def _rule_bytes(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """bytes, bytearray: from bytes or a list of ints, or text in a text codec."""
    problem = arity(args, 0, 3)
    if problem is not None or not args:
        return problem
    if len(args) == 1:
        if isinstance(args[0], (*BYTES_LIKE, list, tuple)):
            return None
        if isinstance(args[0], int):
            return "an int asks for that many zero bytes, which the file does not hold"
        return _not_data(args[0])
    if not isinstance(args[0], str):
        return f"only text is encoded, not a {type(args[0]).__name__}"
    return _text_codec_problem(args)


def _rule_str(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """str: from a str, or bytes in a text codec (never ``str(obj)``, which runs code)."""
    problem = arity(args, 0, 3)
    if problem is not None or not args:
        return problem
    if len(args) == 1:
        if isinstance(args[0], str):
            return None
        return f"str() of a {type(args[0]).__name__}"
    if not isinstance(args[0], BYTES_LIKE):
        return f"only bytes are decoded, not a {type(args[0]).__name__}"
    return _text_codec_problem(args)


def _rule_int(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """int: from a number or its text (not a Decimal: int(Decimal('1e999999999')))."""
    problem = arity(args, 0, 2)
    if problem is not None or not args:
        return problem
    if len(args) == 1:
        if isinstance(args[0], _NUMBER_OR_TEXT):
            return None
        return f"int() of a {type(args[0]).__name__}"
    if isinstance(args[0], (str, bytes, bytearray)) and type(args[1]) is int:
        return None
    return "int(text, base) takes text and an int"


def _rule_float(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 0, 1)
    if problem is None and args and not isinstance(args[0], _NUMBER_OR_TEXT):
        return f"float() of a {type(args[0]).__name__}"
    return problem


def _rule_complex(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 0, 2)
    if problem is not None:
        return problem
    kinds = (int, float, complex, str) if len(args) == 1 else (int, float)
    if all(isinstance(arg, kinds) for arg in args):
        return None
    return "complex() takes numbers (or one text)"


def _rule_bool(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 0, 1)
    if problem is None and args and not isinstance(args[0], (type(None), int, float, *_DATA)):
        return f"bool() of a {type(args[0]).__name__}"
    return problem


def _rule_slice(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """slice: 1 to 3 values, which it only stores."""
    return arity(args, 1, 3)


def _rule_range(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 1, 3)
    if problem is None and not all(isinstance(arg, int) for arg in args):
        return "range() takes ints"
    return problem


def _rule_deque(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 0, 2)
    if problem is not None:
        return problem
    if args and not isinstance(args[0], _DATA):
        return _not_data(args[0])
    if len(args) == 2 and args[1] is not None and (type(args[1]) is not int or args[1] < 0):
        return "its maxlen must be None or an int >= 0"
    return None


def _rule_defaultdict(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """defaultdict(factory[, data]): the factory is a global the pickle named."""
    problem = arity(args, 0, 2)
    if problem is not None:
        return problem
    factory = args[0] if args else None
    if factory is not None and (
        u._globals.get(id(factory)) is not factory
        or not callable(factory)
        or _is_numpy_class(factory)
    ):
        return "its default factory must be None or a class or function the pickle named"
    if len(args) == 2 and not isinstance(args[1], _DATA):
        return _not_data(args[1])
    return None


def _tzinfo_problem(value: object) -> str | None:
    if value is None or isinstance(value, datetime.tzinfo):
        return None
    return f"its tzinfo is a {type(value).__name__}"


def _datetime_state_problem(args: tuple[Any, ...], size: int, tz: bool) -> str | None:
    """The pickled form of datetime, date and time: ``(state bytes[, tzinfo])``."""
    problem = arity(args, 1, 1 + tz)
    if problem is not None:
        return problem
    if len(args[0]) != size:
        return f"a state of {len(args[0])} bytes, not {size}"
    return _tzinfo_problem(args[1]) if len(args) == 2 else None


def _fields_problem_of(args: tuple[Any, ...], low: int, ints: int, tz: bool) -> str | None:
    """The field form: ``low`` to ``ints`` ints, then a tzinfo if ``tz``."""
    problem = arity(args, low, ints + tz)
    if problem is not None:
        return problem
    if not all(type(arg) is int for arg in args[:ints]):
        return "its fields must be ints"
    return _tzinfo_problem(args[ints]) if len(args) > ints else None


def _rule_datetime(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    if args and isinstance(args[0], (bytes, str)):
        return _datetime_state_problem(args, 10, True)
    return _fields_problem_of(args, 3, 7, True)


def _rule_date(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    if args and isinstance(args[0], (bytes, str)):
        return _datetime_state_problem(args, 4, False)
    return _fields_problem_of(args, 3, 3, False)


def _rule_time(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    if args and isinstance(args[0], (bytes, str)):
        return _datetime_state_problem(args, 6, True)
    return _fields_problem_of(args, 0, 4, True)


def _rule_timedelta(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 0, 7)
    if problem is None and not all(isinstance(arg, (int, float)) for arg in args):
        return "timedelta() takes numbers"
    return problem


def _rule_timezone(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 1, 2)
    if problem is not None:
        return problem
    if not isinstance(args[0], datetime.timedelta) or not all(
        isinstance(arg, str) for arg in args[1:]
    ):
        return "timezone() takes a timedelta and a name"
    return None


def _rule_decimal(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 0, 1)
    if problem is None and args and not isinstance(args[0], (str, int, float, tuple)):
        return f"Decimal() of a {type(args[0]).__name__}"
    return problem


def _rule_fraction(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """Fraction: ints, a float, or 'n/d' text (an exponent would compute 10**exp)."""
    problem = arity(args, 0, 2)
    if problem is not None or not args:
        return problem
    if len(args) == 2:
        return None if all(type(arg) is int for arg in args) else "Fraction(n, d) takes ints"
    value = args[0]
    if isinstance(value, (int, float)):
        return None
    if isinstance(value, str) and len(value) <= 10_000 and _FRACTION_TEXT.fullmatch(value):
        return None
    return f"Fraction() of {brief(value)} (only ints, floats and 'n/d' text)"


def _rule_uuid(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = arity(args, 0, 1)
    if problem is None and args and not (isinstance(args[0], str) and len(args[0]) <= 64):
        return "UUID() takes its hex text"
    return problem


def _rule_reconstructor(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """``copyreg._reconstructor(cls, base, state)``: ``base.__new__(cls, state)`` and
    ``base.__init__``, so the rule of ``base`` for ``(state,)``; never numpy objects."""
    problem = arity(args, 3, 3)
    if problem is not None:
        return problem
    cls, base, state = args
    if not isinstance(cls, type) or not isinstance(base, type):
        return "its class and base must be classes"
    if _is_numpy_class(cls) or _is_numpy_class(base):
        return (
            "numpy arrays, scalars and dtypes are never made this way (it would build "
            "an array over uninitialised memory); they have reductions of their own"
        )
    if not issubclass(cls, base):
        return f"{name_of(cls)} is not a subclass of {name_of(base)}"
    if base is object:
        return None if state is None else "a state for the base object"
    rule = own_rule(base)
    return None if rule is None else rule(u, cls, (state,))


def rule_codecs_encode(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return arity(args, 1, 3)  # the stand-in checks the rest


def rule_getattr(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return arity(args, 2, 2)


#: The rules of the builtins and the standard library, by where each is found.
_STDLIB_RULES: dict[tuple[str, str], Rule] = {
    **{("builtins", name): _rule_container for name in ("dict", "list", "tuple")},
    **{("builtins", name): _rule_container for name in ("set", "frozenset")},
    ("builtins", "bytearray"): _rule_bytes,
    ("builtins", "bytes"): _rule_bytes,
    ("builtins", "str"): _rule_str,
    ("builtins", "int"): _rule_int,
    ("builtins", "float"): _rule_float,
    ("builtins", "complex"): _rule_complex,
    ("builtins", "bool"): _rule_bool,
    ("builtins", "slice"): _rule_slice,
    ("builtins", "range"): _rule_range,
    ("builtins", "object"): rule_any,
    ("builtins", "Ellipsis"): _rule_not_callable,
    ("builtins", "NotImplemented"): _rule_not_callable,
    ("copyreg", "_reconstructor"): _rule_reconstructor,
    ("collections", "OrderedDict"): _rule_container,
    ("collections", "defaultdict"): _rule_defaultdict,
    ("collections", "deque"): _rule_deque,
    ("collections", "Counter"): _rule_container,
    ("datetime", "datetime"): _rule_datetime,
    ("datetime", "date"): _rule_date,
    ("datetime", "time"): _rule_time,
    ("datetime", "timedelta"): _rule_timedelta,
    ("datetime", "timezone"): _rule_timezone,
    ("decimal", "Decimal"): _rule_decimal,
    ("fractions", "Fraction"): _rule_fraction,
    ("uuid", "UUID"): _rule_uuid,
}

register_rules(_STDLIB_RULES)
