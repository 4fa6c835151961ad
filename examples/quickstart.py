"""ckptable quickstart: save a nested object tree, inspect it, restore it, all or in part.

Run it with:  python examples/quickstart.py
It needs only ``pip install -e '.[msgpack]'`` (msgpack-numpy brings numpy along).

The tree:

    Model                 state: step, lr
    ├── encoder: Block    state: updates
    │   ├── layer0: Layer state: weights, bias (numpy arrays)
    │   └── layer1: Layer
    └── decoder: Block
        ├── layer0: Layer
        └── layer1: Layer
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from typing import Any

import numpy as np

from ckptable import (
    Checkpointable,
    CorruptCheckpointError,
    UnknownComponentError,
    convert_checkpoint,
    get_checkpoint_info,
    verify_checkpoint,
)


class Layer(Checkpointable):
    """A leaf component: a weight matrix and a bias vector."""

    def __init__(self, n_in: int, n_out: int, seed: int = 0) -> None:
        self.n_in, self.n_out, self.seed = n_in, n_out, seed
        rng = np.random.default_rng(seed)
        self.weights = rng.normal(size=(n_in, n_out)).astype(np.float32)
        self.bias = np.zeros(n_out, dtype=np.float32)

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        return {"weights": self.weights.copy(), "bias": self.bias.copy()}

    def set_state(self, state: dict[str, Any]) -> None:
        # np.array() copies: arrays read back from msgpack are read-only.
        self.weights = np.array(state["weights"])
        self.bias = np.array(state["bias"])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (self.n_in, self.n_out), {"seed": self.seed}


class Block(Checkpointable):
    """A middle component: a stack of Layers, built from its constructor arguments."""

    def __init__(self, dims: list[int], seed: int = 0) -> None:
        self.dims, self.seed = list(dims), seed
        self.layers = {
            f"layer{i}": Layer(n_in, n_out, seed=seed + i)
            for i, (n_in, n_out) in enumerate(itertools.pairwise(dims))
        }
        self.updates = 0

    def get_checkpointable_components(self) -> list[tuple[str, Checkpointable]]:
        return list(self.layers.items())

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state: dict[str, Any] = {"updates": self.updates}
        for name, layer in self.layers.items():
            if self._check_component(name, components, not_components):
                state[name] = layer.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.updates = state.get("updates", self.updates)
        for name, layer in self.layers.items():
            if name in state:
                layer.set_state(state[name])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (self.dims,), {"seed": self.seed}

    def train_step(self, rng: np.random.Generator) -> None:
        for layer in self.layers.values():
            layer.weights += rng.normal(scale=0.1, size=layer.weights.shape).astype(np.float32)
            layer.bias += 0.01
        self.updates += 1


class Model(Checkpointable):
    """The root: an encoder and a decoder Block, plus a step counter and a learning rate."""

    def __init__(self, obs_dim: int = 4, hidden: int = 8, act_dim: int = 2, seed: int = 0) -> None:
        self.obs_dim, self.hidden, self.act_dim, self.seed = obs_dim, hidden, act_dim, seed
        self.encoder = Block([obs_dim, hidden, hidden], seed=seed)
        self.decoder = Block([hidden, hidden, act_dim], seed=seed + 100)
        self.step = 0
        self.lr = 1e-3

    def get_checkpointable_components(self) -> list[tuple[str, Checkpointable]]:
        return [("encoder", self.encoder), ("decoder", self.decoder)]

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "lr": self.lr}
        for name, comp in self.get_checkpointable_components():
            if self._check_component(name, components, not_components):
                state[name] = comp.get_state(
                    components=self._get_subcomponents(name, components),
                    not_components=self._get_subcomponents(name, not_components),
                )
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = state.get("step", self.step)
        self.lr = state.get("lr", self.lr)
        for name, comp in self.get_checkpointable_components():
            if name in state:
                comp.set_state(state[name])

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {
            "obs_dim": self.obs_dim,
            "hidden": self.hidden,
            "act_dim": self.act_dim,
            "seed": self.seed,
        }

    def train(self, steps: int) -> None:
        rng = np.random.default_rng(1234)
        for _ in range(steps):
            self.encoder.train_step(rng)
            self.decoder.train_step(rng)
            self.step += 1
        self.lr *= 0.5


# --------------------------------------------------------------------------- helpers


def states_equal(a: Any, b: Any) -> bool:
    """Deep equality of two states; numpy arrays compare by dtype, shape and values."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def print_tree(
    info: dict[str, Any], name: str | None = None, prefix: str = "", last: bool = True
) -> None:
    """Print the component tree of a get_checkpoint_info() result, one line per level."""
    top = name is None
    cls = (info["class"] or "?").rsplit(".", 1)[-1]
    line = f"{name or os.path.basename(info['checkpoint_dir'])}: {cls}"
    line += f"  ({os.path.basename(info['state_file'])})"
    print(line if top else f"{prefix}{'└── ' if last else '├── '}{line}")
    children = list(info["components"].items())
    for i, (child_name, child) in enumerate(children):
        child_prefix = "" if top else prefix + ("    " if last else "│   ")
        print_tree(child, child_name, child_prefix, i == len(children) - 1)


def check(label: str, ok: bool) -> None:
    print(f"{label}: {'OK' if ok else 'MISMATCH'}")
    if not ok:
        sys.exit(1)


# --------------------------------------------------------------------------- the tour


def main() -> None:
    model = Model(seed=0)
    model.train(steps=3)
    saved_state = model.get_state()

    with tempfile.TemporaryDirectory() as tmp:
        # 1. Save the whole tree: one directory per component.
        path = model.save_to_path(os.path.join(tmp, "ckpt"))
        print(f"saved to {path}")

        # 2. Inspect it without loading (nothing is unpickled).
        info = get_checkpoint_info(path)
        print(f"format={info['format']} checkpoint_version={info['checkpoint_version']}")
        print_tree(info)

        # 3. Rebuild a new Model from the checkpoint alone, then compare states.
        restored = Model.from_checkpoint(path)
        check(
            "from_checkpoint restores the whole tree",
            states_equal(restored.get_state(), saved_state),
        )

        # 4. Partial restore: only the decoder; the rest of `fresh` keeps its values.
        #    As in RLlib, the path is the component's own directory.
        fresh = Model(seed=7)
        fresh_encoder = fresh.encoder.get_state()
        fresh.restore_from_path(os.path.join(path, "decoder"), component="decoder")
        check(
            "partial restore of 'decoder'",
            states_equal(fresh.decoder.get_state(), saved_state["decoder"])
            and states_equal(fresh.encoder.get_state(), fresh_encoder)
            and fresh.step == 0,
        )
        try:
            fresh.restore_from_path(os.path.join(path, "decoder"), component="decodr")
        except UnknownComponentError as exc:
            print(f"a typo in component= raises {type(exc).__name__}: {exc}")
        else:
            check("a typo in component= raises UnknownComponentError", False)

        # 5. The same tree as msgpack (state.msgpack files instead of state.pkl).
        mp_path = model.save_to_path(os.path.join(tmp, "ckpt-msgpack"), use_msgpack=True)
        print(
            f"msgpack checkpoint: {sorted(os.listdir(mp_path))}, "
            f"format={get_checkpoint_info(mp_path)['format']}"
        )
        from_msgpack = Model.from_checkpoint(mp_path)
        check("msgpack round trip", states_equal(from_msgpack.get_state(), saved_state))

        # 5b. Convert a whole checkpoint between formats, and map big arrays (mmap=True):
        #     arrays come back read-only, mapped from the files instead of read.
        converted = convert_checkpoint(path, os.path.join(tmp, "ckpt-converted"))
        print(f"converted to {get_checkpoint_info(converted)['format']}: {converted}")
        check(
            "convert_checkpoint round trip",
            states_equal(Model.from_checkpoint(converted).get_state(), saved_state),
        )
        mapped = Model.from_checkpoint(path, mmap=True)
        check("restore with mmap=True", states_equal(mapped.get_state(), saved_state))

        # 6. Integrity: every file is checksummed; a flipped bit is found before loading.
        report = verify_checkpoint(path)
        print(f"verified {report.levels} levels, {report.files} files, {report.bytes} bytes")
        safe = Model(seed=7)
        safe.restore_from_path(path, safe=True)  # restricted unpickler: plain data only
        check("restore with safe=True", states_equal(safe.get_state(), saved_state))
        state_file = os.path.join(path, "decoder", "state.pkl")
        with open(state_file, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0x01]))
        try:
            Model(seed=7).restore_from_path(path)
        except CorruptCheckpointError as exc:
            print(f"a flipped bit raises {type(exc).__name__}: {exc}")
        else:
            check("a flipped bit raises CorruptCheckpointError", False)

    print("OK")


if __name__ == "__main__":
    main()
