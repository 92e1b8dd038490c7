"""renorm: Batch Renormalization (Ioffe, 2017, arXiv:1702.03275).

``renorm`` itself is framework-free (NumPy only): :class:`ClipSchedule`, the
clipping schedule every backend evaluates, and in :mod:`renorm.config` the
configuration and input checks they all share. The five backends each import
only their own framework:

- ``renorm.numpy_ref``: the NumPy oracle, which every port is tested against;
- ``renorm.keras``: a Keras 3 layer for every Keras backend (TensorFlow, JAX,
  PyTorch), with converters from and to Keras' batch norm;
- ``renorm.tf``: the same layer on TensorFlow's fused kernels, and
  :func:`renorm.tf.batch_renorm`, the pure TensorFlow function it calls;
- ``renorm.jax``: Flax linen and nnx modules and a functional core;
- ``renorm.torch``: PyTorch modules, drop-ins for ``torch.nn.BatchNorm*d``.

The algorithm, and every rule the backends share, is ``docs/SPEC.md``.

>>> import renorm
>>> renorm.ClipSchedule.batch_norm()  # rmax = 1, dmax = 0 at every step: plain batch norm
ClipSchedule(rmax=1.0, dmax=0.0, warmup_steps=0, rmax_steps=0, dmax_steps=0)
"""

from renorm.schedule import PAPER_TOTAL_STEPS, ClipSchedule

__version__ = "0.1.0"

__all__ = ["ClipSchedule", "PAPER_TOTAL_STEPS", "__version__"]
