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

An allowlist of *names* is not enough with numpy: its unpickling functions trust the
file's bytes, and a crafted pickle that only names allowlisted numpy globals can still
corrupt memory (arrays of raw pointers read from the file: a path to running code).
Three holes were found and are closed here, which is why :class:`SafeUnpickler` is
built on the pure-Python ``pickle._Unpickler``, whose opcodes can be intercepted (it is
slower than the C unpickler: about 8x on many small objects, under 2x on large arrays):

- ``numpy.dtype.__setstate__`` takes the type flags from the file, so a structured
  dtype with an object field can claim to hold no objects, and ``_frombuffer`` then
  builds an object array from raw bytes. A dtype's state is applied to a private copy,
  which must equal a dtype numpy's own constructor builds from the same layout; the
  copy then replaces the original on the stack and in the memo, so a dtype already in
  use never changes under an array.
- ``numpy.ndarray(shape, object, buffer)`` builds object arrays from raw bytes. No
  ndarray class may be called or ``__new__``-ed by the pickle; arrays come from
  ``_reconstruct`` and ``_frombuffer``, which refuse object dtypes from bytes.
- ``ndarray.__setstate__`` frees an array's memory while views of it may exist. It is
  only applied to arrays that hold no data yet, as ``_reconstruct`` makes them.

``BUILD`` is refused on classes, functions and modules (it would overwrite their
attributes process-wide), and ``_codecs.encode`` (used by protocol 2 for bytes) is
limited to latin-1, UTF-8 and ASCII text, so no codec module is imported.

msgpack: msgpack-numpy's decoder calls ``pickle.loads`` on object-dtype arrays, and
builds any other array with ``numpy.ndarray(buffer=...)``, which makes object arrays
from raw bytes when the file claims an object dtype under another kind.
:func:`safe_msgpack_decode` refuses every array or scalar whose dtype holds objects
before msgpack-numpy sees it, and otherwise delegates to ``msgpack_numpy.decode``.

What is allowed still runs: a class given to :func:`add_safe_classes` is trusted with
its ``__setstate__`` / ``__reduce__`` arguments. A hostile file can also ask for large
allocations (a denial of service), which an allowlist cannot prevent.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import copyreg
import importlib
import inspect
import pickle
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol, cast

from ckptable.errors import UnsafeCheckpointError

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

    Args:
        stream: The binary file to read the pickle from.
        allowed: Extra classes or functions allowed for this load only (for example the
            classes of the objects being restored).
        allow_subclasses_of: Also allow any subclass of this class, if its module is
            already imported (nothing is imported to find it).
        source: The file being read, for error messages.

    Raises (from ``load``):
        UnsafeCheckpointError: The pickle names a global outside the allowlist, uses
            persistent ids, or builds numpy objects in a way that is not memory-safe.
    """

    # Attributes of pickle._Unpickler that typeshed does not declare.
    stack: list[Any]
    memo: _Memo
    proto: int
    fix_imports: bool
    append: Callable[[Any], None]

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
        super().__init__(stream, buffers=buffers)
        self.memo = _Memo()
        self._allowed = {_key_of(obj): obj for obj in allowed}
        if allow_subclasses_of is not None and not isinstance(allow_subclasses_of, type):
            raise TypeError(f"allow_subclasses_of must be a class, not {allow_subclasses_of!r}")
        self._allow_subclasses_of = allow_subclasses_of
        self._source = source
        # Every object find_class returned in this load, by id (kept alive here): only
        # these may be called by REDUCE / NEWOBJ, and BUILD may not touch them.
        self._globals: dict[int, object] = {}

    # -- resolving globals -------------------------------------------------------------

    def _where(self) -> str:
        return f"Unsafe checkpoint file {self._source}" if self._source else "Unsafe pickle"

    def _refuse(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self._where()}: {what}", path=self._source or None)

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

    # -- calls and BUILD ---------------------------------------------------------------

    def _check_callable(self, func: object, how: str) -> None:
        if self._globals.get(id(func)) is not func:
            raise self._refuse(f"{how} of {type(func).__name__} object, which is not a global")
        numpy = _numpy()
        if numpy is not None and isinstance(func, type) and issubclass(func, numpy.ndarray):
            raise self._refuse(
                f"{how} of {func.__module__}.{func.__qualname__} directly: that can build "
                "arrays from raw memory; numpy pickles use numpy's _reconstruct instead"
            )

    def _load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        self._check_callable(func, "a call")
        stack[-1] = func(*args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_callable(cls, "__new__")
        self.append(cls.__new__(cls, *args))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_callable(cls, "__new__")
        self.append(cls.__new__(cls, *args, **kwargs))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        """INST and OBJ (protocols 0 and 1), as pickle does them."""
        self._check_callable(klass, "a call")
        if args or not isinstance(klass, type) or hasattr(klass, "__getinitargs__"):
            self.append(klass(*args))
        else:
            self.append(cast(Any, klass).__new__(klass))

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
            if isinstance(inst, numpy.ndarray) and inst.nbytes != 0:
                raise self._refuse(
                    "the pickle sets the state of an array that already holds data; numpy "
                    "would free memory that views of it still use"
                )
            if isinstance(inst, numpy.generic):
                raise self._refuse("the pickle sets the state of a numpy scalar")
        stack.append(state)
        _BASE_DISPATCH[pickle.BUILD[0]](self)


_BASE_DISPATCH: dict[int, Callable[[Any], None]] = dict(pickle._Unpickler.dispatch)
SafeUnpickler.dispatch = {
    **_BASE_DISPATCH,
    pickle.REDUCE[0]: SafeUnpickler._load_reduce,
    pickle.NEWOBJ[0]: SafeUnpickler._load_newobj,
    pickle.NEWOBJ_EX[0]: SafeUnpickler._load_newobj_ex,
    pickle.BUILD[0]: SafeUnpickler._load_build,
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
    fresh.__setstate__(state)
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
