"""TensorFlow's fused batch-norm op as a Keras layer: the fastest batch norm TensorFlow has.

``tf.compat.v1.nn.fused_batch_norm`` (``FusedBatchNormV3`` and its gradient
kernel) with moving averages of the mean and variance, as Keras 2's
``BatchNormalization(fused=True)`` used it; Keras 3 no longer calls it. A
baseline for the benchmarks only.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class FusedBatchNorm(keras.layers.Layer):
    """Batch norm over all axes but the last, on the fused kernels (2-D input is viewed as 4-D)."""

    def __init__(self, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.epsilon = momentum, epsilon

    def build(self, shape):
        c = shape[-1]
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=(c,), initializer="zeros", name="moving_mean", trainable=False)
        self.moving_var = self.add_weight(shape=(c,), initializer="ones", name="moving_var", trainable=False)

    def call(self, x, training=False):
        shape = tf.shape(x)
        x4 = x if x.shape.rank == 4 else tf.reshape(x, [shape[0], 1, 1, shape[-1]])
        if training:
            y, m, v = tf.compat.v1.nn.fused_batch_norm(
                x4, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
            )
            self.moving_mean.assign_sub((1 - self.momentum) * (self.moving_mean - m))
            self.moving_var.assign_sub((1 - self.momentum) * (self.moving_var - v))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x4, self.gamma, self.beta, self.moving_mean, self.moving_var, epsilon=self.epsilon, is_training=False
            )
        return tf.reshape(y, shape)
