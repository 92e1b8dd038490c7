"""The NumPy reference implementation: the oracle every port is checked against."""

from renorm.numpy_ref.core import (
    TrainCache,
    TrainResult,
    compute_dtype,
    corrections,
    group_view,
    inference_forward,
    is_floating_dtype,
    masked_moments,
    moments,
    train_backward,
    train_forward,
    ungroup,
)
from renorm.numpy_ref.layer import BatchRenormReference

__all__ = [
    "BatchRenormReference",
    "TrainCache",
    "TrainResult",
    "compute_dtype",
    "corrections",
    "group_view",
    "inference_forward",
    "is_floating_dtype",
    "masked_moments",
    "moments",
    "train_backward",
    "train_forward",
    "ungroup",
]
