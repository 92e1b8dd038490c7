"""Statistics over seeds, framework-free: means with 95% confidence intervals, paired differences.

Seeds are the experimental units. A run's scalar (final accuracy, mean of the
last evaluations, worst dip) is one observation per seed; an arm's value is the
mean over seeds with a two-sided 95% Student-t interval. Two arms trained with
the same seed share the initial weights and the data order, so their
comparison is *paired*: the per-seed differences ``b - a`` and their mean with a
t interval, which removes the seed-to-seed variation that both arms share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["t_quantile_975", "mean_ci", "paired_difference"]

# Two-sided 95% quantiles of Student's t (the 0.975 quantile) for 1..30 degrees of freedom.
_T975 = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a table to 30; then a 1/df expansion)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"`df` must be an integer >= 1, got df={df!r}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    # Cornish-Fisher expansion in 1/df (error < 2e-6 beyond 30 degrees of freedom).
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "sd", "n", "half_width", "lo", "hi"}``: the mean and its two-sided 95% t interval.

    With one value the interval is undefined: ``half_width`` is NaN.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("mean_ci needs at least one value.")
    mean = sum(vals) / n
    if n == 1:
        sd = half = float("nan")
    else:
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "half_width": half, "lo": mean - half, "hi": mean + half}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, object]:
    """``b - a`` over the seeds both hold: :func:`mean_ci` of the differences, the seeds and each difference.

    ``wins`` counts the seeds where ``b > a``.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"No seed in common: a has {sorted(a)}, b has {sorted(b)}.")
    diffs = [float(b[s]) - float(a[s]) for s in seeds]
    out = dict(mean_ci(diffs))
    out.update({"seeds": seeds, "differences": diffs, "wins": sum(d > 0 for d in diffs)})
    return out
