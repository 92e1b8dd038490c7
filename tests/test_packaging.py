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


def test_the_docstring_examples_run():
    import doctest

    import renorm.numpy_ref.layer
    import renorm.schedule

    for module in (renorm.schedule, renorm.numpy_ref.layer):
        failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert attempted > 0 and failed == 0, module.__name__
