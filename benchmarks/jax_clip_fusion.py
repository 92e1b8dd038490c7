"""What bounds dense micro-batches in JAX on the CPU: the cost of clipping per-group vectors.

    python -m benchmarks.jax_clip_fusion [--rounds 30] [--out FILE]

On (4096, 1024) float32 with micro-batches of 2, the per-group statistics
are half the size of the input. This times, interleaved, the renorm
normalization of that input (statistics, corrections, ``(x - mu) * a + b``)
written with the correction unclipped, and clipped in several equivalent
ways, as ratios to plain micro-batch normalization. It also counts the
kernels (fusions) XLA compiles each into.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    device_results,
    machine_info,
    markdown_table,
    measure,
    parse_args,
    summarize,
    write_results,
)

SHAPE, K = (4096, 1024), 2
MODES = ["plain", "no clip", "jnp.clip", "minimum/maximum", "where", "abs formula"]


def normalize(x, mode):
    c = x.shape[-1]
    xg = x.reshape(-1, K, c)
    mu = jnp.mean(xg, 1, keepdims=True)
    var = jnp.mean(jnp.square(xg - mu), 1, keepdims=True)
    if mode == "plain":
        return ((xg - mu) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape)
    mean, std = jnp.zeros((c,)), jnp.ones((c,))
    sigma = jnp.sqrt(var + 1e-5)
    r, d = sigma / std, (mu - mean) / std
    lo, hi, dm = jnp.float32(1 / 3), jnp.float32(3.0), jnp.float32(5.0)
    if mode == "jnp.clip":
        r, d = jnp.clip(r, lo, hi), jnp.clip(d, -dm, dm)
    elif mode == "minimum/maximum":
        r, d = jnp.minimum(jnp.maximum(r, lo), hi), jnp.minimum(jnp.maximum(d, -dm), dm)
    elif mode == "where":
        r = jnp.where(r < lo, lo, jnp.where(r > hi, hi, r))
        d = jnp.where(d < -dm, -dm, jnp.where(d > dm, dm, d))
    elif mode == "abs formula":
        r = 0.5 * (jnp.abs(r - lo) - jnp.abs(r - hi) + (lo + hi))
        d = 0.5 * (jnp.abs(d + dm) - jnp.abs(d - dm))
    a = r / sigma
    return ((xg - mu) * a + d).reshape(x.shape)


def run(args):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE, np.float32))
    fns = {m: jax.jit(lambda x, m=m: normalize(x, m)) for m in MODES}
    kernels = {m: len(re.findall(r"\bfusion\(", f.lower(x).compile().as_text())) for m, f in fns.items()}
    times = measure(
        {m: (lambda f=f: f(x)) for m, f in fns.items()},
        rounds=args.rounds,
        warmup=args.warmup,
        sync=jax.block_until_ready,
    )
    summary = summarize(times, baseline="plain")
    rows = [{"variant": m, "kernels": kernels[m], **summary[m]} for m in MODES]
    table = markdown_table(rows, ["variant", "kernels", "median_ms", "spread", "vs_baseline"])
    print(table)
    write_results(
        args.out,
        {
            "suite": "jax_clip_fusion",
            "machine": machine_info(),
            "jax": jax.__version__,
            "shape": SHAPE,
            "microbatch_size": K,
            "rounds": args.rounds,
            "rows": rows,
            "table": table,
        },
        args,
    )


if __name__ == "__main__":
    run(
        parse_args(
            __doc__.splitlines()[0], device_results("benchmarks/results/jax_clip_fusion.json", jax.default_backend())
        )
    )
