"""A meta-path import hook: runs a callback the moment ``ray.rllib.utils.checkpoints``
has been executed, before any other RLlib module defines a subclass of its
``Checkpointable``.

Used when ``ckptable.rllib.enable()`` runs before RLlib is imported: RLlib (several
seconds to import) is not imported early, and a Ray worker that never runs RLlib code
never imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["ModuleExecutedHook"]


class ModuleExecutedHook(importlib.abc.MetaPathFinder):
    """Finds ``fullname`` with the other finders and wraps its loader so that
    ``callback(module)`` runs right after the module's code. An exception from the
    callback fails the import (the module is then not left in ``sys.modules``)."""

    def __init__(self, fullname: str, callback: Callable[[ModuleType], None]) -> None:
        self.fullname = fullname
        self.callback = callback

    def install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.fullname:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        found: importlib.machinery.ModuleSpec = spec
        if found.loader is not None and not isinstance(found.loader, _CallbackLoader):
            found.loader = _CallbackLoader(found.loader, self.callback)
        return found


class _CallbackLoader(importlib.abc.Loader):
    """The module's own loader, with the callback after ``exec_module``; other
    attributes (``get_source``, ``get_code``, ...) are the wrapped loader's."""

    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
