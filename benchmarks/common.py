"""Framework-free benchmark harness: interleaved runs, medians, paired ratios, tables.

The machines here are shared and noisy, so no absolute time is trusted on
its own: candidates run interleaved (A B C A B C ...) after a warm-up, and
every ratio is the median of the per-round ratios taken side by side within
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence


def measure(candidates: Dict[str, Callable[[], object]], *, rounds: int, warmup: int,
            sync: Callable[[object], object] = lambda out: out) -> Dict[str, List[float]]:
    """Times of each candidate over ``rounds`` interleaved rounds, in seconds.

    Each candidate runs ``warmup`` times first (tracing, compilation, caches).
    ``sync(out)`` must block until the candidate's result is computed.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            sync(fn())
    times: Dict[str, List[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        # Alternate the order so that no candidate always runs right after the same one.
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            sync(candidates[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: Dict[str, List[float]], baseline: Optional[str] = None, floor: Optional[str] = None) -> Dict[str, dict]:
    """Median, spread (interquartile range / median) and paired ratios per candidate."""
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        med = statistics.median(ts)
        row = {"median_ms": 1e3 * med, "spread": (q[2] - q[0]) / med if med else 0.0, "n": len(ts)}
        for key, ref in (("vs_baseline", baseline), ("vs_floor", floor)):
            if ref is not None and ref in times:
                row[key] = statistics.median(a / b for a, b in zip(ts, times[ref]))
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
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def parse_args(description: str, default_out: str, argv=None, extra: Callable | None = None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help="JSON file for the results (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds per group (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per candidate first (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small shapes: a check that the suite runs")
    p.add_argument("--shapes", default=None,
                   help="only these shapes, e.g. '1600,8,8,256;4096,1024' (default: the suite's list)")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    if args.shapes:
        try:
            args.shapes = [tuple(int(d) for d in part.split(",")) for part in args.shapes.split(";") if part]
        except ValueError:
            p.error(f"--shapes must look like '1600,8,8,256;4096,1024', got --shapes {args.shapes!r}")
    if args.rounds < 1 or args.warmup < 0:
        p.error(f"--rounds must be >= 1 and --warmup >= 0, got --rounds {args.rounds} --warmup {args.warmup}")
    return args


def write_results(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
