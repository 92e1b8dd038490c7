"""Aggregation across seeds, the figure and the summary table: they read only the logs.

:func:`aggregate` reads ``OUT/config.json`` and every ``OUT/runs/<arm>/seed<k>/metrics.csv``
and returns, per arm, the mean and standard deviation over seeds of the
validation accuracy at each evaluated step, the final and best accuracy
(mean, std), and the steps to reach ``threshold`` (mean over the seeds that
reached it, and how many did). :func:`write_report` writes ``summary.md``,
``summary.json``, ``accuracy.png`` and ``accuracy.svg``.
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
}


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
        }
    if not arms:
        raise RunDirError(f"No metrics.csv found under {out / 'runs'}: nothing to aggregate.")
    return {"experiment": cfg.experiment, "dataset": cfg.dataset, "steps": cfg.steps,
            "batch_size": cfg.batch_size, "microbatch_size": cfg.microbatch_size, "arms": arms}


def _pm(mean, std, scale=100.0, digits=2):
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def write_summary(agg: dict, out) -> str:
    out = Path(out)
    th = next(iter(agg["arms"].values()))["threshold"]
    lines = [
        f"# {agg['experiment']}: {agg['dataset']}, minibatch {agg['batch_size']}, "
        f"micro-batch {agg['microbatch_size']}, {agg['steps']} steps",
        "",
        f"| arm | runs | final accuracy (%) | best accuracy (%) | steps to {th * 100:.0f}% |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm, a in agg["arms"].items():
        n = len(a["seeds"])
        if a["steps_to_threshold_mean"] is None:
            reach = f"not reached (0/{n})"
        else:
            reach = f"{a['steps_to_threshold_mean']:.0f} ± {a['steps_to_threshold_std']:.0f} " \
                    f"({a['runs_reaching_threshold']}/{n})"
        lines.append(f"| {a['label']} | {n} | {_pm(a['final_accuracy_mean'], a['final_accuracy_std'])} | "
                     f"{_pm(a['best_accuracy_mean'], a['best_accuracy_std'])} | {reach} |")
    lines += ["", "Mean ± standard deviation over seeds (validation set, inference mode)."]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(agg, indent=2) + "\n")
    return text


def plot(agg: dict, out) -> List[Path]:
    """Validation accuracy (%) against training steps, mean ± std band, final accuracy in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=150)
    for arm, a in agg["arms"].items():
        steps = np.asarray(a["steps"])
        mean = np.asarray(a["val_accuracy_mean"]) * 100
        std = np.asarray(a["val_accuracy_std"]) * 100
        style = ARM_STYLE.get(arm, {})
        label = f"{a['label']}: {a['final_accuracy_mean'] * 100:.1f}%"
        if len(a["seeds"]) > 1:
            label += f" ± {a['final_accuracy_std'] * 100:.1f} ({len(a['seeds'])} seeds)"
        ax.plot(steps, mean, label=label, linewidth=1.6, **style)
        if len(a["seeds"]) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=style.get("color"), alpha=0.15, linewidth=0)
    ax.set_xlabel("Training steps")
    ax.set_ylabel("Validation accuracy (%)")
    ax.set_title(f"{agg['dataset']}: minibatch {agg['batch_size']}, micro-batches of {agg['microbatch_size']}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
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
