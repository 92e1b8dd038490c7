"""The Flax port against the NumPy oracle (docs/SPEC.md, section 9), flax's BatchNorm, and linen vs nnx."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax_helpers import batch_norm_pair_inputs, infer_fn, linen_module, oracle, train_step_fn, variables
from parity import CASE_IDS, CASES, REDUCED_CASES, assert_close, assert_matches_oracle, make_params, make_steps, rel_err

from renorm.jax import BatchRenorm
from renorm.jax import nnx as rnnx
from renorm.testing.adapters import LinenAdapter


def run_parity(case, momentum, dtype, seed=0, explicit_backward=True):
    """Train ``case.steps`` steps and infer once, every step against the oracle (float64), through the driver.

    Below float64 the gradient on groups of 2 values is held to 3x the float32 oracle's own error (docs/SPEC.md,
    sections 6 and 9): the driver applies that rule.
    """
    assert_matches_oracle(
        LinenAdapter(explicit_backward=explicit_backward), case, dtype=dtype, momentum=momentum, epsilon=1e-5, seed=seed
    )


@pytest.mark.parametrize("momentum", [0.99, 0.5])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float64(case, momentum, x64):
    """The default gradient: the paper's explicit backward (custom VJP)."""
    run_parity(case, momentum, "float64")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float64_autodiff(case, x64):
    """The reference gradient: plain autodiff through the forward pass."""
    run_parity(case, 0.5, "float64", explicit_backward=False)


@pytest.mark.parametrize("momentum", [0.99, 0.5])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float32(case, momentum):
    run_parity(case, momentum, "float32")


REDUCED = REDUCED_CASES


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", REDUCED, ids=[c.name for c in REDUCED])
def test_parity_reduced_precision(case, dtype):
    run_parity(case, 0.5, dtype)


def test_parity_cases_exercise_clipping(x64):
    """The registry must actually clip (else parity would not test the clip): tight cases do."""
    case = next(c for c in CASES if c.name == "nhwc_mb2_tight")
    ref = oracle(case, 0.5, make_params(case, 0))
    xs, _, _ = make_steps(case, 0)
    ref.train(xs[0])
    assert ref.r_clipped > 0 and ref.d_clipped > 0


# ---------------------------------------------------------------- batch norm
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("shape,axis", [((8, 5, 3), -1), ((6, 3, 2, 2), 1)])
def test_rmax1_dmax0_is_flax_batchnorm(shape, axis, explicit, masked, x64):
    """rmax=1, dmax=0 is exactly flax.linen.BatchNorm in training (two-pass variance), given the same mask or none:
    outputs, gradients, moving mean."""
    x, dy, mask, params, mean0 = batch_norm_pair_inputs(shape, axis, 4)
    mask = mask if masked else None
    c = shape[axis]
    kw = dict(axis=axis, momentum=0.9, epsilon=1e-3, param_dtype=jnp.float64)
    ours = BatchRenorm(rmax=1.0, dmax=0.0, explicit_backward=explicit, **kw)
    theirs = nn.BatchNorm(use_fast_variance=False, dtype=jnp.float64, **kw)
    stats_ours = {"mean": mean0, "stddev": jnp.full(c, 7.0), "step": jnp.zeros((), jnp.int32)}
    stats_theirs = {"mean": mean0, "var": jnp.ones(c)}

    def run(module, stats):
        def fwd(params, x):
            return module.apply(
                {"params": params, "batch_stats": stats},
                x,
                use_running_average=False,
                mask=mask,
                mutable=["batch_stats"],
            )

        y, vjp, upd = jax.vjp(fwd, params, x, has_aux=True)
        return y, vjp(dy), upd["batch_stats"]

    y1, (dp1, dx1), s1 = jax.jit(run, static_argnums=0)(ours, stats_ours)
    y2, (dp2, dx2), s2 = jax.jit(run, static_argnums=0)(theirs, stats_theirs)
    assert_close(y1, y2, "float64", "value", "y")
    assert_close(dx1, dx2, "float64", "grad", "dx")
    assert_close(dp1["scale"], dp2["scale"], "float64", "grad", "dscale")
    assert_close(dp1["bias"], dp2["bias"], "float64", "grad", "dbias")
    assert_close(s1["mean"], s2["mean"], "float64", "value", "moving mean")
    if masked:  # the mask mattered: the unmasked output differs
        y0 = ours.apply(
            {"params": params, "batch_stats": stats_ours}, x, use_running_average=False, mutable=["batch_stats"]
        )[0]
        assert rel_err(y0, y1) > 1e-3


# ------------------------------------------------------------- linen vs nnx
NNX_CASES = [c for c in CASES if c.name in ("dense_mb2", "nchw_axis1_mb2", "schedule", "no_center")]


@pytest.mark.parametrize("case", NNX_CASES, ids=[c.name for c in NNX_CASES])
def test_linen_and_nnx_identical(case):
    """Same inputs and state: identical outputs, gradients, statistics and diagnostics."""
    xs, x_eval, dys = make_steps(case, 7, np.float32)
    p = make_params(case, 7)
    module = linen_module(case, 0.9)
    params, stats = variables(case, p, jnp.float32)
    layer = rnnx.BatchRenorm(
        case.num_features,
        momentum=0.9,
        use_bias=case.center,
        use_scale=case.scale,
        rngs=nnx.Rngs(0),
        **case.layer_kwargs(),
    )
    if case.scale:
        layer.scale[...] = params["scale"]
    if case.center:
        layer.bias[...] = params["bias"]
    layer.mean[...] = stats["mean"]
    layer.stddev[...] = stats["stddev"]

    @nnx.jit
    def nnx_step(layer, x, dy):
        def loss(layer, x):
            return jnp.sum(layer(x) * dy), layer(x, use_running_average=True)

        (_, y_eval), (g_layer, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return dx, g_layer

    step = train_step_fn(module)
    linen_fwd = jax.jit(
        lambda params, stats, x: module.apply(
            {"params": params, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"]
        )[0]
    )
    nnx_fwd = nnx.jit(lambda layer, x: layer(x))
    for x, dy in zip(xs, dys):
        x, dy = jnp.asarray(x), jnp.asarray(dy)
        y = linen_fwd(params, stats, x)
        y_nnx = nnx_fwd(nnx.clone(layer), x)  # forward only, on a copy
        _, dparams, dx, stats, inter = step(params, stats, x, dy)
        dx_nnx, g = nnx_step(layer, x, dy)
        np.testing.assert_array_equal(y, y_nnx)
        assert_close(dx, dx_nnx, "float32", "grad", "dx linen vs nnx")
        if case.scale:
            assert_close(dparams["scale"], g.scale[...], "float32", "grad", "dscale linen vs nnx")
        if case.center:
            assert_close(dparams["bias"], g.bias[...], "float32", "grad", "dbias linen vs nnx")
        np.testing.assert_array_equal(stats["mean"], layer.mean[...])
        np.testing.assert_array_equal(stats["stddev"], layer.stddev[...])
        assert int(stats["step"]) == int(layer.step[...])
        assert float(inter["r_clipped"][0]) == float(layer.r_clipped[...])
        assert float(inter["d_clipped"][0]) == float(layer.d_clipped[...])
    layer.eval()
    x_eval = jnp.asarray(x_eval)
    np.testing.assert_array_equal(infer_fn(module)(params, stats, x_eval), nnx_fwd(layer, x_eval))
