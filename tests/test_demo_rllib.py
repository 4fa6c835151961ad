"""``ckptable demo --rllib``, run as the README says, in a process of its own: PPO on
CartPole on an embedded local Ray with a remote env runner, saved through ckptable,
shown, a damaged copy refused, restored and trained on; and the checkpoint it leaves."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ckptable
from ckptable._manifest import MANIFEST_FILE

pytestmark = pytest.mark.rllib

REPO = Path(__file__).resolve().parents[1]
#: The console script of the environment running the tests.
CKPTABLE = Path(sys.executable).parent / "ckptable"


def readme_command() -> list[str]:
    """The command the README gives for the demo, after its ``pip install``."""
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    found = re.search(r"`pip install 'ckptable\[rllib\]' && (ckptable demo [^`]*)`", text)
    assert found, "the README no longer gives the RLlib demo's command"
    return shlex.split(found.group(1))


def run_demo(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``ckptable ARGS`` with its temporary directories under ``tmp_path``."""
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # Ray's session directory stays where it always is (its socket paths are short).
    env.update(TMPDIR=str(temp), RAY_TMPDIR=tempfile.gettempdir(), CKPTABLE_PROGRESS="0")
    start = time.perf_counter()
    result = subprocess.run(
        [str(CKPTABLE), *args[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    return result, time.perf_counter() - start


def assert_every_step_shown(stdout: str) -> None:
    lines = stdout.splitlines()
    for step in ("1. PPO on CartPole, one remote env runner", "2. saved through ckptable"):
        assert any(line.startswith(step) for line in lines), stdout
    assert "8 levels" in stdout and "every level has a manifest" in stdout  # ckptable info
    assert "ray.rllib.algorithms.ppo.ppo.PPO" in stdout
    damaged = next(line for line in lines if line.startswith("4. one byte flipped in"))
    assert "default_policy/module_state.pkl" in damaged
    assert "refused before anything was set: CorruptCheckpointError:" in stdout
    assert "module_state.pkl is corrupt" in stdout
    assert "5. restored into a fresh PPO" in stdout
    assert "   iteration 4, return" in stdout
    assert "should not happen" not in stdout


def demo_temporaries(tmp_path: Path) -> list[str]:
    """The temporary directories the demo left (torch leaves its own there too)."""
    return sorted(p.name for p in (tmp_path / "tmp").glob("ckptable-rllib-demo-*"))


def demo_seconds(stdout: str) -> float:
    found = re.search(r"^done in ([0-9.]+)s$", stdout, re.MULTILINE)
    assert found, stdout
    return float(found.group(1))


def test_the_readme_command_runs_the_demo_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    command = readme_command()
    assert command == ["ckptable", "demo", "--rllib"]
    assert "`ckptable demo --rllib`" in (REPO / "docs" / "rllib.md").read_text(encoding="utf-8")

    result, seconds = run_demo(command, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert_every_step_shown(result.stdout)
    assert demo_seconds(result.stdout) < 60, result.stdout  # "about 20 s" on 2 cores
    print(f"demo: {demo_seconds(result.stdout):.1f}s, process {seconds:.1f}s")

    # Without --dir, the checkpoint stays in a new temporary directory, named at the end.
    kept = re.search(r"^checkpoint kept: (\S+)$", result.stdout, re.MULTILINE)
    assert kept, result.stdout
    path = Path(shlex.split(kept.group(1))[0])
    assert path.parent.parent == tmp_path / "tmp" and path.name == "ppo"
    assert f"ckptable verify {kept.group(1)}" in result.stdout
    report = ckptable.verify_checkpoint(path)
    assert (report.levels, report.unverified) == (8, ())
    assert (path / "rllib_checkpoint.json").is_file()
    for level in ("", "learner_group/learner/rl_module/default_policy", "env_runner"):
        assert (path / level / MANIFEST_FILE).is_file(), level
    # The damaged copy was made and removed in a temporary directory of its own.
    assert demo_temporaries(tmp_path) == [path.parent.name]


def test_the_demo_in_a_directory_keeps_its_checkpoint_only_with_keep(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    (target / "ppo-damaged").mkdir()  # a name the demo used to overwrite

    result, _ = run_demo(["ckptable", "demo", "--rllib", "--dir", str(target)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert_every_step_shown(result.stdout)
    assert "checkpoint removed; to keep it, run: ckptable demo --rllib --dir DIR --keep" in (
        result.stdout
    )
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "ppo-damaged"]
    assert demo_temporaries(tmp_path) == []

    result, _ = run_demo(["ckptable", "demo", "--rllib", "--dir", str(target), "--keep"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"checkpoint kept: {target / 'ppo'}" in result.stdout
    assert ckptable.verify_checkpoint(target / "ppo").unverified == ()
    info = subprocess.run(
        [str(CKPTABLE), "verify", str(target / "ppo")], capture_output=True, text=True, timeout=60
    )
    assert info.returncode == 0, info.stdout + info.stderr
