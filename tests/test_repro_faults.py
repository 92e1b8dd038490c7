"""renorm_repro under faults: torn logs, damaged checkpoints, two processes, typos, failed loads, the disk, Ctrl-C.

Every test drives the command line (``main``) on the non-i.i.d. smoke preset
(one arm, seconds) and, where a run goes on, compares its final
``metrics.csv`` with an uninterrupted run's: every column but ``elapsed_s``,
as written. ``test_kill_9_at_any_point`` kills real subprocesses (and checks
the TensorBoard event files against the final log).
"""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("renorm.tf")

from test_repro_tensorboard import assert_events_match_metrics  # noqa: E402

from renorm_repro import data as D  # noqa: E402
from renorm_repro.cli import main  # noqa: E402
from renorm_repro.runs import (  # noqa: E402
    METRIC_COLUMNS,
    REPORT_FILES,
    MetricsLog,
    RunDirError,
    metric_columns,
    read_experiment_config,
    read_metrics,
    report_problem,
)

STEPS = 12


def _args(out, cache, *extra):
    return [
        "run",
        "--experiment",
        "noniid",
        "--preset",
        "smoke",
        "--arms",
        "brn",
        "--steps",
        str(STEPS),
        "--eval-every",
        "2",
        "--checkpoint-every",
        "4",
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--log-interval",
        "0",  # every evaluation's line: the tests read them
        "--out",
        str(out),
        *extra,
    ]


def _rdir(out):
    return Path(out) / "runs" / "brn" / "seed0"


def _rows(out):
    with open(_rdir(out) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("elapsed_s")
    return rows


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def reference_out(tmp_path_factory, cache):
    """The folder of an uninterrupted run, its report written (tests copy it; none changes it)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(_args(out, cache)) == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_out):
    """The rows of an uninterrupted run (elapsed_s left out)."""
    rows = _rows(reference_out)
    assert [int(r["step"]) for r in rows] == list(range(2, STEPS + 1, 2))
    return rows


@pytest.fixture
def stopped(tmp_path, cache, capsys):
    """A run stopped after 9 steps: checkpoints at steps 4 and 8, rows for 2, 4, 6, 8."""
    out = tmp_path / "out"
    assert main(_args(out, cache, "--stop-after", "9")) == 0
    assert [int(r["step"]) for r in _rows(out)] == [2, 4, 6, 8]
    assert (_rdir(out) / "checkpoints" / "ckpt-8.index").is_file()
    capsys.readouterr()
    return out


def _resume(out, cache, capsys, code=0):
    rc = main(_args(out, cache, "--resume"))
    captured = capsys.readouterr()
    assert rc == code, captured.err
    return captured


# ------------------------------------------------------------------ item 6: the log
def test_torn_last_row_is_dropped_and_the_resumed_run_matches(stopped, cache, capsys, reference):
    path = _rdir(stopped) / "metrics.csv"
    with open(path, "ab") as f:
        f.write(b"10,1.38,0.25")  # a kill in the middle of writing a row
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 6, 8]  # readers (the plot) skip it
    log = _resume(stopped, cache, capsys).out
    assert "ckpt-8 at step 8" in log
    assert _rows(stopped) == reference


def test_rows_the_checkpoint_has_passed_may_not_vanish(stopped, cache, capsys):
    path = _rdir(stopped) / "metrics.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    for kept, missing in ((lines[:1], "2, 4, 6, 8"), (lines[:2] + lines[3:], "4")):
        path.write_bytes(b"".join(kept))
        err = _one_line(_resume(stopped, cache, capsys, code=1).err)
        assert err.startswith("renorm-repro: error: ") and f"lacks the rows of steps {missing}" in err
        assert "checkpoint at step 8" in err and str(path) in err
        assert path.read_bytes() == b"".join(kept)  # nothing changed


def test_metrics_log_writes_whole_lines_and_rewrites_by_rename(tmp_path):
    cols = METRIC_COLUMNS
    log = MetricsLog(tmp_path / "m.csv", cols)
    log.start()
    for step in (2, 4, 6):
        log.append({c: (step if c == "step" else 0.5) for c in cols})
    raw = (tmp_path / "m.csv").read_bytes()
    assert raw.count(b"\r\n") == 4 and raw.endswith(b"\r\n")  # header and 3 rows, as the csv module writes them
    assert log.start(4, [2, 4]) == 2
    assert (tmp_path / "m.csv").read_bytes() == raw[: raw.index(b"6,")]  # the kept lines, byte for byte
    with pytest.raises(RunDirError, match=r"has rows at steps 2, which are not evaluation steps"):
        MetricsLog(tmp_path / "m.csv", cols).start(4, [4])
    header = raw[: raw.index(b"\r\n") + 2]
    (tmp_path / "m.csv").write_bytes(header + b"2,0.5\x00\x00\x00\r\n" + raw[raw.index(b"4,") :])
    with pytest.raises(RunDirError, match=r"line 2 is damaged"):
        read_metrics(tmp_path / "m.csv")


# ------------------------------------------------------------- item 7: checkpoints
def _truncate_data(ckdir):
    data = next(ckdir.glob("ckpt-8.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _flip_a_byte(ckdir):
    data = next(ckdir.glob("ckpt-8.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    data.write_bytes(bytes(raw))


def _remove_index(ckdir):
    (ckdir / "ckpt-8.index").unlink()


@pytest.mark.parametrize("damage", [_truncate_data, _flip_a_byte, _remove_index])
def test_damaged_latest_checkpoint_falls_back_to_the_older_one(stopped, cache, capsys, reference, damage):
    ckdir = _rdir(stopped) / "checkpoints"
    damage(ckdir)
    log = _resume(stopped, cache, capsys).out
    assert f"damaged checkpoint {ckdir / 'ckpt-8'}" in log and f"resuming from the older {ckdir / 'ckpt-4'}" in log
    assert "ckpt-4 at step 4" in log and "step 6/12" in log
    assert _rows(stopped) == reference


def test_garbled_state_file_resumes_from_the_newest_intact_checkpoint(stopped, cache, capsys, reference):
    ckdir = _rdir(stopped) / "checkpoints"
    (ckdir / "checkpoint").write_bytes(b'model_checkpoint_path: "ckpt-8\x00\x00 garbage {')
    log = _resume(stopped, cache, capsys).out
    assert "checkpoint state file" in log and "is damaged" in log
    assert "ckpt-8 at step 8" in log and "starting" not in log  # continued, not started over
    assert _rows(stopped) == reference


def test_no_intact_checkpoint_is_one_line_naming_the_files(stopped, cache, capsys):
    ckdir = _rdir(stopped) / "checkpoints"
    for data in ckdir.glob("ckpt-*.data-*"):
        data.write_bytes(b"")
    before = (_rdir(stopped) / "metrics.csv").read_bytes()
    err = _one_line(_resume(stopped, cache, capsys, code=1).err)
    assert err.startswith("renorm-repro: error: no intact checkpoint in ")
    assert str(ckdir / "ckpt-8") in err and str(ckdir / "ckpt-4") in err
    assert (_rdir(stopped) / "metrics.csv").read_bytes() == before


def test_an_unfinished_first_save_starts_the_run_over_and_says_so(tmp_path, cache, capsys, reference):
    out = tmp_path / "out"
    assert main(_args(out, cache, "--stop-after", "3")) == 0  # rows 2, no checkpoint yet
    ckdir = _rdir(out) / "checkpoints"
    (ckdir / "ckpt-4.index").write_bytes(b"\x00" * 10)  # a kill during the first save: no state file yet
    log = _resume(out, cache, capsys).out
    assert "skipping ckpt-4, a save that did not finish" in log and "starting this run over from step 0" in log
    assert _rows(out) == reference


# ------------------------------------------------------------------ item 8: the lock
def test_a_second_process_on_the_same_folder_is_refused(stopped, cache, capsys):
    before = (_rdir(stopped) / "metrics.csv").read_bytes()
    code = (
        "import sys, time; from renorm_repro.runs import ExperimentLock; ExperimentLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(stopped)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _one_line(_resume(stopped, cache, capsys, code=1).err)
        assert f"is in use by another run (pid {holder.pid} on " in err and "started " in err
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (_rdir(stopped) / "metrics.csv").read_bytes() == before
    _resume(stopped, cache, capsys)  # the holder is gone: its lock went with it


# ----------------------------------------------------------- item 9: the command line
def test_resume_of_a_folder_that_does_not_exist_is_an_error(tmp_path, cache, capsys):
    err = _one_line(_resume(tmp_path / "typo", cache, capsys, code=1).err)
    assert "does not exist, so there is nothing to resume" in err
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    err = _one_line(_resume(tmp_path / "empty", cache, capsys, code=1).err)
    assert "holds no experiment (no config.json), so there is nothing to resume" in err
    assert not any((tmp_path / "empty").iterdir())


def test_options_are_not_abbreviated_and_lists_have_no_empty_items(tmp_path, cache, capsys):
    assert main(_args(tmp_path / "a", cache, "--resum")) == 2
    err = _one_line(capsys.readouterr().err)
    assert "Unknown config key --resum, nor an option of `run`" in err and "Did you mean --resume" in err
    assert main(["show", "--preset", "smoke", "--seeds", "0,,1"]) == 2
    assert "without empty items, got '0,,1'" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------- item 10: a failed data load
def _fake_loader(good, real=D.load_dataset):
    def load(name, *, data_dir=None, cache_dir=None, **kw):
        if data_dir != str(good):
            raise D.DataError(f"Could not download CIFAR-100 to {data_dir} (no network).")
        return real("synthetic", cache_dir=cache_dir, num_train=128, num_test=64, num_classes=4)

    return load


def test_a_failed_data_load_can_be_retried_with_a_corrected_source(tmp_path, cache, capsys, monkeypatch):
    good = tmp_path / "cifar"
    good.mkdir()
    monkeypatch.setattr(D, "load_dataset", _fake_loader(good))
    out = tmp_path / "out"

    def run(data_dir, *extra):
        rc = main(_args(out, cache, "--dataset", "cifar100", "--data-dir", str(data_dir), *extra))
        return rc, capsys.readouterr()

    rc, cap = run(tmp_path / "nowhere")
    assert rc == 1 and "no network" in _one_line(cap.err)
    rc, cap = run(good)  # the same command, the data source corrected
    assert rc == 0, cap.err
    # A folder that an older version left with only its config.json (the load failed after it was written):
    # retried with --resume and another data source, or without --resume.
    from renorm_repro import config as C
    from renorm_repro.runs import prepare_experiment_dir

    for extra in (["--resume"], []):
        out = tmp_path / f"old{len(extra)}"
        bad = C.get_config(
            "smoke",
            "noniid",
            {
                "arms": "brn",
                "steps": STEPS,
                "eval_every": 2,
                "checkpoint_every": 4,
                "cache_dir": str(cache),
                "dataset": "cifar100",
                "data_dir": str(tmp_path / "nowhere"),
            },
        )
        prepare_experiment_dir(out, bad, resume=False)
        rc, cap = run(good, *extra)
        assert rc == 0, cap.err
        assert json.loads((out / "config.json").read_text())["config"]["data_dir"] == str(good)
        assert (_rdir(out) / "done.json").is_file()


def test_data_dir_that_is_a_device_is_not_reported_missing(tmp_path, cache, capsys):
    rc = main(_args(tmp_path / "out", cache, "--dataset", "cifar100", "--data-dir", "/dev/null"))
    err = _one_line(capsys.readouterr().err)
    assert rc == 1 and "'/dev/null' is neither a folder nor a file" in err and "does not exist" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------- item 11: the disk, files, Ctrl-C
def test_out_that_cannot_be_written_is_one_line(tmp_path, cache, capsys):
    (tmp_path / "file").write_text("x")
    assert main(_args(tmp_path / "file" / "out", cache)) == 1
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("renorm-repro: error: ") and "Not a directory" in err
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert main(_args(ro / "out", cache)) == 1
            assert "Permission denied" in _one_line(capsys.readouterr().err)
        finally:
            ro.chmod(0o755)


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, cache, capsys, monkeypatch, reference):
    out = tmp_path / "out"
    real_save = tf.train.CheckpointManager.save

    def full(self, checkpoint_number=None, **kw):
        if checkpoint_number == 8:
            raise tf.errors.ResourceExhaustedError(
                None,
                None,
                f"{out}/ckpt-8_temp/part-00000-of-00001.data-00000-of-00001.tempstate1; No space left on device",
            )
        return real_save(self, checkpoint_number=checkpoint_number, **kw)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full)
    assert main(_args(out, cache)) == 1
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("renorm-repro: error: ResourceExhaustedError: ") and "No space left on device" in err
    assert err.endswith("once fixed, continue with --resume")
    monkeypatch.setattr(tf.train.CheckpointManager, "save", real_save)

    def no_space(self, row):
        raise OSError(28, "No space left on device", str(self.path))

    monkeypatch.setattr(MetricsLog, "append", no_space)
    assert main(_args(out, cache, "--resume")) == 1
    err = _one_line(capsys.readouterr().err)
    assert (
        err == f"renorm-repro: error: No space left on device: {_rdir(out) / 'metrics.csv'}; once fixed, "
        f"continue with --resume"
    )
    monkeypatch.undo()
    _resume(out, cache, capsys)
    assert _rows(out) == reference


def test_ctrl_c_is_one_line_with_the_step_and_the_run_resumes(tmp_path, cache, capsys, monkeypatch, reference):
    out = tmp_path / "out"
    real_append = MetricsLog.append

    def interrupt_at_6(self, row):
        if row["step"] == 6:
            raise KeyboardInterrupt
        real_append(self, row)

    monkeypatch.setattr(MetricsLog, "append", interrupt_at_6)
    try:
        rc = main(_args(out, cache))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert rc == 130
    err = _one_line(capsys.readouterr().err)
    assert err == "renorm-repro: interrupted at step 6 (brn seed0, last checkpoint at step 4); continue with --resume"
    monkeypatch.undo()
    _resume(out, cache, capsys)
    assert _rows(out) == reference


# ------------------------------------------------------------- issue 12: the CLI
def test_run_help_lists_every_config_field_with_type_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--experiment", "noniid", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for line in (
        "--steps                    INT        8000",
        "--seeds                    INT,...    0,1,2,3,4",
        "--labels-per-batch         INT        16",
        "--data-dir                 STR|none   none",
        "--eval-batch-stats         BOOL       true",
    ):
        assert line in text, line
    with pytest.raises(SystemExit):
        main(["show", "--preset", "smoke", "--help"])
    assert "--microbatch-size          INT        2" in capsys.readouterr().out


def _repro(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, "-m", "renorm_repro.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_tensorflow_start_up_lines_are_hidden_by_default():
    res = _repro("bench", "--preset", "smoke", "--experiment", "iid", "--bench-steps", "1")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr  # no oneDNN, CPU-feature, CUDA or absl lines
    assert json.loads(res.stdout)["steps_per_s"] > 0


# ------------------------------------------------------------------ kill -9
def _wait_for(proc, cond, timeout=180):
    """Poll ``cond`` until it holds (True) or ``proc`` ends (False)."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if cond():
            return True
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("the run neither reached the kill point nor ended")
        time.sleep(0.002)
    return False


def test_kill_9_at_any_point_then_resume_ends_with_the_same_metrics(tmp_path, cache, reference):
    out = tmp_path / "out"
    rdir, ckdir = _rdir(out), _rdir(out) / "checkpoints"

    def rows():
        try:
            return (rdir / "metrics.csv").read_bytes().count(b"\n") - 1
        except OSError:
            return -1

    rng = random.Random(0)
    delay = rng.uniform(0.0, 0.05)
    kill_points = [
        ("the experiment's config is written", lambda: (out / "config.json").exists()),
        ("the run's log exists", lambda: rows() >= 0),
        ("a checkpoint save starts", lambda: any(ckdir.glob("ckpt-*"))),
        ("the 3rd row is logged", lambda: rows() >= 3),
        (f"{delay:.3f} s after the 4th row", lambda: rows() >= 4 and (time.sleep(delay) or True)),
    ]
    killed = []
    for name, cond in kill_points:
        args = _args(out, cache, *(["--resume"] if (out / "config.json").exists() else []))
        proc = subprocess.Popen(
            [sys.executable, "-m", "renorm_repro.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            if _wait_for(proc, cond):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                killed.append((name, rows(), sorted(p.name for p in ckdir.glob("*")) if ckdir.is_dir() else None))
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    assert len(killed) >= 3, killed
    res = _repro(*_args(out, cache, "--resume"))
    assert res.returncode == 0, res.stderr
    assert (rdir / "done.json").is_file()
    assert not any(ckdir.glob("ckpt-*_temp")), killed  # the shards of cut-short saves are cleaned up
    assert _rows(out) == reference, killed
    # The TensorBoard events too: each logged scalar once, at exactly the logged steps, with the log's values.
    assert_events_match_metrics(rdir, metric_columns(read_experiment_config(out)))


# ------------------------------------------------------------- issue 22: damaged metrics.csv, damaged events
def _garble_row(path, step):
    lines = path.read_bytes().split(b"\r\n")
    i = next(i for i, ln in enumerate(lines) if ln.startswith(f"{step},".encode()))
    lines[i] = lines[i][:5] + b"#garbled#" + lines[i][14:]
    path.write_bytes(b"\r\n".join(lines))
    return i + 1


@pytest.mark.parametrize("step, restored", [(6, "ckpt-4"), pytest.param(2, None, marks=pytest.mark.slow)])
def test_a_damaged_metrics_row_falls_back_to_an_older_checkpoint(stopped, cache, capsys, reference, step, restored):
    """Before: one line telling the user to delete the run. Now: the newest checkpoint whose rows are intact."""
    path = _rdir(stopped) / "metrics.csv"
    line = _garble_row(path, step)
    log = _resume(stopped, cache, capsys).out
    assert f"metrics.csv line {line} is damaged: falling back" in log, log
    if restored:
        assert f"resumed from {_rdir(stopped) / 'checkpoints' / restored} at step 4" in log, log
        assert "dropping ckpt-8: newer than the damaged log's rows" in log, log
    else:
        assert "starting this run over from step 0" in log, log
    assert _rows(stopped) == reference


def _event_file(rdir):
    files = sorted(p for p in (rdir / "tensorboard").iterdir() if "tfevents" in p.name)
    assert len(files) == 1, files
    return files[0]


def _flip_8_bytes(f):
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    f.write_bytes(bytes(data))


def _cut_to_2000(f):
    f.write_bytes(f.read_bytes()[:2000])


@pytest.mark.parametrize("damage", [_flip_8_bytes, pytest.param(_cut_to_2000, marks=pytest.mark.slow)])
def test_a_damaged_event_file_is_reported_and_its_columns_rewritten(stopped, cache, capsys, reference, damage):
    from test_repro_tensorboard import read_events

    rdir = _rdir(stopped)
    damage(_event_file(rdir))
    log = _resume(stopped, cache, capsys).out
    line = next((ln for ln in log.splitlines() if "TensorBoard events were damaged" in ln), None)
    assert line is not None, log  # before: rc 0, no message, 23 of 24 tags at one step
    assert "rewritten from metrics.csv" in line and line.endswith("; continuing"), line
    assert _rows(stopped) == reference
    rows = read_metrics(rdir / "metrics.csv")
    events = read_events(rdir / "tensorboard")
    columns = metric_columns(read_experiment_config(stopped))
    for c in columns:
        if c != "step":  # every column of the log at every logged step, once, with the log's values
            assert [s for s, _ in events[c]] == [r["step"] for r in rows], c
            assert [v for _, v in events[c]] == [float(np.float32(r[c])) for r in rows], c


@pytest.mark.parametrize("content", [b'{"final_st', pytest.param(b"[1, 2]", marks=pytest.mark.slow)])
def test_a_damaged_done_json_resumes_from_the_checkpoint(tmp_path, cache, capsys, reference, content):
    """Before: a JSONDecodeError traceback (or a TypeError); now the run is continued from its checkpoints."""
    out = tmp_path / "out"
    assert main(_args(out, cache)) == 0
    done = _rdir(out) / "done.json"
    done.write_bytes(content)
    log = _resume(out, cache, capsys).out
    assert f"{done} is damaged or names another length" in log, log
    assert json.loads(done.read_text())["final_step"] == STEPS
    assert _rows(out) == reference


# ------------------------------------------------------------- issue 33: complete means a valid report
def _report(out):
    """The report's files (bytes; None where missing)."""
    return {n: (Path(out) / n).read_bytes() if (Path(out) / n).is_file() else None for n in REPORT_FILES}


def _run_files(out):
    """Every file under runs/ (bytes) and its modification time: what a report rewrite must never touch."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((Path(out) / "runs").rglob("*")) if p.is_file()}


def _resume_rewrites_the_report(out, cache, capsys, why):
    """``--resume`` of a folder whose runs are complete and whose report is not: one line naming ``why``, the
    report rewritten from the logs (what ``plot`` writes), no run file touched, and a second resume a no-op."""
    cfg = read_experiment_config(out)
    assert why in report_problem(out, cfg)
    runs = _run_files(out)
    line = _one_line(_resume(out, cache, capsys).out)
    assert line.startswith(f"{out}: every run is complete but the report was not ({why}"), line
    assert "rewrote summary.md, summary.json and the figures from the logs; no run changed." in line
    assert report_problem(out, cfg) is None
    assert _run_files(out) == runs
    assert not list(Path(out).glob("*.tmp"))
    report = _report(out)
    assert main(["plot", "--out", str(out)]) == 0  # what the logs give, written again: the same bytes
    capsys.readouterr()
    assert _report(out) == report
    assert "nothing to do, no file changed" in _one_line(_resume(out, cache, capsys).out)
    return report


def _stale(path):
    """summary.json as a report written at --stop-after 9 says (brn at step 8, its run unfinished)."""
    agg = json.loads(path.read_text())
    agg["arms"]["brn"].update(final_step=8, complete_runs=0)
    path.write_text(json.dumps(agg, indent=2) + "\n")


DAMAGE = {
    "torn summary.json": (lambda out: _truncate(out / "summary.json"), "summary.json does not parse"),
    "empty summary.md": (lambda out: (out / "summary.md").write_bytes(b""), "summary.md is empty"),
    "deleted figures": (
        lambda out: [(out / n).unlink() for n in ("accuracy.png", "accuracy.svg")],
        "accuracy.png is missing",
    ),
    "stale summary.json": (
        lambda out: _stale(out / "summary.json"),
        "summary.json was written before every run of arm brn",
    ),
}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_report_is_not_complete_and_resume_rewrites_it(reference_out, tmp_path, cache, capsys, damage):
    """Before: --resume answered 'complete ... nothing to do, no file changed' and left the report damaged."""
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    original = _report(out)
    harm, why = DAMAGE[damage]
    harm(out)
    assert _resume_rewrites_the_report(out, cache, capsys, why) == original


_KILL_AFTER = """
import contextlib, os, signal, sys
from renorm_repro import report
from renorm_repro.cli import main

real, target = report.atomic_file, sys.argv[1]


@contextlib.contextmanager
def write_then_die(path):  # the file is written whole, then the process is killed (kill -9)
    with real(path) as f:
        yield f
    if os.path.basename(str(path)) == target:
        os.kill(os.getpid(), signal.SIGKILL)


report.atomic_file = write_then_die
sys.exit(main(sys.argv[2:]))
"""


def test_a_kill_during_the_report_then_resume_rewrites_it(reference_out, tmp_path, cache, capsys):
    """kill -9 while the report is written (the run's, then a resume's rewrite): --resume finishes the report."""
    out = tmp_path / "out"
    for target, args, present in (
        ("accuracy.svg", _args(out, cache), {"accuracy.png", "accuracy.svg"}),  # the run's report: figures only
        ("summary.md", _args(out, cache, "--resume"), {"accuracy.png", "accuracy.svg", "summary.md"}),
    ):
        res = subprocess.run([sys.executable, "-c", _KILL_AFTER, target, *args], capture_output=True, timeout=600)
        assert res.returncode == -signal.SIGKILL, res.stderr.decode()
        assert {n for n, b in _report(out).items() if b is not None} == present
        assert (_rdir(out) / "done.json").is_file()
    assert _rows(out) == _rows(reference_out)
    report = _resume_rewrites_the_report(out, cache, capsys, "summary.json is missing")
    for name in ("summary.md", "summary.json"):  # the report of an uninterrupted run
        assert report[name] == _report(reference_out)[name].replace(str(reference_out).encode(), str(out).encode())


def test_a_full_disk_while_the_figures_are_written_then_resume_writes_them(tmp_path, cache, capsys, monkeypatch):
    """Before: 'once fixed, continue with --resume', then --resume said 'complete' and the figures stayed missing."""
    import matplotlib.figure

    out = tmp_path / "out"
    real_savefig = matplotlib.figure.Figure.savefig

    def no_space(self, fname, *args, **kwargs):
        if kwargs.get("format") == "svg":
            raise OSError(28, "No space left on device", getattr(fname, "name", str(fname)))
        return real_savefig(self, fname, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    assert main(_args(out, cache)) == 1
    err = _one_line(capsys.readouterr().err)
    assert err == (
        f"renorm-repro: error: No space left on device: {out / 'accuracy.svg.tmp'}; once fixed, continue with --resume"
    )
    assert (_rdir(out) / "done.json").is_file()
    assert {n for n, b in _report(out).items() if b is not None} == {"accuracy.png"}  # no part file, no summary
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    _resume_rewrites_the_report(out, cache, capsys, "summary.json is missing")


def test_stop_after_before_the_first_evaluation_exits_0_and_resumes(tmp_path, cache, capsys, reference):
    """Before: exit 1, 'nothing to aggregate'. The runs are resumable: exit 0 with a line that says so."""
    out = tmp_path / "out"
    assert main(_args(out, cache, "--stop-after", "1")) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[-1] == (
        "stopped early (--stop-after 1) before the first evaluation: nothing logged yet, so no report; the runs "
        "continue with --resume"
    )
    assert {n for n, b in _report(out).items() if b is not None} == set()
    _resume(out, cache, capsys)
    assert _rows(out) == reference and report_problem(out, read_experiment_config(out)) is None
