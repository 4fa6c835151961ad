"""The ``ckptable`` command: info, verify, convert, diff, demo, and its errors.

Most tests call ``ckptable.cli.main`` in this process (fast, output through capsys); the
``Subprocess`` ones run the real command (``python -m ckptable.cli`` and the installed
console script) in a child process, as a user's shell does.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptable
from ckptable import Checkpointable, CheckpointManager
from ckptable._compare import state_differences
from ckptable._manifest import MANIFEST_FILE
from ckptable.cli import human_bytes, main
from ckptable.manager import RECORD_FILE
from helpers import reseal
from s3_server import S3Server
from trees import Leaf, Model, Node, three_level_tree, trained_model

#: The installed console script, next to the interpreter running the tests.
SCRIPT = Path(sys.executable).with_name("ckptable")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    """``python -m ckptable.cli ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "ckptable.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``main(ARGS)`` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckptable: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def disk_sizes(root: Path) -> tuple[int, int]:
    """Bytes and files under ``root``, from the filesystem, counted as ``info`` and
    ``verify`` count them: every file but the manifests."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE]
    return sum(p.stat().st_size for p in files), len(files)


def manifest_sizes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob(MANIFEST_FILE))


def own_size(directory: Path) -> int:
    return sum(
        p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE
    )


class Token:
    """A user class inside a state: safe mode must refuse to unpickle it."""

    def __init__(self, value: int) -> None:
        self.value = value


class Holder(Checkpointable):
    def __init__(self, value: int = 0) -> None:
        self.token = Token(value)

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {"token": self.token}

    def set_state(self, state: Any) -> None:
        self.token = state["token"]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (self.token.value,), {}


# --------------------------------------------------------------------------- basics


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--version")
    assert code == 0
    assert out.strip() == f"ckptable {ckptable.__version__}"

    code, out, _ = cli(capsys, "-h")
    assert code == 0
    for command in ("info", "ls", "verify", "convert", "diff", "demo"):
        assert command in out

    code, out, _ = cli(capsys, "diff", "-h")
    assert code == 0
    assert "--unsafe" in out and "--rtol" in out and "--limit" in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys)
    assert code == 2
    assert "usage: ckptable" in err


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 << 20) == "5.0 MiB"
    assert human_bytes(3 << 30) == "3.00 GiB"


# --------------------------------------------------------------------------- info


def test_info_shows_the_nested_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)

    code, out, err = cli(capsys, "info", str(path))

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(path)
    assert "Checkpointable checkpoint, checkpoint_version 2.1" in lines[1]
    assert f"written by ckptable {ckptable.__version__}" in lines[1]
    total, files = disk_sizes(path)
    assert f"5 levels, {files} files, {human_bytes(total)}" in lines[2]
    assert "every level has a manifest" in lines[2]
    assert lines[4].split()[:2] == ["COMPONENT", "CLASS"]
    class_column = lines[4].index("CLASS")
    tree = [line[2:class_column].rstrip() for line in lines[5:]]
    assert tree == ["(root)", "├── encoder", "│   ├── a", "│   └── b", "└── head"]
    head = lines[-1]
    assert "trees.Leaf" in head and "cloudpickle" in head and "v1" in head and "manifest" in head
    assert human_bytes(own_size(path / "head")) in head
    root_row = lines[5]
    assert human_bytes(own_size(path)) in root_row and human_bytes(total) in root_row


def test_info_json_describes_every_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path)

    code, out, err = cli(capsys, "info", str(path), "--json")

    assert code == 0, err
    doc = json.loads(out)
    total, files = disk_sizes(path)
    assert (doc["bytes"], doc["files"], doc["levels"]) == (total, files, 5)
    assert doc["path"] == str(path)
    assert doc["type"] == "Checkpointable"
    assert doc["class"] == "trees.Model"
    assert doc["checkpoint_version"] == "2.1"
    assert doc["integrity"] == {
        "levels_with_manifest": 5,
        "levels_without_manifest": 0,
        "algorithms": ["xxh3_64"],
        "manifest_bytes": manifest_sizes(path),
    }
    root = doc["tree"]
    assert list(root["components"]) == ["layer0", "layer1", "optimizer"]
    moments = root["components"]["optimizer"]["components"]["moments"]
    assert moments["component"] == "optimizer/moments"
    assert moments["name"] == "moments"
    assert moments["path"] == str(path / "optimizer" / "moments")
    assert moments["class"] == "trees.Leaf"
    assert moments["format"] == "cloudpickle"
    assert moments["state_file"] == "state.pkl"
    assert moments["writer"] == "ckptable"
    assert moments["integrity"] == {"manifest": True, "algorithm": "xxh3_64"}
    assert moments["own_bytes"] == own_size(path / "optimizer" / "moments")
    assert moments["total_bytes"] == moments["own_bytes"]
    assert moments["own_files"] == 3  # metadata, class file, state (the manifest apart)
    optimizer = root["components"]["optimizer"]
    assert optimizer["total_bytes"] == disk_sizes(path / "optimizer")[0]
    assert optimizer["own_bytes"] == own_size(path / "optimizer")
    assert root["own_bytes"] == own_size(path)
    assert root["total_bytes"] == total
    versions = moments["versions"]
    assert versions["checkpoint_version"] == "2.1"
    assert versions["layout_version"] == 2
    assert versions["state_version"] == 1
    assert versions["ckptable_version"] == ckptable.__version__
    assert versions["python_version"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert versions["ray_version"] is None
    assert root["actor"] is False
    assert moments["actor"] in (False, None)  # None: a checkpoint that does not record it
    assert root["metadata"]["ckptable"]["components"] == ["layer0", "layer1", "optimizer"]


def test_info_marks_the_components_ray_actors_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The parent's record lists its actor components under "actor_components"."""
    path = tmp_path / "ckpt"
    three_level_tree().save_to_path(path)
    metadata = json.loads((path / "metadata.json").read_text())
    metadata["ckptable"]["actor_components"] = ["encoder"]
    (path / "metadata.json").write_text(json.dumps(metadata))
    reseal(path)

    code, out, _ = cli(capsys, "info", str(path), "--json")
    assert code == 0
    components = json.loads(out)["tree"]["components"]
    assert (components["encoder"]["actor"], components["head"]["actor"]) == (True, False)
    assert components["encoder"]["components"]["a"]["actor"] in (False, None)

    code, out, _ = cli(capsys, "info", str(path))
    assert "├── encoder [actor]" in out
    assert "head [actor]" not in out


def test_info_of_a_msgpack_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path, use_msgpack=True)

    code, out, _ = cli(capsys, "info", str(path), "--json")
    assert code == 0
    doc = json.loads(out)
    layer = doc["tree"]["components"]["layer0"]
    assert (doc["format"], layer["format"], layer["state_file"]) == (
        "msgpack",
        "msgpack",
        "state.msgpack",
    )

    code, out, _ = cli(capsys, "info", str(path))
    assert code == 0
    assert all("msgpack" in line for line in out.splitlines()[5:])


@pytest.mark.rllib
def test_info_of_checkpoints_rllib_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rllib_small import RLlibNode
    from rllib_trees import RL

    RLlibNode().save_to_path(str(tmp_path / "node"))
    RL.AlgoRoot(seed=1).save_to_path(str(tmp_path / "algo"))

    code, out, err = cli(capsys, "info", str(tmp_path / "node"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["class"] == "rllib_small.RLlibNode"
    assert set(doc["tree"]["components"]) == {"left", "right"}
    left = doc["tree"]["components"]["left"]
    assert left["class"] == "rllib_small.RLlibLeaf"
    assert left["writer"] == "rllib"
    assert left["integrity"] == {"manifest": False, "algorithm": None}
    assert left["versions"]["ray_version"] == __import__("ray").__version__
    assert left["versions"]["state_version"] is None
    assert left["actor"] is None  # RLlib records no such thing
    assert doc["integrity"]["levels_without_manifest"] == 3
    assert doc["bytes"] == disk_sizes(tmp_path / "node")[0]

    code, out, err = cli(capsys, "info", str(tmp_path / "algo"))
    assert code == 0, err
    lines = out.splitlines()
    assert "Algorithm checkpoint" in lines[1] and "written by RLlib (Ray " in lines[1]
    assert "no ckptable manifests" in lines[2]
    assert "rllib_trees.RL.AlgoRoot" in lines[5]
    assert lines[5].rstrip().endswith("none")
    assert sum("rllib_trees.RL.Leaf" in line for line in lines) == 4


def test_info_of_an_old_algorithm_layout_lists_policy_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "algo"
    for policy in ("default_policy", "other"):
        (path / "policies" / policy).mkdir(parents=True)
        (path / "policies" / policy / "policy_state.pkl").write_bytes(b"p")
    (path / "algorithm_state.pkl").write_bytes(b"state")
    (path / "rllib_checkpoint.json").write_text(
        json.dumps({"type": "Algorithm", "checkpoint_version": "1.1", "format": "cloudpickle"})
    )

    code, out, _ = cli(capsys, "info", str(path), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["type"] == "Algorithm"
    assert doc["checkpoint_version"] == "1.1"
    assert doc["policy_ids"] == ["default_policy", "other"]
    assert doc["bytes"] == disk_sizes(path)[0]  # the policies count into the total

    code, out, _ = cli(capsys, "info", str(path))
    assert "policy_ids: default_policy, other" in out


def test_info_of_a_memory_uri(capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"memory://cli-test/{time.monotonic_ns()}/ckpt"
    three_level_tree().save_to_path(uri)

    code, out, err = cli(capsys, "info", uri, "--json")

    assert code == 0, err
    doc = json.loads(out)
    assert doc["path"].startswith("memory://")
    assert doc["levels"] == 5
    assert doc["integrity"]["levels_with_manifest"] == 5
    assert doc["tree"]["components"]["encoder"]["components"]["a"]["class"] == "trees.Leaf"
    assert doc["bytes"] > 0
    code, out, _ = cli(capsys, "verify", uri)
    assert code == 0 and out.startswith("ok: memory://")


def test_info_verify_and_diff_of_an_s3_uri(
    s3_server: S3Server, s3_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = s3_server.uri(f"{s3_prefix}/ckpt")
    model = trained_model()
    model.save_to_path(uri)
    model.save_to_path(tmp_path / "local")

    code, out, err = cli(capsys, "info", uri, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["path"].startswith("s3://")
    assert doc["levels"] == 5
    assert doc["bytes"] == disk_sizes(tmp_path / "local")[0]  # the same files

    code, out, err = cli(capsys, "verify", uri)
    assert code == 0, err
    code, out, err = cli(capsys, "diff", uri, str(tmp_path / "local"))
    assert code == 0, out + err
    assert "equal" in out


# --------------------------------------------------------------------------- manager directories


def managed_run(directory: Path) -> CheckpointManager:
    """A manager's directory: steps 1-4 kept (3 the best by loss), one incomplete
    checkpoint (step 9, no manifest), one damaged (step 8, a file added) and a staging
    tree a killed save left."""
    manager = CheckpointManager(directory, keep_last=2, keep_best=1, metric="loss", mode="min")
    for step, loss in [(1, 0.9), (2, 0.8), (3, 0.1), (4, 0.5)]:
        manager.save(trained_model(), step, {"loss": loss, "reward": step * 10})
    assert manager.steps() == [3, 4]
    incomplete = directory / "checkpoint_000009"
    shutil.copytree(manager.path(4), incomplete)
    (incomplete / MANIFEST_FILE).unlink()
    damaged = directory / "checkpoint_000008"
    shutil.copytree(manager.path(4), damaged)
    (damaged / "notes.txt").write_text("added")
    (directory / ".checkpoint_000010.ckptable-staging-0123abcd").mkdir()
    return manager


def record_time(path: str) -> str:
    saved = json.loads((Path(path) / RECORD_FILE).read_text())["saved_at"]
    return datetime.datetime.fromtimestamp(saved, tz=datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S"
    )


def tree_listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_ls_lists_steps_save_times_metrics_latest_and_best_and_marks_the_rest(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "run"
    manager = managed_run(directory)
    before = tree_listing(directory)

    result = run("ls", str(directory))

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == str(directory)
    assert lines[1] == (
        "  CheckpointManager directory: 2 checkpoints (steps 3 to 4); 2 not listed (see below)"
    )
    assert lines[2] == f"  latest: step 4  {manager.path(4)}"
    assert lines[3] == f"  best:   step 3 by loss (min)  {manager.path(3)}"
    rows = {line.split()[0]: line for line in lines[5:11] if line.strip()}
    assert rows["STEP"].split() == ["STEP", "SAVED", "(UTC)", "STATUS", "METRICS"]
    assert rows["3"].split()[1:] == [*record_time(manager.path(3)).split(), "ok,", "best",
                                     "loss=0.1", "reward=30"]  # fmt: skip
    assert rows["4"].split()[3:] == ["ok,", "latest", "loss=0.5", "reward=40"]
    assert rows["8"].split()[1:] == ["-", "corrupt", "-"]
    assert rows["9"].split()[1:] == ["-", "incomplete", "-"]
    text = result.stdout
    assert "not listed (never deleted nor counted by retention):" in text
    assert f"step 9: incomplete: {directory / 'checkpoint_000009'} has no manifest" in text
    assert f"step 8: corrupt: {directory / 'checkpoint_000008' / 'notes.txt'}" in text
    assert (
        ".checkpoint_000010.ckptable-staging-0123abcd: a save in progress, or interrupted" in text
    )
    assert tree_listing(directory) == before  # nothing repaired, moved or deleted


def test_info_of_a_manager_directory_is_its_listing(tmp_path: Path) -> None:
    managed_run(tmp_path / "run")
    info = run("info", str(tmp_path / "run"))
    ls = run("ls", str(tmp_path / "run"))
    assert info.returncode == ls.returncode == 0, info.stderr + ls.stderr
    assert info.stdout == ls.stdout


def test_ls_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "run"
    manager = managed_run(directory)

    code, out, err = cli(capsys, "ls", str(directory), "--json")

    assert code == 0, err
    doc = json.loads(out)
    assert doc["type"] == "CheckpointManager" and doc["path"] == str(directory)
    assert doc["steps"] == manager.steps() == [3, 4]
    assert doc["latest"] == {"step": 4, "path": manager.latest()}
    assert doc["best"] == {"step": 3, "path": manager.best(), "metric": "loss", "mode": "min"}
    by_step = {c["step"]: c for c in doc["checkpoints"]}
    assert sorted(by_step) == [3, 4, 8, 9]
    assert by_step[3]["status"] == "ok" and by_step[3]["metrics"] == {"loss": 0.1, "reward": 30}
    assert (
        by_step[3]["saved_at"]
        == json.loads((Path(manager.path(3)) / RECORD_FILE).read_text())["saved_at"]
    )
    assert by_step[3]["saved_at_utc"] == record_time(manager.path(3))
    assert (by_step[8]["status"], by_step[9]["status"]) == ("corrupt", "incomplete")
    assert "has no manifest" in by_step[9]["reason"]
    assert doc["leftovers"] == [
        {
            "name": ".checkpoint_000010.ckptable-staging-0123abcd",
            "what": "a save in progress, or interrupted",
        }
    ]


def test_ls_ranks_by_another_metric_when_told_its_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "run"
    manager = managed_run(directory)

    code, out, err = cli(capsys, "ls", str(directory), "--metric", "reward", "--mode", "max")
    assert code == 0, err
    assert f"best:   step 4 by reward (max)  {manager.path(4)}" in out

    code, out, err = cli(capsys, "ls", str(directory), "--metric", "reward")
    assert code == 2
    assert_one_error_line(err, "--metric reward needs --mode")
    code, out, err = cli(capsys, "info", str(directory), "--mode", "max")
    assert code == 2
    assert_one_error_line(err, "--mode needs --metric")


def test_ls_without_a_recorded_metric_shows_no_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manager = CheckpointManager(tmp_path / "run")
    manager.save(trained_model(), 5)

    code, out, err = cli(capsys, "ls", str(tmp_path / "run"))

    assert code == 0, err
    assert "  CheckpointManager directory: 1 checkpoint" in out
    assert "best:   - (no metric recorded; pass --metric and --mode)" in out
    assert json.loads(main_json(capsys, "ls", str(tmp_path / "run")))["best"] is None


def main_json(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return out


def test_ls_of_a_checkpoint_or_of_nothing_says_so(tmp_path: Path) -> None:
    trained_model().save_to_path(tmp_path / "ckpt")

    checkpoint = run("ls", str(tmp_path / "ckpt"))
    nothing = run("ls", str(tmp_path / "nothing"))

    assert checkpoint.returncode == 2
    assert_one_error_line(
        checkpoint.stderr, "is a checkpoint, not a CheckpointManager directory",
        f"'ckptable info {tmp_path / 'ckpt'}'",
    )  # fmt: skip
    assert nothing.returncode == 1
    assert_one_error_line(
        nothing.stderr, f"No CheckpointManager directory at {tmp_path / 'nothing'}"
    )


def test_info_of_a_managed_checkpoint_shows_its_step_and_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "run"
    manager = CheckpointManager(directory, metric="loss", mode="min")
    path = manager.save(trained_model(), 12, {"loss": 0.25, "epoch": 3})
    assert path is not None

    result = run("info", path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[3] == (
        f"  step 12 of the CheckpointManager directory {directory}, saved "
        f"{record_time(path)} UTC; metrics: epoch=3 loss=0.25"
    )
    doc = json.loads(main_json(capsys, "info", path))
    assert doc["manager"] == {
        "directory": str(directory),
        "step": 12,
        "metrics": {"loss": 0.25, "epoch": 3},
        "saved_at": json.loads((Path(path) / RECORD_FILE).read_text())["saved_at"],
        "saved_at_utc": record_time(path),
        "metric": "loss",
        "mode": "min",
    }
    trained_model().save_to_path(tmp_path / "plain")
    assert json.loads(main_json(capsys, "info", str(tmp_path / "plain")))["manager"] is None


def test_ls_of_a_manager_directory_on_a_memory_uri(capsys: pytest.CaptureFixture[str]) -> None:
    import uuid

    uri = f"memory://ls-{uuid.uuid4().hex}/run"
    manager = CheckpointManager(uri, keep_last=1, metric="loss", mode="min")
    manager.save(trained_model(), 1, {"loss": 1.0})
    manager.save(trained_model(), 2, {"loss": 2.0})

    code, out, err = cli(capsys, "info", uri)

    assert code == 0, err
    assert out.splitlines()[0] == manager.directory
    assert f"latest: step 2  {manager.latest()}" in out
    assert f"best:   step 2 by loss (min)  {manager.best()}" in out  # step 1 was deleted
    assert manager.latest() == f"{manager.directory}/checkpoint_000002"


def test_ls_of_a_manager_directory_on_s3(
    s3_server: S3Server, s3_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = s3_server.uri(f"{s3_prefix}/run")
    manager = CheckpointManager(uri, keep_best=1, metric="loss", mode="min")
    for step, loss in [(1, 0.3), (2, 0.1), (3, 0.2)]:
        manager.save(trained_model(), step, {"loss": loss})

    doc = json.loads(main_json(capsys, "ls", uri))

    assert doc["steps"] == manager.steps() == [2, 3]
    assert doc["latest"] == {"step": 3, "path": manager.latest()}
    assert doc["best"]["path"] == manager.best()
    assert [c["status"] for c in doc["checkpoints"]] == ["ok", "ok"]


# --------------------------------------------------------------------------- files, counts


def test_info_of_a_file_in_a_checkpoint_names_the_directory_to_pass(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path)

    for command in ("info", "verify"):
        result = run(command, str(path / "state.pkl"))

        assert result.returncode == 1, result.stdout
        assert result.stdout == ""
        assert_one_error_line(
            result.stderr,
            f"{path / 'state.pkl'} is a file, not a checkpoint directory",
            f"it is part of the checkpoint {path}: pass that directory instead",
        )
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    result = run("info", str(stray))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "is a file, not a checkpoint directory", str(tmp_path))


def test_info_verify_and_the_demo_count_files_and_bytes_the_same(tmp_path: Path) -> None:
    """One count everywhere: every file but the manifests (which ``info`` reports
    apart), for ``info``'s header and JSON, ``verify`` and the demo's lines."""
    from ckptable._demo import Learner, saved_summary
    from ckptable.cli import describe_checkpoint

    path = tmp_path / "learner"
    Learner(layers=(8, 16, 4)).save_to_path(path)
    report = ckptable.verify_checkpoint(path)
    doc = describe_checkpoint(path)
    total, files = disk_sizes(path)

    assert (doc["levels"], doc["files"], doc["bytes"]) == (2, files, total)
    assert (report.levels, report.files, report.bytes) == (2, files, total)
    counts = f"2 levels, {files} files, {human_bytes(total)}"
    assert saved_summary(str(path), doc) == f"{path}: {counts}"
    info = run("info", str(path))
    verify = run("verify", str(path))
    assert f"  {counts}; every level has a manifest" in info.stdout
    assert verify.stdout.startswith(f"ok: {path}: {counts} checked against the manifests")


def test_the_demo_ends_with_what_to_try_next_on_its_real_paths(tmp_path: Path) -> None:
    from ckptable._demo import Learner, next_steps

    path, changed = tmp_path / "ckptable-demo", tmp_path / "ckptable-demo-changed"
    learner = Learner(layers=(8, 16, 4))
    learner.save_to_path(path)
    learner.weights["w0"][:] = 0
    learner.save_to_path(changed)

    lines = next_steps(str(path), str(changed), kept=True)

    assert lines[0] == f"checkpoint kept: {path} (and the changed state: {changed})"
    assert lines[1] == "try next:"
    commands = [line.split("#")[0].split() for line in lines[2:]]
    assert commands == [
        ["ckptable", "info", str(path)],
        ["ckptable", "verify", str(path)],
        ["ckptable", "diff", str(path), str(changed)],
    ]
    codes = [run(*command[1:]).returncode for command in commands]
    assert codes == [0, 0, 1]  # diff: they differ
    assert "--keep" in next_steps(str(path), None, kept=False)[0]


# --------------------------------------------------------------------------- verify


def test_verify_an_intact_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path)
    report = ckptable.verify_checkpoint(path)

    code, out, err = cli(capsys, "verify", str(path))

    assert code == 0, err
    assert out.count("\n") == 1
    assert out.startswith(f"ok: {path}: 5 levels, {report.files} files")
    assert human_bytes(report.bytes) in out and "xxh3_64" in out
    assert err == ""


def test_verify_finds_a_flipped_byte_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    trained_model().save_to_path(path)
    state = path / "optimizer" / "moments" / "state.pkl"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))

    result = run("verify", str(path))

    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_error_line(result.stderr, str(state), "corrupt")


@pytest.mark.rllib
def test_verify_warns_about_levels_without_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rllib_small import RLlibNode

    RLlibNode().save_to_path(str(tmp_path / "node"))

    code, out, err = cli(capsys, "verify", str(tmp_path / "node"))

    assert code == 0
    assert out.startswith(f"readable: {tmp_path / 'node'}: 3 levels") and "not verified" in out
    assert err.startswith("ckptable: warning: 3 of 3 levels have no ckptable manifest")
    assert err.count("\n") == 1


# --------------------------------------------------------------------------- convert


def test_convert_to_msgpack_then_info_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = trained_model()
    model.save_to_path(src)

    code, out, err = cli(capsys, "convert", str(src), str(dst), "--format", "msgpack")
    assert code == 0, err
    assert out.strip() == f"converted {src} to msgpack: {dst}"

    code, out, _ = cli(capsys, "info", str(dst), "--json")
    doc = json.loads(out)
    formats = {doc["tree"]["format"]}
    formats |= {level["format"] for level in doc["tree"]["components"].values()}
    assert formats == {"msgpack"}
    assert (dst / "optimizer" / "moments" / "state.msgpack").is_file()
    restored = Model.from_checkpoint(dst)
    assert state_differences(restored.get_state(), model.get_state()) == []

    code, out, err = cli(capsys, "convert", str(dst), str(tmp_path / "back"), "--format", "pickle")
    assert code == 0, err
    assert "to cloudpickle" in out


def test_convert_safe_refuses_code_in_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Holder(3).save_to_path(tmp_path / "src")

    code, _, err = cli(capsys, "convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--safe")

    assert code == 1
    assert_one_error_line(err, "Token")
    assert not (tmp_path / "dst").exists()


# --------------------------------------------------------------------------- diff


def changed_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A and B: B's layer0 weights differ in 2 elements, its optimizer's lr changed, and
    layer1 is missing from B (it has a component "extra" instead)."""
    a = trained_model(width=6)
    a.save_to_path(tmp_path / "a")
    b = trained_model(width=6)
    b.layers["layer0"].weights[[1, 4]] += np.float32(0.5)
    b.optimizer.config["lr"] = 0.02
    del b.layers["layer1"]
    b.layers["extra"] = Leaf(2)
    b.save_to_path(tmp_path / "b")
    return tmp_path / "a", tmp_path / "b"


def test_diff_of_equal_checkpoints_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained_model().save_to_path(tmp_path / "a")
    trained_model().save_to_path(tmp_path / "b", use_msgpack=True)  # same states, as msgpack

    code, out, err = cli(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"))

    assert code == 0, out + err
    assert out.splitlines()[-1] == "equal: 5 components, same states"


def test_diff_names_components_keys_and_array_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = changed_copy(tmp_path)

    code, out, err = cli(capsys, "diff", str(a), str(b))

    assert code == 1, err
    lines = out.splitlines()
    assert lines[:4] == [f"A: {a}", f"B: {b}", "only in A: layer1", "only in B: extra"]
    text = "\n".join(lines)
    assert "layer0 (trees.Leaf): 1 difference" in text
    assert (
        "  state['weights']: 2 of 6 elements differ, max abs diff 0.5 (first at index (1,):" in text
    )
    assert "optimizer (trees.Node): 1 difference" in text
    assert "  state['config']['lr']: 0.01 != 0.02" in text
    assert lines[-1] == "differ: 2 of 4 components compared differ; 1 only in A, 1 only in B"
    assert "(root)" not in text  # the root's own state (epoch) is the same


def test_diff_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = changed_copy(tmp_path)

    code, out, _ = cli(capsys, "diff", str(a), str(b), "--json")

    assert code == 1
    doc = json.loads(out)
    assert doc["a"] == str(a) and doc["b"] == str(b)
    assert doc["equal"] is False
    assert doc["only_in_a"] == ["layer1"]
    assert doc["only_in_b"] == ["extra"]
    assert doc["compared"] == ["", "layer0", "optimizer", "optimizer/moments"]
    assert doc["truncated"] == []
    by_path = {(d["component"], d["path"]): d for d in doc["differences"]}
    assert set(by_path) == {("layer0", "state['weights']"), ("optimizer", "state['config']['lr']")}
    weights = by_path[("layer0", "state['weights']")]
    assert weights["kind"] == "value"
    assert weights["detail"].startswith("2 of 6 elements differ, max abs diff 0.5")
    assert by_path[("optimizer", "state['config']['lr']")]["kind"] == "value"


def test_diff_tolerances_and_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = Leaf(10)  # weights 0, 1, ..., 9
    a.save_to_path(tmp_path / "a")
    b = Leaf(10)
    b.weights = b.weights * np.float32(1.001)  # 9 of 10 elements, by at most 0.009
    b.steps = 5
    b.save_to_path(tmp_path / "b")
    paths = (str(tmp_path / "a"), str(tmp_path / "b"))

    def differing(*options: str) -> list[str]:
        code, out, _ = cli(capsys, "diff", *paths, *options, "--json")
        doc = json.loads(out)
        assert code == (0 if doc["equal"] else 1)
        return [d["path"] for d in doc["differences"]]

    assert differing() == ["state['weights']", "state['steps']"]
    assert differing("--rtol", "0.01") == ["state['steps']"]
    assert differing("--atol", "0.01") == ["state['steps']"]
    assert differing("--atol", "10") == []
    code, out, _ = cli(capsys, "diff", *paths)
    assert "state['weights']: 9 of 10 elements differ, max abs diff 0.00" in out

    code, out, _ = cli(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"), "--limit", "1")
    assert code == 1
    assert "(root) (trees.Leaf): 1+ difference" in out
    assert "stopped after 1" in out and "state['steps']" not in out
    code, out, _ = cli(
        capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"), "--limit", "1", "--json"
    )
    assert json.loads(out)["truncated"] == [""]


def test_diff_refuses_an_unsafe_pickle_unless_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Holder(1).save_to_path(tmp_path / "a")
    Holder(2).save_to_path(tmp_path / "b")

    code, out, err = cli(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 2
    assert out == ""
    assert_one_error_line(err, "test_cli.Token", "--unsafe", str(tmp_path / "a" / "state.pkl"))

    code, out, err = cli(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"), "--unsafe")
    assert code == 1, err
    assert "state['token'].value: 1 != 2" in out


def test_diff_never_runs_code_from_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Leaf().save_to_path(tmp_path / "a")
    Leaf().save_to_path(tmp_path / "b")
    marker = tmp_path / "executed"
    code_text = f"open({str(marker)!r}, 'w')".encode()
    payload = (
        b"\x80\x04cbuiltins\nexec\nX" + len(code_text).to_bytes(4, "little") + code_text + b"\x85R."
    )
    (tmp_path / "b" / "state.pkl").write_bytes(payload)
    reseal(tmp_path / "b")  # as an attacker who can write the files can

    code, _, err = cli(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"))

    assert code == 2
    assert_one_error_line(err, "builtins.exec", "--unsafe")
    assert not marker.exists()


def test_diff_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Leaf().save_to_path(tmp_path / "a")
    code, _, err = cli(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "missing"))
    assert code == 2
    assert_one_error_line(err, str(tmp_path / "missing"))

    code, _, err = cli(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "a"), "--rtol", "-1")
    assert code == 2
    assert_one_error_line(err, "--rtol")


# --------------------------------------------------------------------------- errors


def test_user_mistakes_print_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    Leaf().save_to_path(tmp_path / "ckpt")
    cases = [
        (["info", str(tmp_path / "missing")], 1, "No checkpoint at"),
        (["info", str(tmp_path / "notes")], 1, "is not a checkpoint"),
        (["verify", str(tmp_path / "missing")], 1, "No checkpoint directory"),
        (["info", "nosuchscheme://bucket/x"], 1, "Unknown URI scheme"),
        (["convert", str(tmp_path / "ckpt"), str(tmp_path / "x"), "--format", "yaml"], 2, "yaml"),
        (["convert", str(tmp_path / "ckpt"), str(tmp_path / "notes")], 1, "notes"),
        (["info"], 2, "PATH"),
        (["frobnicate"], 2, "frobnicate"),
        (["diff", "--limit", "x", "a", "b"], 2, "--limit"),
    ]
    for args, expected, fragment in cases:
        code, _, err = cli(capsys, *args)
        assert code == expected, (args, err)
        assert_one_error_line(err, fragment)


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ["--debug", "info", str(tmp_path / "missing")],
        ["info", str(tmp_path / "missing"), "--debug"],
    ):
        code, _, err = cli(capsys, *args)
        assert code == 1
        assert "Traceback (most recent call last)" in err
        assert "CheckpointNotFoundError" in err
        assert err.strip().splitlines()[-1].startswith("ckptable: error: No checkpoint at")


def test_unexpected_errors_and_interrupts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptable.cli

    Leaf().save_to_path(tmp_path / "ckpt")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(ckptable.cli, "verify_checkpoint", broken)
    code, _, err = cli(capsys, "verify", str(tmp_path / "ckpt"))
    assert code == 1
    assert_one_error_line(err, "unexpected RuntimeError: injected", "--debug")

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(ckptable.cli, "verify_checkpoint", interrupted)
    code, out, err = cli(capsys, "verify", str(tmp_path / "ckpt"))
    assert (code, out, err) == (130, "", "")


# --------------------------------------------------------------------------- the real command


def test_the_console_script_and_module_run(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    Node({"child": Leaf()}).save_to_path(path)

    script = subprocess.run(
        [str(SCRIPT), "info", str(path), "--json"], capture_output=True, text=True, check=False
    )
    assert script.returncode == 0, script.stderr
    assert json.loads(script.stdout)["tree"]["components"]["child"]["class"] == "trees.Leaf"

    module = run("info", str(path))
    assert module.returncode == 0, module.stderr
    assert "└── child" in module.stdout

    ascii_env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    plain = run("info", str(path), env=ascii_env)
    assert plain.returncode == 0, plain.stderr
    assert "`-- child" in plain.stdout

    missing = run("info", str(tmp_path / "missing"))
    assert missing.returncode == 1
    assert_one_error_line(missing.stderr, "No checkpoint at")

    usage = run("convert", str(path))
    assert usage.returncode == 2
    assert_one_error_line(usage.stderr, "DST")


def ray_free_env() -> dict[str, str]:
    """This environment without the variables that would point Ray at the test cluster."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}


def test_demo_end_to_end(tmp_path: Path) -> None:
    result = run("demo", "--dir", str(tmp_path), "--keep", env=ray_free_env(), timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Traceback" not in result.stderr
    for fragment in (
        "[1/8] started an embedded local Ray (2 CPUs)",
        "├── learner",
        "│   └── optimizer",
        "└── runners",
        "ckptable._demo.Runner",
        "changed the states: ",
        "of 2 actors",
        "[6/8] restored from the checkpoint",
        "checked: every state is back (3 local levels, 2 actors)",
        "[8/8] verified ",
        "Ray shut down",
    ):
        assert fragment in out, fragment
    assert "2 of 2 actors" in out  # the actors' states had changed before the restore
    assert len(out.splitlines()) < 25
    path = tmp_path / "ckptable-demo"
    changed = tmp_path / "ckptable-demo-changed"
    assert f"checkpoint kept: {path} (and the changed state: {changed})" in out
    assert out.rstrip().splitlines()[-1].split("#")[0].split() == [
        "ckptable", "diff", str(path), str(changed),
    ]  # fmt: skip
    # The demo counts as info and verify do.
    doc_line = next(line for line in out.splitlines() if "(ckptable info):" in line)
    verified = next(line for line in out.splitlines() if "[8/8] verified " in line)
    counts = doc_line.split(": ", 1)[1].split(" (ckptable info)")[0]
    assert f"verified {counts} (xxh3_64)" in verified
    assert run("verify", str(path)).stdout.startswith(f"ok: {path}: {counts} checked")
    report = ckptable.verify_checkpoint(path)
    assert report.verified and report.levels == 4
    info = ckptable.get_checkpoint_info(path)
    assert set(info["components"]) == {"learner", "runners"}


def test_demo_interrupted_exits_130_quietly(tmp_path: Path) -> None:
    """Interrupted right away (Ctrl-C while Ray starts): exit 130, quietly, nothing left."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ckptable.cli", "demo", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ray_free_env(),
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.startswith("ckptable demo:")
    time.sleep(1.0)  # most likely inside ray.init, where the interrupt is held until it ends
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert not (tmp_path / "ckptable-demo").exists()


def test_demo_without_ray_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['ray'] = None; from ckptable.cli import main; "
        "sys.exit(main(['demo']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "pip install 'ckptable[cli]'")


def test_demo_leaves_a_directory_of_the_users_alone(tmp_path: Path) -> None:
    """DIR/ckptable-demo holding other files: the save refuses it, and it stays."""
    mine = tmp_path / "ckptable-demo"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")

    result = run("demo", "--dir", str(tmp_path), env=ray_free_env(), timeout=300)

    assert result.returncode == 1, result.stdout + result.stderr
    assert_one_error_line(result.stderr, str(mine))
    assert "[3/8] trained" in result.stdout
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "mine"
