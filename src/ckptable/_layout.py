"""The on-disk layout shared by save, restore and info: file names and ckptable's record.

Per level (RLlib's ``Checkpointable`` layout, which ckptable keeps)::

    metadata.json             get_metadata() + ckptable's record under "ckptable"
    class_and_ctor_args.pkl   cloudpickle of {"class": cls, "ctor_args_and_kwargs": ...}
    state.pkl | state.msgpack the level's own state, without its components
    <component>/              the same, recursively

A class may rename the three files (RLlib's Algorithm uses ``rllib_checkpoint.json`` and
``algorithm_state``); the defaults below apply where no object says otherwise.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, TypeGuard

from ckptable.errors import CorruptCheckpointError

if TYPE_CHECKING:
    from ckptable._storage import Storage

__all__ = [
    "CHECKPOINT_VERSION",
    "DEFAULT_CLASS_FILE",
    "DEFAULT_METADATA_FILE",
    "DEFAULT_STATE_FILE",
    "LAYOUT_VERSION",
    "RECORD_KEY",
    "checkpoint_file_names",
    "is_state_version",
    "loads_json",
    "read_metadata_file",
    "record_of",
]

#: ``checkpoint_version`` written to ``metadata.json``: the RLlib layout version
#: (``Checkpointable`` API, RLlib 2.x) whose files ckptable writes.
CHECKPOINT_VERSION = "2.1"
#: Version of ckptable's own record in ``metadata.json``.
LAYOUT_VERSION = 2
#: Key of ckptable's record inside ``metadata.json``.
RECORD_KEY = "ckptable"

DEFAULT_METADATA_FILE = "metadata.json"
DEFAULT_CLASS_FILE = "class_and_ctor_args.pkl"
DEFAULT_STATE_FILE = "state"


def is_state_version(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is a valid ``STATE_VERSION``: an int (not a bool) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def record_of(metadata: Any) -> dict[str, Any] | None:
    """ckptable's record inside a level's metadata; None if ckptable did not write it."""
    record = metadata.get(RECORD_KEY) if isinstance(metadata, dict) else None
    return record if isinstance(record, dict) else None


#: JSON documents ckptable reads (metadata, manifests, headers) nest a few levels.
MAX_JSON_DEPTH = 64
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def loads_json(data: bytes | str, **kwargs: Any) -> Any:
    """``json.loads`` of a document that must nest at most ``MAX_JSON_DEPTH`` levels.

    The depth is checked first, without recursion, so that a document nested too deeply
    is a ``ValueError`` (a damaged or crafted file), while a ``RecursionError`` from the
    parse itself can only mean the caller's own stack ran out (deep in a tree), which
    is no fault of the file and is left to the caller.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        depth = 0
        for token in _JSON_TOKENS.finditer(raw):
            symbol = token.group()
            if symbol in (b"[", b"{"):
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    raise ValueError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
            elif symbol in (b"]", b"}"):
                depth -= 1
    return json.loads(data, **kwargs)


def read_metadata_file(storage: Storage, path: str, raw: bytes | None = None) -> dict[str, Any]:
    """A level's metadata JSON (``{}`` if it holds no object); ``raw``: its bytes, if
    already read.

    Raises:
        CorruptCheckpointError: the file is not valid UTF-8 JSON, or nested too deeply.
    """
    try:
        data = loads_json((storage.read_bytes(path) if raw is None else raw).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        shown = storage.display(path)
        raise CorruptCheckpointError(f"{shown} is not valid JSON: {exc}", path=shown) from exc
    return data if isinstance(data, dict) else {}


def checkpoint_file_names(obj_or_cls: Any) -> list[str]:
    """The file names that mark a checkpoint level written for ``obj_or_cls``."""
    from ckptable._formats import registered_codecs

    state = obj_or_cls.STATE_FILE_NAME
    return [
        obj_or_cls.METADATA_FILE_NAME,
        obj_or_cls.CLASS_AND_CTOR_ARGS_FILE_NAME,
        *(state + codec.suffix for codec in registered_codecs().values()),
    ]
