"""renorm.testing: the driver finds what it should, the table is the specification's, the command's contract,
and the oracle's input checks (docs/SPEC.md, sections 9 and 10)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from renorm.numpy_ref import BatchRenormReference, inference_forward, train_backward, train_forward
from renorm.testing import CASES, TOLERANCES, Adapter, OracleAdapter, check, tolerance
from renorm.testing import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_tolerance_table_is_the_specifications():
    spec = (ROOT / "docs" / "SPEC.md").read_text()
    section = spec.split("## 9. Parity tolerances", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (float[^|]*?) \| ([0-9e.-]+) \| ([0-9e.-]+)", section, re.M)
    table = {}
    for names, value, grad in rows:
        for name in re.findall(r"b?float\d+", names.split("(")[0]):
            table[name] = {"value": float(value), "grad": float(grad)}
    assert table == TOLERANCES


def test_the_oracle_adapter_passes_and_the_driver_reports_every_quantity():
    report = check(OracleAdapter(), CASES, dtype="float64")
    assert report.passed and len(report.ran) == len(CASES)
    errors = report.largest_errors()
    assert set(errors) >= {"y", "dx", "dgamma", "dbeta", "mean", "stddev", "step", "inference"}
    assert all(e == 0.0 for e in errors.values())
    # float32 against the float64 oracle: nonzero errors, within the table
    report = check(OracleAdapter(), CASES, dtype="float32", momentum=0.5)
    assert report.passed
    assert 0 < report.largest_errors()["y"] <= tolerance("float32", "value")


class Unbiased(Adapter):
    """The documentation's example (docs/testing.md): a layer that normalizes with the unbiased batch variance."""

    name = "my unbiased layer"

    def build(self, case, *, momentum, epsilon, params, dtype):
        state = dict(mean=params["mean"].copy(), stddev=params["stddev"].copy(), step=0)
        gamma = params["gamma"] if params["gamma"] is not None else np.ones(case.num_features)
        beta = params["beta"] if params["beta"] is not None else np.zeros(case.num_features)
        rmax, dmax = case.rmax, case.dmax

        class Layer:
            def train(self, x, dy, mask=None):
                n = x.shape[0]
                mu = x.mean(0)
                sigma = np.sqrt(x.var(0, ddof=1) + epsilon)  # the planted deviation: ddof=1
                r = np.clip(sigma / state["stddev"], 1 / rmax, rmax)
                d = np.clip((mu - state["mean"]) / state["stddev"], -dmax, dmax)
                xhat = (x - mu) / sigma * r + d
                y = gamma * xhat + beta
                g = dy * gamma
                dsigma = np.sum(g * (x - mu), 0) * (-r / sigma**2)
                dmu = np.sum(g, 0) * (-r / sigma)
                dx = g * r / sigma + dsigma * (x - mu) / ((n - 1) * sigma) + dmu / n
                state["mean"] += (1 - momentum) * (mu - state["mean"])
                state["stddev"] += (1 - momentum) * (sigma - state["stddev"])
                state["step"] += 1
                return dict(y=y, dx=dx, dgamma=np.sum(dy * xhat, 0), dbeta=np.sum(dy, 0), **state)

            def infer(self, x):
                return gamma * (x - state["mean"]) / state["stddev"] + beta

        return Layer()

    def supports(self, case, dtype):
        return None if case.name in ("dense", "loose") else "dense whole batches only"


def test_a_planted_deviation_fails_with_the_quantity_and_step_named():
    report = check(Unbiased(), [c for c in CASES if c.name in ("dense", "loose")], dtype="float64")
    assert not report.passed
    failure = report.failures[0]
    assert (failure.case, failure.quantity, failure.step) == ("dense", "y", 0)
    assert str(failure).startswith("dense (float64): y at step 0: relative error ")
    assert report.results[0].errors["y"] > 1e-2  # a semantic error, far above any rounding
    with pytest.raises(AssertionError, match=r"my unbiased layer: dense \(float64\): y at step 0"):
        report.assert_passed()
    skipped = check(Unbiased(), CASES[:2], dtype="float64").results[1]
    assert skipped.passed is None and skipped.skipped == "dense whole batches only"


def test_an_adapter_that_raises_is_a_failure_not_a_crash():
    class Broken(OracleAdapter):
        def build(self, case, **kw):
            layer = super().build(case, **kw)
            layer.infer = lambda x: 1 / 0
            return layer

    report = check(Broken(), CASES[:1], dtype="float64")
    assert not report.passed and "raised at inference: ZeroDivisionError" in str(report.failures[0])


@pytest.mark.parametrize(
    ("dtype", "reported", "message"),
    [
        ("float32", {"y": "float32", "dx": "float32", "mean": "float32", "stddev": "float32"}, None),
        ("float64", {"y": "float64", "dx": "float64", "mean": "float64", "variance": "float64"}, None),
        ("bfloat16", {"y": "bfloat16", "dx": "bfloat16", "mean": "float32", "stddev": "float32"}, None),
        ("float32", {"y": "float64"}, "y is float64, not the input's float32"),
        ("float32", {"dx": "float16"}, "dx is float16, not the input's float32"),
        ("bfloat16", {"mean": "bfloat16"}, "moving mean is bfloat16, not float32"),
        ("float64", {"stddev": "float32"}, "moving stddev is float32, not float64"),
    ],
)
def test_the_dtype_rules_are_checked_on_what_the_adapter_reports(dtype, reported, message):
    class Reporting(OracleAdapter):  # bfloat16 runs the oracle in float32, well inside bfloat16's tolerances
        def supports(self, case, dtype):
            return None

        def build(self, case, **kw):
            layer = super().build(case, **kw)
            train = layer.train
            layer.train = lambda x, dy, mask=None: {**train(x, dy, mask), "dtypes": reported}
            return layer

    report = check(Reporting("float32" if dtype == "bfloat16" else None), CASES[:1], dtype=dtype)
    if message is None:
        assert report.passed, report.failures
    else:
        assert not report.passed
        assert report.failures[0].quantity == "dtype" and message in str(report.failures[0])


def test_check_refuses_bad_arguments_in_one_line():
    with pytest.raises(ValueError, match="dtype='float8'"):
        check(OracleAdapter(), CASES[:1], dtype="float8")
    with pytest.raises(ValueError, match="momentum=1.0"):
        check(OracleAdapter(), CASES[:1], momentum=1.0)


def test_the_report_serializes_to_json():
    doc = check(OracleAdapter(), CASES[:2], dtype="float64").to_dict()
    again = json.loads(json.dumps(doc))
    assert again["passed"] is True and [c["case"] for c in again["cases"]] == ["dense", "dense_mb2"]
    assert again["cases"][0]["errors"]["y"] == 0.0 and len(again["cases"][0]["steps"]) == CASES[0].steps + 1


def test_the_command_exits_2_in_one_line_for_a_framework_that_is_not_installed(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_installed", lambda module: module != "keras")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--backend", "keras"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "python -m renorm.testing: --backend keras needs keras, which is not installed: "
        'pip install "renorm[tf]" (or keras with your backend; KERAS_BACKEND picks it)'
    ]


def test_the_command_refuses_an_unknown_backend_with_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "renorm.testing", "--backend", "mxnet"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "invalid choice: 'mxnet'" in out.stderr


def test_the_command_runs_a_backend_and_writes_its_json(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "r.json"
    out = subprocess.run(
        [sys.executable, "-m", "renorm.testing", "--backend", "torch", "--dtype", "float64", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every case passed" in out.stdout
    doc = json.loads(path.read_text())
    assert doc["passed"] and doc["reports"][0]["backend"] == "torch"
    assert doc["reports"][0]["versions"]["torch"] and doc["reports"][0]["device"] == "cpu"
    assert {c["dtype"] for r in doc["reports"] for c in r["cases"]} == {"float64"}


def test_the_command_exits_1_when_a_case_fails(monkeypatch, capsys):
    from renorm.testing import adapters

    monkeypatch.setattr(adapters, "adapter_for", lambda backend, device=None: [Unbiased()])
    monkeypatch.setattr(cli, "_installed", lambda module: True)
    assert cli.main(["--backend", "torch", "--dtype", "float64", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "my unbiased layer: dense (float64): y at step 0" in out


def test_importing_renorm_testing_imports_no_framework():
    code = (
        "import sys, renorm.testing, renorm.testing.adapters, renorm.testing.peers; "
        "print(sorted(m for m in ('tensorflow', 'jax', 'torch', 'keras', 'flax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


# ----------------------------------------------------------- the oracle's own input checks (section 10)
def test_oracle_refuses_an_integer_state_dtype():
    with pytest.raises(TypeError, match="dtype='int32': the state needs a floating dtype"):
        BatchRenormReference(4, momentum=0.9, epsilon=1e-3, dtype=np.int32)


@pytest.mark.parametrize("step", [-3, 2.7, True, "1"])
def test_oracle_refuses_a_step_that_is_not_a_nonnegative_integer(step):
    with pytest.raises(ValueError, match=re.escape(f"step={step!r}: expected an integer >= 0")):
        BatchRenormReference(4, momentum=0.9, epsilon=1e-3, step=step)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(gamma=np.ones(3)), "gamma has 3 values, expected 4"),
        (dict(beta=np.zeros(5)), "beta has 5 values, expected 4"),
        (dict(mean=np.zeros(3)), "mean has 3 values, expected 4"),
        (dict(stddev=np.ones(2)), "stddev has 2 values, expected 4"),
        (dict(mean=0.0), "mean must be a vector of one value per feature, got shape ()"),
        (dict(gamma=np.ones((4, 1))), "gamma must be a vector of one value per feature, got shape (4, 1)"),
        (dict(stddev=np.array([1.0, 0.0, 1.0, 1.0])), "stddev must be > 0 everywhere (it divides), got 0.0 at index 1"),
        (dict(stddev=-np.ones(4)), "stddev must be > 0 everywhere (it divides), got -1.0 at index 0"),
    ],
)
def test_oracle_refuses_parameters_and_statistics_of_the_wrong_shape_or_sign(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        BatchRenormReference(4, momentum=0.9, epsilon=1e-3, **kwargs)


def test_oracle_functions_refuse_the_same_statistics():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="mean must be a vector"):
        train_forward(x, None, None, 0.0, np.ones(3), rmax=3, dmax=5, momentum=0.9, epsilon=1e-3)
    with pytest.raises(ValueError, match=re.escape("stddev must be > 0 everywhere")):
        inference_forward(x, None, None, np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="gamma has 2 values, expected 3"):
        inference_forward(x, np.ones(2), None, np.zeros(3), np.ones(3))


def test_oracle_refuses_a_dy_of_the_wrong_shape():
    layer = BatchRenormReference(3, momentum=0.9, epsilon=1e-3)
    layer.train(np.random.default_rng(0).normal(size=(4, 3)))
    with pytest.raises(ValueError, match=re.escape("dy has shape (4, 2), expected the training input's (4, 3)")):
        layer.backward(np.ones((4, 2)))
    res = train_forward(
        np.ones((4, 3)) * np.arange(4)[:, None],
        None,
        None,
        np.zeros(3),
        np.ones(3),
        rmax=3,
        dmax=5,
        momentum=0.9,
        epsilon=1e-3,
    )
    with pytest.raises(ValueError, match="dy has shape"):
        train_backward(np.ones((3, 3)), res.cache)


def _docs_example(ddof: int = 1) -> dict:
    """Run the adapter example of docs/testing.md (``ddof`` swapped in where asked) and return its namespace."""
    page = (ROOT / "docs" / "testing.md").read_text()
    section = page.split("## Your own layer", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    expected = section.split("```text\n", 1)[1].split("```", 1)[0].strip()
    if ddof != 1:
        assert "ddof = 1  #" in code
        code = code.replace("ddof = 1  #", f"ddof = {ddof}  #")
    namespace: dict = {"__name__": "docs_testing_example"}
    exec(compile(code, "docs/testing.md", "exec"), namespace)
    namespace["expected"] = expected
    return namespace


def test_the_documentations_adapter_example_fails_as_the_page_says(capsys):
    ns = _docs_example()
    out = capsys.readouterr().out
    report = ns["report"]
    assert not report.passed and all(r.passed is False for r in report.ran) and len(report.ran) == 3
    assert str(report.failures[0]) == ns["expected"] == out.strip().splitlines()[-1]


def test_the_documentations_adapter_example_passes_without_its_planted_deviation():
    report = _docs_example(ddof=0)["report"]
    report.assert_passed()
    assert len(report.ran) == 3 and any(r.skipped for r in report.results)
