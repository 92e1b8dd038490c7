"""Keras 3's own ``BatchNormalization(renorm=True)``, configured to equal the paper, with its clip schedule.

The reproduction's ``keras_brn`` arms train with this layer instead of
:class:`renorm.tf.BatchRenormalization`: a second, independent implementation
of Batch Renorm in the loop. If the two arms disagree over seeds, one of them
has a bug; if both are unstable, it is the method.

Configured as the paper (section 3): ``renorm_momentum == momentum`` (Keras's
``renorm_mean``/``renorm_stddev`` are then the same averages as its
``moving_mean``/``moving_stddev``), ``rmin = 1 / rmax``. Keras's clipping
limits are constants; the paper ramps them from ``rmax = 1, dmax = 0`` (batch
norm) to their final values. :class:`ScheduledKerasRenorm` keeps Keras's
arithmetic (moments, ``r`` and ``d``, their composition with gamma and beta,
the updates of every moving statistic) and only swaps in the limits of the
schedule at its own ``step``, counted like :class:`renorm.tf.BatchRenormalization`
counts it (training calls so far; limits of step ``t`` used at the ``t``-th call).
It also keeps the same clip diagnostics (``r_clipped_fraction``,
``d_clipped_fraction``) so the logs of both arms have the same columns.
"""

from __future__ import annotations

import keras
from keras import ops

from renorm.schedule import ClipSchedule

__all__ = ["ScheduledKerasRenorm"]


class ScheduledKerasRenorm(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization(renorm=True)`` whose clipping limits follow a :class:`ClipSchedule`."""

    def __init__(self, schedule: ClipSchedule, momentum: float = 0.99, epsilon: float = 1e-3, **kwargs):
        self._schedule = schedule
        self._final_clipping = {
            "rmax": float(schedule.rmax),
            "rmin": 1.0 / float(schedule.rmax),
            "dmax": float(schedule.dmax),
        }
        super().__init__(
            momentum=momentum,
            epsilon=epsilon,
            renorm=True,
            renorm_momentum=momentum,
            renorm_clipping=dict(self._final_clipping),
            **kwargs,
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.step = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, autocast=False, name="step"
        )
        self.r_clipped_fraction = self.add_weight(
            shape=(), initializer="zeros", trainable=False, autocast=False, name="r_clipped_fraction"
        )
        self.d_clipped_fraction = self.add_weight(
            shape=(), initializer="zeros", trainable=False, autocast=False, name="d_clipped_fraction"
        )

    def _renorm_correction_and_moments(self, mean, variance):
        t = ops.cast(self.step, mean.dtype)
        rmax, dmax = self._schedule.limits(t, clip=ops.clip)
        limits = {"rmax": rmax, "rmin": 1.0 / rmax, "dmax": dmax}
        # Keras reads its limits from `renorm_clipping` inside this method; lend it this step's
        # (bypassing Keras's attribute tracking), then put the configured constants back.
        object.__setattr__(self, "renorm_clipping", limits)
        try:
            r, d, mean, variance = super()._renorm_correction_and_moments(mean, variance)
        finally:
            object.__setattr__(self, "renorm_clipping", self._final_clipping)
        # The unclipped r and d, as Keras computes them, for the clip diagnostics.
        renorm_stddev = ops.maximum(
            ops.cast(self.renorm_stddev, mean.dtype), ops.sqrt(ops.cast(self.epsilon, mean.dtype))
        )
        r_raw = ops.sqrt(variance + self.epsilon) / renorm_stddev
        d_raw = (mean - ops.cast(self.renorm_mean, mean.dtype)) / renorm_stddev
        self.r_clipped_fraction.assign(ops.cast(ops.mean(ops.cast(ops.not_equal(r, r_raw), "float32")), "float32"))
        self.d_clipped_fraction.assign(ops.cast(ops.mean(ops.cast(ops.not_equal(d, d_raw), "float32")), "float32"))
        self.step.assign_add(ops.cast(1, "int64"))
        return r, d, mean, variance

    @property
    def moving_statistics(self):
        """``(moving_mean, moving_stddev)``: the statistics inference uses (as ``sqrt(moving_variance + eps)``)."""
        return self.moving_mean, self.moving_stddev
