"""Masks in the Flax modules (docs/SPEC.md, section 3), linen's force_float32_reductions, nnx's
promote_dtype and parameter metadata.

Masked parity is against the oracle run with the same mask (statistics over the selected values,
docs/SPEC.md, section 9 tolerances); "rmax=1, dmax=0 is batch norm" is against flax's own
``nn.BatchNorm`` and ``nnx.BatchNorm`` given the same mask.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax_helpers import batch_norm_pair_inputs, linen_module, oracle, variables
from parity import MASK_CASE_IDS, MASK_CASES, assert_close, assert_matches_oracle, make_masks, make_params, make_steps

from renorm.jax import BatchRenorm
from renorm.jax import functional as F
from renorm.jax import nnx as rnnx
from renorm.numpy_ref import BatchRenormReference
from renorm.testing.adapters import LinenAdapter


def run_masked_parity(case, dtype, per_feature, explicit_backward=True, seed=0, momentum=0.5):
    """Every step (a masked group at step 1 or 2, nothing selected at step 1 without micro-batches) vs the oracle,
    through the driver; then inference, where the mask is checked and ignored."""
    assert case.microbatch_size is not None or np.any([~m.any() for m in make_masks(case, seed, per_feature)])
    adapter = LinenAdapter(explicit_backward=explicit_backward)
    masked = "per_feature" if per_feature else "positions"
    assert_matches_oracle(adapter, case, dtype=dtype, momentum=momentum, epsilon=1e-5, seed=seed, masked=masked)
    module = linen_module(case, momentum, param_dtype=jnp.float64 if dtype == "float64" else jnp.float32)
    params, stats = variables(case, make_params(case, seed), jnp.float64 if dtype == "float64" else jnp.float32)
    x_eval = jnp.asarray(make_steps(case, seed, dtype)[1])
    y = module.apply({"params": params, "batch_stats": stats}, x_eval, use_running_average=True)
    y_masked = module.apply(
        {"params": params, "batch_stats": stats}, x_eval, use_running_average=True, mask=make_masks(case, seed)[0]
    )
    np.testing.assert_array_equal(y, y_masked)


@pytest.mark.parametrize("case", MASK_CASES, ids=MASK_CASE_IDS)
def test_masked_parity_float64(case, x64):
    run_masked_parity(case, "float64", False)


@pytest.mark.parametrize("case", MASK_CASES[1:5], ids=MASK_CASE_IDS[1:5])
def test_masked_parity_float64_per_feature_mask(case, x64):
    """A different selection per feature, as Flax's mask allows (the feature axis not of size 1)."""
    run_masked_parity(case, "float64", True)


@pytest.mark.parametrize("case", MASK_CASES[:5], ids=MASK_CASE_IDS[:5])
def test_masked_parity_float64_autodiff(case, x64):
    run_masked_parity(case, "float64", True, explicit_backward=False)


@pytest.mark.parametrize("case", MASK_CASES[:5], ids=MASK_CASE_IDS[:5])
def test_masked_parity_float32(case):
    run_masked_parity(case, "float32", False)


def test_masked_nnx_matches_oracle_and_keeps_diagnostics_when_nothing_is_selected(x64):
    # No micro-batches: step 1 selects nothing. Tight limits, so that the diagnostics are not 0.
    case = dataclasses.replace(next(c for c in MASK_CASES if c.name == "nhwc"), rmax=1.1, dmax=0.1)
    xs, _, dys = make_steps(case, 3)
    masks = make_masks(case, 3, per_feature=True)
    p = make_params(case, 3)
    ref = oracle(case, 0.5, p)
    layer = rnnx.BatchRenorm(
        case.num_features, momentum=0.5, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **case.layer_kwargs()
    )
    layer.scale[...], layer.bias[...] = jnp.asarray(p["gamma"]), jnp.asarray(p["beta"])
    layer.mean[...], layer.stddev[...] = jnp.asarray(p["mean"]), jnp.asarray(p["stddev"])

    @nnx.jit
    def step(layer, x, dy, mask):
        def loss(layer, x):
            return jnp.sum(layer(x, mask=mask) * dy)

        return nnx.grad(loss, argnums=(0, 1))(layer, x)

    diagnostics = []
    for x, dy, mask in zip(xs, dys, masks):
        g, dx = step(layer, jnp.asarray(x), jnp.asarray(dy), jnp.asarray(mask))
        ref.train(x, mask=mask)
        dx_ref, dg_ref, db_ref = ref.backward(dy)
        assert_close(dx, dx_ref, "float64", "grad", "dx")
        assert_close(g.scale[...], dg_ref, "float64", "grad", "dscale")
        assert_close(layer.mean[...], ref.mean, "float64", "value", "mean")
        assert_close(layer.stddev[...], ref.stddev, "float64", "value", "stddev")
        assert int(layer.step[...]) == ref.step
        assert abs(float(layer.r_clipped[...]) - ref.r_clipped) < 1e-6
        assert abs(float(layer.d_clipped[...]) - ref.d_clipped) < 1e-6
        diagnostics.append(float(layer.d_clipped[...]))
    # Step 1 selected nothing: no step, and the diagnostics of step 0 kept (a call computing them would give 0).
    assert ref.step == case.steps - 1 and diagnostics[1] == diagnostics[0] > 0


# ---------------------------------------------------------------- rmax=1, dmax=0 is flax's batch norm
# (linen: test_jax_parity.test_rmax1_dmax0_is_flax_batchnorm, with and without a mask)
# nnx.BatchNorm writes its float64 update into its float32 statistics (its own code, not ours).
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_masked_rmax1_dmax0_is_nnx_batch_norm(x64):
    """Training outputs and gradients of nnx.BatchNorm given the same mask; its moving mean to float32.

    nnx.BatchNorm keeps its statistics in float32 whatever the dtypes, hence the float32 tolerance there.
    """
    x, dy, mask, params, mean0 = batch_norm_pair_inputs((8, 5, 3), -1, 5)
    ours = rnnx.BatchRenorm(3, rmax=1.0, dmax=0.0, momentum=0.9, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(3, momentum=0.9, use_fast_variance=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(layer, x):
        def loss(layer, x):
            y = layer(x, mask=mask)
            return jnp.sum(y * dy), y

        return nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)

    outs = []
    for layer in (ours, theirs):
        layer.scale[...], layer.bias[...] = params["scale"], params["bias"]
        layer.mean[...] = mean0.astype(layer.mean[...].dtype)
        (g, dx), y = step(layer, x)
        outs.append((y, dx, g.scale[...], g.bias[...], layer.mean[...]))
    for a, b, what in zip(*outs, ["y", "dx", "dscale", "dbias", "moving mean"]):
        tol = "float32" if what == "moving mean" else "float64"
        assert_close(a, b, tol, "grad" if what.startswith("d") else "value", what)


# ---------------------------------------------------------------- all masked, NaN padding, errors
def test_nothing_selected_leaves_linen_state_unchanged():
    module = BatchRenorm(momentum=0.5, microbatch_size=2)
    x = jnp.asarray(np.random.default_rng(6).normal(3.0, 2.0, (4, 3, 2)), jnp.float32)
    v = module.init(jax.random.key(0), x, use_running_average=False)
    train = jax.jit(lambda v, mask: module.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"]))
    _, upd = train(v, jnp.ones((4, 3, 1), bool))
    stats = upd["batch_stats"]
    y, upd = train({"params": v["params"], "batch_stats": stats}, jnp.zeros((4, 3, 1), bool))
    jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], stats)
    assert int(upd["batch_stats"]["step"]) == 1
    y_inf = jax.jit(module.apply, static_argnames="use_running_average")(
        {"params": v["params"], "batch_stats": stats}, x, use_running_average=True
    )
    assert_close(y, y_inf, "float32", "value", "output of a call selecting nothing vs inference")


def test_unselected_nan_padding_does_not_enter_the_statistics(x64):
    """Padding holding NaN, masked out: the state and the selected outputs are those of the rest."""
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, (6, 4, 3))
    mask = np.ones((6, 4, 1), bool)
    mask[:, 3] = False  # the last time step of every sequence is padding
    bad = x.copy()
    bad[:, 3] = np.nan
    ref = BatchRenormReference(3, momentum=0.5, epsilon=1e-5)
    y_ref = ref.train(x[:, :3])
    for explicit in (True, False):
        module = BatchRenorm(momentum=0.5, param_dtype=jnp.float64, explicit_backward=explicit)
        v = module.init(jax.random.key(0), bad, use_running_average=True)
        y, upd = jax.jit(lambda v: module.apply(v, bad, use_running_average=False, mask=mask, mutable=["batch_stats"]))(
            v
        )
        assert_close(upd["batch_stats"]["mean"], ref.mean, "float64", "value", "mean")
        assert_close(upd["batch_stats"]["stddev"], ref.stddev, "float64", "value", "stddev")
        assert_close(y[:, :3], y_ref, "float64", "value", "selected outputs")


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (
            np.ones((8, 3), bool),
            ValueError,
            r"`mask` must have a shape broadcastable to the input's shape \(8, 5, 4\); "
            r"got a mask of shape \(8, 3\)",
        ),
        (np.ones((2, 8, 5, 4), bool), ValueError, r"`mask`.*shape \(2, 8, 5, 4\)"),
        (np.array([["a"]]), TypeError, "`mask` must be boolean.*dtype <U1"),
    ],
)
def test_mask_errors(mask, exc, match):
    x = jnp.ones((8, 5, 4))
    module = BatchRenorm()
    v = module.init(jax.random.key(0), x, use_running_average=True)
    with pytest.raises(exc, match=match):
        module.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    with pytest.raises(exc, match=match):
        module.apply(v, x, use_running_average=True, mask=mask)
    with pytest.raises(exc, match=match):
        rnnx.BatchRenorm(4, rngs=nnx.Rngs(0))(x, mask=mask)
    with pytest.raises(exc, match=match):
        F.train(x, None, F.init_state(4), mask=mask)


def test_numeric_mask_selects_nonzero(x64):
    x = jnp.asarray(np.random.default_rng(8).normal(size=(8, 3)))
    module = BatchRenorm(param_dtype=jnp.float64)
    v = module.init(jax.random.key(0), x, use_running_average=True)
    m = np.array([1, 0, 2, 1, 0, 1, 1, 1])[:, None]
    a = module.apply(v, x, use_running_average=False, mask=m, mutable=["batch_stats"])
    b = module.apply(v, x, use_running_average=False, mask=m != 0, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------- linen force_float32_reductions
def test_force_float32_reductions_false_computes_in_the_input_dtype():
    """As nn.BatchNorm(force_float32_reductions=False): bfloat16 statistics, batch_stats in param_dtype."""
    case = next(c for c in MASK_CASES if c.name == "dense")
    x = jnp.asarray(make_steps(case, 9, ml_dtypes.bfloat16)[0][0])
    kw = dict(param_dtype=jnp.bfloat16, momentum=0.5)
    ours = {f: BatchRenorm(force_float32_reductions=f, **kw) for f in (True, False)}
    theirs = nn.BatchNorm(force_float32_reductions=False, **kw)
    v = {f: m.init(jax.random.key(0), x, use_running_average=False) for f, m in ours.items()}
    v_bn = theirs.init(jax.random.key(0), x, use_running_average=False)
    assert v[False]["batch_stats"]["mean"].dtype == v_bn["batch_stats"]["mean"].dtype == jnp.bfloat16
    assert v[False]["batch_stats"]["stddev"].dtype == jnp.bfloat16
    assert v[True]["batch_stats"]["stddev"].dtype == jnp.float32

    def full_size_float32_ops(module, variables):
        """The primitives that produce a float32 array of the input's size."""
        text = str(
            jax.make_jaxpr(lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"]))(
                variables, x
            )
        )
        lines = [line.split(" = ", 1)[1].strip() for line in text.splitlines() if "f32[8,5] =" in line]
        return {re.match(r"\w+", rhs).group() for rhs in lines}

    # With False the elementwise work is bfloat16: the only full-size float32 values are the ones
    # jnp.mean makes to accumulate its sums, as in nn.BatchNorm(force_float32_reductions=False).
    assert full_size_float32_ops(ours[False], v[False]) <= {"convert_element_type"}
    assert full_size_float32_ops(theirs, v_bn) <= {"convert_element_type"}
    assert {"sub", "mul"} <= full_size_float32_ops(ours[True], v[True])
    # The result is still renorm, to bfloat16 rounding: against the oracle and against batch norm.
    y, upd = ours[False].apply(v[False], x, use_running_average=False, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    ref = BatchRenormReference(case.num_features, momentum=0.5, epsilon=1e-5)
    assert_close(y, ref.train(np.asarray(x, np.float64)), "bfloat16", "value", "y")
    assert_close(upd["batch_stats"]["mean"], ref.mean, "bfloat16", "value", "mean")
    assert_close(upd["batch_stats"]["stddev"], ref.stddev, "bfloat16", "value", "stddev")
    bn = BatchRenorm(force_float32_reductions=False, rmax=1.0, dmax=0.0, **kw)
    y_bn = theirs.apply(v_bn, x, use_running_average=False, mutable=["batch_stats"])[0]
    y_ours = bn.apply(v[False], x, use_running_average=False, mutable=["batch_stats"])[0]
    assert_close(y_ours, y_bn, "bfloat16", "value", "rmax=1, dmax=0 vs nn.BatchNorm")


def test_force_float32_reductions_false_float32_input_is_unchanged():
    case = next(c for c in MASK_CASES if c.name == "nhwc_mb2_tight")
    xs, _, _ = make_steps(case, 10, np.float32)
    module = linen_module(case, 0.5)
    v = module.init(jax.random.key(0), xs[0], use_running_average=False)
    a = module.apply(v, xs[0], use_running_average=False, mutable=["batch_stats"])
    b = module.clone(force_float32_reductions=False).apply(v, xs[0], use_running_average=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------- nnx promote_dtype and metadata
def test_nnx_promote_dtype_is_called_as_nnx_batch_norm_calls_it():
    calls = []

    def spy(args, /, *, dtype=None):
        calls.append((tuple(None if a is None else (a.shape, a.dtype) for a in args), dtype))
        return nnx.nn.dtypes.promote_dtype(args, dtype=dtype)

    x = jnp.asarray(np.random.default_rng(11).normal(size=(8, 4)), jnp.bfloat16)
    for cls in (rnnx.BatchRenorm, nnx.BatchNorm):
        for use_bias in (True, False):
            layer = cls(4, use_bias=use_bias, promote_dtype=spy, rngs=nnx.Rngs(0))
            y = layer(x)
            ((shapes, dtype),) = calls[-1:]
            assert dtype is None and len(shapes) == 5
            assert shapes[0] == ((8, 4), jnp.bfloat16) and shapes[1:3] == (((4,), jnp.float32),) * 2
            assert shapes[3] == ((4,), jnp.float32) and (shapes[4] is None) == (not use_bias)
            # flax's promote_dtype: bfloat16 in, float32 parameters -> float32 out, in both.
            assert y.dtype == jnp.float32
            assert layer.mean[...].dtype == jnp.float32
    assert len(calls) == 4
    # The default keeps renorm's rule: the output in the input's dtype.
    assert rnnx.BatchRenorm(4, rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16
    assert rnnx.no_promotion((x, None), dtype=jnp.float32) == (x, None)


def test_nnx_promote_dtype_result_is_used():
    """A promote_dtype that casts to float16: the computation sees float16 values, in training and inference."""

    def to_f16(args, /, *, dtype=None):
        return tuple(None if a is None else jnp.asarray(a, jnp.float16) for a in args)

    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(2.0, 3.0, (8, 4)), jnp.float32)
    layer = rnnx.BatchRenorm(4, promote_dtype=to_f16, momentum=0.5, rngs=nnx.Rngs(0))
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32)
    ref = BatchRenormReference(
        4, momentum=0.5, epsilon=1e-5, gamma=np.asarray(jnp.asarray(layer.scale[...], jnp.float16), np.float64)
    )
    y = layer(x)
    assert y.dtype == jnp.float16
    assert_close(y, ref.train(np.asarray(jnp.asarray(x, jnp.float16), np.float64)), "float16", "value", "y")
    assert layer.mean[...].dtype == jnp.float32  # stored as the variable's dtype
    assert_close(layer.mean[...], ref.mean, "float32", "value", "mean")
    layer.eval()
    assert layer(x).dtype == jnp.float16


def test_nnx_scale_and_bias_metadata_as_nnx_batch_norm():
    """Sharding annotations (and any other metadata) reach the Params, as with nnx.BatchNorm."""
    meta = dict(scale_metadata={"out_sharding": ("model",), "note": "s"}, bias_metadata={"out_sharding": (None,)})
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        ours = rnnx.BatchRenorm(4, rngs=nnx.Rngs(0), **meta)
        theirs = nnx.BatchNorm(4, rngs=nnx.Rngs(0), **meta)
    for name in ("scale", "bias"):
        a = getattr(ours, name)
        b = getattr(theirs, name)
        assert a.get_metadata() == b.get_metadata(), (name, a.get_metadata(), b.get_metadata())
        assert a[...].sharding == b[...].sharding
    assert ours.scale.get_metadata()["note"] == "s"
    specs = nnx.get_partition_spec(nnx.state(ours, nnx.Param))
    assert specs["scale"].get_value() == jax.sharding.PartitionSpec("model")
    assert specs["bias"].get_value() == jax.sharding.PartitionSpec(None)
    assert "out_sharding" not in rnnx.BatchRenorm(4, rngs=nnx.Rngs(0)).scale.get_metadata()
