"""``BatchRenorm`` for ``flax.nnx``: a drop-in for ``flax.nnx.BatchNorm``."""

from __future__ import annotations

import typing as tp

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.nnx.module import first_from

from renorm.config import check_num_features
from renorm.jax import functional as F

__all__ = ["BatchRenorm", "BatchRenormDiagnostic"]

_MISSING_FLAG = (
    "No `use_running_average` argument was provided to BatchRenorm. Consider one of the following options:\n\n"
    "1. Pass `use_running_average` to the constructor:\n\n"
    "  self.bn = BatchRenorm(..., use_running_average=True/False)\n\n"
    "2. Pass `use_running_average` to __call__:\n\n"
    "  self.bn(x, use_running_average=True/False)\n\n"
    "3. Call `model.train()` / `model.eval()`, or use `nnx.view(model, use_running_average=True/False)`.\n"
)


class BatchRenormDiagnostic(nnx.Variable):
    """A diagnostic of the last training step (not a parameter, not a statistic)."""


class BatchRenorm(nnx.Module):
    """Batch Renormalization (Ioffe, 2017, arXiv:1702.03275) for ``flax.nnx``.

    A drop-in for :class:`flax.nnx.BatchNorm` (same arguments and defaults:
    ``use_running_average=False``, ``axis=-1``, ``momentum=0.99``,
    ``epsilon=1e-5``, ...) plus ``rmax``, ``dmax``, ``warmup_steps``,
    ``rmax_steps``, ``dmax_steps``, ``microbatch_size``; ``model.train()`` and
    ``model.eval()`` switch it like ``BatchNorm``. The math and numerics are
    those of :class:`renorm.jax.BatchRenorm` (linen) and
    :mod:`renorm.jax.functional`.

    State: ``scale``, ``bias`` (:class:`nnx.Param`); ``mean``, ``stddev``
    (moving standard deviation, epsilon included), ``step`` (int32)
    (:class:`nnx.BatchStat`); ``r_clipped``, ``d_clipped``
    (:class:`BatchRenormDiagnostic`): the fraction of ``r``/``d`` entries the
    clip changed in the last training step.

    A training call on a batch of 0 examples returns an empty output and
    changes no state (statistics, ``step``, diagnostics). ``num_features``
    must be an integer >= 1.

    Differences from ``nnx.BatchNorm``: ``use_fast_variance`` defaults to
    False (the fast formula cancels to 0 on offset data in float32); with
    ``dtype=None`` the output has the input's dtype; no ``mask`` or
    ``promote_dtype``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: tp.Optional[bool] = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init=initializers.zeros_init(),
        scale_init=initializers.ones_init(),
        axis_name: tp.Optional[str] = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = False,
        explicit_backward: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        rmax_steps: int = 0,
        dmax_steps: int = 0,
        microbatch_size: tp.Optional[int] = None,
        rngs: nnx.Rngs,
    ):
        self.num_features = num_features = check_num_features(num_features)
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.explicit_backward = explicit_backward
        self.rmax = rmax
        self.dmax = dmax
        self.warmup_steps = warmup_steps
        self.rmax_steps = rmax_steps
        self.dmax_steps = dmax_steps
        self.microbatch_size = microbatch_size
        self.config()  # validate at construction

        shape = (num_features,)
        state_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros(shape, state_dtype))
        self.stddev = nnx.BatchStat(jnp.ones(shape, state_dtype))
        self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale else nnx.data(None)
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else nnx.data(None)
        self.r_clipped = BatchRenormDiagnostic(jnp.zeros((), jnp.float32))
        self.d_clipped = BatchRenormDiagnostic(jnp.zeros((), jnp.float32))

    def config(self) -> F.BatchRenormConfig:
        """The functional configuration of the current attributes (validated)."""
        return F.BatchRenormConfig.from_module(self)

    def __call__(self, x, use_running_average: tp.Optional[bool] = None):
        """Normalizes ``x``; in training updates the statistics and diagnostics."""
        use_running_average = first_from(
            use_running_average, self.use_running_average, error_msg=_MISSING_FLAG
        )
        params = {}
        if self.scale is not None:
            params["scale"] = self.scale[...]
        if self.bias is not None:
            params["bias"] = self.bias[...]
        state = F.BatchRenormState(self.mean[...], self.stddev[...], self.step[...])
        config = self.config()
        if use_running_average:
            return F.inference(x, params, state, config, dtype=self.dtype)
        y, new_state, diag = F.train(x, params, state, config, dtype=self.dtype)
        if jnp.shape(x)[0] == 0:  # an empty batch is no step: statistics, step and diagnostics stay
            return y
        self.mean[...] = new_state.mean
        self.stddev[...] = new_state.stddev
        self.step[...] = new_state.step
        self.r_clipped[...] = diag.r_clipped
        self.d_clipped[...] = diag.d_clipped
        return y

    def set_view(self, use_running_average: tp.Optional[bool] = None):
        """Used by ``nnx.view``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
