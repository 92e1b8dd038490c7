"""Every port's public defaults, tied to one place (issue 32): the specification and ``ClipSchedule``.

``docs/SPEC.md``, section 7, spells the renorm arguments once (``rmax=3.0``, ``dmax=5.0``, ...), and they
are ``renorm.ClipSchedule``'s field defaults; momentum and epsilon are each framework's batch norm's
(section 7's table, and section 15 for PyTorch). Each port spells them in its own signature, for its
users' ``help()``; this test reads each signature and the specification, so that none can drift alone.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re

import pytest

from renorm import ClipSchedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DEFAULT = inspect.Parameter.empty


def spec_section(number: int) -> str:
    text = open(os.path.join(REPO, "docs", "SPEC.md"), encoding="utf-8").read()
    return re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.M | re.S).group(0)


def spec_renorm_defaults() -> dict:
    """The bullet of section 7 that spells the renorm arguments for every backend."""
    section = " ".join(spec_section(7).split())
    bullet = re.search(r"The renorm arguments are spelled the same in every backend: (.*?)\.(?:\s|$)", section)
    return {name: ast.literal_eval(value) for name, value in re.findall(r"`(\w+)=([^`]+)`", bullet.group(1))}


def spec_momentum_epsilon() -> dict:
    """``{framework: (momentum, epsilon)}`` from section 7's table and section 15 (PyTorch)."""
    row = re.search(r"^\| momentum, epsilon \|(.*)\|$", spec_section(7), re.M).group(1).split("|")
    numbers = [re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", cell) for cell in row]
    torch_text = " ".join(spec_section(15).split())
    return {
        "numpy": (NO_DEFAULT, NO_DEFAULT) if "no default" in row[0] else None,
        "keras": tuple(float(v) for v in numbers[1][:2]),
        "flax": tuple(float(v) for v in numbers[2][:2]),
        "torch": (
            float(re.search(r"momentum=([\d.]+)", torch_text).group(1)),
            float(re.search(r"eps=([\d.e-]+)", torch_text).group(1)),
        ),
    }


def defaults(obj) -> dict:
    """The default of every parameter of ``obj``'s signature (a class: its constructor's)."""
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    return {name: p.default for name, p in signature.parameters.items()}


# (module, attribute, framework of its momentum/epsilon, how it spells them); None: it takes neither.
PORTS = {
    "ClipSchedule": ("renorm.schedule", "ClipSchedule", None, None),
    "check_config": ("renorm.config", "check_config", "numpy", ("momentum", "epsilon")),
    "numpy_ref.BatchRenormReference": ("renorm.numpy_ref", "BatchRenormReference", "numpy", ("momentum", "epsilon")),
    "keras.BatchRenormalization": ("renorm.keras", "BatchRenormalization", "keras", ("momentum", "epsilon")),
    "tf.batch_renorm": ("renorm.tf", "batch_renorm", "keras", ("momentum", "epsilon")),
    "jax.BatchRenormConfig": ("renorm.jax.functional", "BatchRenormConfig", "flax", ("momentum", "epsilon")),
    "jax.linen.BatchRenorm": ("renorm.jax.linen", "BatchRenorm", "flax", ("momentum", "epsilon")),
    "jax.nnx.BatchRenorm": ("renorm.jax.nnx", "BatchRenorm", "flax", ("momentum", "epsilon")),
    "torch.BatchRenorm": ("renorm.torch", "BatchRenorm", "torch", ("momentum", "eps")),
    "torch.BatchRenorm2d": ("renorm.torch", "BatchRenorm2d", "torch", ("momentum", "eps")),
}
FRAMEWORK = {"renorm.keras": "keras", "renorm.tf": "tensorflow", "renorm.jax": "flax", "renorm.torch": "torch"}


@pytest.mark.parametrize("port", list(PORTS))
def test_every_port_has_the_specified_defaults(port):
    module_name, attr, framework, names = PORTS[port]
    for prefix, package in FRAMEWORK.items():
        if module_name.startswith(prefix):
            pytest.importorskip(package)
    obj = getattr(importlib.import_module(module_name), attr)
    got = defaults(obj)
    schedule = {f.name: f.default for f in dataclasses.fields(ClipSchedule)}
    renorm_args = spec_renorm_defaults()
    # The specification's list and ClipSchedule agree, and cover the whole schedule.
    assert {k: v for k, v in renorm_args.items() if k in schedule} == schedule
    expected = dict(schedule) if port == "ClipSchedule" else dict(renorm_args)
    if port == "tf.batch_renorm":  # one step's limits, no schedule (the layer evaluates it)
        expected = {k: v for k, v in expected.items() if not k.endswith("_steps")}
    if framework is not None:
        momentum, epsilon = spec_momentum_epsilon()[framework]
        expected[names[0]], expected[names[1]] = momentum, epsilon
    assert {k: got.get(k, "<missing>") for k in expected} == expected, f"{port}'s defaults drifted from docs/SPEC.md"
