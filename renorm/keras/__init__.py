"""One Keras 3 layer for every Keras backend (TensorFlow, JAX, PyTorch).

- :class:`BatchRenormalization`: a ``keras.layers.Layer``, drop-in for
  ``keras.layers.BatchNormalization``, its math written once in ``keras.ops``;
  on the TensorFlow backend it runs the fused TF kernels of
  :mod:`renorm.tf.ops` (``renorm.tf.BatchRenormalization`` is the same class);
- :func:`convert_batch_norm` / :func:`export_batch_norm`: clone a Keras model
  with its batch norms turned into renorm layers (weights carried), and back.

Imports Keras only; TensorFlow is imported when the backend is TensorFlow.
"""

from renorm.keras.convert import convert_batch_norm, export_batch_norm
from renorm.keras.layer import BatchRenormalization, batch_norm_config_to_renorm

__all__ = ["BatchRenormalization", "batch_norm_config_to_renorm", "convert_batch_norm", "export_batch_norm"]
