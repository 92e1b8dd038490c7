"""Batch Renormalization as a TensorFlow function (the core of the Keras layer).

Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", NeurIPS 2017, arXiv:1702.03275, Algorithm 1,
extended with micro-batches (``docs/SPEC.md``). Per normalization group
``g`` (``G = B / k`` groups of ``k`` consecutive examples, or the whole batch)
and feature ``c``::

    mu_g    = mean(x)                                 over the group
    sigma_g = sqrt(mean((x - mu_g)**2) + epsilon)     biased, two-pass
    r_g     = stop_gradient(clip(sigma_g / stddev, 1/rmax, rmax))
    d_g     = stop_gradient(clip((mu_g - mean) / stddev, -dmax, dmax))
    y       = gamma * ((x - mu_g) / sigma_g * r_g + d_g) + beta

then ``mean``/``stddev`` move by ``1 - momentum`` towards the mean over groups
of ``mu_g``/``sigma_g``. Inference is ``y = gamma * (x - mean) / stddev + beta``.

Numerics and speed, written once here:

- Statistics and normalization run in float32 for float32, float16 and
  bfloat16 inputs and in float64 for float64; the output has the input's
  dtype, the new state the dtype of the state passed in.
- The variance is two-pass (never ``E[x^2] - E[x]^2``, which cancels to 0 on
  offset data such as ``1000 + 0.01 * noise``); this holds for the
  cross-replica (``synchronized``) statistics too. The generic explicit path
  uses the corrected two-pass form: ``xc = x - mu0`` around a first mean,
  ``delta = mean(xc)``, ``var = mean(xc**2) - delta**2``, ``mu = mu0 + delta``
  and ``d`` from ``(mu0 - mean) + delta``; its sums are matrix-vector
  products with a vector of ones (faster than ``reduce_sum`` on CPU).
- The affine map is folded into per-feature vectors once:
  ``y = (x - mu_g) * a + b`` with ``a = gamma * r / sigma_g`` and
  ``b = beta + gamma * d``; subtracting ``mu_g`` first keeps offset data exact.
- Micro-batches are a free reshape ``(B, ...) -> (G, k, ...)``: no transpose,
  no Python loop over groups; the feature axis stays where it is.
- The backward pass is, by default (``explicit_gradient=True``), the paper's
  explicit formula: two reductions (``sum(dy)``, ``sum(dy * xc)``) and
  ``dx = dy * a - xc * q + c`` with per-(group, feature) vectors, instead of
  what autodiff derives from the forward graph. ``explicit_gradient=False`` uses autodiff; the tests check both
  against the oracle.
- Fused kernels (``fused=None``, the default, where they apply: 4-D input
  with the features on axis 1 or 3, float32/float16/bfloat16, whole batch,
  not synchronized): training runs on ``FusedBatchNormV3`` (moments and
  normalization in one kernel, plus one per-channel affine pass for ``r`` and
  ``d``) and one ``FusedBatchNormGradV3`` for the backward, which is exactly
  the paper's backward because ``r`` and ``d`` are constants. Elsewhere the
  generic path above runs. Both are tested against the oracle.
- Inference runs on one ``FusedBatchNormV3`` pass in inference mode
  (float32/float16/bfloat16, unless ``fused=False``) where every feature has
  ``|moving_mean| <= 16 * moving_stddev``; the kernel computes
  ``x * a + (beta - mean * a)``, whose float32 error grows with that ratio, so
  elsewhere, and in float64, the exact ``(x - mean) * a + beta`` runs.
- If a batch statistic is NaN or Inf the new state equals the old one
  (``finite`` is then False), so one bad batch cannot poison the state.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import tensorflow as tf

from renorm.config import (
    batch_not_divisible_message,
    check_config,
    check_input,
    check_pooling,
    too_few_values_message,
)

__all__ = ["BatchRenormOutput", "batch_renorm", "compute_dtype", "fused_eligible"]


class BatchRenormOutput(NamedTuple):
    """Result of :func:`batch_renorm`.

    Attributes:
      y: the output, in the input's dtype.
      moving_mean, moving_stddev: the updated moving statistics (the inputs
        unchanged in inference, or when ``finite`` is False); no gradient.
      r_clipped_fraction, d_clipped_fraction: fraction of the ``r`` and ``d``
        values (over groups and features) that the clip changed; 0 in
        inference. float32 scalars.
      finite: scalar bool, False when a batch statistic was NaN or Inf.
    """

    y: tf.Tensor
    moving_mean: tf.Tensor
    moving_stddev: tf.Tensor
    r_clipped_fraction: tf.Tensor
    d_clipped_fraction: tf.Tensor
    finite: tf.Tensor


def compute_dtype(dtype) -> tf.DType:
    """float64 stays float64; every narrower float is computed in float32."""
    dtype = tf.as_dtype(dtype)
    return tf.float64 if dtype == tf.float64 else tf.float32


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as(value, dtype):
    """``value`` in ``dtype``; Python numbers go straight to ``dtype`` (``tf.cast`` would round them to float32 first)."""
    if _is_number(value):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)


def _dims(x):
    """The shape of ``x`` as a list: Python ints where static, scalar tensors where not."""
    static = x.shape.as_list()
    if all(s is not None for s in static):
        return static
    dynamic = tf.shape(x)
    return [s if s is not None else dynamic[i] for i, s in enumerate(static)]


def _runtime_checks(x, info, microbatch_size):
    """Graph-time assertions for what the static shape could not decide (unknown batch)."""
    if x.shape[0] is not None:
        return []
    batch = tf.shape(x, out_type=tf.int64)[0]
    checks = []
    if microbatch_size is not None:
        head, tail = batch_not_divisible_message("\x00", microbatch_size).split("\x00")
        msg = tf.strings.join([head, tf.strings.as_string(batch), tail])
        checks.append(tf.debugging.Assert(tf.equal(batch % microbatch_size, 0), [msg]))
    elif info.group_count is None:
        per_example = tf.reduce_prod(tf.shape(x, out_type=tf.int64)[1:]) // tf.shape(x, out_type=tf.int64)[
            info.axis
        ]
        count = batch * per_example
        head, tail = too_few_values_message("\x00", "batch").split("\x00")
        msg = tf.strings.join([head, tf.strings.as_string(count), tail])
        checks.append(tf.debugging.Assert(count >= 2, [msg]))
    return checks


def _pooled_moments(xg, red):
    """Mean and biased variance of the concatenated global batch across replicas.

    Two all-reduces, two passes: the global mean first (sum and count), then
    the global sum of squared deviations from it.
    """
    ctx = tf.distribute.get_replica_context()
    local_sum = tf.reduce_sum(xg, axis=red, keepdims=True)
    count = tf.cast(tf.size(xg) // tf.size(local_sum), xg.dtype)
    if ctx is None or ctx.num_replicas_in_sync == 1:
        mean = local_sum / count
        return mean, tf.reduce_mean(tf.math.squared_difference(xg, mean), axis=red, keepdims=True)
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([tf.reshape(local_sum, [-1]), [count]], 0))
    mean = tf.reshape(total[:-1], tf.shape(local_sum)) / total[-1]
    local_sq = tf.reduce_sum(tf.math.squared_difference(xg, mean), axis=red, keepdims=True)
    return mean, ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_sq) / total[-1]


def _corrections(mu, sigma, mean, stddev, rmax, dmax, mu_minus_mean=None):
    r_raw = sigma / stddev
    d_raw = (mu - mean if mu_minus_mean is None else mu_minus_mean) / stddev
    rmin = 1.0 / rmax
    r = tf.stop_gradient(tf.clip_by_value(r_raw, rmin, rmax))
    d = tf.stop_gradient(tf.clip_by_value(d_raw, -dmax, dmax))
    r_frac = tf.reduce_mean(tf.cast((r_raw < rmin) | (r_raw > rmax), tf.float32))
    d_frac = tf.reduce_mean(tf.cast((d_raw < -dmax) | (d_raw > dmax), tf.float32))
    return r, d, r_frac, d_frac


def _train(xg, gamma, beta, mean, stddev, rmax, dmax, epsilon, red, pooled, explicit_gradient):
    """Grouped training forward; returns ``(y, mu, sigma, r_frac, d_frac)``.

    ``xg`` is the grouped view in the compute dtype; ``gamma``, ``beta``,
    ``mean``, ``stddev`` are already shaped to broadcast against it.
    """

    def stats(xv):
        if pooled:
            mu, var = _pooled_moments(xv, red)
        else:
            mu = tf.reduce_mean(xv, axis=red, keepdims=True)
            var = tf.reduce_mean(tf.math.squared_difference(xv, tf.stop_gradient(mu)), axis=red, keepdims=True)
        sigma = tf.sqrt(var + epsilon)
        r, d, r_frac, d_frac = _corrections(mu, sigma, mean, stddev, rmax, dmax)
        return mu, sigma, r, d, r_frac, d_frac

    if pooled or not explicit_gradient:
        # Pooled moments: autodiff (the all-reduce is differentiable).
        mu, sigma, r, d, r_frac, d_frac = stats(xg)
        y = (xg - mu) * (gamma * r / sigma) + (beta + gamma * d)
        return y, tf.stop_gradient(mu), tf.stop_gradient(sigma), r_frac, d_frac

    @tf.custom_gradient
    def forward(xv, gamma_v, beta_v):
        # Corrected two-pass moments (Chan, Golub & LeVeque 1983): xc is centred
        # on a first mean mu0; its sum gives the rounding error of mu0 (delta)
        # and var = mean(xc**2) - delta**2, exact up to rounding even on
        # offset data. Full-size work: three reductions, a subtraction and a square.
        count = tf.cast(_prod([_dims(xv)[i] for i in red]), xv.dtype)
        mu0 = _group_sum(xv, red) / count
        xc = xv - mu0
        delta = _group_sum(xc, red) / count
        var = tf.maximum(_group_sum(tf.square(xc), red) / count - tf.square(delta), 0.0)
        mu = mu0 + delta
        sigma = tf.sqrt(var + epsilon)
        # mu0 - mean is exact on offset data (both near the same value), so d
        # keeps the accuracy that rounding mu0 + delta would lose.
        r, d, r_frac, d_frac = _corrections(mu, sigma, mean, stddev, rmax, dmax, (mu0 - mean) + delta)
        a = gamma_v * (r / sigma)
        # y = (x - mu) * a + beta + gamma * d, as two full-size passes over xc.
        y = xc * a + (beta_v + gamma_v * d - delta * a)

        def grad(dy, *unused):
            # The paper's backward with g = dy * gamma, per group, written as
            #   dx = dy * a - (x - mu) * q - a * mean(dy),  q = a * mean(dy * (x - mu)) / sigma^2
            # i.e. two reductions (sum(dy), sum(dy * xc)) and four element-wise passes.
            sum_dy = _group_sum(dy, red)
            sum_dyxc = _group_sum(dy * xc, red) - delta * sum_dy  # sum(dy * (x - mu))
            q = a * sum_dyxc / (count * tf.square(sigma))
            dx = dy * a - xc * q + (q * delta - a * sum_dy / count)
            red_all = [0] + list(red)
            dgamma = tf.reduce_sum((r / sigma) * sum_dyxc + d * sum_dy, axis=red_all, keepdims=True)
            dbeta = tf.reduce_sum(sum_dy, axis=red_all, keepdims=True)
            return dx, tf.reshape(dgamma, tf.shape(gamma_v)), tf.reshape(dbeta, tf.shape(beta_v))

        return (y, mu, sigma, r_frac, d_frac), grad

    y, mu, sigma, r_frac, d_frac = forward(xg, gamma, beta)
    return y, tf.stop_gradient(mu), tf.stop_gradient(sigma), tf.stop_gradient(r_frac), tf.stop_gradient(d_frac)


def _group_sum(v, red):
    """Sum of ``v`` over the axes ``red`` (keepdims), as matrix products with vectors of ones.

    ``v`` is a grouped view ``(G, ..., C, ...)`` and ``red`` every axis but the
    group axis 0 and the feature axis. On CPU a matrix-vector product reads
    ``v`` about 1.7x faster than ``reduce_sum`` over the same axes, at the same
    float32 accuracy on the shapes measured.
    """
    nd = v.shape.rank
    c_axis = [i for i in range(1, nd) if i not in red]
    if len(c_axis) != 1:
        return tf.reduce_sum(v, axis=red, keepdims=True)
    ca = c_axis[0]
    dims = _dims(v)
    before = _prod(dims[1:ca])
    after = _prod(dims[ca + 1:])
    t = v
    if not (isinstance(after, int) and after == 1):
        t = tf.matmul(tf.reshape(t, [-1, after]), tf.ones([after, 1], v.dtype))  # (G * before * C, 1)
    t = tf.reshape(t, [dims[0], before, dims[ca]])
    if not (isinstance(before, int) and before == 1):
        t = tf.matmul(tf.ones([1, before], v.dtype), t)  # (G, 1, C): the row of ones broadcasts over G
    keep = [dims[0]] + [1] * (ca - 1) + [dims[ca]] + [1] * (nd - ca - 1)
    return tf.reshape(t, keep)


def _prod(values):
    out = 1
    for v in values:
        out = out * v
    return out


_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)
_FUSED_MIN_EPSILON = 1.001e-5  # cuDNN's lower limit on epsilon


def fused_eligible(x, *, axis, epsilon, microbatch_size=None, synchronized=False, explicit_gradient=True) -> bool:
    """Whether :func:`batch_renorm` can run on TensorFlow's fused batch-norm kernels.

    Features on the last axis of an input of any rank (viewed as the 4-D
    ``(B, 1, M, C)``, a free reshape), or on axis 1 of a 4-D input (NCHW);
    float32, float16 or bfloat16, whole-batch statistics, not pooled,
    explicit gradient, ``epsilon >= 1.001e-5``.
    """
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    return (
        rank is not None
        and rank >= 2
        and (axis % rank == rank - 1 or (rank == 4 and axis % 4 == 1))
        and x.dtype in _FUSED_DTYPES
        and microbatch_size is None
        and not synchronized
        and explicit_gradient
        and float(epsilon) >= _FUSED_MIN_EPSILON
    )


def _train_fused(x, gamma, beta, mean, stddev, rmax, dmax, epsilon, data_format):
    """Training forward on ``FusedBatchNormV3`` kernels (whole batch, 4-D).

    Forward: one fused training call normalizes ``x`` with scale 1, offset 0
    and returns the batch moments, then one fused per-channel affine pass
    applies ``gamma * r`` and ``beta + gamma * d`` (an inference-mode call with
    mean 0, variance 0.5 and epsilon 0.5, i.e. a divisor of exactly 1).
    Backward: ``y`` is batch norm of ``x`` with scale ``gamma * r`` and offset
    ``beta + gamma * d`` (``r``, ``d`` constants), so one
    ``FusedBatchNormGradV3`` call with that scale gives ``dx`` exactly as the
    paper's formula; ``dgamma = r * dscale + d * doffset``, ``dbeta = doffset``.
    The kernel's batch variance is Bessel-corrected; it is rescaled to the
    biased one. Returns ``(y, mu, sigma, r_frac, d_frac)`` with ``(C,)`` stats.
    """
    f32 = tf.float32
    empty = tf.constant([], f32)
    c_axis = 1 if data_format == "NCHW" else 3
    reduce_axes = [i for i in range(4) if i != c_axis]

    @tf.custom_gradient
    def forward(xv, gamma_v, beta_v):
        ones = tf.ones_like(gamma_v)
        xhat, bmean, bvar, rs1, rs2, rs3 = tf.raw_ops.FusedBatchNormV3(
            x=xv, scale=ones, offset=tf.zeros_like(beta_v), mean=empty, variance=empty, epsilon=epsilon,
            exponential_avg_factor=1.0, data_format=data_format, is_training=True,
        )[:6]
        shape = tf.shape(xv)
        n = tf.cast(tf.reduce_prod(tf.gather(shape, reduce_axes)), f32)
        mu = bmean
        sigma = tf.sqrt(bvar * ((n - 1.0) / n) + epsilon)
        r, d, r_frac, d_frac = _corrections(mu, sigma, mean, stddev, rmax, dmax)
        scale = gamma_v * r
        y = tf.raw_ops.FusedBatchNormV3(
            x=xhat, scale=scale, offset=beta_v + gamma_v * d, mean=tf.zeros_like(mu),
            variance=tf.fill(tf.shape(mu), tf.constant(0.5, f32)), epsilon=0.5, exponential_avg_factor=1.0,
            data_format=data_format, is_training=False,
        )[0]

        def grad(dy, *unused):
            dx, dscale, doffset = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=xv, scale=scale, reserve_space_1=rs1, reserve_space_2=rs2, reserve_space_3=rs3,
                epsilon=epsilon, data_format=data_format, is_training=True,
            )[:3]
            return dx, r * dscale + d * doffset, doffset

        return (y, mu, sigma, r_frac, d_frac), grad

    y, mu, sigma, r_frac, d_frac = forward(x, gamma, beta)
    return y, tf.stop_gradient(mu), tf.stop_gradient(sigma), tf.stop_gradient(r_frac), tf.stop_gradient(d_frac)


# Where every feature has |moving_mean| <= _INFER_FUSED_MAX_OFFSET * moving_stddev,
# inference runs on the fused kernel, which computes x * a + (beta - mean * a)
# in one pass; its float32 rounding error relative to the output grows like
# |mean| / stddev (about 3e-6 at most at this bound). Elsewhere (offset data
# such as 1000 + 0.01 * noise) the exact (x - mean) * a + beta runs.
_INFER_FUSED_MAX_OFFSET = 16.0


def _infer(x, gamma, beta, mean, stddev, ax, fused):
    """Inference ``gamma * (x - mean) / stddev + beta`` (compute-dtype vectors), in ``x``'s dtype.

    ``fused``: on ``FusedBatchNormV3`` in inference mode (one read and one
    write of ``x``; the features-last input viewed as NHWC ``(-1, 1, 1, C)``,
    any other as NCHW ``(before, C, 1, after)``), guarded at run time by the
    offset bound above; else three element-wise passes in the compute dtype.
    """
    nd = x.shape.rank
    c = int(mean.shape[0])
    fshape = [1] * nd
    fshape[ax] = c

    def exact():
        xc = tf.cast(x, mean.dtype)
        y = (xc - tf.reshape(mean, fshape)) * tf.reshape(gamma / stddev, fshape) + tf.reshape(beta, fshape)
        return tf.cast(y, x.dtype)

    if not fused:
        return exact()
    dims = _dims(x)
    if ax == nd - 1:
        x4, data_format = tf.reshape(x, [-1, 1, 1, c]), "NHWC"
    else:
        x4, data_format = tf.reshape(x, [_prod(dims[:ax]), c, 1, -1]), "NCHW"

    def kernel():
        # variance 0.5 + epsilon 0.5: a divisor of exactly 1, so the scale is gamma / stddev.
        y4 = tf.raw_ops.FusedBatchNormV3(
            x=x4, scale=gamma / stddev, offset=beta, mean=mean, variance=tf.fill([c], tf.constant(0.5, mean.dtype)),
            epsilon=0.5, exponential_avg_factor=1.0, data_format=data_format, is_training=False,
        )[0]
        return tf.reshape(y4, dims)

    safe = tf.reduce_all(tf.abs(mean) <= _INFER_FUSED_MAX_OFFSET * stddev)
    return tf.cond(safe, kernel, exact)


def batch_renorm(
    x,
    gamma,
    beta,
    moving_mean,
    moving_stddev,
    *,
    training: bool,
    rmax=3.0,
    dmax=5.0,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    axis: int = -1,
    microbatch_size: Optional[int] = None,
    synchronized: bool = False,
    explicit_gradient: bool = True,
    fused: Optional[bool] = None,
) -> BatchRenormOutput:
    """Batch Renormalization of ``x``, a pure function (no variable is touched).

    Args:
      x: floating input, batch on axis 0, features on ``axis``.
      gamma, beta: ``(C,)`` scale and offset, or ``None`` (``scale=False`` /
        ``center=False``).
      moving_mean, moving_stddev: ``(C,)`` moving statistics before this step.
      training: True for batch statistics and a state update, False for
        inference with the moving statistics. Required, never guessed.
      rmax, dmax: the clipping limits for this step (numbers or scalar
        tensors, e.g. from :meth:`renorm.ClipSchedule.limits`).
      momentum, epsilon, axis, microbatch_size: as in ``docs/SPEC.md``.
      synchronized: pool the moments over the replicas of the current
        ``tf.distribute`` strategy (whole batches only).
      explicit_gradient: use the paper's explicit backward (True) or autodiff
        (False). With ``synchronized`` the gradient is always autodiff through
        the all-reduce.
      fused: run training on TensorFlow's fused batch-norm kernels
        (``FusedBatchNormV3`` and its gradient; see :func:`fused_eligible` for
        when they apply). ``None`` (default): where eligible; ``True``: always,
        an error where not eligible; ``False``: never (in inference too,
        which otherwise runs on the kernel in inference mode for
        float32/float16/bfloat16 where the moving mean is within 16 moving
        standard deviations of 0).

    Returns:
      :class:`BatchRenormOutput` ``(y, moving_mean, moving_stddev,
      r_clipped_fraction, d_clipped_fraction, finite)``.
    """
    if not isinstance(training, bool):
        raise TypeError(f"`training` must be a Python bool (True or False), got training={training!r}.")
    limits = {"rmax": rmax, "dmax": dmax}
    check_config(
        momentum=momentum,
        epsilon=epsilon,
        microbatch_size=microbatch_size,
        **{k: v for k, v in limits.items() if _is_number(v)},
    )
    check_pooling("synchronized" if synchronized else None, microbatch_size)
    x = tf.convert_to_tensor(x)
    info = check_input(
        x.shape.as_list() if x.shape.rank is not None else [],
        dtype_name=x.dtype.name,
        is_floating=x.dtype.is_floating,
        axis=axis,
        microbatch_size=microbatch_size,
        num_features=int(moving_mean.shape[0]),
        training=training,
    )
    ax = info.axis
    nd = x.shape.rank
    c = info.num_features
    cdt = compute_dtype(x.dtype)
    state_dtype = moving_mean.dtype
    mean_c = tf.cast(moving_mean, cdt)
    std_c = tf.cast(moving_stddev, cdt)
    gamma_c = tf.ones([c], cdt) if gamma is None else tf.cast(gamma, cdt)
    beta_c = tf.zeros([c], cdt) if beta is None else tf.cast(beta, cdt)

    if not training:
        y = _infer(x, gamma_c, beta_c, mean_c, std_c, ax, fused=fused is not False and x.dtype in _FUSED_DTYPES)
        zero = tf.zeros([], tf.float32)
        return BatchRenormOutput(y, moving_mean, moving_stddev, zero, zero, tf.constant(True))

    eligible = fused_eligible(
        x, axis=ax, epsilon=epsilon, microbatch_size=microbatch_size, synchronized=synchronized,
        explicit_gradient=explicit_gradient,
    )
    if fused and not eligible:
        raise ValueError(
            "`fused=True` needs a float32/float16/bfloat16 input with the features on the last axis (or on "
            "axis 1 of a 4-D input), "
            "microbatch_size=None, synchronized=False, explicit_gradient=True and epsilon >= 1.001e-5; got "
            f"an input of shape {tuple(x.shape)} and dtype {x.dtype.name}, axis={axis}, "
            f"microbatch_size={microbatch_size}, synchronized={synchronized}, "
            f"explicit_gradient={explicit_gradient}, epsilon={epsilon}."
        )
    checks = _runtime_checks(x, info, microbatch_size)
    if eligible and fused is not False:
        with tf.control_dependencies(checks):
            x_in = tf.identity(x)
        if nd != 4:  # features last: the free 4-D view (B, 1, M, C)
            x_in = tf.reshape(x_in, tf.stack([tf.shape(x_in)[0], 1, -1, c]))
        y, mu, sigma, r_frac, d_frac = _train_fused(
            x_in, tf.cast(gamma_c, tf.float32), tf.cast(beta_c, tf.float32), mean_c, std_c,
            _as(rmax, tf.float32), _as(dmax, tf.float32), float(epsilon), "NCHW" if (nd == 4 and ax == 1) else "NHWC",
        )
        if nd != 4:
            y = tf.reshape(y, tf.shape(x))
        return _finish(x, y, mu[None], sigma[None], r_frac, d_frac, mean_c, std_c, momentum, state_dtype, c)

    xc = tf.cast(x, cdt)
    with tf.control_dependencies(checks):
        dims = _dims(x)
        if microbatch_size is None:
            xg = tf.expand_dims(xc, 0)  # (1, B, ...): one group
        else:
            xg = tf.reshape(xc, [-1, microbatch_size] + dims[1:])  # (G, k, ...)
    # Grouped view: groups on 0, features on ax + 1; reduce over everything else.
    red = [i for i in range(1, nd + 1) if i != ax + 1]
    gshape = [1] * (nd + 1)
    gshape[ax + 1] = c

    def shaped(v):
        return tf.reshape(v, gshape)

    rmax_c = _as(rmax, cdt)
    dmax_c = _as(dmax, cdt)
    yg, mu, sigma, r_frac, d_frac = _train(
        xg,
        shaped(gamma_c),
        shaped(beta_c),
        shaped(mean_c),
        shaped(std_c),
        rmax_c,
        dmax_c,
        _as(epsilon, cdt),
        red,
        pooled=synchronized,
        explicit_gradient=explicit_gradient,
    )
    return _finish(x, tf.reshape(yg, dims), mu, sigma, r_frac, d_frac, mean_c, std_c, momentum, state_dtype, c)


def _finish(x, y, mu, sigma, r_frac, d_frac, mean_c, std_c, momentum, state_dtype, c):
    """The state update (skipped where a statistic is not finite) and the output tuple."""
    cdt = mean_c.dtype
    finite = tf.reduce_all(tf.math.is_finite(mu)) & tf.reduce_all(tf.math.is_finite(sigma))
    alpha = _as(1.0 - momentum, cdt)
    batch_mean = tf.reshape(tf.reduce_mean(mu, axis=0), [c])
    batch_std = tf.reshape(tf.reduce_mean(sigma, axis=0), [c])
    new_mean = tf.where(finite, mean_c + alpha * (batch_mean - mean_c), mean_c)
    new_std = tf.where(finite, std_c + alpha * (batch_std - std_c), std_c)
    return BatchRenormOutput(
        tf.cast(y, x.dtype),
        tf.cast(new_mean, state_dtype),
        tf.cast(new_std, state_dtype),
        r_frac,
        d_frac,
        finite,
    )
