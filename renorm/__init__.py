"""renorm: Batch Renormalization (Ioffe, 2017, arXiv:1702.03275).

``renorm`` itself is framework-free (NumPy only): the clipping schedule and
the configuration checks that every backend shares. The backends are
``renorm.numpy_ref`` (the oracle), ``renorm.tf`` (Keras 3 layer) and
``renorm.jax`` (Flax modules); each imports only its own framework.
"""

from renorm.config import (
    check_config,
    check_input,
    check_num_features,
    check_pooling,
    check_schedule,
    normalize_axis,
)
from renorm.schedule import PAPER_TOTAL_STEPS, ClipSchedule

__version__ = "0.1.0"

__all__ = [
    "ClipSchedule",
    "PAPER_TOTAL_STEPS",
    "check_config",
    "check_input",
    "check_num_features",
    "check_pooling",
    "check_schedule",
    "normalize_axis",
    "__version__",
]
