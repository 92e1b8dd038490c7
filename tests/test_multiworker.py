"""Past one machine: 2 real processes on 127.0.0.1 per framework (docs/SPEC.md, section 11).

Each test starts its workers through ``tests/multiworker.py`` (free local ports,
a deadline, the whole process group killed on failure or timeout, a fresh
network namespace where the machine allows one). The workers compare
themselves with the NumPy oracle and exit non-zero on any mismatch.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from multiworker import run_workers

pytest.importorskip("tensorflow")


def _error_lines(log):
    """The one-line errors (``renorm-repro: ...``) in a worker's output."""
    return [ln for ln in log.splitlines() if ln.startswith("renorm-repro:")]


def _assert_all_ok(results, marker):
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"worker {i} exited with {rc}:\n{out[-4000:]}"
        assert marker in out, f"worker {i}:\n{out[-4000:]}"


def test_tf_multiworker_layer_matches_oracle_on_the_global_batch():
    """MultiWorkerMirroredStrategy, 2 workers: synchronized pools over the workers; unsynchronized
    workers x per-replica batch k == one process with microbatch_size=k; a replica with 0 examples."""
    results = run_workers(lambda i: ["tests/tf_multiworker_script.py"], timeout=240)
    _assert_all_ok(results, "UNEVEN OK")
    for _, out in results:
        assert out.count("LAYER OK") == 3 and out.count("UNEVEN OK") == 3, out[-4000:]


def test_jax_two_processes_match_oracle_on_the_global_batch():
    """jax.distributed on a local coordinator, Gloo collectives: axis_name pools the 2 processes'
    moments; per-process micro-batches (state pmean-ed) == one process with microbatch_size."""
    pytest.importorskip("jax")
    results = run_workers(
        lambda i: ["tests/jax_multiprocess_script.py"], timeout=240, env={"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    )
    _assert_all_ok(results, "multiprocess OK")
    for _, out in results:
        assert out.count("OK pooled") == 3 and out.count("OK per-process") == 2, out[-4000:]


_CLI = "import sys; from renorm_repro.cli import main; sys.exit(main(sys.argv[1:]))"
# Rows at steps 3 and 6, checkpoints at 2, 4 and 6 (so a worker can fall back by one checkpoint).
_SMOKE = [
    "--preset",
    "smoke",
    "--arms",
    "bn_micro,brn_micro",
    "--steps",
    "6",
    "--eval-every",
    "3",
    "--checkpoint-every",
    "2",
    "--no-progress",
]
_OVERRIDES = {"arms": "bn_micro,brn_micro", "steps": 6, "eval_every": 3, "checkpoint_every": 2}


def _metrics(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(f)]


def _rows(path):
    """The rows of a metrics.csv as written, elapsed_s left out."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(f)]


def _run_multiworker(out_of, cache, *extra, **kwargs):
    return run_workers(
        lambda i: [
            "-c",
            _CLI,
            "run",
            *_SMOKE,
            "--strategy",
            "multiworker",
            "--cache-dir",
            str(cache),
            "--out",
            str(out_of(i)),
            *extra,
        ],
        **kwargs,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted ``--strategy multiworker`` run on 2 workers: ``(tmp folder, cache)``; worker w wrote
    ``tmp/worker<w>``."""
    tmp = tmp_path_factory.mktemp("multiworker")
    cache = tmp / "cache"
    results = _run_multiworker(lambda i: tmp / f"worker{i}", cache, timeout=420)
    _assert_all_ok(results, "trained 2 arms x 1 seeds")
    return tmp, cache


@pytest.mark.slow
def test_repro_multiworker_equals_one_process(uninterrupted, tmp_path):
    """renorm-repro run --strategy multiworker on 2 workers: the same metrics as one process with the
    same global batch and micro-batch size (float32 rounding), on both workers."""
    from renorm_repro import config as C
    from renorm_repro.cli import run_experiment

    tmp, cache = uninterrupted
    cfg = C.get_config("smoke", overrides={**_OVERRIDES, "cache_dir": str(cache)})
    run_experiment(cfg, tmp_path / "single", progress=False, log=lambda m: None)
    for arm in cfg.arms:
        single = _metrics(tmp_path / "single" / "runs" / arm / "seed0" / "metrics.csv")
        assert [r["step"] for r in single] == [3, 6]
        for w in (0, 1):
            rows = _metrics(tmp / f"worker{w}" / "runs" / arm / "seed0" / "metrics.csv")
            assert [r.keys() for r in rows] == [r.keys() for r in single]
            for r, s in zip(rows, single):
                for k in s:
                    np.testing.assert_allclose(r[k], s[k], rtol=1e-4, atol=1e-5, err_msg=f"{arm} worker {w} {k}")
        rec = json.loads((tmp / "worker0" / "runs" / arm / "seed0" / "config.json").read_text())
        assert rec["replicas"] == 2 and rec["config"]["strategy"] == "multiworker"


def _checkpoint_tensors(prefix):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_dtype_map()}


@pytest.mark.slow
def test_repro_multiworker_kill_9_then_resume_both_ends_like_the_uninterrupted_run(uninterrupted, tmp_path):
    """kill -9 of one worker of 2, then both restarted with --resume: they agree on the newest checkpoint
    both hold and end with the uninterrupted run's metrics.csv, TensorBoard events and final state.

    Worker 1 is killed as soon as worker 0 has finished the first arm (its ckpt-6 and done.json are on
    disk); worker 0, blocked in a collective with the dead worker, must stop by itself with one line.
    Worker 1's files are then made what a kill in the middle of its save of ckpt-6 leaves (the data
    file cut, no done.json, the next arm not begun), so the workers' newest intact checkpoints differ
    (6 and 4) and worker 0 holds a finished run that worker 1 lacks.
    """
    from test_repro_tensorboard import assert_events_match_metrics

    from renorm_repro import config as C
    from renorm_repro.runs import metric_columns

    ref, cache = uninterrupted
    out = [tmp_path / "worker0", tmp_path / "worker1"]
    bn0, bn1 = out[0] / "runs" / "bn_micro" / "seed0", out[1] / "runs" / "bn_micro" / "seed0"
    (rc0, out0), (rc1, _) = _run_multiworker(
        lambda i: out[i],
        cache,
        timeout=420,
        grace=150,
        env={"PYTHONUNBUFFERED": "1"},
        faults=[{"worker": 1, "signal": "SIGKILL", "after_file": str(bn0 / "done.json")}],
    )[0]
    assert rc1 == -9
    errors = _error_lines(out0)
    assert rc0 == 1 and len(errors) == 1, out0[-4000:]  # no hang: one line when the peer is gone
    assert "UnavailableError" in errors[0] and "continue with --resume" in errors[0], errors[0]
    assert (bn1 / "checkpoints" / "ckpt-4.index").is_file()
    data = next((bn1 / "checkpoints").glob("ckpt-6.data-*"), None)
    if data is not None:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    (bn1 / "done.json").unlink(missing_ok=True)
    shutil.rmtree(out[1] / "runs" / "brn_micro", ignore_errors=True)
    before1 = [r["step"] for r in _rows(bn1 / "metrics.csv")]
    assert (bn0 / "done.json").is_file() and [r["step"] for r in _rows(bn0 / "metrics.csv")] == ["3", "6"]

    results = _run_multiworker(lambda i: out[i], cache, "--resume", timeout=420)
    _assert_all_ok(results, "trained 2 arms x 1 seeds")
    log0, log1 = results[0][1], results[1][1]
    assert (
        "[bn_micro seed0] complete here, but not on every worker: training again from the common "
        "checkpoint at step 4" in log0
    ), log0[-4000:]
    assert "ckpt-4 at step 4 (the newest checkpoint every worker holds)" in log0, log0[-4000:]
    for log in (log0, log1):
        assert "[bn_micro seed0] dropping ckpt-6: newer than the checkpoint every worker holds" in log, log[-4000:]
    assert "ckpt-4 at step 4 (the newest checkpoint every worker holds)" in log1, (before1, log1[-4000:])

    cfg = C.get_config("smoke", overrides={**_OVERRIDES, "cache_dir": str(cache)})
    for arm in cfg.arms:
        for w in (0, 1):
            rdir, rdir_ref = out[w] / "runs" / arm / "seed0", ref / f"worker{w}" / "runs" / arm / "seed0"
            assert _rows(rdir / "metrics.csv") == _rows(rdir_ref / "metrics.csv"), (arm, w)
            assert_events_match_metrics(rdir, metric_columns(cfg))
            # Every variable of the final checkpoint, the layers' step counters among them.
            state, state_ref = (_checkpoint_tensors(d / "checkpoints" / "ckpt-6") for d in (rdir, rdir_ref))
            assert state.keys() == state_ref.keys()
            for name in state:
                np.testing.assert_array_equal(state[name], state_ref[name], err_msg=f"{arm} worker {w} {name}")
            steps = {k: int(v) for k, v in state.items() if k.startswith("model/") and "/step/" in k}
            assert len(steps) == 4 and set(steps.values()) == {6}, steps


@pytest.mark.slow
def test_repro_multiworker_chief_killed_with_every_checkpoint_damaged(uninterrupted, tmp_path):
    """kill -9 of the chief (worker 0), then every checkpoint of its run damaged: --resume of both stops on
    both workers with one line that names the damaged worker, changing nothing; with that run's folder
    deleted (what the line says to do), --resume trains it again from step 0 on both and ends like the
    uninterrupted run."""
    from renorm_repro import config as C

    ref, cache = uninterrupted
    out = [tmp_path / "worker0", tmp_path / "worker1"]
    run0, run1 = out[0] / "runs" / "bn_micro" / "seed0", out[1] / "runs" / "bn_micro" / "seed0"
    (rc0, _), (rc1, out1) = _run_multiworker(
        lambda i: out[i],
        cache,
        timeout=420,
        grace=150,
        env={"PYTHONUNBUFFERED": "1"},
        faults=[{"worker": 0, "signal": "SIGKILL", "after_file": str(run1 / "checkpoints" / "ckpt-4.index")}],
    )[0]
    assert rc0 == -9
    errors = _error_lines(out1)
    assert rc1 == 1 and len(errors) == 1, out1[-4000:]  # the other worker stops by itself, with one line
    assert "continue with --resume" in errors[0], errors[0]
    data = sorted((run0 / "checkpoints").glob("ckpt-*.data-*"))
    assert data, sorted(p.name for p in run0.rglob("*"))
    for f in data:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def files(w):  # every file of the runs (the experiment's versions.json records each invocation)
        return sorted((p.relative_to(out[w]), p.read_bytes()) for p in (out[w] / "runs").rglob("*") if p.is_file())

    before = [files(0), files(1)]

    results = _run_multiworker(lambda i: out[i], cache, "--resume", timeout=420, grace=150)
    for w, (rc, log) in enumerate(results):
        lines = _error_lines(log)
        assert rc == 1 and len(lines) == 1, (w, log[-4000:])
        if w == 0:
            assert "no intact checkpoint" in lines[0] and f"delete {run0} to train" in lines[0], lines[0]
        else:
            assert "worker 0 has checkpoint files of runs/bn_micro/seed0 but none intact" in lines[0], lines[0]
            assert "Nothing was changed" in lines[0]
    assert [files(0), files(1)] == before

    shutil.rmtree(run0)
    results = _run_multiworker(lambda i: out[i], cache, "--resume", timeout=420)
    _assert_all_ok(results, "trained 2 arms x 1 seeds")
    assert "starting this run over from step 0" in results[1][1], results[1][1][-4000:]
    cfg = C.get_config("smoke", overrides={**_OVERRIDES, "cache_dir": str(cache)})
    for arm in cfg.arms:
        for w in (0, 1):
            rdir, rdir_ref = out[w] / "runs" / arm / "seed0", ref / f"worker{w}" / "runs" / arm / "seed0"
            assert _rows(rdir / "metrics.csv") == _rows(rdir_ref / "metrics.csv"), (arm, w)


def test_repro_multiworker_needs_tf_config(tmp_path, monkeypatch):
    """Without TF_CONFIG, strategy=multiworker is refused rather than run as a single worker."""
    from renorm_repro import config as C
    from renorm_repro.cli import run_experiment
    from renorm_repro.runs import RunDirError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    cfg = C.get_config(
        "smoke",
        overrides={"arms": "bn_micro", "steps": 2, "strategy": "multiworker", "cache_dir": str(tmp_path / "cache")},
    )
    with pytest.raises(RunDirError, match="TF_CONFIG"):
        run_experiment(cfg, tmp_path / "out", progress=False, log=lambda m: None)


def test_launcher_kills_the_other_workers_when_one_fails_or_time_runs_out():
    """The launcher itself: a failed worker takes the others down after the grace period, and a
    deadline kills every worker; the ports handed out are on 127.0.0.1 and distinct."""
    import time

    code = (
        "import os, sys, time, json; i = int(os.environ['MW_INDEX']); "
        "print(os.environ['TF_CONFIG'].replace(' ', ''), os.environ['JAX_COORDINATOR_ADDRESS']); "
        "sys.stdout.flush(); "
        "sys.exit(3) if i == 0 else time.sleep(300)"
    )
    t0 = time.monotonic()
    (rc0, out0), (rc1, out1) = run_workers(lambda i: ["-c", code], timeout=120, grace=1)
    assert rc0 == 3 and rc1 == -9 and time.monotonic() - t0 < 60
    cluster = json.loads(out1.split()[0])
    assert cluster["task"] == {"type": "worker", "index": 1}
    hosts = cluster["cluster"]["worker"]
    assert len(set(hosts)) == 2 and all(h.startswith("127.0.0.1:") for h in hosts)
    assert out1.split()[1] == hosts[0]

    t0 = time.monotonic()
    results = run_workers(lambda i: ["-c", "import time; time.sleep(300)"], timeout=2, grace=1)
    assert [rc for rc, _ in results] == [-9, -9] and time.monotonic() - t0 < 60
