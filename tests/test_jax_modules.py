"""The Flax modules and the functional core: errors, state handling, training pattern, numerics rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx, serialization
from jax_helpers import oracle, variables
from parity import CASES, Case, assert_close, make_params, make_steps
from parity import CONFIG_ERRORS as PORT_CONFIG_ERRORS

from renorm.jax import BatchRenorm, BatchRenormConfig
from renorm.jax import functional as F
from renorm.jax import nnx as rnnx

X = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (8, 4)), jnp.float32)


def make_nnx(**kw):
    return rnnx.BatchRenorm(kw.pop("num_features", 4), rngs=nnx.Rngs(0), **kw)


# ----------------------------------------------------------------- errors
CONFIG_ERRORS = PORT_CONFIG_ERRORS + [
    (dict(axis_name="batch", microbatch_size=2), ValueError, "microbatch_size=2"),
]


@pytest.mark.parametrize("kw,exc,text", CONFIG_ERRORS, ids=[t for _, _, t in CONFIG_ERRORS])
def test_config_errors_at_construction(kw, exc, text):
    for build in (lambda: BatchRenorm(**kw), lambda: make_nnx(**kw), lambda: BatchRenormConfig(**kw)):
        with pytest.raises(exc, match=text.replace("(", r"\(")):
            build()


INPUT_ERRORS = [
    (jnp.ones((8, 4), jnp.int32), dict(), TypeError, "dtype int32"),
    (jnp.ones((8,)), dict(), ValueError, "rank 1"),
    (X, dict(microbatch_size=3), ValueError, "batch of 8 examples and microbatch_size=3"),
    (X, dict(microbatch_size=1), ValueError, "micro-batch of 1 holds 1"),
    (X[:1], dict(), ValueError, "batch holds 1"),
    (X, dict(axis=2), ValueError, "axis=2"),
    (X, dict(axis=0), ValueError, "axis=0"),
]


@pytest.mark.parametrize("x,kw,exc,text", INPUT_ERRORS, ids=[t for *_, t in INPUT_ERRORS])
def test_input_errors(x, kw, exc, text):
    module = BatchRenorm(**kw)
    with pytest.raises(exc, match=text):
        # init builds the variables from any batch (it computes no state, as nn.BatchNorm); a training
        # apply checks the groups.
        v = module.init(jax.random.key(0), x, use_running_average=True)
        module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    with pytest.raises(exc, match=text):
        make_nnx(**kw)(x)
    with pytest.raises(exc, match=text):
        F.train(x, None, F.init_state(4), BatchRenormConfig(**kw))


def test_feature_size_mismatch():
    module = BatchRenorm()
    v = module.init(jax.random.key(0), X, use_running_average=False)
    for train in (False, True):
        with pytest.raises(ValueError, match="5 features on axis -1 but the layer was built for 4"):
            module.apply(v, jnp.ones((8, 5)), use_running_average=train, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="built for 4"):
        make_nnx()(jnp.ones((8, 5)))


def test_missing_use_running_average_is_an_error():
    with pytest.raises(ValueError, match="use_running_average"):
        BatchRenorm().init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="use_running_average"):
        make_nnx(use_running_average=None)(X)
    # The call argument wins over the field, as in flax.
    v = BatchRenorm().init(jax.random.key(0), X, use_running_average=True)
    assert_close(BatchRenorm().apply(v, X, use_running_average=True), X, "float32", "value", "initial inference")


# ------------------------------------------------------------------- state
def test_init_creates_flax_names_and_does_not_update_stats():
    v = BatchRenorm(use_running_average=False).init(jax.random.key(0), X)
    assert set(v) == {"params", "batch_stats"}  # no intermediates sown at init
    assert set(v["params"]) == {"scale", "bias"}
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(4))
    np.testing.assert_array_equal(v["batch_stats"]["stddev"], np.ones(4))
    assert v["batch_stats"]["step"].dtype == jnp.int32 and int(v["batch_stats"]["step"]) == 0
    assert v["batch_stats"]["mean"].dtype == jnp.float32
    v2 = BatchRenorm(use_running_average=False, use_bias=False, use_scale=False).init(jax.random.key(0), X)
    assert "params" not in v2
    layer = make_nnx(use_bias=False, use_scale=False)
    assert layer.scale is None and layer.bias is None
    # The diagnostics are BatchStats too (nnx.split(model, nnx.Param, nnx.BatchStat) covers everything).
    assert set(nnx.state(layer, nnx.BatchStat).keys()) == {"mean", "stddev", "step", "r_clipped", "d_clipped"}


def test_initializers_and_param_dtype():
    module = BatchRenorm(
        use_running_average=False,
        scale_init=nn.initializers.constant(2.0),
        bias_init=nn.initializers.constant(-1.0),
        param_dtype=jnp.bfloat16,
    )
    v = module.init(jax.random.key(0), X)
    assert v["params"]["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(v["params"]["scale"], np.full(4, 2.0))
    np.testing.assert_array_equal(v["params"]["bias"], np.full(4, -1.0))
    assert v["batch_stats"]["mean"].dtype == jnp.float32  # statistics stay at least float32


def test_nan_batch_keeps_moving_statistics_and_advances_step():
    params = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
    stats = {"mean": jnp.arange(4.0), "stddev": jnp.full(4, 2.0), "step": jnp.zeros((), jnp.int32)}
    x = X.at[3, 1].set(jnp.nan)
    y, new, diag = jax.jit(F.train, static_argnums=3)(x, params, F.BatchRenormState(**stats), BatchRenormConfig())
    np.testing.assert_array_equal(new.mean, stats["mean"])
    np.testing.assert_array_equal(new.stddev, stats["stddev"])
    assert int(new.step) == 1 and not bool(diag.finite)
    # and a finite batch afterwards moves them again
    _, newer, diag = F.train(X, params, new, BatchRenormConfig())
    assert bool(diag.finite) and not np.array_equal(newer.mean, new.mean)


def test_offset_data_two_pass_variance_float32():
    """1000 + 0.01 * noise in float32: the default (two-pass) matches the oracle; E[x^2]-E[x]^2 does not."""
    rng = np.random.default_rng(1)
    x = (1000.0 + 0.01 * rng.standard_normal((16, 3))).astype(np.float32)
    p = dict(gamma=None, beta=None, mean=np.full(3, 1000.0), stddev=np.full(3, 0.01))
    ref = oracle(CASES[0].__class__("offset", (16, 3), rmax=1e3, dmax=1e3), 0.5, p)
    y_ref = ref.train(x.astype(np.float64))
    state = F.BatchRenormState(jnp.full(3, 1000.0), jnp.full(3, 0.01), jnp.zeros((), jnp.int32))
    cfg = BatchRenormConfig(momentum=0.5, rmax=1e3, dmax=1e3)
    y, new, _ = F.train(x, None, state, cfg)
    assert_close(y, y_ref, "float32", "value", "y")
    assert_close(new.stddev, ref.stddev, "float32", "value", "stddev")
    # (unclipped, y does not depend on sigma_g; the moving stddev does)
    _, fast, _ = F.train(x, None, state, BatchRenormConfig(momentum=0.5, rmax=1e3, dmax=1e3, use_fast_variance=True))
    assert not np.allclose(fast.stddev, ref.stddev, rtol=1e-2)  # a check that they differ (by over 1%): kept


def test_fast_variance_option_on_centered_data():
    xs, _, _ = make_steps(CASES[0], 0, np.float32)
    state = F.init_state(5)
    y1, s1, _ = F.train(xs[0], None, state, BatchRenormConfig(use_fast_variance=True))
    y2, s2, _ = F.train(xs[0], None, state, BatchRenormConfig())
    assert_close(y1, y2, "float32", "value", "y")
    assert_close(s1.stddev, s2.stddev, "float32", "value", "stddev")


def test_constant_channel_has_finite_gradients():
    x = X.at[:, 2].set(5.0)
    module = BatchRenorm(use_running_average=False, microbatch_size=2)
    v = module.init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = module.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    gp, gx = jax.grad(loss, argnums=(0, 1))(v["params"], x)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves((gp, gx)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_reduced_precision_dtypes(dtype):
    module = BatchRenorm(microbatch_size=4)
    x = X.astype(dtype)
    v = module.init(jax.random.key(0), x, use_running_average=False)
    y, upd = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    assert y.dtype == dtype
    assert upd["batch_stats"]["mean"].dtype == jnp.float32 and upd["batch_stats"]["stddev"].dtype == jnp.float32
    assert module.apply(v, x, use_running_average=True).dtype == dtype
    y32, _ = BatchRenorm(use_running_average=False, microbatch_size=4, dtype=jnp.float32).apply(
        v, x, mutable=["batch_stats"]
    )
    assert y32.dtype == jnp.float32
    layer = make_nnx(dtype=jnp.float32)
    assert layer(x).dtype == jnp.float32 and layer.mean[...].dtype == jnp.float32


def test_diagnostics_sown_and_in_nnx():
    """Tight limits clip: the sown fractions equal the oracle's."""
    case = CASES[0]
    p = make_params(case, 0)
    xs, _, _ = make_steps(case, 0)
    ref = oracle(case.__class__("d", case.shape, rmax=1.05, dmax=0.05), 0.99, p)
    ref.train(xs[0])
    assert 0 < ref.r_clipped and 0 < ref.d_clipped  # the check below is not vacuous
    module = BatchRenorm(use_running_average=False, rmax=1.05, dmax=0.05, param_dtype=jnp.float32)
    params, stats = variables(case, p, jnp.float32)
    _, upd = module.apply(
        {"params": params, "batch_stats": stats},
        jnp.asarray(xs[0], jnp.float32),
        mutable=["batch_stats", "intermediates"],
    )
    # Clip fractions are ratios of counts, not values of the table of docs/SPEC.md section 9.
    assert float(upd["intermediates"]["r_clipped"][0]) == pytest.approx(ref.r_clipped)
    assert float(upd["intermediates"]["d_clipped"][0]) == pytest.approx(ref.d_clipped)
    layer = make_nnx(num_features=5, rmax=1.05, dmax=0.05)
    layer.scale[...], layer.bias[...] = params["scale"], params["bias"]
    layer.mean[...], layer.stddev[...] = stats["mean"], stats["stddev"]
    layer(jnp.asarray(xs[0], jnp.float32))
    assert float(layer.r_clipped[...]) == pytest.approx(ref.r_clipped)
    assert float(layer.d_clipped[...]) == pytest.approx(ref.d_clipped)
    assert isinstance(nnx.state(layer, rnnx.BatchRenormDiagnostic)["r_clipped"], rnnx.BatchRenormDiagnostic)


def test_nnx_train_eval_and_view():
    layer = make_nnx()
    layer(X)
    assert int(layer.step[...]) == 1
    layer.eval()
    assert layer.use_running_average is True
    y = layer(X)
    assert int(layer.step[...]) == 1
    assert_close(y, (X - layer.mean[...]) / layer.stddev[...], "float32", "value", "eval output")
    layer.train()
    layer(X)
    assert int(layer.step[...]) == 2
    view = nnx.view(layer, use_running_average=True)
    view(X)
    assert int(layer.step[...]) == 2


# ------------------------------------------------------- training pattern
def test_optax_training_step_matches_oracle():
    """The usual linen step (jit, mutable batch_stats, optax) moves params and state as the oracle says."""
    case = next(c for c in CASES if c.name == "nhwc_mb2_tight")
    p = make_params(case, 4)
    xs, _, dys = make_steps(case, 4, np.float32)
    module = BatchRenorm(use_running_average=False, momentum=0.9, **case.layer_kwargs())
    params, stats = variables(case, p, jnp.float32)
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, stats, opt_state, x, dy):
        def loss_fn(params):
            y, upd = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return jnp.sum(y * dy), upd["batch_stats"]

        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), new_stats, opt_state

    ref = oracle(case, 0.9, {k: np.asarray(v, np.float32).astype(np.float64) for k, v in p.items()})
    for x, dy in zip(xs[:3], dys[:3]):
        params, stats, opt_state = train_step(params, stats, opt_state, jnp.asarray(x), jnp.asarray(dy))
        ref.train(x.astype(np.float64))
        _, dg, db = ref.backward(dy.astype(np.float64))
        ref.gamma, ref.beta = ref.gamma - 0.1 * dg, ref.beta - 0.1 * db
        assert_close(params["scale"], ref.gamma, "float32", "grad", "scale after the step")
        assert_close(params["bias"], ref.beta, "float32", "grad", "bias after the step")
        assert_close(stats["stddev"], ref.stddev, "float32", "value", "stddev")
    assert int(stats["step"]) == 3


def test_checkpoint_round_trip_continues_identically():
    module = BatchRenorm(use_running_average=False, microbatch_size=2, warmup_steps=1)
    v = module.init(jax.random.key(0), X)
    _, upd = module.apply(v, X, mutable=["batch_stats"])
    v = {"params": v["params"], **upd}
    blob = serialization.to_bytes(v)
    restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, v), blob)
    assert int(restored["batch_stats"]["step"]) == 1
    a, ua = module.apply(v, X * 2 + 1, mutable=["batch_stats"])
    b, ub = module.apply(restored, X * 2 + 1, mutable=["batch_stats"])
    np.testing.assert_array_equal(a, b)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    # the functional state is an ordinary pytree as well
    state = F.BatchRenormState(**upd["batch_stats"])
    back = serialization.from_state_dict(state, serialization.to_state_dict(state))
    jax.tree.map(np.testing.assert_array_equal, back, state)


# -------------------------------------------------- functional transforms
def test_functional_vmap_over_independent_layers():
    """vmap over a stack of independent layers equals running each one."""
    xs = jnp.stack([X, 2 * X + 1, -X])
    states = jax.tree.map(lambda *a: jnp.stack(a), *[F.init_state(4)] * 3)
    params = {"scale": jnp.ones((3, 4)), "bias": jnp.zeros((3, 4))}
    cfg = BatchRenormConfig(microbatch_size=4, momentum=0.5)
    ys, new, diag = jax.vmap(lambda x, p, s: F.train(x, p, s, cfg))(xs, params, states)
    for i in range(3):
        y, s, _ = F.train(xs[i], {"scale": jnp.ones(4), "bias": jnp.zeros(4)}, F.init_state(4), cfg)
        assert_close(ys[i], y, "float32", "value", f"y (layer {i})")
        assert_close(new.stddev[i], s.stddev, "float32", "value", f"stddev (layer {i})")
    assert diag.r_clipped.shape == (3,)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "autodiff"])
def test_functional_vmap_axis_name_pools_like_the_global_batch(explicit, masked, x64):
    """``jax.vmap(..., axis_name=...)`` over 4 replicas, under ``jax.grad``: the oracle on the concatenated batch.

    The explicit backward's ``pmean`` used to read the replica count from the
    axis environment when the gradient was transposed, after ``vmap`` had
    returned (``NameError: unbound axis name``); the count is now read in the
    forward pass. Outputs, pooled state, clip fractions and gradients of x,
    scale and bias, both backwards, with and without a mask that selects
    different numbers of values on each replica.
    """
    from renorm.numpy_ref import BatchRenormReference

    case = Case("pooled", (16, 2, 3), rmax=1.2, dmax=0.3)
    p = make_params(case, 11)
    xs, _, dys = make_steps(case, 11)
    x, dy = jnp.asarray(xs[0]), jnp.asarray(dys[0])
    rng = np.random.default_rng(12)
    mask = rng.random((16, 2, 1)) < np.repeat([0.9, 0.6, 0.3, 0.8], 4)[:, None, None] if masked else None
    params = {"scale": jnp.asarray(p["gamma"]), "bias": jnp.asarray(p["beta"])}
    state = F.BatchRenormState(jnp.asarray(p["mean"]), jnp.asarray(p["stddev"]), jnp.zeros((), jnp.int32))
    cfg = BatchRenormConfig(momentum=0.9, rmax=1.2, dmax=0.3, axis_name="i", explicit_backward=explicit)

    def replica(x, m, params):
        return F.train(x, params, state, cfg, mask=m)

    def loss(x, params):
        xr = x.reshape(4, 4, 2, 3)
        mr = None if mask is None else jnp.asarray(mask).reshape(4, 4, 2, 1)
        y, new_state, diag = jax.vmap(replica, in_axes=(0, 0, None), axis_name="i")(xr, mr, params)
        y = y.reshape(x.shape)
        return jnp.sum(y * dy), (y, new_state, diag)

    (_, (y, new_state, diag)), (dx, dparams) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        x, params
    )
    ref = BatchRenormReference(3, momentum=0.9, epsilon=1e-5, rmax=1.2, dmax=0.3, **p)
    y_ref = ref.train(np.asarray(x), mask=mask)
    dx_ref, dg_ref, db_ref = ref.backward(np.asarray(dy))
    assert_close(y, y_ref, "float64", "value", "y")
    for i in range(4):  # every replica holds the pooled state
        assert_close(new_state.mean[i], ref.mean, "float64", "value", f"mean (replica {i})")
        assert_close(new_state.stddev[i], ref.stddev, "float64", "value", f"stddev (replica {i})")
        assert int(new_state.step[i]) == 1
        assert abs(float(diag.r_clipped[i]) - ref.r_clipped) < 1e-6
        assert abs(float(diag.d_clipped[i]) - ref.d_clipped) < 1e-6
    assert ref.r_clipped > 0 or ref.d_clipped > 0  # the limits are active
    assert_close(dx, dx_ref, "float64", "grad", "dx")
    assert_close(dparams["scale"], dg_ref, "float64", "grad", "dscale")
    assert_close(dparams["bias"], db_ref, "float64", "grad", "dbias")


def test_linen_vmap_axis_name_explicit_backward(x64):
    """The linen module with ``axis_name`` under ``jax.vmap`` and ``jax.grad`` (explicit backward): the oracle."""
    from renorm.numpy_ref import BatchRenormReference

    x = jnp.asarray(np.random.default_rng(3).normal(1.0, 2.0, (16, 3)))
    dy = jnp.asarray(np.random.default_rng(4).normal(size=(16, 3)))
    module = BatchRenorm(use_running_average=False, axis_name="i", rmax=1.2, dmax=0.3, param_dtype=jnp.float64)
    v = module.init(jax.random.key(0), x[:4])

    def loss(params, x):
        def apply(x):
            return module.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])

        y, upd = jax.vmap(apply, axis_name="i")(x.reshape(4, 4, 3))
        return jnp.sum(y.reshape(x.shape) * dy), upd["batch_stats"]

    (dparams, dx), stats = jax.grad(loss, argnums=(0, 1), has_aux=True)(v["params"], x)
    ref = BatchRenormReference(3, momentum=0.99, epsilon=1e-5, rmax=1.2, dmax=0.3)
    ref.train(np.asarray(x))
    dx_ref, dg_ref, db_ref = ref.backward(np.asarray(dy))
    assert_close(stats["mean"][0], ref.mean, "float64", "value", "mean")
    assert_close(stats["stddev"][3], ref.stddev, "float64", "value", "stddev")
    assert_close(dx, dx_ref, "float64", "grad", "dx")
    assert_close(dparams["scale"], dg_ref, "float64", "grad", "dscale")
    assert_close(dparams["bias"], db_ref, "float64", "grad", "dbias")


def test_unclipped_training_output_equals_inference_output():
    """With the moving statistics equal to the batch's and loose limits, train == inference."""
    cfg = BatchRenormConfig(microbatch_size=None)
    xb = X.astype(jnp.float32)
    mu = xb.mean(0)
    sigma = jnp.sqrt(xb.var(0) + cfg.epsilon)
    state = F.BatchRenormState(mu * 0 + 1.0, sigma * 0 + 1.0, jnp.zeros((), jnp.int32))
    params = {"scale": jnp.arange(1.0, 5.0), "bias": jnp.ones(4)}
    state = state._replace(mean=mu + 0.3, stddev=sigma * 1.5)  # r = 1/1.5, d = -0.3/sigma': unclipped
    y_train, _, diag = F.train(xb, params, state, cfg)
    assert float(diag.r_clipped) == 0 and float(diag.d_clipped) == 0
    assert_close(y_train, F.inference(xb, params, state, cfg), "float32", "value", "train vs inference")


def test_forward_mode_with_autodiff_backward():
    """explicit_backward=False supports jax.jvp; its tangent matches the oracle's backward (transposed)."""
    cfg = BatchRenormConfig(explicit_backward=False, microbatch_size=4, rmax=1.1, dmax=0.1)
    state = F.BatchRenormState(jnp.full(4, 2.0), jnp.full(4, 2.5), jnp.zeros((), jnp.int32))
    t = jnp.asarray(np.random.default_rng(5).standard_normal(X.shape), jnp.float32)
    dy = jnp.asarray(np.random.default_rng(6).standard_normal(X.shape), jnp.float32)
    _, jvp_out = jax.jvp(lambda x: F.train(x, None, state, cfg)[0], (X,), (t,))
    explicit = BatchRenormConfig(microbatch_size=4, rmax=1.1, dmax=0.1)
    _, vjp = jax.vjp(lambda x: F.train(x, None, state, explicit)[0], X)
    (dx,) = vjp(dy)
    # <dy, J t> == <J^T dy, t>: the forward tangent agrees with the explicit backward
    assert_close(jnp.vdot(dy, jvp_out), jnp.vdot(dx, t), "float32", "grad", "<dy, J t> vs <J^T dy, t>")


# ------------------------------------------------------- empty batches (issue 11)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(microbatch_size=2), dict(explicit_backward=False), dict(axis=1)],
    ids=["whole", "microbatch", "autodiff", "axis1"],
)
def test_empty_batch_gives_empty_output_and_leaves_state_unchanged(kw):
    """0 examples: empty output, zero gradients, state (moving statistics, step) and diagnostics unchanged."""
    x = jnp.zeros((0, 4, 3)) if kw.get("axis") == 1 else jnp.zeros((0, 3, 4))
    cfg = BatchRenormConfig(**kw)
    params = {"scale": jnp.arange(1.0, 5.0), "bias": jnp.ones(4)}
    state = F.BatchRenormState(jnp.arange(4.0), jnp.full(4, 2.0), jnp.asarray(5, jnp.int32))

    def loss(params, x):
        y, new, diag = F.train(x, params, state, cfg)
        return jnp.sum(y), (y, new, diag)

    (_, (y, new, diag)), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    assert y.shape == x.shape and gx.shape == x.shape
    jax.tree.map(lambda g: np.testing.assert_array_equal(g, np.zeros(4)), gp)
    jax.tree.map(np.testing.assert_array_equal, new, state)
    assert bool(diag.finite) and float(diag.r_clipped) == 0.0 and float(diag.d_clipped) == 0.0
    # linen: batch_stats exactly unchanged, nothing sown
    module = BatchRenorm(use_running_average=False, **kw)
    stats = state._asdict()
    y, upd = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats", "intermediates"])
    assert y.shape == x.shape
    jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], stats)
    assert "r_clipped" not in upd.get("intermediates", {})
    # nnx: statistics, step and diagnostics unchanged
    layer = make_nnx(**kw)
    layer(
        jnp.ones((8, 4, 3)) * jnp.arange(8.0)[:, None, None]
        if kw.get("axis") == 1
        else jnp.ones((8, 3, 4)) * jnp.arange(8.0)[:, None, None]
    )
    before = jax.tree.map(np.array, nnx.state(layer))
    assert layer(x).shape == x.shape
    jax.tree.map(np.testing.assert_array_equal, nnx.state(layer), before)
    assert int(layer.step[...]) == 1


# -------------------------------------------------- overflowing statistics (issue 11)
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize(
    "kw", [dict(), dict(microbatch_size=2), dict(explicit_backward=False)], ids=["whole", "microbatch", "autodiff"]
)
def test_overflowing_statistics_give_nan_output(kw):
    """float32 |x - mean| ~ 1e20 overflows the variance: that feature's output is NaN, as the oracle's."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    x[:, 1] = np.array([1e20, -1e20, 3e20, -2e20], np.float32)
    ref = oracle(
        CASES[0].__class__("overflow", (4, 3), microbatch_size=kw.get("microbatch_size")),
        0.5,
        dict(gamma=None, beta=None, mean=None, stddev=None),
        dtype=np.float32,
    )
    y_ref = ref.train(x)
    assert np.isnan(y_ref[:, 1]).all()
    state = F.init_state(3)
    y, new, diag = F.train(jnp.asarray(x), None, state, BatchRenormConfig(momentum=0.5, **kw))
    assert np.isnan(np.asarray(y)[:, 1]).all(), y
    assert_close(np.asarray(y)[:, [0, 2]], y_ref[:, [0, 2]], "float32", "value", "other features")
    assert not bool(diag.finite)
    jax.tree.map(np.testing.assert_array_equal, new._replace(step=state.step), state)


# ---------------------------------------------------------- num_features (issue 11)
@pytest.mark.parametrize("n,exc", [(0, ValueError), (-1, ValueError), (2.5, TypeError), ("4", TypeError)])
def test_nnx_num_features_is_checked(n, exc):
    with pytest.raises(exc, match=f"num_features={n!r}"):
        rnnx.BatchRenorm(n, rngs=nnx.Rngs(0))


def test_zero_features_input_is_an_error():
    for train in (False, True):
        with pytest.raises(ValueError, match="0 features on axis -1"):
            BatchRenorm(use_running_average=not train).init(jax.random.key(0), jnp.ones((8, 0)))
    with pytest.raises(ValueError, match="0 features on axis -1"):
        F.train(
            jnp.ones((8, 0)), None, F.init_state(1)._replace(mean=jnp.zeros(0), stddev=jnp.ones(0)), BatchRenormConfig()
        )
