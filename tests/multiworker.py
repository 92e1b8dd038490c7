"""Start N worker processes on 127.0.0.1, wait for them within a deadline, and clean up.

Two halves:

- :func:`run_workers` (called by the tests) runs ``python tests/multiworker.py``
  as one process group, inside a fresh network namespace when ``unshare --net``
  is allowed (then only the loopback interface exists, so even a server that
  listens on every interface, as TensorFlow's gRPC server does, is reachable
  from this machine only), and kills the whole group on timeout.
- ``python tests/multiworker.py`` (this file run as a script) picks free ports
  on 127.0.0.1, starts the workers in its own process group with the cluster in
  their environment, waits for them, kills the rest as soon as one fails, and
  prints one JSON line: every worker's exit code and output.

Every worker gets ``MW_INDEX`` (0 .. N-1), ``MW_COUNT``, ``MW_PORTS`` (one free
port per worker, comma-separated), ``TF_CONFIG`` (a cluster of N workers on
``127.0.0.1`` and this worker's task) and ``JAX_COORDINATOR_ADDRESS``
(``127.0.0.1:`` the first port).

Faults (``faults=``): signals the launcher sends to a worker, one after the
other, each as soon as its condition holds: a text in a worker's output
(``"after_output": [j, text]``) or a file that exists (``"after_file": path``).
A ``SIGSTOP`` freezes a worker where it is (between two lines of its log, say),
so that the next fault can find the others' files in a known state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def free_ports(n: int) -> list:
    """``n`` distinct ports that were free on 127.0.0.1 (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_env(index: int, ports: list) -> dict:
    """The environment that tells worker ``index`` about the cluster on ``ports``."""
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    return {
        "MW_INDEX": str(index),
        "MW_COUNT": str(len(ports)),
        "MW_PORTS": ",".join(map(str, ports)),
        "TF_CONFIG": json.dumps(tf_config),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{ports[0]}",
    }


def _netns_prefix() -> list:
    """``unshare --net`` with the loopback interface up, when this machine allows it; else nothing."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return []
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def run_workers(argv_of, n: int = 2, *, timeout: float = 180, grace: float = 10, env=None, faults=None) -> list:
    """Run ``n`` workers; ``argv_of(i)`` is worker ``i``'s command line after ``python``.

    Returns ``[(returncode, output), ...]`` (stdout and stderr together). The
    whole group is killed when it outlives ``timeout`` (an ``AssertionError``
    with what the workers printed) and, as soon as one worker fails, the others
    ``grace`` seconds later. ``faults``: ``[{"worker": i, "signal": "SIGKILL",
    "after_output": [j, text]} or {..., "after_file": path}, ...]``, sent in
    order (see the module docstring); with faults the result is
    ``(results, fired)``, ``fired`` holding ``[fault index, seconds since the
    start]`` of each fault that was sent.
    """
    full_env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]),
        CUDA_VISIBLE_DEVICES="",
        **(env or {}),
    )
    spec = json.dumps(
        {
            "argvs": [list(argv_of(i)) for i in range(n)],
            "timeout": timeout,
            "grace": grace,
            "faults": list(faults or []),
        }
    )
    cmd = _netns_prefix() + [sys.executable, str(Path(__file__).resolve()), spec]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout + grace + 30)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(
            f"the workers' launcher outlived {timeout} s and was killed:\n{out[-3000:]}\n{err[-3000:]}"
        ) from None
    finally:
        _kill_group(proc.pid)  # nothing of the group survives a test
    lines = [ln for ln in out.splitlines() if ln.startswith('{"workers"')]
    assert proc.returncode == 0 and lines, f"launcher failed (exit {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
    report = json.loads(lines[-1])
    results = [(w["returncode"], w["output"]) for w in report["workers"]]
    return (results, report["fired"]) if faults else results


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _launch(spec: dict) -> dict:
    """The script half: start the workers in this process group, wait, kill the rest on failure or timeout."""
    argvs, timeout, grace, faults = spec["argvs"], spec["timeout"], spec["grace"], spec.get("faults", [])
    ports = free_ports(len(argvs))
    logs = tempfile.mkdtemp(prefix="renorm-mw-")
    procs, files = [], []
    try:
        for i, argv in enumerate(argvs):
            f = open(os.path.join(logs, f"worker{i}.log"), "w+")
            files.append(f)
            procs.append(
                subprocess.Popen(
                    [sys.executable] + argv,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, **cluster_env(i, ports)),
                )
            )
        t0 = time.monotonic()
        deadline = t0 + timeout
        failed_at = None
        fired = []
        while any(p.poll() is None for p in procs):
            while len(fired) < len(faults) and _fault_due(faults[len(fired)], logs):
                fault = faults[len(fired)]
                if procs[fault["worker"]].poll() is None:
                    procs[fault["worker"]].send_signal(getattr(signal, fault["signal"]))
                fired.append([len(fired), round(time.monotonic() - t0, 3)])
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs) and len(fired) == len(faults):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.05 if len(fired) < len(faults) else 0.2)
        for p in procs:
            p.wait()
        result = []
        for p, f in zip(procs, files):
            f.seek(0)
            result.append({"returncode": p.returncode, "output": f.read()})
        return {"workers": result, "timed_out": time.monotonic() > deadline, "fired": fired}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()
        shutil.rmtree(logs, ignore_errors=True)


def _fault_due(fault: dict, logs: str) -> bool:
    """Whether ``fault``'s condition holds: its text in a worker's output so far, or its file exists."""
    if "after_file" in fault:
        return os.path.exists(fault["after_file"])
    worker, text = fault["after_output"]
    with open(os.path.join(logs, f"worker{worker}.log"), errors="replace") as f:
        return text in f.read()


if __name__ == "__main__":
    print(json.dumps(_launch(json.loads(sys.argv[1]))), flush=True)
