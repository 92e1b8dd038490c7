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
    names = [
        "long/noniid-w8-final-schedule-seeds0-2",
        "long/noniid-w8-warmup125-r1.5-d0.5",
        "long/noniid-w8-warmup125-r3-d5",
    ]
    out = _run(tmp_path, *names)
    assert out.returncode == 0, out.stderr
    runs = [line.split(" --out ")[0].split()[4:] for line in out.stdout.splitlines() if line.startswith("ARGS ")]
    final, small, paper = (dict(zip(r[::2], r[1::2])) for r in runs)
    changed = {"--warmup-steps": "125", "--dmax-steps": "625", "--rmax-steps": "1000", "--seeds": "0,1,2,3,4"}
    assert {k: v for k, v in small.items() if final[k] != v} == changed
    assert {k: v for k, v in paper.items() if small[k] != v} == {"--rmax": "3", "--dmax": "5"}


def _entries(tmp_path, *names):
    """``{name: [option tokens after `run`]}`` of the queue entries ``names``, as the script runs them."""
    out = _run(tmp_path, *names)
    assert out.returncode == 0, out.stderr
    runs = [line.split(" --out ")[0].split()[4:] for line in out.stdout.splitlines() if line.startswith("ARGS ")]
    assert len(runs) == len(names)
    return dict(zip(names, runs))


def _config(tokens):
    """The config a `renorm-repro run` with these option tokens trains (``--experiment E --preset P`` first)."""
    from renorm_repro.config import get_config, parse_override_tokens

    opts = parse_override_tokens(tokens)
    return get_config(opts.pop("preset"), opts.pop("experiment"), opts)


PRECISE = {  # folder -> (its committed final, the seeds it reruns; None: all of them)
    "final/iid-bn-precise": ("final/iid-bn", None),
    "final/noniid-bn-precise": ("final/noniid-bn", None),
    "final/mbk2-bn-precise-seeds20-22": ("final/mbk2-bn", "20,21,22"),
    "final/mbk2-bn-precise-seeds23-24": ("final/mbk2-bn", "23,24"),
}


def test_each_precise_bn_rerun_differs_from_its_committed_final_only_by_the_option(tmp_path):
    from renorm_repro.runs import _config_diff

    finals = sorted({final for final, _ in PRECISE.values()})
    runs = _entries(tmp_path, *PRECISE, *finals)
    for precise, (final, seeds) in PRECISE.items():
        expected = list(runs[final])
        if seeds is not None:  # a part of the final's seeds: the same options but --seeds
            expected[expected.index("--seeds") + 1] = seeds
        assert runs[precise] == expected + ["--precise-bn-batches", "100"], precise
        committed = ROOT / "results" / "fashion-mnist" / final / "config.json"
        # The committed folder's config is the rerun's but for the option (the rerun trains alike, bit for bit).
        diff = _config_diff(committed, _config(runs[precise]))
        assert diff.pop("precise_bn_batches") == (None, 100), precise
        assert set(diff) == (set() if seeds is None else {"seeds"}), (precise, diff)
        assert _config_diff(committed, _config(runs[final])) == {}, final


GN_FINALS = {  # folder -> (its setting's batch-norm final, seeds)
    "final/noniid-gn": ("final/noniid-bn", "20,21,22,23,24"),
    "final/mbk2-gn-seeds20-22": ("final/mbk2-bn", "20,21,22"),
    "final/mbk2-gn-seeds23-24": ("final/mbk2-bn", "23,24"),
}


def test_the_group_norm_entries_differ_from_the_batch_norm_finals_only_by_arm_groups_and_seeds(tmp_path):
    from renorm_repro.runs import _config_diff

    sweep = {f"sweep/gn-{s}-g{g}": (f"final/{s}-bn", "10,11") for s in ("noniid", "mbk2") for g in (2, 4, 8)}
    entries = {**sweep, **GN_FINALS}
    runs = {
        k: dict(zip(v[::2], v[1::2]))
        for k, v in _entries(tmp_path, *entries, *{f for f, _ in PRECISE.values()}).items()
    }
    assert [runs[n]["--gn-groups"] for n in sweep] == ["2", "4", "8"] * 2
    for name, (final, seeds) in entries.items():
        opts, bn = runs[name], runs[final]
        assert opts["--arms"] == "gn" and opts["--seeds"] == seeds
        assert {k: v for k, v in opts.items() if k not in ("--arms", "--seeds", "--gn-groups")} == {
            k: v for k, v in bn.items() if k not in ("--arms", "--seeds")
        }
        committed = ROOT / "results" / "fashion-mnist" / final / "config.json"
        diff = _config_diff(committed, _config([t for kv in opts.items() for t in kv]))
        assert set(diff) <= {"arms", "seeds", "gn_groups"} and "arms" in diff, name  # renorm-repro pool pairs them
    # The group counts divide the convnet's widths (16, 32, 64, 128 at the presets' width 16).
    _config(["--experiment", "noniid", "--preset", "fashion", "--arms", "gn", "--gn-groups", "8"])


def test_each_gn_final_uses_its_sweeps_validation_choice(tmp_path):
    """The group count of a GN final is the one with the highest mean val_last4 over its setting's committed sweep."""
    import json

    runs = {k: dict(zip(v[::2], v[1::2])) for k, v in _entries(tmp_path, *GN_FINALS).items()}
    for name in GN_FINALS:
        setting = "noniid" if "noniid" in name else "mbk2"
        val = {}
        for g in (2, 4, 8):
            summary = ROOT / "results" / "fashion-mnist" / "sweep" / f"gn-{setting}-g{g}" / "summary.json"
            val[g] = json.loads(summary.read_text())["arms"]["gn"]["scalars"]["val_last4"]["mean"]
        assert runs[name]["--gn-groups"] == str(max(val, key=val.get)), (name, val)


def test_the_gn_sweep_queue_names_stand_for_their_folders(tmp_path):
    out = _run(tmp_path, "sweep-gn-noniid", "sweep-gn-mbk2")
    assert out.returncode == 0, out.stderr
    folders = [line.split(" --out ")[1].split()[0] for line in out.stdout.splitlines() if line.startswith("ARGS ")]
    assert [Path(f).relative_to(tmp_path / "out").as_posix() for f in folders] == [
        f"sweep/gn-{s}-g{g}" for s in ("noniid", "mbk2") for g in (2, 4, 8)
    ]
