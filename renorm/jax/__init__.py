"""Batch Renormalization for JAX / Flax (imports no TensorFlow).

- :class:`renorm.jax.BatchRenorm`: a ``flax.linen`` module, drop-in for
  ``flax.linen.BatchNorm``;
- :class:`renorm.jax.nnx.BatchRenorm`: the same for ``flax.nnx``;
- :mod:`renorm.jax.functional`: the pure, jit-able core
  (``train``/``inference`` of ``(x, params, state, config)``);
- :func:`convert_batch_norm` / :func:`export_batch_norm`: linen variables of
  a ``nn.BatchNorm`` model to those of the same model with ``BatchRenorm``,
  and back (``renorm.jax.nnx`` has the same two for whole nnx models).
"""

from renorm.jax import functional
from renorm.jax.convert import convert_batch_norm, export_batch_norm
from renorm.jax.functional import BatchRenormConfig, BatchRenormState, Diagnostics, inference, init_state, train
from renorm.jax.linen import BatchRenorm

__all__ = [
    "BatchRenorm",
    "BatchRenormConfig",
    "BatchRenormState",
    "convert_batch_norm",
    "export_batch_norm",
    "Diagnostics",
    "functional",
    "inference",
    "init_state",
    "train",
]
