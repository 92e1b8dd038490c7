"""Tests that would catch a wrong oracle (renorm.numpy_ref), not just exercise it.

The expected values here come from independent formulas written in the test
(direct batch norm, the paper's identities, finite differences), never from
the oracle's own output.
"""

import itertools

import numpy as np
import pytest
from parity import (
    CASE_IDS,
    CASES,
    assert_close,
    make_masks,
    make_params,
    make_steps,
    rel_err,
)

import renorm.numpy_ref.core as core
from renorm.numpy_ref import BatchRenormReference, inference_forward, train_backward, train_forward

EPS = 1e-3


def _fwd(x, p, case, rmax=None, dmax=None, momentum=0.9, epsilon=EPS):
    return train_forward(
        x,
        p["gamma"],
        p["beta"],
        p["mean"],
        p["stddev"],
        rmax=case.rmax if rmax is None else rmax,
        dmax=case.dmax if dmax is None else dmax,
        momentum=momentum,
        epsilon=epsilon,
        axis=case.axis,
        microbatch_size=case.microbatch_size,
    )


def _per_feature_sum(a, axis):
    ax = axis % a.ndim
    return a.sum(axis=tuple(i for i in range(a.ndim) if i != ax))


def _groups(a, case):
    """Split along the batch axis into the case's normalization groups."""
    k = a.shape[0] if case.microbatch_size is None else case.microbatch_size
    return [a[i : i + k] for i in range(0, a.shape[0], k)]


# --------------------------------------------------------------------------- backward vs finite differences
FD_CASES = [
    c
    for c in CASES
    if c.name
    in {
        "dense",
        "dense_mb2",
        "dense_mb4_tight",
        "nhwc",
        "nhwc_mb2_tight",
        "nchw_axis1",
        "nchw_axis1_mb2",
        "seq_axis1",
        "loose",
        "no_center",
    }
]


def _fd(f, v, h=1e-3):
    """Fourth-order central differences of the scalar ``f`` at ``v``: truncation O(h^4) ~ 1e-12, round-off ~ 1e-13."""
    g = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
        e = np.zeros_like(v)
        e[idx] = h
        g[idx] = (8 * (f(v + e) - f(v - e)) - (f(v + 2 * e) - f(v - 2 * e))) / (12 * h)
    return g


@pytest.mark.parametrize("case", FD_CASES, ids=[c.name for c in FD_CASES])
def test_backward_matches_central_finite_differences(case, monkeypatch):
    """dL/dx, dL/dgamma, dL/dbeta of L = sum(y * dy), with r and d held constant (stop-gradient)."""
    xs, _, dys = make_steps(case, seed=1)
    x, dy = xs[0], dys[0]
    p = make_params(case, seed=1)
    res = _fwd(x, p, case)
    dx, dgamma, dbeta = train_backward(dy, res.cache)
    # The clip is active in the tight cases, inactive in the loose ones: both are covered.
    if "tight" in case.name:
        assert res.r_clipped > 0 or res.d_clipped > 0
    if case.name == "loose":
        assert res.r_clipped == 0 and res.d_clipped == 0

    # Freeze r and d at this step's values: the paper treats them as constants.
    frozen = (res.r, res.d)
    monkeypatch.setattr(core, "corrections", lambda *a, **k: (*frozen, 0.0, 0.0))

    def loss(x_, gamma_=p["gamma"], beta_=p["beta"]):
        q = dict(p, gamma=gamma_, beta=beta_)
        return float(np.sum(_fwd(x_, q, case).y * dy))

    assert rel_err(dx, _fd(loss, x)) < 1e-7
    assert rel_err(dgamma, _fd(lambda g_: loss(x, gamma_=g_), p["gamma"])) < 1e-7
    if case.center:
        assert rel_err(dbeta, _fd(lambda b_: loss(x, beta_=b_), p["beta"])) < 1e-7


# --------------------------------------------------------------------------- rmax=1, dmax=0 is batch norm
def _batch_norm(x, dy, gamma, beta, case, epsilon):
    """Textbook batch norm per group, forward and backward, written independently."""
    ax = case.axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shp = [1] * x.ndim
    shp[ax] = -1
    gamma = np.ones(x.shape[ax]) if gamma is None else gamma
    beta = np.zeros(x.shape[ax]) if beta is None else beta
    ys, dxs = [], []
    for xg, dyg in zip(_groups(x, case), _groups(dy, case)):
        m = xg.size // xg.shape[ax]
        mu = xg.mean(axis=red, keepdims=True)
        var = ((xg - mu) ** 2).mean(axis=red, keepdims=True)
        inv = 1.0 / np.sqrt(var + epsilon)
        xhat = (xg - mu) * inv
        ys.append(gamma.reshape(shp) * xhat + beta.reshape(shp))
        dxhat = dyg * gamma.reshape(shp)
        dxs.append(
            inv
            / m
            * (m * dxhat - dxhat.sum(axis=red, keepdims=True) - xhat * (dxhat * xhat).sum(axis=red, keepdims=True))
        )
    return np.concatenate(ys), np.concatenate(dxs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rmax1_dmax0_is_batch_norm(case):
    xs, _, dys = make_steps(case, seed=2)
    p = make_params(case, seed=2)
    res = _fwd(xs[0], p, case, rmax=1.0, dmax=0.0)
    dx, dgamma, dbeta = train_backward(dys[0], res.cache)
    y_bn, dx_bn = _batch_norm(xs[0], dys[0], p["gamma"], p["beta"], case, EPS)
    assert_close(res.y, y_bn, what="y")
    assert_close(dx, dx_bn, kind="grad", what="dx")
    # dgamma of batch norm: sum(dy * xhat_bn), xhat_bn = (y_bn - beta) / gamma.
    gamma = p["gamma"] if case.scale else 1.0
    beta = p["beta"] if case.center else 0.0
    shp = [1] * xs[0].ndim
    shp[case.axis] = -1
    xhat_bn = (y_bn - np.reshape(beta, shp if np.ndim(beta) else ())) / np.reshape(gamma, shp if np.ndim(gamma) else ())
    assert_close(dgamma, _per_feature_sum(dys[0] * xhat_bn, case.axis), kind="grad", what="dgamma")
    assert_close(dbeta, _per_feature_sum(dys[0], case.axis), kind="grad", what="dbeta")


# --------------------------------------------------------------------------- the paper's identity
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unclipped_training_output_equals_inference_output(case):
    """With r = sigma_B/sigma and d = (mu_B - mu)/sigma unclipped, training output == inference output."""
    xs, _, _ = make_steps(case, seed=3)
    p = make_params(case, seed=3)
    res = _fwd(xs[0], p, case, rmax=1e6, dmax=1e6)
    assert res.r_clipped == 0.0 and res.d_clipped == 0.0
    y_inf = inference_forward(xs[0], p["gamma"], p["beta"], p["mean"], p["stddev"], axis=case.axis)
    assert_close(res.y, y_inf, what="train vs inference")


def test_inference_is_per_example_and_uses_moving_statistics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3))
    gamma, beta = np.array([1.0, 2.0, 0.5]), np.array([0.0, -1.0, 3.0])
    mean, std = np.array([0.1, -0.2, 0.3]), np.array([1.5, 0.5, 2.0])
    y = inference_forward(x, gamma, beta, mean, std)
    np.testing.assert_allclose(y, gamma * (x - mean) / std + beta, rtol=1e-14)
    np.testing.assert_allclose(inference_forward(x[2:3], gamma, beta, mean, std), y[2:3], rtol=1e-14)


# --------------------------------------------------------------------------- null space of the gradient
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradient_null_space_per_group(case):
    """Per group and feature: sum(dx) = 0 and sum(dx * (x - mu_g)) = r*eps/sigma^3 * sum(g * (x - mu_g)).

    A first draft of the spec stated sum(dx * x) = 0; that holds exactly only for epsilon = 0
    (docs/SPEC.md, sections 6 and 13).
    With epsilon > 0 the remainder is the term above (tested exactly), and with
    a tiny epsilon it vanishes (tested too).
    """
    xs, _, dys = make_steps(case, seed=4)
    p = make_params(case, seed=4)
    for eps in (EPS, 1e-14):
        res = _fwd(xs[0], p, case, epsilon=eps)
        dx, _, _ = train_backward(dys[0], res.cache)
        gamma = np.ones(case.num_features) if p["gamma"] is None else p["gamma"]
        shp = [1] * xs[0].ndim
        shp[case.axis] = -1
        for gi, (xg, dxg, dyg) in enumerate(zip(_groups(xs[0], case), _groups(dx, case), _groups(dys[0], case))):
            sigma, r = res.sigma_g[gi], res.r[gi]
            # The size of dx's leading term g * r / sigma sets the scale of round-off.
            term = np.abs(dyg * (gamma * r / sigma).reshape(shp))
            s = _per_feature_sum(dxg, case.axis)
            assert np.max(np.abs(s)) < 1e-12 * term.sum()
            xc = xg - _per_feature_sum(xg, case.axis).reshape(shp) / (xg.size / case.num_features)
            lhs = _per_feature_sum(dxg * xc, case.axis)
            rhs = r * eps / sigma**3 * _per_feature_sum(dyg * gamma.reshape(shp) * xc, case.axis)
            assert np.max(np.abs(lhs - rhs)) < 1e-12 * (term * np.abs(xc)).sum()
            if eps < 1e-10:
                assert np.max(np.abs(_per_feature_sum(dxg * xg, case.axis))) < 1e-10 * (term * np.abs(xg)).sum()


# --------------------------------------------------------------------------- micro-batches
@pytest.mark.parametrize("case", [c for c in CASES if c.microbatch_size], ids=lambda c: c.name)
def test_microbatches_equal_groups_run_one_by_one(case):
    xs, _, dys = make_steps(case, seed=5)
    p = make_params(case, seed=5)
    momentum = 0.7
    res = _fwd(xs[0], p, case, momentum=momentum)
    dx, dgamma, dbeta = train_backward(dys[0], res.cache)
    whole = dict(axis=case.axis, microbatch_size=None)
    parts = []
    for xg, dyg in zip(_groups(xs[0], case), _groups(dys[0], case)):
        rg = train_forward(
            xg,
            p["gamma"],
            p["beta"],
            p["mean"],
            p["stddev"],
            rmax=case.rmax,
            dmax=case.dmax,
            momentum=momentum,
            epsilon=EPS,
            **whole,
        )
        parts.append((rg, train_backward(dyg, rg.cache)))
    assert_close(res.y, np.concatenate([r.y for r, _ in parts]), what="y")
    assert_close(dx, np.concatenate([g[0] for _, g in parts]), kind="grad", what="dx")
    assert_close(dgamma, sum(g[1] for _, g in parts), kind="grad", what="dgamma")
    assert_close(dbeta, sum(g[2] for _, g in parts), kind="grad", what="dbeta")
    # Each group alone moves the state by alpha * (its statistic - state); the
    # micro-batch update uses the mean over groups, i.e. the mean of those.
    assert_close(res.mean, np.mean([r.mean for r, _ in parts], axis=0), what="mean")
    assert_close(res.stddev, np.mean([r.stddev for r, _ in parts], axis=0), what="stddev")


def test_moving_statistics_update_exactly():
    """mean <- mean + (1 - momentum) * (batch mean - mean), likewise stddev; sigma_B includes epsilon."""
    rng = np.random.default_rng(6)
    x = rng.normal(3.0, 2.0, (10, 4))
    mean, std = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    res = train_forward(x, None, None, mean, std, rmax=3, dmax=5, momentum=0.9, epsilon=0.01)
    mu_b = x.mean(axis=0)
    sigma_b = np.sqrt(((x - mu_b) ** 2).mean(axis=0) + 0.01)
    np.testing.assert_allclose(res.mean, mean + 0.1 * (mu_b - mean), rtol=1e-13)
    np.testing.assert_allclose(res.stddev, std + 0.1 * (sigma_b - std), rtol=1e-13)
    # momentum = 0: the state becomes the batch statistics.
    res0 = train_forward(x, None, None, mean, std, rmax=3, dmax=5, momentum=0.0, epsilon=0.01)
    np.testing.assert_allclose(res0.stddev, sigma_b, rtol=1e-13)


def test_corrections_and_clip_fractions():
    """r, d and the fraction clipped, against values computed by hand."""
    # One feature, two groups of 2: group 0 = [0, 2] (mu 1, var 1), group 1 = [10, 10] (mu 10, var 0).
    x = np.array([[0.0], [2.0], [10.0], [10.0]])
    eps = 1e-12
    res = train_forward(
        x,
        None,
        None,
        np.array([0.0]),
        np.array([2.0]),
        rmax=1.5,
        dmax=1.0,
        momentum=0.5,
        epsilon=eps,
        microbatch_size=2,
    )
    # sigma_g = [1, ~0]; r_raw = [0.5, ~0] -> clipped to 1/1.5 both; d_raw = [0.5, 5] -> [0.5, 1].
    np.testing.assert_allclose(res.r[:, 0], [1 / 1.5, 1 / 1.5])
    np.testing.assert_allclose(res.d[:, 0], [0.5, 1.0])
    assert res.r_clipped == 1.0 and res.d_clipped == 0.5
    np.testing.assert_allclose(res.y[:2, 0], [(-1.0) / 1 * (1 / 1.5) + 0.5, 1.0 / 1 * (1 / 1.5) + 0.5])
    np.testing.assert_allclose(res.y[2:, 0], [1.0, 1.0])


# --------------------------------------------------------------------------- numerics
def test_variance_is_stable_on_offset_float32_data():
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((256, 3))
    x = (1000.0 + 0.01 * noise).astype(np.float32)
    res = train_forward(
        x,
        None,
        None,
        np.full(3, 1000.0, np.float32),
        np.full(3, 0.01, np.float32),
        rmax=1e6,
        dmax=1e6,
        momentum=0.5,
        epsilon=1e-9,
    )
    sigma64 = np.sqrt(x.astype(np.float64).var(axis=0) + 1e-9)
    # E[x^2] - E[x]^2 in float32 gives 0 here (sigma = sqrt(eps) ~ 3e-5): the two-pass one is right.
    np.testing.assert_allclose(res.sigma_g[0], sigma64, rtol=1e-3)
    np.testing.assert_allclose(res.r[0], sigma64 / 0.01, rtol=1e-3)


def test_constant_channel_gives_finite_gradients():
    x = np.ones((4, 2))
    x[:, 1] = [1.0, 2.0, 3.0, 4.0]
    res = train_forward(
        x, None, None, np.zeros(2), np.ones(2), rmax=3, dmax=5, momentum=0.9, epsilon=1e-3, microbatch_size=2
    )
    np.testing.assert_allclose(res.sigma_g[:, 0], np.sqrt(1e-3))
    dx, dg, db = train_backward(np.random.default_rng(0).standard_normal((4, 2)), res.cache)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dg)) and np.all(np.isfinite(db))
    np.testing.assert_allclose(res.y[:, 0], res.d[0, 0])  # xhat = 0 * r + d on a constant channel


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_reduced_precision_input_computes_in_float32(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes") if dtype == "bfloat16" else None
    dt = np.dtype(ml_dtypes.bfloat16) if ml_dtypes else np.dtype(dtype)
    rng = np.random.default_rng(8)
    x64 = rng.normal(2.0, 3.0, (8, 3))
    x = x64.astype(dt)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    res = train_forward(x, None, None, mean, std, rmax=3, dmax=5, momentum=0.9, epsilon=1e-3)
    assert res.y.dtype == dt and res.mean.dtype == np.float32 and res.sigma_g.dtype == np.float32
    ref = train_forward(
        x.astype(np.float64),
        None,
        None,
        mean.astype(np.float64),
        std.astype(np.float64),
        rmax=3,
        dmax=5,
        momentum=0.9,
        epsilon=1e-3,
    )
    assert_close(res.y, ref.y, dtype="bfloat16" if dtype == "bfloat16" else dtype)
    assert_close(res.stddev, ref.stddev, dtype="float32")


# --------------------------------------------------------------------------- NaN rule and the stateful wrapper
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_non_finite_batch_leaves_state_unchanged_but_step_advances():
    layer = BatchRenormReference(3, momentum=0.9, epsilon=1e-3, mean=[1.0, 2.0, 3.0], stddev=[1.0, 2.0, 0.5])
    x = np.random.default_rng(9).standard_normal((4, 3))
    x[1, 2] = np.nan
    layer.train(x)
    assert layer.step == 1 and layer.last.finite is False
    np.testing.assert_array_equal(layer.mean, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(layer.stddev, [1.0, 2.0, 0.5])
    x[1, 2] = np.inf
    layer.train(x)
    assert layer.step == 2
    np.testing.assert_array_equal(layer.stddev, [1.0, 2.0, 0.5])
    layer.train(np.nan_to_num(x, posinf=0.0))
    assert layer.step == 3 and layer.last.finite and not np.array_equal(layer.mean, [1.0, 2.0, 3.0])


def test_reference_layer_follows_schedule_over_steps():
    """The wrapper evaluates the schedule at its own step counter before each step."""
    layer = BatchRenormReference(
        2, momentum=0.99, epsilon=1e-3, rmax=3.0, dmax=2.0, warmup_steps=2, rmax_steps=6, dmax_steps=4
    )
    seen = []
    rng = np.random.default_rng(10)
    for _ in range(8):
        seen.append(layer.limits())
        layer.train(rng.normal(5.0, 4.0, (6, 2)))
    # t: 0 1 | 2 3 4 5 6 7 ; rmax ramps 2->6 from 1 to 3, dmax 2->4 from 0 to 2.
    expected = [(1, 0), (1, 0), (1, 0), (1.5, 1), (2, 2), (2.5, 2), (3, 2), (3, 2)]
    np.testing.assert_allclose(seen, expected)
    with pytest.raises(RuntimeError, match="train"):
        BatchRenormReference(2, momentum=0.9, epsilon=1e-3).backward(np.zeros((2, 2)))


def test_reference_layer_sequence_matches_functional_calls():
    case = next(c for c in CASES if c.name == "schedule")
    xs, x_eval, dys = make_steps(case, seed=11)
    p = make_params(case, seed=11)
    layer = BatchRenormReference(case.num_features, momentum=0.9, epsilon=EPS, **case.layer_kwargs(), **p)
    mean, std = p["mean"], p["stddev"]
    for t, (x, dy) in enumerate(zip(xs, dys)):
        y = layer.train(x)
        rmax, dmax = case.rmax, case.dmax
        # schedule by hand: warmup 2, rmax ramps to step 5, dmax to step 4.
        ramp_r = min(max((t - 2) / 3, 0), 1) if t >= 2 else 0
        ramp_d = min(max((t - 2) / 2, 0), 1) if t >= 2 else 0
        res = train_forward(
            x,
            p["gamma"],
            p["beta"],
            mean,
            std,
            rmax=1 + (rmax - 1) * ramp_r,
            dmax=dmax * ramp_d,
            momentum=0.9,
            epsilon=EPS,
            axis=case.axis,
            microbatch_size=case.microbatch_size,
        )
        np.testing.assert_array_equal(y, res.y)
        np.testing.assert_array_equal(layer.backward(dy)[0], train_backward(dy, res.cache)[0])
        mean, std = res.mean, res.stddev
    assert layer.step == case.steps
    np.testing.assert_array_equal(
        layer.infer(x_eval), inference_forward(x_eval, p["gamma"], p["beta"], mean, std, axis=case.axis)
    )


def test_center_and_scale_off():
    layer = BatchRenormReference(3, momentum=0.9, epsilon=1e-3, center=False, scale=False)
    x = np.random.default_rng(12).standard_normal((4, 3))
    layer.train(x)
    dx, dgamma, dbeta = layer.backward(np.ones((4, 3)))
    assert dgamma is None and dbeta is None and dx.shape == x.shape
    assert layer.gamma is None and layer.beta is None


# --------------------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    "shape, kwargs, exc, match",
    [
        ((6, 3), dict(microbatch_size=4), ValueError, r"batch of 6 examples and microbatch_size=4"),
        ((4, 3), dict(microbatch_size=1), ValueError, r"at least 2 values per feature.*holds 1"),
        ((1, 3), dict(), ValueError, r"at least 2 values per feature.*batch holds 1"),
        ((4,), dict(), ValueError, r"rank >= 2.*\(4,\)"),
        ((4, 3), dict(axis=2), ValueError, r"axis.*out of range.*axis=2"),
        ((4, 3), dict(axis=0), ValueError, r"batch axis 0.*axis=0"),
        ((4, 3), dict(axis=-2), ValueError, r"batch axis 0.*axis=-2"),
        ((4, 3), dict(axis=(1,)), TypeError, r"axis=\(1,\)"),
        ((4, 5), dict(), ValueError, r"5 features on axis -1 but the layer was built for 3"),
    ],
)
def test_input_errors(shape, kwargs, exc, match):
    x = np.zeros(shape)
    with pytest.raises(exc, match=match):
        train_forward(x, None, None, np.zeros(3), np.ones(3), rmax=3, dmax=5, momentum=0.9, epsilon=1e-3, **kwargs)


def test_non_floating_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point input.*int64"):
        train_forward(
            np.zeros((4, 3), np.int64), None, None, np.zeros(3), np.ones(3), rmax=3, dmax=5, momentum=0.9, epsilon=1e-3
        )
    with pytest.raises(TypeError, match="int32"):
        inference_forward(np.zeros((4, 3), np.int32), None, None, np.zeros(3), np.ones(3))


def test_inference_allows_any_batch():
    """Group checks are for training: inference works on a single example and any batch size."""
    y = inference_forward(np.ones((1, 3)), None, None, np.zeros(3), np.full(3, 2.0))
    np.testing.assert_allclose(y, np.full((1, 3), 0.5))


@pytest.mark.parametrize("axis, microbatch", list(itertools.product([-1, 1], [None, 2])))
def test_output_dtype_and_shape_follow_input(axis, microbatch):
    x = np.random.default_rng(13).standard_normal((4, 3, 5)).astype(np.float32)
    c = x.shape[axis]
    res = train_forward(
        x,
        None,
        None,
        np.zeros(c, np.float32),
        np.ones(c, np.float32),
        rmax=3,
        dmax=5,
        momentum=0.9,
        epsilon=1e-3,
        axis=axis,
        microbatch_size=microbatch,
    )
    assert res.y.shape == x.shape and res.y.dtype == np.float32 and res.mean.shape == (c,)
    g = 1 if microbatch is None else 2
    assert res.mu_g.shape == (g, c)


# --------------------------------------------------------------------------- empty batches, overflow, 0 features
@pytest.mark.parametrize(
    "shape, axis, microbatch", [((0, 3), -1, None), ((0, 3), -1, 2), ((0, 3, 2), 1, None), ((0, 2, 3), -1, 1)]
)
def test_empty_batch_gives_empty_output_and_leaves_state_unchanged(shape, axis, microbatch):
    """A batch of 0 examples (one replica's share of a short last batch) is a no-op, not an error or NaN state."""
    c = shape[axis]
    mean, std = np.arange(1.0, c + 1.0), np.full(c, 2.0)
    x = np.zeros(shape)
    res = train_forward(
        x,
        np.ones(c),
        np.zeros(c),
        mean,
        std,
        rmax=3,
        dmax=5,
        momentum=0.5,
        epsilon=EPS,
        axis=axis,
        microbatch_size=microbatch,
    )
    assert res.y.shape == shape and res.y.dtype == x.dtype
    np.testing.assert_array_equal(res.mean, mean)
    np.testing.assert_array_equal(res.stddev, std)
    assert res.finite and res.r_clipped == 0.0 and res.d_clipped == 0.0 and res.mu_g.shape == (0, c)
    dx, dgamma, dbeta = train_backward(np.zeros(shape), res.cache)
    assert dx.shape == shape
    np.testing.assert_array_equal(dgamma, np.zeros(c))
    np.testing.assert_array_equal(dbeta, np.zeros(c))
    # The stateful wrapper: moving statistics, step and diagnostics exactly unchanged.
    layer = BatchRenormReference(
        c, momentum=0.5, epsilon=EPS, axis=axis, microbatch_size=microbatch, mean=mean, stddev=std, rmax=1.01, dmax=0.01
    )
    full = np.random.default_rng(3).normal(3.0, 5.0, (4,) + shape[1:])
    layer.train(full)
    before = layer.state, layer.r_clipped, layer.d_clipped
    assert before[1] > 0
    assert layer.train(x).shape == shape
    after = layer.state, layer.r_clipped, layer.d_clipped
    assert after[0]["step"] == before[0]["step"] == 1 and after[1:] == before[1:]
    np.testing.assert_array_equal(after[0]["mean"], before[0]["mean"])
    np.testing.assert_array_equal(after[0]["stddev"], before[0]["stddev"])


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("microbatch", [None, 2])
def test_overflowing_statistics_give_nan_output_not_a_constant(microbatch):
    """float32 |x - mean| ~ 1e20: the variance overflows; the feature's output is NaN, never a finite constant."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    x[:, 1] = np.array([1e20, -1e20, 3e20, -2e20], np.float32)
    res = train_forward(
        x,
        None,
        None,
        np.zeros(3, np.float32),
        np.ones(3, np.float32),
        rmax=3,
        dmax=5,
        momentum=0.5,
        epsilon=EPS,
        microbatch_size=microbatch,
    )
    assert np.isnan(res.y[:, 1]).all()
    assert np.isfinite(res.y[:, [0, 2]]).all()
    assert not res.finite
    np.testing.assert_array_equal(res.mean, np.zeros(3))
    np.testing.assert_array_equal(res.stddev, np.ones(3))
    # The other features are what they are without the overflowing one.
    sub = train_forward(
        x[:, [0, 2]],
        None,
        None,
        np.zeros(2, np.float32),
        np.ones(2, np.float32),
        rmax=3,
        dmax=5,
        momentum=0.5,
        epsilon=EPS,
        microbatch_size=microbatch,
    )
    np.testing.assert_array_equal(res.y[:, [0, 2]], sub.y)


def test_zero_features_is_an_error():
    with pytest.raises(ValueError, match="num_features=0"):
        BatchRenormReference(0, momentum=0.9, epsilon=EPS)
    with pytest.raises(TypeError, match="num_features=2.5"):
        BatchRenormReference(2.5, momentum=0.9, epsilon=EPS)
    with pytest.raises(ValueError, match="0 features on axis -1"):
        train_forward(np.zeros((4, 0)), None, None, np.zeros(0), np.ones(0), rmax=3, dmax=5, momentum=0.9, epsilon=EPS)
    with pytest.raises(ValueError, match="0 features on axis 1"):
        inference_forward(np.zeros((4, 0, 2)), None, None, np.zeros(0), np.ones(0), axis=1)


# --------------------------------------------------------------------------- masks (docs/SPEC.md, section 3)
def _masked_fwd(x, p, case, mask, **kw):
    return train_forward(
        x,
        p["gamma"],
        p["beta"],
        p["mean"],
        p["stddev"],
        rmax=kw.get("rmax", case.rmax),
        dmax=kw.get("dmax", case.dmax),
        momentum=0.5,
        epsilon=EPS,
        axis=case.axis,
        microbatch_size=kw.get("microbatch_size", case.microbatch_size),
        mask=mask,
    )


def test_mask_statistics_are_those_of_the_selected_examples():
    """Selecting 3 of the 4 examples of every micro-batch = the oracle on those 12 examples, micro-batches of 3."""
    rng = np.random.default_rng(20)
    case = next(c for c in CASES if c.name == "nhwc_mb2_tight")
    x = rng.normal(1.0, 2.0, (16, 2, 3, 3))
    p = make_params(case, 20)
    keep = np.ones(16, bool)
    keep[[1, 4, 10, 15]] = False  # one example of each group of 4
    mask = np.broadcast_to(keep[:, None, None, None], x.shape[:3] + (1,))
    res = _masked_fwd(x, p, case, mask, microbatch_size=4)
    sub = _masked_fwd(x[keep], p, case, None, microbatch_size=3)
    for name in ("mu_g", "sigma_g", "r", "d", "mean", "stddev"):
        np.testing.assert_allclose(getattr(res, name), getattr(sub, name), rtol=1e-13, atol=1e-13, err_msg=name)
    assert (res.r_clipped, res.d_clipped) == (sub.r_clipped, sub.d_clipped) and res.r_clipped > 0
    np.testing.assert_allclose(res.y[keep], sub.y, rtol=1e-12, atol=1e-12)
    # The unselected examples are normalized with the same statistics.
    g = np.arange(16)[~keep] // 4
    y = (
        p["gamma"]
        * (
            (x[~keep] - res.mu_g[g, None, None]) / res.sigma_g[g, None, None] * res.r[g, None, None]
            + res.d[g, None, None]
        )
        + p["beta"]
    )
    np.testing.assert_allclose(res.y[~keep], y, rtol=1e-12)
    np.testing.assert_array_equal(res.count, np.full((4, 3), 3 * 6))


def test_per_feature_mask_statistics_written_out():
    """A mask that differs per feature (Flax allows one): each feature's moments over its own selection."""
    rng = np.random.default_rng(21)
    x = rng.normal(-2.0, 3.0, (8, 5, 3))
    mask = rng.random(x.shape) < 0.6
    mask[4:, :, 2] = False  # feature 2 has nothing selected in the second micro-batch
    p = dict(
        gamma=rng.uniform(0.5, 1.5, 3),
        beta=rng.normal(size=3),
        mean=rng.normal(size=3),
        stddev=rng.uniform(0.5, 2.0, 3),
    )
    res = train_forward(
        x,
        p["gamma"],
        p["beta"],
        p["mean"],
        p["stddev"],
        rmax=1.5,
        dmax=0.5,
        momentum=0.75,
        epsilon=EPS,
        microbatch_size=4,
        mask=mask,
    )
    mus, sigmas = np.zeros((2, 3)), np.zeros((2, 3))
    for g in range(2):
        for c in range(3):
            sel = x[4 * g : 4 * g + 4, :, c][mask[4 * g : 4 * g + 4, :, c]]
            if sel.size == 0:
                mus[g, c], sigmas[g, c] = p["mean"][c], p["stddev"][c]  # no statistic: the moving ones
            else:
                mus[g, c], sigmas[g, c] = sel.mean(), np.sqrt(sel.var() + EPS)
            xg = x[4 * g : 4 * g + 4, :, c]
            r = np.clip(sigmas[g, c] / p["stddev"][c], 1 / 1.5, 1.5)
            d = np.clip((mus[g, c] - p["mean"][c]) / p["stddev"][c], -0.5, 0.5)
            y = p["gamma"][c] * ((xg - mus[g, c]) / sigmas[g, c] * r + d) + p["beta"][c]
            np.testing.assert_allclose(res.y[4 * g : 4 * g + 4, :, c], y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.mu_g, mus, rtol=1e-13)
    np.testing.assert_allclose(res.sigma_g, sigmas, rtol=1e-13)
    # Feature 2 moves towards its first micro-batch only; the others towards the mean over both.
    expected_mean = p["mean"] + 0.25 * (np.array([mus[:, 0].mean(), mus[:, 1].mean(), mus[0, 2]]) - p["mean"])
    expected_std = p["stddev"] + 0.25 * (
        np.array([sigmas[:, 0].mean(), sigmas[:, 1].mean(), sigmas[0, 2]]) - p["stddev"]
    )
    np.testing.assert_allclose(res.mean, expected_mean, rtol=1e-13)
    np.testing.assert_allclose(res.stddev, expected_std, rtol=1e-13)
    # Fractions over the 5 (group, feature) entries that have a statistic.
    r_raw = sigmas / p["stddev"]
    out = (r_raw < 1 / 1.5) | (r_raw > 1.5)
    out[1, 2] = False
    assert res.r_clipped == out.sum() / 5


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.name in ("dense", "nchw_axis1_mb2", "seq_axis1")],
    ids=["dense", "nchw_axis1_mb2", "seq_axis1"],
)
def test_all_true_mask_is_no_mask(case):
    xs, _, dys = make_steps(case, seed=22)
    p = make_params(case, 22)
    a = _masked_fwd(xs[0], p, case, np.ones(xs[0].shape, bool))
    b = _masked_fwd(xs[0], p, case, None)
    for name in ("y", "mean", "stddev", "mu_g", "sigma_g"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-14, atol=1e-14, err_msg=name)
    np.testing.assert_allclose(
        train_backward(dys[0], a.cache)[0], train_backward(dys[0], b.cache)[0], rtol=1e-12, atol=1e-13
    )


def test_all_masked_group_contributes_nothing():
    """A micro-batch with no selected value: inference output there, and the state of the other groups alone."""
    rng = np.random.default_rng(23)
    case = next(c for c in CASES if c.name == "dense_mb4_tight")
    x = rng.normal(2.0, 3.0, (16, 3))
    p = make_params(case, 23)
    mask = np.ones((16, 1), bool)
    mask[4:8] = False
    res = _masked_fwd(x, p, case, mask)
    others = np.r_[0:4, 8:16]
    sub = _masked_fwd(x[others], p, case, None)
    np.testing.assert_allclose(res.mean, sub.mean, rtol=1e-14)
    np.testing.assert_allclose(res.stddev, sub.stddev, rtol=1e-14)
    np.testing.assert_allclose(res.y[others], sub.y, rtol=1e-13)
    assert (res.r_clipped, res.d_clipped) == (sub.r_clipped, sub.d_clipped)
    np.testing.assert_allclose(
        res.y[4:8], inference_forward(x[4:8], p["gamma"], p["beta"], p["mean"], p["stddev"]), rtol=1e-13
    )
    np.testing.assert_array_equal(res.r[1], np.ones(3))
    np.testing.assert_array_equal(res.d[1], np.zeros(3))


def test_mask_selecting_nothing_is_no_step():
    """Like an empty batch: the inference output, and the state, step and diagnostics unchanged."""
    rng = np.random.default_rng(24)
    layer = BatchRenormReference(3, momentum=0.5, epsilon=EPS, rmax=1.01, dmax=0.01, microbatch_size=2)
    layer.train(rng.normal(3.0, 5.0, (4, 2, 3)))
    before = layer.state, layer.r_clipped, layer.d_clipped
    x = rng.normal(size=(4, 2, 3))
    y = layer.train(x, mask=np.zeros((4, 2, 1)))
    after = layer.state, layer.r_clipped, layer.d_clipped
    assert after[0]["step"] == 1 and after[1:] == before[1:]
    np.testing.assert_array_equal(after[0]["mean"], before[0]["mean"])
    np.testing.assert_array_equal(after[0]["stddev"], before[0]["stddev"])
    np.testing.assert_allclose(y, layer.infer(x), rtol=1e-14)
    dx = layer.backward(np.ones_like(x))[0]  # the inference gradient: dy * gamma / stddev
    np.testing.assert_allclose(dx, np.broadcast_to(1.0 / layer.stddev, x.shape), rtol=1e-14)


def test_unselected_non_finite_values_do_not_enter_the_statistics():
    """Padding holding NaN or Inf, masked out: the statistics and the state are those of the rest."""
    rng = np.random.default_rng(25)
    case = next(c for c in CASES if c.name == "dense")
    x = rng.normal(size=(8, 5))
    p = make_params(case, 25)
    mask = np.ones((8, 1), bool)
    mask[[2, 6]] = False
    bad = x.copy()
    bad[2], bad[6] = np.nan, np.inf
    res = _masked_fwd(bad, p, case, mask)
    sub = _masked_fwd(x[mask[:, 0]], p, case, None)
    assert res.finite
    np.testing.assert_allclose(res.mean, sub.mean, rtol=1e-14)
    np.testing.assert_allclose(res.stddev, sub.stddev, rtol=1e-14)
    np.testing.assert_allclose(res.y[mask[:, 0]], sub.y, rtol=1e-13)


@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize("name", ["dense_mb4_tight", "nchw_axis1_mb2", "seq_axis1"])
def test_masked_backward_matches_central_finite_differences(name, per_feature, monkeypatch):
    """The masked explicit backward (statistics terms on the selected values only) against finite differences.

    Step 2's mask leaves one group without a selected value where there are several groups.
    """
    case = next(c for c in CASES if c.name == name)
    xs, _, dys = make_steps(case, seed=26)
    x, dy = xs[0], dys[0]
    mask = make_masks(case, 26, per_feature)[2]
    p = make_params(case, seed=26)
    res = _masked_fwd(x, p, case, mask)
    assert 0 < res.count.sum() < res.count.size * res.cache.xc.shape[1]
    dx, dgamma, dbeta = train_backward(dy, res.cache)
    frozen = (res.r, res.d)
    monkeypatch.setattr(core, "corrections", lambda *a, **k: (*frozen, 0.0, 0.0))

    def loss(x_, gamma_=p["gamma"], beta_=p["beta"]):
        return float(np.sum(_masked_fwd(x_, dict(p, gamma=gamma_, beta=beta_), case, mask).y * dy))

    assert rel_err(dx, _fd(loss, x)) < 1e-7
    assert rel_err(dgamma, _fd(lambda g_: loss(x, gamma_=g_), p["gamma"])) < 1e-7
    assert rel_err(dbeta, _fd(lambda b_: loss(x, beta_=b_), p["beta"])) < 1e-7
    # sum(dL/dx) = 0 per group and feature still holds (every value shifts the group's output alike).
    dxg = core.group_view(dx, case.axis % x.ndim, case.microbatch_size)
    np.testing.assert_allclose(dxg.sum(axis=1)[res.count > 0], 0.0, atol=1e-10)


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (np.ones((8, 4), bool), ValueError, r"`mask` must have a shape broadcastable.*\(8, 4\).*\(8, 5\)"),
        (np.ones((8, 5, 1), bool), ValueError, r"`mask` must have .*\(8, 5, 1\)"),
        (np.array([["a"] * 5] * 8), TypeError, "`mask` must be boolean.*dtype <U1"),
    ],
)
def test_mask_errors(mask, exc, match):
    with pytest.raises(exc, match=match):
        train_forward(
            np.zeros((8, 5)), None, None, np.zeros(5), np.ones(5), rmax=3, dmax=5, momentum=0.9, epsilon=EPS, mask=mask
        )
