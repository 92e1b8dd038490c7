"""TensorFlow / Keras 3 port of Batch Renormalization (imports TensorFlow and Keras only, never JAX).

- :class:`BatchRenormalization`: a ``keras.layers.Layer``, drop-in for
  ``keras.layers.BatchNormalization``.
- :func:`batch_renorm`: the pure function the layer calls, usable from raw
  TensorFlow code.
"""

from renorm.tf.layer import BatchRenormalization
from renorm.tf.ops import BatchRenormOutput, batch_renorm, fused_eligible

__all__ = ["BatchRenormalization", "BatchRenormOutput", "batch_renorm", "fused_eligible"]
