"""Batch Renormalization in ``keras.ops``: the math of the Keras layer on every Keras 3 backend.

Ioffe, "Batch Renormalization", arXiv:1702.03275, Algorithm 1, with
micro-batches and masks (``docs/SPEC.md``, sections 2-4). The TensorFlow
backend does not run this module: there the layer calls the fused TF kernels
of :mod:`renorm.tf.ops` (its fast path). On JAX and PyTorch, shapes are
known when a function is traced, so every check of ``docs/SPEC.md``, section
10, is made in Python before any op runs, and an empty batch takes a Python
branch.

Numerics, written once here (the rules of :mod:`renorm.tf.ops`):

- Statistics and normalization run in float64 for float64 inputs and in
  float32 for float32, float16 and bfloat16; the output is in the input's
  dtype, the new state in the state's.
- Micro-batches are a free reshape ``(B, ...) -> (G, k, ...)``; the whole
  batch is reduced as it is, without a group axis of size 1 (with one, XLA's
  CPU backward was about 8x slower on a ``(4096, 1024)`` input).
- Two-pass variance, ``mean((x - mu)**2)`` (never ``E[x^2] - E[x]^2``).
  Means are sums divided by counts: ``keras.ops.mean`` reduces a float64
  input in float32 on the JAX backend (Keras 3.15).
- ``y = (x - mu_g) * a + b`` with ``a = gamma * r / sigma_g`` and
  ``b = beta + gamma * d``; ``r``, ``d`` are constants for the gradient.
- ``explicit_gradient=True``: the backward is the paper's formula, via
  ``keras.ops.custom_gradient`` (JAX), two reductions and a few element-wise
  passes; on other backends, and with ``explicit_gradient=False``, autodiff
  of the forward. Both are held to the oracle by the tests.
- Where a group's ``mu_g`` or ``sigma_g`` is NaN or Inf, its ``r`` and ``d``
  are NaN (so is its output) and the moving statistics keep their values.
- Masks (Keras' rule: the input's shape without the feature axis): the
  moments of a group are those of its selected positions; a group with none
  is normalized with the moving statistics and takes no part in the update
  or the clip fractions; a batch that selects nothing is no step (``empty``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
from keras import ops

from renorm.config import check_input, check_mask

__all__ = ["KerasRenormOutput", "compute_dtype", "infer", "train"]


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
    info = check_input(shape, dtype_name=name, is_floating="float" in name, axis=axis,
                       microbatch_size=microbatch_size, num_features=num_features, training=training)
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
        mname = keras.backend.standardize_dtype(mask.dtype)
        check_mask(tuple(mask.shape), shape, dtype_name=mname, feature_axis=axis,
                   is_valid_dtype=mname == "bool" or "float" in mname or "int" in mname)
        if mname != "bool":
            mask = ops.not_equal(mask, ops.zeros((), mname))
    return info, mask


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


def train(x, gamma, beta, mean, stddev, *, rmax, dmax, momentum, epsilon, axis, microbatch_size,
          explicit_gradient=True, mask=None) -> KerasRenormOutput:
    """One training step on checked inputs (``axis`` non-negative, ``mask`` bool or ``None``).

    ``rmax``, ``dmax``: the limits of this step (numbers or scalar tensors).
    Returns the output and the new moving statistics and clip fractions.
    """
    cdt = compute_dtype(x.dtype)
    state_dtype = keras.backend.standardize_dtype(mean.dtype)
    nd = len(x.shape)
    c = int(mean.shape[0])
    dims = [int(s) for s in x.shape]
    mean_c, std_c = ops.cast(mean, cdt), ops.cast(stddev, cdt)
    zero32 = ops.zeros((), "float32")
    if dims[0] == 0:  # no group: the inference output, the state as it was
        y = infer(x, gamma, beta, mean, stddev, axis=axis)
        return KerasRenormOutput(y, mean, stddev, zero32, zero32, True)
    gamma_c = ops.ones((c,), cdt) if gamma is None else ops.cast(gamma, cdt)
    beta_c = ops.zeros((c,), cdt) if beta is None else ops.cast(beta, cdt)
    if microbatch_size is None:
        # The whole batch is the group: x as it is, reduced over every axis but the features. (A leading
        # group axis of size 1 would make XLA's CPU backward reductions about 10x slower.)
        gdims, fax = dims, axis
        red = [i for i in range(nd) if i != axis]
    else:
        k = microbatch_size
        gdims, fax = [dims[0] // k, k] + dims[1:], axis + 1  # (G, k, ...): a free reshape
        red = [i for i in range(1, nd + 1) if i != fax]
    xg = ops.reshape(ops.cast(x, cdt), gdims)
    gshape = _fshape(len(gdims), fax, c)

    def shaped(v):
        return ops.reshape(v, gshape)

    mean_g, std_g = shaped(mean_c), shaped(std_c)
    rmax_c, dmax_c = ops.cast(rmax, cdt), ops.cast(dmax, cdt)
    eps = ops.cast(epsilon, cdt)
    wg = None
    if mask is not None:  # the positions of x, the feature axis of size 1
        mdims = list(dims)
        mdims[axis] = 1
        wg = ops.broadcast_to(ops.expand_dims(mask, axis), mdims)
        if microbatch_size is not None:
            wg = ops.reshape(wg, [gdims[0], microbatch_size] + mdims[1:])
    if wg is None:
        count = math.prod(gdims[i] for i in red)
        # Sums divided by the count: keras.ops.mean reduces float64 in float32 on JAX (Keras 3.15).
        mu = ops.sum(xg, axis=red, keepdims=True) / count
        var = ops.sum(ops.square(xg - ops.stop_gradient(mu)), axis=red, keepdims=True) / count
        sigma = ops.sqrt(var + eps)
        r, d, r_frac, d_frac = _corrections(mu, sigma, mean_g, std_g, rmax_c, dmax_c)
        div = ops.full((), float(count), cdt)
        has = None
    else:
        zero = ops.zeros((), cdt)
        n = ops.sum(ops.cast(wg, cdt), axis=red, keepdims=True)
        div = ops.maximum(n, 1.0)
        xs = ops.where(wg, xg, zero)
        mu = ops.sum(xs, axis=red, keepdims=True) / div
        var = ops.sum(ops.where(wg, ops.square(xs - ops.stop_gradient(mu)), zero), axis=red, keepdims=True) / div
        has = ops.greater(n, 0.0)
        mu = ops.where(has, mu, mean_g)
        sigma = ops.where(has, ops.sqrt(var + eps), std_g)
        r, d, r_frac, d_frac = _corrections(mu, sigma, mean_g, std_g, rmax_c, dmax_c, valid=has)
    if explicit_gradient and _explicit_backward_available():
        w = None if wg is None else ops.cast(wg, cdt)
        sg = ops.stop_gradient
        if w is None:
            w = ops.ones((1,) * len(gdims), cdt)
        yg = _affine_explicit(xg, shaped(gamma_c), shaped(beta_c), sg(mu), sg(sigma), r, d, w, sg(div), red)
    else:
        yg = (xg - mu) * (shaped(gamma_c) * r / sigma) + (shaped(beta_c) + shaped(gamma_c) * d)
    y = ops.cast(ops.reshape(yg, dims), x.dtype)

    mu, sigma = ops.stop_gradient(mu), ops.stop_gradient(sigma)
    finite = ops.logical_and(ops.all(ops.isfinite(mu)), ops.all(ops.isfinite(sigma)))
    alpha = ops.cast(1.0 - momentum, cdt)
    mu2, sigma2 = ops.reshape(mu, [-1, c]), ops.reshape(sigma, [-1, c])  # (G, C)
    empty = False
    if has is None:
        groups = int(mu2.shape[0])
        batch_mean, batch_std = ops.sum(mu2, axis=0) / groups, ops.sum(sigma2, axis=0) / groups
        update = finite
    else:
        has2 = ops.reshape(ops.broadcast_to(has, ops.shape(mu)), [-1, c])
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
    return KerasRenormOutput(y, ops.cast(new_mean, state_dtype), ops.cast(new_std, state_dtype),
                             ops.stop_gradient(r_frac), ops.stop_gradient(d_frac), empty)
