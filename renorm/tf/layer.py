"""The TensorFlow backend of ``BatchRenormalization``: the layer's call on the fused TF kernels.

:class:`BatchRenormalization` is one Keras 3 layer for every backend
(:mod:`renorm.keras.layer`); ``renorm.tf.BatchRenormalization`` is the same
class. On the TensorFlow backend its ``call`` is :func:`tf_call`, which runs
:func:`renorm.tf.ops.batch_renorm` (fused kernels where they apply) and
assigns the state with ``tf.distribute``'s rules.
"""

from __future__ import annotations

import tensorflow as tf

from renorm.keras.layer import BatchRenormalization, _constant_value, batch_norm_config_to_renorm
from renorm.tf.ops import _batch_renorm, _cross_replica

__all__ = ["BatchRenormalization", "batch_norm_config_to_renorm", "tf_call", "tf_limits"]
_constant_value = _constant_value  # re-exported: renorm.tf.layer._constant_value was importable before


def tf_limits(self):
    """``(rmax(t), dmax(t))`` of a scheduled layer, from its ``step`` weight (in float64)."""
    s = self.schedule
    t = tf.cast(tf.convert_to_tensor(self.step), tf.float64)
    return s.limits(t, clip=tf.clip_by_value)


def tf_call(self, inputs, training, mask):
    """``BatchRenormalization.call`` on the TensorFlow backend (``training`` already a bool)."""
    x = tf.convert_to_tensor(inputs)
    # batch_renorm raises the input errors of docs/SPEC.md, section 10 (dtype, rank, axis,
    # features against moving_mean, divisibility, group size) before any op runs.
    rmax, dmax = self.limits() if training else (self.rmax, self.dmax)
    # The limits need no check in the graph: the schedule was validated at construction.
    out = _batch_renorm(
        x,
        None if self.gamma is None else tf.convert_to_tensor(self.gamma),
        None if self.beta is None else tf.convert_to_tensor(self.beta),
        tf.convert_to_tensor(self.moving_mean),
        tf.convert_to_tensor(self.moving_stddev),
        training=training,
        rmax=rmax,
        dmax=dmax,
        momentum=self.momentum,
        epsilon=self.epsilon,
        axis=self.axis,
        microbatch_size=self.microbatch_size,
        synchronized=self.synchronized,
        explicit_gradient=self.explicit_gradient,
        fused=self.fused,
        mask=mask,
    )
    if training:
        _update(self, out)
    return tf.cast(out.y, self.compute_dtype)


def _update(self, out):
    """Assign the new state of a training step.

    Every replica assigns every variable (a mirrored assignment is a
    synchronization point), an empty batch its old values. The assignments
    wait for the output, so that a failed run-time check changes nothing.
    """
    with tf.control_dependencies([out.y]):
        self.moving_mean.assign(out.moving_mean)
        self.moving_stddev.assign(out.moving_stddev)
        r_frac = tf.cast(out.r_clipped_fraction, self._r_clipped.dtype)
        d_frac = tf.cast(out.d_clipped_fraction, self._d_clipped.dtype)
        advance = tf.constant(1, "int64")
        if tf.get_static_value(out.empty) is not False:  # possibly empty: keep the step and diagnostics
            r_frac = tf.where(out.empty, tf.convert_to_tensor(self._r_clipped), r_frac)
            d_frac = tf.where(out.empty, tf.convert_to_tensor(self._d_clipped), d_frac)
            advance = tf.cast(tf.logical_not(out.empty), "int64")
            if _cross_replica():
                # The step is a step of the global batch: it advances on every replica when any
                # replica had examples. "only_first_replica" takes each worker's own first
                # replica under MultiWorkerMirroredStrategy, so a worker whose replica got 0
                # examples would otherwise fall one step behind the others.
                ctx = tf.distribute.get_replica_context()
                seen = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(advance, tf.float32))
                advance = tf.cast(seen > 0, "int64")
        self._r_clipped.assign(r_frac)
        self._d_clipped.assign(d_frac)
        self.step.assign_add(advance)
