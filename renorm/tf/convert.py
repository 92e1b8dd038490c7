"""Batch norm in, batch norm out: the Keras converters (:mod:`renorm.keras.convert`), for every Keras backend.

``renorm.tf.convert_batch_norm`` and ``renorm.tf.export_batch_norm`` are
:func:`renorm.keras.convert_batch_norm` and :func:`renorm.keras.export_batch_norm`.
"""

from renorm.keras.convert import convert_batch_norm, export_batch_norm

__all__ = ["convert_batch_norm", "export_batch_norm"]
