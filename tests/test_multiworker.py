"""Past one machine: 2 real processes on 127.0.0.1 per framework (docs/SPEC.md, section 11).

Each test starts its workers through ``tests/multiworker.py`` (free local ports,
a deadline, the whole process group killed on failure or timeout, a fresh
network namespace where the machine allows one). The workers compare
themselves with the NumPy oracle and exit non-zero on any mismatch.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from multiworker import run_workers

pytest.importorskip("tensorflow")


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
    results = run_workers(lambda i: ["tests/jax_multiprocess_script.py"], timeout=240,
                          env={"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"})
    _assert_all_ok(results, "multiprocess OK")
    for _, out in results:
        assert out.count("OK pooled") == 3 and out.count("OK per-process") == 2, out[-4000:]


_CLI = "import sys; from renorm_repro.cli import main; sys.exit(main(sys.argv[1:]))"
_SMOKE = ["--preset", "smoke", "--arms", "bn_micro,brn_micro", "--steps", "6", "--eval-every", "3",
          "--checkpoint-every", "3", "--no-progress"]


def _metrics(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_repro_multiworker_equals_one_process(tmp_path):
    """renorm-repro run --strategy multiworker on 2 workers: the same metrics as one process with the
    same global batch and micro-batch size (float32 rounding), on both workers."""
    from renorm_repro import config as C
    from renorm_repro.cli import run_experiment

    cache = tmp_path / "cache"
    results = run_workers(
        lambda i: ["-c", _CLI, "run", *_SMOKE, "--strategy", "multiworker", "--cache-dir", str(cache),
                   "--out", str(tmp_path / f"worker{i}")], timeout=420)
    _assert_all_ok(results, "trained 2 arms x 1 seeds")
    cfg = C.get_config("smoke", overrides={"arms": "bn_micro,brn_micro", "steps": 6, "eval_every": 3,
                                           "checkpoint_every": 3, "cache_dir": str(cache)})
    run_experiment(cfg, tmp_path / "single", progress=False, log=lambda m: None)
    for arm in cfg.arms:
        single = _metrics(tmp_path / "single" / "runs" / arm / "seed0" / "metrics.csv")
        assert [r["step"] for r in single] == [3, 6]
        for w in (0, 1):
            rows = _metrics(tmp_path / f"worker{w}" / "runs" / arm / "seed0" / "metrics.csv")
            assert [r.keys() for r in rows] == [r.keys() for r in single]
            for r, s in zip(rows, single):
                for k in s:
                    np.testing.assert_allclose(r[k], s[k], rtol=1e-4, atol=1e-5, err_msg=f"{arm} worker {w} {k}")
        rec = json.loads((tmp_path / "worker0" / "runs" / arm / "seed0" / "config.json").read_text())
        assert rec["replicas"] == 2 and rec["config"]["strategy"] == "multiworker"


def test_repro_multiworker_needs_tf_config(tmp_path, monkeypatch):
    """Without TF_CONFIG, strategy=multiworker is refused rather than run as a single worker."""
    from renorm_repro import config as C
    from renorm_repro.cli import run_experiment
    from renorm_repro.runs import RunDirError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    cfg = C.get_config("smoke", overrides={"arms": "bn_micro", "steps": 2, "strategy": "multiworker",
                                           "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(RunDirError, match="TF_CONFIG"):
        run_experiment(cfg, tmp_path / "out", progress=False, log=lambda m: None)


def test_launcher_kills_the_other_workers_when_one_fails_or_time_runs_out():
    """The launcher itself: a failed worker takes the others down after the grace period, and a
    deadline kills every worker; the ports handed out are on 127.0.0.1 and distinct."""
    import time

    code = ("import os, sys, time, json; i = int(os.environ['MW_INDEX']); "
            "print(os.environ['TF_CONFIG'].replace(' ', ''), os.environ['JAX_COORDINATOR_ADDRESS']); "
            "sys.stdout.flush(); "
            "sys.exit(3) if i == 0 else time.sleep(300)")
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
