"""Run directories and their logs (framework-free).

Layout of an experiment's output folder ``OUT``::

    OUT/config.json              the experiment's config and derived values
    OUT/versions.json            package versions, git revision, platform
    OUT/runs/<arm>/seed<k>/      one directory per (arm, seed), never shared:
        config.json              the experiment config + this run's arm, seed, normalization
        versions.json
        metrics.csv              one row per evaluation (METRIC_COLUMNS, then the
                                 experiment's extra evaluations: metric_columns(cfg))
        checkpoints/             tf.train.CheckpointManager files
        done.json                written last; a run without it is incomplete
    OUT/summary.md, summary.json, accuracy.png, accuracy.svg   (from the logs only)
"""

from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List

from renorm_repro.config import config_from_dict, config_to_dict

__all__ = [
    "METRIC_COLUMNS",
    "EXTRA_METRIC_COLUMNS",
    "metric_columns",
    "RunDirError",
    "versions",
    "prepare_experiment_dir",
    "run_dir",
    "MetricsLog",
    "read_metrics",
    "read_experiment_config",
]

METRIC_COLUMNS = (
    "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "rmax", "dmax", "r_clipped", "d_clipped", "elapsed_s",
)

#: Number of normalization layers of the reproduction's convnet (the lag columns name each).
NORM_LAYERS = 4

#: Optional evaluations, written after METRIC_COLUMNS in this order when the config turns them on:
#: training accuracy in inference mode (``eval_train_examples > 0``); validation with batch
#: statistics on minibatches built like the training ones (``eval_batch_stats``); the test split
#: when a validation split is held out (``val_examples > 0``); the learning rate (a schedule other
#: than constant); how far each layer's moving statistics lag its input's (``eval_lag_examples > 0``).
EXTRA_METRIC_COLUMNS = {
    "train_eval": ("train_eval_loss", "train_eval_accuracy"),
    "batchstat": ("val_batchstat_loss", "val_batchstat_accuracy"),
    "test": ("test_loss", "test_accuracy"),
    "lr": ("learning_rate",),
    "lag": tuple(f"lag_{k}_norm{i}" for k in ("mean", "std") for i in range(1, NORM_LAYERS + 1)),
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
    return cols


def _is_known_layout(header) -> bool:
    """``METRIC_COLUMNS`` followed by whole groups of :data:`EXTRA_METRIC_COLUMNS`, in their order."""
    header = tuple(header or ())
    if header[: len(METRIC_COLUMNS)] != METRIC_COLUMNS:
        return False
    rest = header[len(METRIC_COLUMNS):]
    for group in EXTRA_METRIC_COLUMNS.values():
        if rest[: len(group)] == group:
            rest = rest[len(group):]
    return not rest


class RunDirError(RuntimeError):
    """An output folder that would be overwritten, or that does not match the config."""


def _git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
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
        "command": sys.argv,
    }


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def prepare_experiment_dir(out, cfg, *, resume: bool) -> Path:
    """Create ``out`` for ``cfg``; refuse to overwrite another experiment's results.

    Without ``resume`` the folder must not hold results yet. With ``resume``
    its ``config.json`` must equal ``cfg`` (a resumed run with a different
    config would mix two experiments).
    """
    out = Path(out)
    cfg_path = out / "config.json"
    record = {"config": config_to_dict(cfg), "derived": cfg.derived()}
    if cfg_path.exists():
        if not resume:
            raise RunDirError(
                f"--out {str(out)!r} already holds an experiment ({cfg_path}); pass --resume to continue it or "
                f"choose a new --out. Nothing was overwritten."
            )
        old = json.loads(cfg_path.read_text())["config"]
        new = record["config"]
        # A field that did not exist when the folder was written, and is at its default now, is no
        # difference: the older code behaved as that default.
        defaults = config_to_dict(type(cfg)())
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)
                and not (k not in old and new.get(k) == defaults.get(k))}
        if diff:
            raise RunDirError(
                f"--resume: the config differs from the one in {cfg_path}: "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
                + ". Resume with the same preset and overrides, or choose a new --out."
            )
    else:
        if out.exists() and any(out.iterdir()):
            raise RunDirError(f"--out {str(out)!r} exists and is not empty; choose a new or empty folder.")
        out.mkdir(parents=True, exist_ok=True)
        _write_json(cfg_path, record)
    _write_json(out / "versions.json", versions())
    return out


def run_dir(out, arm: str, seed: int) -> Path:
    return Path(out) / "runs" / arm / f"seed{seed}"


def read_experiment_config(out):
    path = Path(out) / "config.json"
    if not path.is_file():
        raise RunDirError(f"--out {str(out)!r} holds no config.json: not an experiment folder.")
    return config_from_dict(json.loads(path.read_text())["config"])


class MetricsLog:
    """``metrics.csv`` of one run: append a row per evaluation; on resume drop rows after the checkpoint."""

    def __init__(self, path, columns=METRIC_COLUMNS):
        self.path = Path(path)
        self.columns = tuple(columns)

    def start(self, resume_step: int = 0) -> None:
        if resume_step == 0 or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
            return
        rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(r[k]) for k in self.columns})

    def append(self, row: Dict[str, float]) -> None:
        missing = set(self.columns) - set(row)
        if missing:
            raise ValueError(f"metrics row is missing {sorted(missing)}")
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow({k: _fmt(row[k]) for k in self.columns})


def _fmt(v):
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def read_metrics(path) -> List[Dict[str, float]]:
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not _is_known_layout(reader.fieldnames):
            raise RunDirError(f"{path} has columns {reader.fieldnames}, expected {list(METRIC_COLUMNS)} "
                              f"followed by any of {list(EXTRA_METRIC_COLUMNS.values())}.")
        rows = []
        for r in reader:
            row = {k: float(v) for k, v in r.items()}
            row["step"] = int(row["step"])
            rows.append(row)
    return rows


def is_finite_row(row) -> bool:
    return all(math.isfinite(v) for v in row.values())
