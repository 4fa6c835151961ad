"""Errors that say what happened and what to do, and less code for the common case.

Each slip a new user makes (issue 16) raises a ckptable error that names what is on disk
and what to call instead, before anything of the object is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable import (
    Checkpointable,
    CheckpointManager,
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
    MainModuleClassWarning,
    SetStateError,
    StateEncodingError,
    UnknownComponentError,
)
from ckptable._diff import diff_checkpoints
from ckptable.cli import main
from helpers import assert_states_equal, reseal
from trees import Leaf, Model, Node, SubModel, states_of, trained_model

SRC = Path(__file__).resolve().parent.parent / "src"


# --------------------------------------------------------------------------- classes


class Counter(Checkpointable):
    """The simplest class: no constructor arguments, no components."""

    def __init__(self) -> None:
        self.n = 0

    def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"n": self.n}

    def set_state(self, state: dict[str, Any]) -> None:
        self.n = state["n"]


class Sized(Checkpointable):
    """A constructor that needs an argument, and no get_ctor_args_and_kwargs."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"size": self.size}

    def set_state(self, state: dict[str, Any]) -> None:
        self.size = state["size"]


class Trainer(Checkpointable):
    """Own state only; its components save and restore their own (the simple path)."""

    def __init__(self) -> None:
        self.steps = 0
        self.model = Counter()
        self.seen: list[dict[str, Any]] = []

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("model", self.model)]

    def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"steps": self.steps}

    def set_state(self, state: dict[str, Any]) -> None:
        self.seen.append(dict(state))
        self.steps = state["steps"]


class WithRandom(Checkpointable):
    """A state holding numpy's random generator state (128-bit integers), or the generator."""

    def __init__(self, whole_generator: bool = False) -> None:
        self.whole_generator = whole_generator
        self.rng = np.random.default_rng(0)

    def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.whole_generator:
            return {"rng": self.rng}
        return {"step": 3, "rng": self.rng.bit_generator.state}

    def set_state(self, state: dict[str, Any]) -> None:
        pass

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.whole_generator,), {}


class Holder(Checkpointable):
    """A root whose component holds the random generator state."""

    def __init__(self) -> None:
        self.sampler = WithRandom()

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("sampler", self.sampler)]

    def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        pass


# ------------------------------------------ 1. a component's directory, component= forgotten


def test_restoring_a_component_directory_into_the_root_names_both_classes_and_the_fix(
    tmp_path: Path,
) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")
    target = Model()
    before = states_of(target)

    with pytest.raises(IncompatibleCheckpointError) as caught:
        target.restore_from_path(f"{path}/optimizer")

    message = str(caught.value)
    assert "trees.Node" in message  # the stored class
    assert "trees.Model" in message  # the object's class
    assert "component='optimizer'" in message
    assert "from_checkpoint" in message
    assert caught.value.component == "optimizer"
    assert caught.value.path == f"{path}/optimizer"
    assert isinstance(caught.value, ValueError)  # what RLlib-era code catches
    assert_states_equal(states_of(target), before)  # nothing was set


def test_the_suggested_component_call_restores_what_was_meant(tmp_path: Path) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")
    target = Model()
    with pytest.raises(IncompatibleCheckpointError):
        target.restore_from_path(f"{path}/optimizer")

    target.restore_from_path(f"{path}/optimizer", component="optimizer")

    assert target.optimizer.config["lr"] == 0.01


def test_a_nested_component_directory_suggests_the_whole_component_path(tmp_path: Path) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")

    with pytest.raises(IncompatibleCheckpointError) as caught:
        Model().restore_from_path(f"{path}/optimizer/moments")

    assert "component='optimizer/moments'" in str(caught.value)
    assert "trees.Leaf" in str(caught.value)
    assert caught.value.component == "optimizer/moments"


def test_a_component_directory_restores_into_an_object_of_its_own_class(tmp_path: Path) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")
    optimizer = Node({"moments": Leaf(4)}, name="blank")

    optimizer.restore_from_path(f"{path}/optimizer")

    assert optimizer.config["lr"] == 0.01 and optimizer.name == "optimizer"


def test_a_subclass_restores_a_component_directory_saved_from_its_base(tmp_path: Path) -> None:
    class Outer(Node):
        pass

    inner = Model()  # saved as component "inner" of a Node
    path = Node({"inner": inner}, name="outer").save_to_path(tmp_path / "ckpt")
    target = SubModel()  # has no component "inner": no slip to suspect
    target.restore_from_path(f"{path}/inner")
    holder = Outer({"inner": Model()})  # has one, and the stored class is its own base
    holder.restore_from_path(f"{path}/inner", component="inner")


def test_a_component_directory_saved_from_a_subclass_of_the_object_is_refused_on_path_evidence(
    tmp_path: Path,
) -> None:
    """With the path evidence (``ckpt/inner`` and the object has a component ``inner``,
    ``ckpt`` a checkpoint listing it), a stored class other than exactly the object's
    is refused, a subclass of it too: the root is not where that state belongs (was:
    allowed for subclasses, which let README's ``Model(Params)`` with an optimizer of
    class ``Params`` take the optimizer's state). The same directory copied elsewhere
    (no path evidence), or restored with ``component=``, restores as before."""
    inner = SubModel()
    inner.epoch = 5
    path = Node({"inner": inner}, name="outer").save_to_path(tmp_path / "ckpt")
    target = Model()
    target.inner = Model()  # type: ignore[attr-defined]
    target.get_checkpointable_components = lambda: [("inner", target.inner)]  # type: ignore[method-assign]

    with pytest.raises(IncompatibleCheckpointError, match="component='inner'"):
        target.restore_from_path(f"{path}/inner")
    assert target.epoch == 0

    target.restore_from_path(f"{path}/inner", component="inner")
    assert target.inner.epoch == 5  # type: ignore[attr-defined]
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(f"{path}/inner", copy)
    target.restore_from_path(copy)  # a SubModel's state into a Model: no evidence, fine
    assert target.epoch == 5


class Params(Checkpointable):
    """README's base class: its own values, no components."""

    def __init__(self) -> None:
        self.values = [0.0]

    def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"values": self.values}

    def set_state(self, state: dict[str, Any]) -> None:
        self.values = state["values"]


class ParamsModel(Params):
    """README's ``Model(Params)`` with a component ``optimizer`` of class ``Params``."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = Params()

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("optimizer", self.optimizer)]


def test_a_component_directory_of_a_base_class_is_not_restored_into_the_root(
    tmp_path: Path,
) -> None:
    model = ParamsModel()
    model.optimizer.values = [9.0]
    path = model.save_to_path(tmp_path / "model")
    target = ParamsModel()

    with pytest.raises(IncompatibleCheckpointError) as caught:
        target.restore_from_path(f"{path}/optimizer")

    message = str(caught.value)
    assert "component 'optimizer'" in message and "Params" in message
    assert "component='optimizer'" in message
    assert target.values == [0.0]  # nothing was set
    target.restore_from_path(f"{path}/optimizer", component="optimizer")
    assert target.optimizer.values == [9.0]


def test_a_component_directory_without_class_information_restores_as_before(
    tmp_path: Path,
) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")
    level = Path(path) / "optimizer"
    metadata = json.loads((level / "metadata.json").read_text())
    del metadata["ckptable"]["class"]
    (level / "metadata.json").write_text(json.dumps(metadata))
    (level / "class_and_ctor_args.pkl").unlink()
    reseal(level)
    reseal(path)
    target = Model()

    # No recorded class: nothing to compare, so no refusal: restored as RLlib would
    # (Model.set_state takes what it finds; the Node's state holds no "epoch").
    target.restore_from_path(level)

    assert target.epoch == 0


# --------------------------------------------------------------- 2. a manager's directory


@pytest.fixture
def manager_dir(tmp_path: Path) -> Path:
    manager = CheckpointManager(tmp_path / "run")
    for step in (10, 20, 30):
        model = trained_model()
        model.epoch = step
        manager.save(model, step)
    manager.wait()
    return tmp_path / "run"


def test_restoring_a_manager_directory_points_to_restore_latest_and_the_newest(
    manager_dir: Path,
) -> None:
    target = Model()
    with pytest.raises(CheckpointNotFoundError) as caught:
        target.restore_from_path(manager_dir)

    message = str(caught.value)
    assert "CheckpointManager directory, not a checkpoint" in message
    assert "steps 10, 20, 30" in message
    assert f"CheckpointManager({str(manager_dir)!r}).restore_latest(obj)" in message
    assert str(manager_dir / "checkpoint_000030") in message
    assert "corrupt" not in message
    assert isinstance(caught.value, FileNotFoundError)
    assert target.epoch == 0


def test_from_checkpoint_of_a_manager_directory_names_the_newest_checkpoint(
    manager_dir: Path,
) -> None:
    with pytest.raises(CheckpointNotFoundError) as caught:
        Model.from_checkpoint(manager_dir)

    message = str(caught.value)
    assert "CheckpointManager directory" in message
    assert str(manager_dir / "checkpoint_000030") in message
    assert Model.from_checkpoint(manager_dir / "checkpoint_000030").epoch == 30


def test_a_manager_directory_whose_only_checkpoint_is_unfinished_is_not_called_corrupt(
    tmp_path: Path,
) -> None:
    """A ``checkpoint_<step>`` without a manifest is what a save killed midway leaves
    (on object stores; a local one leaves a hidden staging tree): the directory is a
    manager's with no complete checkpoint, nothing is corrupt (was: "no state file")."""
    unfinished = tmp_path / "run" / "checkpoint_000001"
    unfinished.mkdir(parents=True)
    (unfinished / "metadata.json").write_text("{}")
    staging = tmp_path / "run2" / ".checkpoint_000001.ckptable-staging-0123abcd"
    staging.mkdir(parents=True)
    for directory in (tmp_path / "run", tmp_path / "run2"):
        for call in (
            lambda d=directory: Model().restore_from_path(d),
            lambda d=directory: Model.from_checkpoint(d),
        ):
            with pytest.raises(CheckpointNotFoundError) as caught:
                call()
            message = str(caught.value)
            assert "CheckpointManager directory with no complete checkpoint yet" in message
            assert "no state file" not in message and "corrupt" not in message.lower()
            assert not isinstance(caught.value, ckptable.CorruptCheckpointError)
    assert "checkpoint_000001: no manifest" in message or "staging" in message


def test_an_empty_directory_is_said_to_be_empty_not_corrupt(tmp_path: Path) -> None:
    CheckpointManager(tmp_path / "fresh")  # writes nothing before its first save
    for call in (
        lambda: Model().restore_from_path(tmp_path / "fresh"),
        lambda: Model.from_checkpoint(tmp_path / "fresh"),
        lambda: ckptable.verify_checkpoint(tmp_path / "fresh"),
    ):
        with pytest.raises(CheckpointNotFoundError, match="it is an empty directory"):
            call()


def test_the_manager_error_names_the_newest_checkpoint_that_is_not_damaged(
    manager_dir: Path,
) -> None:
    newest = manager_dir / "checkpoint_000030"
    with open(newest / "state.pkl", "ab") as stream:
        stream.write(b"x")  # its size no longer matches the manifest

    with pytest.raises(CheckpointNotFoundError) as caught:
        Model().restore_from_path(manager_dir)

    message = str(caught.value)
    assert f"the newest complete one is {manager_dir / 'checkpoint_000020'}" in message
    assert (
        f"pass one of the checkpoints inside it, e.g. {manager_dir / 'checkpoint_000020'}"
        in message
    )
    assert "checkpoint_000030:" in message and "bytes" in message


@pytest.mark.parametrize("api", ["convert", "verify", "diff", "info"])
def test_the_apis_refuse_a_manager_directory(manager_dir: Path, tmp_path: Path, api: str) -> None:
    calls = {
        "convert": lambda: ckptable.convert_checkpoint(manager_dir, tmp_path / "out"),
        "verify": lambda: ckptable.verify_checkpoint(manager_dir),
        "diff": lambda: diff_checkpoints(manager_dir, manager_dir),
        "info": lambda: ckptable.get_checkpoint_info(manager_dir),
    }
    with pytest.raises(CheckpointNotFoundError) as caught:
        calls[api]()

    message = str(caught.value)
    assert "CheckpointManager directory, not a checkpoint" in message
    assert f"'ckptable ls {manager_dir}'" in message
    assert str(manager_dir / "checkpoint_000030") in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------- 3. a class defined in __main__


SAVER = """
import sys, warnings
from ckptable import Checkpointable

class Model(Checkpointable):
    def __init__(self):
        self.n = 0
    def get_state(self, *args, **kwargs):
        return {"n": self.n}
    def set_state(self, state):
        self.n = state["n"]

model = Model()
model.n = 7
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model.save_to_path(sys.argv[1])
    model.save_to_path(sys.argv[1] + "-again")
for warning in caught:
    print(warning.category.__name__, warning.filename, warning.lineno)
    print(warning.message)
"""

LOADER = """
import sys
from ckptable import Checkpointable, IncompatibleCheckpointError

class Model(Checkpointable):
    def __init__(self):
        self.n = 0
    def get_state(self, *args, **kwargs):
        return {"n": self.n}
    def set_state(self, state):
        self.n = state["n"]

try:
    Model.from_checkpoint(sys.argv[1])
except IncompatibleCheckpointError as exc:
    print(exc)
model = Model()
model.restore_from_path(sys.argv[1])
print("restored", model.n)
print("copy", type(Checkpointable.from_checkpoint(sys.argv[1])).__qualname__)
"""


def _run_script(tmp_path: Path, name: str, code: str, *args: str) -> str:
    script = tmp_path / name
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_class_of_main_warns_once_at_save_and_from_checkpoint_elsewhere_says_why(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "ckpt")
    saved = _run_script(tmp_path, "saver.py", SAVER, path).splitlines()

    # One warning for two saves of the class, pointing at the user's line.
    assert len(saved) == 2, saved
    category, filename, _ = saved[0].split()
    assert category == "MainModuleClassWarning"
    assert filename.endswith("saver.py")
    assert "Model is defined in __main__" in saved[1]
    assert "Define Model in a module and import it" in saved[1]
    assert path in saved[1]

    loaded = _run_script(tmp_path, "loader.py", LOADER, path).splitlines()
    message = loaded[0]
    assert message.startswith("The class __main__.Model stored in the checkpoint at")
    assert "was defined in __main__ of the script that saved it" in message
    assert "this program's Model (also __main__.Model) is another class" in message
    assert "Define Model in a module that both scripts import" in message
    assert "is not a subclass" not in message
    # The ways out the message names work.
    assert loaded[1:] == ["restored 7", "copy Model"]


def test_a_main_module_root_class_warns_once_and_module_classes_and_components_never(
    tmp_path: Path,
) -> None:
    local = type("Local", (Counter,), {"__module__": "__main__"})
    part = type("Part", (Counter,), {"__module__": "__main__"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Counter().save_to_path(tmp_path / "module")
        Node({"part": part()}).save_to_path(tmp_path / "parent")  # a component: built
        local().save_to_path(tmp_path / "a")  # by its parent, never from its class file
        local().save_to_path(tmp_path / "b")

    found = [w for w in caught if issubclass(w.category, MainModuleClassWarning)]
    assert len(found) == 1
    assert found[0].filename == __file__  # the user's save_to_path line
    assert isinstance(found[0].message, MainModuleClassWarning)
    assert found[0].message.class_name == "__main__.Local"
    assert issubclass(MainModuleClassWarning, UserWarning)


def test_from_checkpoint_in_the_saving_process_gives_the_usual_class_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = type("Local2", (Counter,), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "Local2", local, raising=False)
    with pytest.warns(MainModuleClassWarning):
        path = local().save_to_path(tmp_path / "ckpt")
    with pytest.raises(IncompatibleCheckpointError, match="is not a subclass of") as caught:
        Sized.from_checkpoint(path)  # unrelated class: the usual message
    assert "defined in __main__" not in str(caught.value)
    assert type(local.from_checkpoint(path)) is local  # the class itself, not a copy


# ------------------------------------------------------------ 4. msgpack and big integers


def test_saving_numpy_random_state_as_msgpack_names_the_key_and_what_to_do(
    tmp_path: Path,
) -> None:
    with pytest.raises(StateEncodingError) as caught:
        Holder().save_to_path(tmp_path / "ckpt", format="msgpack")

    message = str(caught.value)
    assert "component 'sampler'" in message
    assert "state['rng']['state']['state']" in message
    assert "msgpack holds integers of at most 64 bits" in message
    assert "default format (cloudpickle)" in message
    assert "as a string" in message
    assert "rng.bit_generator.state" in message
    assert caught.value.component == "sampler"
    assert not (tmp_path / "ckpt").exists()


def test_converting_numpy_random_state_to_msgpack_names_the_source_level_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = Holder().save_to_path(tmp_path / "src")

    code = main(["convert", src, str(tmp_path / "dst"), "--format", "msgpack"])

    err = capsys.readouterr().err
    assert code != 0
    assert f"component 'sampler' of the checkpoint ({src}/sampler/state.pkl)" in err
    assert "state['rng']['state']['state'] cannot be encoded: it is an int of" in err
    assert "msgpack holds integers of at most 64 bits" in err
    assert "Keep the checkpoint in cloudpickle" in err
    assert "as a string" in err
    assert not (tmp_path / "dst").exists()
    with pytest.raises(StateEncodingError) as caught:
        ckptable.convert_checkpoint(src, tmp_path / "dst")
    assert caught.value.path == f"{src}/sampler/state.pkl"
    assert caught.value.component == "sampler"


def test_converting_a_numpy_generator_to_msgpack_says_what_msgpack_holds(
    tmp_path: Path,
) -> None:
    src = WithRandom(whole_generator=True).save_to_path(tmp_path / "src")

    with pytest.raises(StateEncodingError) as caught:
        ckptable.convert_checkpoint(src, tmp_path / "dst")

    message = str(caught.value)
    assert f"the root level of the checkpoint ({src}/state.pkl)" in message
    assert "state['rng'] cannot be encoded: it is a numpy.random._generator.Generator" in message
    assert "msgpack holds only dicts, lists, strings, bytes, numbers" in message
    assert "return rng.bit_generator.state instead of the generator" in message


# ------------------------------------------------------------ 5. a set_state that raises


class Picky(Leaf):
    def set_state(self, state: dict) -> None:
        raise KeyError("learning_rate")


def test_a_failing_set_state_names_the_component_stored_class_version_and_cause(
    tmp_path: Path,
) -> None:
    path = Node({"head": Leaf(2)}, name="root").save_to_path(tmp_path / "ckpt")
    target = Node({"head": Picky(2)}, name="root")

    with pytest.raises(SetStateError) as caught:
        target.restore_from_path(path)

    message = str(caught.value)
    assert "Picky.set_state failed restoring component 'head'" in message
    assert "saved from trees.Leaf, state version 1" in message
    assert f"{path}/head" in message
    assert "KeyError: 'learning_rate'" in message
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.component == "head"


def test_a_failing_set_state_of_a_level_saved_from_another_class_says_so(tmp_path: Path) -> None:
    path = Leaf(3).save_to_path(tmp_path / "leaf")

    with pytest.raises(SetStateError) as caught:
        Counter().restore_from_path(path)

    message = str(caught.value)
    assert "the root level" in message
    assert "The level was saved from trees.Leaf, not from test_error_guidance.Counter" in message


# ------------------------------------------------------------ 6. a mistyped component name


def test_a_mistyped_component_name_suggests_the_close_one(tmp_path: Path) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")

    with pytest.raises(UnknownComponentError) as caught:
        Model().restore_from_path(f"{path}/optimizer", component="optimiser")

    assert str(caught.value).endswith(
        "(it has: layer0, layer1, optimizer). Did you mean 'optimizer'?"
    )


def test_a_mistyped_nested_component_name_suggests_the_close_one(tmp_path: Path) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")

    with pytest.raises(UnknownComponentError, match=r"Did you mean 'moments'\?"):
        Model().restore_from_path(f"{path}/optimizer/moments", component="optimizer/moment")


def test_a_name_close_to_nothing_gets_no_suggestion(tmp_path: Path) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")

    with pytest.raises(UnknownComponentError) as caught:
        Model().restore_from_path(path, component="zzz")

    assert "Did you mean" not in str(caught.value)


# --------------------------------------------------------- 7. less code for the common case


def test_a_class_without_constructor_arguments_needs_only_get_state_and_set_state(
    tmp_path: Path,
) -> None:
    counter = Counter()
    counter.n = 5
    path = counter.save_to_path(tmp_path / "ckpt")

    assert Counter().get_ctor_args_and_kwargs() == ((), {})
    assert Counter.from_checkpoint(path).n == 5


def test_own_state_only_saves_components_and_set_state_receives_only_its_own_keys(
    tmp_path: Path,
) -> None:
    trainer = Trainer()
    trainer.steps, trainer.model.n = 4, 9
    path = trainer.save_to_path(tmp_path / "ckpt")

    restored = Trainer.from_checkpoint(path)

    assert (restored.steps, restored.model.n) == (4, 9)
    assert restored.seen == [{"steps": 4}]


def test_a_constructor_that_needs_arguments_says_how_to_give_them(tmp_path: Path) -> None:
    path = Sized(3).save_to_path(tmp_path / "ckpt")

    with pytest.raises(IncompatibleCheckpointError) as caught:
        Sized.from_checkpoint(path)

    message = str(caught.value)
    assert "Sized does not define get_ctor_args_and_kwargs()" in message
    assert "its constructor needs size" in message
    assert "Sized.from_checkpoint(path, size=...)" in message
    assert Sized.from_checkpoint(path, size=1).size == 3  # the state is restored


def test_get_ctor_args_and_kwargs_stays_overridable_and_is_no_longer_abstract() -> None:
    assert "get_ctor_args_and_kwargs" not in Checkpointable.__abstractmethods__
    assert {"get_state", "set_state"} <= Checkpointable.__abstractmethods__
    assert Leaf(3, scale=2.0).get_ctor_args_and_kwargs() == ((3,), {"scale": 2.0})


# ------------------------------------------- from_checkpoint of a component directory


def test_from_checkpoint_of_a_component_directory_names_the_component_and_both_calls(
    tmp_path: Path,
) -> None:
    path = trained_model().save_to_path(tmp_path / "ckpt")

    with pytest.raises(IncompatibleCheckpointError) as caught:
        Model.from_checkpoint(f"{path}/optimizer")

    message = str(caught.value)
    assert "is not a subclass of trees.Model" in message
    assert f"component 'optimizer' of the checkpoint at {path}" in message
    assert f"Node.from_checkpoint('{path}/optimizer')" in message
    assert f"Model.from_checkpoint('{path}')" in message
    assert type(Node.from_checkpoint(f"{path}/optimizer")) is Node


# ------------------------------------------------ a typo in components= / not_components=


class Selecting(Checkpointable):
    """Selects its component's state as RLlib's classes do, with _check_component."""

    def __init__(self) -> None:
        self.optimizer = Counter()

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("optimizer", self.optimizer)]

    def get_state(
        self, components: Any = None, *, not_components: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        state: dict[str, Any] = {"own": 1}
        if self._check_component("optimizer", components, not_components):
            state["optimizer"] = self.optimizer.get_state()
        if self._check_component("metrics", components, not_components):
            state["metrics"] = 2  # a state key selected by name, not a component
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        pass


def test_a_typo_in_components_warns_with_did_you_mean_and_selects_as_rllib() -> None:
    class Typo(Selecting):  # a class of its own: warned once per class and name
        pass

    with pytest.warns(ckptable.UnknownComponentWarning) as caught:
        state = Typo().get_state(components="optimzer")
    assert state == {"own": 1}  # RLlib's rule: the unknown name selects nothing
    assert "Did you mean 'optimizer'?" in str(caught[0].message)
    assert caught[0].message.component == "optimzer"  # type: ignore[union-attr]
    assert caught[0].filename == __file__

    with pytest.warns(ckptable.UnknownComponentWarning, match="'optimizr'"):
        Typo().get_state(not_components=["optimizr"])


def test_known_names_and_state_keys_do_not_warn() -> None:
    class Quiet(Selecting):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "optimizer" in Quiet().get_state(components=["optimizer/sub"])
        assert "metrics" in Quiet().get_state(components=["metrics"])
        assert "optimizer" not in Quiet().get_state(not_components="optimizer")
