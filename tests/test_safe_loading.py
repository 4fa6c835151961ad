"""Safe loading: ``safe=True`` never runs code a checkpoint names, and symlinks or special
files inside a checkpoint are refused without being opened.

Each malicious payload would create a marker file when unpickled; every test checks both
that the payload works without ``safe=True`` (so the test can fail) and that the marker
never appears with it. The manifests are rewritten to match the crafted files
(``reseal``): an attacker can do that too, and safety must not rest on the checksums.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

import ckptable
from ckptable import Checkpointable, UnsafeCheckpointError, add_safe_classes
from helpers import reseal, same_state
from trees import Leaf, Model, Node, blank_three_level_tree, states_of, three_level_tree


class MakesMarker:
    """Unpickling this creates the marker file: ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


class Point:
    """A plain user class that states may hold once it is declared safe."""

    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class Holder(Checkpointable):
    """A component whose state is whatever it is given."""

    def __init__(self, payload: Any = None) -> None:
        self.payload = payload

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return {"payload": self.payload}

    def set_state(self, state: dict) -> None:
        self.payload = state["payload"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return (), {}


@pytest.fixture
def safe_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo add_safe_classes after the test."""
    from ckptable import _safe

    monkeypatch.setattr(_safe, "_USER_ALLOWED", dict(_safe._USER_ALLOWED))


def poison_state(root: Path, level: str, payload: Any) -> None:
    """Replace the level's state with ``{"weights": payload, ...}`` and reseal."""
    state_file = root / level / "state.pkl"
    state = pickle.loads(state_file.read_bytes())
    state["weights"] = payload
    state_file.write_bytes(cloudpickle.dumps(state))
    reseal(root)


def saved_tree(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    return path


# --------------------------------------------------------------------------- what loads


def test_plain_states_load_in_safe_mode(tmp_path: Path) -> None:
    path = saved_tree(tmp_path)
    restored = blank_three_level_tree()
    restored.restore_from_path(path, safe=True)
    assert same_state(states_of(restored), states_of(three_level_tree()))
    model = Model(layers=3, width=5)
    model.save_to_path(tmp_path / "model")
    rebuilt = Model.from_checkpoint(tmp_path / "model", safe=True)
    assert same_state(states_of(rebuilt), states_of(model))


@pytest.mark.parametrize("use_msgpack", [False, True])
def test_numpy_arrays_of_every_plain_kind_load_in_safe_mode(
    tmp_path: Path, use_msgpack: bool
) -> None:
    payload = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i64": np.arange(4, dtype=np.int64)[::2],
        "bool": np.array([True, False]),
        "scalar": np.float64(2.5) if not use_msgpack else 2.5,
        "record": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        "nested": [1, "two", (3.0, None), {"k": b"bytes"}],
    }
    Holder(payload).save_to_path(tmp_path / "h", use_msgpack=use_msgpack)
    restored = Holder()
    restored.restore_from_path(tmp_path / "h", safe=True)
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(restored.payload[key], value)
    assert restored.payload["scalar"] == 2.5


def test_user_classes_load_once_declared_safe(tmp_path: Path, safe_registry: None) -> None:
    Holder({"p": Point(1.0, 2.0)}).save_to_path(tmp_path / "h")
    with pytest.raises(UnsafeCheckpointError, match=r"test_safe_loading\.Point"):
        Holder().restore_from_path(tmp_path / "h", safe=True)
    add_safe_classes(Point)
    restored = Holder()
    restored.restore_from_path(tmp_path / "h", safe=True)
    assert restored.payload == {"p": Point(1.0, 2.0)}


def test_the_classes_being_restored_may_appear_in_states(tmp_path: Path) -> None:
    """A state holding an instance of the restored object's own class loads."""
    inner = Holder("inner")
    Holder(inner).save_to_path(tmp_path / "h")
    restored = Holder()
    restored.restore_from_path(tmp_path / "h", safe=True)
    assert isinstance(restored.payload, Holder) and restored.payload.payload == "inner"


# --------------------------------------------------------------------------- what does not


def test_a_malicious_state_file_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = saved_tree(tmp_path)
    poison_state(path, "encoder/a", MakesMarker(marker))
    before = states_of(target := blank_three_level_tree())
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open.*encoder/a/state\.pkl"):
        target.restore_from_path(path, safe=True)
    assert not marker.exists()
    assert same_state(states_of(target), before)
    # The same file without safe=True runs the payload: the check above can fail.
    with contextlib.suppress(Exception):
        blank_three_level_tree().restore_from_path(path)
    assert marker.exists()


def test_a_malicious_class_file_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    Model().save_to_path(tmp_path / "model")
    class_file = tmp_path / "model" / "class_and_ctor_args.pkl"
    record = pickle.loads(class_file.read_bytes())
    record["ctor_args_and_kwargs"] = ((MakesMarker(marker),), {})
    class_file.write_bytes(cloudpickle.dumps(record))
    reseal(tmp_path / "model")
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):
        Model.from_checkpoint(tmp_path / "model", safe=True)
    assert not marker.exists()
    # A class record naming something that is not the class asked for:
    class_file.write_bytes(cloudpickle.dumps({"class": MakesMarker(marker)}))
    reseal(tmp_path / "model")
    with pytest.raises(UnsafeCheckpointError):
        Model.from_checkpoint(tmp_path / "model", safe=True)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017, PT011
        Model.from_checkpoint(tmp_path / "model")
    assert marker.exists()


def test_a_class_file_naming_an_unrelated_class_is_refused(tmp_path: Path) -> None:
    Model().save_to_path(tmp_path / "model")
    class_file = tmp_path / "model" / "class_and_ctor_args.pkl"
    class_file.write_bytes(
        pickle.dumps({"class": threading.Thread, "ctor_args_and_kwargs": ((), {})})
    )
    reseal(tmp_path / "model")
    with pytest.raises(UnsafeCheckpointError, match=r"threading\.Thread"):
        Model.from_checkpoint(tmp_path / "model", safe=True)


def test_a_malicious_object_array_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = saved_tree(tmp_path)
    poison_state(path, "head", np.array([1, MakesMarker(marker)], dtype=object))
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):
        blank_three_level_tree().restore_from_path(path, safe=True)
    assert not marker.exists()
    with contextlib.suppress(Exception):
        blank_three_level_tree().restore_from_path(path)
    assert marker.exists()


def test_a_malicious_msgpack_object_array_never_reaches_pickle(tmp_path: Path) -> None:
    import msgpack
    import msgpack_numpy

    marker = tmp_path / "marker"
    Holder({"x": 1}).save_to_path(tmp_path / "h", use_msgpack=True)
    payload = np.array([MakesMarker(marker)], dtype=object)
    (tmp_path / "h" / "state.msgpack").write_bytes(
        msgpack.packb({"payload": payload}, default=msgpack_numpy.encode, use_bin_type=True)
    )
    reseal(tmp_path / "h")
    with pytest.raises(UnsafeCheckpointError):
        Holder().restore_from_path(tmp_path / "h", safe=True)
    assert not marker.exists()
    Holder().restore_from_path(tmp_path / "h")  # msgpack-numpy unpickles it
    assert marker.exists()


def test_a_class_pickled_by_value_is_refused(tmp_path: Path) -> None:
    class Local:  # defined in a function: cloudpickle pickles it by value
        pass

    Holder(Local()).save_to_path(tmp_path / "h")
    with pytest.raises(UnsafeCheckpointError):
        Holder().restore_from_path(tmp_path / "h", safe=True)


def test_a_component_restored_by_foreign_code_is_refused_in_safe_mode(tmp_path: Path) -> None:
    """Code other than ckptable's reads its files with plain pickle: safe mode refuses
    it before anything is applied."""

    class Foreign:
        def __init__(self) -> None:
            self.restored = False

        def save_to_path(self, path: str, **kwargs: Any) -> str:
            os.makedirs(path)
            Path(path, "blob").write_bytes(b"x")
            return path

        def restore_from_path(self, path: str, **kwargs: Any) -> None:
            self.restored = True

        def get_state(self, *args: Any, **kwargs: Any) -> dict:
            return {}

        def set_state(self, state: dict) -> None:
            pass

    foreign = Foreign()
    tree = Node({"leaf": Leaf(2), "foreign": foreign}, name="root")  # type: ignore[dict-item]
    tree.save_to_path(tmp_path / "ckpt")
    with pytest.raises(UnsafeCheckpointError, match="foreign"):
        tree.restore_from_path(tmp_path / "ckpt", safe=True)
    assert not foreign.restored
    tree.restore_from_path(tmp_path / "ckpt")
    assert foreign.restored


# --------------------------------------------------------------------------- symlinks and FIFOs


@pytest.mark.parametrize("verify", [True, False])
def test_a_symlinked_state_file_is_refused_unopened(tmp_path: Path, verify: bool) -> None:
    """The link points to a FIFO outside: opening it would block the test forever."""
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    path = saved_tree(tmp_path)
    state = path / "head" / "state.pkl"
    state.unlink()
    state.symlink_to(fifo)
    with pytest.raises(UnsafeCheckpointError, match=r"head/state\.pkl.*symlink"):
        blank_three_level_tree().restore_from_path(path, verify=verify)
    with pytest.raises(UnsafeCheckpointError):
        ckptable.verify_checkpoint(path)


def test_a_fifo_inside_a_checkpoint_is_refused_unopened(tmp_path: Path) -> None:
    path = saved_tree(tmp_path)
    os.mkfifo(path / "encoder" / "pipe")
    with pytest.raises(UnsafeCheckpointError, match="pipe"):
        blank_three_level_tree().restore_from_path(path, verify=False)


def test_a_symlinked_component_directory_pointing_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    three_level_tree().children["head"].save_to_path(outside)
    path = saved_tree(tmp_path)
    import shutil

    shutil.rmtree(path / "head")
    (path / "head").symlink_to(outside, target_is_directory=True)
    for verify in (True, False):
        with pytest.raises(UnsafeCheckpointError, match="head"):
            blank_three_level_tree().restore_from_path(path, verify=verify)


def test_from_checkpoint_refuses_a_symlinked_class_file(tmp_path: Path) -> None:
    Model().save_to_path(tmp_path / "model")
    (tmp_path / "elsewhere.pkl").write_bytes(
        (tmp_path / "model" / "class_and_ctor_args.pkl").read_bytes()
    )
    (tmp_path / "model" / "class_and_ctor_args.pkl").unlink()
    (tmp_path / "model" / "class_and_ctor_args.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    with pytest.raises(UnsafeCheckpointError):
        Model.from_checkpoint(tmp_path / "model")
