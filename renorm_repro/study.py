"""Across experiment folders: seeds pooled from several folders, and a schedule sweep chosen on validation.

Both read only the folders' logs (through :func:`renorm_repro.report.aggregate`), like the report.

:func:`pool` treats folders that ran the *same* experiment on different seeds (say seeds 0-4, then 5-9 in a
second folder) as one: the configs must be equal but for ``seeds`` and ``arms``, and no seed may appear twice
for an arm. They may also differ in fields that only the arms read (the config's ``ARM_KEYS``: the clipping
schedule, the micro-batch size) if every arm is the same (:meth:`arm_spec`) in every folder that holds it: e.g.
batch norm on groups of 32 run once, in a k=2 folder, pooled with the k=4 folders' arms. Per arm and scalar
it gives the mean with a 95% t interval over every seed, and per pair of the experiment's comparisons the
paired difference over the seeds both arms hold, with the seeds where ``b > a`` and an exact two-sided sign
test.

:func:`sweep` reads folders that each ran one Batch Renorm arm under one clipping schedule, on the same
seeds, and a reference folder (batch norm on those seeds). Each configuration gets its validation and test
scalars and its paired difference from the reference; the configuration with the highest mean validation
scalar is *chosen* (the test columns are reported, never used). :func:`plot_sweep` draws the validation scalar
against the warm-up, one line per pair of final limits; :func:`plot_pool` draws pooled folders' accuracy and
paired differences at every evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from renorm_repro.config import config_to_dict
from renorm_repro.report import ARM_STYLE, LAST_N, SCALARS, _arm_runs, _ci, aggregate, save_figure
from renorm_repro.runs import RunDirError, read_experiment_config
from renorm_repro.stats import mean_ci, paired_difference

__all__ = [
    "sign_test_p",
    "pool",
    "pool_table",
    "pool_curves",
    "paired_curve",
    "plot_pool",
    "sweep",
    "sweep_table",
    "plot_sweep",
]

#: Config keys that may differ between the folders :func:`pool` joins.
POOLABLE_KEYS = ("seeds", "arms")


def sign_test_p(wins: int, n: int) -> float:
    """Exact two-sided sign test (``scipy.stats.binomtest`` with p = 1/2): P(a split at least as uneven as
    ``wins`` of ``n``) under a fair coin.

    Ties (a difference of exactly 0) should be left out of ``n`` by the caller. 5 of 5 gives 0.0625.
    """
    if not (isinstance(n, int) and isinstance(wins, int) and 0 <= wins <= n):
        raise ValueError(f"`wins` must be an integer in [0, n], got wins={wins!r}, n={n!r}.")
    if n == 0:
        return 1.0
    from scipy import stats

    return float(stats.binomtest(wins, n, 0.5).pvalue)


def _paired(a: dict[int, float], b: dict[int, float]) -> dict:
    d = paired_difference(a, b)
    nonzero = [x for x in d["differences"] if x != 0]
    d["sign_test_p"] = sign_test_p(sum(x > 0 for x in nonzero), len(nonzero))
    return d


# ----------------------------------------------------------------------------------- pooling
def pool(folders: Sequence, scalars: Sequence[str] | None = None, arms_of: dict | None = None) -> dict:
    """Seeds of the same experiment in several ``folders`` joined (see the module docstring).

    ``arms_of`` maps some of the folders to the arms to take from them (the others give every arm): e.g. batch
    norm from folders that also hold a Batch Renorm arm under another schedule than the one pooled.
    """
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise RunDirError(f"pool needs at least 2 folders, got {[str(f) for f in folders]}.")
    arms_of = {str(Path(f)): list(a) for f, a in (arms_of or {}).items()}
    unknown = sorted(set(arms_of) - {str(f) for f in folders})
    if unknown:
        raise RunDirError(f"`arms_of` names {unknown[0]}, which is not one of the pooled folders.")
    configs = [read_experiment_config(f) for f in folders]
    cfgs = [config_to_dict(c) for c in configs]
    arm_keys = set(type(configs[0]).ARM_KEYS)
    base = {k: v for k, v in cfgs[0].items() if k not in POOLABLE_KEYS}
    differing: dict[str, None] = {}  # the arm-only fields that differ, in the order they are met
    for f, c, config in zip(folders[1:], cfgs[1:], configs[1:]):
        other = {k: v for k, v in c.items() if k not in POOLABLE_KEYS}
        diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if set(diff) - arm_keys or type(config) is not type(configs[0]):
            raise RunDirError(
                f"{f} ran another experiment than {folders[0]}: its config differs in "
                + ", ".join(f"{k} ({base.get(k)!r} vs {other.get(k)!r})" for k in diff if k not in arm_keys)
                + f"; only {', '.join(POOLABLE_KEYS)} may differ between pooled folders (and fields only the "
                "arms read, if each arm is the same in every folder)."
            )
        differing.update(dict.fromkeys(diff))
    # field -> folder -> value
    differs = {k: {str(f): c.get(k) for f, c in zip(folders, cfgs)} for k in differing}
    aggs = [_only_arms(aggregate(f), f, arms_of.get(str(f))) for f in folders]
    if differs:  # then each arm must be trained alike in every folder that holds it
        specs: dict[str, tuple] = {}
        for f, cfg, agg in zip(folders, configs, aggs):
            for arm in agg["arms"]:
                spec = cfg.arm_spec(arm)
                if arm in specs and specs[arm][1] != spec:
                    raise RunDirError(
                        f"arm {arm!r} is not the same in {f} as in {specs[arm][0]}: the configs differ in "
                        + ", ".join(sorted(differs))
                        + f", which change it ({specs[arm][1]} vs {spec}); pool folders whose arms are alike."
                    )
                specs.setdefault(arm, (f, spec))
    names = list(scalars or SCALARS)
    arms: dict[str, dict] = {}
    for f, agg in zip(folders, aggs):
        for arm, a in agg["arms"].items():
            entry = arms.setdefault(arm, {"label": a["label"], "folders": {}, "per_seed": {}})
            entry["folders"][str(f)] = sorted(a["scalars"].get(names[0], {}).get("per_seed", {}))
            for name in names:
                per_seed = a["scalars"].get(name, {}).get("per_seed", {})
                have = entry["per_seed"].setdefault(name, {})
                twice = sorted(set(have) & set(per_seed))
                if twice:
                    raise RunDirError(
                        f"arm {arm!r} has seed {twice[0]} in two folders ({f} and another): a seed may be pooled once."
                    )
                have.update(per_seed)
    for a in arms.values():
        a["scalars"] = {n: dict(mean_ci(list(v.values())), per_seed=v) for n, v in a["per_seed"].items() if v}
        del a["per_seed"]
    paired = []
    for a, b in type(configs[0]).COMPARISONS:
        if a in arms and b in arms:
            for name in names:
                sa, sb = arms[a]["scalars"].get(name), arms[b]["scalars"].get(name)
                if sa and sb and set(sa["per_seed"]) & set(sb["per_seed"]):
                    paired.append(dict(_paired(sa["per_seed"], sb["per_seed"]), a=a, b=b, scalar=name))
    result = {
        "folders": [str(f) for f in folders],
        "experiment": cfgs[0]["experiment"],
        "differs": differs,
        "arms": arms,
        "paired": paired,
    }
    if arms_of:
        result["arms_of"] = arms_of
    return result


def _only_arms(agg: dict, folder: Path, arms) -> dict:
    """``agg`` with only ``arms`` (all when None); an arm the folder did not run is an error."""
    if arms is None:
        return agg
    missing = [a for a in arms if a not in agg["arms"]]
    if missing:
        raise RunDirError(
            f"arm {missing[0]!r} is not in {folder} (its arms: {', '.join(agg['arms'])}): check `arms_of`."
        )
    return dict(agg, arms={a: v for a, v in agg["arms"].items() if a in arms})


def _scale(name: str):
    return (1.0, 3) if name.startswith("lag") else (100.0, 2)


def pool_table(result: dict, scalars: Sequence[str] = (f"test_last{LAST_N}", f"val_last{LAST_N}")) -> str:
    """Markdown of :func:`pool`: per arm the pooled seeds and scalars; per pair the paired difference."""
    lines = [
        "Pooled folders: " + ", ".join(f"`{f}`" for f in result["folders"]),
        "",
    ]
    for f, arms in result.get("arms_of", {}).items():
        lines += [f"Taken from `{Path(f).name}`: {', '.join(f'`{a}`' for a in arms)} only.", ""]
    for k, by_folder in result.get("differs", {}).items():
        values = "; ".join(f"{v!r} in {Path(f).name}" for f, v in by_folder.items())
        lines += [
            f"The configs differ in `{k}` ({values}), which only the arms read; each arm is the same in "
            "every folder that holds it.",
            "",
        ]
    lines += [
        "| arm | seeds (folder) |" + "".join(f" {s} |" for s in scalars),
        "| --- | --- |" + " --- |" * len(scalars),
    ]
    for a in result["arms"].values():
        seeds = "; ".join(f"{','.join(map(str, s))} ({Path(f).name})" for f, s in a["folders"].items() if s)
        lines.append(
            f"| {a['label']} | {seeds} |"
            + "".join(f" {_ci(a['scalars'][s], *_scale(s))} |" if s in a["scalars"] else " – |" for s in scalars)
        )
    if result["paired"]:
        lines += [
            "",
            "Paired b - a over the seeds both arms hold: mean [95% t interval], seeds where b > a, "
            "exact two-sided sign test p",
            "",
            "| b - a |" + "".join(f" {s} |" for s in scalars),
            "| --- |" + " --- |" * len(scalars),
        ]
        by_pair: dict[tuple, dict] = {}
        for p in result["paired"]:
            by_pair.setdefault((p["a"], p["b"]), {})[p["scalar"]] = p
        for (a, b), ps in by_pair.items():
            cells = "".join(
                f" {_ci(ps[s], *_scale(s))}, {ps[s]['wins']}/{ps[s]['n']}, p={ps[s]['sign_test_p']:.3g} |"
                if s in ps
                else " – |"
                for s in scalars
            )
            lines.append(f"| {result['arms'][b]['label']} - {result['arms'][a]['label']} |{cells}")
    return "\n".join(lines) + "\n"


def pool_curves(result: dict) -> dict:
    """Per arm of a :func:`pool` result, per pooled seed: ``(steps, accuracy)`` of its complete run, from the logs.

    The accuracy is the test column where every run logged one (a validation split was held out), else the
    validation column; ``"column"`` names it.
    """
    runs: dict[str, dict[int, list]] = {}
    for f in map(Path, result["folders"]):
        cfg = read_experiment_config(f)
        for arm in result["arms"]:
            if arm in result.get("arms_of", {}).get(str(f), cfg.arms):
                by_seed, done, _ = _arm_runs(f, cfg, arm)
                runs.setdefault(arm, {}).update({s: rows for s, rows in by_seed.items() if s in done})
    every = [rows for by_seed in runs.values() for rows in by_seed.values()]
    column = "test_accuracy" if every and all("test_accuracy" in rows[0] for rows in every) else "val_accuracy"
    curves = {
        arm: {s: ([r["step"] for r in rows], [r[column] for r in rows]) for s, rows in sorted(by_seed.items())}
        for arm, by_seed in runs.items()
        if by_seed
    }
    return {"column": column, "arms": curves}


def _at_common_steps(by_seed: dict) -> tuple[list, np.ndarray]:
    """The steps every seed evaluated, and the seeds x steps array of their values there."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in by_seed.values())))
    table = [dict(zip(steps, vals)) for steps, vals in by_seed.values()]
    return common, np.array([[t[s] for s in common] for t in table], dtype=float)


def paired_curve(a: dict, b: dict) -> tuple[list, np.ndarray]:
    """``b - a`` at every step both arms' runs evaluated, per seed both hold (``a``, ``b``: one arm of
    :func:`pool_curves`): the steps, and the seeds x steps array of differences (seeds in ascending order)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise RunDirError("the two arms share no seed: no paired difference.")
    common, both = _at_common_steps({(arm, s): c[s] for s in seeds for arm, c in (("a", a), ("b", b))})
    return common, both[1::2] - both[0::2]


def plot_pool(result: dict, path, scalar: str = f"test_last{LAST_N}") -> list[Path]:
    """Pooled folders at every evaluation: each arm's accuracy (left) and each paired difference ``b - a`` (right).

    Mean over the pooled seeds (those both arms hold, for a difference) with a band from the lowest to the
    highest seed; the legends give ``scalar``'s pooled mean and 95% t interval (and, for a difference, the seeds
    where ``b > a``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = pool_curves(result)
    if not curves["arms"]:
        raise RunDirError(f"no complete run in {result['folders']}: nothing to plot.")
    split = "test" if curves["column"] == "test_accuracy" else "validation"
    pairs = [
        p for p in result["paired"] if p["scalar"] == scalar and p["a"] in curves["arms"] and p["b"] in curves["arms"]
    ]
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(6.6 * (2 if pairs else 1), 6.0), dpi=150, squeeze=False)
    ax = axes[0][0]
    for arm, by_seed in curves["arms"].items():
        steps, vals = _at_common_steps(by_seed)
        style = ARM_STYLE.get(arm, {})
        s = result["arms"][arm]["scalars"].get(scalar)
        label = result["arms"][arm]["label"] + (f": {_ci(s, *_scale(scalar))}" if s else "")
        ax.plot(steps, vals.mean(axis=0) * 100, linewidth=1.6, label=f"{label} ({len(vals)} seeds)", **style)
        ax.fill_between(
            steps, vals.min(axis=0) * 100, vals.max(axis=0) * 100, color=style.get("color"), alpha=0.15, lw=0
        )
    ax.set_ylabel(f"{split} accuracy, inference mode (%)")
    ax.set_title(f"{split} accuracy: mean over seeds, band from lowest to highest seed", fontsize=10)
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=7, title_fontsize=7)
    ax.legend(title=f"{scalar}: mean [95% t interval]", **below)
    if pairs:
        ax = axes[0][1]
        ax.axhline(0.0, color="black", linewidth=0.8)
        for p in pairs:
            common, d = paired_curve(curves["arms"][p["a"]], curves["arms"][p["b"]])
            d = d * 100
            label = f"{result['arms'][p['b']]['label']} - {result['arms'][p['a']]['label']}"
            (line,) = ax.plot(
                common,
                d.mean(axis=0),
                linewidth=1.4,
                linestyle=ARM_STYLE.get(p["b"], {}).get("linestyle", "-"),
                label=f"{label}: {_ci(p, *_scale(scalar))}, {p['wins']}/{p['n']}",
            )
            ax.fill_between(common, d.min(axis=0), d.max(axis=0), color=line.get_color(), alpha=0.12, lw=0)
        ax.set_ylabel(f"paired difference b - a, {split} accuracy (points)")
        ax.set_title("paired differences (same seeds): mean, band from lowest to highest seed", fontsize=10)
        ax.legend(title=f"{scalar}: mean [95% t interval], seeds where b > a", **below)
    for ax in axes[0]:
        ax.set_xlabel("training steps")
        ax.grid(True, alpha=0.3)
    cfg = read_experiment_config(result["folders"][0])
    fig.suptitle(f"{cfg.dataset}: {cfg.title()} ({len(result['folders'])} folders pooled)", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------- the sweep
def _renorm_arm(folder: Path, cfg, agg: dict) -> str:
    """The folder's one arm with a clipping schedule other than batch norm's (``rmax > 1`` or ``dmax > 0``)."""
    schedules = {a: cfg.arm_spec(a)["schedule"] for a in agg["arms"]}
    arms = [a for a, s in schedules.items() if s.rmax > 1 or s.dmax > 0]
    if len(arms) != 1:
        raise RunDirError(
            f"{folder} must hold exactly one Batch Renorm arm (rmax > 1 or dmax > 0) to be a sweep "
            f"configuration; it holds {arms or 'none'}."
        )
    return arms[0]


def sweep(folders: Sequence, reference, select: str = f"val_last{LAST_N}") -> dict:
    """Each folder's Batch Renorm arm against ``reference``'s batch norm arm; the best on ``select`` chosen.

    ``select`` must be a validation scalar (``val_*``): the test split is never used to choose.
    """
    if not select.startswith("val_") or select not in SCALARS:
        raise RunDirError(
            f"--select must be a validation scalar (val_*) of {sorted(SCALARS)}, got {select!r}: "
            "the sweep chooses on the validation split only."
        )
    reference = Path(reference)
    ref_agg = aggregate(reference)
    ref_arms = list(ref_agg["arms"])
    if len(ref_arms) != 1:
        raise RunDirError(f"--reference {reference} must hold one arm (batch norm), it holds {ref_arms}.")
    ref = ref_agg["arms"][ref_arms[0]]
    test_name = "test" + select[3:]
    rows = []
    for f in map(Path, folders):
        agg = aggregate(f)
        cfg = read_experiment_config(f)
        arm = _renorm_arm(f, cfg, agg)
        a = agg["arms"][arm]
        sched = cfg.arm_spec(arm)["schedule"]
        tau = cfg.time_constant_steps()
        row = {
            "folder": str(f),
            "name": f.name,
            "arm": arm,
            "label": a["label"],
            "schedule": sched.to_dict(),
            "warmup_time_constants": round(sched.warmup_steps / tau, 6),
            "complete_runs": a["complete_runs"],
            "seeds": sorted(a["scalars"].get(select, {}).get("per_seed", {})),
        }
        for name in (select, test_name, "r_clipped_mean_late", "d_clipped_mean_late"):
            if name in a["scalars"]:
                row[name] = {k: v for k, v in a["scalars"][name].items()}
            if name in a["scalars"] and name in ref["scalars"]:
                row[name + "_minus_reference"] = _paired(
                    ref["scalars"][name]["per_seed"], a["scalars"][name]["per_seed"]
                )
        rows.append(row)
    seeds = {tuple(r["seeds"]) for r in rows}
    if len(seeds) > 1:
        raise RunDirError(f"sweep configurations must be complete on the same seeds; they have {sorted(seeds)}.")
    scored = [r for r in rows if select in r]
    chosen = max(scored, key=lambda r: r[select]["mean"])["name"] if scored else None
    return {
        "select": select,
        "test": test_name,
        "reference": str(reference),
        "reference_label": ref["label"],
        "reference_scalars": {k: ref["scalars"][k] for k in (select, test_name) if k in ref["scalars"]},
        "configurations": len(rows),
        "rows": rows,
        "chosen": chosen,
    }


def sweep_table(result: dict) -> str:
    """Markdown of :func:`sweep`, one line per configuration, the chosen one in bold."""
    sel, test = result["select"], result["test"]
    lines = [
        f"{result['configurations']} configurations; chosen on `{sel}` (validation split) only: "
        f"**{result['chosen']}**. Reference: {result['reference_label']} (`{result['reference']}`): "
        f"{sel} {_ci(result['reference_scalars'][sel])}"
        + (f", {test} {_ci(result['reference_scalars'][test])}" if test in result["reference_scalars"] else "")
        + ".",
        "",
        "| configuration | warm-up (time constants) | rmax / dmax (reached at step) | runs | "
        f"{sel} (%) | minus reference | {test} (%) | minus reference | "
        "r clipped, 2nd half | d clipped, 2nd half |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["schedule"]["rmax"], r["warmup_time_constants"])):
        s = r["schedule"]

        def cell(name, scale=100.0, digits=2):
            return _ci(r[name], scale, digits) if name in r else "–"

        def diff(name):
            d = r.get(name + "_minus_reference")
            return f"{_ci(d)}, {d['wins']}/{d['n']}" if d else "–"

        name = f"**{r['name']}**" if r["name"] == result["chosen"] else r["name"]
        lines.append(
            f"| {name} | {r['warmup_time_constants']:g} ({s['warmup_steps']} steps) | "
            f"{s['rmax']:g} ({s['rmax_steps']}) / {s['dmax']:g} ({s['dmax_steps']}) | {r['complete_runs']} | "
            f"{cell(sel)} | {diff(sel)} | {cell(test)} | {diff(test)} | "
            f"{cell('r_clipped_mean_late', 1.0, 3)} | {cell('d_clipped_mean_late', 1.0, 3)} |"
        )
    lines += [
        "",
        'Mean [95% t interval] over the seeds; "minus reference": paired per seed, seeds where the '
        "configuration is above the reference. Clipped fractions: mean over every training step of the "
        "second half (`--log-clip-means`), averaged over layers.",
    ]
    return "\n".join(lines) + "\n"


def plot_sweep(result: dict, path) -> list[Path]:
    """Validation (left) and test (right) scalar against the warm-up, one line per pair of final limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sel, test = result["select"], result["test"]
    panels = [sel] + ([test] if all(test in r for r in result["rows"]) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.4), dpi=150, squeeze=False)
    groups: dict[tuple, list] = {}
    for r in result["rows"]:
        groups.setdefault((r["schedule"]["rmax"], r["schedule"]["dmax"]), []).append(r)
    for ax, name in zip(axes[0], panels):
        for (rmax, dmax), rs in sorted(groups.items()):
            rs = sorted(rs, key=lambda r: r["warmup_time_constants"])
            x = [r["warmup_time_constants"] for r in rs]
            y = [r[name]["mean"] * 100 for r in rs]
            err = [0.0 if math.isnan(r[name]["half_width"]) else r[name]["half_width"] * 100 for r in rs]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"Batch Renorm, rmax {rmax:g} / dmax {dmax:g}")
        ref = result["reference_scalars"].get(name)
        if ref:
            ax.axhline(
                ref["mean"] * 100,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"{result['reference_label']} (reference)",
            )
        for r in result["rows"]:
            if r["name"] == result["chosen"]:
                ax.plot(
                    [r["warmup_time_constants"]],
                    [r[name]["mean"] * 100],
                    marker="*",
                    markersize=14,
                    color="gold",
                    markeredgecolor="black",
                    linestyle="none",
                    label="chosen (on validation)" if name == sel else "chosen (on validation)",
                )
        ax.set_xscale("log")
        ticks = sorted({r["warmup_time_constants"] for r in result["rows"]})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("warm-up (moving-average time constants, log scale)")
        split = "validation" if name == sel else "test"
        ax.set_ylabel(f"{split} accuracy, mean of last {LAST_N} evaluations (%)")
        ax.set_title(f"{split} split (95% t intervals over seeds)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
