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


def test_jax_layer_suite_runs(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "layers_jax.json"
    subprocess.run([sys.executable, "-m", "benchmarks.layers_jax", "--shapes", "16,8", "--rounds", "1",
                    "--warmup", "1", "--out", str(out)], check=True, capture_output=True,
                   cwd=pathlib.Path(__file__).resolve().parents[1])
    data = json.loads(out.read_text())
    names = {(r["mode"], r["candidate"]) for r in data["rows"]}
    assert ("train", "renorm mb=2") in names and ("infer", "flax BatchNorm") in names
    assert all(r["vs_baseline"] > 0 for r in data["rows"])
    assert all("vs_whole" in r for r in data["rows"] if r["candidate"] in ("renorm mb=2", "renorm mb=4"))
