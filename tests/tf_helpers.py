"""Helpers for the TensorFlow port's tests: run the Keras layer and the oracle side by side."""

from __future__ import annotations

from parity import assert_matches_oracle, make_params

from renorm.testing import oracle
from renorm.testing.adapters import KerasAdapter
from renorm.tf import BatchRenormalization


def make_pair(case, seed, *, momentum, epsilon=1e-3, dtype="float64", explicit_gradient=True, **extra):
    """A built layer and an oracle with the same random parameters and state."""
    p = make_params(case, seed)
    layer = BatchRenormalization(
        momentum=momentum,
        epsilon=epsilon,
        center=case.center,
        scale=case.scale,
        dtype=dtype,
        explicit_gradient=explicit_gradient,
        **case.layer_kwargs(),
        **extra,
    )
    layer.build(case.shape)
    if case.scale:
        layer.gamma.assign(p["gamma"])
    if case.center:
        layer.beta.assign(p["beta"])
    layer.moving_mean.assign(p["mean"])
    layer.moving_stddev.assign(p["stddev"])
    ref = oracle(case, momentum=momentum, epsilon=epsilon, params=p)
    return layer, ref


def check_against_oracle(case, seed, *, dtype, momentum, mode="eager", explicit_gradient=True, tol_dtype=None, **extra):
    """Train ``case.steps`` steps, then infer; everything at every step against the oracle, through the driver.

    ``dtype``: the layer's (``"mixed_float16"``/``"mixed_bfloat16"``: a policy, held to its compute dtype's
    tolerance). Returns ``(layer, report)``.
    """
    run_dtype = tol_dtype or dtype.removeprefix("mixed_")
    adapter = KerasAdapter(mode=mode, explicit_gradient=explicit_gradient, **extra)
    report = assert_matches_oracle(adapter, case, dtype=run_dtype, momentum=momentum, epsilon=1e-3, seed=seed)
    layer = adapter.last_layer
    assert int(layer.step.numpy()) == case.steps  # inference does not advance the step
    return layer, report
