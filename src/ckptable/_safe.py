"""Safe loading: a restricted unpickler and a msgpack hook that never run a file's code.

Why: a pickle is a small program. Every class or function it names (a *global*, found
by ``Unpickler.find_class``) is imported and may then be called with arguments from the
file, so ``pickle.load`` of an untrusted checkpoint can run anything: a ``__reduce__``
returning ``(os.system, ("...",))`` is enough. ``safe=True`` loads use this module
instead, which resolves only globals on an allowlist:

- a built-in list of harmless globals (builtin containers and scalars, ``collections``,
  ``datetime``, ``decimal``, ``fractions``, ``uuid``, and the few numpy functions that
  rebuild arrays, dtypes and scalars);
- the process-wide user list, extended with :func:`add_safe_classes`;
- per load, the objects passed as ``allowed`` (the classes being restored) and, with
  ``allow_subclasses_of``, subclasses of one base class.

Unknown modules are never imported: only the modules of the built-in list are; user
and per-load entries are resolved to the objects given, and subclasses of
``allow_subclasses_of`` are looked up (statically, with no attribute hooks running) in
modules that are already in ``sys.modules``. Persistent ids and extension codes cannot
smuggle anything in either (``copyreg``'s extension cache is bypassed).

An allowlist of *names* is not enough: every allowlisted callable is also called with
arguments from the file. numpy's unpickling functions trust the file's bytes (a crafted
pickle naming only allowlisted numpy globals can corrupt memory, or read it: arrays of
raw pointers, arrays over uninitialised memory), and even builtins turn a few bytes of
pickle into gigabytes (``bytearray(10**12)``). So :class:`SafeUnpickler` is built on the
pure-Python ``pickle._Unpickler``, whose opcodes can be intercepted (it is slower than
the C unpickler: about 8x on many small objects, under 2x on large arrays), and every
call a pickle makes (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``INST``, ``OBJ``) of a
built-in allowlist entry goes through a *rule* for that callable first (``_RULE_NAMES``):
the arguments' types, count and sizes that its own pickles use, sizes bounded by the
bytes actually in the file (no int ever says how much to allocate), no codec lookups
beyond a few text codecs, no object dtypes from raw bytes. A call the rule refuses
raises :class:`~ckptable.errors.UnsafeCheckpointError`; an error the callable itself
raises on accepted arguments becomes :class:`~ckptable.errors.CorruptCheckpointError`.
User subclasses of allowlisted types that inherit their constructor get the same rule.
The numpy rules close these holes:

- ``numpy._core.multiarray._reconstruct(subtype, shape, dtype)`` allocates ``shape`` and
  leaves it uninitialised, for the ``BUILD`` (``ndarray.__setstate__``) that follows to
  replace. Here it always makes a zero-size array; one asked for with a non-zero shape
  is *pending* until its ``BUILD``, and a pickle that ends with an array still pending is
  refused. ``copyreg._reconstructor`` and ``NEWOBJ`` never make numpy objects.
- ``ndarray.__setstate__`` frees an array's memory while views of it may exist, reads an
  object array's list past its end if it is short, and builds object arrays from raw
  bytes. It is applied once, only to an array ``_reconstruct`` made in this load, and
  only with a state whose shape, dtype and data agree exactly (bytes of exactly
  ``size * itemsize``, or a list of exactly ``size`` objects for object dtypes).
- ``numpy.dtype.__setstate__`` takes the type flags from the file, so a structured
  dtype with an object field can claim to hold no objects, and ``_frombuffer`` then
  builds an object array from raw bytes. A dtype's state is applied to a private copy,
  which must equal a dtype numpy's own constructor builds from the same layout; the
  copy then replaces the original on the stack and in the memo, so a dtype already in
  use never changes under an array.
- ``numpy.ndarray`` itself is never called or ``__new__``-ed (``ndarray(shape, object,
  buffer)`` reads object pointers from bytes). ``_frombuffer`` only takes bytes-like
  buffers (never an array: no views of arrays the pickle may reset), a dtype without
  objects and a shape that covers the buffer exactly; ``scalar(dtype, data)`` takes
  exactly ``itemsize`` bytes, or, for a structured dtype with objects, a 0-d array of
  that very dtype (numpy reads a zero-size one past its end).

``BUILD`` is refused on classes, functions and modules (it would overwrite their
attributes process-wide), and ``_codecs.encode`` (used by protocol 2 for bytes) is
limited to latin-1, UTF-8 and ASCII text, so no codec module is imported. Length fields
cannot make the unpickler allocate more than the file holds either (``BYTEARRAY8`` and
big reads go through a bounded reader).

msgpack: msgpack-numpy's decoder calls ``pickle.loads`` on object-dtype arrays, and
builds any other array with ``numpy.ndarray(buffer=...)``, which makes object arrays
from raw bytes when the file claims an object dtype under another kind.
:func:`safe_msgpack_decode` refuses every array or scalar whose dtype holds objects
before msgpack-numpy sees it, and otherwise delegates to ``msgpack_numpy.decode``.

What is allowed still runs: a class given to :func:`add_safe_classes` (or allowed per
load) is trusted with its constructor, ``__new__``, ``__setstate__`` and ``__reduce__``
arguments; only what it inherits from an allowlisted type is checked.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import copyreg
import datetime
import importlib
import inspect
import io
import pickle
import re
import struct
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol, cast

from ckptable.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

__all__ = [
    "SafeUnpickler",
    "add_safe_classes",
    "safe_classes",
    "safe_msgpack_decode",
    "safe_pickle_load",
]


class _ReadableFile(Protocol):
    def read(self, n: int, /) -> bytes: ...

    def readline(self) -> bytes: ...


# --------------------------------------------------------------------------------------
# The allowlists
# --------------------------------------------------------------------------------------

#: Globals the user declared safe with ``add_safe_classes``: (module, qualname) -> object.
_USER_ALLOWED: dict[tuple[str, str], object] = {}
_USER_LOCK = threading.Lock()


def _key_of(obj: object) -> tuple[str, str]:
    """``(obj.__module__, obj.__qualname__)``, or TypeError if ``obj`` is not importable."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or not module:
        raise TypeError(
            f"{obj!r} is not an importable class or function: it has no __module__ and "
            "__qualname__, so a pickle cannot name it"
        )
    if "<" in qualname:  # "<locals>", "<lambda>"
        raise TypeError(
            f"{module}.{qualname} is defined inside a function (or is a lambda), so it has "
            "no importable name; a pickle can only refer to it by value, which is never "
            "safe. Define it at module level."
        )
    return module, qualname


def add_safe_classes(*classes: object) -> None:
    """Allow safe loads (``safe=True``) to restore these classes (or other globals).

    Each object is keyed by its ``__module__`` and ``__qualname__``, the name a pickle
    uses for it; the allowlist is process-wide. Only add classes you trust: loading a
    checkpoint may call them, and their ``__setstate__``, with any arguments the file
    contains.

    Args:
        *classes: Module-level classes or functions (nested classes are fine).

    Raises:
        TypeError: If an object has no importable name (no ``__module__`` /
            ``__qualname__``, or defined inside a function).
    """
    keys = [(_key_of(obj), obj) for obj in classes]  # validate all before adding any
    with _USER_LOCK:
        for key, obj in keys:
            _USER_ALLOWED[key] = obj


def safe_classes() -> frozenset[tuple[str, str]]:
    """The ``(module, qualname)`` names added with :func:`add_safe_classes`.

    The built-in allowlist is not included.
    """
    with _USER_LOCK:
        return frozenset(_USER_ALLOWED)


#: The codecs protocol 2 may name in ``_codecs.encode`` (it writes bytes as latin-1 text).
_TEXT_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"})
#: The built-in codec error handlers (any other name is looked up in a registry).
_TEXT_ERRORS = frozenset(
    {"strict", "ignore", "replace", "surrogateescape", "surrogatepass", "backslashreplace"}
    | {"xmlcharrefreplace", "namereplace"}
)

_BUILTINS = [
    *("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "str"),
    *("int", "float", "complex", "bool", "slice", "range", "object"),
    *("Ellipsis", "NotImplemented"),
]

#: The built-in allowlist: the (module, qualname) a pickle names -> where to find it.
#: Only these modules are ever imported by the unpickler.
_BUILTIN_ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    **{("builtins", name): ("builtins", name) for name in _BUILTINS},
    ("copyreg", "_reconstructor"): ("copyreg", "_reconstructor"),
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
    ("collections", "defaultdict"): ("collections", "defaultdict"),
    ("collections", "deque"): ("collections", "deque"),
    ("collections", "Counter"): ("collections", "Counter"),
    ("datetime", "datetime"): ("datetime", "datetime"),
    ("datetime", "date"): ("datetime", "date"),
    ("datetime", "time"): ("datetime", "time"),
    ("datetime", "timedelta"): ("datetime", "timedelta"),
    ("datetime", "timezone"): ("datetime", "timezone"),
    ("decimal", "Decimal"): ("decimal", "Decimal"),
    ("fractions", "Fraction"): ("fractions", "Fraction"),
    ("uuid", "UUID"): ("uuid", "UUID"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; both resolve to the
    # installed numpy's own (see _resolve_builtin), without its deprecation warning.
    **{
        (f"{package}.{module}", name): (f"numpy._core.{module}", name)
        for package in ("numpy.core", "numpy._core")
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    },
}

_RESOLVED: dict[tuple[str, str], object] = {}


def _resolve_builtin(key: tuple[str, str]) -> object:
    """The object of a built-in allowlist entry, importing its (allowlisted) module."""
    obj = _RESOLVED.get(key)
    if obj is not None:
        return obj
    module, qualname = _BUILTIN_ALLOWED[key]
    if module.startswith("numpy._core."):
        numpy = importlib.import_module("numpy")
        if int(str(numpy.__version__).split(".")[0]) < 2:
            module = "numpy.core." + module.removeprefix("numpy._core.")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    _RESOLVED[key] = obj
    return obj


def _lookup_subclass(module: str, qualname: str, base: type) -> type | None:
    """The class ``module.qualname`` if it is a subclass of ``base`` in an imported module.

    Never imports, and looks attributes up statically (no ``__getattr__`` or descriptors
    run), so an unknown name cannot trigger code either.
    """
    obj: object = sys.modules.get(module)
    if obj is None:
        return None
    missing = object()
    for part in qualname.split("."):
        if not part.isidentifier():
            return None
        obj = inspect.getattr_static(obj, part, missing)
        if obj is missing:
            return None
    if isinstance(obj, type) and issubclass(obj, base):
        return obj
    return None


# --------------------------------------------------------------------------------------
# The unpickler
# --------------------------------------------------------------------------------------


def _numpy() -> Any:
    """The numpy module if it has been imported (nothing numpy exists otherwise)."""
    return sys.modules.get("numpy")


#: What pickle's own opcodes raise on malformed input: reported as a corrupt file (as a
#: restore reports them; the same errors from trusted user code are reported so too).
_MALFORMED: tuple[type[Exception], ...] = (
    pickle.UnpicklingError,
    EOFError,
    struct.error,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    MemoryError,
    OverflowError,
)

#: Reads above this size go through :class:`_BoundedStream`'s checks.
_READ_CHUNK = 1 << 20


class _BoundedStream:
    """A stream's ``read`` / ``readline`` that never asks it for more than it holds.

    A pickle's length fields come from the file: ``BINBYTES8`` may claim 2**40 bytes in a
    file of 20, and buffered streams allocate what ``read(n)`` asks for before reading.
    Big reads are capped at what is left of a seekable stream, or read in chunks, so the
    memory used follows the bytes that are really there.
    """

    def __init__(self, stream: _ReadableFile) -> None:
        self._stream = stream
        self.readline = stream.readline

    def read(self, n: int) -> bytes:
        stream = self._stream
        if n <= _READ_CHUNK:
            return stream.read(n)
        left = _bytes_left(stream)
        if left is not None:
            return stream.read(min(n, left))
        chunks: list[bytes] = []
        while n > 0:
            chunk = stream.read(min(n, _READ_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)


def _bytes_left(stream: object) -> int | None:
    """Bytes from the position of a seekable stream to its end; None if unknown."""
    try:
        if not stream.seekable():  # type: ignore[attr-defined]
            return None
        position: int = stream.tell()  # type: ignore[attr-defined]
        end: int = stream.seek(0, io.SEEK_END)  # type: ignore[attr-defined]
        stream.seek(position)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None
    return max(end - position, 0)


class _Memo(dict[int, Any]):
    """The unpickler's memo, remembering under which keys each dtype was stored.

    So that a dtype whose state is applied to a private copy (see ``_load_build``) can
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


class SafeUnpickler(pickle._Unpickler):
    """An unpickler that only resolves allowlisted globals and never imports others.

    Every call of a built-in allowlist entry has its arguments checked first (see the
    module docstring); numpy arrays are never built over uninitialised memory.

    Args:
        stream: The binary file to read the pickle from.
        allowed: Extra classes or functions allowed for this load only (for example the
            classes of the objects being restored).
        allow_subclasses_of: Also allow any subclass of this class, if its module is
            already imported (nothing is imported to find it).
        source: The file being read, for error messages.
        buffers: The out-of-band buffers of a protocol 5 pickle, as for ``pickle.load``.

    Raises (from ``load``):
        UnsafeCheckpointError: The pickle names a global outside the allowlist, uses
            persistent ids, calls an allowlisted callable with arguments its rule
            refuses, or builds numpy objects in a way that is not memory-safe.
        CorruptCheckpointError: An allowlisted callable failed on arguments its rule
            accepts, or a length field claims more bytes than the file holds.
    """

    # Attributes of pickle._Unpickler that typeshed does not declare.
    stack: list[Any]
    memo: _Memo
    proto: int
    fix_imports: bool
    append: Callable[[Any], None]
    read: Callable[[int], bytes]

    dispatch: ClassVar[dict[int, Callable[[Any], None]]]

    def __init__(
        self,
        stream: _ReadableFile,
        *,
        allowed: Iterable[object] = (),
        allow_subclasses_of: type | None = None,
        source: str = "",
        buffers: Iterable[Any] | None = None,
    ) -> None:
        # BytesIO.read(n) never allocates more than it holds; other streams may.
        bounded = stream if isinstance(stream, io.BytesIO) else _BoundedStream(stream)
        super().__init__(bounded, buffers=buffers)
        self.memo = _Memo()
        self._allowed = {_key_of(obj): obj for obj in allowed}
        if allow_subclasses_of is not None and not isinstance(allow_subclasses_of, type):
            raise TypeError(f"allow_subclasses_of must be a class, not {allow_subclasses_of!r}")
        self._allow_subclasses_of = allow_subclasses_of
        self._source = source
        # Every object find_class returned in this load, by id (kept alive here): only
        # these may be called by REDUCE / NEWOBJ, and BUILD may not touch them.
        self._globals: dict[int, object] = {}
        # Arrays _reconstruct made in this load whose BUILD has not come yet (the only
        # arrays BUILD may set), and of those, the ones asked for with a non-zero size:
        # they are made empty, and the pickle is refused if it ends before their BUILD.
        self._unbuilt: dict[int, Any] = {}
        self._pending: dict[int, tuple[Any, Any, Any]] = {}
        self._rule_cache: dict[tuple[int, bool], tuple[_Rule | None]] = {}

    def load(self) -> Any:
        """Read the pickle, as ``pickle.load`` does, with the checks described above.

        A malformed pickle (truncated, a bad opcode or length) raises
        :class:`~ckptable.errors.CorruptCheckpointError` naming the file, as a refused
        one raises :class:`~ckptable.errors.UnsafeCheckpointError`.
        """
        try:
            return super().load()
        except CheckpointError:
            raise
        except _MALFORMED as exc:
            where = self._source or "the pickle"
            raise CorruptCheckpointError(
                f"{where} is truncated or corrupt ({type(exc).__name__}: {exc}).",
                path=self._source or None,
            ) from exc

    # -- resolving globals -------------------------------------------------------------

    def _where(self) -> str:
        return f"Unsafe checkpoint file {self._source}" if self._source else "Unsafe pickle"

    def _refuse(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self._where()}: {what}", path=self._source or None)

    def _corrupt(self, what: str) -> CorruptCheckpointError:
        where = self._source or "the pickle"
        return CorruptCheckpointError(f"{where} is corrupt: {what}", path=self._source or None)

    def find_class(self, module: str, name: str) -> Any:
        sys.audit("pickle.find_class", module, name)
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        obj = self._resolve(module, name)
        self._globals[id(obj)] = obj
        if self.memo.dtype_type is None and (numpy := _numpy()) is not None:
            self.memo.dtype_type = numpy.dtype
        return obj

    def _resolve(self, module: str, name: str) -> object:
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        user = _USER_ALLOWED.get(key)
        if user is not None:
            return user
        # Restricted stand-ins for two globals that protocols 2 and 3 use.
        if key == ("_codecs", "encode"):
            return self._codecs_encode
        if key == ("builtins", "getattr"):
            return self._getattr
        if key in _BUILTIN_ALLOWED:
            return _resolve_builtin(key)
        if self._allow_subclasses_of is not None:
            found = _lookup_subclass(module, name, self._allow_subclasses_of)
            if found is not None:
                return found
        where = self._source or "the pickle"
        if module.split(".")[0] == "cloudpickle":
            raise UnsafeCheckpointError(
                f"Refusing to load {where}: it holds code pickled by value "
                f"('{module}.{name}'), a class or function defined in __main__, a notebook "
                "or a function body, which cloudpickle stores as code. Safe mode never "
                "loads code: define the class in an importable module and save again.",
                path=self._source or None,
            )
        raise UnsafeCheckpointError(
            f"Refusing to load the global '{module}.{name}' named in {where}: it is not "
            "on ckptable's allowlist of safe classes, and unpickling it could run "
            "arbitrary code. If you trust this checkpoint and that class, call "
            f"ckptable.add_safe_classes({module}.{name}) before loading.",
            path=self._source or None,
        )

    def _getattr(self, obj: object, name: str) -> object:
        """``getattr`` as protocols 2 and 3 use it for nested classes: ``Outer.Inner``.

        Resolves the nested name through the allowlist instead of reading the attribute.
        """
        if self._globals.get(id(obj)) is not obj or not isinstance(name, str):
            raise self._refuse(
                f"getattr(<{type(obj).__name__}>, ...) is only allowed on a class the pickle named"
            )
        module, qualname = _key_of(obj)
        return self.find_class(module, f"{qualname}.{name}")

    def _codecs_encode(
        self, text: object, encoding: str = "utf-8", errors: str = "strict"
    ) -> bytes:
        """``_codecs.encode`` as protocol 2 uses it for bytes: text codecs only.

        Looking up any other codec name may import a module.
        """
        if (
            not isinstance(text, str)
            or not isinstance(encoding, str)
            or not isinstance(errors, str)
            or encoding.lower().replace("_", "-") not in _TEXT_CODECS
            or errors not in _TEXT_ERRORS
        ):
            raise self._refuse(
                f"_codecs.encode is only allowed on text with the codecs {sorted(_TEXT_CODECS)}"
                f", not on {type(text).__name__} with {str(encoding)[:40]!r}"
            )
        return codecs.encode(text, encoding, errors)

    def persistent_load(self, pid: Any) -> Any:
        raise self._refuse("the pickle uses persistent ids; ckptable never writes those")

    def get_extension(self, code: int) -> None:
        """EXT opcodes, always through ``find_class`` (never copyreg's cache)."""
        key = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
        if not key:
            raise pickle.UnpicklingError(f"unregistered extension code {code}")
        self.append(self.find_class(*key))

    # -- calls -------------------------------------------------------------------------

    def _check_callable(self, func: object, how: str) -> None:
        if self._globals.get(id(func)) is not func:
            raise self._refuse(f"{how} of {type(func).__name__} object, which is not a global")
        numpy = _numpy()
        if numpy is not None and isinstance(func, type) and issubclass(func, numpy.ndarray):
            raise self._refuse(
                f"{how} of {func.__module__}.{func.__qualname__} directly: that can build "
                "arrays from raw memory; numpy pickles use numpy's _reconstruct instead"
            )

    def _rule_for(self, func: object, new: bool) -> _Rule | None:
        """The rule for calling ``func`` (or ``func.__new__`` if ``new``); None for user code.

        A class without a rule of its own gets the rule of the allowlisted class it
        inherits its constructor from (``__new__``, and ``__init__`` for a call), unless
        a user class in between defines one: user code is trusted with its arguments.
        """
        if getattr(func, "__self__", None) is self:  # the stand-ins for globals
            method = getattr(func, "__func__", None)
            if method is SafeUnpickler._codecs_encode:
                return _rule_codecs_encode
            if method is SafeUnpickler._getattr:
                return _rule_getattr
            return None
        rule = _own_rule(func)
        if rule is not None or not isinstance(func, type):
            return rule
        if not new and _owner(type(func), "__call__") is not type:
            return None  # a metaclass of user code decides what the call does
        for klass in func.__mro__:
            rule = _own_rule(klass)
            if rule is not None:
                return rule
            if "__new__" in klass.__dict__ or (not new and "__init__" in klass.__dict__):
                return None
        return None

    def _checked_call(self, func: Any, args: Any, kwargs: Any, how: str) -> Any:
        """``func(*args, **kwargs)``, or ``func.__new__(func, ...)`` if ``how`` is
        ``"__new__"``, once ``func`` and its arguments passed the checks."""
        new = how == "__new__"
        # A rule found for a global of this load, by its id: the global is kept alive
        # in self._globals, so a hit means func is that very global.
        cached = self._rule_cache.get((id(func), new))
        if cached is None:
            self._check_callable(func, how)
            if new and not isinstance(func, type):
                raise self._refuse(f"__new__ of {_name_of(func)}, which is not a class")
            cached = self._rule_cache[(id(func), new)] = (self._rule_for(func, new),)
        rule = cached[0]
        if type(args) is not tuple:  # *args of a lazy range(10**12) would build it
            raise self._refuse(
                f"the arguments of {_name_of(func)} are a {type(args).__name__}, not a tuple"
            )
        if type(kwargs) is not dict or not all(type(key) is str for key in kwargs):
            raise self._refuse(f"the keyword arguments of {_name_of(func)} are not a dict")
        if rule is None:  # user code, trusted
            return func.__new__(func, *args, **kwargs) if new else func(*args, **kwargs)
        if kwargs and rule is not _rule_any:  # object.__new__ ignores them
            problem: str | None = "keyword arguments"
        else:
            problem = rule(self, func, args)
        if problem is not None:
            name = _name_of(func) + (".__new__" if new else "")
            raise self._refuse(f"refusing {name}({_brief_args(args)}): {problem}")
        try:
            if rule is _rule_reconstruct:
                return self._new_unbuilt_array(func, args)
            return func.__new__(func, *args, **kwargs) if new else func(*args, **kwargs)
        except CheckpointError:
            raise
        except Exception as exc:
            name = _name_of(func) + (".__new__" if new else "")
            raise self._corrupt(
                f"{name}({_brief_args(args)}) failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _new_unbuilt_array(self, reconstruct: Any, args: tuple[Any, ...]) -> Any:
        """``_reconstruct(subtype, shape, dtype)``, always with no memory to leak.

        numpy leaves the array's memory uninitialised for the BUILD that follows; its own
        pickles ask for shape ``(0,)``. A non-zero size is made empty and kept pending
        until its BUILD, which gives it its real shape and data.
        """
        subtype, shape, dtype = args
        size = _shape_size(shape)
        array = reconstruct(subtype, shape if size == 0 else (0,), dtype)
        self._unbuilt[id(array)] = array
        if size:
            self._pending[id(array)] = (array, shape, dtype)
        return array

    def _load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        stack[-1] = self._checked_call(func, args, {}, "a call")

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._checked_call(cls, args, {}, "__new__"))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._checked_call(cls, args, kwargs, "__new__"))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        """INST and OBJ (protocols 0 and 1), as pickle does them."""
        self._check_callable(klass, "a call")
        if args or not isinstance(klass, type) or hasattr(klass, "__getinitargs__"):
            self.append(self._checked_call(klass, tuple(args), {}, "a call"))
        else:
            self.append(self._checked_call(klass, (), {}, "__new__"))

    # -- opcodes that read or finish -----------------------------------------------------

    def _load_bytearray8(self) -> None:
        """``BYTEARRAY8`` without pickle's ``bytearray(length)`` before reading."""
        field = self.read(8)
        if len(field) != 8:
            raise self._corrupt("it ends inside a BYTEARRAY8 length")
        (length,) = struct.unpack("<Q", field)
        data = self.read(length)
        if len(data) != length:
            raise self._corrupt(f"a BYTEARRAY8 claims {length} bytes, but only {len(data)} follow")
        self.append(bytearray(data))

    def _load_stop(self) -> None:
        if self._pending:
            _, shape, dtype = next(iter(self._pending.values()))
            raise self._refuse(
                f"the pickle makes a numpy array of shape {_brief(shape)} (dtype "
                f"{_brief(dtype)}) with _reconstruct and never gives it its data with "
                "BUILD; numpy would have left it holding whatever was in memory before"
            )
        _BASE_DISPATCH[pickle.STOP[0]](self)

    # -- BUILD -------------------------------------------------------------------------

    def _load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if (
            self._globals.get(id(inst)) is inst
            or isinstance(inst, (type, types.ModuleType))
            or inspect.isroutine(inst)
        ):
            raise self._refuse(
                f"the pickle sets the state of {inst!r}, which is not an instance (it "
                "would change it for the whole process)"
            )
        numpy = _numpy()
        if numpy is not None:
            if isinstance(inst, numpy.dtype):
                fresh = _dtype_with_state(numpy, inst, state, self._refuse)
                stack[-1] = fresh
                self.memo.replace(inst, fresh)
                return
            if isinstance(inst, numpy.ndarray):
                self._build_array(numpy, inst, state)
                return
            if isinstance(inst, numpy.generic):
                raise self._refuse("the pickle sets the state of a numpy scalar")
        setstate_owner = _owner(type(inst), "__setstate__")
        if setstate_owner is not None and _own_rule(setstate_owner) is None:
            stack.append(state)  # the __setstate__ of user code: trusted
            _BASE_DISPATCH[pickle.BUILD[0]](self)
            return
        stack.append(state)
        try:
            _BASE_DISPATCH[pickle.BUILD[0]](self)
        except CheckpointError:
            raise
        except Exception as exc:
            raise self._corrupt(
                f"setting the state of a {type(inst).__name__} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _build_array(self, numpy: Any, inst: Any, state: Any) -> None:
        """``inst.__setstate__(state)`` for an array ``_reconstruct`` made, once."""
        if self._unbuilt.get(id(inst)) is not inst:
            raise self._refuse(
                "the pickle sets the state of an array that already holds data or was not "
                "made by numpy's _reconstruct; numpy would free memory that views of it "
                "still use"
            )
        if getattr(type(inst), "__setstate__", None) is numpy.ndarray.__setstate__:
            problem = _array_state_problem(numpy, state)
            if problem is not None:
                raise self._refuse(f"refusing the state of a numpy array: {problem}")
        del self._unbuilt[id(inst)]
        self._pending.pop(id(inst), None)
        try:
            cast(Any, inst).__setstate__(state)
        except CheckpointError:
            raise
        except Exception as exc:
            raise self._corrupt(
                f"setting the state of a numpy array failed: {type(exc).__name__}: {exc}"
            ) from exc


_BASE_DISPATCH: dict[int, Callable[[Any], None]] = dict(pickle._Unpickler.dispatch)
SafeUnpickler.dispatch = {
    **_BASE_DISPATCH,
    pickle.REDUCE[0]: SafeUnpickler._load_reduce,
    pickle.NEWOBJ[0]: SafeUnpickler._load_newobj,
    pickle.NEWOBJ_EX[0]: SafeUnpickler._load_newobj_ex,
    pickle.BUILD[0]: SafeUnpickler._load_build,
    pickle.BYTEARRAY8[0]: SafeUnpickler._load_bytearray8,
    pickle.STOP[0]: SafeUnpickler._load_stop,
}


def safe_pickle_load(
    stream: _ReadableFile,
    *,
    allowed: Iterable[object] = (),
    allow_subclasses_of: type | None = None,
    source: str = "",
    buffers: Iterable[Any] | None = None,
) -> Any:
    """``pickle.load(stream)`` through :class:`SafeUnpickler` (see there for the args)."""
    return SafeUnpickler(
        stream,
        allowed=allowed,
        allow_subclasses_of=allow_subclasses_of,
        source=source,
        buffers=buffers,
    ).load()


# --------------------------------------------------------------------------------------
# What each allowlisted callable may be called with
# --------------------------------------------------------------------------------------

#: Why the call ``target(*args)`` (or ``target.__new__(target, *args)``) is refused, or
#: None if it may run. ``target`` is what the pickle calls: the allowlisted callable, or
#: a class that inherits its constructor from one. Keyword arguments are always refused.
_Rule = Callable[[SafeUnpickler, Any, tuple[Any, ...]], str | None]

#: Containers whose size is the file's: what container constructors may copy from (a
#: lazy ``range(10**12)`` may not be expanded).
_DATA: tuple[type, ...] = (
    list, tuple, set, frozenset, dict, str, bytes, bytearray, collections.deque,
)  # fmt: skip
_BYTES_LIKE: tuple[type, ...] = (bytes, bytearray, memoryview, pickle.PickleBuffer)
_NUMBER_OR_TEXT: tuple[type, ...] = (int, float, str, bytes, bytearray)  # bool is an int
#: numpy 2's limit on an array's dimensions (numpy 1's is 32: it refuses more itself).
_MAX_DIMS = 64
#: ``str(Fraction)``: what its pickles held before Python 3.12 (no exponent: 10**exp).
_FRACTION_TEXT = re.compile(r"\s*[-+]?[0-9]+(?:/[0-9]+)?\s*")


def _name_of(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return f"<{type(obj).__name__}>"


def _brief(value: object) -> str:
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
        text = _name_of(value)
    elif (numpy := _numpy()) is not None and isinstance(value, numpy.dtype):
        text = f"dtype({str(value)!r})"
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _brief_args(args: tuple[Any, ...]) -> str:
    return ", ".join(_brief(arg) for arg in args[:4]) + (", ..." if len(args) > 4 else "")


def _owner(cls: type, name: str) -> type | None:
    """The class in ``cls``'s MRO that defines ``name`` itself."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return None


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


def _is_numpy_class(obj: object) -> bool:
    numpy = _numpy()
    return (
        numpy is not None
        and isinstance(obj, type)
        and issubclass(obj, (numpy.ndarray, numpy.generic, numpy.dtype))
    )


def _arity(args: tuple[Any, ...], low: int, high: int) -> str | None:
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
    if not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in _TEXT_CODECS:
        return f"the codec {_brief(encoding)} (only {sorted(_TEXT_CODECS)} are looked up)"
    if not isinstance(errors, str) or errors not in _TEXT_ERRORS:
        return f"the error handler {_brief(errors)}"
    return None


def _rule_any(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """``object``: its ``__new__`` makes an empty instance whatever the arguments."""
    return None


def _rule_not_callable(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return "it is not callable"


def _rule_container(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """dict, list, tuple, set, frozenset, OrderedDict, Counter: from one data container."""
    problem = _arity(args, 0, 1)
    if problem is None and args and not isinstance(args[0], _DATA):
        return _not_data(args[0])
    return problem


def _rule_bytes(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """bytes, bytearray: from bytes or a list of ints, or text in a text codec."""
    problem = _arity(args, 0, 3)
    if problem is not None or not args:
        return problem
    if len(args) == 1:
        if isinstance(args[0], (*_BYTES_LIKE, list, tuple)):
            return None
        if isinstance(args[0], int):
            return "an int asks for that many zero bytes, which the file does not hold"
        return _not_data(args[0])
    if not isinstance(args[0], str):
        return f"only text is encoded, not a {type(args[0]).__name__}"
    return _text_codec_problem(args)


def _rule_str(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """str: from a str, or bytes in a text codec (never ``str(obj)``, which runs code)."""
    problem = _arity(args, 0, 3)
    if problem is not None or not args:
        return problem
    if len(args) == 1:
        if isinstance(args[0], str):
            return None
        return f"str() of a {type(args[0]).__name__}"
    if not isinstance(args[0], _BYTES_LIKE):
        return f"only bytes are decoded, not a {type(args[0]).__name__}"
    return _text_codec_problem(args)


def _rule_int(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """int: from a number or its text (not a Decimal: int(Decimal('1e999999999')))."""
    problem = _arity(args, 0, 2)
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
    problem = _arity(args, 0, 1)
    if problem is None and args and not isinstance(args[0], _NUMBER_OR_TEXT):
        return f"float() of a {type(args[0]).__name__}"
    return problem


def _rule_complex(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = _arity(args, 0, 2)
    if problem is not None:
        return problem
    kinds = (int, float, complex, str) if len(args) == 1 else (int, float)
    if all(isinstance(arg, kinds) for arg in args):
        return None
    return "complex() takes numbers (or one text)"


def _rule_bool(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = _arity(args, 0, 1)
    if problem is None and args and not isinstance(args[0], (type(None), int, float, *_DATA)):
        return f"bool() of a {type(args[0]).__name__}"
    return problem


def _rule_slice(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """slice: 1 to 3 values, which it only stores."""
    return _arity(args, 1, 3)


def _rule_range(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = _arity(args, 1, 3)
    if problem is None and not all(isinstance(arg, int) for arg in args):
        return "range() takes ints"
    return problem


def _rule_deque(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = _arity(args, 0, 2)
    if problem is not None:
        return problem
    if args and not isinstance(args[0], _DATA):
        return _not_data(args[0])
    if len(args) == 2 and args[1] is not None and (type(args[1]) is not int or args[1] < 0):
        return "its maxlen must be None or an int >= 0"
    return None


def _rule_defaultdict(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """defaultdict(factory[, data]): the factory is a global the pickle named."""
    problem = _arity(args, 0, 2)
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
    problem = _arity(args, 1, 1 + tz)
    if problem is not None:
        return problem
    if len(args[0]) != size:
        return f"a state of {len(args[0])} bytes, not {size}"
    return _tzinfo_problem(args[1]) if len(args) == 2 else None


def _fields_problem_of(args: tuple[Any, ...], low: int, ints: int, tz: bool) -> str | None:
    """The field form: ``low`` to ``ints`` ints, then a tzinfo if ``tz``."""
    problem = _arity(args, low, ints + tz)
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
    problem = _arity(args, 0, 7)
    if problem is None and not all(isinstance(arg, (int, float)) for arg in args):
        return "timedelta() takes numbers"
    return problem


def _rule_timezone(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = _arity(args, 1, 2)
    if problem is not None:
        return problem
    if not isinstance(args[0], datetime.timedelta) or not all(
        isinstance(arg, str) for arg in args[1:]
    ):
        return "timezone() takes a timedelta and a name"
    return None


def _rule_decimal(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = _arity(args, 0, 1)
    if problem is None and args and not isinstance(args[0], (str, int, float, tuple)):
        return f"Decimal() of a {type(args[0]).__name__}"
    return problem


def _rule_fraction(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """Fraction: ints, a float, or 'n/d' text (an exponent would compute 10**exp)."""
    problem = _arity(args, 0, 2)
    if problem is not None or not args:
        return problem
    if len(args) == 2:
        return None if all(type(arg) is int for arg in args) else "Fraction(n, d) takes ints"
    value = args[0]
    if isinstance(value, (int, float)):
        return None
    if isinstance(value, str) and len(value) <= 10_000 and _FRACTION_TEXT.fullmatch(value):
        return None
    return f"Fraction() of {_brief(value)} (only ints, floats and 'n/d' text)"


def _rule_uuid(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    problem = _arity(args, 0, 1)
    if problem is None and args and not (isinstance(args[0], str) and len(args[0]) <= 64):
        return "UUID() takes its hex text"
    return problem


def _rule_reconstructor(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """``copyreg._reconstructor(cls, base, state)``: ``base.__new__(cls, state)`` and
    ``base.__init__``, so the rule of ``base`` for ``(state,)``; never numpy objects."""
    problem = _arity(args, 3, 3)
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
        return f"{_name_of(cls)} is not a subclass of {_name_of(base)}"
    if base is object:
        return None if state is None else "a state for the base object"
    rule = _own_rule(base)
    return None if rule is None else rule(u, cls, (state,))


def _rule_dtype(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """numpy.dtype(typecode[, align[, copy]]), as numpy's own pickles call it."""
    problem = _arity(args, 1, 3)
    if problem is not None:
        return problem
    if not isinstance(args[0], (str, bytes)) or len(args[0]) > 256:
        return "numpy.dtype() takes a type code (text)"
    if not all(type(flag) is bool or (type(flag) is int and flag in (0, 1)) for flag in args[1:]):
        return "its align and copy flags must be booleans"
    return None


def _rule_ndarray(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return "numpy.ndarray is never called: it reads object pointers or uninitialised memory"


def _rule_reconstruct(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """numpy's ``_reconstruct(subtype, shape, dtype)`` (see ``_new_unbuilt_array``)."""
    problem = _arity(args, 3, 3)
    if problem is not None:
        return problem
    numpy = _numpy()
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
    numpy = _numpy()
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
            or id(data) in u._pending
        ):
            return "a structured scalar with objects is made from a 0-d array of its dtype"
        return None
    if not isinstance(data, (bytes, str)) or len(data) != dtype.itemsize:
        length = len(data) if isinstance(data, (bytes, str)) else type(data).__name__
        return f"its data must be exactly {dtype.itemsize} bytes for {dtype}, not {length}"
    return None


def _rule_frombuffer(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    """numpy's ``_frombuffer(buffer, dtype, shape, order)``: a view of exactly the buffer."""
    problem = _arity(args, 4, 4)
    if problem is not None:
        return problem
    numpy = _numpy()
    buffer, dtype, shape, order = args
    if not isinstance(buffer, _BYTES_LIKE):
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
        return f"the order {_brief(order)}"
    return None


def _rule_codecs_encode(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return _arity(args, 1, 3)  # the stand-in checks the rest


def _rule_getattr(u: SafeUnpickler, target: Any, args: tuple[Any, ...]) -> str | None:
    return _arity(args, 2, 2)


def _array_state_problem(numpy: Any, state: Any) -> str | None:
    """Why ``ndarray.__setstate__(state)`` is refused: the state's shape, dtype and data
    must agree exactly (numpy reads a short object list past its end)."""
    if type(state) is not tuple or len(state) not in (4, 5):
        return "it is not numpy's (version, shape, dtype, is_fortran, data) tuple"
    if len(state) == 5 and (type(state[0]) is not int or state[0] not in (0, 1)):
        return f"the pickle version {_brief(state[0])}"
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
                f"exactly {size} items, not {_brief(data)}"
            )
        return None
    if not isinstance(data, (bytes, str)) or len(data) != size * dtype.itemsize:
        length = f"{len(data)} bytes" if isinstance(data, (bytes, str)) else _brief(data)
        return (
            f"{size} items of {dtype} need exactly {size * dtype.itemsize} bytes of data, "
            f"not {length}"
        )
    return None


#: The rule of each built-in allowlist entry, by where it is found (``_BUILTIN_ALLOWED``'s
#: values).
_RULES_BY_TARGET: dict[tuple[str, str], _Rule] = {
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
    ("builtins", "object"): _rule_any,
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
    ("numpy", "dtype"): _rule_dtype,
    ("numpy", "ndarray"): _rule_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _rule_reconstruct,
    ("numpy._core.multiarray", "scalar"): _rule_scalar,
    ("numpy._core.numeric", "_frombuffer"): _rule_frombuffer,
}

#: The rule of every built-in allowlist entry, by the name a pickle uses (a KeyError here
#: on import means an allowlist entry without a rule).
_RULE_NAMES: dict[tuple[str, str], _Rule] = {
    key: _RULES_BY_TARGET[target] for key, target in _BUILTIN_ALLOWED.items()
}

#: The rules by the id of their (resolved) object, for the modules imported so far.
_RULES: dict[int, tuple[object, _Rule]] = {}
#: The entries not resolved yet: name -> (the top-level package to wait for, rule).
_UNRESOLVED: dict[tuple[str, str], tuple[str, _Rule]] = {
    key: (_BUILTIN_ALLOWED[key][0].split(".")[0], rule) for key, rule in _RULE_NAMES.items()
}


def _rules() -> dict[int, tuple[object, _Rule]]:
    """The rules of the allowlist entries whose modules are imported (only those objects
    can exist); never imports a module that is not imported yet. (Idempotent: threads
    that race here resolve the same objects.)"""
    if _UNRESOLVED:
        for key, (package, rule) in list(_UNRESOLVED.items()):
            if package in sys.modules:
                obj = _resolve_builtin(key)
                _RULES[id(obj)] = (obj, rule)
                _UNRESOLVED.pop(key, None)
    return _RULES


def _own_rule(obj: object) -> _Rule | None:
    """The rule of ``obj`` itself if it is a built-in allowlist entry."""
    entry = _rules().get(id(obj))
    return entry[1] if entry is not None and entry[0] is obj else None


# --------------------------------------------------------------------------------------
# numpy dtypes from pickled state
# --------------------------------------------------------------------------------------


def _dtype_with_state(
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


# --------------------------------------------------------------------------------------
# msgpack
# --------------------------------------------------------------------------------------


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
