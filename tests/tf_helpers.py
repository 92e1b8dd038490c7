"""Helpers for the TensorFlow port's tests: run the Keras layer and the oracle side by side."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from parity import assert_close, make_params, make_steps

from renorm.numpy_ref import BatchRenormReference
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
    ref = BatchRenormReference(
        case.num_features,
        momentum=momentum,
        epsilon=epsilon,
        center=case.center,
        scale=case.scale,
        dtype=np.float64,
        **case.layer_kwargs(),
        **p,
    )
    return layer, ref


def train_step_fn(layer, mode: str):
    """``(x, dy) -> (y, dx, dgamma, dbeta)`` for one training step: eager, tf.function or XLA."""

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float64) * tf.cast(dy, tf.float64))
        sources = [x] + [w for w in (layer.gamma, layer.beta) if w is not None]
        grads = tape.gradient(loss, sources)
        dx = grads[0]
        rest = iter(grads[1:])
        dgamma = next(rest) if layer.gamma is not None else None
        dbeta = next(rest) if layer.beta is not None else None
        return y, dx, dgamma, dbeta

    if mode == "eager":
        return step
    return tf.function(step, jit_compile=(mode == "jit"))


def check_against_oracle(case, seed, *, dtype, momentum, mode="eager", explicit_gradient=True, tol_dtype=None, **extra):
    """Train ``case.steps`` steps, then infer; compare everything at every step with the oracle.

    Inputs are drawn in float64 and cast to ``dtype``; the oracle runs in
    float64 on the same (cast) values.
    """
    tol_dtype = tol_dtype or dtype
    layer, ref = make_pair(case, seed, momentum=momentum, dtype=dtype, explicit_gradient=explicit_gradient, **extra)
    xs, x_eval, dys = make_steps(case, seed, np.float64)
    step = train_step_fn(layer, mode)
    in_dtype = layer.compute_dtype
    for i, (x, dy) in enumerate(zip(xs, dys)):
        xt = tf.cast(tf.constant(x), in_dtype)
        x64 = tf.cast(xt, tf.float64).numpy()  # what the layer actually saw
        y, dx, dgamma, dbeta = step(xt, tf.constant(dy))
        y_ref = ref.train(x64)
        dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy)
        at = f"{case.name} step {i}"
        assert y.dtype == in_dtype, (y.dtype, in_dtype)
        assert_close(y.numpy(), y_ref, tol_dtype, "value", f"{at}: y")
        assert_close(dx.numpy(), dx_ref, tol_dtype, "grad", f"{at}: dx")
        if case.scale:
            assert_close(dgamma.numpy(), dgamma_ref, tol_dtype, "grad", f"{at}: dgamma")
        if case.center:
            assert_close(dbeta.numpy(), dbeta_ref, tol_dtype, "grad", f"{at}: dbeta")
        assert_close(layer.moving_mean.numpy(), ref.mean, tol_dtype, "value", f"{at}: moving_mean")
        assert_close(layer.moving_stddev.numpy(), ref.stddev, tol_dtype, "value", f"{at}: moving_stddev")
        assert int(layer.step.numpy()) == ref.step
        if tol_dtype in ("float64",):
            # Clip fractions (ratios of counts): docs/SPEC.md section 9's 1e-6 in float64, not its table.
            np.testing.assert_allclose(float(layer.r_clipped_fraction.numpy()), ref.r_clipped, atol=1e-6)
            np.testing.assert_allclose(float(layer.d_clipped_fraction.numpy()), ref.d_clipped, atol=1e-6)
    xe = tf.cast(tf.constant(x_eval), in_dtype)
    y_inf = layer(xe, training=False)
    assert_close(y_inf.numpy(), ref.infer(tf.cast(xe, tf.float64).numpy()), tol_dtype, "value", "inference")
    assert int(layer.step.numpy()) == case.steps  # inference does not advance the step
    return layer, ref
