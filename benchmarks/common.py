"""Framework-free benchmark harness: interleaved runs, medians, paired ratios, tables.

The machines here are shared and noisy, so no absolute time is trusted on
its own: candidates run interleaved (A B C A B C ...) after a warm-up, and
every ratio is the median of the per-round ratios taken side by side within
one run.

A full run of a suite writes ``benchmarks/results/<suite>.json``, the
committed results that ``benchmarks.report`` turns into the tables of docs/benchmarks.md.
A partial run (``--quick``, ``--shapes``, ``--batches``, ``--width``,
``--no-xla``) writes ``benchmarks/results/scratch/<suite>.json``, which git
ignores, and is marked ``"full": false`` so that the report skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence


def measure(
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int,
    sync: Callable[[object], object] = lambda out: out,
) -> dict[str, list[float]]:
    """Times of each candidate over ``rounds`` interleaved rounds, in seconds.

    Each candidate runs ``warmup`` times first (tracing, compilation, caches).
    ``sync(out)`` must block until the candidate's result is computed.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            sync(fn())
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        # Alternate the order so that no candidate always runs right after the same one.
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            sync(candidates[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``time(a) / time(b)``, both timed in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def summarize(
    times: dict[str, list[float]], baseline: str | None = None, floor: str | None = None, whole: str | None = None
) -> dict[str, dict]:
    """Median, spread (interquartile range / median) and paired ratios per candidate.

    ``vs_baseline``, ``vs_floor`` and (for micro-batch candidates, whose name
    contains ``mb=`` but not ``mb=None``) ``vs_whole`` are ratios to the
    candidates named ``baseline``, ``floor`` and ``whole``.
    """
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        med = statistics.median(ts)
        row = {"median_ms": 1e3 * med, "spread": (q[2] - q[0]) / med if med else 0.0, "n": len(ts)}
        for key, ref in (("vs_baseline", baseline), ("vs_floor", floor)):
            if ref is not None and ref in times:
                row[key] = paired_ratio(times, name, ref)
        if whole is not None and whole in times and "mb=" in name and "mb=None" not in name:
            row["vs_whole"] = paired_ratio(times, name, whole)
        out[name] = row
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def machine_info() -> dict:
    """The machine, and how loaded it was: the 1, 5 and 15-minute load averages when this is called (at the end
    of a run, so the 5-minute one covers a short suite); a load above ``cpu_count`` means the run shared the
    cores with other work."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


#: Default number of interleaved timed rounds (``--rounds``).
DEFAULT_ROUNDS = 7

#: Options that change what a suite measures (shapes, candidates). A run that
#: leaves all of them at their defaults is a *full* run; any other is partial.
SCOPE_OPTIONS = ("quick", "shapes", "batches", "width", "no_xla")

#: Where partial runs write by default (git-ignored), relative to the
#: folder of the committed results.
SCRATCH = "scratch"


def device_results(path: str, platform: str) -> str:
    """The committed results of a suite run on ``platform`` (``cpu``, ``gpu``, ...): a GPU's never replace the CPU's.

    >>> device_results("benchmarks/results/layers_jax.json", "gpu")
    'benchmarks/results/layers_jax-gpu.json'
    >>> device_results("benchmarks/results/layers_jax.json", "cpu")
    'benchmarks/results/layers_jax.json'
    """
    return path if platform == "cpu" else path.removesuffix(".json") + f"-{platform}.json"


def scratch_path(default_out: str) -> str:
    """Where a partial run of the suite whose full results are ``default_out`` writes."""
    return os.path.join(os.path.dirname(default_out), SCRATCH, os.path.basename(default_out))


def parse_args(description: str, default_out: str, argv=None, extra: Callable | None = None, kernels: bool = True):
    """The suites' command line (``kernels=False``: a suite that times whole commands, without ``--warmup`` and
    ``--shapes``).

    ``default_out`` is the committed results file of the suite. Only a full
    run (every option of :data:`SCOPE_OPTIONS` at its default) writes there
    by default; ``--quick`` and the other partial runs write to
    :func:`scratch_path` instead, and cannot be sent to ``default_out`` even
    with ``--out``, so that a check that a suite runs never replaces the
    measured results. Sets ``args.full`` and ``args.command`` (for the JSON).
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON file for the results (default: {default_out} for a full run, "
        f"{scratch_path(default_out)} (git-ignored) for --quick and other partial runs)",
    )
    p.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved timed rounds per group (default: %(default)s)"
    )
    if kernels:
        p.add_argument("--warmup", type=int, default=2, help="untimed runs per candidate first (default: %(default)s)")
    p.add_argument(
        "--quick", action="store_true", help="small shapes: a check that the suite runs (writes to the scratch folder)"
    )
    if kernels:
        p.add_argument(
            "--shapes",
            default=None,
            help="only these shapes, e.g. '1600,8,8,256;4096,1024' (default: the suite's list)",
        )
    if extra:
        extra(p)
    args = p.parse_args(argv)
    if not kernels:
        args.shapes, args.warmup = None, 0
    if args.shapes:
        try:
            args.shapes = [tuple(int(d) for d in part.split(",")) for part in args.shapes.split(";") if part]
        except ValueError:
            p.error(f"--shapes must look like '1600,8,8,256;4096,1024', got --shapes {args.shapes!r}")
    if args.rounds < 1 or args.warmup < 0:
        p.error(f"--rounds must be >= 1 and --warmup >= 0, got --rounds {args.rounds} --warmup {args.warmup}")
    changed = [k for k in SCOPE_OPTIONS if hasattr(args, k) and getattr(args, k) != p.get_default(k)]
    args.full = not changed
    if args.out is None:
        args.out = default_out if args.full else scratch_path(default_out)
    elif not args.full and os.path.abspath(args.out) == os.path.abspath(default_out):
        p.error(
            f"{default_out} holds the full run's results; a partial run "
            f"({', '.join('--' + k.replace('_', '-') for k in changed)}) cannot replace them: "
            f"leave out --out (it then writes {scratch_path(default_out)}) or choose another file"
        )
    suite = os.path.splitext(os.path.basename(default_out))[0]
    given = sys.argv[1:] if argv is None else list(argv)
    args.command = " ".join(["python", "-m", f"benchmarks.{suite}"] + given)
    return args


def write_results(path: str, payload: dict, args=None) -> None:
    """Write ``payload`` as JSON; with ``args``, record whether the run was full and its command."""
    if args is not None:
        payload = {**payload, "full": args.full, "command": args.command}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def run_step_suite(
    args, *, suite: str, norms: dict, step_fn: Callable, baseline: str, sync=lambda out: out, extra: dict | None = None
) -> None:
    """Time one training step per normalization, per batch size; print and save the table.

    ``step_fn(norm, batch, width)`` returns a no-argument callable running one
    step. Ratios are to ``baseline`` and to the step without normalization
    (``"none"``), within one run.
    """
    batches = [64] if args.quick else args.batches
    width = 4 if args.quick else args.width
    rows, raw = [], {}
    for batch in batches:
        cands = {name: step_fn(norm, batch, width) for name, norm in norms.items()}
        times = measure(cands, rounds=args.rounds, warmup=args.warmup, sync=sync)
        summary = summarize(times, baseline=baseline, floor="none")
        raw[f"batch {batch}"] = {"times_s": times, "summary": summary}
        for name, s in summary.items():
            rows.append({"batch": batch, "width": width, "candidate": name, **s})
            print(
                f"batch {batch:5d} {name:18s} {s['median_ms']:9.1f} ms  x{s['vs_baseline']:.3f} of {baseline}  "
                f"x{s['vs_floor']:.3f} of no norm",
                flush=True,
            )
    table = markdown_table(rows, ["batch", "width", "candidate", "median_ms", "spread", "vs_baseline", "vs_floor"])
    print(table)
    write_results(
        args.out,
        {
            "suite": suite,
            "machine": machine_info(),
            **(extra or {}),
            "rounds": args.rounds,
            "rows": rows,
            "raw": raw,
            "table": table,
        },
        args,
    )


def step_suite_args(p) -> None:
    """The step suites' extra command-line options."""
    p.add_argument("--width", type=int, default=32, help="convnet width (the seed preset's: %(default)s)")
    p.add_argument(
        "--batches",
        type=lambda s: [int(b) for b in s.split(",")],
        default=[1600, 256],
        help="comma-separated batch sizes (default: 1600,256)",
    )
