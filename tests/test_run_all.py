"""results/fashion-mnist/run_all.sh, with a stand-in for python: what each queue entry runs, and with which threads."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from renorm_repro.runs import THREAD_VARIABLES  # the variables run_all.sh sets (and versions.json records)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "results" / "fashion-mnist" / "run_all.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, *names, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    # The stand-in prints its arguments and the thread settings it was given, and trains nothing.
    fake.write_text(
        '#!/usr/bin/env bash\necho "ARGS $*"\n'
        'echo "THREADS ${TF_NUM_INTRAOP_THREADS-unset} ${TF_NUM_INTEROP_THREADS-unset} ${OMP_NUM_THREADS-unset}"\n'
    )
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RENORM_OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", str(SCRIPT), *names], env=base, capture_output=True, text=True, timeout=60)


def test_one_tensorflow_thread_a_run_unless_set(tmp_path):
    out = _run(tmp_path, "final/mb-bn32")
    assert out.returncode == 0, out.stderr
    assert "THREADS 1 1 1" in out.stdout
    assert "--arms bn_32" in out.stdout and f"--out {tmp_path / 'out' / 'final/mb-bn32'}" in out.stdout
    out = _run(tmp_path, "final/mb-bn32", TF_NUM_INTRAOP_THREADS="2", OMP_NUM_THREADS="2")
    assert "THREADS 2 1 2" in out.stdout


def test_the_long_queue_name_stands_for_five_seed_folders(tmp_path):
    out = _run(tmp_path, "long-noniid-w8")
    assert out.returncode == 0, out.stderr
    runs = [line for line in out.stdout.splitlines() if line.startswith("ARGS ")]
    assert [r.split("--seeds ")[1].split()[0] for r in runs] == ["0", "1", "2", "3", "4"]
    assert all("--steps 40000" in r and "--schedule-base paper" in r for r in runs)


def test_an_unknown_name_is_refused_in_one_line(tmp_path):
    out = _run(tmp_path, "nosuch")
    assert out.returncode == 2 and out.stderr.strip() == "run_all.sh: unknown experiment nosuch"


def test_the_width_8_counterpart_differs_from_the_figure_3_final_only_in_width(tmp_path):
    out = _run(tmp_path, "final/noniid-bn", "final/noniid-w8-bn", "final/noniid-brn", "final/noniid-w8-brn")
    assert out.returncode == 0, out.stderr
    runs = [line.split(" --out ")[0].split() for line in out.stdout.splitlines() if line.startswith("ARGS ")]
    assert len(runs) == 4
    for w16, w8 in ((runs[0], runs[1]), (runs[2], runs[3])):
        i = w8.index("--width")
        assert w8[:i] + w8[i + 2 :] == w16 and w8[i + 1] == "8" and "--width" not in w16


def test_the_long_run_with_the_final_schedule_differs_only_in_its_schedule(tmp_path):
    names = ["long/noniid-w8-seed0", "long/noniid-w8-final-schedule-seeds0-2", "long/noniid-w8-final-schedule-seeds3-4"]
    out = _run(tmp_path, *names)
    assert out.returncode == 0, out.stderr
    runs = [line.split(" --out ")[0].split()[1:] for line in out.stdout.splitlines() if line.startswith("ARGS ")]

    def options(args):  # flag -> value
        return dict(zip(args[::2], args[1::2])) if all(a.startswith("--") for a in args[::2]) else {}

    long, *short = [options(r[3:]) for r in runs]  # after `-m renorm_repro.cli run`
    schedule = {
        "--warmup-steps": "2000",
        "--dmax-steps": "2500",
        "--rmax-steps": "2875",
        "--rmax": "1.5",
        "--dmax": "0.5",
    }
    for opts, seeds in zip(short, ("0,1,2", "3,4")):
        assert {k: v for k, v in opts.items() if k in schedule} == schedule
        assert opts["--arms"] == "brn" and opts["--seeds"] == seeds
        rest = {k: v for k, v in opts.items() if k not in schedule and k not in ("--arms", "--seeds")}
        assert rest == {k: v for k, v in long.items() if k not in ("--arms", "--seeds")}


def test_the_long_runs_short_warm_up_differs_from_the_final_schedule_only_in_warm_up_and_limits(tmp_path):
    names = ["long/noniid-w8-final-schedule-seeds0-2", "long/noniid-w8-warmup125-r1.5-d0.5", "long/noniid-w8-warmup125-r3-d5"]
    out = _run(tmp_path, *names)
    assert out.returncode == 0, out.stderr
    runs = [line.split(" --out ")[0].split()[4:] for line in out.stdout.splitlines() if line.startswith("ARGS ")]
    final, small, paper = (dict(zip(r[::2], r[1::2])) for r in runs)
    changed = {"--warmup-steps": "125", "--dmax-steps": "625", "--rmax-steps": "1000", "--seeds": "0,1,2,3,4"}
    assert {k: v for k, v in small.items() if final[k] != v} == changed
    assert {k: v for k, v in paper.items() if small[k] != v} == {"--rmax": "3", "--dmax": "5"}
