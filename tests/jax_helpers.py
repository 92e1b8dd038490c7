"""Helpers shared by the JAX test files: running the linen module and the oracle side by side."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from renorm import testing
from renorm.jax import BatchRenorm


def linen_module(case, momentum, epsilon=1e-5, param_dtype=jnp.float32, **kw):
    return BatchRenorm(
        momentum=momentum,
        epsilon=epsilon,
        use_bias=case.center,
        use_scale=case.scale,
        param_dtype=param_dtype,
        **case.layer_kwargs(),
        **kw,
    )


def oracle(case, momentum, p, epsilon=1e-5, dtype=np.float64):
    return testing.oracle(case, momentum=momentum, epsilon=epsilon, params=p, dtype=dtype)


def variables(case, p, param_dtype):
    params = {}
    if case.scale:
        params["scale"] = jnp.asarray(p["gamma"], param_dtype)
    if case.center:
        params["bias"] = jnp.asarray(p["beta"], param_dtype)
    stats = {
        "mean": jnp.asarray(p["mean"], param_dtype),
        "stddev": jnp.asarray(p["stddev"], param_dtype),
        "step": jnp.zeros((), jnp.int32),
    }
    return params, stats


@functools.cache
def train_step_fn(module):
    """Jitted ``(params, stats, x, dy) -> (y, dparams, dx, new_stats, intermediates)``.

    The gradients are the VJP of the output with cotangent ``dy``, i.e. the
    gradient of ``sum(y * dy)``. Cached per (hashable) module so that tests
    share one compilation per configuration.
    """

    @jax.jit
    def step(params, stats, x, dy):
        def fwd(params, x):
            y, upd = module.apply(
                {"params": params, "batch_stats": stats},
                x,
                use_running_average=False,
                mutable=["batch_stats", "intermediates"],
            )
            return y, upd

        y, vjp, upd = jax.vjp(fwd, params, x, has_aux=True)
        dparams, dx = vjp(dy.astype(y.dtype))
        return y, dparams, dx, upd["batch_stats"], upd["intermediates"]

    return step


@functools.cache
def infer_fn(module):
    @jax.jit
    def infer(params, stats, x):
        return module.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)

    return infer


def batch_norm_pair_inputs(shape, axis, seed):
    """float64 inputs for comparing rmax=1, dmax=0 with Flax's batch norm: x, dy, a mask, params, a moving mean."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal(shape))
    dy = jnp.asarray(rng.standard_normal(shape))
    c = shape[axis]
    mshape = list(shape)
    mshape[axis] = 1
    mask = jnp.asarray(rng.random(mshape) < 0.6)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c)), "bias": jnp.asarray(rng.normal(size=c))}
    return x, dy, mask, params, jnp.asarray(rng.normal(size=c))
