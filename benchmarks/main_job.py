"""The main job's wall time: the README's first command, ``renorm-repro run --preset digits``, from start to finding.

    python -m benchmarks.main_job [--baseline REV] [--rounds 2] [--quick] [--out FILE]

Runs the command as a user does (a fresh process: imports, data, 3 arms x 5 seeds, evaluations, the report) with
this checkout's code and with the code of git revision ``--baseline`` (checked out into a temporary worktree),
and with this checkout's code one run at a time (``--jobs 1``: what the worker processes of the default
``--jobs auto`` add), interleaved (the order rotates each round), and gives each one's wall times, the medians of
the per-round ratios this / baseline and this / one at a time (taken side by side, so load that lasts a round
cancels) and the machine's load average before and after each run: a time taken while other work shared the
cores is recorded as such, not presented as an idle machine's. The target (issue 34): at most 60 s on an idle
2-core machine.

``--quick`` (one round, seed 0 only) checks that the suite runs and writes to the git-ignored scratch folder.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, parse_args, write_results

ROOT = Path(__file__).resolve().parents[1]
#: The README's main job, after ``renorm-repro run`` (``--out`` is added per run).
COMMAND = ["--preset", "digits"]
#: The revision this benchmark was written against: the main job as it was at the start of issue 34's work.
DEFAULT_BASELINE = "a77ea63"


def _extra(p):
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with (default: %(default)s)")


#: The variants timed each round: the source tree (this checkout or the baseline's) and extra arguments.
VARIANTS = {"this": ("this", []), "this_jobs1": ("this", ["--jobs", "1"]), "baseline": ("baseline", [])}


def _run(src: Path, out: Path, quick: bool, extra=()) -> dict:
    """One run of the main job from source tree ``src`` into ``out``: wall time and the load around it."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-m", "renorm_repro.cli", "run", *COMMAND, *extra, "--out", str(out)]
    if quick:
        argv += ["--seeds", "0"]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run(argv, cwd=src, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"main_job: the run from {src} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    finding = res.stdout.strip().splitlines()[-1]
    return {
        "wall_s": wall,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "finding": finding,
    }


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], "benchmarks/results/main_job.json", argv, extra=_extra, kernels=False)
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline-src"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
            check=True,
            capture_output=True,
        )
        revision = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        try:
            runs = {name: [] for name in VARIANTS}
            names = list(VARIANTS)
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    tree, extra = VARIANTS[name]
                    src = ROOT if tree == "this" else base
                    runs[name].append(_run(src, tmp / f"{name}-{r}", args.quick, extra))
                    print(
                        f"round {r + 1}/{rounds} {name}: {runs[name][-1]['wall_s']:.1f} s "
                        f"(load {runs[name][-1]['load_before']} -> {runs[name][-1]['load_after']})",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)

    def ratio(a, b):
        return statistics.median(x["wall_s"] / y["wall_s"] for x, y in zip(runs[a], runs[b]))

    summary = {
        name: {
            "median_s": statistics.median(r["wall_s"] for r in rs),
            "min_s": min(r["wall_s"] for r in rs),
            "max_s": max(r["wall_s"] for r in rs),
        }
        for name, rs in runs.items()
    }
    over_baseline, over_jobs1 = ratio("this", "baseline"), ratio("this", "this_jobs1")
    same = {r["finding"] for r in runs["this"]} == {r["finding"] for r in runs["this_jobs1"]}
    print(
        f"this checkout: median {summary['this']['median_s']:.1f} s, one at a time (--jobs 1) "
        f"{summary['this_jobs1']['median_s']:.1f} s, "
        f"baseline {args.baseline}: {summary['baseline']['median_s']:.1f} s; "
        f"this / baseline {over_baseline:.2f}, this / one at a time {over_jobs1:.2f} "
        f"(medians of {rounds} rounds); this and one at a time found the same: {same}"
    )
    write_results(
        args.out,
        {
            "suite": "main_job",
            "job": "renorm-repro run " + " ".join(COMMAND) + (" --seeds 0" if args.quick else ""),
            "revision": revision,
            "baseline": args.baseline,
            "runs": runs,
            "summary": summary,
            "ratio_this_over_baseline": over_baseline,
            "ratio_this_over_jobs1": over_jobs1,
            "same_finding_as_jobs1": same,
            "machine": machine_info(),
        },
        args,
    )


if __name__ == "__main__":
    main()
