"""``renorm-repro run --jobs N``: runs in worker processes train exactly as one at a time, and every fault
(a signal, a killed worker, a killed parent, a worker's error) ends in one line and a folder that ``--resume``
completes to the same numbers (renorm_repro/parallel.py).

The real command, in its own session, on the micro-batch smoke preset (three runs); signals and kills go
only to the processes these tests start, by pid.
"""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from renorm_repro import config as C
from renorm_repro.cli import ConfigError, _jobs
from renorm_repro.parallel import auto_jobs, cpu_count

REPRO = [sys.executable, "-m", "renorm_repro.cli"]
RUNS = [("bn_micro", 0), ("brn_micro", 0), ("bn_32", 0)]
STEPS = 96  # long enough (about 3 s a run) for a signal to find both workers training


def _cmd(out, cache, *extra):
    return [*REPRO, "run", "--preset", "smoke", "--out", str(out), "--cache-dir", str(cache), "--steps", str(STEPS),
            "--no-progress", *extra]  # fmt: skip


# As a user starts it: the command decides how TensorFlow logs (another test may have set the variable here).
ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def _run(out, cache, *extra, timeout=300):
    return subprocess.run(_cmd(out, cache, *extra), capture_output=True, text=True, timeout=timeout, env=ENV)


def _start(out, cache, *extra):
    return subprocess.Popen(
        _cmd(out, cache, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=ENV,
    )


def _metrics_of(out, arm):
    with open(Path(out) / "runs" / arm / "seed0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _metrics(out):
    """Every run's metrics.csv rows without the wall time (the only column that differs between equal runs)."""
    return {arm: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _metrics_of(out, arm)] for arm, _ in RUNS}


def _summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _rows(out, arm):
    try:
        return (Path(out) / "runs" / arm / "seed0" / "metrics.csv").read_bytes().count(b"\n") - 1
    except OSError:
        return -1


def _workers(proc, out, timeout=120):
    """The pids of ``proc``'s worker processes once both are training (their runs have logged a row)."""
    t0 = time.monotonic()
    while _rows(out, "bn_micro") < 2 or _rows(out, "brn_micro") < 2:
        assert proc.poll() is None, f"the command ended early: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout, "the workers did not start training"
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    pids = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(pids) == 2, children
    return pids


def _gone(pids, timeout=10):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def _state(pid):
    try:
        return next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:"))
    except (OSError, StopIteration):
        return "Z"


@contextlib.contextmanager
def _training(out, cache):
    """``run --jobs 2`` into ``out``: yields ``(proc, workers)`` once both workers train. On the way out, a
    command still running is killed, and so is any worker left (frozen or orphaned by a failed check)."""
    proc = _start(out, cache, "--jobs", "2")
    workers = []
    try:
        workers = _workers(proc, out)
        yield proc, workers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The three runs trained one at a time in one process (``--jobs 1``)."""
    pytest.importorskip("tensorflow")
    out = tmp_path_factory.mktemp("parallel") / "one"
    res = _run(out, cache, "--jobs", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(2 processes)" not in res.stdout
    return out


pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker pids from /proc")


def test_two_processes_train_every_run_as_one_process_does(reference, cache, tmp_path):
    res = _run(tmp_path / "two", cache, "--jobs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "in 2 processes" not in res.stdout and "(2 processes)" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("Finding"), res.stdout[-500:]
    assert sum(f"[{arm} seed0] step {STEPS}/{STEPS}" in res.stdout for arm, _ in RUNS) == 3, res.stdout
    assert _metrics(tmp_path / "two") == _metrics(reference)
    assert _summary(tmp_path / "two") == _summary(reference)


def test_stop_after_stops_every_run_after_its_own_steps(cache, tmp_path):
    """(Resuming after it is the single-process path's, tests/test_repro_pipeline.py; after a signal or a kill
    under --jobs 2, the tests below.)"""
    out = tmp_path / "stop-after"
    res = _run(out, cache, "--jobs", "2", "--stop-after", "50")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "stopped early (--stop-after); continue with --resume"
    for arm, _ in RUNS:  # each run stopped after its own 50 steps; rows are logged every 4 (eval_every)
        assert [r["step"] for r in _metrics_of(out, arm)][-1] == "48", arm
        assert not (out / "runs" / arm / "seed0" / "done.json").exists()


def test_a_signal_stops_both_workers_an_error_is_one_line_and_resume_ends_as_never_stopped(reference, cache, tmp_path):
    out = tmp_path / "cut"
    with _training(out, cache) as (proc, workers):
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert _gone(workers), "a worker outlived the command"
    assert proc.returncode == 130, err[-3000:]
    line = _one_line(err)
    assert line.startswith("renorm-repro: interrupted: ") and line.endswith("continue with --resume"), line
    for arm in ("bn_micro", "brn_micro"):  # both runs in training, each with its step and last checkpoint
        assert f"{arm} seed0 at step " in line, line
    # A worker's error: a file where the third run's folder goes (that run had not started). The worker's
    # OSError, raised in the parent as itself, is the command's one line, and the others stop.
    blocker = out / "runs" / "bn_32" / "seed0"
    assert not blocker.exists()
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    res = _run(out, cache, "--resume", "--jobs", "2")
    assert res.returncode == 1, res.stderr[-3000:]
    line = _one_line(res.stderr)
    assert line.startswith("renorm-repro: error: ") and str(blocker) in line, line
    assert line.endswith("once fixed, continue with --resume"), line
    blocker.unlink()
    res = _run(out, cache, "--resume", "--jobs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _metrics(out) == _metrics(reference)
    assert _summary(out) == _summary(reference)


def test_a_second_signal_kills_workers_that_do_not_stop(cache, tmp_path):
    """Workers that cannot take the forwarded SIGTERM (stopped here with SIGSTOP) are killed at the second
    signal: the command still ends in one line, 130, and leaves no process behind. (A folder so left resumes as
    after any kill: the next test.)"""
    out = tmp_path / "second"
    with _training(out, cache) as (proc, workers):
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None, "the command did not wait for its workers"
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert _gone(workers), "a stopped worker outlived the command"  # before _training's clean-up
    assert proc.returncode == 130, err[-3000:]
    line = _one_line(err)
    assert line == "renorm-repro: interrupted; continue with --resume", line


def test_a_killed_worker_stops_the_other_with_one_line_and_its_run_resumes(reference, cache, tmp_path):
    out = tmp_path / "worker"
    with _training(out, cache) as (proc, workers):
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert _gone(workers)
    assert proc.returncode == 1, err[-3000:]
    line = _one_line(err)
    assert line.startswith(f"renorm-repro: error: a worker process (pid {workers[0]}) ended with signal 9 while "
                           f"training "), line  # fmt: skip
    assert line.endswith("; continue with --resume"), line
    res = _run(out, cache, "--resume", "--jobs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _metrics(out) == _metrics(reference)


@pytest.mark.slow
def test_workers_leave_when_their_parent_is_killed_and_the_folder_resumes(reference, cache, tmp_path):
    out = tmp_path / "parent"
    with _training(out, cache) as (proc, workers):
        os.kill(proc.pid, signal.SIGKILL)  # no handler, no cleanup: the workers notice on their own
        proc.communicate(timeout=60)
        assert _gone(workers, timeout=10), "an orphaned worker kept training into a folder whose lock was gone"
    res = _run(out, cache, "--resume", "--jobs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _metrics(out) == _metrics(reference)


# ------------------------------------------------------------- --jobs itself


def test_auto_is_one_process_a_cpu_only_when_each_run_is_pinned_to_a_thread(monkeypatch):
    import renorm_repro.parallel as P

    monkeypatch.setattr(P, "gpu_visible", lambda: False)
    pinned = C.get_config("digits", "microbatch")
    assert pinned.threads == 1 and len(pinned.arms) * len(pinned.seeds) == 15
    assert auto_jobs(pinned, 15) == min(15, cpu_count())
    assert auto_jobs(pinned, 1) == 1
    import dataclasses

    assert auto_jobs(dataclasses.replace(pinned, threads=0), 15) == 1  # TensorFlow's pools take every core
    assert auto_jobs(dataclasses.replace(pinned, threads=cpu_count()), 15) == 1
    assert auto_jobs(dataclasses.replace(pinned, strategy="mirrored"), 15) == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_a_bad_jobs_value_is_an_error_naming_it(value):
    with pytest.raises(ConfigError, match=rf"--jobs must be a positive number of processes or auto, got '{value}'"):
        _jobs(value, C.get_config("smoke", "microbatch"))


def test_auto_is_one_where_a_gpu_is_visible(monkeypatch, tmp_path):
    """Told from the device files, without importing TensorFlow; CUDA_VISIBLE_DEVICES=-1 or empty hides them."""
    import renorm_repro.parallel as P

    (tmp_path / "nvidia0").write_text("")
    monkeypatch.setattr(P, "GPU_DEVICE_FILES", (str(tmp_path / "nvidia[0-9]*"),))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert P.gpu_visible()
    assert auto_jobs(C.get_config("digits", "microbatch"), 15) == 1
    for hidden in ("-1", ""):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not P.gpu_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert P.gpu_visible()
    monkeypatch.setattr(P, "GPU_DEVICE_FILES", (str(tmp_path / "none*"),))
    assert not P.gpu_visible()


def test_without_posix_signals_auto_is_one_and_more_is_refused(monkeypatch):
    import renorm_repro.parallel as P

    monkeypatch.setattr(P, "SUPPORTED", False)
    assert auto_jobs(C.get_config("digits", "microbatch"), 15) == 1
    with pytest.raises(ConfigError, match=r"--jobs 2 needs POSIX signals.*use --jobs 1"):
        _jobs("2", C.get_config("smoke", "microbatch"))


def test_jobs_is_capped_at_the_runs_and_refused_with_a_strategy():
    cfg = C.get_config("smoke", "microbatch")
    assert _jobs("8", cfg) == len(cfg.arms) * len(cfg.seeds) == 3
    import dataclasses

    with pytest.raises(ConfigError, match="strategy=mirrored: use --jobs 1"):
        _jobs("2", dataclasses.replace(cfg, strategy="mirrored"))
    assert _jobs("1", dataclasses.replace(cfg, strategy="mirrored")) == 1


def test_a_bad_jobs_value_from_the_command_line_is_one_line_before_any_import(tmp_path):
    res = subprocess.run([*REPRO, "run", "--preset", "smoke", "--out", str(tmp_path / "o"), "--jobs", "0"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2
    assert (
        _one_line(res.stderr) == "renorm-repro: error: --jobs must be a positive number of processes or auto, got '0'."
    )
    assert not (tmp_path / "o").exists()
