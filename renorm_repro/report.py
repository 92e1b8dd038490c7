"""Aggregation across seeds, the figure and the summary table: they read only the logs.

:func:`aggregate` reads ``OUT/config.json`` and every ``OUT/runs/<arm>/seed<k>/metrics.csv``
and returns, per arm, the mean and standard deviation over seeds of the
validation accuracy at each evaluated step, the final and best accuracy
(mean, std), and the steps to reach ``threshold`` (mean over the seeds that
reached it, and how many did). The same statistics are kept for the other
accuracies a run logs (:data:`CURVES`): the running training accuracy (training
mode), and where the experiment asks for them the training accuracy in inference
mode and the validation accuracy with batch statistics. :func:`write_report`
writes ``summary.md``, ``summary.json``, ``accuracy.png`` and ``accuracy.svg``
(with a second panel, training accuracy in inference mode, when it was logged).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from renorm_repro.runs import RunDirError, read_experiment_config, read_metrics, run_dir

__all__ = ["aggregate", "write_summary", "plot", "write_report"]

# Colours of the paper's Figure 2 style: baseline dark, BN on micro-batches red, renorm blue.
ARM_STYLE = {
    "bn_32": dict(color="black", linestyle="-"),
    "bn_micro": dict(color="tab:red", linestyle="--"),
    "brn_micro": dict(color="tab:blue", linestyle="-"),
    "bn": dict(color="tab:red", linestyle="--"),
    "brn": dict(color="tab:blue", linestyle="-"),
    "bn_split": dict(color="tab:orange", linestyle="-."),
    "bn_iid": dict(color="black", linestyle="-"),
}

#: Accuracies aggregated per arm when the runs logged them: column -> description.
CURVES = {
    "val_accuracy": "validation accuracy, inference mode",
    "train_accuracy": "training accuracy, training mode (running mean since the previous evaluation)",
    "train_eval_accuracy": "training accuracy, inference mode",
    "val_batchstat_accuracy": "validation accuracy with batch statistics on test minibatches built like the "
                              "training ones",
}

#: Arms whose batch-statistics evaluation is drawn as its own curve (the paper's Figure 3 does it for batch norm).
BATCHSTAT_CURVE_ARMS = ("bn",)


def _std(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def aggregate(out) -> dict:
    """Per-arm statistics over seeds, from the logs in ``out`` only."""
    out = Path(out)
    cfg = read_experiment_config(out)
    arms = {}
    for arm in cfg.arms:
        runs = {}
        for seed in cfg.seeds:
            path = run_dir(out, arm, seed) / "metrics.csv"
            if path.is_file():
                rows = read_metrics(path)
                if rows:
                    runs[seed] = rows
        if not runs:
            continue
        # Steps evaluated by every run of the arm (unfinished runs shorten the curve).
        common = sorted(set.intersection(*[{r["step"] for r in rows} for rows in runs.values()]))
        acc = np.array([[next(r["val_accuracy"] for r in rows if r["step"] == s) for s in common]
                        for rows in runs.values()])
        finals = [rows[-1]["val_accuracy"] for rows in runs.values()]
        bests = [max(r["val_accuracy"] for r in rows) for rows in runs.values()]
        reached = [next((r["step"] for r in rows if r["val_accuracy"] >= cfg.threshold), None)
                   for rows in runs.values()]
        hit = [s for s in reached if s is not None]
        complete = [(run_dir(out, arm, s) / "done.json").is_file() for s in runs]
        curves = {}
        for col in CURVES:
            if not all(col in rows[0] for rows in runs.values()):
                continue
            vals = np.array([[next(r[col] for r in rows if r["step"] == s) for s in common]
                             for rows in runs.values()])
            last = [rows[-1][col] for rows in runs.values()]
            curves[col] = {
                "mean": vals.mean(axis=0).tolist(),
                "std": (vals.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(common))).tolist(),
                "final_mean": float(np.mean(last)),
                "final_std": _std(last),
            }
        arms[arm] = {
            "label": cfg.arm_label(arm),
            "seeds": sorted(runs),
            "complete_runs": int(sum(complete)),
            "steps": common,
            "val_accuracy_mean": acc.mean(axis=0).tolist(),
            "val_accuracy_std": (acc.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(common))).tolist(),
            "final_step": int(max(rows[-1]["step"] for rows in runs.values())),
            "final_accuracy_mean": float(np.mean(finals)),
            "final_accuracy_std": _std(finals),
            "best_accuracy_mean": float(np.mean(bests)),
            "best_accuracy_std": _std(bests),
            "threshold": cfg.threshold,
            "steps_to_threshold_mean": float(np.mean(hit)) if hit else None,
            "steps_to_threshold_std": _std(hit) if hit else None,
            "runs_reaching_threshold": len(hit),
            "curves": curves,
        }
    if not arms:
        raise RunDirError(f"No metrics.csv found under {out / 'runs'}: nothing to aggregate.")
    return {"experiment": cfg.experiment, "dataset": cfg.dataset, "steps": cfg.steps,
            "batch_size": cfg.batch_size, "title": cfg.title(), "curves": CURVES, "arms": arms}


def _has(agg, col) -> bool:
    return any(col in a["curves"] for a in agg["arms"].values())


def _pm(mean, std, scale=100.0, digits=2):
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def write_summary(agg: dict, out) -> str:
    out = Path(out)
    th = next(iter(agg["arms"].values()))["threshold"]
    extra = [c for c in ("train_eval_accuracy", "train_accuracy", "val_batchstat_accuracy") if _has(agg, c)]
    if extra == ["train_accuracy"]:
        extra = []  # the running training accuracy alone stays in summary.json
    heads = {"train_eval_accuracy": "final train acc., inference mode (%)",
             "train_accuracy": "final train acc., training mode (%)",
             "val_batchstat_accuracy": "final val. acc., batch statistics (%)"}
    lines = [
        f"# {agg['experiment']}: {agg['dataset']}, {agg['title']}, {agg['steps']} steps",
        "",
        f"| arm | runs | final accuracy (%) | best accuracy (%) | steps to {th * 100:.0f}% |"
        + "".join(f" {heads[c]} |" for c in extra),
        "| --- | --- | --- | --- | --- |" + " --- |" * len(extra),
    ]
    for arm, a in agg["arms"].items():
        n = len(a["seeds"])
        if a["steps_to_threshold_mean"] is None:
            reach = f"not reached (0/{n})"
        else:
            reach = f"{a['steps_to_threshold_mean']:.0f} ± {a['steps_to_threshold_std']:.0f} " \
                    f"({a['runs_reaching_threshold']}/{n})"
        lines.append(f"| {a['label']} | {n} | {_pm(a['final_accuracy_mean'], a['final_accuracy_std'])} | "
                     f"{_pm(a['best_accuracy_mean'], a['best_accuracy_std'])} | {reach} |"
                     + "".join(f" {_pm(a['curves'][c]['final_mean'], a['curves'][c]['final_std'])} |"
                               if c in a["curves"] else " – |" for c in extra))
    lines += ["", "Mean ± standard deviation over seeds. Final, best accuracy and steps to the threshold: "
                  "validation set, inference mode (moving statistics)."]
    if "train_eval_accuracy" in extra:
        lines.append("Train acc., inference mode: a fixed subset of the training set, moving statistics. "
                     "Train acc., training mode: the running accuracy of the training minibatches since the "
                     "previous evaluation (batch statistics).")
    if "val_batchstat_accuracy" in extra:
        lines.append("Val. acc., batch statistics: the layers in training mode (no moving statistic used or "
                     "changed) on test minibatches built like the training ones.")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(agg, indent=2) + "\n")
    return text


def _draw(ax, steps, mean, std, n, label, style, band=True):
    ax.plot(steps, mean, label=label, linewidth=1.6, **style)
    if band and n > 1:
        ax.fill_between(steps, mean - std, mean + std, color=style.get("color"), alpha=0.15, linewidth=0)


def _label(text, mean, std, n):
    label = f"{text}: {mean * 100:.1f}%"
    return label + (f" ± {std * 100:.1f}" if n > 1 else "")


def plot(agg: dict, out) -> List[Path]:
    """Validation accuracy (%) against training steps, mean ± std band, final accuracy in the legend.

    When the runs logged them, the batch-statistics evaluation of :data:`BATCHSTAT_CURVE_ARMS`
    is drawn as its own (dotted) curve, and a second panel shows the training accuracy
    in inference mode.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = _has(agg, "train_eval_accuracy")
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(12, 4.8) if two else (6.4, 4.6), dpi=150, squeeze=False)
    axes = axes[0]
    n_seeds = max(len(a["seeds"]) for a in agg["arms"].values())
    for arm, a in agg["arms"].items():
        steps = np.asarray(a["steps"])
        n = len(a["seeds"])
        style = ARM_STYLE.get(arm, {})
        _draw(axes[0], steps, np.asarray(a["val_accuracy_mean"]) * 100, np.asarray(a["val_accuracy_std"]) * 100,
              n, _label(a["label"], a["final_accuracy_mean"], a["final_accuracy_std"], n), style)
        bs = a["curves"].get("val_batchstat_accuracy")
        if bs and arm in BATCHSTAT_CURVE_ARMS:
            bstyle = dict(style, linestyle=":")
            _draw(axes[0], steps, np.asarray(bs["mean"]) * 100, np.asarray(bs["std"]) * 100, n,
                  _label(a["label"] + ", inference with batch stats", bs["final_mean"], bs["final_std"], n), bstyle)
        if two and "train_eval_accuracy" in a["curves"]:
            te = a["curves"]["train_eval_accuracy"]
            _draw(axes[1], steps, np.asarray(te["mean"]) * 100, np.asarray(te["std"]) * 100, n,
                  _label(a["label"], te["final_mean"], te["final_std"], n), style)
    seeds_note = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed"
    axes[0].set_ylabel("Validation accuracy (%)")
    axes[0].set_title(f"{agg['dataset']}: {agg['title']}\nvalidation, inference mode ({seeds_note})", fontsize=10)
    if two:
        axes[1].set_ylabel("Training accuracy (%)")
        axes[1].set_title("training set, inference mode (moving statistics)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("Training steps")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.85)
    fig.tight_layout()
    paths = [Path(out) / "accuracy.png", Path(out) / "accuracy.svg"]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def write_report(out) -> Dict[str, object]:
    agg = aggregate(out)
    text = write_summary(agg, out)
    figs = plot(agg, out)
    return {"summary": text, "figures": figs, "aggregate": agg}
