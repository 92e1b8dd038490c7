"""Batch Renormalization as pure JAX functions (the core of the Flax modules).

Ioffe's Algorithm 1 (arXiv:1702.03275) extended with micro-batches, as
``docs/SPEC.md`` specifies it: sections 3 "Training step" (masks, non-finite
batches), 6 "Backward pass", 8 "Numerics and precision" (dtypes, the two-pass
variance) and 11 "Cross-replica statistics" (``axis_name``). Particular to
this port:

- ``use_fast_variance=True`` (``E[x^2] - E[x]^2``, off by default) saves a
  pass over ``x`` and, with ``axis_name``, a collective.
- In float32 a variance overflows (and the moving statistics are kept) once
  ``|x - mu|`` exceeds about ``1.8e19``.
- A batch of 0 examples is a trace-time branch (shapes are static), free for
  ordinary batches; its output is computed as in inference, so its gradients
  are zeros. Every device of a mapped axis (``pmap``, ``shard_map``) has the
  same shape, so with ``axis_name`` a device is empty only when all are, and
  the pooled statistics never mix in an empty device.
- The explicit backward (``explicit_backward=True``, the default) is a
  ``jax.custom_vjp`` that keeps only the input (in its own dtype), the mask
  and per-feature vectors; it is faster than autodiff through the two-pass
  moments, which keeps ``x - mu`` in float32. ``explicit_backward=False`` is
  plain autodiff, the tested reference, and the one to use for forward-mode
  differentiation (``jax.jvp``, ``jax.jacfwd``).

>>> import jax
>>> x = jax.random.normal(jax.random.key(0), (8, 3))
>>> y, state, diagnostics = train(x, None, init_state(3), BatchRenormConfig(microbatch_size=4))
>>> inference(x, None, state).shape  # with the moving statistics only
(8, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from renorm.config import check_config, check_input, check_mask, check_pooling
from renorm.schedule import ClipSchedule

__all__ = [
    "BatchRenormConfig",
    "checked_input",
    "checked_mask",
    "BatchRenormState",
    "Diagnostics",
    "step_count",
    "init_state",
    "train",
    "inference",
    "compute_dtype",
]


class BatchRenormState(NamedTuple):
    """Moving statistics and step counter (an ordinary pytree).

    >>> state = init_state(3)
    >>> state.mean.tolist(), state.stddev.tolist(), int(state.step)
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
    """

    mean: jax.Array  # (C,) moving mean
    stddev: jax.Array  # (C,) moving standard deviation (includes epsilon)
    step: jax.Array  # () int32, training steps taken


class Diagnostics(NamedTuple):
    """What one training step reports besides the output.

    ``r_clipped``/``d_clipped``: fraction of the ``r``/``d`` entries (over
    groups and features; with a mask, those with a selected value) that the
    clip changed; ``rmax``/``dmax``: the limits used at this step;
    ``finite``: False when a batch statistic was NaN/Inf (the moving
    statistics were then left unchanged); ``empty``: True when no value
    entered a statistic (a batch of 0 examples, or a mask selecting nothing):
    the state was returned unchanged, ``step`` included.

    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0  # far from the moving mean 0
    >>> _, _, diagnostics = train(x, None, init_state(3), BatchRenormConfig(dmax=1.0))
    >>> float(diagnostics.d_clipped), float(diagnostics.dmax), bool(diagnostics.empty)
    (1.0, 1.0, False)
    """

    r_clipped: jax.Array
    d_clipped: jax.Array
    rmax: jax.Array
    dmax: jax.Array
    finite: jax.Array
    empty: jax.Array = False


@dataclasses.dataclass(frozen=True)
class BatchRenormConfig:
    """Static configuration of :func:`train` and :func:`inference` (hashable).

    Validated at construction through :mod:`renorm.config`, so that every
    backend rejects the same values with the same words. ``axis_name`` and
    ``axis_index_groups`` pool the moments over a mapped axis (``pmap``,
    ``shard_map``) as in ``flax.linen.BatchNorm``; ``explicit_backward``
    selects the custom VJP (default) or plain autodiff;
    ``force_float32_reductions`` (default True, as in ``flax.linen.BatchNorm``)
    computes in at least float32, False in ``dtype`` or the input's dtype.

    >>> BatchRenormConfig(microbatch_size=2, warmup_steps=100).schedule
    ClipSchedule(rmax=3.0, dmax=5.0, warmup_steps=100, rmax_steps=0, dmax_steps=0)
    >>> BatchRenormConfig(rmax=0.5)
    Traceback (most recent call last):
    ...
    ValueError: `rmax` must be a finite number >= 1 (r is clipped to [1/rmax, rmax]), got rmax=0.5.
    """

    momentum: float = 0.99
    epsilon: float = 1e-5
    rmax: float = 3.0
    dmax: float = 5.0
    warmup_steps: int = 0
    rmax_steps: int = 0
    dmax_steps: int = 0
    axis: int = -1
    microbatch_size: int | None = None
    axis_name: Any | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    explicit_backward: bool = True
    force_float32_reductions: bool = True

    def __post_init__(self):
        check_config(
            momentum=self.momentum,
            epsilon=self.epsilon,
            microbatch_size=self.microbatch_size,
            rmax=self.rmax,
            dmax=self.dmax,
            warmup_steps=self.warmup_steps,
            rmax_steps=self.rmax_steps,
            dmax_steps=self.dmax_steps,
        )
        check_pooling("axis_name" if self.axis_name is not None else None, self.microbatch_size)
        for name in ("use_fast_variance", "explicit_backward", "force_float32_reductions"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):  # "no" is a true string: never guess
                raise TypeError(f"`{name}` must be True or False, got {name}={value!r}.")
        if self.axis_index_groups is not None:
            # Hashable, so that the config can be a static argument of jit.
            object.__setattr__(
                self, "axis_index_groups", tuple(tuple(int(i) for i in g) for g in self.axis_index_groups)
            )

    @classmethod
    def from_module(cls, module, pooled: bool = True) -> BatchRenormConfig:
        """The configuration held by a module's attributes of the same names.

        ``pooled=False`` drops ``axis_name``/``axis_index_groups`` (inference
        uses no batch statistic, so there is nothing to pool). A module
        without ``force_float32_reductions`` (the nnx module, as
        ``nnx.BatchNorm``) gets the default, True.
        """
        values = {f.name: getattr(module, f.name) for f in dataclasses.fields(cls) if f.name not in _OPTIONAL_FIELDS}
        values.update({name: getattr(module, name) for name in _OPTIONAL_FIELDS if hasattr(module, name)})
        if not pooled:
            values.update(axis_name=None, axis_index_groups=None)
        return cls(**values)

    @property
    def schedule(self) -> ClipSchedule:
        return ClipSchedule(self.rmax, self.dmax, self.warmup_steps, self.rmax_steps, self.dmax_steps)


# Fields a module may lack (then the default holds): nnx.BatchNorm has no force_float32_reductions.
_OPTIONAL_FIELDS = ("force_float32_reductions",)


def compute_dtype(dtype) -> jnp.dtype:
    """At least float32: float16/bfloat16/float32 -> float32, float64 stays.

    >>> compute_dtype(jnp.bfloat16)
    dtype('float32')
    """
    return jnp.promote_types(dtype, jnp.float32)


def _compute_dtype(x_dtype, dtype, config: BatchRenormConfig):
    """The dtype of the statistics and the normalization (see ``force_float32_reductions``)."""
    if config.force_float32_reductions:
        return compute_dtype(x_dtype)
    return jnp.dtype(x_dtype if dtype is None else dtype)


def checked_mask(mask, x):
    """``mask`` as a boolean array of ``x``'s shape (Flax's rule: broadcastable to ``x``), or ``None``.

    True or nonzero selects. A mask of another dtype, or of a shape that does
    not broadcast to ``x``, is an error naming ``mask`` (``docs/SPEC.md``, section 10).

    >>> checked_mask([[1], [0]], jnp.ones((2, 3))).tolist()
    [[True, True, True], [False, False, False]]
    """
    if mask is None:
        return None
    if not hasattr(mask, "dtype"):
        mask = np.asarray(mask)
    check_mask(
        np.shape(mask),
        x.shape,
        dtype_name=str(mask.dtype),
        is_valid_dtype=bool(mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.number)),
    )
    mask = jnp.asarray(mask)
    return jnp.broadcast_to(mask if mask.dtype == jnp.bool_ else mask != 0, x.shape)


def init_state(num_features: int, dtype=jnp.float32) -> BatchRenormState:
    """``mean = 0``, ``stddev = 1``, ``step = 0``.

    >>> init_state(2, jnp.float16).stddev
    Array([1., 1.], dtype=float16)
    """
    return BatchRenormState(
        jnp.zeros((num_features,), dtype), jnp.ones((num_features,), dtype), jnp.zeros((), jnp.int32)
    )


def step_count(step) -> jax.Array:
    """The step counter as int32; a floating one is rounded first.

    ``lax.pmean`` over ``batch_stats`` (the Flax ImageNet example's
    ``sync_batch_stats``) divides, which turns the int32 ``step`` into a float
    holding the same whole number (exact below 2**24 in float32). Reading it
    back through this function makes that idiom harmless: the next training
    step's state has an int32 ``step`` again.

    >>> step = step_count(jnp.float32(41.99999))
    >>> int(step), str(step.dtype)
    (42, 'int32')
    """
    step = jnp.asarray(step)
    if jnp.issubdtype(step.dtype, jnp.floating):
        step = jnp.round(step)
    return step.astype(jnp.int32)


def checked_input(x, config: BatchRenormConfig, training: bool, num_features: int | None = None):
    """``x`` as an array and its :class:`renorm.config.InputInfo`, checked as in docs/SPEC.md, section 10.

    >>> x, info = checked_input(jnp.ones((8, 3)), BatchRenormConfig(microbatch_size=2), training=True)
    >>> info.axis, info.num_groups, info.group_count, info.num_features
    (1, 4, 2, 3)
    """
    x = jnp.asarray(x)
    info = check_input(
        x.shape,
        dtype_name=str(x.dtype),
        is_floating=bool(jnp.issubdtype(x.dtype, jnp.floating)),
        axis=config.axis,
        microbatch_size=config.microbatch_size,
        num_features=num_features,
        training=training,
    )
    return x, info


def _param(params: Mapping | None, name: str):
    if params is None:
        return None
    return params.get(name)


def _feature_shape(ndim: int, axis: int, size: int):
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def _index_groups(config: BatchRenormConfig):
    return None if config.axis_index_groups is None else [list(g) for g in config.axis_index_groups]


def _pmean(values, config: BatchRenormConfig):
    if config.axis_name is None:
        return values
    return lax.pmean(values, config.axis_name, axis_index_groups=_index_groups(config))


def _pool_size(config: BatchRenormConfig) -> int | None:
    """The number of replicas pooled over ``axis_name`` (a Python int, read at trace time), or ``None``.

    Read where the axis is bound (the forward pass), for :func:`_pmean_static`.
    """
    if config.axis_name is None:
        return None
    return lax.psum(1, config.axis_name, axis_index_groups=_index_groups(config))


def _pmean_static(values, config: BatchRenormConfig, size: int | None):
    """``lax.pmean`` with the replica count ``size`` given (from :func:`_pool_size`): the same operations.

    ``lax.pmean`` divides by ``lax.psum(1, axis_name)``, a constant read from
    the axis environment. The custom VJP's backward is traced when the
    gradient is transposed, and under ``jax.vmap(..., axis_name=...)`` that
    happens after ``vmap`` has returned, when the axis name is no longer in the
    environment (``NameError: unbound axis name``); the ``psum`` of the
    batched values itself is rewritten by ``vmap``'s batching rule and needs no
    environment. So the backward divides by the count the forward read.
    """
    if config.axis_name is None:
        return values
    summed = lax.psum(values, config.axis_name, axis_index_groups=_index_groups(config))
    return jax.tree_util.tree_map(lambda v: v / size, summed)


def _moments(xg, axes, config: BatchRenormConfig):
    """Per-group mean and biased variance of the grouped view, keepdims.

    Two-pass (``mean((x - mu)**2)``) unless ``use_fast_variance``; pooled over
    ``axis_name`` with ``lax.pmean`` (one collective per pass).
    """
    mu = jnp.mean(xg, axes, keepdims=True)
    if config.use_fast_variance:
        mu2 = jnp.mean(jnp.square(xg), axes, keepdims=True)
        mu, mu2 = _pmean(jnp.stack([mu, mu2]), config)
        return mu, jnp.maximum(mu2 - jnp.square(mu), 0.0)
    mu = _pmean(mu, config)
    var = _pmean(jnp.mean(jnp.square(xg - mu), axes, keepdims=True), config)
    return mu, var


def _masked_moments(xg, mg, axes, config: BatchRenormConfig):
    """:func:`_moments` over the values ``mg`` selects; also returns their count ``n``.

    Unselected values are replaced by 0 before any arithmetic, so that a NaN
    or Inf there enters neither the statistics nor their gradients. Pooled
    over ``axis_name``, the sums and counts are averaged together (their
    ratio is that of the pooled sums), so that devices with different counts
    weigh by their counts. ``n`` is the (pooled, averaged) count; where it is
    0 the mean and variance are 0 (the caller substitutes the moving
    statistics).
    """
    xs = jnp.where(mg, xg, 0)
    n = jnp.sum(mg, axes, keepdims=True, dtype=xg.dtype)
    if config.use_fast_variance:
        s1, s2, n = _pmean(
            jnp.stack([jnp.sum(xs, axes, keepdims=True), jnp.sum(jnp.square(xs), axes, keepdims=True), n]), config
        )
        div = jnp.where(n > 0, n, 1)
        mu = s1 / div
        return mu, jnp.maximum(s2 / div - jnp.square(mu), 0.0), n
    s1, n = _pmean(jnp.stack([jnp.sum(xs, axes, keepdims=True), n]), config)
    div = jnp.where(n > 0, n, 1)
    mu = s1 / div
    sq = jnp.sum(jnp.where(mg, jnp.square(xs - mu), 0), axes, keepdims=True)
    return mu, _pmean(sq, config) / div, n


class _Spec(NamedTuple):
    """Static description of one normalization (hashable)."""

    config: BatchRenormConfig
    axes: tuple  # reduced axes of the grouped view
    fshape: tuple  # broadcast shape of a per-(group, feature) value
    out_dtype: Any
    cdt: Any  # dtype of the statistics and the normalization
    pool_size: int | None = None  # replicas pooled over axis_name (explicit backward only), see _pool_size


class _GroupStats(NamedTuple):
    """What the normalization measured, per group and feature (keepdims, in ``cdt``)."""

    mu: jax.Array  # the group mean (the moving mean where no value is selected)
    sigma: jax.Array  # sqrt(variance + epsilon) (the moving stddev where no value is selected)
    r_raw: jax.Array  # sigma / stddev before the clip; NaN where mu or sigma is not finite
    d_raw: jax.Array  # (mu - mean) / stddev before the clip; NaN likewise
    n: jax.Array | None  # the count of selected values; None without a mask


class _Residuals(NamedTuple):
    """What the explicit backward keeps: the input in its own dtype, the mask and per-feature values."""

    xg: jax.Array
    mg: jax.Array | None
    n: jax.Array | None
    scale: jax.Array
    mu: jax.Array
    sigma: jax.Array
    r: jax.Array  # clipped
    d: jax.Array  # clipped
    mean: jax.Array
    stddev: jax.Array
    rmax: jax.Array
    dmax: jax.Array


def _varying(v) -> frozenset:
    """Mesh axes over which ``v`` varies inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(v)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", None) or ())


def _match_varying(v, like):
    """Mark a replicated parameter as varying like the input inside ``shard_map``.

    A custom VJP must return a cotangent of its input's type; the gradient of
    a replicated parameter is then summed over devices by the transpose of
    this cast, as autodiff would do. A no-op outside ``shard_map``.
    """
    missing = tuple(sorted(_varying(like) - _varying(v)))
    return lax.pcast(v, missing, to="varying") if missing else v


def _renorm(spec: _Spec, xg, mg, scale, bias, mean, stddev, rmax, dmax):
    """Normalization of the grouped view, differentiated by autodiff.

    The per-feature affine map is folded once: ``y = (x - mu_g) * a + b`` with
    ``a = scale * r / sigma_g`` and ``b = bias + scale * d``, one elementwise
    pass over ``x`` (subtracting ``mu_g`` first keeps offset data exact).

    ``mg``: the grouped mask (bool) or ``None``. Returns ``y`` (grouped,
    ``spec.out_dtype``) and its :class:`_GroupStats`.
    """
    config = spec.config
    cdt = spec.cdt
    xf = xg.astype(cdt)
    if mg is None:
        mu, var = _moments(xf, spec.axes, config)
        n = None
    else:
        mu, var, n = _masked_moments(xf, mg, spec.axes, config)
    sigma = jnp.sqrt(var + jnp.asarray(config.epsilon, cdt))
    if n is not None:  # no selected value: the moving statistics (r = 1, d = 0)
        mu = jnp.where(n > 0, mu, mean)
        sigma = jnp.where(n > 0, sigma, stddev)
    # A non-finite statistic gives NaN corrections (hence a NaN output), never a clipped constant.
    ok = jnp.isfinite(lax.stop_gradient(mu)) & jnp.isfinite(lax.stop_gradient(sigma))
    r_raw = jnp.where(ok, lax.stop_gradient(sigma) / stddev, jnp.nan)
    d_raw = jnp.where(ok, (lax.stop_gradient(mu) - mean) / stddev, jnp.nan)
    r = lax.stop_gradient(jnp.clip(r_raw, 1.0 / rmax, rmax))
    d = lax.stop_gradient(jnp.clip(d_raw, -dmax, dmax))
    # y = scale * ((x - mu) / sigma * r + d) + bias = (x - mu) * a + b
    a = r / sigma
    b = d
    if scale is not None:
        a = a * scale
        b = b * scale
    if bias is not None:
        b = b + bias
    y = ((xf - mu) * a + b).astype(spec.out_dtype)
    return y, _GroupStats(mu, sigma, r_raw, d_raw, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _renorm_explicit(spec: _Spec, xg, mg, scale, bias, mean, stddev, rmax, dmax):
    """:func:`_renorm` with the paper's explicit backward (a custom VJP)."""
    return _renorm(spec, xg, mg, scale, bias, mean, stddev, rmax, dmax)


def _renorm_explicit_fwd(spec, xg, mg, scale, bias, mean, stddev, rmax, dmax):
    y, stats = _renorm(spec, xg, mg, scale, bias, mean, stddev, rmax, dmax)
    r = jnp.clip(stats.r_raw, 1.0 / rmax, rmax)
    d = jnp.clip(stats.d_raw, -dmax, dmax)
    res = _Residuals(xg, mg, stats.n, scale, stats.mu, stats.sigma, r, d, mean, stddev, rmax, dmax)
    return (y, stats), res


def _renorm_explicit_bwd(spec, res, cotangents):
    """Per group, with ``g = dy * scale`` and means over the (pooled) group::

        dx     = r / sigma * (g - mean(g) - (x - mu) * mean(g * (x - mu)) / sigma**2)
        dscale = sum(dy * xhat),  dbias = sum(dy)

    which is ``docs/SPEC.md``'s (section 6) ``g r/sigma + dL/dsigma (x - mu)/(m sigma) + dL/dmu / m``.
    With a mask, the sums run over the whole group, are divided by the
    (pooled) number ``n`` of selected values, and the subtracted terms apply
    to the selected values only (the others do not enter ``mu``, ``sigma``).
    ``mu``, ``sigma``, ``r`` and ``d`` reach the state and diagnostics only
    under ``stop_gradient``, so their cotangents are zero and ignored.
    """
    xg, mg, n, scale, mu, sigma, r, d, mean, stddev, rmax, dmax = res
    dy, _ = cotangents
    cdt = mu.dtype
    axes = spec.axes
    dyf = dy.astype(cdt)
    xc = xg.astype(cdt) - mu
    sum_dy = jnp.sum(dyf, axes, keepdims=True)
    sum_dy_xc = jnp.sum(dyf * xc, axes, keepdims=True)
    a = scale * r / sigma
    if mg is None:
        count = math.prod(xg.shape[i] for i in axes)  # values per feature in a group, on this device
        means = _pmean_static(jnp.stack([sum_dy, sum_dy_xc]) / count, spec.config, spec.pool_size)  # pooled group
        dx = (a * (dyf - means[0] - xc * (means[1] / jnp.square(sigma)))).astype(xg.dtype)
    else:
        means = _pmean_static(jnp.stack([sum_dy, sum_dy_xc]), spec.config, spec.pool_size) / jnp.where(n > 0, n, 1)
        dx = (a * (dyf - jnp.where(mg, means[0] + xc * (means[1] / jnp.square(sigma)), 0))).astype(xg.dtype)
    dscale = jnp.sum(r / sigma * sum_dy_xc + d * sum_dy, 0, keepdims=True).reshape(scale.shape)
    dbias = jnp.sum(sum_dy, 0, keepdims=True).reshape(scale.shape)
    zeros = tuple(jnp.zeros_like(v) for v in (mean, stddev, rmax, dmax))
    return (dx, None, dscale, dbias) + zeros


_renorm_explicit.defvjp(_renorm_explicit_fwd, _renorm_explicit_bwd)


def train(
    x,
    params: Mapping[str, jax.Array] | None,
    state: BatchRenormState,
    config: BatchRenormConfig = BatchRenormConfig(),
    *,
    dtype=None,
    mask=None,
):
    """One training step of Batch Renormalization.

    Args:
      x: input, batch on axis 0 and features on ``config.axis``.
      params: mapping with optional ``"scale"`` and ``"bias"`` (shape ``(C,)``);
        a missing entry (or ``None``) means no scale / no bias.
      state: :class:`BatchRenormState` before this step; the limits are
        ``config.schedule.limits(state.step)``.
      config: :class:`BatchRenormConfig` (static).
      dtype: output dtype (default: ``x.dtype``).
      mask: optional, broadcastable to ``x`` (True or nonzero selects), as
        ``flax.linen.BatchNorm`` takes it: the statistics are those of the
        selected values, per group and feature (``docs/SPEC.md``, section 3, "Masks").

    Returns:
      ``(y, new_state, diagnostics)``. The new state keeps the dtypes of
      ``state`` (``step`` is int32, see :func:`step_count`) and carries no
      gradient. A batch of 0 examples returns an
      empty ``y`` and ``state`` itself (``step`` included), with clip
      fractions 0; a mask that selects nothing returns the state unchanged
      too (``diagnostics.empty``).

    Example:

    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> params = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
    >>> y, state, diagnostics = train(x, params, init_state(3), BatchRenormConfig(microbatch_size=4))
    >>> y.shape, int(state.step)
    ((8, 3), 1)
    """
    x, info = checked_input(x, config, training=True, num_features=state.mean.shape[0])
    mask = checked_mask(mask, x)
    state = state._replace(step=step_count(state.step))
    cdt = _compute_dtype(x.dtype, dtype, config)
    if x.shape[0] == 0:
        return _empty_batch(x, params, state, config, dtype, cdt)
    grouped = _grouped(x, mask, config, info)
    mean, stddev = _moving_statistics(state, grouped.fshape, cdt)
    rmax, dmax = _limits(config, state.step, cdt)
    scale, bias = _scale_and_bias(params, grouped.fshape, cdt)
    out_dtype = x.dtype if dtype is None else dtype
    spec = _Spec(config, grouped.axes, grouped.fshape, jnp.dtype(out_dtype), jnp.dtype(cdt))
    yg, stats = _normalize(spec, grouped, scale, bias, mean, stddev, rmax, dmax)
    y = yg.reshape(x.shape)
    new_state, diagnostics = _state_update(state, stats, grouped.groups, config, cdt, rmax, dmax)
    return y, new_state, diagnostics


def _empty_batch(x, params, state: BatchRenormState, config: BatchRenormConfig, dtype, cdt):
    """A batch of 0 examples: no statistic, no step, clip fractions 0.

    The output is the inference output, so that it keeps its (zero) gradient
    path to the parameters.
    """
    rmax, dmax = _limits(config, state.step, cdt)
    zero = jnp.zeros((), jnp.float32)
    y = inference(x, params, state, config, dtype=dtype)
    return y, state, Diagnostics(zero, zero, rmax, dmax, jnp.asarray(True), jnp.asarray(True))


class _Grouped(NamedTuple):
    """The batch as the normalization sees it: ``(G, k, ...)`` micro-batches, or the batch itself."""

    xg: jax.Array  # the input, grouped
    mg: jax.Array | None  # the mask (bool) in the same view, or None
    groups: int  # G; 1 when the whole batch is one group (then xg is x: no group axis)
    axes: tuple  # the reduced axes of xg: all but the group axis and the feature axis
    fshape: tuple  # broadcast shape of a per-(group, feature) value


def _grouped(x, mask, config: BatchRenormConfig, info) -> _Grouped:
    """``x`` and ``mask`` split into the normalization groups (``info``: from :func:`checked_input`).

    Micro-batches are a free reshape ``(B, ...) -> (G, k, ...)``: no
    transpose, no Python loop.
    """
    batch = x.shape[0]
    groups = 1 if config.microbatch_size is None else batch // config.microbatch_size
    if groups == 1:
        # The whole batch is one group: no group axis (XLA's CPU backward is
        # much slower with a leading axis of size 1).
        xg, mg, fax = x, mask, info.axis
        axes = tuple(i for i in range(xg.ndim) if i != fax)
    else:
        # (B, ...) -> (G, k, ...): the feature axis moves one to the right.
        xg = x.reshape((groups, batch // groups) + x.shape[1:])
        mg = None if mask is None else mask.reshape(xg.shape)
        fax = info.axis + 1
        axes = tuple(i for i in range(1, xg.ndim) if i != fax)
    return _Grouped(xg, mg, groups, axes, _feature_shape(xg.ndim, fax, info.num_features))


def _moving_statistics(state: BatchRenormState, fshape, cdt):
    """The moving ``mean`` and ``stddev`` in ``cdt``, shaped ``fshape``, constants for the gradient."""
    mean = lax.stop_gradient(state.mean).astype(cdt).reshape(fshape)
    stddev = lax.stop_gradient(state.stddev).astype(cdt).reshape(fshape)
    return mean, stddev


def _limits(config: BatchRenormConfig, step, cdt):
    """``(rmax, dmax)`` at ``step``, evaluated in at least float32 (a bfloat16 step count is coarse), in ``cdt``."""
    rmax, dmax = config.schedule.limits(step.astype(compute_dtype(cdt)), clip=jnp.clip)
    return jnp.asarray(rmax).astype(cdt), jnp.asarray(dmax).astype(cdt)


def _scale_and_bias(params: Mapping | None, fshape, cdt):
    """``params``' ``scale`` and ``bias`` in ``cdt``, shaped ``fshape``; ``None`` for a missing one."""
    scale = _param(params, "scale")
    bias = _param(params, "bias")
    scale = None if scale is None else jnp.asarray(scale).astype(cdt).reshape(fshape)
    bias = None if bias is None else jnp.asarray(bias).astype(cdt).reshape(fshape)
    return scale, bias


def _normalize(spec: _Spec, grouped: _Grouped, scale, bias, mean, stddev, rmax, dmax):
    """``y`` of the grouped view and its :class:`_GroupStats` (under ``stop_gradient``).

    By the explicit backward (``config.explicit_backward``) or by autodiff. The
    custom VJP returns a cotangent for each parameter: a missing ``scale`` is
    passed as 1 and a missing ``bias`` as 0.
    """
    if spec.config.explicit_backward:
        ones = jnp.ones(spec.fshape, spec.cdt)
        scale = _match_varying(ones if scale is None else scale, grouped.xg)
        bias = _match_varying(0 * ones if bias is None else bias, grouped.xg)
        spec = spec._replace(pool_size=_pool_size(spec.config))
        yg, stats = _renorm_explicit(spec, grouped.xg, grouped.mg, scale, bias, mean, stddev, rmax, dmax)
    else:
        yg, stats = _renorm(spec, grouped.xg, grouped.mg, scale, bias, mean, stddev, rmax, dmax)
    return yg, _GroupStats(*(None if v is None else lax.stop_gradient(v) for v in stats))


def _state_update(state: BatchRenormState, stats: _GroupStats, groups: int, config: BatchRenormConfig, cdt, rmax, dmax):
    """``(new_state, diagnostics)`` of a step whose groups measured ``stats``.

    The moving statistics move by ``1 - momentum`` towards the mean over groups
    (with a mask: those with a selected value, per feature) of ``mu_g`` and
    ``sigma_g``, and are kept when a statistic is not finite; ``step`` advances
    unless no value was selected.
    """
    num_features = state.mean.shape[0]
    mu_s = stats.mu.reshape(groups, num_features)
    sigma_s = stats.sigma.reshape(groups, num_features)
    finite = jnp.all(jnp.isfinite(mu_s)) & jnp.all(jnp.isfinite(sigma_s))
    alpha = jnp.asarray(1.0 - config.momentum, cdt)
    mean_v = state.mean.astype(cdt)
    std_v = state.stddev.astype(cdt)
    r_out = (stats.r_raw < 1.0 / rmax) | (stats.r_raw > rmax)
    d_out = (stats.d_raw < -dmax) | (stats.d_raw > dmax)
    if stats.n is None:
        averages = _over_groups(mu_s, sigma_s, finite, r_out, d_out)
    else:
        averages = _over_selected_groups(mu_s, sigma_s, finite, r_out, d_out, stats.n, cdt)
    new_mean = jnp.where(averages.update, mean_v + alpha * (averages.mean - mean_v), mean_v)
    new_std = jnp.where(averages.update, std_v + alpha * (averages.stddev - std_v), std_v)
    new_state = BatchRenormState(
        lax.stop_gradient(new_mean.astype(state.mean.dtype)),
        lax.stop_gradient(new_std.astype(state.stddev.dtype)),
        state.step + (~averages.empty).astype(state.step.dtype),
    )
    diagnostics = Diagnostics(
        r_clipped=averages.r_clipped,
        d_clipped=averages.d_clipped,
        rmax=rmax,
        dmax=dmax,
        finite=finite,
        empty=averages.empty,
    )
    return new_state, diagnostics


class _GroupAverages(NamedTuple):
    """Per feature, over the groups that have a statistic: what the state moves towards, and the clip fractions."""

    mean: jax.Array  # mean of mu_g
    stddev: jax.Array  # mean of sigma_g
    update: jax.Array  # () bool: move the moving statistics (every statistic finite, some value selected)
    empty: jax.Array  # () bool: no value selected at all (then no step)
    r_clipped: jax.Array  # fraction of the r entries with a statistic that the clip changed
    d_clipped: jax.Array


def _over_groups(mu_s, sigma_s, finite, r_out, d_out) -> _GroupAverages:
    """Without a mask every group has a statistic (``mu_s``, ``sigma_s``: shape ``(G, C)``)."""
    return _GroupAverages(
        mean=jnp.mean(mu_s, 0),
        stddev=jnp.mean(sigma_s, 0),
        update=finite,
        empty=jnp.asarray(False),
        r_clipped=jnp.mean(r_out, dtype=jnp.float32),
        d_clipped=jnp.mean(d_out, dtype=jnp.float32),
    )


def _over_selected_groups(mu_s, sigma_s, finite, r_out, d_out, n, cdt) -> _GroupAverages:
    """With a mask: per feature, the groups with a selected value (``n > 0``)."""
    has = (n > 0).reshape(mu_s.shape)
    used = jnp.sum(has, 0)  # per feature: the groups with a statistic
    div = jnp.maximum(used, 1).astype(cdt)
    batch_mean = jnp.sum(jnp.where(has, mu_s, 0), 0) / div
    batch_std = jnp.sum(jnp.where(has, sigma_s, 0), 0) / div
    update = finite & (used > 0)
    total = jnp.maximum(jnp.sum(has), 1).astype(jnp.float32)
    r_clipped = jnp.sum(r_out.reshape(has.shape) & has, dtype=jnp.float32) / total
    d_clipped = jnp.sum(d_out.reshape(has.shape) & has, dtype=jnp.float32) / total
    return _GroupAverages(batch_mean, batch_std, update, ~jnp.any(has), r_clipped, d_clipped)


def inference(
    x,
    params: Mapping[str, jax.Array] | None,
    state: BatchRenormState,
    config: BatchRenormConfig = BatchRenormConfig(),
    *,
    dtype=None,
):
    """``y = scale * (x - mean) / stddev + bias`` with the moving statistics only.

    Each example's output is independent of the rest of the batch; ``stddev``
    already includes epsilon. Returns ``y`` (dtype ``dtype`` or ``x.dtype``).

    >>> state = init_state(2)._replace(mean=jnp.array([1.0, 2.0]), stddev=jnp.array([2.0, 4.0]))
    >>> inference(jnp.array([[3.0, 2.0]]), {"bias": jnp.array([0.5, 0.5])}, state).tolist()
    [[1.5, 0.5]]
    """
    x, info = checked_input(x, config, training=False, num_features=state.mean.shape[0])
    ax, num_features = info.axis, info.num_features
    cdt = _compute_dtype(x.dtype, dtype, config)
    out_dtype = x.dtype if dtype is None else dtype
    fshape = _feature_shape(x.ndim, ax, num_features)
    mean = state.mean.astype(cdt).reshape(fshape)
    a = 1.0 / state.stddev.astype(cdt).reshape(fshape)
    scale = _param(params, "scale")
    bias = _param(params, "bias")
    if scale is not None:
        a = a * jnp.asarray(scale).astype(cdt).reshape(fshape)
    y = (x.astype(cdt) - mean) * a
    if bias is not None:
        y = y + jnp.asarray(bias).astype(cdt).reshape(fshape)
    return y.astype(out_dtype)
