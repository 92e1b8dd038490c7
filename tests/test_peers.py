"""Other libraries' Batch Renorm layers (renorm.testing.peers): each recorded cause, proved.

For each peer, the paper's training step is re-derived in NumPy with that peer's deviations applied (:class:`Rule`;
with none it is the oracle, which a test checks). The peer's outputs, gradients, moving statistics and inference
output over the case's steps match the rule at the specification's tolerance for the dtype (docs/SPEC.md,
section 9), they do not match the oracle, and they do not match the rule with any one deviation taken out: each
recorded cause is needed, and together they account for everything. The file and line of each cause are checked
against the installed source.

The peers are not dependencies of renorm and are not installed in CI: their tests are skipped there, except Keras
3's, which is. To run them, install the peers into a folder of their own and point ``RENORM_PEERS_PATH`` at it
(the folder is put first on ``sys.path``)::

    pip install --no-deps --target ~/peers torchrl==0.14.1 sb3-contrib==2.9.2 sbx-rl==0.28.0 tf_keras==2.21.0
    RENORM_PEERS_PATH=~/peers python -m pytest tests/test_peers.py

(``PYTHONPATH=~/peers`` works as well.) A peer whose installed version has no recorded causes is skipped with its
version, so that the causes are re-derived for it rather than silently assumed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("RENORM_PEERS_PATH"):
    _peers_path = os.path.abspath(os.path.expanduser(os.environ["RENORM_PEERS_PATH"]))
    if _peers_path not in sys.path:
        sys.path.insert(0, _peers_path)

from renorm.numpy_ref import BatchRenormReference  # noqa: E402
from renorm.testing import PEER_CASES, check, make_params, make_steps, peers, rel_err, round_to, tolerance  # noqa: E402

TIGHT, PAPER_LIMITS = PEER_CASES
WARMUP = peers.WARMUP_CASES[0]
MOMENTUM, EPSILON = 0.99, 1e-3


def _need(peer: str) -> None:
    """Skip unless ``peer`` is installed at a version whose causes are recorded."""
    module, how = peers.PEERS[peer]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{peer} is not installed ({how}; RENORM_PEERS_PATH=DIR)")
    adapter = peers.peer_adapters(peer)[0]
    if peers.causes(adapter) is None:
        pytest.skip(f"{peer} {adapter.peer_version()}: no causes recorded for this version in renorm.testing.peers")


# --- The paper's step with a peer's deviations, in float64 ---


@dataclasses.dataclass(frozen=True)
class Rule:
    """The oracle's training step (docs/SPEC.md, section 3) with deviations; all off, it is the oracle's.

    - ``rmin_zero``: ``r`` is clipped above only (Keras without ``rmin``);
    - ``batch_ddof``: the batch variance divides by ``m - batch_ddof`` everywhere (sb3-contrib: 1);
    - ``moving``: ``"stddev"`` (the paper) or ``"variance"``: the moving statistic is an average of batch variances
      (dividing by ``m - moving_ddof``), read as ``sqrt(var + eps)``;
    - ``eps_r2``: the output is ``((x - mu) r + d sqrt(var)) / sqrt(var + r^2 eps)``, batch norm with mean
      ``mu - d sqrt(var) / r`` and variance ``var / r^2`` (sb3-contrib, sbx), ``r`` and ``d`` constants;
    - ``warmup_offset``: the first Batch Renorm step is ``warmup_steps + warmup_offset`` (sb3-contrib: 1);
    - ``growing_warmup``: ``r - 1`` and ``d`` are multiplied by ``t // warmup_steps``, which keeps growing
      (torchrl without its clamp).
    """

    rmin_zero: bool = False
    batch_ddof: int = 0
    moving: str = "stddev"
    moving_ddof: int = 0
    eps_r2: bool = False
    warmup_offset: int = 0
    growing_warmup: bool = False

    def factor(self, t: int, warmup: int) -> float:
        """What ``r - 1`` and ``d`` are multiplied by at step ``t`` (0: batch norm)."""
        if self.growing_warmup:
            return float(t // warmup) if warmup > 0 else 1.0
        return 1.0 if t >= warmup + self.warmup_offset else 0.0


ORACLE = Rule()
KERAS = Rule(rmin_zero=True)
TORCHRL = Rule(moving="variance", moving_ddof=1)
TORCHRL_WARMUP = dataclasses.replace(TORCHRL, growing_warmup=True)
SB3 = Rule(batch_ddof=1, moving="variance", moving_ddof=1, eps_r2=True, warmup_offset=1)
SBX = Rule(moving="variance", eps_r2=True)


def _normalize(x, mu, v, a, b, c0, e):
    """``(a (x - mu) + b sqrt(v)) / sqrt(v + e) + c0`` per feature, ``a, b, c0, e`` constants."""
    return (a * (x - mu) + b * np.sqrt(v)) / np.sqrt(v + e) + c0


def _normalize_grad(x, g, mu, v, a, b, e, ddof):
    """``dL/dx`` of :func:`_normalize` for ``g = dL/dxhat``, ``v = sum((x - mu)^2) / (m - ddof)``."""
    m = x.shape[0]
    s, sv = np.sqrt(v + e), np.sqrt(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        via_d = np.where(b == 0, 0.0, b * g.sum(0) / (2 * sv * s))
    coef = via_d - (g * (a * (x - mu) + b * sv)).sum(0) / (2 * s**3)
    return a * (g - g.mean(0)) / s + 2 * (x - mu) / (m - ddof) * coef


def _inputs(case, dtype, seed=0):
    """The driver's inputs for ``case`` in ``dtype`` (renorm.testing._driver): the values a peer receives."""
    xs, x_eval, dys = make_steps(case, seed)
    pdt = "float64" if dtype == "float64" else "float32"
    params = {k: None if v is None else round_to(v, pdt) for k, v in make_params(case, seed).items()}
    return [round_to(x, dtype) for x in xs], [round_to(d, dtype) for d in dys], round_to(x_eval, dtype), params


def run_rule(rule: Rule, case, dtype: str, *, momentum=MOMENTUM, epsilon=EPSILON, seed=0) -> list[dict]:
    """Per training step ``y, dx, dgamma, dbeta, mean, stddev`` (the moving statistics after it, a variance read as
    ``sqrt(var + eps)``), then ``{"inference": ...}``; in float64 on the driver's inputs."""
    xs, dys, x_eval, p = _inputs(case, dtype, seed)
    gamma, beta, mean, sigma = p["gamma"], p["beta"], p["mean"], p["stddev"]
    var = sigma**2 - epsilon
    alpha = 1.0 - momentum
    out = []
    for t, (x, dy) in enumerate(zip(xs, dys)):
        m = x.shape[0]
        mu = x.mean(0)
        ss = np.square(x - mu).sum(0)
        v = ss / (m - rule.batch_ddof)
        running = sigma if rule.moving == "stddev" else np.sqrt(var + epsilon)
        r = np.sqrt(v + epsilon) / running
        r = np.minimum(r, case.rmax) if rule.rmin_zero else np.clip(r, 1 / case.rmax, case.rmax)
        d = np.clip((mu - mean) / running, -case.dmax, case.dmax)
        k = rule.factor(t, case.warmup_steps)
        r, d = 1 + (r - 1) * k, d * k
        a, b, c0, e = (r, d, 0.0, r * r * epsilon) if rule.eps_r2 else (r, 0.0 * d, d, epsilon + 0.0 * r)
        xhat = _normalize(x, mu, v, a, b, c0, e)
        dx = _normalize_grad(x, dy * gamma, mu, v, a, b, e, rule.batch_ddof)
        mean = mean + alpha * (mu - mean)
        if rule.moving == "stddev":
            sigma = sigma + alpha * (np.sqrt(v + epsilon) - sigma)
        else:
            var = var + alpha * (ss / (m - rule.moving_ddof) - var)
        stddev = sigma if rule.moving == "stddev" else np.sqrt(var + epsilon)
        out.append(
            dict(y=gamma * xhat + beta, dx=dx, dgamma=(dy * xhat).sum(0), dbeta=dy.sum(0), mean=mean, stddev=stddev)
        )
    running = sigma if rule.moving == "stddev" else np.sqrt(var + epsilon)
    out.append({"inference": gamma * (x_eval - mean) / running + beta})
    return out


def run_peer(adapter, case, dtype: str, *, momentum=MOMENTUM, epsilon=EPSILON, seed=0) -> list[dict]:
    """The same from the peer, through its adapter (2-D cases: every layout is ``(batch, features)``)."""
    xs, dys, x_eval, p = _inputs(case, dtype, seed)
    rate = momentum if adapter.momentum_form == "decay" else 1.0 - momentum
    layer = adapter.build(case, momentum=rate, epsilon=epsilon, params=p, dtype=dtype)
    out = []
    for x, dy in zip(xs, dys):
        got = layer.train(x, dy)
        stddev = got.get("stddev")
        if stddev is None:
            stddev = np.sqrt(np.asarray(got["variance"], np.float64) + epsilon)
        step = {q: np.array(got[q], np.float64) for q in ("y", "dx", "dgamma", "dbeta", "mean")}  # copies
        out.append(step | {"stddev": np.array(stddev, np.float64)})
    out.append({"inference": np.array(layer.infer(x_eval), np.float64)})
    return out


def distance(a: list[dict], b: list[dict], dtype: str) -> float:
    """The largest relative error over every step and quantity, in units of the tolerance for ``dtype`` (<= 1:
    ``a`` matches ``b``)."""
    worst = 0.0
    for sa, sb in zip(a, b, strict=True):
        for q, va in sa.items():
            kind = "grad" if q in ("dx", "dgamma", "dbeta") else "value"
            worst = max(worst, rel_err(va, sb[q]) / tolerance(dtype, kind))
    return worst


def assert_explains(got, rule: Rule, case, dtype: str, removals: dict[str, Rule]) -> None:
    """``got`` matches ``rule``, not the oracle, and not ``rule`` with any one of its deviations taken out."""
    assert distance(got, run_rule(rule, case, dtype), dtype) <= 1.0, "the peer does not follow the recorded rule"
    assert distance(got, run_rule(ORACLE, case, dtype), dtype) > 10.0, "the peer matches the oracle"
    for what, partial in removals.items():
        assert distance(got, run_rule(partial, case, dtype), dtype) > 10.0, f"{what} is not needed to explain it"


# --- The rule itself (NumPy only: runs everywhere) ---


@pytest.mark.parametrize("case", [TIGHT, PAPER_LIMITS, WARMUP], ids=lambda c: c.name)
def test_the_rule_without_deviations_is_the_oracle(case):
    xs, dys, x_eval, p = _inputs(case, "float64")
    ref = BatchRenormReference(case.num_features, momentum=MOMENTUM, epsilon=EPSILON, **case.layer_kwargs(), **p)
    expected = []
    for x, dy in zip(xs, dys):
        y = ref.train(x)
        dx, dg, db = ref.backward(dy)
        expected.append(dict(y=y, dx=dx, dgamma=dg, dbeta=db, mean=ref.mean, stddev=ref.stddev))
    expected.append({"inference": ref.infer(x_eval)})
    assert distance(run_rule(ORACLE, case, "float64"), expected, "float64") < 1e-2  # within 1e-12


def test_the_rules_gradient_matches_finite_differences():
    """The eps-as-r^2-eps form with an unbiased variance, where d carries a gradient through the variance."""
    rng = np.random.default_rng(0)
    x, g = rng.normal(1.0, 2.0, (16, 3)), rng.normal(size=(16, 3))
    a, b, c0 = np.array([0.7, 1.0, 1.5]), np.array([-0.5, 0.2, 0.5]), np.array([0.1, 0.0, -0.3])
    e = 1e-3 * a**2

    def loss(x):
        mu = x.mean(0)
        return (g * _normalize(x, mu, np.square(x - mu).sum(0) / 15, a, b, c0, e)).sum(0)  # per feature

    mu = x.mean(0)
    grad = _normalize_grad(x, g, mu, np.square(x - mu).sum(0) / 15, a, b, e, ddof=1)
    h, numeric = 1e-3, np.zeros_like(x)
    for i in range(x.shape[0]):  # features are independent: one row of perturbations gives a row of the gradient
        step = np.zeros_like(x)
        step[i] = h
        numeric[i] = (8 * (loss(x + step) - loss(x - step)) - (loss(x + 2 * step) - loss(x - 2 * step))) / (12 * h)
    assert rel_err(grad, numeric) < 1e-8


# --- Keras 3 (installed in CI) ---


def test_keras_without_rmin_leaves_r_unclipped_below():
    keras = pytest.importorskip("keras")
    _need("keras")
    adapter = peers.KerasBNAdapter(conforming=False)
    for case in (TIGHT, PAPER_LIMITS):
        got = run_peer(adapter, case, "float32")
        assert_explains(got, KERAS, case, "float32", {})
    # the users' configuration differs from the conforming one only by rmin: with it, the oracle
    conforming = run_peer(peers.KerasBNAdapter(conforming=True), TIGHT, "float32")
    assert distance(conforming, run_rule(ORACLE, TIGHT, "float32"), "float32") <= 1.0
    assert keras.backend.backend() in ("tensorflow", "jax", "torch")


def test_keras_conforming_configuration_passes_the_driver():
    pytest.importorskip("keras")
    report = check(peers.KerasBNAdapter(conforming=True), PEER_CASES, dtype="float32")
    report.assert_passed()
    assert not check(peers.KerasBNAdapter(conforming=False), PEER_CASES[:1], dtype="float32").passed


def test_keras_float64_precision_follows_the_backend():
    """float64 is float64 on TensorFlow; on JAX and torch the layer computes in float32 (the recorded cause)."""
    keras = pytest.importorskip("keras")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("float64 on the JAX backend needs jax_enable_x64")
    adapter = peers.KerasBNAdapter(conforming=True)
    got = run_peer(adapter, TIGHT, "float64")
    err = distance(got, run_rule(ORACLE, TIGHT, "float64"), "float64")
    recorded = peers.causes(adapter, "3.15.1", dtype="float64", backend=backend)
    if any(c.kind == "deviation" for c in recorded):
        assert 10.0 < err and distance(got, run_rule(ORACLE, TIGHT, "float32"), "float32") <= 1.0
    else:
        assert err <= 1.0


# --- tf_keras ---


def test_tf_keras_without_rmin_leaves_r_unclipped_below_and_float64_raises():
    _need("tf_keras")
    assert_explains(run_peer(peers.TFKerasBNAdapter(conforming=False), TIGHT, "float32"), KERAS, TIGHT, "float32", {})
    check(peers.TFKerasBNAdapter(conforming=True), PEER_CASES, dtype="float32").assert_passed()
    with pytest.raises(TypeError, match="Maximum"):
        run_peer(peers.TFKerasBNAdapter(conforming=True), TIGHT, "float64")


# --- torchrl ---


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torchrl_averages_the_unbiased_variance(dtype):
    _need("torchrl")
    for case in (TIGHT, PAPER_LIMITS):
        got = run_peer(peers.TorchRLAdapter(), case, dtype)
        biased = dataclasses.replace(TORCHRL, moving_ddof=0)
        assert_explains(got, TORCHRL, case, dtype, {"the unbiased variance": biased})


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torchrl_warmup_factor_keeps_growing(dtype):
    """clamp_max is not in place: after a warm-up of 2 steps, r - 1 and d are scaled by 1, 1, 2, 2, 3, 3."""
    _need("torchrl")
    got = run_peer(peers.TorchRLAdapter(), WARMUP, dtype)
    clamped = dataclasses.replace(TORCHRL_WARMUP, growing_warmup=False)  # the clamp in place: the paper's warm-up
    assert_explains(got, TORCHRL_WARMUP, WARMUP, dtype, {"the growing factor": clamped})
    assert [TORCHRL_WARMUP.factor(t, 2) for t in range(WARMUP.steps)] == [0, 0, 1, 1, 2, 2, 3, 3]
    # the counter itself is not clamped
    import torch

    layer = peers.load_source("torchrl").BatchRenorm1d(8, warmup_steps=2)
    for _ in range(5):
        layer(torch.randn(16, 8))
    assert int(layer.num_batches_tracked) == 5


# --- sb3-contrib ---


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sb3_contrib_off_by_one_unbiased_and_eps_as_r2_eps(dtype):
    _need("sb3-contrib")
    removals = {
        "the off-by-one warm-up": dataclasses.replace(SB3, warmup_offset=0),
        "the unbiased variance": dataclasses.replace(SB3, batch_ddof=0, moving_ddof=0),
        "epsilon as r^2 eps": dataclasses.replace(SB3, eps_r2=False),
        "the average of the variance": dataclasses.replace(SB3, moving="stddev"),
    }
    for case in (TIGHT, PAPER_LIMITS, WARMUP):
        got = run_peer(peers.SB3ContribAdapter(), case, dtype)
        assert_explains(got, SB3, case, dtype, removals)


# --- sbx ---


def test_sbx_averages_the_variance_and_adds_eps_as_r2_eps():
    """float32 only: the module keeps its moving statistics in float32 whatever the dtype."""
    _need("sbx")
    removals = {
        "epsilon as r^2 eps": dataclasses.replace(SBX, eps_r2=False),
        "the average of the variance": dataclasses.replace(SBX, moving="stddev"),
    }
    for case in (TIGHT, PAPER_LIMITS, WARMUP):  # with a warm-up too: sbx's is the paper's
        got = run_peer(peers.SbxAdapter(), case, "float32")
        assert_explains(got, SBX, case, "float32", removals)


# --- Where: each cause's file and line in the installed version ---


def _installed_file(path: str) -> Path | None:
    package, _, rest = path.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0], rest)


def _adapter(key: str):
    return next(a for name in peers.PEERS for a in peers.peer_adapters(name) if a.key == key)


@pytest.mark.parametrize("key", sorted(peers.CAUSES))
def test_each_cause_points_at_its_line(key):
    adapter = _adapter(key)
    if importlib.util.find_spec(peers.PEERS[adapter.peer][0]) is None:
        pytest.skip(f"{adapter.peer} is not installed")
    version = adapter.peer_version()
    if version not in peers.CAUSES[key]:
        pytest.skip(f"{key} {version}: no causes recorded for this version")
    for cause in peers.CAUSES[key][version]:
        file = _installed_file(cause.file)
        assert file is not None and file.is_file(), cause.file
        line = file.read_text().splitlines()[cause.line - 1]
        assert cause.marker in line, f"{cause.where}: {line.strip()!r} does not hold {cause.marker!r}"


def test_load_source_falls_back_to_the_file_when_the_package_does_not_import():
    _need("torchrl")
    module = peers.load_source("torchrl")
    assert hasattr(module, "BatchRenorm1d") and module.__file__.endswith(os.path.join("models", "batchrenorm.py"))


def test_the_modules_examples_run():
    import doctest

    result = doctest.testmod(peers, optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed


# --- The committed report, benchmarks/results/conformance.json, and its page (no peer needed) ---

REPO = Path(__file__).resolve().parents[1]


def _committed() -> dict:
    import json

    return json.loads((REPO / "benchmarks" / "results" / "conformance.json").read_text())


def test_the_committed_report_is_a_full_run_of_the_recorded_causes():
    from benchmarks import conformance

    data = _committed()
    assert data["full"] is True and not data["skipped"]
    assert {r["peer"] for r in data["rows"]} == set(peers.PEERS)
    assert {r["backend"] for r in data["rows"] if r["peer"] == "keras"} == set(conformance.KERAS_BACKENDS)
    # the causes as renorm.testing.peers records them now (a change to CAUSES needs a new report)
    recorded = conformance.recorded_causes(data["rows"])
    assert data["causes"] == {k: {**v, "causes": [_as_json(c) for c in v["causes"]]} for k, v in recorded.items()}


def _as_json(cause: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cause.items()}


def test_every_failure_of_the_report_is_explained_and_no_conforming_run_has_a_deviation():
    for row in _committed()["rows"]:
        what = f"{row['implementation']} {row['dtype']} ({row['cases']})"
        kinds = {c["kind"] for c in row["causes"]}
        if row["conforms"]:
            assert not kinds & {"deviation", "error"}, what
        else:
            assert kinds & {"deviation", "error"}, f"{what} fails with no recorded cause: {row['first_failure']}"
            if " raised " in (row["first_failure"] or ""):
                assert "error" in kinds, what


def test_the_page_shows_the_committed_report():
    from benchmarks import conformance

    page = (REPO / "docs" / "conformance.md").read_text()
    begin, end = "<!-- conformance tables: begin", "<!-- conformance tables: end -->"
    shown = page[page.index("\n", page.index(begin)) + 1 : page.index(end)].strip()
    assert shown == conformance.tables(_committed()), "regenerate with python -m benchmarks.conformance --table"


def test_a_partial_run_cannot_replace_the_committed_report():
    from benchmarks import conformance

    with pytest.raises(SystemExit):
        conformance.main(["--peer", "keras", "--out", conformance.DEFAULT_OUT])
