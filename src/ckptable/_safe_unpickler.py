"""Safe loading, part 4: the unpickler, which resolves and calls only what is allowed.

Why: a pickle is a small program. Every global it names is imported by
``Unpickler.find_class`` and may then be called with arguments from the file, so
``pickle.load`` of an untrusted checkpoint can run anything. :class:`SafeUnpickler`
resolves only allowlisted globals (the built-in list of :mod:`ckptable._safe_allowlist`,
the user's of :func:`ckptable._safe.add_safe_classes`, and per load the ``allowed``
objects and subclasses of ``allow_subclasses_of``); persistent ids and extension codes
cannot smuggle anything in either (``copyreg``'s extension cache is bypassed).

It is built on the pure-Python ``pickle._Unpickler``, whose opcodes can be intercepted
(it is slower than the C unpickler: about 8x on many small objects, under 2x on large
arrays). Every call a pickle makes (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``INST``,
``OBJ``) of a built-in allowlist entry goes through its rule first
(:mod:`ckptable._safe_rules`, :mod:`ckptable._safe_numpy`; this module imports every
module of rules and refuses to import while an allowlist entry has none). ``BUILD`` is
refused on classes, functions and modules (it would overwrite their attributes
process-wide), and numpy objects get their state only as :mod:`ckptable._safe_numpy`
allows. Length fields cannot make the unpickler allocate more than the file holds either
(``BYTEARRAY8`` and big reads go through a bounded reader).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import copyreg
import inspect
import io
import pickle
import struct
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol

from ckptable._safe_allowlist import (
    BUILTIN_ALLOWED,
    imported_numpy,
    key_of,
    lookup_subclass,
    resolve_builtin,
)
from ckptable._safe_numpy import DtypeMemo, UnbuiltArrays, dtype_with_state, rule_reconstruct
from ckptable._safe_rules import (
    TEXT_CODECS,
    TEXT_ERRORS,
    Rule,
    brief,
    brief_args,
    name_of,
    own_rule,
    rule_any,
    rule_codecs_encode,
    rule_getattr,
    rule_names,
)
from ckptable._safe_torch import build_problem, resolve_torch_global
from ckptable.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

__all__ = [
    "RULE_NAMES",
    "SafeUnpickler",
    "safe_pickle_load",
]

#: The rule of every built-in allowlist entry, by the name a pickle uses (a KeyError here
#: on import means an allowlist entry without a rule: every module of rules is imported
#: above).
RULE_NAMES: dict[tuple[str, str], Rule] = rule_names()


class _ReadableFile(Protocol):
    def read(self, n: int, /) -> bytes: ...

    def readline(self) -> bytes: ...


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


def _owner(cls: type, name: str) -> type | None:
    """The class in ``cls``'s MRO that defines ``name`` itself."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return None


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
    memo: DtypeMemo
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
        self.memo = DtypeMemo()
        self._allowed = {key_of(obj): obj for obj in allowed}
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
        self._arrays = UnbuiltArrays()
        self._rule_cache: dict[tuple[int, bool], tuple[Rule | None]] = {}

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
        if self.memo.dtype_type is None and (numpy := imported_numpy()) is not None:
            self.memo.dtype_type = numpy.dtype
        return obj

    def _resolve(self, module: str, name: str) -> object:
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        from ckptable import _safe  # the user allowlist is read there (tests swap it)

        user = _safe._USER_ALLOWED.get(key)
        if user is not None:
            return user
        # Restricted stand-ins for two globals that protocols 2 and 3 use.
        if key == ("_codecs", "encode"):
            return self._codecs_encode
        if key == ("builtins", "getattr"):
            return self._getattr
        if key in BUILTIN_ALLOWED:
            return resolve_builtin(key)
        torch_dtype = resolve_torch_global(module, name)
        if torch_dtype is not None:
            return torch_dtype
        if self._allow_subclasses_of is not None:
            found = lookup_subclass(module, name, self._allow_subclasses_of)
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
        module, qualname = key_of(obj)
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
            or encoding.lower().replace("_", "-") not in TEXT_CODECS
            or errors not in TEXT_ERRORS
        ):
            raise self._refuse(
                f"_codecs.encode is only allowed on text with the codecs {sorted(TEXT_CODECS)}"
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
        numpy = imported_numpy()
        if numpy is not None and isinstance(func, type) and issubclass(func, numpy.ndarray):
            raise self._refuse(
                f"{how} of {func.__module__}.{func.__qualname__} directly: that can build "
                "arrays from raw memory; numpy pickles use numpy's _reconstruct instead"
            )

    def _rule_for(self, func: object, new: bool) -> Rule | None:
        """The rule for calling ``func`` (or ``func.__new__`` if ``new``); None for user code.

        A class without a rule of its own gets the rule of the allowlisted class it
        inherits its constructor from (``__new__``, and ``__init__`` for a call), unless
        a user class in between defines one: user code is trusted with its arguments.
        """
        if getattr(func, "__self__", None) is self:  # the stand-ins for globals
            method = getattr(func, "__func__", None)
            if method is SafeUnpickler._codecs_encode:
                return rule_codecs_encode
            if method is SafeUnpickler._getattr:
                return rule_getattr
            return None
        rule = own_rule(func)
        if rule is not None or not isinstance(func, type):
            return rule
        if not new and _owner(type(func), "__call__") is not type:
            return None  # a metaclass of user code decides what the call does
        for klass in func.__mro__:
            rule = own_rule(klass)
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
                raise self._refuse(f"__new__ of {name_of(func)}, which is not a class")
            cached = self._rule_cache[(id(func), new)] = (self._rule_for(func, new),)
        rule = cached[0]
        if type(args) is not tuple:  # *args of a lazy range(10**12) would build it
            raise self._refuse(
                f"the arguments of {name_of(func)} are a {type(args).__name__}, not a tuple"
            )
        if type(kwargs) is not dict or not all(type(key) is str for key in kwargs):
            raise self._refuse(f"the keyword arguments of {name_of(func)} are not a dict")
        if rule is None:  # user code, trusted
            return func.__new__(func, *args, **kwargs) if new else func(*args, **kwargs)
        if kwargs and rule is not rule_any:  # object.__new__ ignores them
            problem: str | None = "keyword arguments"
        else:
            problem = rule(self, func, args)
        if problem is not None:
            name = name_of(func) + (".__new__" if new else "")
            raise self._refuse(f"refusing {name}({brief_args(args)}): {problem}")
        try:
            if rule is rule_reconstruct:
                return self._arrays.make(func, args)
            return func.__new__(func, *args, **kwargs) if new else func(*args, **kwargs)
        except CheckpointError:
            raise
        except Exception as exc:
            name = name_of(func) + (".__new__" if new else "")
            raise self._corrupt(
                f"{name}({brief_args(args)}) failed: {type(exc).__name__}: {exc}"
            ) from exc

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
        unfinished = self._arrays.unfinished()
        if unfinished is not None:
            shape, dtype = unfinished
            raise self._refuse(
                f"the pickle makes a numpy array of shape {brief(shape)} (dtype "
                f"{brief(dtype)}) with _reconstruct and never gives it its data with "
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
        torch_problem = build_problem(inst)
        if torch_problem is not None:
            raise self._refuse(torch_problem)
        numpy = imported_numpy()
        if numpy is not None:
            if isinstance(inst, numpy.dtype):
                fresh = dtype_with_state(numpy, inst, state, self._refuse)
                stack[-1] = fresh
                self.memo.replace(inst, fresh)
                return
            if isinstance(inst, numpy.ndarray):
                self._arrays.build(numpy, inst, state, self._refuse, self._corrupt)
                return
            if isinstance(inst, numpy.generic):
                raise self._refuse("the pickle sets the state of a numpy scalar")
        setstate_owner = _owner(type(inst), "__setstate__")
        if setstate_owner is not None and own_rule(setstate_owner) is None:
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
