"""Property-based tests of the oracle's identities over shapes, axes and configurations."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from parity import rel_err

from renorm.numpy_ref import inference_forward, train_backward, train_forward


@st.composite
def problems(draw):
    """A random input shape, feature axis, micro-batch size and state."""
    groups = draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    rank = draw(st.integers(2, 4))
    inner = draw(st.lists(st.integers(1, 3), min_size=rank - 1, max_size=rank - 1))
    shape = (groups * k, *inner)
    sign = st.sampled_from([1, -1])
    axis = draw(st.integers(1, rank - 1)) * draw(sign) if rank > 2 else draw(sign)
    if axis < 0:
        axis = axis if -axis < rank else -1
    per_example = int(np.prod([s for i, s in enumerate(shape) if i not in (0, axis % rank)]))
    if k * per_example < 2:  # every group needs >= 2 values per feature
        k, shape = 2, (groups * 2, *inner)
    microbatch = None if groups == 1 and draw(st.booleans()) else k
    seed = draw(st.integers(0, 2**31 - 1))
    eps = draw(st.sampled_from([1e-3, 1e-5, 1e-1]))
    return shape, axis, microbatch, seed, eps


def _arrays(shape, axis, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    fshape = [1] * len(shape)
    fshape[axis] = c
    x = rng.normal(rng.normal(0, 3, c).reshape(fshape), np.exp(rng.normal(0, 1, c)).reshape(fshape), shape)
    dy = rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(0, 1, c)
    mean, std = rng.normal(0, 2, c), rng.uniform(0.3, 3, c)
    return x, dy, gamma, beta, mean, std


def _split(a, k):
    return [a[i : i + k] for i in range(0, a.shape[0], k)]


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(1.0, 4.0), st.floats(0.0, 3.0))
def test_gradient_sums_to_zero_per_group(problem, rmax, dmax):
    shape, axis, k, seed, eps = problem
    x, dy, gamma, beta, mean, std = _arrays(shape, axis, seed)
    res = train_forward(
        x, gamma, beta, mean, std, rmax=rmax, dmax=dmax, momentum=0.9, epsilon=eps, axis=axis, microbatch_size=k
    )
    dx, _, _ = train_backward(dy, res.cache)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    for dxg, dyg in zip(_split(dx, k or shape[0]), _split(dy, k or shape[0])):
        scale = np.abs(dyg).sum() * np.max(gamma * res.r.max(axis=0) / res.sigma_g.min(axis=0))
        assert np.max(np.abs(dxg.sum(axis=red))) <= 1e-12 * scale


@settings(max_examples=60, deadline=None)
@given(problems())
def test_unclipped_training_equals_inference(problem):
    shape, axis, k, seed, eps = problem
    x, _, gamma, beta, mean, std = _arrays(shape, axis, seed)
    res = train_forward(
        x, gamma, beta, mean, std, rmax=1e8, dmax=1e8, momentum=0.9, epsilon=eps, axis=axis, microbatch_size=k
    )
    y_inf = inference_forward(x, gamma, beta, mean, std, axis=axis)
    assert rel_err(res.y, y_inf) < 1e-10


@settings(max_examples=60, deadline=None)
@given(problems())
def test_rmax1_dmax0_output_is_standardized_per_group(problem):
    """Batch norm: each group's (y - beta) / gamma has mean 0 and variance var / (var + eps)."""
    shape, axis, k, seed, eps = problem
    x, _, gamma, beta, mean, std = _arrays(shape, axis, seed)
    res = train_forward(
        x, gamma, beta, mean, std, rmax=1.0, dmax=0.0, momentum=0.9, epsilon=eps, axis=axis, microbatch_size=k
    )
    ax = axis % len(shape)
    red = tuple(i for i in range(len(shape)) if i != ax)
    fshape = [1] * len(shape)
    fshape[ax] = -1
    z = (res.y - beta.reshape(fshape)) / gamma.reshape(fshape)
    for zg, xg in zip(_split(z, k or shape[0]), _split(x, k or shape[0])):
        var = xg.var(axis=red)
        np.testing.assert_allclose(zg.mean(axis=red), 0.0, atol=1e-10)
        np.testing.assert_allclose(zg.var(axis=red), var / (var + eps), rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(1.0, 3.0), st.floats(0.0, 2.0))
def test_microbatches_equal_separate_calls(problem, rmax, dmax):
    shape, axis, k, seed, eps = problem
    if k is None:
        k = shape[0]
    x, dy, gamma, beta, mean, std = _arrays(shape, axis, seed)
    kw = dict(rmax=rmax, dmax=dmax, momentum=0.8, epsilon=eps, axis=axis)
    res = train_forward(x, gamma, beta, mean, std, microbatch_size=k, **kw)
    dx, dgamma, _ = train_backward(dy, res.cache)
    parts = [train_forward(xg, gamma, beta, mean, std, **kw) for xg in _split(x, k)]
    grads = [train_backward(dyg, p.cache) for dyg, p in zip(_split(dy, k), parts)]
    assert rel_err(res.y, np.concatenate([p.y for p in parts])) < 1e-12
    assert rel_err(dx, np.concatenate([g[0] for g in grads])) < 1e-11
    assert rel_err(dgamma, sum(g[1] for g in grads)) < 1e-11
    assert rel_err(res.stddev, np.mean([p.stddev for p in parts], axis=0)) < 1e-12
