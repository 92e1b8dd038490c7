"""The documentation: every public name is in the API reference, every relative link resolves.

The site is built by ``sphinx-build -W -b html docs <out>`` (.ci/run, about a minute, so not
here). The API-reference test reads the built ``objects.inv`` from ``$RENORM_DOCS_HTML`` (set by
.ci/run after the build) or ``docs/_build/html``; without a build it is skipped, and the static
test below still checks that the autodoc directives cover every public module.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("renorm", "renorm_repro")


def _public_modules() -> dict[str, Path]:
    """Dotted name -> file of every module under PACKAGES with no ``_``-prefixed component."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(part.startswith("_") for part in parts):
                continue
            modules[".".join(parts)] = path
    return modules


def _all_names(path: Path) -> list[str] | None:
    """The literal ``__all__`` of a module, read without importing it (None if it has none)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            return [ast.literal_eval(element) for element in node.value.elts]
    return None


def _inventory_path() -> Path | None:
    for folder in (os.environ.get("RENORM_DOCS_HTML"), DOCS / "_build" / "html"):
        if folder and (Path(folder) / "objects.inv").is_file():
            return Path(folder) / "objects.inv"
    return None


def test_the_api_reference_covers_every_public_module():
    """docs/api/index.md autosummarizes each package recursively, and each page documents its members."""
    index = (DOCS / "api" / "index.md").read_text()
    block = re.search(r"\.\. autosummary::\n((?:   .*\n|\n)+)", index)
    assert block, "docs/api/index.md has no autosummary directive"
    assert ":recursive:" in block.group(1) and ":toctree:" in block.group(1)
    listed = {line.strip() for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith(":")}
    assert listed == set(PACKAGES)
    template = (DOCS / "_templates" / "autosummary" / "module.rst").read_text()
    assert ".. automodule:: {{ fullname }}\n   :members:\n   :undoc-members:" in template
    assert ".. autodata:: {{ fullname }}.{{ attr }}" in template  # constants, which :members: skips
    conf = (DOCS / "conf.py").read_text()
    assert "autosummary_ignore_module_all = True" in conf  # every submodule gets a page, not only those in __all__
    for name, path in _public_modules().items():
        assert name.split(".")[0] in listed, name
        assert _all_names(path) is not None or name in PACKAGES, f"{name} has no __all__: no public names"


def test_every_public_name_is_in_the_built_api_reference():
    inventory_path = _inventory_path()
    if inventory_path is None:
        pytest.skip("no built docs: run `sphinx-build -W -b html docs docs/_build/html` (or set RENORM_DOCS_HTML)")
    from sphinx.util.inventory import InventoryFile

    with inventory_path.open("rb") as stream:
        inventory = InventoryFile.load(stream, "", os.path.join)
    documented = {name for kind, entries in inventory.items() if kind.startswith("py:") for name in entries}
    modules = _public_modules()
    exports = {name: _all_names(path) or [] for name, path in modules.items()}
    missing = []
    for module, names in exports.items():
        if module not in documented:
            missing.append(f"{module} (the module)")
        for attr in names:
            if attr.startswith("__"):
                continue
            if f"{module}.{attr}" in documented:
                continue
            # a name several modules export is described once, under one of them, and linked from the others
            if any(attr in others and f"{other}.{attr}" in documented for other, others in exports.items()):
                continue
            missing.append(f"{module}.{attr}")
    assert not missing, "not in the API reference: " + ", ".join(missing)


_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _relative_links(text: str) -> list[str]:
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)  # fenced code
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto:, ...; an anchor in the same page
        targets.append(target.split("#", 1)[0])
    return targets


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("*/*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file(path):
    broken = [t for t in _relative_links(path.read_text()) if not (path.parent / t).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def test_the_link_check_sees_links():
    text = "[a](docs/SPEC.md) ![b](x.png#y) [c](https://e.org) `[d](no.md)` [e](#anchor)\n```\n[f](no.md)\n```\n"
    assert _relative_links(text) == ["docs/SPEC.md", "x.png"]


def test_the_keras_speed_table_is_the_committed_benchmark():
    """docs/keras.md's JAX-backend table, cell by cell, from benchmarks/results/layers_keras_jax.json."""
    import json

    doc = (DOCS / "keras.md").read_text()
    rows = json.loads((ROOT / "benchmarks" / "results" / "layers_keras_jax.json").read_text())["rows"]
    ratio = {(r["shape"], r["mode"], r["candidate"]): r for r in rows}
    columns = [  # (mode, candidate, ratio) per column of the table
        ("train", "renorm mb=None", "vs_baseline"),
        ("train", "renorm autodiff", "vs_baseline"),
        ("train", "renorm mb=4", "vs_whole"),
        ("train", "renorm mb=2", "vs_whole"),
        ("infer", "renorm", "vs_baseline"),
    ]
    shapes = sorted({r["shape"] for r in rows})
    assert len(shapes) == 4
    for shape in shapes:
        cells = " | ".join(f"{ratio[(shape, m, c)][k]:.2f}x" for m, c, k in columns)
        assert f"| {shape} | {cells} |" in doc, shape


def test_the_install_pages_extras_table_is_pyprojects():
    """docs/install.md's table of extras names each extra of pyproject.toml and every package it installs."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    rows = re.findall(r"^\| `([a-z]+)` \| ([^|]+) \|", (ROOT / "docs" / "install.md").read_text(), re.M)
    assert [name for name, _ in rows] == list(extras)
    for name, adds in rows:
        if name == "all":
            continue
        for req in extras[name]:
            package = re.split(r"[<>=\[ ]", req)[0]
            assert package.lower() in adds.lower().replace(" ", "-"), (name, package, adds)
