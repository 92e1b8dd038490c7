"""benchmarks/layers_torch.py runs and computes its ratios; only a full run writes the committed results.
No timing is asserted."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_layers_torch_quick_run(tmp_path):
    out = tmp_path / "layers_torch.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.layers_torch",
            "--quick",
            "--no-compile",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )
    data = json.loads(out.read_text())
    assert data["full"] is False and data["suite"] == "layers_torch"
    load = data["machine"]["load_average"]  # measured, not a note written in advance
    assert len(load) == 3 and all(x >= 0 for x in load) and "note" not in data
    names = {(r["shape"], r["candidate"]) for r in data["rows"]}
    assert ("(64, 32)", "eager renorm mb=2") in names and ("(16, 8, 4, 4)", "eager BatchNorm") in names
    assert all(r["vs_baseline"] > 0 and r["n"] == 2 for r in data["rows"])
    assert all(r["vs_whole"] > 0 for r in data["rows"] if "mb=2" in r["candidate"] or "mb=4" in r["candidate"])
    eager = [r for r in data["rows"] if r["candidate"].startswith("eager ")]
    assert eager and all(r["cpu1_vs_baseline"] > 0 for r in eager)
    assert all(r["cpu1_vs_whole"] > 0 for r in eager if "mb=2" in r["candidate"] or "mb=4" in r["candidate"])
    assert all(len(v) == 2 for s in data["raw"].values() for v in s["cpu_one_thread_s"].values())


def test_only_full_runs_write_the_committed_results():
    from benchmarks.layers_torch import RESULTS, parse

    assert parse([]).full and parse([]).out == RESULTS
    for partial in (["--quick"], ["--no-compile"], ["--shapes", "8,4"]):
        args = parse(partial)
        assert not args.full and args.out.endswith("scratch/layers_torch.json"), partial


def test_a_gpu_run_has_results_of_its_own_and_a_bad_device_one_line(monkeypatch):
    import pytest
    import torch

    from benchmarks.layers_torch import GPU_RESULTS, RESULTS, parse

    assert parse(["--device", "cpu"]).out == RESULTS
    with pytest.raises(SystemExit, match=r"^layers_torch: --device must be cpu, cuda or cuda:N, got --device 'tpu'$"):
        parse(["--device", "tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"--device cuda:1: this PyTorch sees no CUDA device$"):
            parse(["--device", "cuda:1"])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse(["--device", "cuda"]).out == GPU_RESULTS
    assert parse(["--device", "cuda", "--quick"]).out.endswith("scratch/layers_torch-gpu.json")


def test_a_suite_run_on_a_gpu_never_replaces_the_cpu_results():
    import doctest

    import benchmarks.common as common

    assert doctest.testmod(common).failed == 0  # device_results' examples
    for suite in ("layers_jax", "step_jax", "jax_clip_fusion"):
        text = (REPO / "benchmarks" / f"{suite}.py").read_text()
        assert f'device_results("benchmarks/results/{suite}.json", jax.default_backend())' in text, suite


def test_the_prepared_gpu_run_issues_each_step_and_reports_a_failed_one(tmp_path):
    """benchmarks/gpu.sh with stand-ins for python and nvidia-smi: which commands, where they write, the exit code."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("python", 'echo "PY $*"; case "$*" in *layers_torch*) exit 3;; esac'),
        ("nvidia-smi", "echo H100"),
    ):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), str(out)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stdout + done.stderr  # the PyTorch suite's stand-in failed
    calls = [line[3:] for line in done.stdout.splitlines() if line.startswith("PY -m ")]
    assert calls == [
        "-m renorm.testing --backend torch --backend linen --backend nnx --device gpu --no-progress "
        f"--json {out}/testing-gpu.json",
        f"-m benchmarks.layers_torch --device cuda --out {out}/layers_torch-gpu.json",
        f"-m benchmarks.layers_jax --out {out}/layers_jax-gpu.json",  # run although the step before failed
    ]
    assert "== exit 3" in done.stdout and (out / "gpu.txt").read_text().startswith("H100")
    # Where the frameworks see no GPU: one line, exit 2, no step run (the JAX suite would time the CPU otherwise).
    (bin_dir / "python").write_text('#!/usr/bin/env bash\ncase "$*" in -c*) exit 1;; esac\necho "PY $*"\n')
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), str(tmp_path / "none")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "PY" not in done.stdout and not (tmp_path / "none").exists()
    assert done.stderr.strip().startswith("benchmarks/gpu.sh: PyTorch or JAX sees no GPU here")
