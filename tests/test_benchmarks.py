"""The benchmark harness computes what the README's tables claim (no timing is asserted)."""

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks.common import markdown_table, measure, parse_args, summarize


def test_measure_interleaves_and_warms_up():
    calls = []
    cands = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = measure(cands, rounds=3, warmup=2)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up first
    assert calls[4:] == ["a", "b", "b", "a", "a", "b"]  # alternating order
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_summarize_takes_paired_ratios():
    times = {"base": [1.0, 2.0, 4.0], "x": [2.0, 4.0, 8.0], "floor": [0.5, 1.0, 2.0]}
    s = summarize(times, baseline="base", floor="floor")
    assert s["x"]["median_ms"] == 4000.0
    assert s["x"]["vs_baseline"] == 2.0  # every round is exactly 2x, whatever the drift
    assert s["base"]["vs_floor"] == 2.0
    assert s["x"]["spread"] > 0
    mb = summarize({"renorm mb=None": [1.0, 2.0], "renorm mb=2": [1.5, 3.0]}, whole="renorm mb=None")
    assert mb["renorm mb=2"]["vs_whole"] == 1.5 and "vs_whole" not in mb["renorm mb=None"]


def test_markdown_table_and_args():
    table = markdown_table([{"a": 1.23456, "b": "x"}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | x |"]
    args = parse_args("t", "out.json", ["--shapes", "8,4;2,3,3,4", "--rounds", "2"])
    assert args.shapes == [(8, 4), (2, 3, 3, 4)] and args.rounds == 2
    with pytest.raises(SystemExit):
        parse_args("t", "out.json", ["--shapes", "8,x"])
    with pytest.raises(SystemExit):
        parse_args("t", "out.json", ["--rounds", "0"])


def test_a_suite_of_whole_commands_takes_no_kernel_options(capsys):
    """benchmarks/main_job.py times a command: --shapes and --warmup would be accepted and ignored."""
    from benchmarks.main_job import main

    for option in (["--shapes", "8,4"], ["--warmup", "1"]):
        with pytest.raises(SystemExit):
            main(option)
        assert f"unrecognized arguments: {' '.join(option)}" in capsys.readouterr().err
    args = parse_args("t", "out.json", ["--rounds", "2"], kernels=False)
    assert args.rounds == 2 and args.full and args.out == "out.json"


def test_jax_layer_suite_runs(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "layers_jax.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.layers_jax",
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
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    data = json.loads(out.read_text())
    names = {(r["mode"], r["candidate"]) for r in data["rows"]}
    assert ("train", "renorm mb=2") in names and ("infer", "flax BatchNorm") in names
    assert all(r["vs_baseline"] > 0 for r in data["rows"])
    assert all("vs_whole" in r for r in data["rows"] if r["candidate"] in ("renorm mb=2", "renorm mb=4"))


def test_study_suite_runs_and_splits_a_run_into_its_parts(tmp_path):
    pytest.importorskip("tensorflow")
    out = tmp_path / "study_tf.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.study_tf", "--quick", "--rounds", "1", "--warmup", "1", "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    data = json.loads(out.read_text())
    assert {(r["experiment"], r["candidate"]) for r in data["rows"]} == {
        (e, c) for e in ("iid", "mbk4") for c in ("none", "bn", "brn")
    }
    assert all(r["vs_no_norm"] == 1.0 for r in data["rows"] if r["candidate"] == "none")
    for r in data["run_split"]:
        parts = r["training_steps"] + r["evaluations_inference"] + r["lag_diagnostic"]
        assert parts == pytest.approx(1.0) and min(r["training_steps"], r["lag_diagnostic"]) > 0
    assert data["full"] is False


# ----------------------------------------------------------------- partial runs never touch the committed results
REPO = pathlib.Path(__file__).resolve().parents[1]
SUITES = ["layers_tf", "layers_jax", "step_tf", "step_jax", "jax_clip_fusion", "study_tf"]


def _step_extra(p):
    from benchmarks.common import step_suite_args

    step_suite_args(p)
    p.add_argument("--no-xla", action="store_true")


@pytest.mark.parametrize("suite", SUITES)
def test_only_full_runs_write_the_committed_results(suite):
    committed = f"benchmarks/results/{suite}.json"
    scratch = f"benchmarks/results/scratch/{suite}.json"
    full = parse_args("t", committed, [], extra=_step_extra)
    assert full.full and full.out == committed
    assert parse_args("t", committed, ["--rounds", "5", "--batches", "1600,256"], extra=_step_extra).out == committed
    for partial in (["--quick"], ["--shapes", "8,4"], ["--width", "4"], ["--batches", "64"], ["--no-xla"]):
        args = parse_args("t", committed, partial, extra=_step_extra)
        assert not args.full and args.out == scratch, partial
        assert args.command == f"python -m benchmarks.{suite} " + " ".join(partial)
        with pytest.raises(SystemExit):  # not even when asked for
            parse_args("t", committed, partial + ["--out", committed], extra=_step_extra)


def test_scratch_folder_is_ignored_by_git():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/scratch/layers_jax.json"], cwd=REPO)
    assert res.returncode == 0, "benchmarks/results/scratch/ must be git-ignored"
    res = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/layers_jax.json"], cwd=REPO)
    assert res.returncode == 1, "the committed results must not be ignored"


def test_quick_run_writes_the_scratch_folder_not_the_committed_file(tmp_path):
    """``--quick`` as the README spells it, run from a stand-in repository root (``tmp_path``)."""
    pytest.importorskip("jax")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.layers_jax", "--quick", "--rounds", "1", "--warmup", "0"],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        env=env,
    )
    assert not (tmp_path / "benchmarks/results/layers_jax.json").exists()
    data = json.loads((tmp_path / "benchmarks/results/scratch/layers_jax.json").read_text())
    assert data["full"] is False and data["command"].endswith("--quick --rounds 1 --warmup 0")


def test_report_reads_only_full_runs(tmp_path, capsys):
    from benchmarks import report

    committed = json.loads((REPO / "benchmarks/results/step_jax.json").read_text())
    (tmp_path / "step_jax.json").write_text(json.dumps({**committed, "full": False, "command": "x --quick"}))
    with pytest.raises(SystemExit, match="no full-run results"):
        report.main(["--results", str(tmp_path)])
    assert "skipping" in capsys.readouterr().err
    (tmp_path / "step_tf.json").write_text((REPO / "benchmarks/results/step_tf.json").read_text())
    report.main(["--results", str(tmp_path)])
    out = capsys.readouterr()
    assert "training step of the reproduction's convnet" in out.out and "Flax" not in out.out
    assert "`python -m benchmarks.step_tf --rounds 5` on" in out.out  # the committed run used 5 rounds


def test_committed_results_are_full_runs():
    for suite in SUITES:
        data = json.loads((REPO / f"benchmarks/results/{suite}.json").read_text())
        assert data["full"] is True, suite


def test_report_reads_the_keras_on_jax_suite(tmp_path, capsys):
    """benchmarks.report prints the table of docs/keras.md (Speed) from layers_keras_jax.json."""
    from benchmarks import report

    (tmp_path / "layers_keras_jax.json").write_text((REPO / "benchmarks/results/layers_keras_jax.json").read_text())
    report.main(["--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "#### Keras layer on the JAX backend (jitted)" in out
    assert "`python -m benchmarks.layers_keras_jax` on" in out
    assert "| (1600, 32, 32, 64) | 1.00x | 0.92x | 0.96x | 0.98x | 0.93x |" in out
    assert "| (4096, 1024) | 0.76x | 1.38x | 2.19x | 5.92x | 0.63x |" in out
