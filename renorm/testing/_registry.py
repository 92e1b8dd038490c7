"""The case registry, the input and parameter generators and the tolerance table (docs/SPEC.md, section 9)."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "TOLERANCES",
    "Case",
    "CASES",
    "REDUCED_CASES",
    "MASK_CASES",
    "PEER_CASES",
    "CONFIG_ERRORS",
    "tolerance",
    "rel_err",
    "assert_close",
    "make_steps",
    "make_params",
    "make_masks",
    "round_to",
]

# The specification's table (docs/SPEC.md, section 9; tests/test_testing.py holds the two equal): relative to the
# norm of the reference, the oracle in float64 on the port's rounded inputs.
TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"value": 1e-10, "grad": 1e-9},
    "float32": {"value": 1e-5, "grad": 1e-4},
    "float16": {"value": 2e-2, "grad": 5e-2},
    "bfloat16": {"value": 2e-2, "grad": 5e-2},
}
# The clip fractions are ratios of counts: 1e-6 in float64; in lower precision one entry of the G x C may fall on
# the other side of the boundary (docs/SPEC.md, section 9).
CLIP_SLACK = 1e-6


def tolerance(dtype: str, kind: str) -> float:
    """The specification's tolerance for input ``dtype`` and ``kind`` (``"value"`` or ``"grad"``).

    >>> tolerance("float32", "grad")
    0.0001
    """
    if str(dtype) not in TOLERANCES:
        raise ValueError(f"dtype={dtype!r}: the tolerance table has {', '.join(TOLERANCES)}")
    if kind not in ("value", "grad"):
        raise ValueError(f"kind={kind!r}: expected 'value' or 'grad'")
    return TOLERANCES[str(dtype)][kind]


def rel_err(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (the absolute norm if ``expected`` is 0).

    >>> rel_err([1.0, 2.0], [1.0, 2.5])
    0.1856...
    """
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs expected {e.shape}")
    num = np.linalg.norm((a - e).ravel())
    den = np.linalg.norm(e.ravel())
    return float(num / den) if den > 0 else float(num)


def assert_close(actual, expected, dtype: str = "float64", kind: str = "value", what: str = "") -> None:
    """Raise ``AssertionError`` unless ``rel_err(actual, expected)`` is within :func:`tolerance` ``(dtype, kind)``.

    >>> assert_close([1.0, 2.0], [1.0, 2.0 + 1e-12])
    >>> assert_close([1.0, 2.0], [1.0, 2.1], what="y")
    Traceback (most recent call last):
    ...
    AssertionError: y: relative error 4.299e-02 > 1e-10 (float64)
    """
    tol = tolerance(dtype, kind)
    err = rel_err(actual, expected)
    if not np.isfinite(err) or err > tol:
        raise AssertionError(f"{what or kind}: relative error {err:.3e} > {tol:.0e} ({dtype})")


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the registry: an input shape, the feature axis, the grouping and the schedule.

    >>> Case("dense", (8, 5), microbatch_size=2).num_features
    5
    """

    name: str
    shape: tuple
    axis: int = -1
    microbatch_size: int | None = None
    rmax: float = 3.0
    dmax: float = 5.0
    warmup_steps: int = 0
    rmax_steps: int = 0
    dmax_steps: int = 0
    center: bool = True
    scale: bool = True
    steps: int = 5

    @property
    def num_features(self) -> int:
        return self.shape[self.axis]

    @property
    def scheduled(self) -> bool:
        """Whether the limits change over the steps (a warm-up or a ramp)."""
        return bool(self.warmup_steps or self.rmax_steps or self.dmax_steps)

    @property
    def schedule_kwargs(self) -> dict:
        return dict(
            rmax=self.rmax,
            dmax=self.dmax,
            warmup_steps=self.warmup_steps,
            rmax_steps=self.rmax_steps,
            dmax_steps=self.dmax_steps,
        )

    def layer_kwargs(self) -> dict:
        """Keyword arguments spelled identically in every port of this project."""
        return dict(axis=self.axis, microbatch_size=self.microbatch_size, **self.schedule_kwargs)


# Shapes: dense 2-D, NHWC 4-D, NCHW with axis 1, a 3-D sequence; micro-batches None / 2 / 4; clipping tight
# (active), loose (inactive), batch norm; the schedule crossing its breakpoints within the steps run.
CASES: list[Case] = [
    Case("dense", (8, 5)),
    Case("dense_mb2", (8, 5), microbatch_size=2),
    Case("dense_mb4_tight", (8, 3), microbatch_size=4, rmax=1.1, dmax=0.1),
    Case("nhwc", (4, 3, 3, 4)),
    Case("nhwc_mb2_tight", (4, 2, 3, 3), microbatch_size=2, rmax=1.2, dmax=0.2),
    Case("nchw_axis1", (4, 3, 2, 2), axis=1),
    Case("nchw_axis1_mb2", (4, 3, 2, 2), axis=1, microbatch_size=2, rmax=1.3, dmax=0.3),
    Case("seq_axis1", (6, 4, 3), axis=1, microbatch_size=3),
    Case("loose", (8, 4), rmax=1e3, dmax=1e3),
    Case("batchnorm", (8, 4), microbatch_size=4, rmax=1.0, dmax=0.0),
    Case(
        "schedule", (8, 3), microbatch_size=2, rmax=2.0, dmax=1.0, warmup_steps=2, rmax_steps=5, dmax_steps=4, steps=7
    ),
    Case("schedule_step", (6, 3), rmax=1.5, dmax=0.5, warmup_steps=3, steps=5),
    Case("no_center_scale", (8, 4), microbatch_size=2, center=False, scale=False),
    Case("no_center", (8, 4), center=False, rmax=1.2, dmax=0.2),
]
_BY_NAME = {c.name: c for c in CASES}

# float16 and bfloat16: the cases every port runs in reduced precision.
REDUCED_CASES: list[Case] = [_BY_NAME[n] for n in ("dense_mb2", "nhwc_mb2_tight", "nchw_axis1", "schedule")]

# docs/SPEC.md, section 3 (Masks): the cases run with a mask. Each mask selects about 3/4 of the values, and at
# least 3 values of every group and feature it does not mask entirely (groups of 2 values are the ill-conditioned
# case of section 6, covered unmasked).
MASK_CASES: list[Case] = [
    _BY_NAME[n]
    for n in (
        "dense",
        "dense_mb4_tight",
        "nhwc",
        "nhwc_mb2_tight",
        "nchw_axis1_mb2",
        "seq_axis1",
        "schedule_step",
        "no_center",
        "batchnorm",
    )
]

# The peers' case: what a user of a dense-network layer (CrossQ, torchrl) trains, with limits that bind: a batch of
# 16 x 8 features, rmax 1.5, dmax 0.5 from the first step, 6 steps; and the same at the paper's final limits 3/5.
PEER_CASES: list[Case] = [
    Case("peer_tight", (16, 8), rmax=1.5, dmax=0.5, steps=6),
    Case("peer_paper_limits", (16, 8), rmax=3.0, dmax=5.0, steps=6),
]

# docs/SPEC.md, section 10 (Errors): configurations every port must reject at construction, with the words its
# message must contain (the argument and the value). Each port's tests add their own options.
CONFIG_ERRORS = [
    (dict(rmax=0.5), ValueError, "rmax=0.5"),
    (dict(dmax=-1.0), ValueError, "dmax=-1.0"),
    (dict(momentum=1.0), ValueError, "momentum=1.0"),
    (dict(momentum=-0.1), ValueError, "momentum=-0.1"),
    (dict(epsilon=0.0), ValueError, "epsilon=0.0"),
    (dict(microbatch_size=0), ValueError, "microbatch_size=0"),
    (dict(microbatch_size=2.5), TypeError, "microbatch_size=2.5"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps=-1"),
    (dict(warmup_steps=10, rmax_steps=5), ValueError, "rmax_steps=5"),
    (dict(warmup_steps=10, dmax_steps=3), ValueError, "dmax_steps=3"),
    (dict(rmax="3"), TypeError, "rmax='3'"),
]


def round_to(x, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (round to nearest even), returned in float64: the values a port of that dtype holds.

    bfloat16 is rounded from float32 by bit arithmetic, so NumPy alone suffices.

    >>> float(round_to(1.0 + 2.0**-10, "bfloat16")), float(round_to(1.0 + 2.0**-10, "float16"))
    (1.0, 1.0009765625)
    """
    a = np.asarray(x, np.float64)
    if dtype == "bfloat16":
        u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
        return u.view(np.float32).astype(np.float64)
    if dtype not in ("float64", "float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected one of float64, float32, float16, bfloat16")
    return a.astype(dtype).astype(np.float64)


def make_steps(case: Case, seed: int, dtype=np.float64):
    """Random inputs for ``case.steps`` training steps plus one inference batch.

    Each step has its own offset and scale per feature, drifting over the steps, so that ``r`` and ``d`` move away
    from 1 and 0 and tight limits clip. Returns ``(xs, x_eval, dys)`` with ``dys`` the upstream gradients.

    >>> xs, x_eval, dys = make_steps(CASES[0], seed=0)
    >>> len(xs), xs[0].shape, x_eval.shape, dys[0].shape
    (5, (8, 5), (8, 5), (8, 5))
    """
    rng = np.random.default_rng(seed)
    c = case.num_features
    fshape = [1] * len(case.shape)
    fshape[case.axis] = c
    xs, dys = [], []
    for _ in range(case.steps):
        loc = rng.normal(0.0, 2.0, c).reshape(fshape)
        scale = np.exp(rng.normal(0.0, 0.7, c)).reshape(fshape)
        xs.append((loc + scale * rng.standard_normal(case.shape)).astype(dtype))
        dys.append(rng.standard_normal(case.shape).astype(dtype))
    x_eval = (rng.normal(0.0, 2.0, c).reshape(fshape) + rng.standard_normal(case.shape)).astype(dtype)
    return xs, x_eval, dys


def make_params(case: Case, seed: int) -> dict:
    """Random non-trivial ``gamma``, ``beta`` (``None`` where the case has no scale or center), moving ``mean`` and
    ``stddev`` (float64), so that a port that ignores its initial state fails.

    >>> sorted(make_params(CASES[0], 0))
    ['beta', 'gamma', 'mean', 'stddev']
    """
    rng = np.random.default_rng(seed + 1000)
    c = case.num_features
    return dict(
        gamma=rng.uniform(0.5, 1.5, c) if case.scale else None,
        beta=rng.normal(0.0, 0.5, c) if case.center else None,
        mean=rng.normal(0.0, 1.0, c),
        stddev=rng.uniform(0.5, 2.0, c),
    )


def make_masks(case: Case, seed: int, per_feature: bool = False) -> list:
    """One boolean mask per training step of ``case``, broadcastable to its input.

    ``per_feature=False``: the feature axis has size 1 (a mask of positions, Keras' kind:
    ``np.squeeze(mask, case.axis)`` is the Keras mask); ``True``: the input's full shape, a different selection per
    feature (allowed by Flax and the oracle). Step 1 masks all of its first group (the whole batch without
    micro-batches: a call that selects nothing), step 2 all of its second group where there is one; the other steps
    are random.

    >>> [m.shape for m in make_masks(MASK_CASES[0], 0)][:2]
    [(8, 1), (8, 1)]
    """
    from renorm.numpy_ref import group_view, ungroup

    rng = np.random.default_rng(seed + 2000)
    axis = case.axis % len(case.shape)
    shape = list(case.shape)
    if not per_feature:
        shape[axis] = 1
    masks = []
    for step in range(case.steps):
        mask = rng.random(shape) < 0.75
        mg = group_view(mask, axis, case.microbatch_size).copy()  # (G, m, C or 1)
        count = mg.sum(axis=1)
        for g, c in zip(*np.nonzero(count < 3)):
            mg[g, :, c] = True
        if step == 1:
            mg[0] = False
        if step == 2 and mg.shape[0] > 1:
            mg[1] = False
        masks.append(ungroup(mg, tuple(shape), axis))
    return masks
