"""Run directories and their logs (framework-free).

Layout of an experiment's output folder ``OUT``::

    OUT/config.json              the experiment's config and derived values
    OUT/versions.json            package versions, git revision, platform, CPU, thread settings
    OUT/runs/<arm>/seed<k>/      one directory per (arm, seed), never shared:
        config.json              the experiment config + this run's arm, seed, normalization
        versions.json
        metrics.csv              one row per evaluation (METRIC_COLUMNS, then the
                                 experiment's extra evaluations: metric_columns(cfg))
        checkpoints/             tf.train.CheckpointManager files
        tensorboard/             TensorBoard event files: the log's columns and each layer's clip
                                 diagnostics, at the log's steps (renorm_repro.tensorboard_log)
        done.json                written last; a run without it is incomplete
    OUT/accuracy.png, accuracy.svg, summary.md, summary.json   the report, from the logs only, written in
                                 this order, each whole; checked by report_problem
    OUT/.lock                    who runs the experiment now (pid, host, start); see ExperimentLock

What a crash (``kill -9``, power loss) can leave, and what resuming does about it:

- JSON files are written to a temporary file, flushed to disk and renamed: each
  is either the old or the new version, never a mix.
- ``metrics.csv`` grows by whole lines: each row is one ``write`` of a complete
  line, flushed to disk before the checkpoint of that step is saved. The only
  damage a crash can do is an unfinished last line; readers skip it, and a
  resume drops it (it lies after the last checkpoint) and rewrites the file by
  write-then-rename.
- On resume the log is reconciled with the checkpoint: rows after the
  checkpoint's step are dropped (training recomputes them identically); a row
  the checkpoint has passed but the log lacks is an error naming the steps,
  never a silent loss.
- The TensorBoard events are written with each row, after it and before the
  checkpoint; on resume the points after the checkpoint's step are dropped
  the same way (:meth:`renorm_repro.tensorboard_log.EventLog.start`).
- The report is complete only when :func:`report_problem` finds nothing (its
  ``summary.json`` parses and matches the config and the runs, ``summary.md``
  and the figures are there); otherwise a resume of complete runs rewrites it
  from the logs, touching no run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

from renorm_repro.config import config_from_dict, config_to_dict

__all__ = [
    "METRIC_COLUMNS",
    "EXTRA_METRIC_COLUMNS",
    "metric_columns",
    "precise_columns",
    "RunDirError",
    "Interrupted",
    "versions",
    "ExperimentLock",
    "check_experiment_dir",
    "write_experiment_record",
    "record_versions",
    "experiment_complete",
    "runs_complete",
    "report_problem",
    "REPORT_FILES",
    "atomic_file",
    "report_without_runs",
    "steps_extension_problem",
    "prepare_experiment_dir",
    "run_dir",
    "evaluation_steps",
    "MetricsLog",
    "read_metrics",
    "read_experiment_config",
]

METRIC_COLUMNS = (
    "step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "rmax",
    "dmax",
    "r_clipped",
    "d_clipped",
    "elapsed_s",
)

#: Number of normalization layers of the reproduction's convnet (the lag columns name each).
NORM_LAYERS = 4

#: Optional evaluations, written after METRIC_COLUMNS in this order when the config turns them on:
#: training accuracy in inference mode (``eval_train_examples > 0``); validation with batch
#: statistics on minibatches built like the training ones (``eval_batch_stats``); the test split
#: when a validation split is held out (``val_examples > 0``); the learning rate (a schedule other
#: than constant); how far each layer's moving statistics lag its input's (``eval_lag_examples > 0``); the
#: clipped fractions averaged over every step since the previous evaluation (``log_clip_means``); the
#: inference-mode evaluations again with precise BN's recomputed population statistics
#: (``precise_bn_batches > 0``: validation, then test and train_eval where those are logged).
EXTRA_METRIC_COLUMNS = {
    "train_eval": ("train_eval_loss", "train_eval_accuracy"),
    "batchstat": ("val_batchstat_loss", "val_batchstat_accuracy"),
    "test": ("test_loss", "test_accuracy"),
    "lr": ("learning_rate",),
    "lag": tuple(f"lag_{k}_norm{i}" for k in ("mean", "std") for i in range(1, NORM_LAYERS + 1)),
    "clip_mean": ("r_clipped_mean", "d_clipped_mean"),
    "precise": ("val_loss_precise", "val_accuracy_precise"),
    "precise_test": ("test_loss_precise", "test_accuracy_precise"),
    "precise_train_eval": ("train_eval_loss_precise", "train_eval_accuracy_precise"),
}


def metric_columns(cfg) -> tuple:
    """The columns of ``metrics.csv`` for ``cfg``: :data:`METRIC_COLUMNS` and the enabled extras."""
    cols = METRIC_COLUMNS
    if cfg.eval_train_examples > 0:
        cols += EXTRA_METRIC_COLUMNS["train_eval"]
    if cfg.eval_batch_stats:
        cols += EXTRA_METRIC_COLUMNS["batchstat"]
    if cfg.val_examples > 0:
        cols += EXTRA_METRIC_COLUMNS["test"]
    if cfg.lr_schedule != "constant":
        cols += EXTRA_METRIC_COLUMNS["lr"]
    if cfg.eval_lag_examples > 0:
        cols += EXTRA_METRIC_COLUMNS["lag"]
    if cfg.log_clip_means:
        cols += EXTRA_METRIC_COLUMNS["clip_mean"]
    return cols + precise_columns(cfg)


def precise_columns(cfg) -> tuple:
    """The precise-BN columns of ``cfg`` (none when ``precise_bn_batches`` is 0), in the log's order."""
    if not getattr(cfg, "precise_bn_batches", 0):
        return ()
    cols = EXTRA_METRIC_COLUMNS["precise"]
    if cfg.val_examples > 0:
        cols += EXTRA_METRIC_COLUMNS["precise_test"]
    if cfg.eval_train_examples > 0:
        cols += EXTRA_METRIC_COLUMNS["precise_train_eval"]
    return cols


def _is_known_layout(header) -> bool:
    """``METRIC_COLUMNS`` followed by whole groups of :data:`EXTRA_METRIC_COLUMNS`, in their order."""
    header = tuple(header or ())
    if header[: len(METRIC_COLUMNS)] != METRIC_COLUMNS:
        return False
    rest = header[len(METRIC_COLUMNS) :]
    for group in EXTRA_METRIC_COLUMNS.values():
        if rest[: len(group)] == group:
            rest = rest[len(group) :]
    return not rest


class RunDirError(RuntimeError):
    """An output folder that would be overwritten, that does not match the config, or whose files are damaged."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: which run, at which step, and its last checkpoint.

    ``step`` None: the runs of several processes (:mod:`renorm_repro.parallel`), ``run`` naming each with its
    step and last checkpoint.
    """

    def __init__(self, run: str, step: int | None, checkpoint_step: int | None, signum: int | None = None):
        super().__init__(f"{run} interrupted at step {step}" if step is not None else f"interrupted: {run}")
        self.run, self.step, self.checkpoint_step, self.signum = run, step, checkpoint_step, signum


def _git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    pkgs = {}
    for name in ("renorm", "numpy", "tensorflow", "keras", "scikit-learn", "matplotlib", "tqdm"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    return {
        "packages": pkgs,
        "git_revision": _git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        # The thread pools change the arithmetic (reductions split differently): the same seed with 1 and 2
        # intra-op threads differs from the first evaluation on. Unset: TensorFlow's default, all cores.
        "threads": {k: os.environ.get(k) for k in THREAD_VARIABLES},
        "cpu_count": os.cpu_count(),
        "command": sys.argv,
    }


#: The environment variables that size the thread pools of a run (recorded in versions.json).
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def _cpu_model() -> str | None:
    """The processor's model name (Linux: /proc/cpuinfo), or platform.processor(), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


@contextlib.contextmanager
def atomic_file(path):
    """A binary file to write ``path`` through: a temporary file beside it, flushed to disk and renamed over
    ``path`` when the block ends without an exception, so that a crash (or a full disk) leaves either the old
    file or the new one, never a part; on an exception the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    with atomic_file(path) as f:
        f.write(data)


def _write_json(path: Path, obj) -> None:
    _write_atomic(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


#: The lock file of an experiment folder (see :class:`ExperimentLock`).
LOCK_NAME = ".lock"

#: Fields whose value names where the data is read from, not which data: a folder in which no run
#: has started training may be resumed with other values (the loaders check the data's checksums).
DATA_SOURCE_FIELDS = ("data_dir", "cache_dir")


class ExperimentLock:
    """An exclusive ``flock`` on ``OUT/.lock``, held while a process writes into ``OUT``.

    The file holds the holder's pid, host, start time and command, so a refusal
    names who holds it. The lock belongs to the open file: the OS releases it
    when the process ends, however it ends (``kill -9`` included), so a stale
    file never blocks. Leaving the file behind is harmless.
    """

    def __init__(self, out):
        self.path = Path(out) / LOCK_NAME
        self._fd = None

    def acquire(self) -> ExperimentLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
                os.close(fd)
                try:
                    h = json.loads(holder)
                    who = (
                        f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}: "
                        f"{' '.join(map(str, h.get('command') or []))}"
                    )
                except ValueError:
                    who = "a process that has not written its name yet"
                raise RunDirError(
                    f"--out {str(self.path.parent)!r} is in use by another run ({who}); wait for it "
                    f"to finish or stop it. Nothing was written."
                ) from None
        os.ftruncate(fd, 0)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": sys.argv,
        }
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def __enter__(self):
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc):
        self.release()


def _has_training(out: Path) -> bool:
    """Whether any run in ``out`` has started training (a file under ``runs/``: a log, a checkpoint)."""
    runs = out / "runs"
    return runs.is_dir() and any(p.is_file() for p in runs.rglob("*"))


def _config_diff(cfg_path: Path, cfg) -> dict[str, tuple]:
    try:
        old = json.loads(cfg_path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{cfg_path} is not a readable experiment config ({e!r}).") from None
    new = config_to_dict(cfg)
    # A field that did not exist when the folder was written, and is at its default now, is no
    # difference: the older code behaved as that default.
    defaults = config_to_dict(type(cfg)())
    return {
        k: (old.get(k), new.get(k))
        for k in set(old) | set(new)
        if old.get(k) != new.get(k) and not (k not in old and new.get(k) == defaults.get(k))
    }


def check_experiment_dir(out, cfg, *, resume: bool) -> str:
    """Whether ``cfg`` may run into ``out``, without writing anything.

    Returns ``"new"`` (no experiment there yet), ``"resume"`` (continue the
    experiment in ``out``: its ``config.json`` equals ``cfg``), ``"extend"``
    (``cfg`` differs only by more ``steps``, and :func:`steps_extension_problem`
    finds nothing against it) or ``"restart"``
    (``out`` holds an experiment none of whose runs started training, e.g. its
    data failed to load: it is started again, with ``cfg``). Raises
    :class:`RunDirError` otherwise: results would be overwritten, ``--resume``
    names a folder that does not exist or holds no experiment, or the configs
    differ.
    """
    out = Path(out)
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} is a file, not a folder.")
    if resume and not out.exists():
        raise RunDirError(
            f"--resume: --out {str(out)!r} does not exist, so there is nothing to resume; check the "
            f"path, or drop --resume to start a new experiment there."
        )
    if not cfg_path.exists():
        names = {p.name for p in out.iterdir()} if out.exists() else set()
        if any(n != LOCK_NAME and not n.endswith(".tmp") for n in names):
            raise RunDirError(
                f"--out {str(out)!r} exists and is not empty and holds no experiment (no config.json); "
                f"choose a new or empty folder."
            )
        if resume and LOCK_NAME not in names:
            raise RunDirError(
                f"--resume: --out {str(out)!r} holds no experiment (no config.json), so there is nothing "
                f"to resume; check the path, or drop --resume to start a new experiment there."
            )
        return "new"  # with --resume: a run stopped after taking the folder and before writing its config
    started = _has_training(out)
    if not resume:
        if not started:
            return "restart"
        raise RunDirError(
            f"--out {str(out)!r} already holds an experiment ({cfg_path}); pass --resume to continue it or "
            f"choose a new --out. Nothing was overwritten."
        )
    diff = _config_diff(cfg_path, cfg)
    if not started and set(diff) <= set(DATA_SOURCE_FIELDS):
        return "restart" if diff else "resume"
    if set(diff) == {"steps"}:
        old = config_from_dict(json.loads(cfg_path.read_text())["config"])
        why = steps_extension_problem(old, cfg)
        if why:
            raise RunDirError(
                f"--resume --steps {cfg.steps}: the experiment in {str(out)!r} ({old.steps} steps) "
                f"cannot continue exactly as if it had been started with {cfg.steps} steps: {why}. "
                f"Nothing was changed."
            )
        return "extend"
    if diff:
        hint = (
            " No run there has started training: drop --resume to start it again with this config."
            if not started
            else " Resume with the same preset and overrides, or choose a new --out."
        )
        raise RunDirError(
            f"--resume: the config differs from the one in {cfg_path}: "
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            + "."
            + hint
        )
    return "resume"


def record_versions(path) -> None:
    """Record this invocation in ``path`` (a ``versions.json``): provenance is appended, never overwritten.

    The first invocation's record is the file's top level (the packages, git
    revision, platform and command that started the folder); each later one
    (a ``--resume`` that trains) is appended to its ``later_invocations`` list,
    with the time. A file that cannot be read as such a record is kept beside
    it (``versions.json.damaged``) and a new one started.
    """
    path = Path(path)
    now = dict(versions(), recorded=time.strftime("%Y-%m-%d %H:%M:%S %z"))
    record = None
    if path.exists():
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("later_invocations", []), list):
                raise ValueError("not a versions record")
        except (OSError, ValueError, UnicodeDecodeError):
            path.replace(path.with_name(path.name + ".damaged"))
            record = None
    if record is None:
        record = now
    else:
        record["later_invocations"] = list(record.get("later_invocations", [])) + [now]
    _write_json(path, record)


def write_experiment_record(out, cfg, mode: str) -> Path:
    """Create ``out`` and write its ``config.json`` (unless ``mode == "resume"``); record this invocation in
    ``versions.json`` (:func:`record_versions`). ``mode == "extend"`` rewrites ``config.json`` with the new
    ``steps`` (:func:`steps_extension_problem` said it may)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if mode != "resume":
        _write_json(out / "config.json", {"config": config_to_dict(cfg), "derived": cfg.derived()})
    if mode in ("new", "restart"):
        path = out / "versions.json"
        if path.exists():
            path.unlink()  # a folder none of whose runs trained: its provenance starts with this invocation
    record_versions(out / "versions.json")
    return out


#: The files of an experiment's report (:func:`renorm_repro.report.write_report`), in the order they are written:
#: ``summary.json`` last, so that a report cut short leaves no ``summary.json`` that matches the runs.
REPORT_FILES = ("accuracy.png", "accuracy.svg", "summary.md", "summary.json")


def experiment_complete(out, cfg) -> bool:
    """Whether every (arm, seed) of ``cfg`` in ``out`` is complete at ``cfg.steps`` and the report is a valid report
    of them (:func:`report_problem`)."""
    return runs_complete(out, cfg) and report_problem(out, cfg) is None


def report_problem(out, cfg) -> str | None:
    """Why the report in ``out`` is not the report of ``cfg``'s complete runs, in a few words; None when it is.

    It is when ``summary.json`` parses and lists the config's arms, each with the config's seeds, every one
    of them complete at ``cfg.steps`` (none left out as unfinished), ``summary.md`` is not empty and the
    figures exist and are not empty. A report written before the last run finished (``--stop-after``, a kill
    between the runs and the report), cut short by a kill or a full disk, truncated or deleted is not.
    """
    out = Path(out)
    try:
        agg = json.loads((out / "summary.json").read_bytes())
    except FileNotFoundError:
        return "summary.json is missing"
    except (OSError, ValueError) as e:
        return f"summary.json does not parse ({type(e).__name__})"
    if not isinstance(agg, dict) or not isinstance(agg.get("arms"), dict):
        return "summary.json holds no arms"
    if agg.get("steps") != cfg.steps:
        return f"summary.json is of a {agg.get('steps')}-step experiment, the config has {cfg.steps} steps"
    if sorted(agg["arms"]) != sorted(cfg.arms):
        return f"summary.json lists the arms {', '.join(sorted(agg['arms']))}, the config {', '.join(sorted(cfg.arms))}"
    for arm, a in agg["arms"].items():
        seeds = a.get("seeds") if isinstance(a, dict) else None
        if seeds != sorted(cfg.seeds):
            return f"summary.json lists the seeds {seeds} for arm {arm}, the config {sorted(cfg.seeds)}"
        if (
            a.get("complete_runs") != len(seeds)
            or a.get("unfinished_runs_left_out")
            or a.get("final_step") != cfg.steps
        ):
            return f"summary.json was written before every run of arm {arm} was complete"
    for name in REPORT_FILES[:-1]:
        try:
            if (out / name).stat().st_size == 0:
                return f"{name} is empty"
        except OSError:
            return f"{name} is missing"
    return None


def runs_complete(out, cfg) -> bool:
    """Whether every (arm, seed) of ``cfg`` in ``out`` is complete at ``cfg.steps`` (its ``done.json`` says so)."""
    out = Path(out)
    for arm in cfg.arms:
        for seed in cfg.seeds:
            try:
                done = json.loads((run_dir(out, arm, seed) / "done.json").read_text())
            except (OSError, ValueError):
                return False
            if not isinstance(done, dict) or done.get("final_step") != cfg.steps:
                return False
    return True


def report_without_runs(out) -> bool:
    """A committed report of a finished experiment whose runs are not there (``results/iid``: no ``runs/``)."""
    out = Path(out)
    return (out / "summary.json").is_file() and not _has_training(out)


def steps_extension_problem(old, new) -> str | None:
    """Why ``old`` (a config) cannot be continued to ``new.steps`` as if it had been started with them; None if
    it can.

    ``new`` must equal ``old`` but for ``steps``, and be longer. Every training step ``t < old.steps`` must
    have had the same clipping limits (every arm) and learning rate under ``new``, and the old last step
    must be an evaluation step of the longer run (its row is kept).
    """
    if new.steps <= old.steps:
        return f"--steps {new.steps} does not extend the run (it has {old.steps} steps)"
    if old.steps % old.eval_every:
        return (
            f"its last row (step {old.steps}) is not an evaluation step of a {new.steps}-step run "
            f"(eval_every={old.eval_every}), which would have no row there"
        )
    for t in range(old.steps):
        a, b = old.learning_rate_at(t), new.learning_rate_at(t)
        if a != b:
            return (
                f"the learning rate depends on steps (lr_schedule={old.lr_schedule}): at step {t + 1} it was "
                f"{a:.6g}, a {new.steps}-step run would have used {b:.6g}"
            )
    import numpy as np

    steps = np.arange(old.steps, dtype=np.float64)
    for arm in old.arms:
        sa, sb = old.arm_spec(arm)["schedule"], new.arm_spec(arm)["schedule"]
        if sa == sb:
            continue
        (ra, da), (rb, db) = sa.limits(steps), sb.limits(steps)
        differ = np.flatnonzero((np.broadcast_to(ra, steps.shape) != rb) | (np.broadcast_to(da, steps.shape) != db))
        if differ.size:
            t = int(differ[0])
            how = (
                " (schedule_base=paper_scaled scales the breakpoints to steps; start runs you may extend "
                "with --warmup-steps, --rmax-steps and --dmax-steps given)"
                if old.schedule_base == "paper_scaled"
                else ""
            )
            return (
                f"the clipping schedule of arm {arm} depends on steps{how}: at step {t + 1} its limits "
                f"(rmax, dmax) were {tuple(float(v) for v in sa.limits(float(t)))}, a {new.steps}-step run "
                f"would have used {tuple(float(v) for v in sb.limits(float(t)))}"
            )
    return None


def prepare_experiment_dir(out, cfg, *, resume: bool) -> Path:
    """Create ``out`` for ``cfg``; refuse to overwrite another experiment's results.

    :func:`check_experiment_dir`, then :func:`write_experiment_record`. Without
    ``resume`` the folder must not hold results yet. With ``resume`` its
    ``config.json`` must equal ``cfg`` (a resumed run with a different config
    would mix two experiments). :func:`renorm_repro.cli.run_experiment` loads
    the data between the two steps, under an :class:`ExperimentLock`.
    """
    mode = check_experiment_dir(out, cfg, resume=resume)
    return write_experiment_record(out, cfg, mode)


def run_dir(out, arm: str, seed: int) -> Path:
    return Path(out) / "runs" / arm / f"seed{seed}"


def read_experiment_config(out):
    path = Path(out) / "config.json"
    if not path.is_file():
        raise RunDirError(f"--out {str(out)!r} holds no config.json: not an experiment folder.")
    return config_from_dict(json.loads(path.read_text())["config"])


def evaluation_steps(cfg, upto: int) -> list[int]:
    """The steps ``<= upto`` that have a row in ``metrics.csv``: every ``eval_every``-th, and the last."""
    return [t for t in range(1, min(upto, cfg.steps) + 1) if t % cfg.eval_every == 0 or t == cfg.steps]


def _csv_line(values: Sequence[str]) -> str:
    """One CSV line as the ``csv`` module writes it (``\\r\\n``-terminated, like every older log)."""
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
    return buf.getvalue()


def _parse_line(line: str):
    return next(csv.reader([line]), [])


def _parse_row(columns, fields) -> dict[str, float]:
    if len(fields) != len(columns):
        raise ValueError(f"{len(fields)} fields, expected {len(columns)}")
    row = {k: float(v) for k, v in zip(columns, fields)}
    if not row["step"].is_integer():
        raise ValueError(f"step {row['step']!r} is not an integer")
    row["step"] = int(row["step"])
    return row


class _Log:
    """A parsed ``metrics.csv``: the header, the complete rows (parsed and raw), the unfinished last line if any."""

    def __init__(self, path, lenient: bool = False):
        """``lenient``: stop at the first damaged row (its line number in :attr:`damaged_line`) instead of raising."""
        self.path = Path(path)
        self.damaged_line = None
        text = self.path.read_bytes().decode("utf-8", "replace")
        lines = text.split("\n")
        #: What follows the last newline: an unfinished write (a crash), or "" in a whole file.
        self.tail = lines.pop()
        if self.tail.endswith("\r"):  # only the newline is missing: the line itself is whole
            lines.append(self.tail[:-1])
            self.tail = ""
        numbered = [(i + 1, ln[:-1] if ln.endswith("\r") else ln) for i, ln in enumerate(lines)]
        numbered = [(i, ln) for i, ln in numbered if ln.strip()]
        if not numbered:
            raise RunDirError(
                f"{self.path} has no header line (the file is empty or was cut); expected the columns "
                f"{list(METRIC_COLUMNS)} followed by any of {list(EXTRA_METRIC_COLUMNS.values())}."
            )
        self.columns = tuple(_parse_line(numbered[0][1]))
        if not _is_known_layout(self.columns):
            raise RunDirError(
                f"{self.path} has columns {list(self.columns)}, expected {list(METRIC_COLUMNS)} "
                f"followed by any of {list(EXTRA_METRIC_COLUMNS.values())}."
            )
        self.rows, self.raw = [], []
        for number, line in numbered[1:]:
            try:
                row = _parse_row(self.columns, _parse_line(line))
            except ValueError as e:
                if lenient:
                    self.damaged_line = number
                    break
                raise RunDirError(f"{self.path} line {number} is damaged ({e}): {line[:80]!r}.") from None
            self.rows.append(row)
            self.raw.append(line)


class MetricsLog:
    """``metrics.csv`` of one run: one whole line per evaluation; on resume, reconciled with the checkpoint.

    :meth:`append` writes each row with a single ``write`` of the complete
    line and flushes it to disk (``fsync``; once per evaluation, never per
    step), so a crash can at most leave an unfinished last line.
    :meth:`start` rewrites the file by write-then-rename.
    """

    def __init__(self, path, columns=METRIC_COLUMNS):
        self.path = Path(path)
        self.columns = tuple(columns)

    def damaged_bound(self, cfg):
        """``(bound, line)`` when a row of the log is damaged (not only an unfinished last line), else None.

        ``bound``: the last step a checkpoint may have for the rows before the
        damaged line to be exactly its rows (:func:`evaluation_steps`); a
        resume falls back to the newest intact checkpoint at or before it and
        drops the rest of the log, as it does for a damaged checkpoint.
        """
        if not self.path.exists():
            return None
        try:
            _Log(self.path)
            return None
        except RunDirError:
            log = _Log(self.path, lenient=True)  # a damaged header still raises: nothing to fall back to
        if log.damaged_line is None:  # pragma: no cover - _Log raised for a row, so lenient stops at one
            return None
        expected = evaluation_steps(cfg, cfg.steps)
        steps = [r["step"] for r in log.rows]
        k = 0
        while k < len(steps) and k < len(expected) and steps[k] == expected[k]:
            k += 1
        return (expected[k] - 1 if k < len(expected) else cfg.steps), log.damaged_line

    def start(self, resume_step: int = 0, expected_steps: Sequence[int] | None = None, lenient: bool = False) -> int:
        """Start the log, or continue it from a checkpoint at ``resume_step``; returns the rows kept.

        ``expected_steps``: the steps ``<= resume_step`` that have a row
        (:func:`evaluation_steps`); the kept rows must be exactly these, else
        :class:`RunDirError` names the steps the log lacks. Rows after
        ``resume_step`` and an unfinished last line are dropped; with
        ``lenient`` (after :meth:`damaged_bound`) so is everything from the
        first damaged row on.
        """
        header = _csv_line(self.columns)
        if resume_step == 0:
            _write_atomic(self.path, header.encode())
            return 0
        expected = list(expected_steps) if expected_steps is not None else None
        if not self.path.exists():
            if expected:
                raise RunDirError(
                    f"{self.path} is missing, but the checkpoint at step {resume_step} has passed the "
                    f"evaluations of steps {_steps_text(expected)}: their rows are lost. Restore the "
                    f"file, or delete {self.path.parent} to train this run again."
                )
            _write_atomic(self.path, header.encode())
            return 0
        log = _Log(self.path, lenient=lenient)
        if log.columns != self.columns:
            raise RunDirError(
                f"{self.path} has columns {list(log.columns)}, but this config logs "
                f"{list(self.columns)}: it belongs to another experiment."
            )
        kept = [(r, raw) for r, raw in zip(log.rows, log.raw) if r["step"] <= resume_step]
        steps = [r["step"] for r, _ in kept]
        if expected is not None and steps != expected:
            missing = sorted(set(expected) - set(steps))
            extra = sorted(set(steps) - set(expected))
            what = []
            if missing:
                what.append(
                    f"lacks the rows of steps {_steps_text(missing)}, which the checkpoint at step "
                    f"{resume_step} has passed (the log was cut or damaged)"
                )
            if extra:
                what.append(f"has rows at steps {_steps_text(extra)}, which are not evaluation steps")
            if not what:
                what.append("has its rows out of order or twice")
            raise RunDirError(
                f"{self.path} {' and '.join(what)}. Restore the file, or delete {self.path.parent} "
                f"to train this run again. Nothing was changed."
            )
        _write_atomic(self.path, (header + "".join(raw + "\r\n" for _, raw in kept)).encode())
        return len(kept)

    def append(self, row: dict[str, float]) -> None:
        missing = set(self.columns) - set(row)
        if missing:
            raise ValueError(f"metrics row is missing {sorted(missing)}")
        data = _csv_line([_fmt(row[k]) for k in self.columns]).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            while data:  # one write for a line of this size; the loop only guards against a short write
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def _steps_text(steps: Sequence[int]) -> str:
    steps = list(steps)
    return (
        ", ".join(map(str, steps))
        if len(steps) <= 6
        else f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-2:]))} ({len(steps)} rows)"
    )


def _fmt(v):
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def read_metrics(path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv``, step as ``int``.

    An unfinished last line (no newline: a crash during its write, possibly cut
    inside a number) is left out; a damaged line elsewhere is a :class:`RunDirError`.
    """
    return _Log(path).rows


def is_finite_row(row) -> bool:
    return all(math.isfinite(v) for v in row.values())
