"""One owner for the Keras layer (issue 32): what ``renorm/keras`` and ``renorm/tf`` may import from each other.

``renorm/keras/layer.py`` owns the layer's variables and its one state update, and picks the backend's
computation; ``renorm/tf/ops.py`` is a pure TensorFlow computation. So no private name crosses between
the two packages, and ``renorm/keras`` never imports ``renorm.tf.layer`` (the layer's TensorFlow name).
Read from the sources, without importing a framework.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every import in ``path`` (``name`` None for ``import module``), at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.extend((node.module, alias.name) for alias in node.names)
    return found


@pytest.mark.parametrize("here,other", [("keras", "tf"), ("tf", "keras")])
def test_no_private_name_crosses_between_keras_and_tf(here, other):
    crossing = []
    for path in sorted((ROOT / "renorm" / here).glob("*.py")):
        for module, name in imports(path):
            if not (module == f"renorm.{other}" or module.startswith(f"renorm.{other}.")):
                continue
            private_module = any(part.startswith("_") for part in module.split("."))
            if private_module or (name is not None and name.startswith("_")):
                crossing.append(f"{path.relative_to(ROOT)}: from {module} import {name}")
            if here == "keras" and (module == "renorm.tf.layer" or (module, name) == ("renorm.tf", "layer")):
                crossing.append(f"{path.relative_to(ROOT)}: imports renorm.tf.layer")
    assert not crossing, "\n".join(crossing)
