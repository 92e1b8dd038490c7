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
