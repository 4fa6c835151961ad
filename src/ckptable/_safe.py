"""Safe loading: a restricted unpickler and a msgpack hook that never run a file's code.

Why: a pickle is a small program. Every class or function it names (a *global*, found
by ``Unpickler.find_class``) is imported and may then be called with arguments from the
file, so ``pickle.load`` of an untrusted checkpoint can run anything: a ``__reduce__``
returning ``(os.system, ("...",))`` is enough. ``safe=True`` loads use this module
instead, which resolves only globals on an allowlist:

- a built-in list of harmless globals (builtin containers and scalars, ``collections``,
  ``datetime``, ``decimal``, ``fractions``, ``uuid``, and the few numpy functions that
  rebuild arrays, dtypes and scalars);
- the process-wide user list, extended with :func:`add_safe_classes` (kept here);
- per load, the objects passed as ``allowed`` (the classes being restored) and, with
  ``allow_subclasses_of``, subclasses of one base class.

Unknown modules are never imported: only the modules of the built-in list are; user
and per-load entries are resolved to the objects given, and subclasses of
``allow_subclasses_of`` are looked up (statically, with no attribute hooks running) in
modules that are already in ``sys.modules``. Every call of a built-in allowlist entry
has its arguments checked first, and numpy objects are only built in memory-safe ways.

This module is the public surface; the steps live in their own modules, each with a
docstring saying why:

1. :mod:`ckptable._safe_allowlist`: the built-in allowlist and how names resolve.
2. :mod:`ckptable._safe_rules`: the registry of argument rules, one per allowlisted
   callable, and the rules of the builtins and the standard library.
3. :mod:`ckptable._safe_numpy`: numpy's rules, and the checks of the states arrays and
   dtypes get (arrays pending until their ``BUILD``, dtypes applied to a copy).
4. :mod:`ckptable._safe_unpickler`: :class:`SafeUnpickler` and :func:`safe_pickle_load`,
   the opcodes that call, build and read.
5. :mod:`ckptable._safe_msgpack`: :func:`safe_msgpack_decode`.

What is allowed still runs: a class given to :func:`add_safe_classes` (or allowed per
load) is trusted with its constructor, ``__new__``, ``__setstate__`` and ``__reduce__``
arguments; only what it inherits from an allowlisted type is checked.
"""

from __future__ import annotations

import threading

from ckptable._safe_allowlist import BUILTIN_ALLOWED, key_of
from ckptable._safe_msgpack import safe_msgpack_decode
from ckptable._safe_unpickler import RULE_NAMES, SafeUnpickler, safe_pickle_load

__all__ = [
    "SafeUnpickler",
    "add_safe_classes",
    "safe_classes",
    "safe_msgpack_decode",
    "safe_pickle_load",
]

#: The built-in allowlist and the rule of each of its entries, by the name a pickle uses
#: (under these names for the tests that check every entry has a rule).
_BUILTIN_ALLOWED = BUILTIN_ALLOWED
_RULE_NAMES = RULE_NAMES

#: Globals the user declared safe with ``add_safe_classes``: (module, qualname) -> object.
#: ``SafeUnpickler`` reads it from this module at each lookup (tests swap it here).
_USER_ALLOWED: dict[tuple[str, str], object] = {}
_USER_LOCK = threading.Lock()


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
    keys = [(key_of(obj), obj) for obj in classes]  # validate all before adding any
    with _USER_LOCK:
        for key, obj in keys:
            _USER_ALLOWED[key] = obj


def safe_classes() -> frozenset[tuple[str, str]]:
    """The ``(module, qualname)`` names added with :func:`add_safe_classes`.

    The built-in allowlist is not included.
    """
    with _USER_LOCK:
        return frozenset(_USER_ALLOWED)
