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
(with a second panel, training accuracy in inference mode, when it was logged, and a
third, the lag of the moving statistics, when it was logged).

Over seeds, every complete run (``done.json``) gives one value per scalar of
:data:`SCALARS` (the final accuracy, the mean of the last :data:`LAST_N`
evaluations, the worst accuracy of the second half of training, the lag of the
moving statistics); each arm gets the mean with a 95% t interval, and each
pair of the experiment's :meth:`comparisons` the paired per-seed difference
with its interval (:mod:`renorm_repro.stats`). Accuracies on the held-out
splits: ``val_accuracy`` (the validation split when the config carves one, on
which every choice is made; else the test split) and ``test_accuracy``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from renorm_repro.runs import NORM_LAYERS, RunDirError, atomic_file, read_experiment_config, read_metrics, run_dir
from renorm_repro.stats import mean_ci, paired_difference

__all__ = ["NothingToAggregate", "aggregate", "write_summary", "plot", "write_report"]


class NothingToAggregate(RunDirError):
    """No run of the folder has logged an evaluation yet (e.g. ``--stop-after`` before the first one)."""


# Colours of the paper's Figure 2 style: baseline dark, BN on micro-batches red, renorm blue.
ARM_STYLE = {
    "bn_32": dict(color="black", linestyle="-"),
    "bn_micro": dict(color="tab:red", linestyle="--"),
    "brn_micro": dict(color="tab:blue", linestyle="-"),
    "bn": dict(color="tab:red", linestyle="--"),
    "brn": dict(color="tab:blue", linestyle="-"),
    "bn_split": dict(color="tab:orange", linestyle="-."),
    "bn_iid": dict(color="black", linestyle="-"),
    "keras_brn": dict(color="tab:green", linestyle=":"),
    "gn": dict(color="tab:purple", linestyle=(0, (5, 1, 1, 1))),
}

#: Evaluations averaged by the ``last`` scalars.
LAST_N = 4


def _second_half(rows):
    last = rows[-1]["step"]
    return [r for r in rows if r["step"] > last / 2] or rows[-1:]


def _lag(rows):
    """Per row, the lag of the moving means averaged over the layers (None when the run did not log it)."""
    if "lag_mean_norm1" not in rows[0]:
        return None
    return [float(np.mean([r[f"lag_mean_norm{i}"] for i in range(1, NORM_LAYERS + 1)])) for r in rows]


def _scalar_table():
    table = {}
    for col, name in (
        ("test_accuracy", "test"),
        ("val_accuracy", "val"),
        ("test_accuracy_precise", "test_precise"),  # logged with --precise-bn-batches only
        ("val_accuracy_precise", "val_precise"),
    ):
        table[f"{name}_final"] = (f"{col}, last evaluation", col, False, lambda v: v[-1])
        table[f"{name}_last{LAST_N}"] = (
            f"{col}, mean of the last {LAST_N} evaluations",
            col,
            False,
            lambda v: np.mean(v[-LAST_N:]),
        )
        table[f"{name}_worst_late"] = (f"{col}, worst evaluation of the second half of training", col, True, min)
    table["lag_late"] = (
        "moving-mean lag |moving mean - mean| / std (mean over features and layers), mean over "
        "the second half of training",
        "lag_mean",
        True,
        np.mean,
    )
    table["lag_max"] = ("moving-mean lag, largest evaluation", "lag_mean", False, max)
    for c in ("r", "d"):  # logged with --log-clip-means only
        table[f"{c}_clipped_mean_late"] = (
            f"fraction of {c} values the clip changed, averaged over every training "
            "step of the second half of training and over layers",
            f"{c}_clipped_mean",
            True,
            np.mean,
        )
    return table


#: Per-run scalars: name -> (description, column, second half of training only, reduction of the column's values).
#: A run that did not log the column has no value.
SCALARS = _scalar_table()


def _scalar(rows, column, late, reduce):
    if column not in rows[0]:
        return None
    values = [r[column] for r in (_second_half(rows) if late else rows)]
    if all(np.isnan(v) for v in values):  # a column the arm cannot fill (the gn arm's lag, clip fractions)
        return None
    return float(reduce(values))


#: Accuracies aggregated per arm when the runs logged them: column -> description.
CURVES = {
    "val_accuracy": "validation accuracy, inference mode",
    "test_accuracy": "test accuracy, inference mode (when a validation split is held out)",
    "lag_mean": "moving-mean lag |moving mean - mean| / std, mean over features and layers",
    "train_accuracy": "training accuracy, training mode (running mean since the previous evaluation)",
    "train_eval_accuracy": "training accuracy, inference mode",
    "val_batchstat_accuracy": "validation accuracy with batch statistics on test minibatches built like the "
    "training ones",
    "val_accuracy_precise": "validation accuracy, inference mode with precise BN's recomputed population statistics",
    "test_accuracy_precise": "test accuracy, inference mode with precise BN's recomputed population statistics",
}

#: Arms whose batch-statistics evaluation is drawn as its own curve (the paper's Figure 3 does it for batch norm).
BATCHSTAT_CURVE_ARMS = ("bn",)


def _std(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _arm_runs(out: Path, cfg, arm: str):
    """``(runs, done, unfinished)`` of ``arm``: ``{seed: metrics rows}`` (each row with its ``lag_mean``), the
    seeds whose run is complete, and the unfinished seeds left out.

    When some runs of the arm are complete, the unfinished ones (still training, or killed) are left out of
    every statistic; when none is, every run is kept (the curve then covers the steps every run has reached).
    """
    runs = {}
    for seed in cfg.seeds:
        path = run_dir(out, arm, seed) / "metrics.csv"
        if path.is_file():
            rows = read_metrics(path)
            if rows:
                lag = _lag(rows)
                for r, v in zip(rows, lag or ()):
                    r["lag_mean"] = v
                runs[seed] = rows
    done = {s for s in runs if (run_dir(out, arm, s) / "done.json").is_file()}
    unfinished = sorted(set(runs) - done) if done else []
    if done:
        runs = {s: rows for s, rows in runs.items() if s in done}
    return runs, done, unfinished


def _arm_curves(runs, common) -> dict:
    """Per column of :data:`CURVES` that every run logs: its mean and spread over seeds at the ``common`` steps."""
    curves = {}
    for col in CURVES:
        if not all(col in rows[0] for rows in runs.values()):
            continue
        vals = np.array([[next(r[col] for r in rows if r["step"] == s) for s in common] for rows in runs.values()])
        if vals.size and np.isnan(vals).all():  # a column the arm cannot fill (the gn arm's lag)
            continue
        last = [rows[-1][col] for rows in runs.values()]
        curves[col] = {
            "mean": vals.mean(axis=0).tolist(),
            "std": (vals.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(common))).tolist(),
            "final_mean": float(np.mean(last)),
            "final_std": _std(last),
        }
    return curves


def _arm_scalars(runs, done) -> dict:
    """Per scalar of :data:`SCALARS`: its value per complete seed, their mean and 95% interval."""
    scalars = {}
    for name, (desc, *spec) in SCALARS.items():
        per_seed = {seed: _scalar(rows, *spec) for seed, rows in runs.items() if seed in done}
        per_seed = {k: v for k, v in per_seed.items() if v is not None}
        if per_seed:
            scalars[name] = dict(mean_ci(list(per_seed.values())), per_seed=per_seed, description=desc)
    return scalars


def _arm_summary(cfg, arm: str, runs, done, unfinished) -> dict:
    """The statistics of one arm over its seeds (``runs``: :func:`_arm_runs`)."""
    # Steps evaluated by every run of the arm.
    common = sorted(set.intersection(*[{r["step"] for r in rows} for rows in runs.values()]))
    acc = np.array(
        [[next(r["val_accuracy"] for r in rows if r["step"] == s) for s in common] for rows in runs.values()]
    )
    finals = [rows[-1]["val_accuracy"] for rows in runs.values()]
    bests = [max(r["val_accuracy"] for r in rows) for rows in runs.values()]
    reached = [next((r["step"] for r in rows if r["val_accuracy"] >= cfg.threshold), None) for rows in runs.values()]
    hit = [s for s in reached if s is not None]
    return {
        "label": cfg.arm_label(arm),
        "scalars": _arm_scalars(runs, done),
        "seeds": sorted(runs),
        "complete_runs": len(done),
        "unfinished_runs_left_out": unfinished,
        "steps": common,
        "val_accuracy_mean": acc.mean(axis=0).tolist(),
        "val_accuracy_std": (acc.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(common))).tolist(),
        "final_step": int(max(rows[-1]["step"] for rows in runs.values())),
        "final_accuracy_mean": float(np.mean(finals)),
        "final_accuracy_std": _std(finals),
        "best_accuracy_mean": float(np.mean(bests)),
        "best_accuracy_std": _std(bests),
        "threshold": cfg.threshold,
        "steps_to_threshold_per_seed": {seed: step for seed, step in zip(runs, reached)},
        "steps_to_threshold_mean": float(np.mean(hit)) if hit else None,
        "steps_to_threshold_std": _std(hit) if hit else None,
        "runs_reaching_threshold": len(hit),
        "curves": _arm_curves(runs, common),
    }


def _paired_scalars(cfg, arms) -> list:
    """Per comparison of the config whose two arms ran, per scalar: the paired difference over shared seeds."""
    paired = []
    for a, b in cfg.comparisons():
        if a not in arms or b not in arms:
            continue
        for name in SCALARS:
            sa, sb = arms[a]["scalars"].get(name), arms[b]["scalars"].get(name)
            if sa and sb and set(sa["per_seed"]) & set(sb["per_seed"]):
                paired.append(dict(paired_difference(sa["per_seed"], sb["per_seed"]), a=a, b=b, scalar=name))
    return paired


def aggregate(out) -> dict:
    """Per-arm statistics over seeds, from the logs in ``out`` only."""
    out = Path(out)
    cfg = read_experiment_config(out)
    arms = {}
    for arm in cfg.arms:
        runs, done, unfinished = _arm_runs(out, cfg, arm)
        if runs:
            arms[arm] = _arm_summary(cfg, arm, runs, done, unfinished)
    if not arms:
        raise NothingToAggregate(f"No metrics.csv found under {out / 'runs'}: nothing to aggregate.")
    result = {
        "experiment": cfg.experiment,
        "dataset": cfg.dataset,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "title": cfg.title(),
        "curves": CURVES,
        "arms": arms,
        "paired": _paired_scalars(cfg, arms),
        "scalar_descriptions": {k: v[0] for k, v in SCALARS.items()},
        "comparisons": [list(c) for c in cfg.comparisons() if c[0] in arms and c[1] in arms],
    }
    result["finding"] = finding(result)
    return result


def _resolved(d) -> str:
    if d["n"] < 2:
        return "1 seed: no interval"
    return "a difference the seeds resolve" if d["lo"] > 0 or d["hi"] < 0 else "within noise"


def finding(agg) -> str:
    """One sentence: what the run measured for the paper's claim (the experiment's first comparison).

    Steps to the threshold (mean over the seeds, and the paired difference over the seeds where both arms
    reached it) and the final validation accuracy (paired difference, percentage points), each with its 95%
    t interval over seeds; accuracy intervals are clipped to what an accuracy can be ([0, 100] for a mean,
    [-100, 100] for a difference).
    """
    if not agg.get("comparisons"):
        return "Finding: no comparison (the experiment's paired arms were not both run)."
    a, b = agg["comparisons"][0]
    A, B = agg["arms"][a], agg["arms"][b]
    th = f"{A['threshold'] * 100:.0f}%"
    parts = []
    sa, sb = A.get("steps_to_threshold_per_seed", {}), B.get("steps_to_threshold_per_seed", {})
    both = [s for s in sa if s in sb and sa[s] is not None and sb[s] is not None]
    if both:
        d = paired_difference({s: sa[s] for s in both}, {s: sb[s] for s in both})
        interval = f" [{d['lo']:+.0f}, {d['hi']:+.0f}]" if d["n"] > 1 else ""
        parts.append(
            f"{B['label']} reached {th} in {np.mean([sb[s] for s in both]):.0f} steps vs "
            f"{np.mean([sa[s] for s in both]):.0f} for {A['label']} ({d['mean']:+.0f} steps{interval} "
            f"over the {len(both)} seeds where both did: {_resolved(d)})"
        )
    else:
        parts.append(
            f"{th} reached by {B['runs_reaching_threshold']}/{len(B['seeds'])} runs of {B['label']} and "
            f"{A['runs_reaching_threshold']}/{len(A['seeds'])} of {A['label']}"
        )
    p = next((p for p in agg.get("paired", []) if (p["a"], p["b"]) == (a, b) and p["scalar"] == "val_final"), None)
    if p is not None:
        fa, fb = A["scalars"]["val_final"]["mean"], B["scalars"]["val_final"]["mean"]
        parts.append(
            f"final accuracy {fb * 100:.2f}% vs {fa * 100:.2f}%, {_ci(p, 100.0, 2, (-1.0, 1.0))} pp "
            f"over {p['n']} seeds: {_resolved(p)}"
        )
    return "Finding (" + f"{B['label']} vs {A['label']}" + "): " + "; ".join(parts) + "."


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
    heads = {
        "train_eval_accuracy": "final train acc., inference mode (%)",
        "train_accuracy": "final train acc., training mode (%)",
        "val_batchstat_accuracy": "final val. acc., batch statistics (%)",
    }
    lines = [
        f"# {agg['experiment']}: {agg['dataset']}, {agg['title']}, {agg['steps']} steps",
        "",
        f"**{agg['finding']}** (Paired over seeds, 95% t intervals; accuracy intervals clipped to [0, 100].)",
        "",
        f"| arm | runs | final accuracy (%) | best accuracy (%) | steps to {th * 100:.0f}% |"
        + "".join(f" {heads[c]} |" for c in extra),
        "| --- | --- | --- | --- | --- |" + " --- |" * len(extra),
    ]
    for a in agg["arms"].values():
        n = len(a["seeds"])
        if a["steps_to_threshold_mean"] is None:
            reach = f"not reached (0/{n})"
        else:
            reach = (
                f"{a['steps_to_threshold_mean']:.0f} ± {a['steps_to_threshold_std']:.0f} "
                f"({a['runs_reaching_threshold']}/{n})"
            )
        lines.append(
            f"| {a['label']} | {n} | {_pm(a['final_accuracy_mean'], a['final_accuracy_std'])} | "
            f"{_pm(a['best_accuracy_mean'], a['best_accuracy_std'])} | {reach} |"
            + "".join(
                f" {_pm(a['curves'][c]['final_mean'], a['curves'][c]['final_std'])} |" if c in a["curves"] else " – |"
                for c in extra
            )
        )
    lines += [
        "",
        "Mean ± standard deviation over seeds. Final, best accuracy and steps to the threshold: "
        "validation set, inference mode (moving statistics).",
    ]
    if "train_eval_accuracy" in extra:
        lines.append(
            "Train acc., inference mode: a fixed subset of the training set, moving statistics. "
            "Train acc., training mode: the running accuracy of the training minibatches since the "
            "previous evaluation (batch statistics)."
        )
    if "val_batchstat_accuracy" in extra:
        lines.append(
            "Val. acc., batch statistics: the layers in training mode (no moving statistic used or "
            "changed) on test minibatches built like the training ones."
        )
    left = {
        a["label"]: a["unfinished_runs_left_out"] for a in agg["arms"].values() if a.get("unfinished_runs_left_out")
    }
    if left:
        lines.append(
            "Unfinished runs left out (their arm has complete runs): "
            + "; ".join(
                f"{label}: seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
                for label, seeds in left.items()
            )
            + "."
        )
    lines += _stats_section(agg)
    text = "\n".join(lines) + "\n"
    with atomic_file(out / "summary.md") as f:  # each file whole or not at all; summary.json last
        f.write(text.encode())
    with atomic_file(out / "summary.json") as f:
        f.write((json.dumps(agg, indent=2) + "\n").encode())
    return text


def _ci(d, scale=100.0, digits=2, bounds=None) -> str:
    """``mean [lo, hi]``; ``bounds`` (``(0, 1)`` for an accuracy, ``(-1, 1)`` for a difference of two): the t
    interval clipped to them, marked ``†`` where it was."""
    if d["n"] < 2:
        return f"{d['mean'] * scale:.{digits}f} (1 run)"
    lo, hi = d["lo"], d["hi"]
    mark = ""
    if bounds is not None and (lo < bounds[0] or hi > bounds[1]):
        lo, hi, mark = max(lo, bounds[0]), min(hi, bounds[1]), "†"
    return f"{d['mean'] * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]{mark}"


#: Scalars of the statistics tables, in this order, with their column heads and scales (x100: percent).
_TABLE = (
    ("test_last{n}", "test, mean of last {n} evals (%)", 100.0),
    ("test_final", "test, final (%)", 100.0),
    ("test_worst_late", "test, worst of 2nd half (%)", 100.0),
    ("val_last{n}", "val., mean of last {n} evals (%)", 100.0),
    ("val_worst_late", "val., worst of 2nd half (%)", 100.0),
    ("lag_late", "moving-mean lag, 2nd half (std)", 1.0),
    ("test_precise_last{n}", "test, precise BN, mean of last {n} evals (%)", 100.0),
    ("val_precise_last{n}", "val., precise BN, mean of last {n} evals (%)", 100.0),
)


def _stats_section(agg) -> list[str]:
    cols = [(k.format(n=LAST_N), h.format(n=LAST_N), sc) for k, h, sc in _TABLE]
    cols = [c for c in cols if any(c[0] in a["scalars"] for a in agg["arms"].values())]
    if not cols:
        return []
    acc = {k for k, _, sc in cols if sc == 100.0}
    lines = [
        "",
        "## Over seeds: mean [95% confidence interval]",
        "",
        "Two-sided 95% Student-t intervals over seeds; an accuracy's interval is clipped to [0, 100] and a "
        "difference of accuracies to [-100, 100] (marked †: the t interval, symmetric, went past them; "
        "summary.json keeps it unclipped).",
        "",
        "| arm | complete runs |" + "".join(f" {h} |" for _, h, _ in cols),
        "| --- | --- |" + " --- |" * len(cols),
    ]
    for a in agg["arms"].values():
        lines.append(
            f"| {a['label']} | {a['complete_runs']} |"
            + "".join(
                f" {_ci(a['scalars'][k], sc, 3 if sc == 1.0 else 2, (0.0, 1.0) if k in acc else None)} |"
                if k in a["scalars"]
                else " – |"
                for k, _, sc in cols
            )
        )
    if agg.get("paired"):
        lines += [
            "",
            "## Paired differences: b - a over the same seeds (same initial weights and data order), "
            "mean [95% CI], seeds where b > a",
            "",
            "| b - a |" + "".join(f" {h} |" for _, h, _ in cols),
            "| --- |" + " --- |" * len(cols),
        ]
        by_pair = {}
        for p in agg["paired"]:
            by_pair.setdefault((p["a"], p["b"]), {})[p["scalar"]] = p
        for (a, b), ps in by_pair.items():
            la, lb = agg["arms"][a]["label"], agg["arms"][b]["label"]
            cells = []
            for k, _, sc in cols:
                p = ps.get(k)
                cells.append(
                    f" {_ci(p, sc, 3 if sc == 1.0 else 2, (-1.0, 1.0) if k in acc else None)}, {p['wins']}/{p['n']} |"
                    if p
                    else " – |"
                )
            lines.append(f"| {lb} - {la} |" + "".join(cells))
        lines += [
            "",
            "Differences in percentage points (accuracies) or in standard deviations (lag). An interval "
            "that excludes 0 is a difference the seeds resolve; one that includes 0 is not.",
        ]
    shown = {k for k, _, _ in cols}
    lines += [
        "",
        "Scalars per complete run (the columns above): "
        + "; ".join(f"`{k}`: {d}" for k, d in agg.get("scalar_descriptions", {}).items() if k in shown)
        + ".",
    ]
    return lines


def _draw(ax, steps, mean, std, n, label, style, band=True, lo=0.0, hi=100.0):
    ax.plot(steps, mean, label=label, linewidth=1.6, **style)
    if band and n > 1:
        # The band is clipped to the possible range (an accuracy never leaves [0, 100]).
        ax.fill_between(
            steps,
            np.clip(mean - std, lo, hi),
            np.clip(mean + std, lo, hi),
            color=style.get("color"),
            alpha=0.15,
            linewidth=0,
        )


def _label(text, mean, std, n):
    label = f"{text}: {mean * 100:.1f}%"
    return label + (f" ± {std * 100:.1f}" if n > 1 else "")


def plot(agg: dict, out) -> list[Path]:
    """Held-out accuracy (%) against training steps, mean ± std band (clipped to [0, 100]), final value in the legend.

    The first panel is the test accuracy when a validation split was held out (the
    reported numbers), else the validation accuracy. When the runs logged them, the
    batch-statistics evaluation of :data:`BATCHSTAT_CURVE_ARMS` is drawn as its own
    (dotted) curve, a second panel shows the training accuracy in inference mode and
    a third the lag of the moving means behind the statistics of the layers' inputs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = "test_accuracy" if _has(agg, "test_accuracy") else "val_accuracy"
    panels = [main] + [c for c in ("train_eval_accuracy", "lag_mean") if _has(agg, c)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), dpi=150, squeeze=False)
    axes = dict(zip(panels, axes[0]))
    n_seeds = max(len(a["seeds"]) for a in agg["arms"].values())
    for arm, a in agg["arms"].items():
        steps = np.asarray(a["steps"])
        n = len(a["seeds"])
        style = ARM_STYLE.get(arm, {})
        for col, ax in axes.items():
            c = a["curves"].get(col)
            if not c:
                continue
            if col == "lag_mean":
                _draw(
                    ax,
                    steps,
                    np.asarray(c["mean"]),
                    np.asarray(c["std"]),
                    n,
                    f"{a['label']}: {c['final_mean']:.3f}",
                    style,
                    lo=0.0,
                    hi=np.inf,
                )
                continue
            _draw(
                ax,
                steps,
                np.asarray(c["mean"]) * 100,
                np.asarray(c["std"]) * 100,
                n,
                _label(a["label"], c["final_mean"], c["final_std"], n),
                style,
            )
            bs = a["curves"].get("val_batchstat_accuracy")
            if col == main and bs and arm in BATCHSTAT_CURVE_ARMS and main == "val_accuracy":
                _draw(
                    ax,
                    steps,
                    np.asarray(bs["mean"]) * 100,
                    np.asarray(bs["std"]) * 100,
                    n,
                    _label(a["label"] + ", inference with batch stats", bs["final_mean"], bs["final_std"], n),
                    dict(style, linestyle=":"),
                )
    seeds_note = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed"
    split = "test" if main == "test_accuracy" else "validation"
    axes[main].set_ylabel(f"{split.capitalize()} accuracy (%)")
    axes[main].set_title(f"{agg['dataset']}: {agg['title']}\n{split}, inference mode ({seeds_note})", fontsize=10)
    if "train_eval_accuracy" in axes:
        axes["train_eval_accuracy"].set_ylabel("Training accuracy (%)")
        axes["train_eval_accuracy"].set_title("training set, inference mode (moving statistics)", fontsize=10)
    if "lag_mean" in axes:
        axes["lag_mean"].set_ylabel("|moving mean - mean| / std")
        axes["lag_mean"].set_title(
            "how far the moving means lag the inputs' statistics\n(mean over features and "
            "the 4 layers; fixed training images)",
            fontsize=10,
        )
    for col, ax in axes.items():
        ax.set_xlabel("Training steps")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right" if col == "lag_mean" else "lower right", fontsize=8, frameon=True, framealpha=0.85)
    return save_figure(fig, Path(out) / "accuracy.png")


def save_figure(fig, path) -> list[Path]:
    """Lay out ``fig``, write it as ``path`` with the suffixes .png and .svg, close it; the two paths.

    Both files are the same bytes for the same figure: the SVG carries no date and its element ids come from a
    fixed salt, so redrawing a committed figure from unchanged logs leaves ``git status`` clean. Each is written
    whole or not at all (:func:`renorm_repro.runs.atomic_file`): a kill or a full disk leaves the old file.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    paths = [path.with_suffix(".png"), path.with_suffix(".svg")]
    with matplotlib.rc_context({"svg.hashsalt": "renorm"}):
        with atomic_file(paths[0]) as f:
            fig.savefig(f, format="png")
        with atomic_file(paths[1]) as f:
            fig.savefig(f, format="svg", metadata={"Date": None})
    plt.close(fig)
    return paths


def write_report(out) -> dict[str, object]:
    """Aggregate the logs in ``out`` and write the report (:data:`renorm_repro.runs.REPORT_FILES`): the figures,
    then ``summary.md``, then ``summary.json``, each whole (a report cut short is found by
    :func:`renorm_repro.runs.report_problem` and rewritten on ``--resume``)."""
    agg = aggregate(out)
    figs = plot(agg, out)
    text = write_summary(agg, out)
    return {"summary": text, "figures": figs, "aggregate": agg}


def compare(out_a, out_b, arms=None, scalars=None) -> dict:
    """Paired differences ``b - a`` of the same arm in two experiment folders (one factor changed).

    Runs with the same seed share their initial weights and data order across
    folders as within one, so the same arm under two settings (say a constant
    and a decaying learning rate) is compared seed by seed. Returns
    ``{"a", "b", "rows": [{arm, scalar, a: mean_ci, b: mean_ci, diff: paired}]}``
    over the arms both folders ran (or ``arms``) and the scalars both logged.
    """
    agg_a, agg_b = aggregate(out_a), aggregate(out_b)
    common = [a for a in agg_a["arms"] if a in agg_b["arms"]]
    if arms is not None:
        missing = [a for a in arms if a not in common]
        if missing:
            raise RunDirError(f"arms {missing} are not in both {out_a} and {out_b} (common: {common}).")
        common = list(arms)
    rows = []
    for arm in common:
        sa, sb = agg_a["arms"][arm]["scalars"], agg_b["arms"][arm]["scalars"]
        for name in scalars or SCALARS:
            if name in sa and name in sb and set(sa[name]["per_seed"]) & set(sb[name]["per_seed"]):
                rows.append(
                    {
                        "arm": arm,
                        "label": agg_a["arms"][arm]["label"],
                        "scalar": name,
                        "a": {k: v for k, v in sa[name].items() if k != "per_seed"},
                        "b": {k: v for k, v in sb[name].items() if k != "per_seed"},
                        "diff": paired_difference(sa[name]["per_seed"], sb[name]["per_seed"]),
                    }
                )
    return {"a": str(out_a), "b": str(out_b), "rows": rows}


def compare_table(result: dict) -> str:
    """Markdown of :func:`compare`: one line per arm and scalar, a, b and the paired b - a."""
    lines = [
        f"a = `{result['a']}`, b = `{result['b']}`; b - a over the same seeds, mean [95% CI], seeds where b > a",
        "",
        "| arm | scalar | a | b | b - a |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        sc = 1.0 if r["scalar"].startswith("lag") else 100.0
        dg = 3 if sc == 1.0 else 2
        acc, dacc = ((0.0, 1.0), (-1.0, 1.0)) if sc == 100.0 else (None, None)
        lines.append(
            f"| {r['label']} | {r['scalar']} | {_ci(r['a'], sc, dg, acc)} | {_ci(r['b'], sc, dg, acc)} | "
            f"{_ci(r['diff'], sc, dg, dacc)}, {r['diff']['wins']}/{r['diff']['n']} |"
        )
    lines += [
        "",
        "Two-sided 95% Student-t intervals over seeds, clipped to [0, 100] for accuracies and [-100, 100] "
        "for their differences (marked †).",
    ]
    return "\n".join(lines) + "\n"


#: Line styles of the settings of :func:`plot_settings`, in order.
_SETTING_STYLES = ("-", "--", ":", "-.")


def plot_settings(settings: dict[str, object], path, arms) -> list[Path]:
    """Test accuracy and moving-mean lag of ``arms`` under several settings (``{label: folder}``), one figure.

    Colour: the arm (:data:`ARM_STYLE`); line style: the setting. Mean over seeds with a ±1 std band.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggs = {label: aggregate(folder) for label, folder in settings.items()}
    main = "test_accuracy" if all(_has(a, "test_accuracy") for a in aggs.values()) else "val_accuracy"
    panels = [main] + (["lag_mean"] if all(_has(a, "lag_mean") for a in aggs.values()) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), dpi=150, squeeze=False)
    axes = dict(zip(panels, axes[0]))
    for (label, agg), ls in zip(aggs.items(), _SETTING_STYLES):
        for arm in arms:
            a = agg["arms"].get(arm)
            if a is None:
                continue
            n = len(a["seeds"])
            style = dict(ARM_STYLE.get(arm, {}), linestyle=ls)
            for col, ax in axes.items():
                c = a["curves"][col]
                if col == "lag_mean":
                    _draw(
                        ax,
                        np.asarray(a["steps"]),
                        np.asarray(c["mean"]),
                        np.asarray(c["std"]),
                        n,
                        f"{a['label']}, {label}",
                        style,
                        lo=0.0,
                        hi=np.inf,
                    )
                else:
                    _draw(
                        ax,
                        np.asarray(a["steps"]),
                        np.asarray(c["mean"]) * 100,
                        np.asarray(c["std"]) * 100,
                        n,
                        _label(f"{a['label']}, {label}", c["final_mean"], c["final_std"], n),
                        style,
                    )
    first = next(iter(aggs.values()))
    split = "test" if main == "test_accuracy" else "validation"
    axes[main].set_ylabel(f"{split.capitalize()} accuracy (%)")
    axes[main].set_title(
        f"{first['dataset']}: {first['title']}\n{split}, inference mode (mean ± std over seeds)", fontsize=10
    )
    if "lag_mean" in axes:
        axes["lag_mean"].set_ylabel("|moving mean - mean| / std")
        axes["lag_mean"].set_yscale("log")
        axes["lag_mean"].set_title("moving-mean lag (mean over features and layers)", fontsize=10)
    for col, ax in axes.items():
        ax.set_xlabel("Training steps")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right" if col == "lag_mean" else "lower right", fontsize=7, framealpha=0.85)
    return save_figure(fig, path)
