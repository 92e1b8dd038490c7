"""The runs of one experiment in several processes (``renorm-repro run --jobs N``).

Each run (an arm and a seed) is independent of the others and writes only its own folder, so runs can train
side by side. :func:`train_parallel` starts ``jobs`` worker processes (``spawn``: each imports TensorFlow
afresh) that take runs from one queue, seeds outermost as the single-process loop does, and train each with
:func:`renorm_repro.train.train_run` and one :class:`renorm_repro.train.RunCache` a worker. A run's numbers do
not depend on the process that trains it: TensorFlow's thread pools are sized from the same settings in every
worker (``threads``), and ``tests/test_repro_parallel.py`` compares the folders with a single-process run's.

The parent process holds the experiment's lock, shows one progress bar over every run's steps, and owns the
signals:

- Ctrl-C (the terminal sends it to every process of the group; the workers ignore it) or SIGTERM to the
  parent: the parent sends SIGTERM to each worker, which stops between two steps as a single-process run
  does; the command then prints one line naming each run it stopped, its step and its last checkpoint.
  A second signal kills the workers at once (a run resumes from its last checkpoint either way).
- A worker that raises: the others are stopped the same way and the worker's exception is raised in the
  parent (the command's usual one line for a disk, data or folder error).
- A worker that dies (killed, out of memory): :class:`WorkerDied`, after the others are stopped.
- A parent that dies (``kill -9``): each worker notices within a second and exits, so no orphan keeps
  writing into a folder whose lock is gone.

Output: the workers send their runs' evaluation lines to the parent, which prints them whole (above its bar on
a terminal); the parent's own lines (the summary, the finding) come after every worker has exited, so the
finding stays the last line.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback

from renorm_repro import interrupts as _interrupts

__all__ = ["WorkerDied", "WorkerFailed", "train_parallel", "auto_jobs"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Worker processes need POSIX signals (masks, SIGTERM between steps, SIGKILL): elsewhere runs train one at a time.
SUPPORTED = os.name == "posix" and hasattr(signal, "pthread_sigmask")

#: How often (seconds) the parent looks at its workers and its signals, and a worker at its parent.
POLL_S = 0.2


class WorkerDied(RuntimeError):
    """A worker process ended without reporting (killed, out of memory, a crash)."""


class WorkerFailed(RuntimeError):
    """A worker raised an exception that cannot be sent back as itself; holds its traceback."""


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: Device files of a GPU TensorFlow would use (NVIDIA, AMD ROCm).
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd")


def gpu_visible() -> bool:
    """Whether TensorFlow would see a GPU, told without importing it: a GPU's device file exists and
    ``CUDA_VISIBLE_DEVICES`` does not hide every device."""
    import glob

    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)


def auto_jobs(cfg, runs: int) -> int:
    """``--jobs auto``: one process a CPU when each run is pinned to one thread's worth of CPUs
    (``cfg.threads`` > 0), trains on the CPU and on the default strategy; else 1 (TensorFlow's default pools
    already use every core; a GPU would be shared by every process, each starting its own context on it; a
    distribution strategy owns its devices; and worker processes need :data:`SUPPORTED` signals)."""
    if not SUPPORTED or cfg.threads <= 0 or cfg.strategy != "default" or gpu_visible():
        return 1
    return max(1, min(runs, cpu_count() // cfg.threads))


def _watch_parent(parent: int) -> None:
    """End this worker within :data:`POLL_S` seconds once its parent is gone (it held the folder's lock)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="renorm-parent-watch", daemon=True).start()


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling as itself, else a :class:`WorkerFailed` with its traceback."""
    try:
        back = pickle.loads(pickle.dumps(e))
        if type(back) is type(e) and str(back) == str(e):
            return e
    except Exception:  # noqa: BLE001 - any exception that does not pickle
        pass
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return WorkerFailed(f"{type(e).__name__}: {e}\n\nThe worker's traceback:\n{text}")


def _worker(index: int, parent: int, cfg, out: str, dataset, conn, options: dict, quiet_tf: bool) -> None:
    """One worker: train the runs the parent sends over ``conn`` (None: no more), reporting each step of the way
    on it; see the module docstring."""
    _watch_parent(parent)
    _interrupts.install()  # SIGTERM (from the parent) is taken between two steps
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C goes to the parent, which forwards it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # blocked by the parent from before this process began
    try:
        nowhere = os.open(os.devnull, os.O_WRONLY)
        with _interrupts.exit_now("", fd=nowhere):  # stopped while importing: nothing written, the parent speaks
            if quiet_tf:
                from renorm_repro.cli import _quiet_tensorflow

                _quiet_tensorflow(signal_fd=nowhere)
            from renorm_repro.runs import run_dir
            from renorm_repro.train import RunCache, train_run
        from tqdm.auto import tqdm

        # tqdm's default lock holds a semaphore registered with the parent's resource tracker, which warns of it
        # when a worker is killed; a worker draws no bar, so a thread lock does.
        tqdm.set_lock(threading.RLock())
        cache = RunCache()

        def log(line: str) -> None:
            conn.send(("log", None, line))  # the parent prints it (above its progress bar)

        while True:
            task = conn.recv()
            if task is None:
                return
            seed, arm = task
            conn.send(("start", task, None))
            last = [0.0]

            def progress(step: int, task=task, last=last) -> None:
                now = time.monotonic()
                if now - last[0] >= POLL_S:
                    last[0] = now
                    conn.send(("steps", task, step))

            res = train_run(
                cfg, arm, seed, run_dir(out, arm, seed), dataset, cache=cache, log=log, progress=progress, **options
            )
            conn.send(("done", task, (res["final_step"], bool(res.get("stopped")))))
    except KeyboardInterrupt as e:
        from renorm_repro.runs import Interrupted

        if isinstance(e, Interrupted):
            conn.send(("interrupted", None, (e.run, e.step, e.checkpoint_step)))
        else:
            conn.send(("interrupted", None, None))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send(("error", None, _portable(e)))


class _Workers:
    """The parent's view of its workers: their pipes, what each trains, and stopping them (SIGTERM once,
    SIGKILL on a second signal)."""

    def __init__(self, procs, conns):
        self.procs, self.conns = procs, conns
        self.open = set(range(len(procs)))  # whose pipe has not reached its end
        self.running: dict[int, tuple] = {}
        self.termed = False

    def term(self) -> None:
        if not self.termed:
            self.termed = True
            for p in self.procs:
                if p.is_alive():
                    try:
                        os.kill(p.pid, signal.SIGTERM)
                    except ProcessLookupError:  # it exited since is_alive()
                        pass

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()

    def send(self, i: int, task) -> None:
        try:
            self.conns[i].send(task)
        except OSError:  # it exited already: its end of the pipe says so
            pass

    def died(self, i: int) -> WorkerDied | None:
        """Worker ``i``'s pipe ended: None if it exited as asked, else what killed it."""
        p = self.procs[i]
        p.join(timeout=5)
        if p.exitcode == 0 or self.termed:
            return None
        what = f" while training {self.running[i][1]} seed{self.running[i][0]}" if i in self.running else ""
        how = f"signal {-p.exitcode}" if (p.exitcode or 0) < 0 else f"exit status {p.exitcode}"
        return WorkerDied(f"a worker process (pid {p.pid}) ended with {how}{what}")


def train_parallel(
    cfg, out, dataset, runs, jobs: int, *, resume, stop_after, progress, tensorboard, log, log_interval, quiet_tf
) -> bool:
    """Train ``runs`` (``(seed, arm)`` pairs, in this order) of ``cfg`` into ``out`` in ``jobs`` processes.

    Returns ``True`` if any run stopped early (``stop_after``). Raises
    :class:`renorm_repro.runs.Interrupted` (naming every run it stopped) on a signal, a worker's exception
    as itself (or :class:`WorkerFailed`), or :class:`WorkerDied`; in each case only once every worker has
    exited, so nothing writes into ``out`` afterwards. The runs' lines reach ``log`` (or the bar, above it)
    through the parent, one whole line at a time.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    from tqdm.auto import tqdm

    ctx = multiprocessing.get_context("spawn")
    # Workers sharing a GPU (an explicit --jobs there): each takes memory as it needs it, not all of it at start.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    todo = [tuple(r) for r in runs]
    jobs = min(jobs, len(todo))
    options = dict(resume=resume, stop_after=stop_after, tensorboard=tensorboard, log_interval=log_interval)
    pipes = [ctx.Pipe() for _ in range(jobs)]
    procs = [
        ctx.Process(
            target=_worker,
            args=(i, os.getpid(), cfg, str(out), dataset, pipes[i][1], options, quiet_tf),
            name=f"renorm-worker-{i}",
            daemon=True,
        )
        for i in range(jobs)
    ]
    workers = _Workers(procs, [parent_end for parent_end, _ in pipes])
    steps = dict.fromkeys(todo, 0)
    queue = list(reversed(todo))  # popped from the end: seeds outermost
    stopped_any, interrupted, failure, died = False, [], None, None
    bar = tqdm(total=len(todo) * cfg.steps, desc=f"{len(todo)} runs, {jobs} processes", disable=not progress)

    def next_task(i: int) -> None:
        workers.send(i, queue.pop() if queue and not workers.termed else None)

    def handle(i: int, kind: str, task, value) -> None:
        nonlocal stopped_any, failure
        if kind == "start":
            workers.running[i] = task
        elif kind == "steps":
            steps[task] = value
        elif kind == "done":
            workers.running.pop(i, None)
            steps[task] = value[0] if value[1] else cfg.steps
            stopped_any |= value[1]
            next_task(i)
        elif kind == "log":
            bar.write(value) if progress else log(value)
        elif kind == "interrupted" and value is not None:
            interrupted.append(value)
        elif kind == "error":
            failure = failure or value
            workers.term()
        bar.update(sum(steps.values()) - bar.n)

    try:
        with _interrupts.deferred():
            # A worker starts with SIGINT and SIGTERM blocked (the mask survives exec) until its handlers are in
            # place; here they are held for the few milliseconds of the start and delivered after it.
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            try:
                for p in procs:
                    p.start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            for _, child_end in pipes:
                child_end.close()  # the parent keeps its end only, so a worker's exit ends its pipe
            for i in range(jobs):
                next_task(i)
            while workers.open:
                if _interrupts.pending() is not None:
                    workers.term()
                ready = wait([workers.conns[i] for i in workers.open], timeout=POLL_S)
                for conn in ready:
                    i = workers.conns.index(conn)
                    try:
                        handle(i, *conn.recv())
                    except (EOFError, OSError):
                        workers.open.discard(i)
                        why = workers.died(i)
                        if why is not None and died is None and failure is None:
                            died = why
                            workers.term()
    except KeyboardInterrupt:  # a second signal while stopping (or none handled: called from Python)
        workers.kill()
        raise
    finally:
        bar.close()
        for p in procs:
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join()
        for conn in workers.conns:
            conn.close()
    if failure is not None:
        raise failure
    if died is not None:
        raise died
    if _interrupts.pending() is not None:
        from renorm_repro.runs import Interrupted

        signum = _interrupts.pending()
        if not interrupted:
            raise _interrupts.Stop(signum)
        words = [
            f"{run} at step {step} ("
            + (f"last checkpoint at step {ckpt}" if ckpt is not None else "no checkpoint yet")
            + ")"
            for run, step, ckpt in interrupted
        ]
        raise Interrupted("; ".join(words), None, None, signum)
    return stopped_any


def run_list(cfg) -> list[tuple[int, str]]:
    """Every ``(seed, arm)`` run of ``cfg``, seeds outermost (the single-process order)."""
    return [(seed, arm) for seed in cfg.seeds for arm in cfg.arms]
