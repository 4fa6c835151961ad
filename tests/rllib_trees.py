"""Checkpointable class trees for the RLlib compatibility tests (``test_rllib_compat.py``).

Every class is written once, in a factory that takes its base class, and built for
RLlib's ``Checkpointable`` (namespace ``RL``), for ckptable's (``CK``) and for mixed
trees whose levels use different bases (``CK_OVER_RL`` ...). The classes live at module
level under their ``__qualname__`` (``RL.Root``, ``CK.Mid`` ...), so cloudpickle pickles
them by reference, as it does user code.

The trees::

    Root / AlgoRoot                 (AlgoRoot: Algorithm's file names)
    ├── mid:   Mid ── leaf: Leaf, aux: Leaf, module: Module (RLModule's state file name)
    └── other: Mid ── leaf, aux, module

    Dynamic / DynamicAlgoNamed / DynamicRenamedClassFile    (components made by set_state)
    ├── fixed: Mid ── ...
    └── <module_id>: Module / AlgoNamed / RenamedClassFile, one per "module_specs" entry

    HookedRoot
    ├── hooked:  Hooked ── leaf: Leaf  (overrides save_to_path / restore_from_path, super())
    ├── wrapped: Wrapped               (delegates all to an inner Leaf, like TorchRLModule)
    └── plain:   Mid ── ...

``Policy`` is the migration scenario: a user module's class that inherited RLlib's base
(``RLPolicy``) and, after the user changed the import, ckptable's (``CKPolicy``); both
have the qualname ``Policy`` and tests rebind the module attribute between writing and
reading.
"""

from __future__ import annotations

import copy
import json
import os
import types
from collections.abc import Collection
from typing import Any

import numpy as np
from ray.rllib.utils.checkpoints import Checkpointable as RLlibCheckpointable

import ckptable

CkptableCheckpointable = ckptable.Checkpointable

Sel = str | Collection[str] | None

#: Algorithm's file names (``ray.rllib.algorithms.Algorithm``).
ALGO_FILE_NAMES = {
    "METADATA_FILE_NAME": "rllib_checkpoint.json",
    "STATE_FILE_NAME": "algorithm_state",
}
#: RLModule's state file name (``ray.rllib.core.rl_module.RLModule``).
MODULE_FILE_NAMES = {"STATE_FILE_NAME": "module_state"}
#: A class file name of one's own (RLlib's ``CLASS_AND_CTOR_ARGS_FILE_NAME`` attribute).
CLASS_FILE_NAMES = {"CLASS_AND_CTOR_ARGS_FILE_NAME": "ctor_args.pkl"}
#: File an overridden ``save_to_path`` writes after ``super().save_to_path()``.
HOOK_EXTRA_FILE = "hook_extra.json"


def _publish(cls: type, qualname: str, **class_attrs: Any) -> type:
    """Name ``cls`` so that it is importable as ``<this module>.<qualname>``."""
    for key, value in class_attrs.items():
        setattr(cls, key, value)
    cls.__qualname__ = qualname
    cls.__name__ = qualname.rsplit(".", 1)[-1]
    cls.__module__ = __name__
    return cls


def component_states(obj: Any, components: Sel, not_components: Sel) -> dict[str, Any]:
    """The states of ``obj``'s components selected as RLlib's own classes select them."""
    state: dict[str, Any] = {}
    for name, comp in obj.get_checkpointable_components():
        if obj._check_component(name, components, not_components):
            state[name] = comp.get_state(
                components=obj._get_subcomponents(name, components),
                not_components=obj._get_subcomponents(name, not_components),
            )
    return state


def set_component_states(obj: Any, state: dict[str, Any]) -> None:
    for name, comp in obj.get_checkpointable_components():
        if name in state:
            comp.set_state(state[name])


# --------------------------------------------------------------------------- classes


def _make_leaf(base: type, qualname: str, **class_attrs: Any) -> type:
    class Leaf(base):  # type: ignore[misc,valid-type]
        """No components: a float32 array, an int, bytes, a numpy scalar, nested dicts."""

        def __init__(self, name: str, scale: float = 1.0, *, size: int = 3, tag: str = "leaf"):
            self.name = name
            self.scale = scale
            self.size = size
            self.tag = tag
            self.weights = np.arange(size, dtype=np.float32) * np.float32(scale)
            self.counter = 0
            self.blob = b""
            self.lr = np.float32(0.125)
            self.info: dict[str, Any] = {"name": name, "ids": {}, "log": []}

        def get_state(
            self, components: Sel = None, *, not_components: Sel = None, **kwargs: Any
        ) -> dict[str, Any]:
            return {
                "weights": self.weights.copy(),
                "counter": self.counter,
                "blob": self.blob,
                "lr": self.lr,
                "info": copy.deepcopy(self.info),
            }

        def set_state(self, state: dict[str, Any]) -> None:
            if "weights" in state:
                self.weights = np.array(state["weights"], copy=True)
            for key in ("counter", "blob", "lr"):
                if key in state:
                    setattr(self, key, state[key])
            if "info" in state:
                self.info = copy.deepcopy(state["info"])

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (self.name, self.scale), {"size": self.size, "tag": self.tag}

        def mutate(self, seed: int) -> None:
            rng = np.random.default_rng(seed)
            self.weights = rng.standard_normal(self.size).astype(np.float32)
            self.counter = seed * 10 + 1
            self.blob = bytes([seed % 256, 0, 255]) + self.name.encode()
            self.lr = np.float32(seed / 8)
            # int dict keys: msgpack needs strict_map_key=False to read them back.
            self.info = {"name": self.name, "ids": {seed: "a", seed + 1: "b"}, "log": [seed, "s"]}

    return _publish(Leaf, qualname, **class_attrs)


def _make_mid(base: type, leaf_cls: type, module_cls: type, qualname: str) -> type:
    class Mid(base):  # type: ignore[misc,valid-type]
        """Three leaf components and state of its own."""

        def __init__(self, name: str = "mid", width: int = 2):
            self.name = name
            self.width = width
            self.leaf = leaf_cls(f"{name}.leaf", 2.0)
            self.aux = leaf_cls(f"{name}.aux", 3.0, size=2, tag="aux")
            self.module = module_cls(f"{name}.module", 0.5, size=4)
            self.step = 0
            self.config: dict[str, Any] = {"name": name, "width": width, "schedule": [[0, 1.0]]}

        def get_checkpointable_components(self) -> list[tuple[str, Any]]:
            return [("leaf", self.leaf), ("aux", self.aux), ("module", self.module)]

        def get_state(
            self, components: Sel = None, *, not_components: Sel = None, **kwargs: Any
        ) -> dict[str, Any]:
            state: dict[str, Any] = {"step": self.step, "config": copy.deepcopy(self.config)}
            state.update(component_states(self, components, not_components))
            return state

        def set_state(self, state: dict[str, Any]) -> None:
            set_component_states(self, state)
            self.step = state.get("step", self.step)
            if "config" in state:
                self.config = copy.deepcopy(state["config"])

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (self.name,), {"width": self.width}

        def mutate(self, seed: int) -> None:
            self.step = seed * 100
            self.config["schedule"] = [[0, 1.0], [seed, 0.5]]
            for i, (_, comp) in enumerate(self.get_checkpointable_components()):
                comp.mutate(seed * 7 + i + 1)

    return _publish(Mid, qualname)


def _make_root(base: type, mid_cls: type, qualname: str, **class_attrs: Any) -> type:
    class Root(base):  # type: ignore[misc,valid-type]
        """root → mid, other (both Mid) → leaves: three levels."""

        def __init__(self, seed: int = 0, scale: float = 1.0, *, label: str = "root", width=4):
            self.seed = seed
            self.scale = scale
            self.label = label
            self.width = width
            self.mid = mid_cls("mid")
            self.other = mid_cls("other", 3)
            self.rng_state = np.zeros(width, dtype=np.int64)
            self.history: list[Any] = []
            self.tags: dict[Any, Any] = {}
            self.raw = b""
            self.iteration = 0

        def get_checkpointable_components(self) -> list[tuple[str, Any]]:
            return [("mid", self.mid), ("other", self.other)]

        def get_state(
            self, components: Sel = None, *, not_components: Sel = None, **kwargs: Any
        ) -> dict[str, Any]:
            state: dict[str, Any] = {
                "rng_state": self.rng_state.copy(),
                "history": copy.deepcopy(self.history),
                "tags": copy.deepcopy(self.tags),
                "raw": self.raw,
                "iteration": self.iteration,
            }
            state.update(component_states(self, components, not_components))
            return state

        def set_state(self, state: dict[str, Any]) -> None:
            set_component_states(self, state)
            if "rng_state" in state:
                self.rng_state = np.array(state["rng_state"], copy=True)
            for key in ("history", "tags"):
                if key in state:
                    setattr(self, key, copy.deepcopy(state[key]))
            self.raw = state.get("raw", self.raw)
            self.iteration = state.get("iteration", self.iteration)

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (self.seed, self.scale), {"label": self.label, "width": self.width}

        def mutate(self, seed: int) -> None:
            self.rng_state = np.arange(self.width, dtype=np.int64) * seed - 3
            self.history = [seed, {"loss": 0.5 + seed, "ok": True}, [1, 2, 3]]
            self.tags = {"name": f"run{seed}", 3: "three", "nested": {"x": [seed]}}
            self.raw = b"\x00\x01root" + bytes([seed % 256])
            self.iteration = seed * 1000 + 7
            self.mid.mutate(seed + 1)
            self.other.mutate(seed + 2)

    return _publish(Root, qualname, **class_attrs)


def _make_dynamic(base: type, mid_cls: type, module_cls: type, qualname: str) -> type:
    class Dynamic(base):  # type: ignore[misc,valid-type]
        """Its modules are created by ``set_state`` from the ``module_specs`` entry."""

        def __init__(self, seed: int = 0, *, name: str = "dyn"):
            self.seed = seed
            self.name = name
            self.fixed = mid_cls("fixed")
            self.modules: dict[str, Any] = {}
            self.note = ""

        def add_module(self, module_id: str, scale: float = 1.0) -> None:
            self.modules[module_id] = module_cls(module_id, scale, size=5)

        def get_checkpointable_components(self) -> list[tuple[str, Any]]:
            return [("fixed", self.fixed), *sorted(self.modules.items())]

        def get_state(
            self, components: Sel = None, *, not_components: Sel = None, **kwargs: Any
        ) -> dict[str, Any]:
            state: dict[str, Any] = {
                "note": self.note,
                "module_specs": {mid: {"scale": m.scale} for mid, m in self.modules.items()},
            }
            state.update(component_states(self, components, not_components))
            return state

        def set_state(self, state: dict[str, Any]) -> None:
            for module_id, spec in state.get("module_specs", {}).items():
                if module_id not in self.modules:
                    self.add_module(module_id, spec["scale"])
            set_component_states(self, state)
            self.note = state.get("note", self.note)

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (self.seed,), {"name": self.name}

        def populate(self) -> None:
            self.add_module("policy_a", 2.0)
            self.add_module("policy_b", 0.5)

        def mutate(self, seed: int) -> None:
            self.note = f"note-{seed}"
            for i, (_, comp) in enumerate(self.get_checkpointable_components()):
                comp.mutate(seed * 5 + i + 1)

    return _publish(Dynamic, qualname)


def _make_hooked(base: type, leaf_cls: type, qualname: str) -> type:
    class Hooked(base):  # type: ignore[misc,valid-type]
        """Overrides save_to_path/restore_from_path and calls super(), like Algorithm.

        After ``super().save_to_path()`` it writes ``HOOK_EXTRA_FILE`` into the
        checkpoint; after ``super().restore_from_path()`` it reads that file back and
        "syncs weights" from its restored leaf, recording every call and the
        ``filesystem`` argument it was given.
        """

        def __init__(self, name: str = "hooked"):
            self.name = name
            self.leaf = leaf_cls(f"{name}.leaf", 4.0)
            self.bias = 0
            self.synced: Any = None
            self.save_calls = 0
            self.restore_calls: list[dict[str, Any]] = []
            self.filesystems: dict[str, list[Any]] = {"save": [], "restore": []}

        def get_checkpointable_components(self) -> list[tuple[str, Any]]:
            return [("leaf", self.leaf)]

        def get_state(
            self, components: Sel = None, *, not_components: Sel = None, **kwargs: Any
        ) -> dict[str, Any]:
            state: dict[str, Any] = {"bias": self.bias}
            state.update(component_states(self, components, not_components))
            return state

        def set_state(self, state: dict[str, Any]) -> None:
            set_component_states(self, state)
            self.bias = state.get("bias", self.bias)

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (self.name,), {}

        def save_to_path(
            self,
            path: Any = None,
            *,
            state: dict[str, Any] | None = None,
            filesystem: Any = None,
            use_msgpack: bool = False,
        ) -> str:
            out = super().save_to_path(
                path, state=state, filesystem=filesystem, use_msgpack=use_msgpack
            )
            self.save_calls += 1
            self.filesystems["save"].append(filesystem)
            with open(os.path.join(out, HOOK_EXTRA_FILE), "w") as f:
                json.dump({"bias": self.bias, "name": self.name}, f)
            return out

        def restore_from_path(self, path: Any, *args: Any, **kwargs: Any) -> None:
            super().restore_from_path(path, *args, **kwargs)
            self.filesystems["restore"].append(kwargs.get("filesystem"))
            extra_file = os.path.join(os.fspath(path), HOOK_EXTRA_FILE)
            extra = None
            if os.path.isfile(extra_file):
                with open(extra_file) as f:
                    extra = json.load(f)
            self.synced = self.leaf.weights.copy()
            self.restore_calls.append(
                {
                    "component": kwargs.get("component"),
                    "kwargs": {
                        k: v for k, v in kwargs.items() if k not in ("component", "filesystem")
                    },
                    "extra": extra,
                }
            )

        def mutate(self, seed: int) -> None:
            self.bias = seed * 3
            self.leaf.mutate(seed + 100)

    return _publish(Hooked, qualname)


def _make_wrapped(base: type, leaf_cls: type, qualname: str) -> type:
    class Wrapped(base):  # type: ignore[misc,valid-type]
        """Delegates everything to an inner leaf, as RLlib's TorchRLModule does to
        ``unwrapped()`` (its ``save_to_path`` returns None, like TorchRLModule's)."""

        def __init__(self, name: str = "wrapped"):
            self.name = name
            self.inner = leaf_cls(f"{name}.inner", 5.0)

        def unwrapped(self) -> Any:
            return self.inner

        def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return self.unwrapped().get_state(*args, **kwargs)  # type: ignore[no-any-return]

        def set_state(self, *args: Any, **kwargs: Any) -> None:
            self.unwrapped().set_state(*args, **kwargs)

        def save_to_path(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
            self.unwrapped().save_to_path(*args, **kwargs)

        def restore_from_path(self, *args: Any, **kwargs: Any) -> None:
            self.unwrapped().restore_from_path(*args, **kwargs)

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (self.name,), {}

        def mutate(self, seed: int) -> None:
            self.inner.mutate(seed)

    return _publish(Wrapped, qualname)


def _make_hooked_root(
    base: type, hooked_cls: type, wrapped_cls: type, mid_cls: type, qualname: str
) -> type:
    class HookedRoot(base):  # type: ignore[misc,valid-type]
        """A parent whose components override save/restore: ``hooked`` calls super(),
        ``wrapped`` delegates to another object."""

        def __init__(self, seed: int = 0, *, label: str = "hooked-root"):
            self.seed = seed
            self.label = label
            self.hooked = hooked_cls("hooked")
            self.wrapped = wrapped_cls("wrapped")
            self.plain = mid_cls("plain")
            self.counter = 0

        def get_checkpointable_components(self) -> list[tuple[str, Any]]:
            return [("hooked", self.hooked), ("wrapped", self.wrapped), ("plain", self.plain)]

        def get_state(
            self, components: Sel = None, *, not_components: Sel = None, **kwargs: Any
        ) -> dict[str, Any]:
            state: dict[str, Any] = {"counter": self.counter}
            state.update(component_states(self, components, not_components))
            return state

        def set_state(self, state: dict[str, Any]) -> None:
            set_component_states(self, state)
            self.counter = state.get("counter", self.counter)

        def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (self.seed,), {"label": self.label}

        def mutate(self, seed: int) -> None:
            self.counter = seed
            self.hooked.mutate(seed + 1)
            self.wrapped.mutate(seed + 2)
            self.plain.mutate(seed + 3)

    return _publish(HookedRoot, qualname)


# --------------------------------------------------------------------------- namespaces


def make_classes(
    base: type, *, name: str, mid_base: type | None = None, leaf_base: type | None = None
) -> types.SimpleNamespace:
    """Build every test class, published as ``<module>.<name>.<Class>``.

    ``base`` is the base of the root classes; ``mid_base`` that of ``Mid`` and
    ``Hooked``; ``leaf_base`` that of the leaves (defaults: the level above).
    """
    mid_base = mid_base or base
    leaf_base = leaf_base or mid_base
    ns = types.SimpleNamespace(name=name, base=base, mid_base=mid_base, leaf_base=leaf_base)
    ns.Leaf = _make_leaf(leaf_base, f"{name}.Leaf")
    ns.Module = _make_leaf(leaf_base, f"{name}.Module", **MODULE_FILE_NAMES)
    ns.AlgoNamed = _make_leaf(leaf_base, f"{name}.AlgoNamed", **ALGO_FILE_NAMES)
    ns.RenamedClassFile = _make_leaf(leaf_base, f"{name}.RenamedClassFile", **CLASS_FILE_NAMES)
    ns.Mid = _make_mid(mid_base, ns.Leaf, ns.Module, f"{name}.Mid")
    ns.Root = _make_root(base, ns.Mid, f"{name}.Root")
    ns.AlgoRoot = _make_root(base, ns.Mid, f"{name}.AlgoRoot", **ALGO_FILE_NAMES)
    ns.Dynamic = _make_dynamic(base, ns.Mid, ns.Module, f"{name}.Dynamic")
    ns.DynamicAlgoNamed = _make_dynamic(base, ns.Mid, ns.AlgoNamed, f"{name}.DynamicAlgoNamed")
    ns.DynamicRenamedClassFile = _make_dynamic(
        base, ns.Mid, ns.RenamedClassFile, f"{name}.DynamicRenamedClassFile"
    )
    ns.Hooked = _make_hooked(mid_base, ns.Leaf, f"{name}.Hooked")
    ns.Wrapped = _make_wrapped(mid_base, ns.Leaf, f"{name}.Wrapped")
    ns.HookedRoot = _make_hooked_root(base, ns.Hooked, ns.Wrapped, ns.Mid, f"{name}.HookedRoot")
    return ns


def classes_of(ns: types.SimpleNamespace) -> list[type]:
    return [
        value
        for value in vars(ns).values()
        if isinstance(value, type) and value not in (ns.base, ns.mid_base, ns.leaf_base)
    ]


RL = make_classes(RLlibCheckpointable, name="RL")
CK = make_classes(CkptableCheckpointable, name="CK")

#: Mixed trees: root / mid (and Hooked) / leaf levels on different bases.
CK_OVER_RL = make_classes(CkptableCheckpointable, name="CK_OVER_RL", mid_base=RLlibCheckpointable)
RL_OVER_CK = make_classes(RLlibCheckpointable, name="RL_OVER_CK", mid_base=CkptableCheckpointable)
CK_RL_CK = make_classes(
    CkptableCheckpointable,
    name="CK_RL_CK",
    mid_base=RLlibCheckpointable,
    leaf_base=CkptableCheckpointable,
)
RL_CK_RL = make_classes(
    RLlibCheckpointable,
    name="RL_CK_RL",
    mid_base=CkptableCheckpointable,
    leaf_base=RLlibCheckpointable,
)
MIXED = (CK_OVER_RL, RL_OVER_CK, CK_RL_CK, RL_CK_RL)

# The migration scenario: the user's ``Policy``, before and after changing the import.
RLPolicy = _make_root(RLlibCheckpointable, RL.Mid, "Policy")
CKPolicy = _make_root(CkptableCheckpointable, CK.Mid, "Policy")
#: What ``from my_module import Policy`` gives; tests rebind it with monkeypatch.
Policy = RLPolicy


class RetiredThing:
    """A class a user deletes after writing checkpoints that hold an instance of it."""

    def __init__(self, value: int) -> None:
        self.value = value


class Unpicklable:
    """Copies (``copy.deepcopy`` keeps it) but neither pickles nor packs with msgpack."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Unpicklable:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle 'Unpicklable' object")
