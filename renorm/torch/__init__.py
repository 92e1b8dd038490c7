"""Batch Renormalization for PyTorch (imports no TensorFlow or JAX).

- :class:`BatchRenorm1d`, :class:`BatchRenorm2d`, :class:`BatchRenorm3d`:
  drop-ins for ``torch.nn.BatchNorm1d``/``2d``/``3d`` (:class:`BatchRenorm`
  takes any rank >= 2, features on dim 1);
- :mod:`renorm.torch.functional`: the core, with the paper's explicit
  backward as a ``torch.autograd.Function`` (:class:`BatchRenormFunction`);
- :func:`convert_batch_norm` / :func:`export_batch_norm`: every batch norm of
  a model to batch renorm and back, in the style of
  ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
"""

from renorm.torch import functional
from renorm.torch.convert import convert_batch_norm, export_batch_norm
from renorm.torch.functional import BatchRenormFunction
from renorm.torch.modules import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = [
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchRenormFunction",
    "convert_batch_norm",
    "export_batch_norm",
    "functional",
]
