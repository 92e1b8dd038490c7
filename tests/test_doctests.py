"""The ``>>>`` examples of the package's docstrings (issue 32): every public class and function has one, and they run.

Two tests. ``test_every_public_name_has_an_example`` reads each package's ``__all__`` (``renorm``,
``renorm.keras``, ``renorm.tf``, ``renorm.jax`` with ``linen``, ``nnx`` and ``convert``, ``renorm.torch``) and
checks that each class, function and module it names has an example in its own docstring.
``test_docstring_examples`` runs every example of every module of ``renorm`` with ``doctest``, one test per
module, in the module's namespace (the private modules of ``renorm.testing``, whose objects the package re-exports,
included). A module whose framework is not installed is skipped, saying which.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "renorm"
# Private modules whose objects a public package re-exports: their examples run too.
RE_EXPORTED = ("renorm.testing._driver", "renorm.testing._registry")
# The packages whose __all__ is the public API that needs examples.
PUBLIC = ("renorm", "renorm.keras", "renorm.tf", "renorm.jax", "renorm.jax.linen", "renorm.jax.nnx")
PUBLIC += ("renorm.jax.convert", "renorm.torch", "renorm.numpy_ref", "renorm.testing")
# The framework each subpackage needs; pytest.importorskip names it when it is missing.
FRAMEWORK = {"renorm.keras": "keras", "renorm.tf": "tensorflow", "renorm.jax": "flax", "renorm.torch": "torch"}


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if any(part.startswith("_") for part in parts) and name not in RE_EXPORTED:
            continue
        names.append(name)
    return names


def _path(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _all_names(module: str) -> list[str]:
    """The literal ``__all__`` of ``module``, read without importing it."""
    for node in ast.parse(_path(module).read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(element) for element in node.value.elts]
    return []


def _import(module: str):
    for prefix, framework in FRAMEWORK.items():
        if module == prefix or module.startswith(prefix + "."):
            pytest.importorskip(framework, reason=f"{module} needs {framework}, which is not installed")
    return importlib.import_module(module)


PUBLIC_NAMES = [(module, name) for module in PUBLIC for name in _all_names(module) if not name.startswith("__")]


@pytest.mark.parametrize("module,name", PUBLIC_NAMES, ids=[f"{m}.{n}" for m, n in PUBLIC_NAMES])
def test_every_public_name_has_an_example(module, name):
    obj = getattr(_import(module), name)
    if not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)):
        pytest.skip(f"{module}.{name} is a constant ({type(obj).__name__}): no example needed")
    examples = doctest.DocTestParser().get_examples(inspect.getdoc(obj) or "")
    assert examples, f"{module}.{name} has no >>> example in its docstring"


@pytest.mark.parametrize("module", _module_names())
def test_docstring_examples(module):
    mod = _import(module)
    tests = [t for t in doctest.DocTestFinder().find(mod, module) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples of {module} failed:\n{report.getvalue()}"
    )
