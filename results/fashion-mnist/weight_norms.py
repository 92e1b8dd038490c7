"""The convolution kernels' norms at the end of each run, against its validation accuracy.

The reviewer's lead (issue 23): in the pilot runs that collapsed when wide limits opened, the 4th
convolution's kernel ended with a larger norm (35 against 28). A kernel followed by a normalization is
scale-invariant once the moving averages track it, so a larger norm means a smaller step in angle per
Adam update: a lower effective learning rate. This script reads the last checkpoint of every run under the
folders given (checkpoints are not committed: it reads what this machine still has) and prints, per run,
the Frobenius norm of each 4-D kernel (the convolutions, in order) and the validation accuracy (mean of the
last 4 evaluations), then the correlation over runs of each layer's norm with that accuracy.

Usage, from the repository root:
    python results/fashion-mnist/weight_norms.py results/fashion-mnist/sweep/iid-* results/fashion-mnist/final/iid-*
It reports a co-occurrence, not a cause.
"""

from __future__ import annotations

import csv
import glob
import os
import sys

import numpy as np


def run_norms(run_dir: str) -> tuple[int, list[float]] | None:
    import tensorflow as tf

    ckpt = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if ckpt is None:
        return None
    reader = tf.train.load_checkpoint(ckpt)
    kernels = []
    for key, shape in reader.get_variable_to_shape_map().items():
        # The model's trainable variables, as the optimizer tracks them, in creation order.
        if key.startswith("optimizer/_trainable_variables/") and len(shape) == 4:
            kernels.append((int(key.split("/")[2]), float(np.linalg.norm(reader.get_tensor(key)))))
    return int(ckpt.rsplit("-", 1)[1]), [norm for _, norm in sorted(kernels)]


def val_last4(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_accuracy")]
    return 100 * float(np.mean([float(r["val_accuracy"]) for r in rows[-4:]]))


def main(folders: list[str]) -> None:
    table = []
    # Runs are labelled from the folders' common parent, so sweep/iid-bn and final/iid-bn stay apart.
    base = os.path.commonpath([os.path.dirname(os.path.abspath(f.rstrip("/"))) for f in folders])
    for folder in folders:
        for run in sorted(glob.glob(os.path.join(folder, "runs", "*", "seed*"))):
            if not os.path.exists(os.path.join(run, "done.json")):
                continue
            got = run_norms(run)
            if got is None:
                continue
            step, norms = got
            table.append((os.path.relpath(os.path.abspath(run), base), step, norms, val_last4(run)))
    if not table:
        sys.exit("weight_norms.py: no finished run with a checkpoint under " + " ".join(folders))
    layers = len(table[0][2])
    print("| run | step | " + " | ".join(f"conv{i + 1} norm" for i in range(layers)) + " | validation, last 4 (%) |")
    print("| --- | --- | " + " | ".join("---" for _ in range(layers)) + " | --- |")
    for run, step, norms, val in table:
        print(f"| {run} | {step} | " + " | ".join(f"{n:.2f}" for n in norms) + f" | {val:.2f} |")
    vals = np.array([t[3] for t in table])
    print()
    for i in range(layers):
        norms = np.array([t[2][i] for t in table])
        r = np.corrcoef(norms, vals)[0, 1]
        print(f"conv{i + 1}: norm {norms.min():.2f}-{norms.max():.2f}, Pearson r with validation accuracy "
              f"over {len(table)} runs: {r:+.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
