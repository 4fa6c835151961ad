"""The public names: ``__all__`` lists exactly what the package exports, sorted."""

from __future__ import annotations

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
