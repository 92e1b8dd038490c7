"""The batch norm <-> batch renorm state conversion, once, for every backend (NumPy only).

At inference Batch Renormalization is batch norm whose ``variance + epsilon``
is ``stddev**2`` (``docs/SPEC.md``, section 14)::

    stddev   = sqrt(variance + epsilon)        batch norm -> renorm
    variance = stddev**2 - epsilon             renorm -> batch norm

Both are computed in float64; the caller rounds once to its variable dtype.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["NEGATIVE_VARIANCE", "check_negative_variance", "stddev_from_variance", "variance_from_stddev"]

NEGATIVE_VARIANCE = ("raise", "clamp")


def check_negative_variance(negative_variance) -> str:
    if negative_variance not in NEGATIVE_VARIANCE:
        raise ValueError(
            f"`negative_variance` must be 'raise' or 'clamp', got negative_variance={negative_variance!r}."
        )
    return negative_variance


def stddev_from_variance(variance, epsilon: float, *, name: str) -> np.ndarray:
    """``sqrt(variance + epsilon)`` in float64; a negative variance is an error naming the layer."""
    variance = np.asarray(variance, np.float64)
    if np.any(variance < 0) or not np.all(np.isfinite(variance)):
        raise ValueError(
            f"Layer {name!r} has a negative or non-finite moving variance (smallest {np.nanmin(variance)!r}); "
            "it cannot be converted to a standard deviation."
        )
    return np.sqrt(variance + float(epsilon))


def variance_from_stddev(stddev, epsilon: float, *, name: str, negative_variance: str = "raise", stacklevel=3):
    """``stddev**2 - epsilon`` in float64, >= 0.

    A trained state has ``stddev >= sqrt(epsilon)`` (every group's
    ``sigma_g`` is). Values at most 8 units of the state's float type below
    ``sqrt(epsilon)`` are rounding and give variance 0 (the output then
    differs by that rounding). A ``stddev`` further below has no batch-norm
    equivalent: ``negative_variance="raise"`` raises a ``ValueError`` naming
    the layer, ``"clamp"`` gives variance 0 there with a warning naming the
    layer and the factor by which those outputs shrink.
    """
    check_negative_variance(negative_variance)
    stddev_in = np.asarray(stddev)
    ulp = np.finfo(stddev_in.dtype).eps if np.issubdtype(stddev_in.dtype, np.floating) else np.finfo(np.float64).eps
    stddev = stddev_in.astype(np.float64)
    eps = float(epsilon)
    bad = ~(stddev >= math.sqrt(eps) * (1.0 - 8 * ulp))  # NaN counts as bad
    if np.any(bad):
        worst = float(np.nanmin(stddev[bad])) if np.any(~np.isnan(stddev[bad])) else float("nan")
        factor = worst / math.sqrt(eps)
        what = (
            f"Layer {name!r}: {int(bad.sum())} feature(s) have a moving stddev below sqrt(epsilon) = "
            f"{math.sqrt(eps):.6g} (smallest {worst:.6g}), so stddev**2 - epsilon is negative and no batch "
            "norm has the same output there"
        )
        if negative_variance == "raise":
            raise ValueError(
                what + ". Pass negative_variance='clamp' to export with variance 0 there (those outputs "
                f"then shrink by a factor down to {factor:.6g}), or fix the state."
            )
        warnings.warn(
            what + f"; exported with variance 0 there (outputs shrink by a factor down to {factor:.6g}).",
            stacklevel=stacklevel,
        )
    return np.where(bad, 0.0, np.maximum(np.square(stddev) - eps, 0.0))
