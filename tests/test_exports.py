"""The public names: ``__all__`` lists exactly what the package exports, sorted."""

from __future__ import annotations

import subprocess
import sys

import ckptable
from ckptable import errors


def test_all_is_sorted_and_every_name_exists() -> None:
    assert ckptable.__all__ == sorted(ckptable.__all__)
    for name in ckptable.__all__:
        assert getattr(ckptable, name) is not None, name


def test_every_public_module_attribute_is_in_all() -> None:
    public = {
        name
        for name, value in vars(ckptable).items()
        if not name.startswith("_") and not isinstance(value, type(ckptable))
    }
    assert public <= set(ckptable.__all__)


def test_every_error_is_exported_at_top_level() -> None:
    for name in errors.__all__:
        assert getattr(ckptable, name) is getattr(errors, name)


def test_version_is_the_installed_distribution_version() -> None:
    from importlib.metadata import version

    assert ckptable.__version__ == version("ckptable")


def test_ckptable_ray_exports_what_its_all_lists() -> None:
    import ckptable.ray

    assert len(set(ckptable.ray.__all__)) == len(ckptable.ray.__all__)  # ruff sorts it
    for name in ckptable.ray.__all__:
        assert getattr(ckptable.ray, name) is not None, name


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_core_does_not_import_ray() -> None:
    result = _run(
        "import sys, ckptable, ckptable._save, ckptable._restore; print('ray' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_ckptable_ray_without_ray_says_what_to_install() -> None:
    result = _run("import sys; sys.modules['ray'] = None; import ckptable.ray")
    assert result.returncode != 0
    assert "pip install 'ckptable[ray]'" in result.stderr


def test_xxhash_is_a_core_dependency_so_every_install_verifies_xxh3() -> None:
    """A checkpoint written with xxh3 must restore and verify on any install of
    ckptable (the cli extra too), so xxhash may not hide behind an extra."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    core = [Requirement(r) for r in requires("ckptable") or []]
    core = [r for r in core if r.marker is None]
    assert "xxhash" in {r.name for r in core}

    from ckptable._manifest import preferred_algorithm

    assert preferred_algorithm() == "xxh3_64"
