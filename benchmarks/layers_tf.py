"""Layer suite, TensorFlow: renorm.tf.BatchRenormalization against Keras and the fused op.

    python -m benchmarks.layers_tf [--quick] [--no-xla] [--out FILE]

For each shape: training forward+backward (gradient of sum(y * dy) with
respect to the input and the layer's trainable weights, moving statistics
updated) and inference forward, each in a ``tf.function``, with and without
XLA (``jit_compile``), interleaved, as ratios to the fused batch-norm op
(``tf.compat.v1.nn.fused_batch_norm``, the fastest batch norm TensorFlow
has), micro-batches also to our own whole-batch time (``vs_whole``), and as
multiples of the floor: one element-wise kernel ``x * a`` (one read and one
write of the tensor).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.common import machine_info, markdown_table, measure, parse_args, summarize, write_results  # noqa: E402
from benchmarks.tf_fused import FusedBatchNorm  # noqa: E402
from renorm.tf import BatchRenormalization  # noqa: E402

SHAPES = [(1600, 32, 32, 64), (1600, 16, 16, 128), (1600, 8, 8, 256), (4096, 1024)]
QUICK_SHAPES = [(64, 8, 8, 32), (256, 128)]
MICROBATCHES = [None, 4, 2]


def _layer_train(layer, x, dy, jit):
    layer.build(x.shape)

    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return tape.gradient(loss, [x] + layer.trainable_variables)

    return lambda: step(x)


def _layer_infer(layer, x, jit):
    layer.build(x.shape)
    f = tf.function(lambda x: layer(x, training=False), jit_compile=jit)
    return lambda: f(x)


def run(args):
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    jits = [False] if args.no_xla else [False, True]
    rows, raw = [], {}
    for shape in shapes:
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal(shape, np.float32))
        dy = tf.constant(rng.standard_normal(shape, np.float32))
        c = shape[-1]
        a = tf.fill([c], 1.5)
        floor = tf.function(lambda x: x * a)  # one kernel: one read and one write of the tensor
        for mode in ("train", "infer"):
            for jit in jits:
                xla = " xla" if jit else ""

                def make(layer):
                    return _layer_train(layer, x, dy, jit) if mode == "train" else _layer_infer(layer, x, jit)

                cands = {"floor: x*a": lambda: floor(x)}
                if not jit:  # the fused op has no XLA kernel of its own; XLA lowers it differently
                    cands["fused_batch_norm"] = make(FusedBatchNorm())
                cands[f"keras BN{xla}"] = make(keras.layers.BatchNormalization())
                cands[f"keras BN renorm{xla}"] = make(
                    keras.layers.BatchNormalization(
                        renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}, renorm_momentum=0.99
                    )
                )
                if mode == "train":
                    for k in MICROBATCHES:
                        cands[f"renorm mb={k}{xla}"] = make(BatchRenormalization(microbatch_size=k))
                else:
                    cands[f"renorm{xla}"] = make(BatchRenormalization())
                times = measure(cands, rounds=args.rounds, warmup=args.warmup)
                base = "fused_batch_norm" if "fused_batch_norm" in cands else f"keras BN{xla}"
                summary = summarize(times, baseline=base, floor="floor: x*a", whole=f"renorm mb=None{xla}")
                raw[f"{mode}{xla} {shape}"] = {"times_s": times, "summary": summary, "baseline": base}
                for name, s in summary.items():
                    rows.append({"shape": str(shape), "mode": mode, "candidate": name, "baseline": base, **s})
                    print(
                        f"{mode:5s} {str(shape):20s} {name:24s} {s['median_ms']:9.2f} ms  "
                        f"x{s.get('vs_baseline', float('nan')):.3f} of {base}  "
                        f"x{s.get('vs_floor', float('nan')):.2f} of floor"
                        + (f"  x{s['vs_whole']:.2f} of whole batch" if "vs_whole" in s else ""),
                        flush=True,
                    )
    table = markdown_table(
        rows, ["shape", "mode", "candidate", "median_ms", "spread", "baseline", "vs_baseline", "vs_whole", "vs_floor"]
    )
    print(table)
    write_results(
        args.out,
        {
            "suite": "layers_tf",
            "machine": machine_info(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "rounds": args.rounds,
            "rows": rows,
            "raw": raw,
            "table": table,
        },
        args,
    )


def _extra(p):
    p.add_argument("--no-xla", action="store_true", help="skip the jit_compile=True variants")


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0], "benchmarks/results/layers_tf.json", extra=_extra))
