"""Layer suite, JAX: renorm.jax.BatchRenorm against flax.linen.BatchNorm, side by side.

    python -m benchmarks.layers_jax [--quick] [--out FILE]

For each shape: training forward+backward (gradient of sum(y * dy) with
respect to the input and the parameters, moving statistics updated) and
inference forward, all jitted, interleaved, and as multiples of the floor:
one fused element-wise pass ``x * a + b`` over the same tensor (XLA fuses
it into one kernel: one read and one write, the least memory traffic any
normalization needs in inference; training needs several: reading x for the moments, reading x and writing y,
then reading dy and x twice and writing dx).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks.common import (
    device_results,
    machine_info,
    markdown_table,
    measure,
    parse_args,
    summarize,
    write_results,
)
from renorm.jax import BatchRenorm

SHAPES = [(1600, 32, 32, 64), (1600, 16, 16, 128), (1600, 8, 8, 256), (4096, 1024)]
QUICK_SHAPES = [(64, 8, 8, 32), (256, 128)]
MICROBATCHES = [None, 4, 2]


def _train_fn(module, x, dy):
    variables = module.init(jax.random.PRNGKey(0), x, use_running_average=True)
    params, stats = variables["params"], variables["batch_stats"]

    def loss(params, x, stats):
        y, upd = module.apply(
            {"params": params, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.vdot(y, dy), upd["batch_stats"]

    step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    return lambda: step(params, x, stats)


def _infer_fn(module, x):
    variables = module.init(jax.random.PRNGKey(0), x, use_running_average=True)
    f = jax.jit(lambda v, x: module.apply(v, x, use_running_average=True))
    return lambda: f(variables, x)


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
            cands["flax BatchNorm"] = make(nn.BatchNorm())
            if mode == "train":
                for k in MICROBATCHES:
                    cands[f"renorm mb={k}"] = make(BatchRenorm(microbatch_size=k))
            else:
                cands["renorm"] = make(BatchRenorm())
            times = measure(cands, rounds=args.rounds, warmup=args.warmup, sync=jax.block_until_ready)
            summary = summarize(times, baseline="flax BatchNorm", floor="floor: x*a+b", whole="renorm mb=None")
            raw[f"{mode} {shape}"] = {"times_s": times, "summary": summary}
            for name, s in summary.items():
                rows.append({"shape": str(shape), "mode": mode, "candidate": name, **s})
                print(
                    f"{mode:5s} {str(shape):20s} {name:18s} {s['median_ms']:9.2f} ms  "
                    f"x{s.get('vs_baseline', float('nan')):.3f} of BN  "
                    f"x{s.get('vs_floor', float('nan')):.2f} of floor"
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
            "suite": "layers_jax",
            "machine": machine_info(),
            "devices": devices,
            "jax": jax.__version__,
            "rounds": args.rounds,
            "rows": rows,
            "raw": raw,
            "table": table,
        },
        args,
    )


if __name__ == "__main__":
    run(
        parse_args(__doc__.splitlines()[0], device_results("benchmarks/results/layers_jax.json", jax.default_backend()))
    )
