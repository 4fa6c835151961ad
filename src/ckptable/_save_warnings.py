"""The save pipeline's warning about the saved object's class: a root class defined in
``__main__`` (``MainModuleClassWarning``), checked while a level's class file is written
(``_save._write_class_and_ctor_args``), and pointed at the user's ``save_to_path`` line.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any

from ckptable.errors import MainModuleClassWarning

if TYPE_CHECKING:
    from ckptable._save import _SaveSession

__all__ = ["_warn_if_main_module_class"]


#: Classes of ``__main__`` that a save has warned about (once per class and process).
_warned_main_classes: weakref.WeakSet[type] = weakref.WeakSet()


def _warn_if_main_module_class(session: _SaveSession, obj: Any, directory: str) -> None:
    """Warn (``MainModuleClassWarning``, once per class) that the saved object's class is
    defined in ``__main__``: cloudpickle always stores such a class by value in the class
    file, and ``from_checkpoint`` in another program then meets a copy that is not its own
    class. Only for the checkpoint's root, which ``from_checkpoint`` builds; components
    are built by their parent's constructor (a component's directory loaded on its own
    says so when it fails)."""
    cls = type(obj)
    if (
        directory != session.staging_root
        or cls.__module__ != "__main__"
        or cls in _warned_main_classes
    ):
        return
    _warned_main_classes.add(cls)
    name = cls.__qualname__
    message = (
        f"{name} is defined in __main__ (the script being run), so the checkpoint "
        f"{session.describe(directory)} stores a copy of the class's code in "
        f"{obj.CLASS_AND_CTOR_ARGS_FILE_NAME} (cloudpickle pickles classes of __main__ by "
        f"value). {name}.from_checkpoint(...) in another script will refuse it (that "
        f"script's {name} is another class), and safe=True will not load it; "
        "restore_from_path into an existing object is not affected. Define "
        f"{name} in a module and import it from there (warned once per class)."
    )
    warnings.warn(
        MainModuleClassWarning(message, class_name=f"__main__.{name}"),
        stacklevel=_stacklevel_outside_ckptable(),
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _stacklevel_outside_ckptable() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by our caller that points at the
    first frame outside ckptable: the user's call of ``save_to_path``."""
    frame = sys._getframe(2)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
