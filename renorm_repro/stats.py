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


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"`df` must be an integer >= 1, got df={df!r}.")
    from scipy import stats  # here, not at the top: the command line checks its arguments before heavy imports

    return float(stats.t.ppf(0.975, df))


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
