"""The command line on what is not a checkpoint (issue 16's review): a manager's
directory, an empty directory, a directory of other files, a file; and ``ls`` of damage
that only sizes show. Every error is one line naming what is on disk and what to pass."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from ckptable import CheckpointManager
from ckptable._demo import next_steps
from ckptable.cli import main
from trees import trained_model


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckptable: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    manager = CheckpointManager(tmp_path / "run", metric="loss", mode="min")
    for step, loss in [(1, 0.5), (2, 0.4)]:
        manager.save(trained_model(), step, {"loss": loss})
    return tmp_path / "run"


@pytest.mark.parametrize("command", ["convert", "verify", "diff"])
def test_convert_verify_and_diff_refuse_a_manager_directory(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    args = {
        "convert": [str(run_dir), str(tmp_path / "out")],
        "verify": [str(run_dir)],
        "diff": [str(run_dir), str(run_dir)],
    }[command]

    code, out, err = cli(capsys, command, *args)

    assert code == (2 if command == "diff" else 1)
    assert out == ""
    one_error_line(
        err,
        f"{run_dir} is a CheckpointManager directory, not a checkpoint",
        f"'ckptable ls {run_dir}'",
        f"the newest complete one is {run_dir / 'checkpoint_000002'}",
    )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_000001", "checkpoint_000002"]


def test_verify_of_a_manager_directory_with_only_an_unfinished_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unfinished = tmp_path / "run" / "checkpoint_000003"
    unfinished.mkdir(parents=True)
    (unfinished / "metadata.json").write_text("{}")

    code, _, err = cli(capsys, "verify", str(tmp_path / "run"))

    assert code == 1
    one_error_line(err, "CheckpointManager directory with no complete checkpoint yet")


def test_verify_and_info_of_an_empty_directory_say_there_is_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    for command in ("verify", "info"):
        code, out, err = cli(capsys, command, str(tmp_path / "empty"))
        assert code == 1 and "readable" not in out
        one_error_line(err, f"No checkpoint at {tmp_path / 'empty'}: it is an empty directory")


def test_ls_of_a_directory_of_other_files_exits_1_and_of_an_empty_one_lists_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "train.py").write_text("print()")
    (tmp_path / "fresh").mkdir()

    code, out, err = cli(capsys, "ls", str(scripts))
    assert code == 1 and out == ""
    one_error_line(err, f"No CheckpointManager directory at {scripts}")

    code, out, err = cli(capsys, "ls", str(tmp_path / "fresh"))
    assert code == 0, err
    assert "0 checkpoints (an empty directory: no save has completed in it yet)" in out


def test_ls_marks_a_file_of_another_size_than_its_manifest_says_corrupt_with_its_metrics(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = run_dir / "checkpoint_000002" / "layer0" / "state.pkl"
    with open(damaged, "ab") as stream:
        stream.write(b"x")

    code, out, err = cli(capsys, "ls", str(run_dir))

    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:] if line.strip()}
    assert rows["2"][3:] == ["corrupt", "loss=0.4"]
    assert rows["1"][3:] == ["ok,", "latest,", "best", "loss=0.5"]
    assert f"step 2: corrupt: {damaged} is" in out and "manifest records" in out
    doc = json.loads(cli(capsys, "ls", str(run_dir), "--json")[1])
    by_step = {c["step"]: c for c in doc["checkpoints"]}
    assert by_step[2]["status"] == "corrupt" and by_step[2]["metrics"] == {"loss": 0.4}
    assert by_step[2]["saved_at"] is not None
    assert doc["latest"]["step"] == 1


@pytest.mark.parametrize("command", ["diff", "convert", "ls"])
def test_a_file_is_named_as_a_file_with_its_checkpoint_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = Path(trained_model().save_to_path(tmp_path / "ckpt"))
    state = path / "state.pkl"
    args = {
        "diff": [str(state), str(path)],
        "convert": [str(state), str(tmp_path / "out")],
        "ls": [str(state)],
    }[command]

    code, _, err = cli(capsys, command, *args)

    assert code == (2 if command == "diff" else 1)
    one_error_line(
        err, f"{state} is a file, not a checkpoint directory; it is part of the checkpoint {path}"
    )


@pytest.mark.parametrize("command", ["info", "verify", "diff", "ls"])
def test_a_file_outside_any_checkpoint_is_said_to_be_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    args = [str(notes), str(notes)] if command == "diff" else [str(notes)]

    code, _, err = cli(capsys, command, *args)

    assert code == (2 if command == "diff" else 1)
    line = one_error_line(err, f"{notes} is a file, not a checkpoint directory")
    assert "not a file in it" not in line


def test_the_demo_names_its_temporary_directory_and_quotes_its_paths(tmp_path: Path) -> None:
    base = tmp_path / "ckptable demo's dir"
    path, changed = str(base / "ckptable-demo"), str(base / "ckptable-demo-changed")

    lines = next_steps(path, changed, kept=True, temporary=str(base))

    assert lines[0] == (
        f"checkpoint kept: {shlex.quote(path)} (and the changed state: {shlex.quote(changed)})"
    )
    removal = f"rm -r {shlex.quote(str(base))} when done"
    assert lines[1] == f"  in a new temporary directory, left in place: {removal}"
    assert lines[2] == "try next:"
    commands = [shlex.split(line.split("  #")[0]) for line in lines[3:]]
    assert commands == [
        ["ckptable", "info", path],
        ["ckptable", "verify", path],
        ["ckptable", "diff", path, changed],
    ]
