"""The NumPy oracle: Batch Renormalization forward, explicit backward, inference.

Pure functions of arrays; no state is mutated. They are the specification (``docs/SPEC.md``: the groups of
section 2, the training step and its masks of section 3, inference of section 4, the explicit backward of section
6, the precision of section 8) written as directly as NumPy allows, in float64 for float64 input and in float32
for every narrower float, so that every port is compared with the same numbers. :class:`BatchRenormReference`
wraps them into a layer with state.

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 4))
>>> res = train_forward(x, None, None, np.zeros(4), np.ones(4), rmax=3.0, dmax=5.0, momentum=0.9, epsilon=1e-3)
>>> dx, dgamma, dbeta = train_backward(np.ones_like(x), res.cache)
>>> res.y.shape, bool(np.allclose(dx, 0.0))   # dL/dx of sum(y) is 0: each group's gradient sums to 0
((8, 4), True)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from renorm.config import check_config, check_input, check_mask

__all__ = [
    "TrainCache",
    "TrainResult",
    "group_view",
    "moments",
    "masked_moments",
    "corrections",
    "train_forward",
    "train_backward",
    "inference_forward",
    "compute_dtype",
    "is_floating_dtype",
]


def is_floating_dtype(dtype: DTypeLike) -> bool:
    """True for NumPy floats and the ml_dtypes ones (bfloat16, ...).

    >>> is_floating_dtype(np.float16), is_floating_dtype(np.int32)
    (True, False)
    """
    dtype = np.dtype(dtype)
    return bool(np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat", "float")))


def compute_dtype(dtype: DTypeLike) -> np.dtype:
    """float64 stays float64; every narrower float is computed in float32.

    >>> compute_dtype(np.float16), compute_dtype(np.float64)
    (dtype('float32'), dtype('float64'))
    """
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating) and dtype.itemsize >= 8:
        return dtype
    return np.dtype(np.float32)


def group_view(x: np.ndarray, axis: int, microbatch_size: int | None) -> np.ndarray:
    """``x`` as ``(G, m, C)``: groups, values per feature in a group, features.

    ``axis`` is the non-negative feature axis (not 0). The feature axis moves
    last; examples ``[g*k, (g+1)*k)`` and all their other positions form row
    ``g``. :func:`ungroup` is the inverse.

    >>> group_view(np.zeros((8, 3, 5)), axis=2, microbatch_size=2).shape   # 4 groups of 2 x 3 values, 5 features
    (4, 6, 5)
    """
    xt = np.moveaxis(x, axis, -1)
    if x.shape[0] == 0:  # no example, no group
        per_example = int(np.prod(xt.shape[1:-1]))
        return xt.reshape(0, (microbatch_size or 1) * per_example, xt.shape[-1])
    groups = 1 if microbatch_size is None else x.shape[0] // microbatch_size
    return xt.reshape(groups, -1, xt.shape[-1])


def ungroup(xg: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Inverse of :func:`group_view` for an input of shape ``shape``.

    >>> x = np.arange(24.0).reshape(4, 3, 2)
    >>> bool(np.array_equal(ungroup(group_view(x, 1, 2), x.shape, 1), x))
    True
    """
    moved = list(shape)
    moved.append(moved.pop(axis))
    return np.moveaxis(xg.reshape(moved), -1, axis)


def moments(xg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean and biased variance of ``xg`` (``(G, m, C)``), two-pass.

    The variance is ``mean((x - mu)**2)``, never ``E[x^2] - E[x]^2``, which
    cancels to 0 on offset data such as ``1000 + 0.01 * noise`` in float32.
    Returns ``mu`` and ``var`` of shape ``(G, C)``.

    >>> mu, var = moments(np.array([[[1.0], [3.0]]]))   # one group of two values, one feature
    >>> float(mu[0, 0]), float(var[0, 0])
    (2.0, 1.0)
    """
    mu = xg.mean(axis=1)
    var = np.square(xg - mu[:, None, :]).mean(axis=1)
    return mu, var


def masked_moments(xg: np.ndarray, wg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`moments` over the selected values only: ``wg`` (``(G, m, C)``, bool) selects.

    ``mu = sum of the selected x / n``, ``var = sum of the selected
    (x - mu)**2 / n`` with ``n`` the number of selected values per group and
    feature. Unselected values do not enter, even NaN or Inf ones. Returns
    ``mu``, ``var`` and ``n`` of shape ``(G, C)``; where ``n = 0``, ``mu`` and
    ``var`` are 0 (there is no statistic: the caller decides).

    >>> xg = np.array([[[1.0], [3.0], [100.0]]])
    >>> mu, var, n = masked_moments(xg, np.array([[[True], [True], [False]]]))
    >>> float(mu[0, 0]), float(var[0, 0]), int(n[0, 0])
    (2.0, 1.0, 2)
    """
    n = wg.sum(axis=1)
    div = np.maximum(n, 1).astype(xg.dtype)
    xs = np.where(wg, xg, 0)
    mu = xs.sum(axis=1) / div
    var = np.where(wg, np.square(xs - mu[:, None, :]), 0).sum(axis=1) / div
    return mu, var, n


def corrections(
    mu_g: np.ndarray,
    sigma_g: np.ndarray,
    mean: np.ndarray,
    stddev: np.ndarray,
    rmax: float,
    dmax: float,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The clipped corrections and the fraction of entries the clip changed.

    ``r = clip(sigma_g / stddev, 1/rmax, rmax)``,
    ``d = clip((mu_g - mean) / stddev, -dmax, dmax)``, for ``(G, C)`` batch
    statistics and ``(C,)`` moving ones. Returns ``r, d, r_clipped, d_clipped``
    where the last two are the fractions (over groups and features) of entries
    strictly outside the clip interval (0 when there is no group). ``valid``
    (``(G, C)`` bool, with a mask: the entries that have a selected value)
    restricts the fractions to those entries (0 when there is none).

    Where ``mu_g`` or ``sigma_g`` is not finite (NaN/Inf input, or a variance
    that overflows: ``|x - mu_g|`` beyond about ``1.8e19`` in float32), ``r``
    and ``d`` are NaN, so that the output of that group and feature is NaN too:
    the clip would otherwise turn ``sigma_g = inf`` into ``r = rmax`` and give a
    finite-looking constant output. Such entries do not count as clipped.

    >>> mu_g, sigma_g = np.array([[4.0]]), np.array([[8.0]])
    >>> r, d, r_clipped, d_clipped = corrections(mu_g, sigma_g, np.zeros(1), np.ones(1), 3.0, 5.0)
    >>> float(r[0, 0]), float(d[0, 0]), r_clipped, d_clipped   # r = 8 clipped to 3; d = 4 within 5
    (3.0, 4.0, 1.0, 0.0)
    """
    ok = np.isfinite(mu_g) & np.isfinite(sigma_g)
    with np.errstate(invalid="ignore"):
        r_raw = np.where(ok, sigma_g / stddev, np.nan)
        d_raw = np.where(ok, (mu_g - mean) / stddev, np.nan)
        r = np.clip(r_raw, 1.0 / rmax, rmax)
        d = np.clip(d_raw, -dmax, dmax)
        r_out = (r_raw < 1.0 / rmax) | (r_raw > rmax)
        d_out = (d_raw < -dmax) | (d_raw > dmax)
    if valid is None:
        valid = np.ones(r_out.shape, bool)
    total = int(np.sum(valid))
    r_clipped = float(np.sum(r_out & valid)) / total if total else 0.0
    d_clipped = float(np.sum(d_out & valid)) / total if total else 0.0
    return r, d, r_clipped, d_clipped


class TrainCache(NamedTuple):
    """What :func:`train_backward` needs from :func:`train_forward` (``train_forward(...).cache``).

    >>> res = train_forward(np.eye(4), None, None, np.zeros(4), np.ones(4), rmax=3, dmax=5, momentum=0.9, epsilon=1e-3)
    >>> res.cache.shape, res.cache.axis
    ((4, 4), 1)
    """

    xc: np.ndarray  # (G, m, C) x - mu_g
    sigma_g: np.ndarray  # (G, C)
    r: np.ndarray  # (G, C)
    xhat: np.ndarray  # (G, m, C)
    gamma: np.ndarray  # (C,)
    shape: tuple
    axis: int
    microbatch_size: int | None
    dtype: np.dtype  # the input's dtype
    w: np.ndarray | None = None  # (G, m, C) bool: the selected values (None: no mask, all)
    count: np.ndarray | None = None  # (G, C) number of selected values (None: no mask, m)


class TrainResult(NamedTuple):
    """Output of :func:`train_forward`: ``y``, the updated ``mean`` and ``stddev``, the backward ``cache``, the
    group statistics, the corrections and the clip fractions.

    >>> res = train_forward(np.eye(4), None, None, np.zeros(4), np.ones(4), rmax=3, dmax=5, momentum=0.9, epsilon=1e-3)
    >>> res.y.shape, res.mean.shape, res.r.shape, res.finite
    ((4, 4), (4,), (1, 4), True)
    """

    y: np.ndarray
    mean: np.ndarray  # updated moving mean
    stddev: np.ndarray  # updated moving stddev
    cache: TrainCache
    mu_g: np.ndarray  # (G, C) batch means
    sigma_g: np.ndarray  # (G, C) batch stddevs
    r: np.ndarray  # (G, C)
    d: np.ndarray  # (G, C)
    r_clipped: float  # fraction of r entries changed by the clip
    d_clipped: float  # fraction of d entries changed by the clip
    finite: bool  # False if a batch statistic was NaN/Inf (state then unchanged)
    count: np.ndarray  # (G, C) values that entered each statistic (m without a mask)


def check_statistics(
    gamma: ArrayLike | None, beta: ArrayLike | None, mean: ArrayLike, stddev: ArrayLike, num_features: int | None = None
) -> int:
    """The number of features, after refusing parameters and statistics the oracle cannot trust.

    ``mean`` and ``stddev`` (and ``gamma``/``beta`` where given) must be vectors of one length (``num_features``
    where given); ``stddev`` must be > 0 everywhere (it divides). Each refusal is one line naming the argument and
    its value or shape.

    >>> check_statistics(None, None, [0.0, 0.0], [1.0, 1.0])
    2
    >>> check_statistics(None, None, [0.0, 0.0], [1.0, 0.0])
    Traceback (most recent call last):
    ...
    ValueError: stddev must be > 0 everywhere (it divides), got 0.0 at index 1
    """
    n = num_features
    for name, value in (("mean", mean), ("stddev", stddev), ("gamma", gamma), ("beta", beta)):
        if value is None and name in ("gamma", "beta"):
            continue
        shape = np.shape(value)
        if len(shape) != 1:
            raise ValueError(f"{name} must be a vector of one value per feature, got shape {shape}")
        if n is None:
            n = shape[0]
        elif shape[0] != n:
            raise ValueError(f"{name} has {shape[0]} values, expected {n} (one per feature)")
    sd = np.asarray(stddev, np.float64)
    bad = np.flatnonzero(~(sd > 0))
    if bad.size:
        raise ValueError(f"stddev must be > 0 everywhere (it divides), got {sd[bad[0]]} at index {bad[0]}")
    return int(n)


def _params(
    gamma: ArrayLike | None, beta: ArrayLike | None, num_features: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    gamma = np.ones(num_features, dtype) if gamma is None else np.asarray(gamma, dtype)
    beta = np.zeros(num_features, dtype) if beta is None else np.asarray(beta, dtype)
    return gamma, beta


def _group_statistics(
    xg: np.ndarray,
    shape: tuple[int, ...],
    mask: ArrayLike | None,
    axis: int,
    microbatch_size: int | None,
    epsilon: np.floating,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(wg, mu_g, sigma_g, count, has)`` of the grouped input ``xg`` (``(G, m, C)``).

    ``wg`` is the grouped mask (``None`` without one), ``count`` the values that
    enter each ``(G, C)`` statistic and ``has`` where that count is > 0; where
    it is 0, ``mu_g``/``sigma_g`` are placeholders the caller replaces.
    """
    if mask is None:
        mu_g, var_g = moments(xg)
        return None, mu_g, np.sqrt(var_g + epsilon), np.full(mu_g.shape, xg.shape[1]), np.ones(mu_g.shape, bool)
    mask = np.asarray(mask)
    check_mask(
        mask.shape, shape, dtype_name=str(mask.dtype),
        is_valid_dtype=bool(mask.dtype == bool or np.issubdtype(mask.dtype, np.number)),
    )  # fmt: skip
    wg = group_view(np.broadcast_to(mask != 0, shape), axis, microbatch_size)
    mu_g, var_g, count = masked_moments(xg, wg)
    return wg, mu_g, np.sqrt(var_g + epsilon), count, count > 0


def _moving_update(
    mu_g: np.ndarray,
    sigma_g: np.ndarray,
    has: np.ndarray,
    mean: np.ndarray,
    stddev: np.ndarray,
    alpha: np.floating,
) -> tuple[bool, np.ndarray, np.ndarray]:
    """``(finite, mean, stddev)`` after the step: each moves by ``alpha = 1 - momentum`` towards the
    mean over groups of ``mu_g``/``sigma_g`` (the groups with a statistic, ``has``).

    A non-finite statistic leaves both as they were (``finite=False``), and so
    does, per feature, a batch with no group or no selected value.
    """
    finite = bool(np.all(np.isfinite(mu_g[has])) and np.all(np.isfinite(sigma_g[has])))
    if not finite:
        return False, mean, stddev
    groups = has.sum(axis=0)  # per feature: the groups with a statistic
    div = np.maximum(groups, 1).astype(mean.dtype)
    batch_mean = np.where(has, mu_g, 0).sum(axis=0) / div
    batch_std = np.where(has, sigma_g, 0).sum(axis=0) / div
    new_mean = np.where(groups > 0, mean + alpha * (batch_mean - mean), mean)
    new_std = np.where(groups > 0, stddev + alpha * (batch_std - stddev), stddev)
    return True, new_mean, new_std


def train_forward(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    mean: ArrayLike,
    stddev: ArrayLike,
    *,
    rmax: float,
    dmax: float,
    momentum: float,
    epsilon: float,
    axis: int = -1,
    microbatch_size: int | None = None,
    mask: ArrayLike | None = None,
) -> TrainResult:
    """One training step: output, updated moving statistics, backward cache.

    ``gamma``/``beta`` of ``None`` mean ``scale=False``/``center=False`` (ones,
    zeros). ``rmax``/``dmax`` are the limits *at this step* (see
    :class:`renorm.ClipSchedule`). ``mean``/``stddev`` are the moving
    statistics before the step; the update, after ``y`` is computed, is::

        mean   <- mean   + (1 - momentum) * (mean over groups of mu_g    - mean)
        stddev <- stddev + (1 - momentum) * (mean over groups of sigma_g - stddev)

    and is skipped (state returned unchanged, ``finite=False``) when any batch
    statistic is NaN or Inf; the output of an affected group and feature is
    then NaN (see :func:`corrections`). A batch of 0 examples has no group: the
    output is empty, the state unchanged, ``finite`` True and the clip
    fractions 0.

    ``mask`` (optional, broadcastable to ``x``; nonzero or True selects): the
    statistics of each group and feature are those of its selected values
    (see the module docstring for a group and feature with none; their
    ``mu_g``/``sigma_g`` are then the moving statistics). ``count`` in the
    result holds the number of selected values per group and feature.

    >>> x = np.random.default_rng(0).normal(size=(8, 3))
    >>> res = train_forward(x, None, None, np.zeros(3), np.ones(3), rmax=3, dmax=5, momentum=0.9, epsilon=1e-3,
    ...                     microbatch_size=4)
    >>> res.y.shape, res.mu_g.shape   # two groups of 4 examples
    ((8, 3), (2, 3))
    """
    x = np.asarray(x)
    check_config(momentum=momentum, epsilon=epsilon, microbatch_size=microbatch_size, rmax=rmax, dmax=dmax)
    info = check_input(
        x.shape,
        dtype_name=str(x.dtype),
        is_floating=is_floating_dtype(x.dtype),
        axis=axis,
        microbatch_size=microbatch_size,
        num_features=check_statistics(gamma, beta, mean, stddev),
    )
    ax = info.axis
    cdt = compute_dtype(x.dtype)
    state_dtype = np.asarray(mean).dtype
    mean_c = np.asarray(mean, cdt)
    std_c = np.asarray(stddev, cdt)
    gamma_c, beta_c = _params(gamma, beta, info.num_features, cdt)

    xg = group_view(x.astype(cdt), ax, microbatch_size)
    wg, mu_g, sigma_g, count, has = _group_statistics(xg, x.shape, mask, ax, microbatch_size, cdt.type(epsilon))
    # A group and feature with no selected value is normalized with the moving statistics.
    mu_g = np.where(has, mu_g, mean_c)
    sigma_g = np.where(has, sigma_g, std_c)
    r, d, r_clipped, d_clipped = corrections(
        mu_g, sigma_g, mean_c, std_c, cdt.type(rmax), cdt.type(dmax), None if mask is None else has
    )
    xc = xg - mu_g[:, None, :]
    xhat = xc / sigma_g[:, None, :] * r[:, None, :] + d[:, None, :]
    yg = gamma_c * xhat + beta_c
    y = ungroup(yg, x.shape, ax).astype(x.dtype)

    finite, new_mean, new_std = _moving_update(mu_g, sigma_g, has, mean_c, std_c, cdt.type(1.0 - momentum))
    cache = TrainCache(
        xc, sigma_g, r, xhat, gamma_c, x.shape, ax, microbatch_size, x.dtype, wg, None if mask is None else count
    )
    return TrainResult(
        y, new_mean.astype(state_dtype), new_std.astype(state_dtype), cache,
        mu_g, sigma_g, r, d, r_clipped, d_clipped, finite, count,
    )  # fmt: skip


def train_backward(dy: ArrayLike, cache: TrainCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's explicit backward pass (not autodiff).

    Per group, with ``m`` values per feature and ``g = dL/dy * gamma``::

        dL/dsigma_g = sum(g * (x - mu_g)) * (-r_g / sigma_g**2)
        dL/dmu_g    = sum(g) * (-r_g / sigma_g)
        dL/dx       = g * r_g / sigma_g + dL/dsigma_g * (x - mu_g) / (m * sigma_g) + dL/dmu_g / m
        dL/dgamma   = sum over everything of dL/dy * xhat
        dL/dbeta    = sum over everything of dL/dy

    ``r_g`` and ``d_g`` are constants (stop-gradient), as in the paper.
    Returns ``(dx, dgamma, dbeta)``; ``dx`` has the input's shape and dtype.

    With a mask, ``m`` is the number of selected values and only those enter
    ``mu_g`` and ``sigma_g``: the two statistic terms of ``dL/dx`` apply to the
    selected values only, while the sums of ``dL/dsigma_g`` and ``dL/dmu_g``
    run over every value of the group (each output depends on the group's
    statistics). Where a group and feature has no selected value, ``dL/dx`` is
    ``g / stddev`` (the inference gradient).

    >>> x = np.random.default_rng(0).normal(size=(8, 3))
    >>> res = train_forward(x, None, None, np.zeros(3), np.ones(3), rmax=3, dmax=5, momentum=0.9, epsilon=1e-3)
    >>> dx, dgamma, dbeta = train_backward(np.ones_like(x), res.cache)
    >>> dx.shape, dbeta.tolist()   # dbeta: the sum of dL/dy
    ((8, 3), [8.0, 8.0, 8.0])
    """
    if np.shape(dy) != tuple(cache.shape):
        raise ValueError(f"dy has shape {np.shape(dy)}, expected the training input's {tuple(cache.shape)}")
    xc, sigma_g, r, xhat = cache.xc, cache.sigma_g, cache.r, cache.xhat
    cdt = xc.dtype
    dyg = group_view(np.asarray(dy).astype(cdt), cache.axis, cache.microbatch_size)
    m = xc.shape[1] if cache.count is None else np.maximum(cache.count, 1)
    g = dyg * cache.gamma
    dsigma = np.sum(g * xc, axis=1) * (-r / sigma_g**2)
    dmu = np.sum(g, axis=1) * (-r / sigma_g)
    stats_term = (dsigma / (m * sigma_g))[:, None, :] * xc + (dmu / m)[:, None, :]
    if cache.w is not None:
        stats_term = np.where(cache.w, stats_term, 0)
    dxg = g * (r / sigma_g)[:, None, :] + stats_term
    dgamma = np.sum(dyg * xhat, axis=(0, 1))
    dbeta = np.sum(dyg, axis=(0, 1))
    dx = ungroup(dxg, cache.shape, cache.axis).astype(cache.dtype)
    return dx, dgamma, dbeta


def inference_forward(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    mean: ArrayLike,
    stddev: ArrayLike,
    *,
    axis: int = -1,
) -> np.ndarray:
    """Inference: ``y = gamma * (x - mean) / stddev + beta``.

    Only the moving statistics are used (``stddev`` already includes epsilon),
    so each example's output is independent of the rest of the batch.

    >>> inference_forward(np.array([[3.0, 5.0]]), None, None, mean=np.array([1.0, 1.0]), stddev=np.array([2.0, 4.0]))
    array([[1., 1.]])
    """
    x = np.asarray(x)
    info = check_input(
        x.shape,
        dtype_name=str(x.dtype),
        is_floating=is_floating_dtype(x.dtype),
        axis=axis,
        num_features=check_statistics(gamma, beta, mean, stddev),
        training=False,
    )
    cdt = compute_dtype(x.dtype)
    gamma_c, beta_c = _params(gamma, beta, info.num_features, cdt)
    xt = np.moveaxis(x.astype(cdt), info.axis, -1)
    y = gamma_c * (xt - np.asarray(mean, cdt)) / np.asarray(stddev, cdt) + beta_c
    return np.moveaxis(y, -1, info.axis).astype(x.dtype)
