"""SIGINT and SIGTERM sent to a real ``renorm-repro run --preset smoke`` at many points (issue 22, item 1).

Every signal, whenever it comes (while Python and TensorFlow import, while the
data loads, while a run trains, checkpoints or evaluates), ends the command
with one line on stderr and exit 130 (SIGINT) or 143 (SIGTERM): never a silent
completion (exit 0), never a crash (139), never a traceback. Signals go only to
the processes these tests start, by pid.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("renorm.tf")

REPRO = [sys.executable, "-m", "renorm_repro.cli"]


def _start(out, *extra, env=None, stderr=subprocess.PIPE):
    args = [*REPRO, "run", "--preset", "smoke", "--out", str(out), *extra]
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ.update(env or {})
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE if stderr == subprocess.PIPE else stderr,
        stderr=stderr,
        env=environ,
        start_new_session=True,
    )


def _rows(out):
    try:
        return (Path(out) / "runs" / "bn_micro" / "seed0" / "metrics.csv").read_bytes().count(b"\n") - 1
    except OSError:
        return -1


def _wait(proc, cond, timeout=240):
    t0 = time.monotonic()
    while proc.poll() is None:
        if cond(time.monotonic() - t0):
            return True
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("the run reached neither the signal point nor its end")
        time.sleep(0.002)
    return False


def _signal_at(tmp_path, name, cond, signum, env=None):
    """Start a run, send ``signum`` when ``cond(seconds since start)`` holds; (sent, rc, stdout, stderr)."""
    out = tmp_path / f"out-{name}"
    proc = _start(out, "--no-progress", env=env)
    try:
        sent = _wait(proc, lambda t: cond(t, out))
        if sent:
            os.kill(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
    return sent, proc.returncode, stdout.decode(), stderr.decode()


def _check(name, sent, rc, stdout, stderr, signum):
    assert sent, f"{name}: the run ended before the signal point (rc {rc})"
    code = 128 + signum
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == code, f"{name}: rc {rc}, expected {code}; stderr: {stderr[-2000:]}"
    assert len(lines) == 1, f"{name}: stderr is not one line: {stderr[-2000:]}"
    word = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    assert lines[0].startswith(f"renorm-repro: {word}"), f"{name}: {lines[0]}"
    assert "--resume" in lines[0] or "run the command again" in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr


def _at(seconds):
    return lambda t, out: t >= seconds


POINTS = [
    # The import phase: Python's own imports, then TensorFlow's (several seconds here), no file written yet.
    ("import 0.4 s", _at(0.4), signal.SIGINT),
    ("import 2.5 s", _at(2.5), signal.SIGINT),
    ("training, first row (SIGTERM)", lambda t, out: _rows(out) >= 1, signal.SIGTERM),
]

MORE_POINTS = [  # SIGINT during training is also test_on_a_terminal_the_bar_is_drawn_and_no_message_shares_its_line
    ("training, first row", lambda t, out: _rows(out) >= 1, signal.SIGINT),
    ("import 0.15 s", _at(0.15), signal.SIGINT),
    ("import 1.0 s", _at(1.0), signal.SIGINT),
    ("import 4.0 s", _at(4.0), signal.SIGINT),
    ("import 5.5 s", _at(5.5), signal.SIGINT),
    ("import 1.5 s (SIGTERM)", _at(1.5), signal.SIGTERM),
    ("config written", lambda t, out: (out / "config.json").exists(), signal.SIGINT),
    ("first checkpoint", lambda t, out: any((out / "runs").rglob("ckpt-*")), signal.SIGINT),
    ("second row", lambda t, out: _rows(out) >= 2, signal.SIGINT),
    ("second arm", lambda t, out: (out / "runs" / "brn_micro" / "seed0").exists(), signal.SIGINT),
    ("second arm (SIGTERM)", lambda t, out: (out / "runs" / "brn_micro" / "seed0").exists(), signal.SIGTERM),
]


@pytest.mark.parametrize("name, cond, signum", POINTS, ids=[p[0] for p in POINTS])
def test_a_signal_at_any_point_is_one_line_and_130_or_143(tmp_path, name, cond, signum):
    _check(name, *_signal_at(tmp_path, name.replace(" ", "_"), cond, signum), signum)


@pytest.mark.slow
@pytest.mark.parametrize("name, cond, signum", MORE_POINTS, ids=[p[0] for p in MORE_POINTS])
def test_a_signal_at_more_points_is_one_line_and_130_or_143(tmp_path, name, cond, signum):
    _check(name, *_signal_at(tmp_path, name.replace(" ", "_"), cond, signum), signum)


@pytest.mark.slow
def test_sigint_during_the_import_phase_many_times(tmp_path):
    """20 SIGINTs spread over the first 7 s (imports and start-up): each one honoured."""
    for i in range(20):
        t = 0.2 + 0.35 * i
        name = f"import {t:.2f} s"
        sent, rc, out, err = _signal_at(tmp_path, f"many{i}", _at(t), signal.SIGINT)
        if not sent:
            continue
        _check(name, sent, rc, out, err, signal.SIGINT)


@pytest.mark.parametrize(
    "extra, steps",
    [([], 12), (["--jobs", "2", "--steps", "400"], 400)],
    ids=["one-process", "jobs2"],
)
def test_on_a_terminal_the_bar_is_drawn_and_no_message_shares_its_line(tmp_path, extra, steps):
    """stdout and stderr on a pseudo-terminal: a progress bar; log lines and the interrupt message each start on
    a line of their own (the bar's line is cleared first); a SIGINT during training is still one line, 130.
    With ``--jobs 2`` the parent draws the bar and prints the workers' lines (renorm_repro/parallel.py)."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm draws nothing at 0 columns
    out = tmp_path / "out-tty"
    proc = _start(out, "--log-interval", "0", *extra, stderr=slave)
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sent = _wait(proc, lambda t: _rows(out) >= 2)
        if sent:
            os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert sent and proc.returncode == 130, text[-3000:]
    assert "it/s" in text or "s/it" in text, text[-3000:]  # the bar was drawn
    for marker in ("renorm-repro: interrupted", f"[bn_micro seed0] step 4/{steps}"):
        line = next(ln for ln in text.split("\n") if marker in ln)
        before = line[: line.index(marker)].rsplit("\r", 1)[-1]
        assert before.strip() == "", repr(line)  # nothing of the bar before it on its (visible) line
        assert "it/s" not in line[line.index(marker) :] and "%|" not in line[line.index(marker) :], repr(line)


@pytest.mark.slow
def test_a_signal_after_an_interrupt_resumes_to_the_same_end(tmp_path):
    """A run stopped by SIGINT during training continues with --resume and completes."""
    out = tmp_path / "out-resume"
    sent, rc, _, err = _signal_at(tmp_path, "resume", lambda t, o: _rows(o) >= 2, signal.SIGINT)
    out = tmp_path / "out-resume"
    assert sent and rc == 130, err
    res = subprocess.run(
        [*REPRO, "run", "--preset", "smoke", "--out", str(out), "--no-progress", "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert all((out / "runs" / arm / "seed0" / "done.json").is_file() for arm in ("bn_micro", "brn_micro", "bn_32"))
