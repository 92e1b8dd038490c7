"""Layer suite, Keras on the JAX backend: renorm.keras.BatchRenormalization against keras.layers.BatchNormalization.

    python -m benchmarks.layers_keras_jax [--quick] [--out FILE]

Runs with ``KERAS_BACKEND=jax`` (set here, before Keras is imported; an
interpreter that already imported Keras with another backend is refused).
For each shape: training forward+backward (``jax.grad`` of ``sum(y * dy)``
through ``layer.stateless_call`` with respect to the input and the trainable
weights, the new non-trainable state returned) and inference forward, all
under ``jax.jit``, interleaved, as ratios to Keras' own batch norm of the
same run (``vs_baseline``; the issue's bound is 1.2x for the whole batch),
micro-batches also to our whole batch (``vs_whole``), and as multiples of
the floor, one fused ``x * a + b`` pass. Our explicit backward
(``explicit_gradient=True``, the default) and autodiff (``False``) are both
timed.
"""

from __future__ import annotations

import os
import sys

if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", "jax") != "jax":
    raise SystemExit("benchmarks.layers_keras_jax needs the JAX backend: run it in a fresh interpreter")
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine_info, markdown_table, measure, parse_args, summarize, write_results  # noqa: E402
from renorm.keras import BatchRenormalization  # noqa: E402

SHAPES = [(1600, 32, 32, 64), (1600, 16, 16, 128), (1600, 8, 8, 256), (4096, 1024)]
QUICK_SHAPES = [(64, 8, 8, 32), (256, 128)]
MICROBATCHES = [None, 4, 2]


def _train_fn(layer, x, dy):
    layer.build(x.shape)
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]

    def loss(tv, x, ntv):
        y, ntv = layer.stateless_call(tv, ntv, x, training=True)
        return jnp.vdot(y, dy), ntv

    step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    return lambda: step(tv, x, ntv)


def _infer_fn(layer, x):
    layer.build(x.shape)
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]
    f = jax.jit(lambda tv, ntv, x: layer.stateless_call(tv, ntv, x, training=False)[0])
    return lambda: f(tv, ntv, x)


def run(args):
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    rows, raw = [], {}
    floor_fn = jax.jit(lambda x, a, b: x * a + b)
    for shape in shapes:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        dy = jnp.asarray(rng.standard_normal(shape, np.float32))
        c = shape[-1]
        a, b = jnp.full((c,), 1.5, jnp.float32), jnp.full((c,), 0.5, jnp.float32)
        for mode in ("train", "infer"):
            cands = {"floor: x*a+b": lambda: floor_fn(x, a, b)}
            make = (lambda m: _train_fn(m, x, dy)) if mode == "train" else (lambda m: _infer_fn(m, x))
            cands["keras BN"] = make(keras.layers.BatchNormalization())
            cands["keras BN renorm"] = make(
                keras.layers.BatchNormalization(
                    renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}, renorm_momentum=0.99
                )
            )
            if mode == "train":
                for k in MICROBATCHES:
                    cands[f"renorm mb={k}"] = make(BatchRenormalization(microbatch_size=k))
                cands["renorm autodiff"] = make(BatchRenormalization(explicit_gradient=False))
            else:
                cands["renorm"] = make(BatchRenormalization())
            times = measure(cands, rounds=args.rounds, warmup=args.warmup, sync=jax.block_until_ready)
            summary = summarize(times, baseline="keras BN", floor="floor: x*a+b", whole="renorm mb=None")
            raw[f"{mode} {shape}"] = {"times_s": times, "summary": summary}
            for name, s in summary.items():
                rows.append({"shape": str(shape), "mode": mode, "candidate": name, **s})
                print(
                    f"{mode:5s} {str(shape):20s} {name:18s} {s['median_ms']:9.2f} ms  "
                    f"x{s.get('vs_baseline', float('nan')):.3f} of keras BN  "
                    f"x{s.get('vs_floor', float('nan')):.2f} of floor  spread {s['spread']:.2f}"
                    + (f"  x{s['vs_whole']:.2f} of whole batch" if "vs_whole" in s else ""),
                    flush=True,
                )
    table = markdown_table(
        rows, ["shape", "mode", "candidate", "median_ms", "spread", "vs_baseline", "vs_whole", "vs_floor"]
    )
    print(table)
    devices = [str(d) for d in jax.devices()]
    write_results(
        args.out,
        {
            "suite": "layers_keras_jax",
            "machine": machine_info(),
            "devices": devices,
            "jax": jax.__version__,
            "keras": keras.__version__,
            "keras_backend": "jax",
            "rounds": args.rounds,
            "rows": rows,
            "raw": raw,
            "table": table,
        },
        args,
    )


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0], "benchmarks/results/layers_keras_jax.json"))
