"""Packaging: one version, type information shipped."""

import importlib.metadata
from pathlib import Path

import renorm

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_version_is_renorm_version():
    # pyproject.toml reads it from renorm/__init__.py (dynamic = ["version"]); a stale install differs
    assert importlib.metadata.version("renorm") == renorm.__version__


def test_the_version_is_written_once():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert "\nversion = " not in pyproject.split("[tool.setuptools.dynamic]")[0]


def test_py_typed_is_shipped():
    assert (Path(renorm.__file__).parent / "py.typed").is_file()
    assert 'renorm = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
