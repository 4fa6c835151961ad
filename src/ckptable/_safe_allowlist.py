"""Safe loading, part 1: the built-in allowlist, and how a pickle's names resolve.

A pickle names every class or function it uses (a *global*) by module and qualified
name; ``SafeUnpickler.find_class`` resolves only names on an allowlist. This module
holds the fixed part of it and the lookups that never run a file's code:

- :data:`BUILTIN_ALLOWED`: the harmless globals every safe load accepts (builtin
  containers and scalars, ``collections``, ``datetime``, ``decimal``, ``fractions``,
  ``uuid``, and the few numpy functions that rebuild arrays, dtypes and scalars). Only
  the modules of this list are ever imported by the unpickler. Each entry must also have
  an argument rule (see :mod:`ckptable._safe_rules`): an entry without one fails the
  import of :mod:`ckptable._safe_unpickler`.
- :func:`key_of`: the name a pickle uses for an object, as the user allowlist
  (:func:`ckptable._safe.add_safe_classes`) and per-load ``allowed`` objects are keyed.
- :func:`lookup_subclass`: subclasses of ``allow_subclasses_of``, looked up statically
  in modules already imported (nothing is imported to find them).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

__all__ = [
    "BUILTIN_ALLOWED",
    "imported_numpy",
    "key_of",
    "lookup_subclass",
    "resolve_builtin",
]


def key_of(obj: object) -> tuple[str, str]:
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


_BUILTINS = [
    *("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "str"),
    *("int", "float", "complex", "bool", "slice", "range", "object"),
    *("Ellipsis", "NotImplemented"),
]

#: The built-in allowlist: the (module, qualname) a pickle names -> where to find it.
#: Only these modules are ever imported by the unpickler.
BUILTIN_ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
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
    # installed numpy's own (see resolve_builtin), without its deprecation warning.
    **{
        (f"{package}.{module}", name): (f"numpy._core.{module}", name)
        for package in ("numpy.core", "numpy._core")
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    },
    # torch's tensor records (ckptable._torch) resolve to the stand-ins of
    # ckptable._safe_torch, whose rules check them; torch.<dtype> globals resolve there
    # too (resolve_torch_global). TensorBase (_TensorBase before torch 2.2) is found as
    # torch.Tensor's base: a name every torch has, so nothing fails to resolve.
    **{
        ("torch._utils", name): ("ckptable._safe_torch", stand_in)
        for name, stand_in in (
            ("_rebuild_device_tensor_from_numpy", "rebuild_device_tensor_from_numpy"),
            ("_rebuild_parameter", "rebuild_parameter"),
            ("_rebuild_tensor_v2", "rebuild_tensor_v2"),
        )
    },
    ("torch.storage", "_load_from_bytes"): ("ckptable._safe_torch", "load_from_bytes"),
    **{("torch._C", base): ("torch", "Tensor.__base__") for base in ("TensorBase", "_TensorBase")},
    **{
        ("torch._C", f"{base}.{method}"): ("ckptable._safe_torch", f"tensor_{method}")
        for base in ("TensorBase", "_TensorBase")
        for method in ("view", "requires_grad_")
    },
}

_RESOLVED: dict[tuple[str, str], object] = {}


def resolve_builtin(key: tuple[str, str]) -> object:
    """The object of a built-in allowlist entry, importing its (allowlisted) module."""
    obj = _RESOLVED.get(key)
    if obj is not None:
        return obj
    module, qualname = BUILTIN_ALLOWED[key]
    if module.startswith("numpy._core."):
        numpy = importlib.import_module("numpy")
        if int(str(numpy.__version__).split(".")[0]) < 2:
            module = "numpy.core." + module.removeprefix("numpy._core.")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    _RESOLVED[key] = obj
    return obj


def imported_numpy() -> Any:
    """The numpy module if it has been imported (nothing numpy exists otherwise)."""
    return sys.modules.get("numpy")


def lookup_subclass(module: str, qualname: str, base: type) -> type | None:
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
