"""``BatchRenorm`` for ``flax.linen``: a drop-in for ``flax.linen.BatchNorm``."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax.nn import initializers

from renorm.config import normalize_axis
from renorm.jax import functional as F

__all__ = ["BatchRenorm"]


def _groups_ok(shape, axis, microbatch_size) -> bool:
    """Whether a training call could split an input of ``shape`` into groups of >= 2 values per feature.

    True also where the input is wrong in another way (rank, axis) or empty: the usual checks and
    rules then apply.
    """
    try:
        ax = normalize_axis(axis, len(shape))
    except (TypeError, ValueError):
        return True
    if shape[0] == 0:
        return True
    k = shape[0] if microbatch_size is None else microbatch_size
    per_example = math.prod(s for i, s in enumerate(shape) if i not in (0, ax))
    return shape[0] % k == 0 and k * per_example >= 2


class BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe, 2017, arXiv:1702.03275) as a linen module.

    A drop-in for :class:`flax.linen.BatchNorm`: the same fields and defaults
    (``use_running_average`` with the same merge semantics, ``axis=-1``,
    ``momentum=0.99``, ``epsilon=1e-5``, ``dtype``, ``param_dtype``,
    ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
    ``axis_index_groups``, ``use_fast_variance``, ``force_float32_reductions``,
    and the call's ``mask``) plus the renorm fields. In training
    (``use_running_average=False``) each group of examples (``microbatch_size``,
    or the whole batch) is normalized with its own statistics and corrected
    by ``r`` and ``d`` towards the moving statistics, within the clipping
    schedule's limits; in inference only the moving statistics enter. The
    algorithm, and what an empty batch, a non-finite batch and a mask do, are
    written once in ``docs/SPEC.md`` (sections 2-5; the numerics, section 8);
    :mod:`renorm.jax.functional` computes it.

    Variables: params ``scale``, ``bias`` (shape ``(C,)``, ``param_dtype``);
    ``batch_stats`` ``mean`` (zeros), ``stddev`` (ones; the moving standard
    deviation, epsilon included, not a variance) in
    ``promote_types(param_dtype, float32)`` (``param_dtype`` itself with
    ``force_float32_reductions=False``), and ``step`` (int32, the number of
    training steps taken, which drives the clipping schedule). As with
    ``BatchNorm``, the statistics are not updated while initializing, and
    ``init`` works on any batch, even one whose groups hold 1 value per
    feature (one 32x32 example whose last stage is 1x1): there it returns
    the inference output. A float ``step`` (``lax.pmean`` over
    ``batch_stats`` makes one) is read rounded and stored as int32 again by
    the next training call.

    Diagnostics: each training call (not at init) sows the fraction of ``r``
    and ``d`` entries that the clip changed as ``r_clipped`` and ``d_clipped``
    into the ``'intermediates'`` collection; pass
    ``mutable=['batch_stats', 'intermediates']`` to read them (a no-op
    otherwise).

    Flax specifics: a training call that is no step (a batch of 0 examples,
    or a mask that selects nothing) leaves ``batch_stats`` as they were and
    sows nothing, or clip fractions of 0 for the mask; the mask is Flax's,
    broadcastable to ``x`` (so a selection may differ from feature to
    feature), and the output at unselected positions is not zeroed, as in
    ``BatchNorm``.

    Differences from ``BatchNorm``: ``use_fast_variance`` defaults to False
    (``E[x^2] - E[x]^2`` cancels to 0 on offset data such as
    ``1000 + 0.01 * noise`` in float32, which gives a wrong ``r``); with
    ``dtype=None`` the output has the input's dtype (statistics and
    normalization still run in at least float32, unless
    ``force_float32_reductions=False``).

    Attributes:
      rmax: final upper limit on ``r`` (lower limit ``1/rmax``), >= 1.
      dmax: final limit on ``|d|``, >= 0.
      warmup_steps, rmax_steps, dmax_steps: the clipping schedule
        (:class:`renorm.ClipSchedule`); defaults: constant limits.
      explicit_backward: differentiate with the paper's explicit backward
        (a custom VJP, the default: faster, and it keeps only the input for
        the backward pass) or, if False, with plain autodiff.
      microbatch_size: normalize groups of this many consecutive examples
        with their own statistics (``None``: the whole batch). Cannot be
        combined with ``axis_name``.
      force_float32_reductions: as in ``BatchNorm``: True (default) computes
        the statistics and the normalization in at least float32; False in
        ``dtype``, or the input's dtype when ``dtype`` is None (bfloat16 in,
        bfloat16 statistics), with ``batch_stats`` ``mean``/``stddev`` in
        ``param_dtype``.

    Example:

    >>> import jax
    >>> layer = BatchRenorm(use_running_average=False, microbatch_size=2)
    >>> x = jax.random.normal(jax.random.key(0), (4, 3))
    >>> variables = layer.init(jax.random.key(1), x)
    >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    >>> y.shape, int(updates["batch_stats"]["step"])
    ((4, 3), 1)
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any | None = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    explicit_backward: bool = True
    rmax: float = 3.0
    dmax: float = 5.0
    warmup_steps: int = 0
    rmax_steps: int = 0
    dmax_steps: int = 0
    microbatch_size: int | None = None
    force_float32_reductions: bool = True

    def __post_init__(self):
        self.config()  # validate at construction: a clear error, never a wrong result
        super().__post_init__()

    def config(self, pooled: bool = True) -> F.BatchRenormConfig:
        """The functional configuration (``pooled=False`` drops ``axis_name``)."""
        return F.BatchRenormConfig.from_module(self, pooled)

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes ``x``; training updates ``batch_stats`` unless initializing.

        Args:
          x: the input, batch on axis 0, features on ``axis``.
          use_running_average: if True, use the moving statistics (inference);
            if False, batch statistics with the renorm correction (training).
            Overrides the field; one of the two must be given.
          mask: optional array broadcastable to ``x`` (True or nonzero
            selects): the values the batch statistics are computed from, as
            in ``BatchNorm``. A wrong shape or dtype is an error naming
            ``mask``.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        initializing = self.is_initializing()
        if not use_running_average and initializing and not _groups_ok(jnp.shape(x), self.axis, self.microbatch_size):
            # Like BatchNorm, init computes no state: a batch too small to be split into groups of
            # at least 2 values (one 32x32 example whose last stage is 1x1) still builds the variables.
            use_running_average = True
        x, info = F.checked_input(x, self.config(pooled=False), training=not use_running_average)
        mask = F.checked_mask(mask, x)
        shape = (info.num_features,)
        state_dtype = (
            jnp.promote_types(self.param_dtype, jnp.float32) if self.force_float32_reductions else self.param_dtype
        )
        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, state_dtype), shape)
        stddev = self.variable("batch_stats", "stddev", lambda s: jnp.ones(s, state_dtype), shape)
        step = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        if mean.value.shape != shape:  # built for another feature size: say so before flax's shape error
            F.checked_input(x, self.config(pooled=False), training=False, num_features=mean.value.shape[0])
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, shape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, shape, self.param_dtype)
        state = F.BatchRenormState(mean.value, stddev.value, step.value)

        if use_running_average:
            return F.inference(x, params, state, self.config(pooled=False), dtype=self.dtype)

        # Like BatchNorm: at init the pooling axis need not exist.
        y, new_state, diag = F.train(
            x, params, state, self.config(pooled=not initializing), dtype=self.dtype, mask=mask
        )
        if not initializing and x.shape[0] > 0:  # an empty batch is no step: nothing changes, nothing is sown
            mean.value, stddev.value, step.value = new_state
            self.sow("intermediates", "r_clipped", diag.r_clipped)
            self.sow("intermediates", "d_clipped", diag.d_clipped)
        return y
