"""Count the paired intervals this folder reports, and recompute each main-score one from the logs.

The results README applies a Bonferroni bar: a two-sided 5% test over every interval reported on the
main score (test accuracy, mean of the last 4 evaluations) asks p < 0.05 / n, i.e. |t| above
``scipy.stats.t.ppf(1 - 0.025 / n, 4)`` with 5 seeds. This script gives n and the bar:

1. It reads every committed table beside this script (``git ls-files``; ``runs/`` excluded): the paired
   tables of ``summary.md`` and of the pooled tables (``b - a`` columns, one interval per scalar), the
   ``renorm-repro compare`` tables (the ``b - a`` column, one row per arm and scalar) and the sweeps'
   2-seed ``minus reference`` columns. The same comparison printed twice counts once.
2. It reads the README: an interval there that is no table's paired interval or arm mean (to the
   README's rounding) must be in :data:`README_ONLY`, which says what it compares; any other stops the
   script, so the count cannot miss one. Every interval the repository's README quotes must be one of
   this README's.
3. It recomputes every main-score comparison from ``metrics.csv`` (the mean of a run's last 4 test
   evaluations), checks that the per-seed differences equal the ones the pooled JSONs hold and that the
   interval prints as the table or README prints it, and lists |t| and p against the bar.

Usage, from the repository root: ``python results/fashion-mnist/multiplicity.py`` (needs numpy, scipy).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

HERE = Path(__file__).resolve().parent
IV = re.compile(r"([+-]?\d+\.\d+) \[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]")
COLUMNS = {  # summary.md / pool column headers -> scalar
    "test, mean of last 4 evals (%)": "test_last4",
    "test, final (%)": "test_final",
    "test, worst of 2nd half (%)": "test_worst_late",
    "val., mean of last 4 evals (%)": "val_last4",
    "val., worst of 2nd half (%)": "val_worst_late",
    "moving-mean lag, 2nd half (std)": "lag_late",
    "test_last4": "test_last4",
    "val_last4": "val_last4",
    "test, precise BN, mean of last 4 evals (%)": "test_precise_last4",
    "val., precise BN, mean of last 4 evals (%)": "val_precise_last4",
}
MAIN = "test_last4"
PREFIX = "results/fashion-mnist"

# Intervals the README computes itself (no table prints them): text -> (scalar, what it compares). The
# main-score ones are recomputed from the logs by readme_comparisons().
README_ONLY = {
    "+0.07 [-0.01, 0.14]": ("test_final", "k=4 final: Batch Renorm minus batch norm, last evaluation"),
    "+0.60 [0.45, 0.75]": ("test_final", "k=2 final: Batch Renorm minus batch norm, last evaluation"),
    "-0.21 [-0.28, -0.14]": ("test_final", "Figure 1 final: Batch Renorm minus batch norm, last evaluation"),
    "+0.25 [-0.10, 0.60]": ("val_last4", "long run: short-run schedule minus the paper's, Batch Renorm"),
    "+1.19 [-1.12, 3.50]": (MAIN, "2000 steps, constant rate: Keras renorm minus ours, 10 seeds"),
    "-1.76 [-2.25, -1.26]": (MAIN, "width 8 minus width 16: batch norm, i.i.d."),
    "-2.17 [-2.49, -1.84]": (MAIN, "width 8 minus width 16: batch norm, non-i.i.d."),
    "-1.90 [-2.31, -1.49]": (MAIN, "width 8 minus width 16: Batch Renorm, non-i.i.d."),
    "+0.26 [0.07, 0.46]": (MAIN, "width 8 minus width 16: Batch Renorm's gain over batch norm"),
    "-0.41 [-0.94, 0.12]": (MAIN, "width 8 minus width 16: batch norm's non-i.i.d. loss"),
    "+0.17 [-0.07, 0.41]": (MAIN, "long run: short-run schedule minus the paper's, Batch Renorm"),
    "+2.03 [1.47, 2.59]": (MAIN, "Welch: gain at 40000 steps (seeds 0-4) minus gain at 4000 (seeds 20-24), width 8"),
    "+0.16 [-0.13, 0.45]": (MAIN, "long run: warm-up 125 minus warm-up 2000 (both 1.5/0.5), Batch Renorm"),
    "+0.11 [-0.06, 0.27]": (MAIN, "long run: warm-up 125 (3/5) minus the paper's unscaled schedule, Batch Renorm"),
    "-0.22 [-0.49, 0.04]": (MAIN, "long run, warm-up 125: limits 3/5 minus 1.5/0.5, Batch Renorm"),
    "+0.15 [0.02, 0.28]": (MAIN, "Figure 3 final: batch norm with recomputed statistics minus batch norm"),
    "+0.39 [0.33, 0.45]": (MAIN, "Figure 3 final: Batch Renorm minus batch norm with recomputed statistics"),
    "-1.91 [-2.15, -1.67]": (MAIN, "Figure 3 final: batch norm with recomputed statistics minus i.i.d. batch norm"),
    "+0.12 [0.02, 0.22]": (MAIN, "Figure 1 final: batch norm with recomputed statistics minus batch norm"),
    "-0.22 [-0.41, -0.03]": (MAIN, "Figure 1 final: Batch Renorm minus batch norm with recomputed statistics"),
    "+0.37 [0.24, 0.49]": (MAIN, "k=2 final: batch norm with recomputed statistics minus batch norm"),
    "+0.38 [0.27, 0.49]": (MAIN, "k=2 final: Batch Renorm minus batch norm with recomputed statistics"),
    "-0.46 [-0.86, -0.07]": (MAIN, "k=2 final: batch norm with recomputed statistics minus groups of 32"),
}


def tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=HERE, capture_output=True, text=True, check=True).stdout
    return [HERE / p for p in out.split() if "/runs/" not in p]


def key(m: str, lo: str, hi: str, digits: int | None = None) -> tuple[float, float, float]:
    """Sign-free: a table's ``b - a`` and the README's ``a - b`` are one comparison."""
    vals = [abs(float(v)) for v in (m, lo, hi)]
    if digits is not None:
        vals = [round(v, digits) for v in vals]
    return vals[0], *sorted(vals[1:])


def read_tables():
    """``(paired, means)``: ``{(scalar, key): [(file, row, seeds)]}`` and the set of arm-mean keys."""
    paired, means = {}, set()
    for path in tracked("*.md"):
        if path.name == "README.md":
            continue
        header = None
        for line in path.read_text().splitlines():
            if not line.startswith("|"):
                header = None
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                continue
            if set(cells[0]) <= set("- "):
                continue
            found = []  # (scalar, cell, seeds)
            if header[0] == "b - a":
                found = [(COLUMNS[h], c, 5) for h, c in zip(header[1:], cells[1:])]
            elif header[:2] == ["arm", "scalar"]:
                found = [(cells[1], cells[4], 5)]
                means.update(key(*m.groups()) for c in cells[2:4] for m in IV.finditer(c))
            elif header[0] == "configuration":
                found = [("val_last4", cells[5], 2), ("test_last4", cells[7], 2)]
                means.update(key(*m.groups()) for c in cells[4:10:2] for m in IV.finditer(c))
            else:
                means.update(key(*m.groups()) for c in cells[1:] for m in IV.finditer(c))
            for scalar, cell, seeds in found:
                m = IV.search(cell)
                if m:
                    rel = str(path.relative_to(HERE))
                    paired.setdefault((scalar, key(*m.groups())), []).append((rel, cells[0], seeds))
    return paired, means


def read_readme(paired, means):
    """The README's intervals that no table holds: each must be in README_ONLY."""
    text = (HERE / "README.md").read_text()
    # The tables print accuracies to 2 decimals (lags to 3); the README's text rounds some to 1.
    known = {k for _, k in paired} | means
    known |= {key(*map(str, k), digits=1) for k in known}
    unknown, used = [], set()
    for m in IV.finditer(text):
        if key(*m.groups()) in known:
            continue
        if m.group(0) in README_ONLY:
            used.add(m.group(0))
            continue
        unknown.append((text.count("\n", 0, m.start()) + 1, m.group(0)))
    return unknown, used


# --- the logs


def last4(folder: str, arm: str, seed: int, column: str = "test_accuracy") -> float:
    """The mean of a run's last 4 test evaluations, from its metrics.csv (percent); ``column``
    ``test_accuracy_precise``: with recomputed population statistics."""
    with open(HERE / folder / "runs" / arm / f"seed{seed}" / "metrics.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["step"]))
    return 100.0 * float(np.mean([float(r[column]) for r in rows[-4:]]))


def arm(folder: str, name: str, seeds) -> np.ndarray:
    return np.array([last4(folder, name, s) for s in seeds])


def paired_t(d: np.ndarray) -> dict:
    n = len(d)
    se = d.std(ddof=1) / np.sqrt(n)
    t = d.mean() / se
    half = stats.t.ppf(0.975, n - 1) * se
    return dict(mean=d.mean(), lo=d.mean() - half, hi=d.mean() + half, t=t, df=n - 1, p=2 * stats.t.sf(abs(t), n - 1))


def welch_t(x: np.ndarray, y: np.ndarray) -> dict:
    """``x - y``, unpaired, unequal variances (Welch-Satterthwaite degrees of freedom)."""
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = np.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    diff = x.mean() - y.mean()
    half = stats.t.ppf(0.975, df) * se
    t = diff / se
    return dict(mean=diff, lo=diff - half, hi=diff + half, t=t, df=df, p=2 * stats.t.sf(abs(t), df))


def json_comparisons():
    """Every main-score paired entry of the committed JSONs: (label, per-seed differences from the logs)."""
    out = []
    for path in tracked("*.json"):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "paired" not in data:
            continue
        rel = str(path.parent.relative_to(HERE))
        for p in data["paired"]:
            if p["scalar"] != MAIN or p["n"] < 2:
                continue
            if "folders" in data:  # a pooled table: each arm's seeds come from its folders

                def side(a, seeds):
                    where = {s: f for f, ss in data["arms"][a]["folders"].items() for s in ss}
                    return np.array([last4(str(Path(where[s]).relative_to(PREFIX)), a, s) for s in seeds])

                d = side(p["b"], p["seeds"]) - side(p["a"], p["seeds"])
                label = f"{path.relative_to(HERE)}: {p['b']} - {p['a']}"
            else:
                d = arm(rel, p["b"], p["seeds"]) - arm(rel, p["a"], p["seeds"])
                label = f"{rel}: {p['b']} - {p['a']}"
            check(np.allclose(d, 100.0 * np.array(p["differences"]), atol=1e-9), f"{label}: the JSON differs")
            out.append((label, d))
    return out


def compare_comparisons():
    """The renorm-repro compare tables (lr-schedule.md, momentum.md, run-length.md): b - a per arm."""
    out = []
    for path in tracked("*.md"):
        first = path.read_text().split("\n", 1)[0]
        m = re.match(r"a = `results/fashion-mnist/(.+?)`, b = `results/fashion-mnist/(.+?)`", first)
        if not m:
            continue
        a, b = m.groups()
        for name in ("bn", "brn", "keras_brn"):
            seeds = range(5)
            out.append((f"{path.name}: {name}, {b} - {a}", arm(b, name, seeds) - arm(a, name, seeds)))
    return out


def readme_comparisons():
    """The README's own main-score comparisons (README_ONLY), from the logs."""
    s20, s0 = range(20, 25), range(5)
    w16 = {a: arm("final/noniid-bn", a, s20) for a in ("bn", "bn_iid")}
    w16["brn"] = arm("final/noniid-brn", "brn", s20)
    w8 = {a: arm("final/noniid-w8-bn", a, s20) for a in ("bn", "bn_iid")}
    w8["brn"] = arm("final/noniid-w8-brn", "brn", s20)
    long = {a: np.array([last4(f"long/noniid-w8-seed{s}", a, s) for s in s0]) for a in ("bn", "brn")}
    short_sched = np.array(
        [last4(f"long/noniid-w8-final-schedule-seeds{'0-2' if s < 3 else '3-4'}", "brn", s) for s in s0]
    )
    k10 = np.concatenate(
        [
            arm("noniid-constant-lr-2000steps", "keras_brn", s0) - arm("noniid-constant-lr-2000steps", "brn", s0),
            arm("noniid-constant-lr-2000steps-seeds5-9", "keras_brn", range(5, 10))
            - arm("noniid-constant-lr-2000steps-seeds5-9", "brn", range(5, 10)),
        ]
    )
    w125 = {v: np.array([last4(f"long/noniid-w8-warmup125-{v}", "brn", s) for s in s0]) for v in ("r1.5-d0.5", "r3-d5")}
    precise = np.array([last4("final/noniid-bn-precise", "bn", s, "test_accuracy_precise") for s in s20])
    iid_precise = np.array([last4("final/iid-bn-precise", "bn", s, "test_accuracy_precise") for s in s20])
    k2_precise = np.array(
        [
            last4(
                f"final/mbk2-bn-precise-seeds{'20-22' if s < 23 else '23-24'}", "bn_micro", s, "test_accuracy_precise"
            )
            for s in s20
        ]
    )
    paired = {
        "+0.37 [0.24, 0.49]": k2_precise - arm("final/mbk2-bn", "bn_micro", s20),
        "+0.38 [0.27, 0.49]": arm("final/mbk2-brn", "brn_micro", s20) - k2_precise,
        "-0.46 [-0.86, -0.07]": k2_precise - arm("final/mb-bn32", "bn_32", s20),
        "+0.12 [0.02, 0.22]": iid_precise - arm("final/iid-bn", "bn", s20),
        "-0.22 [-0.41, -0.03]": arm("final/iid-brn", "brn", s20) - iid_precise,
        "+0.15 [0.02, 0.28]": precise - w16["bn"],
        "+0.39 [0.33, 0.45]": w16["brn"] - precise,
        "-1.91 [-2.15, -1.67]": precise - w16["bn_iid"],
        "+1.19 [-1.12, 3.50]": k10,
        "-1.76 [-2.25, -1.26]": w8["bn_iid"] - w16["bn_iid"],
        "-2.17 [-2.49, -1.84]": w8["bn"] - w16["bn"],
        "-1.90 [-2.31, -1.49]": w8["brn"] - w16["brn"],
        "+0.26 [0.07, 0.46]": (w8["brn"] - w8["bn"]) - (w16["brn"] - w16["bn"]),
        "-0.41 [-0.94, 0.12]": (w8["bn"] - w8["bn_iid"]) - (w16["bn"] - w16["bn_iid"]),
        "+0.17 [-0.07, 0.41]": short_sched - long["brn"],
        "+0.16 [-0.13, 0.45]": w125["r1.5-d0.5"] - short_sched,
        "+0.11 [-0.06, 0.27]": w125["r3-d5"] - long["brn"],
        "-0.22 [-0.49, 0.04]": w125["r3-d5"] - w125["r1.5-d0.5"],
    }
    out = [(f"README: {README_ONLY[k][1]}", d, k) for k, d in paired.items()]
    welch = welch_t(short_sched - long["bn"], w8["brn"] - w8["bn"])
    return out, ("README: " + README_ONLY["+2.03 [1.47, 2.59]"][1], welch, "+2.03 [1.47, 2.59]")


def fmt(r) -> str:
    return f"{r['mean']:+.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"multiplicity.py: {message}")


def main() -> int:
    paired, means = read_tables()
    unknown, used = read_readme(paired, means)
    for line, text in unknown:
        print(f"README line {line}: {text} is in no table and not in README_ONLY", file=sys.stderr)
    check(not unknown, "README intervals unaccounted for (above)")
    check(used == set(README_ONLY), f"README_ONLY entries no longer in the README: {set(README_ONLY) - used}")
    # The repository's README quotes the study: each of its intervals must be one this folder reports.
    ours = {key(*m.groups()) for m in IV.finditer((HERE / "README.md").read_text())}
    top = (HERE.parents[1] / "README.md").read_text()
    stray = [m.group(0) for m in IV.finditer(top) if key(*m.groups()) not in ours]
    check(not stray, f"README.md (the repository's) quotes intervals this folder does not report: {stray}")
    five = {k: v for k, v in paired.items() if v[0][2] == 5}
    table_main = [k for k in five if k[0] == MAIN]
    readme_main = [k for k in README_ONLY if README_ONLY[k][0] == MAIN]
    n_main = len(table_main) + len(readme_main)
    n_all = len(five) + len(README_ONLY)
    bar = stats.t.ppf(1 - 0.025 / n_main, 4)
    print(
        f"main score ({MAIN}): {len(table_main)} in the tables + {len(readme_main)} in the README only = {n_main}; "
        f"Bonferroni: p < {0.05 / n_main:.2g}, |t| > {bar:.2f} with 4 degrees of freedom"
    )
    print(f"secondary scalars: {n_all - n_main} more; all {n_all}: |t| > {stats.t.ppf(1 - 0.025 / n_all, 4):.2f}")
    print(f"the sweeps' 2-seed intervals (a ranking, not tests): {len(paired) - len(five)}")

    rows, seen = [], set()
    for label, d in json_comparisons() + compare_comparisons():
        k = tuple(np.round(np.abs(d), 9))
        if k in seen:  # the same comparison in two files
            continue
        seen.add(k)
        r = paired_t(d)
        check((MAIN, key(*IV.search(fmt(r)).groups())) in five, f"{label}: {fmt(r)} is in no table")
        rows.append((label, r))
    readme, (wlabel, welch, wtext) = readme_comparisons()
    for label, d, text in readme:
        rows.append((label, paired_t(d)))
        check(fmt(rows[-1][1]) == text, f"{label}: the logs give {fmt(rows[-1][1])}, the README {text}")
    check(fmt(welch) == wtext, f"{wlabel}: the logs give {fmt(welch)}, the README {wtext}")
    rows.append((wlabel, welch))
    check(len(rows) == n_main, f"{len(rows)} comparisons recomputed, {n_main} counted")
    print(f"\n{len(rows)} main-score comparisons from metrics.csv, by |t| (* passes the bar):")
    for label, r in sorted(rows, key=lambda x: -abs(x[1]["t"])):
        mark = "*" if r["p"] < 0.05 / n_main else " "
        print(f"{mark} t = {r['t']:+6.2f} (df {r['df']:.1f}, p = {r['p']:.1e})  {fmt(r)}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
