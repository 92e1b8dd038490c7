"""The JAX-backend Keras layer suite computes the ratios it reports (no timing is asserted)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest


def test_keras_jax_layer_suite_runs(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "layers_keras_jax.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.layers_keras_jax",
            "--shapes",
            "16,8",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    data = json.loads(out.read_text())
    assert data["keras_backend"] == "jax" and data["full"] is False
    names = {(r["mode"], r["candidate"]) for r in data["rows"]}
    assert {
        ("train", "renorm mb=None"),
        ("train", "renorm mb=2"),
        ("train", "renorm autodiff"),
        ("train", "keras BN"),
        ("infer", "renorm"),
        ("infer", "keras BN"),
    } <= names
    assert all(r["vs_baseline"] > 0 for r in data["rows"])
    assert all("vs_whole" in r for r in data["rows"] if r["candidate"] in ("renorm mb=2", "renorm mb=4"))
