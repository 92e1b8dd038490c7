"""Batch Renormalization for JAX / Flax (imports no TensorFlow).

- :class:`renorm.jax.BatchRenorm`: a ``flax.linen`` module, drop-in for
  ``flax.linen.BatchNorm``;
- :class:`renorm.jax.nnx.BatchRenorm`: the same for ``flax.nnx``;
- :mod:`renorm.jax.functional`: the pure, jit-able core
  (``train``/``inference`` of ``(x, params, state, config)``).
"""

from renorm.jax import functional
from renorm.jax.functional import BatchRenormConfig, BatchRenormState, Diagnostics, inference, init_state, train
from renorm.jax.linen import BatchRenorm

__all__ = [
    "BatchRenorm",
    "BatchRenormConfig",
    "BatchRenormState",
    "Diagnostics",
    "functional",
    "inference",
    "init_state",
    "train",
]
