"""Whether a rerun trained exactly as a committed folder did: every column the two ``metrics.csv`` share, but the wall
time, equal row by row, for every run (arm, seed) of the rerun.

    python results/fashion-mnist/same_training.py RERUN COMMITTED [RERUN COMMITTED ...]

A precise-BN rerun (``--precise-bn-batches``) adds evaluation columns and must change nothing else: the training
it evaluates is the committed folder's, bit for bit. Prints one line per run and exits 1 if any differs.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

IGNORED = {"elapsed_s"}  # the wall time differs from run to run


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare(rerun: Path, committed: Path) -> list[str]:
    """One line per run of ``rerun``: ``same`` with the columns compared, or the first difference."""
    lines = []
    runs = sorted(rerun.glob("runs/*/seed*/metrics.csv"))
    if not runs:
        raise SystemExit(f"same_training.py: {rerun} has no runs/*/seed*/metrics.csv")
    for new in runs:
        run = new.relative_to(rerun).parent
        old = committed / run / "metrics.csv"
        if not old.is_file():
            lines.append(f"DIFFERS {rerun.name}/{run}: {committed.name} has no such run")
            continue
        a, b = _rows(new), _rows(old)
        shared = [c for c in (a[0] if a else {}) if c in (b[0] if b else {}) and c not in IGNORED]
        if len(a) != len(b):
            lines.append(f"DIFFERS {rerun.name}/{run}: {len(a)} rows against {len(b)}")
            continue
        bad = next(((i, c) for i, (x, y) in enumerate(zip(a, b)) for c in shared if x[c] != y[c]), None)
        if bad is None:
            lines.append(f"same {rerun.name}/{run}: {len(shared)} columns x {len(a)} rows equal {committed.name}'s")
        else:
            i, c = bad
            lines.append(f"DIFFERS {rerun.name}/{run}: row {i + 1}, {c}: {a[i][c]} against {b[i][c]}")
    return lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or len(args) % 2:
        raise SystemExit(__doc__.split("\n\n")[1].strip())
    lines = []
    for rerun, committed in zip(args[::2], args[1::2]):
        lines += compare(Path(rerun), Path(committed))
    print("\n".join(lines))
    return 1 if any(ln.startswith("DIFFERS") for ln in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
