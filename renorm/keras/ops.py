"""Batch Renormalization in ``keras.ops``: the math of the Keras layer on every Keras 3 backend.

Ioffe, arXiv:1702.03275, Algorithm 1, with micro-batches and masks, computed as ``docs/SPEC.md`` states
it (sections 2-6; dtypes and the two-pass variance: section 8, "Numerics and precision"). The TensorFlow
backend runs :mod:`renorm.tf.ops` instead (its fused kernels). On JAX and PyTorch shapes are known when
traced: every check of section 10 is made in Python before any op runs; an empty batch is a Python branch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
from keras import ops

from renorm.config import check_input, check_mask

__all__ = ["KerasRenormOutput", "batch_renorm", "compute_dtype", "infer", "train"]


class KerasRenormOutput(NamedTuple):
    """Result of :func:`train`: the output and the new state (no gradient on the state).

    ``empty`` is a Python bool where it is known when traced (no mask), else a
    scalar bool tensor: True when the batch held no example or selected none.
    """

    y: object
    moving_mean: object
    moving_stddev: object
    r_clipped_fraction: object
    d_clipped_fraction: object
    empty: object


def compute_dtype(dtype) -> str:
    """float64 stays float64; every narrower float is computed in float32."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def check(x, *, axis, microbatch_size, num_features, training, mask=None):
    """The input checks of ``docs/SPEC.md``, section 10; returns ``(info, mask as bool or None)``."""
    name = keras.backend.standardize_dtype(x.dtype)
    shape = tuple(x.shape)
    info = check_input(
        shape,
        dtype_name=name,
        is_floating="float" in name,
        axis=axis,
        microbatch_size=microbatch_size,
        num_features=num_features,
        training=training,
    )
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
        mname = keras.backend.standardize_dtype(mask.dtype)
        check_mask(
            tuple(mask.shape),
            shape,
            dtype_name=mname,
            feature_axis=axis,
            is_valid_dtype=mname == "bool" or "float" in mname or "int" in mname,
        )
        if mname != "bool":
            mask = ops.not_equal(mask, ops.zeros((), mname))
    return info, mask


def batch_renorm(
    x,
    gamma,
    beta,
    moving_mean,
    moving_stddev,
    *,
    training,
    rmax,
    dmax,
    momentum,
    epsilon,
    axis,
    microbatch_size,
    synchronized=False,
    explicit_gradient=True,
    fused=None,
    mask=None,
) -> KerasRenormOutput:
    """One call of the layer in ``keras.ops``: the input checks, then :func:`train` or :func:`infer`.

    The arguments are :func:`renorm.tf.batch_renorm`'s, so that the layer calls either the same way;
    ``rmax`` and ``dmax`` are taken as valid (the layer's schedule validated them), and
    ``synchronized`` and ``fused``, which need TensorFlow, must be off (the layer refuses them at
    construction on the other backends). In inference the state is returned as it is, with clip
    fractions 0 and ``empty`` False.

    >>> ones, zeros = ops.ones((3,)), ops.zeros((3,))
    >>> out = batch_renorm(ops.ones((4, 3)), ones, zeros, zeros, ones, training=False, rmax=3.0, dmax=5.0,
    ...                    momentum=0.99, epsilon=1e-3, axis=-1, microbatch_size=None)
    >>> tuple(out.y.shape), out.empty
    ((4, 3), False)
    """
    if synchronized or fused:
        raise ValueError(
            f"synchronized={synchronized!r} and fused={fused!r} need the TensorFlow computation "
            "(renorm.tf.batch_renorm); keras.ops has neither."
        )
    info, mask = check(
        x,
        axis=axis,
        microbatch_size=microbatch_size,
        num_features=int(moving_mean.shape[0]),
        training=training,
        mask=mask,
    )
    if not training:
        zero = ops.zeros((), "float32")
        y = infer(x, gamma, beta, moving_mean, moving_stddev, axis=info.axis)
        return KerasRenormOutput(y, moving_mean, moving_stddev, zero, zero, False)
    return train(
        x,
        gamma,
        beta,
        moving_mean,
        moving_stddev,
        rmax=rmax,
        dmax=dmax,
        momentum=momentum,
        epsilon=epsilon,
        axis=info.axis,
        microbatch_size=microbatch_size,
        explicit_gradient=explicit_gradient,
        mask=mask,
    )


def _fshape(nd, ax, c):
    shape = [1] * nd
    shape[ax] = c
    return shape


def infer(x, gamma, beta, mean, stddev, *, axis):
    """``gamma * (x - mean) / stddev + beta`` in the compute dtype, in ``x``'s dtype.

    ``gamma``, ``beta`` may be ``None``; ``axis`` is the non-negative feature axis.
    """
    cdt = compute_dtype(x.dtype)
    c = int(mean.shape[0])
    fshape = _fshape(len(x.shape), axis, c)
    mean_c, std_c = ops.cast(mean, cdt), ops.cast(stddev, cdt)
    a = ops.divide(ops.ones((c,), cdt) if gamma is None else ops.cast(gamma, cdt), std_c)
    y = ops.multiply(ops.subtract(ops.cast(x, cdt), ops.reshape(mean_c, fshape)), ops.reshape(a, fshape))
    if beta is not None:
        y = ops.add(y, ops.reshape(ops.cast(beta, cdt), fshape))
    return ops.cast(y, x.dtype)


def _corrections(mu, sigma, mean, stddev, rmax, dmax, valid=None):
    """``r``, ``d`` (clipped, no gradient) and the clipped fractions (float32 scalars)."""
    ok = ops.logical_and(ops.isfinite(mu), ops.isfinite(sigma))
    nan = ops.full((), math.nan, sigma.dtype)
    r_raw = ops.where(ok, ops.divide(sigma, stddev), nan)
    d_raw = ops.where(ok, ops.divide(ops.subtract(mu, mean), stddev), nan)
    rmin = ops.divide(ops.ones((), sigma.dtype), rmax)
    r = ops.stop_gradient(ops.clip(r_raw, rmin, rmax))
    d = ops.stop_gradient(ops.clip(d_raw, ops.negative(dmax), dmax))
    r_out = ops.logical_or(ops.less(r_raw, rmin), ops.greater(r_raw, rmax))
    d_out = ops.logical_or(ops.less(d_raw, ops.negative(dmax)), ops.greater(d_raw, dmax))
    if valid is None:
        return r, d, ops.mean(ops.cast(r_out, "float32")), ops.mean(ops.cast(d_out, "float32"))
    valid = ops.broadcast_to(valid, ops.shape(r_out))
    total = ops.maximum(ops.sum(ops.cast(valid, "float32")), 1.0)
    r_frac = ops.sum(ops.cast(ops.logical_and(r_out, valid), "float32")) / total
    d_frac = ops.sum(ops.cast(ops.logical_and(d_out, valid), "float32")) / total
    return r, d, r_frac, d_frac


def _explicit_backward_available() -> bool:
    # keras.ops.custom_gradient's gradient function takes the upstream gradient alone on JAX
    # (jax.custom_gradient); the other backends' conventions differ, so they use autodiff.
    return keras.backend.backend() == "jax"


def _affine_explicit(xg, gamma, beta, mu, sigma, r, d, w, div, red):
    """``y = (x - mu) * gamma * r / sigma + beta + gamma * d`` with the paper's backward.

    Per group, with ``a = gamma * r / sigma``, sums over the group's values of a feature::

        dx = dy * a - w * a * (sum(dy) + (x - mu) * sum(dy * (x - mu)) / sigma^2) / n

    (``w`` the mask, 1 everywhere without one; ``n`` = ``div``, the selected
    count, at least 1). ``mu``, ``sigma``, ``r``, ``d``, ``w``, ``div`` are
    constants for the gradient (the paper's stop-gradient on ``r``, ``d``; the
    dependence of ``mu``, ``sigma`` on ``x`` is written into ``dx``).
    """

    @ops.custom_gradient
    def forward(xv, gamma_v, beta_v, mu_v, sigma_v, r_v, d_v, w_v, div_v):
        xc = ops.subtract(xv, mu_v)
        a = gamma_v * (r_v / sigma_v)
        y = xc * a + (beta_v + gamma_v * d_v)

        def grad(*upstream, **unused):
            dy = upstream[0]
            sum_dy = ops.sum(dy, axis=red, keepdims=True)
            sum_dyxc = ops.sum(dy * xc, axis=red, keepdims=True)
            stat = a * (sum_dy + xc * (sum_dyxc / ops.square(sigma_v))) / div_v
            dx = dy * a - (stat if w_v is None else w_v * stat)
            red_all = sorted({0, *red})  # every axis but the features
            dgamma = ops.sum((r_v / sigma_v) * sum_dyxc + d_v * sum_dy, axis=red_all, keepdims=True)
            dbeta = ops.sum(sum_dy, axis=red_all, keepdims=True)
            zeros = [ops.zeros_like(v) for v in (mu_v, sigma_v, r_v, d_v, w_v, div_v)]
            return (dx, ops.reshape(dgamma, ops.shape(gamma_v)), ops.reshape(dbeta, ops.shape(beta_v)), *zeros)

        return y, grad

    return forward(xg, gamma, beta, mu, sigma, r, d, w, div)


class _Limits(NamedTuple):
    """``rmax``, ``dmax`` and ``epsilon`` of a step in the compute dtype."""

    rmax: object
    dmax: object
    epsilon: object


def train(
    x,
    gamma,
    beta,
    mean,
    stddev,
    *,
    rmax,
    dmax,
    momentum,
    epsilon,
    axis,
    microbatch_size,
    explicit_gradient=True,
    mask=None,
) -> KerasRenormOutput:
    """One training step on checked inputs (``axis`` non-negative, ``mask`` bool or ``None``).

    ``rmax``, ``dmax``: the limits of this step (numbers or scalar tensors).
    Returns the output and the new moving statistics and clip fractions. The
    steps: the grouped view (:func:`_groups`, :func:`_grouped_mask`), the
    statistics (:func:`_moments` or :func:`_masked_moments`), the output
    ``y = (x - mu_g) * a + b`` with ``a = gamma * r / sigma_g`` and
    ``b = beta + gamma * d``, and the state update (:func:`_update`). With
    ``explicit_gradient=True`` the backward is the paper's formula, two
    reductions and a few element-wise passes (:func:`_affine_explicit`),
    where the backend allows it (JAX); elsewhere, and with
    ``explicit_gradient=False``, autodiff of the forward.
    """
    cdt = compute_dtype(x.dtype)
    state_dtype = keras.backend.standardize_dtype(mean.dtype)
    c = int(mean.shape[0])
    dims = [int(s) for s in x.shape]
    mean_c, std_c = ops.cast(mean, cdt), ops.cast(stddev, cdt)
    zero32 = ops.zeros((), "float32")
    if dims[0] == 0:  # no group: the inference output, the state as it was
        y = infer(x, gamma, beta, mean, stddev, axis=axis)
        return KerasRenormOutput(y, mean, stddev, zero32, zero32, True)
    gamma_c = ops.ones((c,), cdt) if gamma is None else ops.cast(gamma, cdt)
    beta_c = ops.zeros((c,), cdt) if beta is None else ops.cast(beta, cdt)
    groups = _groups(dims, axis, microbatch_size)
    xg = ops.reshape(ops.cast(x, cdt), groups.dims)
    gshape = _fshape(len(groups.dims), groups.axis, c)

    def shaped(v):
        return ops.reshape(v, gshape)

    mean_g, std_g = shaped(mean_c), shaped(std_c)
    lim = _Limits(ops.cast(rmax, cdt), ops.cast(dmax, cdt), ops.cast(epsilon, cdt))
    if mask is None:
        wg, m = None, _moments(xg, groups, mean_g, std_g, lim, cdt)
    else:
        wg = _grouped_mask(mask, dims, axis, groups.dims, microbatch_size)
        m = _masked_moments(xg, wg, groups.red, mean_g, std_g, lim, cdt)
    if explicit_gradient and _explicit_backward_available():
        w = ops.ones((1,) * len(groups.dims), cdt) if wg is None else ops.cast(wg, cdt)
        sg = ops.stop_gradient
        yg = _affine_explicit(
            xg, shaped(gamma_c), shaped(beta_c), sg(m.mu), sg(m.sigma), m.r, m.d, w, sg(m.div), groups.red
        )
    else:
        yg = (xg - m.mu) * (shaped(gamma_c) * m.r / m.sigma) + (shaped(beta_c) + shaped(gamma_c) * m.d)
    y = ops.cast(ops.reshape(yg, dims), x.dtype)
    return _update(y, m, mean_c, std_c, momentum, state_dtype, zero32)


class _Groups(NamedTuple):
    """The grouped view of a batch: its ``dims``, its feature ``axis`` and the axes ``red`` reduced per group."""

    dims: list
    axis: int
    red: list


def _groups(dims, axis, microbatch_size) -> _Groups:
    """The whole batch as it is, or micro-batches as the free reshape ``(B, ...) -> (G, k, ...)``.

    The whole batch is the group: ``x`` as it is, reduced over every axis but
    the features, without a leading group axis of size 1 (with one, XLA's CPU
    backward was about 8x slower on a ``(4096, 1024)`` input; ``docs/keras.md``,
    "Two pitfalls found on the way").
    """
    nd = len(dims)
    if microbatch_size is None:
        return _Groups(dims, axis, [i for i in range(nd) if i != axis])
    k = microbatch_size
    fax = axis + 1
    return _Groups([dims[0] // k, k] + dims[1:], fax, [i for i in range(1, nd + 1) if i != fax])


def _grouped_mask(mask, dims, axis, gdims, microbatch_size):
    """The mask over the positions of ``x`` (the feature axis of size 1), in the grouped view ``gdims``."""
    mdims = list(dims)
    mdims[axis] = 1
    wg = ops.broadcast_to(ops.expand_dims(mask, axis), mdims)
    if microbatch_size is not None:
        wg = ops.reshape(wg, [gdims[0], microbatch_size] + mdims[1:])
    return wg


class _Moments(NamedTuple):
    """The statistics of each group and their corrections, in the grouped view.

    ``div`` is the divisor of the explicit backward (the values per group, or
    the selected ones, at least 1); ``has`` (with a mask) whether a group has a
    selected position, ``None`` without a mask.
    """

    mu: object
    sigma: object
    r: object
    d: object
    r_frac: object
    d_frac: object
    div: object
    has: object


def _moments(xg, groups: _Groups, mean_g, std_g, lim: _Limits, cdt) -> _Moments:
    """Two-pass moments of each group, ``mean((x - mu)**2)``, with their corrections.

    Means are sums divided by counts: ``keras.ops.mean`` reduces a float64
    input in float32 on the JAX backend (Keras 3.15).
    """
    red = groups.red
    count = math.prod(groups.dims[i] for i in red)
    mu = ops.sum(xg, axis=red, keepdims=True) / count
    var = ops.sum(ops.square(xg - ops.stop_gradient(mu)), axis=red, keepdims=True) / count
    sigma = ops.sqrt(var + lim.epsilon)
    r, d, r_frac, d_frac = _corrections(mu, sigma, mean_g, std_g, lim.rmax, lim.dmax)
    div = ops.full((), float(count), cdt)
    return _Moments(mu, sigma, r, d, r_frac, d_frac, div, None)


def _masked_moments(xg, wg, red, mean_g, std_g, lim: _Limits, cdt) -> _Moments:
    """:func:`_moments` over the selected positions of each group; the moving statistics where there is none."""
    zero = ops.zeros((), cdt)
    n = ops.sum(ops.cast(wg, cdt), axis=red, keepdims=True)
    div = ops.maximum(n, 1.0)
    xs = ops.where(wg, xg, zero)
    mu = ops.sum(xs, axis=red, keepdims=True) / div
    var = ops.sum(ops.where(wg, ops.square(xs - ops.stop_gradient(mu)), zero), axis=red, keepdims=True) / div
    has = ops.greater(n, 0.0)
    mu = ops.where(has, mu, mean_g)
    sigma = ops.where(has, ops.sqrt(var + lim.epsilon), std_g)
    r, d, r_frac, d_frac = _corrections(mu, sigma, mean_g, std_g, lim.rmax, lim.dmax, valid=has)
    return _Moments(mu, sigma, r, d, r_frac, d_frac, div, has)


def _update(y, m: _Moments, mean_c, std_c, momentum, state_dtype, zero32) -> KerasRenormOutput:
    """The new moving statistics: the mean over groups of ``mu_g``, ``sigma_g``; skipped where not finite.

    With a mask the mean runs over the groups with a selected position, per
    feature, and a batch with none is empty (its clip fractions 0).
    """
    cdt = keras.backend.standardize_dtype(mean_c.dtype)
    c = int(mean_c.shape[0])
    mu, sigma = ops.stop_gradient(m.mu), ops.stop_gradient(m.sigma)
    r_frac, d_frac = m.r_frac, m.d_frac
    finite = ops.logical_and(ops.all(ops.isfinite(mu)), ops.all(ops.isfinite(sigma)))
    alpha = ops.cast(1.0 - momentum, cdt)
    mu2, sigma2 = ops.reshape(mu, [-1, c]), ops.reshape(sigma, [-1, c])  # (G, C)
    empty = False
    if m.has is None:
        groups = int(mu2.shape[0])
        batch_mean, batch_std = ops.sum(mu2, axis=0) / groups, ops.sum(sigma2, axis=0) / groups
        update = finite
    else:
        has2 = ops.reshape(ops.broadcast_to(m.has, ops.shape(mu)), [-1, c])
        used = ops.sum(ops.cast(has2, cdt), axis=0)
        zero = ops.zeros((), cdt)
        batch_mean = ops.sum(ops.where(has2, mu2, zero), axis=0) / ops.maximum(used, 1.0)
        batch_std = ops.sum(ops.where(has2, sigma2, zero), axis=0) / ops.maximum(used, 1.0)
        update = ops.logical_and(finite, ops.greater(used, 0.0))
        empty = ops.logical_not(ops.any(has2))
        r_frac = ops.where(empty, zero32, r_frac)
        d_frac = ops.where(empty, zero32, d_frac)
    new_mean = ops.where(update, mean_c + alpha * (ops.stop_gradient(batch_mean) - mean_c), mean_c)
    new_std = ops.where(update, std_c + alpha * (ops.stop_gradient(batch_std) - std_c), std_c)
    return KerasRenormOutput(
        y,
        ops.cast(new_mean, state_dtype),
        ops.cast(new_std, state_dtype),
        ops.stop_gradient(r_frac),
        ops.stop_gradient(d_frac),
        empty,
    )
