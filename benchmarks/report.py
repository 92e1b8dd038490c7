"""The performance tables of docs/benchmarks.md, from the suites' JSON results.

    python -m benchmarks.report [--results benchmarks/results]

Reads ``layers_tf.json``, ``layers_jax.json``, ``layers_keras_jax.json``,
``step_tf.json`` and ``step_jax.json`` (whichever exist) and prints one Markdown table per suite:
every figure is a ratio of medians of paired, interleaved timings from one
run (``benchmarks/common.py``). Only full runs are reported: a file from a
partial run (``--quick``, ``--shapes``, ...; ``"full"`` not true) is skipped
with a note on stderr, so a table of tiny shapes never passes for the
suite's results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.common import DEFAULT_ROUNDS


def _rows(data):
    out = {}
    for r in data["rows"]:
        out[(r.get("shape") or r.get("batch"), r.get("mode", "train"), r["candidate"])] = r
    return out


def _fmt(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}x"


def layers_tf(data) -> str:
    rows = _rows(data)
    shapes = list(dict.fromkeys(r["shape"] for r in data["rows"]))
    head = (
        "| shape | train: renorm / fused op | Keras BN / fused op | Keras renorm / fused op | "
        "mb=4 / whole | mb=2 / whole | train, XLA: mb=2 / whole | infer: renorm / Keras BN | "
        "renorm train, in floor passes |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for s in shapes:

        def g(mode, cand, key="vs_baseline"):
            r = rows.get((s, mode, cand))
            return None if r is None else r.get(key)

        # Inference against Keras's own inference: both ratios are to the fused op of the same run.
        inf_ratio = None
        if g("infer", "renorm") is not None and g("infer", "keras BN") is not None:
            inf_ratio = g("infer", "renorm") / g("infer", "keras BN")
        lines.append(
            f"| {s} | {_fmt(g('train', 'renorm mb=None'))} | {_fmt(g('train', 'keras BN'))} | "
            f"{_fmt(g('train', 'keras BN renorm'))} | {_fmt(g('train', 'renorm mb=4', 'vs_whole'))} | "
            f"{_fmt(g('train', 'renorm mb=2', 'vs_whole'))} | {_fmt(g('train', 'renorm mb=2 xla', 'vs_whole'))} | "
            f"{_fmt(inf_ratio)} | {_fmt(g('train', 'renorm mb=None', 'vs_floor'), 1)} |"
        )
    return "\n".join(lines)


def layers_jax(data) -> str:
    rows = _rows(data)
    shapes = list(dict.fromkeys(r["shape"] for r in data["rows"]))
    lines = [
        "| shape | train: renorm / flax BN | mb=4 / whole | mb=2 / whole | infer: renorm / flax BN | "
        "flax BN train, in floor passes | renorm train, in floor passes |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in shapes:

        def g(mode, cand, key="vs_baseline"):
            r = rows.get((s, mode, cand))
            return None if r is None else r.get(key)

        lines.append(
            f"| {s} | {_fmt(g('train', 'renorm mb=None'))} | {_fmt(g('train', 'renorm mb=4', 'vs_whole'))} | "
            f"{_fmt(g('train', 'renorm mb=2', 'vs_whole'))} | {_fmt(g('infer', 'renorm'))} | "
            f"{_fmt(g('train', 'flax BatchNorm', 'vs_floor'), 1)} | "
            f"{_fmt(g('train', 'renorm mb=None', 'vs_floor'), 1)} |"
        )
    return "\n".join(lines)


def layers_keras_jax(data) -> str:
    """The Keras layer on the JAX backend against ``keras.layers.BatchNormalization`` (docs/keras.md, Speed)."""
    rows = _rows(data)
    shapes = list(dict.fromkeys(r["shape"] for r in data["rows"]))
    lines = [
        "| shape | train: renorm / Keras BN | autodiff / Keras BN | mb=4 / whole | mb=2 / whole | "
        "infer: renorm / Keras BN |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in shapes:

        def g(mode, cand, key="vs_baseline"):
            r = rows.get((s, mode, cand))
            return None if r is None else r.get(key)

        lines.append(
            f"| {s} | {_fmt(g('train', 'renorm mb=None'))} | {_fmt(g('train', 'renorm autodiff'))} | "
            f"{_fmt(g('train', 'renorm mb=4', 'vs_whole'))} | {_fmt(g('train', 'renorm mb=2', 'vs_whole'))} | "
            f"{_fmt(g('infer', 'renorm'))} |"
        )
    return "\n".join(lines)


def step(data, baseline: str) -> str:
    batches = list(dict.fromkeys(r["batch"] for r in data["rows"]))
    cands = list(dict.fromkeys(r["candidate"] for r in data["rows"]))
    rows = {(r["batch"], r["candidate"]): r for r in data["rows"]}
    lines = ["| batch | " + " | ".join(cands) + " |", "|---|" + "---|" * len(cands)]
    for b in batches:
        cells = []
        for c in cands:
            r = rows[(b, c)]
            cells.append(f"{r['vs_baseline']:.2f}x ({r['median_ms']:.0f} ms)")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return f"Ratios to {baseline}, width {data['rows'][0]['width']}:\n\n" + "\n".join(lines)


def command(name: str, data: dict) -> str:
    """The command that produced ``data``: as recorded, else the suite with its non-default rounds."""
    if data.get("command"):
        return data["command"]
    rounds = data.get("rounds", DEFAULT_ROUNDS)
    return f"python -m benchmarks.{name}" + ("" if rounds == DEFAULT_ROUNDS else f" --rounds {rounds}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="benchmarks/results", help="folder of the suites' JSON files")
    args = p.parse_args(argv)
    parts = {
        "layers_tf": ("TensorFlow layer suite (no XLA unless stated)", layers_tf),
        "layers_jax": ("JAX layer suite (jitted)", layers_jax),
        "layers_keras_jax": ("Keras layer on the JAX backend (jitted)", layers_keras_jax),
        "step_tf": ("TensorFlow training step of the reproduction's convnet", lambda d: step(d, "the fused BN op")),
        "step_jax": ("JAX (Flax) training step of the same convnet", lambda d: step(d, "flax.linen.BatchNorm")),
    }
    found = False
    for name, (title, fn) in parts.items():
        path = os.path.join(args.results, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        if data.get("full") is not True:
            print(
                f"skipping {path}: not a full run of the suite ({data.get('command', 'no command recorded')})",
                file=sys.stderr,
            )
            continue
        found = True
        m = data["machine"]
        print(
            f"#### {title}\n\n`{command(name, data)}` on {m['processor']}, {m['cpu_count']} cores "
            f"({data['rounds']} interleaved rounds per ratio).\n\n{fn(data)}\n"
        )
    if not found:
        raise SystemExit(f"no full-run results in {args.results!r}: run the suites first (see docs/benchmarks.md)")


if __name__ == "__main__":
    main()
