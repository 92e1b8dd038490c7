"""The driver: trains an implementation step by step beside the oracle and reports every quantity's error."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from renorm.testing._registry import (
    CASES,
    CLIP_SLACK,
    Case,
    make_masks,
    make_params,
    make_steps,
    rel_err,
    round_to,
    tolerance,
)

__all__ = ["Adapter", "CaseResult", "Failure", "Report", "QUANTITIES", "check", "oracle"]

# What the driver compares, in report order, and how: relative norm at the value or gradient tolerance, exact
# (the step counter), or within one clip decision (the clip fractions).
QUANTITIES: dict[str, str] = {
    "y": "value",
    "dx": "grad",
    "dgamma": "grad",
    "dbeta": "grad",
    "mean": "value",
    "stddev": "value",
    "step": "exact",
    "r_clipped": "count",
    "d_clipped": "count",
    "inference": "value",
}


class Adapter:
    """How the driver runs one implementation. Subclass it, set the conventions, and write :meth:`build`.

    The driver draws every input, parameter and mask from the registry, rounds them to the run's dtype, lays them
    out as the adapter declares and passes the momentum in the adapter's convention; it never special-cases an
    implementation. Class attributes (the conventions):

    - ``name``: how the report names the implementation;
    - ``momentum_form``: ``"decay"`` (Keras, Flax, the paper: ``new = m * old + (1 - m) * batch``) or ``"rate"``
      (PyTorch's ``momentum``, ``1 - decay``);
    - ``statistic``: the moving scale statistic the layer keeps, ``"stddev"`` (the paper's ``sigma``) or
      ``"variance"`` (compared as ``sqrt(variance + epsilon)``);
    - ``layout``: where the layer takes its features: ``"axis"`` (it takes the case's ``axis``),
      ``"channels_first"`` (dim 1) or ``"channels_last"``;
    - ``settings``: the settings the adapter chose (written into the report), e.g. Keras's ``rmin``.

    :meth:`build` returns a layer object with two methods, both on NumPy arrays in the adapter's layout and dtype
    (float64 arrays whose values the dtype represents exactly):

    - ``train(x, dy, mask=None) -> dict``: one training step, then the gradient of ``sum(y * dy)``. Keys: ``"y"``,
      ``"dx"``, ``"dgamma"`` and ``"dbeta"`` (``None`` where the layer has no such parameter), ``"mean"``, and
      ``"stddev"`` or ``"variance"`` (the moving statistics after the step), optionally ``"step"`` (the step counter
      after it), ``"r_clipped"``, ``"d_clipped"`` (the fractions of ``r`` and ``d`` the clip changed) and
      ``"dtypes"`` (``{"y": name, "dx": name, "mean": name, ...}`` to check the specification's dtype rules);
    - ``infer(x) -> array``: inference with the moving statistics.

    A key that is absent (or ``None``) is reported as not exposed, not as a failure, except ``dgamma``/``dbeta`` on
    a case with ``scale``/``center``. :meth:`supports` returns why a case or dtype cannot run, or ``None``.

    >>> class Planted(Adapter):  # the oracle with the unbiased batch variance: a deviation the driver finds
    ...     name = "planted"
    ...     def build(self, case, *, momentum, epsilon, params, dtype):
    ...         from renorm.testing import OracleAdapter
    ...         layer = OracleAdapter().build(case, momentum=momentum, epsilon=epsilon, params=params, dtype=dtype)
    ...         train = layer.train
    ...         def unbiased(x, dy, mask=None):
    ...             n = x.shape[0]
    ...             mu = x.mean(0)
    ...             return train(mu + (x - mu) * np.sqrt(n / (n - 1)), dy, mask)
    ...         layer.train = unbiased
    ...         return layer
    >>> report = check(Planted(), [CASES[0]], dtype="float64")
    >>> report.passed, str(report.failures[0])
    (False, 'dense (float64): y at step 0: relative error 3.5e-02 > 1e-10')
    """

    name: str = "adapter"
    momentum_form: str = "decay"
    statistic: str = "stddev"
    layout: str = "axis"
    settings: dict = {}

    def versions(self) -> dict[str, str]:
        """The versions of what this adapter runs (framework, library), for the report."""
        return {}

    def device(self) -> str:
        """The device the layer runs on, for the report."""
        return "cpu"

    def supports(self, case: Case, dtype: str) -> str | None:
        """``None`` if the case can run in ``dtype``, else why not (the case is reported as skipped)."""
        return None

    def build(self, case: Case, *, momentum: float, epsilon: float, params: dict, dtype: str) -> Any:
        raise NotImplementedError


@dataclasses.dataclass
class Failure:
    """The first quantity and step that failed in a case; ``str()`` says it in one line.

    >>> str(Failure("dense", "float32", "dx", 2, 3e-3, 1e-4))
    'dense (float32): dx at step 2: relative error 3.0e-03 > 1e-04'
    """

    case: str
    dtype: str
    quantity: str
    step: int | None  # None: the inference call
    error: float
    tolerance: float
    message: str = ""

    def __str__(self) -> str:
        at = "at inference" if self.step is None else f"at step {self.step}"
        if self.quantity == "error":
            return f"{self.case} ({self.dtype}): raised {at}: {self.message}"
        if self.quantity == "dtype":
            return f"{self.case} ({self.dtype}): {self.message} {at}"
        if self.quantity == "step":
            return f"{self.case} ({self.dtype}): step counter {at} is off by {self.error:g}"
        if self.quantity in ("dgamma", "dbeta") and math.isnan(self.error):
            return f"{self.case} ({self.dtype}): {self.message} {at}"
        kind = "difference" if QUANTITIES.get(self.quantity) == "count" else "relative error"
        return f"{self.case} ({self.dtype}): {self.quantity} {at}: {kind} {self.error:.1e} > {self.tolerance:.0e}"


@dataclasses.dataclass
class CaseResult:
    """One case in one dtype: ``errors`` is the largest error per quantity over the steps (``None``: not exposed),
    ``steps`` the errors at each training step and then at inference; ``passed`` is ``None`` for a skipped case.

    >>> from renorm.testing import OracleAdapter
    >>> result = check(OracleAdapter(), CASES[:1], dtype="float64").results[0]
    >>> result.case, result.passed, len(result.steps), result.errors["step"]
    ('dense', True, 6, 0.0)
    """

    case: str
    dtype: str
    passed: bool | None  # None: skipped
    skipped: str | None = None
    errors: dict[str, float | None] = dataclasses.field(default_factory=dict)
    tolerances: dict[str, float] = dataclasses.field(default_factory=dict)
    failure: Failure | None = None
    steps: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per training step, then inference

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["failure"] = None if self.failure is None else {**dataclasses.asdict(self.failure), "text": str(self.failure)}
        return d


@dataclasses.dataclass
class Report:
    """What :func:`check` found: one :class:`CaseResult` per case and dtype.

    >>> from renorm.testing import OracleAdapter
    >>> report = check(OracleAdapter(), CASES[:2], dtype="float64")
    >>> report.passed, report.failures, report.largest_errors()["dx"]
    (True, [], 0.0)
    >>> report.assert_passed()   # raises the first failure, if any, as an AssertionError
    """

    implementation: str
    settings: dict
    momentum: float
    epsilon: float
    versions: dict
    device: str
    results: list[CaseResult]

    @property
    def ran(self) -> list[CaseResult]:
        return [r for r in self.results if r.passed is not None]

    @property
    def passed(self) -> bool:
        """Every case that ran passed, and at least one ran."""
        return bool(self.ran) and all(r.passed for r in self.ran)

    @property
    def failures(self) -> list[Failure]:
        return [r.failure for r in self.results if r.failure is not None]

    def largest_errors(self) -> dict[str, float | None]:
        """The largest error per quantity over every case that ran (``None``: never exposed)."""
        out: dict[str, float | None] = {}
        for q in QUANTITIES:
            vals = [r.errors.get(q) for r in self.ran if r.errors.get(q) is not None]
            out[q] = max(vals) if vals else None
        return out

    def assert_passed(self) -> None:
        """Raise ``AssertionError`` naming the first failure (case, quantity, step, error and tolerance)."""
        if not self.ran:
            raise AssertionError(
                f"{self.implementation}: no case ran ({self.results[0].skipped if self.results else ''})"
            )
        if self.failures:
            more = f" (and {len(self.failures) - 1} more failing cases)" if len(self.failures) > 1 else ""
            raise AssertionError(f"{self.implementation}: {self.failures[0]}{more}")

    def to_dict(self) -> dict:
        return {
            "implementation": self.implementation,
            "settings": self.settings,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "versions": self.versions,
            "device": self.device,
            "passed": self.passed,
            "largest_errors": self.largest_errors(),
            "cases": [r.to_dict() for r in self.results],
        }

    def table(self) -> str:
        """A plain-text table: one row per case and dtype, the largest error per quantity, pass or fail."""
        cols = list(QUANTITIES)
        head = ["case", "dtype", "result", *cols]
        rows = []
        for r in self.results:
            verdict = "skip" if r.passed is None else ("pass" if r.passed else "FAIL")
            cells = [r.case, r.dtype, verdict]
            for q in cols:
                e = r.errors.get(q)
                cells.append("-" if e is None else (f"{e:g}" if QUANTITIES[q] == "exact" else f"{e:.1e}"))
            rows.append(cells)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
        return "\n".join(lines)


def _move(a, case: Case, layout: str, back: bool = False):
    if a is None or layout == "axis":
        return a
    dest = 1 if layout == "channels_first" else -1
    src = case.axis % len(case.shape)
    return np.moveaxis(a, dest, src) if back else np.moveaxis(a, src, dest)


def oracle(case: Case, *, momentum: float, epsilon: float, params: dict, dtype=np.float64):
    """The oracle (:class:`renorm.numpy_ref.BatchRenormReference`) configured for ``case``, starting from ``params``
    (``gamma``, ``beta``, ``mean``, ``stddev``, as :func:`make_params` draws them).

    >>> from renorm.testing import make_params
    >>> ref = oracle(CASES[0], momentum=0.9, epsilon=1e-3, params=make_params(CASES[0], 0))
    >>> ref.train(make_steps(CASES[0], 0)[0][0]).shape, ref.step
    ((8, 5), 1)
    """
    from renorm.numpy_ref import BatchRenormReference

    return BatchRenormReference(
        case.num_features,
        momentum=momentum,
        epsilon=epsilon,
        center=case.center,
        scale=case.scale,
        dtype=dtype,
        **case.layer_kwargs(),
        **params,
    )


def _check_case(adapter: Adapter, case: Case, *, dtype, momentum, epsilon, seed, masked) -> CaseResult:
    result = CaseResult(case.name, dtype, passed=None)
    why = adapter.supports(case, dtype)
    if why:
        result.skipped = why
        return result
    param_dtype = "float64" if dtype == "float64" else "float32"
    xs, x_eval, dys = make_steps(case, seed)
    xs = [round_to(x, dtype) for x in xs]
    dys = [round_to(d, dtype) for d in dys]
    x_eval = round_to(x_eval, dtype)
    params = {k: None if v is None else round_to(v, param_dtype) for k, v in make_params(case, seed).items()}
    masks = make_masks(case, seed, per_feature=masked == "per_feature") if masked else [None] * case.steps
    ref = oracle(case, momentum=momentum, epsilon=epsilon, params=params)
    # On groups of 2 values dL/dx is ill-conditioned (docs/SPEC.md, sections 6 and 9): below float64 a port may be
    # at most 3x less accurate than the float32 oracle on the same step.
    ref32 = (
        None
        if dtype == "float64"
        else oracle(case, momentum=momentum, epsilon=epsilon, params=params, dtype=np.float32)
    )
    groups = 1 if case.microbatch_size is None else case.shape[0] // case.microbatch_size
    clip_slack = CLIP_SLACK if dtype == "float64" else 1.0 / (groups * case.num_features) + CLIP_SLACK
    tol = {
        q: {"value": tolerance(dtype, "value"), "grad": tolerance(dtype, "grad")}.get(k, 0.0)
        for q, k in QUANTITIES.items()
    }
    tol["r_clipped"] = tol["d_clipped"] = clip_slack
    result.tolerances = dict(tol)
    errors: dict[str, float | None] = {q: None for q in QUANTITIES}

    def fail(quantity, step, error, limit, message=""):
        if result.failure is None:
            result.failure = Failure(case.name, dtype, quantity, step, error, limit, message)

    def record(per_step, q, err, limit, step):
        per_step[q] = err
        errors[q] = err if errors[q] is None else max(errors[q], err)
        if not np.isfinite(err) or err > limit:
            fail(q, step, err, limit)

    adapter_momentum = momentum if adapter.momentum_form == "decay" else 1.0 - momentum
    try:
        layer = adapter.build(case, momentum=adapter_momentum, epsilon=epsilon, params=params, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot build is a finding, reported
        fail("error", 0, math.nan, 0.0, f"{type(exc).__name__}: {exc}")
        result.passed = False
        return result
    for i, (x, dy, mask) in enumerate(zip(xs, dys, masks)):
        per_step: dict[str, float] = {}
        try:
            out = layer.train(
                _move(x, case, adapter.layout), _move(dy, case, adapter.layout), _move(mask, case, adapter.layout)
            )
        except Exception as exc:  # noqa: BLE001
            fail("error", i, math.nan, 0.0, f"{type(exc).__name__}: {exc}")
            break
        y_ref = ref.train(x, mask=mask)
        dx_ref, dg_ref, db_ref = ref.backward(dy)
        record(per_step, "y", rel_err(_move(out["y"], case, adapter.layout, True), y_ref), tol["y"], i)
        dx_tol = tol["dx"]
        if ref32 is not None:
            ref32.train(x.astype(np.float32), mask=mask)
            dx_tol = max(dx_tol, 3 * rel_err(ref32.backward(dy.astype(np.float32))[0], dx_ref))
        record(per_step, "dx", rel_err(_move(out["dx"], case, adapter.layout, True), dx_ref), dx_tol, i)
        for q, expected, on in (("dgamma", dg_ref, case.scale), ("dbeta", db_ref, case.center)):
            got = out.get(q)
            if on and got is None:
                fail(
                    q,
                    i,
                    math.nan,
                    tol[q],
                    f"no {q} returned although the case has {'scale' if q == 'dgamma' else 'center'}",
                )
            elif not on and got is not None:
                fail(
                    q,
                    i,
                    math.nan,
                    tol[q],
                    f"a {q} returned although the case has no {'scale' if q == 'dgamma' else 'center'}",
                )
            elif on:
                record(per_step, q, rel_err(got, expected), tol[q], i)
        if out.get("mean") is not None:
            record(per_step, "mean", rel_err(out["mean"], ref.mean), tol["mean"], i)
        scale_stat = out.get("stddev")
        if adapter.statistic == "variance" and out.get("variance") is not None:
            scale_stat = np.sqrt(np.asarray(out["variance"], np.float64) + epsilon)
        if scale_stat is not None:
            record(per_step, "stddev", rel_err(scale_stat, ref.stddev), tol["stddev"], i)
        if out.get("step") is not None:
            record(per_step, "step", abs(float(out["step"]) - ref.step), 0.0, i)
        for q, expected in (("r_clipped", ref.r_clipped), ("d_clipped", ref.d_clipped)):
            if out.get(q) is not None:
                record(per_step, q, abs(float(out[q]) - expected), tol[q], i)
        for q, want in ((q, dtype) for q in ("y", "dx")):
            got = (out.get("dtypes") or {}).get(q)
            if got is not None and got != want:
                fail("dtype", i, math.nan, 0.0, f"{q} is {got}, not the input's {want}")
        for q in ("mean", "stddev", "variance"):
            got = (out.get("dtypes") or {}).get(q)
            if got is None:  # not exposed
                continue
            below_float32 = got not in ("float32", "float64")  # statistics are kept in at least float32
            narrowed = got == "float32" and param_dtype == "float64"  # and never below the parameters' dtype
            if below_float32 or narrowed:
                fail(
                    "dtype",
                    i,
                    math.nan,
                    0.0,
                    f"moving {q} is {got}, not {param_dtype} (statistics in at least float32)",
                )
        result.steps.append(per_step)
    else:
        if getattr(layer, "infer", None) is None:  # e.g. an exported training-mode program: no inference call
            result.errors = errors
            result.passed = result.failure is None
            return result
        try:
            y_inf = layer.infer(_move(x_eval, case, adapter.layout))
        except Exception as exc:  # noqa: BLE001
            fail("error", None, math.nan, 0.0, f"{type(exc).__name__}: {exc}")
        else:
            per_step = {}
            record(
                per_step,
                "inference",
                rel_err(_move(y_inf, case, adapter.layout, True), ref.infer(x_eval)),
                tol["inference"],
                None,
            )
            result.steps.append(per_step)
    result.errors = errors
    result.passed = result.failure is None
    return result


def check(
    adapter: Adapter,
    cases: Iterable[Case] | None = None,
    *,
    dtype: str | Sequence[str] = "float32",
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    seed: int = 0,
    masked: bool | str = False,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Train ``adapter``'s implementation beside the oracle on every case (default: :data:`CASES`) and dtype.

    ``momentum`` is the specification's (the moving average's decay; the driver converts it for an adapter whose
    ``momentum_form`` is ``"rate"``), ``epsilon`` is added to the variance. ``masked``: every step with a mask from
    :func:`make_masks` (the adapter's layer must take one): ``True`` or ``"positions"`` for masks whose feature
    axis has size 1 (Keras's kind), ``"per_feature"`` for a selection per feature (Flax's and the oracle's).
    ``progress`` is called with each case's name as it starts. Every case runs ``case.steps`` training steps and
    one inference call; each quantity is compared with the float64 oracle at the specification's tolerance for
    ``dtype``, and the first that fails is named.

    >>> from renorm.testing import OracleAdapter
    >>> report = check(OracleAdapter(dtype="float32"), CASES[:2], dtype="float32")
    >>> report.passed, [r.case for r in report.results]
    (True, ['dense', 'dense_mb2'])
    """
    cases = list(CASES if cases is None else cases)
    dtypes = [dtype] if isinstance(dtype, str) else list(dtype)
    for d in dtypes:
        tolerance(d, "value")  # refuses an unknown dtype in one line
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum!r}: the specification's momentum (the decay) must be in [0, 1)")
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon!r}: must be > 0")
    results = []
    for d in dtypes:
        for case in cases:
            if progress is not None:
                progress(f"{case.name} ({d})")
            results.append(
                _check_case(adapter, case, dtype=d, momentum=momentum, epsilon=epsilon, seed=seed, masked=masked)
            )
    return Report(
        implementation=adapter.name,
        settings=dict(adapter.settings),
        momentum=momentum,
        epsilon=epsilon,
        versions=adapter.versions(),
        device=adapter.device(),
        results=results,
    )
