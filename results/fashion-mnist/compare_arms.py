"""Paired differences between arms of different pooled tables (``renorm-repro pool --table X.md`` writes ``X.json``).

``pool`` pairs arms by name, so the same arm (``brn``) under two schedules, each in its own pooled table, is
compared here: ``python results/fashion-mnist/compare_arms.py B.json:brn A.json:brn [--scalar test_last4]`` prints
``B - A`` per seed, the mean with its 95% t interval, the paired t and the seeds where B > A. A side may name its
own scalar, ``X.json:bn@test_precise_last4`` (e.g. batch norm with recomputed statistics against Batch Renorm's
``test_last4``); a folder's ``summary.json`` serves as well as a pooled table.
"""

from __future__ import annotations

import argparse
import json
import math

from renorm_repro.stats import paired_difference


def per_seed(spec: str, scalar: str) -> dict[int, float]:
    path, _, arm = spec.rpartition(":")
    arm, _, own = arm.partition("@")
    scalar = own or scalar
    with open(path) as f:
        arms = json.load(f)["arms"]
    if arm not in arms:
        raise SystemExit(f"compare_arms.py: {path} has no arm {arm!r} (it has {', '.join(arms)})")
    return {int(k): v for k, v in arms[arm]["scalars"][scalar]["per_seed"].items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("b", help="JSON:ARM[@SCALAR], the minuend")
    p.add_argument("a", help="JSON:ARM[@SCALAR], the subtrahend")
    p.add_argument("--scalar", action="append", help="default: test_last4 and val_last4")
    args = p.parse_args(argv)
    for scalar in args.scalar or (["test_last4"] if "@" in args.a + args.b else ["test_last4", "val_last4"]):
        d = paired_difference(per_seed(args.a, scalar), per_seed(args.b, scalar))
        t = d["mean"] / (d["sd"] / math.sqrt(d["n"])) if d["sd"] > 0 else math.inf
        diffs = " / ".join(f"{100 * x:+.2f}" for x in d["differences"])
        print(
            f"{scalar}: {diffs} | {100 * d['mean']:+.2f} [{100 * d['lo']:.2f}, {100 * d['hi']:.2f}], "
            f"{d['wins']}/{d['n']}, t = {t:.1f} (seeds {d['seeds']})"
        )


if __name__ == "__main__":
    main()
