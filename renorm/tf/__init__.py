"""TensorFlow / Keras 3 port of Batch Renormalization (imports TensorFlow and Keras only, never JAX).

``BatchRenormalization``, ``convert_batch_norm`` and ``export_batch_norm`` are
the multi-backend ones of :mod:`renorm.keras` (the same objects); on the
TensorFlow backend the layer runs the fused kernels of :mod:`renorm.tf.ops`.

- :class:`BatchRenormalization`: a ``keras.layers.Layer``, drop-in for
  ``keras.layers.BatchNormalization`` (it also accepts a batch norm's config);
- :func:`batch_renorm`: the pure function the layer calls, usable from raw
  TensorFlow code;
- :func:`convert_batch_norm` / :func:`export_batch_norm`: clone a Keras model
  with its batch norms turned into renorm layers (weights carried), and back
  into a plain Keras model with the same inference outputs.
"""

from renorm.tf.convert import convert_batch_norm, export_batch_norm
from renorm.tf.layer import BatchRenormalization, batch_norm_config_to_renorm
from renorm.tf.ops import BatchRenormOutput, batch_renorm, fused_eligible

__all__ = [
    "BatchRenormalization",
    "BatchRenormOutput",
    "batch_norm_config_to_renorm",
    "batch_renorm",
    "convert_batch_norm",
    "export_batch_norm",
    "fused_eligible",
]
