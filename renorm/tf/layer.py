"""``renorm.tf.BatchRenormalization``: the Keras layer of :mod:`renorm.keras.layer`, under its TensorFlow name.

One class for every Keras backend: :class:`BatchRenormalization` owns its
variables and their update, and on the TensorFlow backend computes each step
with :func:`renorm.tf.batch_renorm` (:mod:`renorm.tf.ops`, the fused kernels
where they apply). This module only gives it, and
:func:`batch_norm_config_to_renorm`, their TensorFlow names.
"""

from __future__ import annotations

from renorm.keras.layer import BatchRenormalization, batch_norm_config_to_renorm

__all__ = ["BatchRenormalization", "batch_norm_config_to_renorm"]
