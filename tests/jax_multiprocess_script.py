"""One of 2 JAX processes (``jax.distributed`` on 127.0.0.1, CPU, Gloo collectives), started by tests/multiworker.py.

Each process has one CPU device; the mesh spans both processes. Compared with
the NumPy oracle on the concatenated global batch at every step (docs/SPEC.md,
sections 9 and 11):

1. ``axis_name`` pools the moments over the processes (functional core with
   the explicit backward and with autodiff, and the linen module): outputs,
   gradients, state and diagnostics are those of the global batch.
2. Without ``axis_name`` each process normalizes its own micro-batches and the
   mapped function averages the state with ``lax.pmean`` (as Flax's ImageNet
   example does): the same as one process with ``microbatch_size`` on the
   concatenated batch, checked against the oracle and against
   ``functional.train`` run on the whole batch in this process.

Needs ``JAX_ENABLE_X64=1``; exits non-zero on any mismatch.
"""

import os
import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
try:  # Gloo listens on the address of the machine's hostname unless told: keep it on loopback.
    from jax._src.lib import _jax

    _make_gloo = _jax.make_gloo_tcp_collectives
    _jax.make_gloo_tcp_collectives = lambda distributed_client: _make_gloo(
        distributed_client=distributed_client, hostname="127.0.0.1"
    )
except (ImportError, AttributeError):  # another jaxlib layout: Gloo's default address then
    pass

INDEX, COUNT = int(os.environ["MW_INDEX"]), int(os.environ["MW_COUNT"])
COORDINATOR = os.environ["JAX_COORDINATOR_ADDRESS"]
jax.distributed.initialize(
    coordinator_address=COORDINATOR,
    num_processes=COUNT,
    process_id=INDEX,
    coordinator_bind_address=COORDINATOR,
    initialization_timeout=120,
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity import assert_close  # noqa: E402

from renorm.jax import BatchRenorm, BatchRenormConfig, BatchRenormState  # noqa: E402
from renorm.jax import functional as F  # noqa: E402
from renorm.numpy_ref import BatchRenormReference  # noqa: E402

assert jax.process_count() == COUNT == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
assert jnp.ones(1, jnp.float64).dtype == jnp.float64, "run with JAX_ENABLE_X64=1"

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("b",))
B, PER = 8, 4
mine = slice(INDEX * PER, (INDEX + 1) * PER)
OPTS = dict(momentum=0.5, rmax=1.2, dmax=0.3, warmup_steps=1, rmax_steps=3, dmax_steps=2)
rng = np.random.default_rng(3)
xs = [rng.normal(1.0, 2.0, (B, 2, 3)) * rng.uniform(0.5, 2, 3) for _ in range(3)]
dys = [rng.standard_normal((B, 2, 3)) for _ in range(3)]
gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
mean0, std0 = rng.normal(size=3), rng.uniform(0.5, 2, 3)


def global_batch(a):
    """The global array whose rows ``mine`` live in this process."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("b")), a[mine], a.shape)


def local(a):
    """This process's part of a global array (all of it when replicated)."""
    return np.asarray(a.addressable_shards[0].data)


def oracle(microbatch_size=None):
    return BatchRenormReference(
        3, epsilon=1e-5, microbatch_size=microbatch_size, gamma=gamma, beta=beta, mean=mean0, stddev=std0, **OPTS
    )


def train_mapped(fn, cfg, label, microbatch_size=None, one_process=None):
    """``fn(x, params, state) -> (y, state, (r_clipped, d_clipped))`` mapped over the 2 processes.

    Every step is checked against the oracle.
    """
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P("b"), P(), P()), out_specs=(P("b"), P(), P()))

    @jax.jit
    def step(x, dy, params, state):
        def loss(x, params):
            y, new_state, diag = sharded(x, params, state)
            return jnp.sum(y * dy), (y, new_state, diag)

        (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
        return aux, grads

    ref = oracle(microbatch_size)
    params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
    state = BatchRenormState(jnp.asarray(mean0), jnp.asarray(std0), jnp.zeros((), jnp.int32))
    single = state
    for t, (x, dy) in enumerate(zip(xs, dys)):
        (y, state, diag), (dx, dparams) = step(global_batch(x), global_batch(dy), params, state)
        y_ref = ref.train(x)
        dx_ref, dg_ref, db_ref = ref.backward(dy)
        at = f"process {INDEX} {label} step {t}"
        assert_close(local(y), y_ref[mine], "float64", "value", f"{at}: y")
        assert_close(local(dx), dx_ref[mine], "float64", "grad", f"{at}: dx")
        assert_close(local(dparams["scale"]), dg_ref, "float64", "grad", f"{at}: dscale")
        assert_close(local(dparams["bias"]), db_ref, "float64", "grad", f"{at}: dbias")
        assert_close(local(state.mean), ref.mean, "float64", "value", f"{at}: mean")
        assert_close(local(state.stddev), ref.stddev, "float64", "value", f"{at}: stddev")
        assert int(np.round(local(state.step))) == ref.step, (at, local(state.step), ref.step)
        r_clipped, d_clipped = float(local(diag[0])), float(local(diag[1]))
        assert abs(r_clipped - ref.r_clipped) < 1e-6 and abs(d_clipped - ref.d_clipped) < 1e-6, (
            at,
            r_clipped,
            d_clipped,
            ref.r_clipped,
            ref.d_clipped,
        )
        if one_process is not None:
            # The same step in this process alone, on the whole batch, with microbatch_size (no mesh).
            def loss1(x, params):
                y, new_state, _ = F.train(x, params, single, one_process)
                return jnp.sum(y * dy), (y, new_state)

            (_, (y1, single)), (dx1, dp1) = jax.value_and_grad(loss1, argnums=(0, 1), has_aux=True)(
                jnp.asarray(x), jax.tree.map(local, params)
            )
            assert_close(local(y), np.asarray(y1)[mine], "float64", "value", f"{at}: y vs one process")
            assert_close(local(dx), np.asarray(dx1)[mine], "float64", "grad", f"{at}: dx vs one process")
            assert_close(local(dparams["scale"]), dp1["scale"], "float64", "grad", f"{at}: dscale vs one process")
            assert_close(local(state.mean), single.mean, "float64", "value", f"{at}: mean vs one process")
            assert_close(local(state.stddev), single.stddev, "float64", "value", f"{at}: stddev vs one process")
    print("OK", label, flush=True)


def clip_fractions(out):
    y, state, diag = out
    return y, state, (diag.r_clipped, diag.d_clipped)


# 1. Pooled statistics (axis_name): the global batch.
for explicit in (True, False):
    cfg = BatchRenormConfig(axis_name="b", explicit_backward=explicit, **OPTS)
    train_mapped(lambda x, p, s, cfg=cfg: clip_fractions(F.train(x, p, s, cfg)), cfg, f"pooled explicit={explicit}")

module = BatchRenorm(axis_name="b", param_dtype=jnp.float64, **OPTS)


def linen_step(x, params, state):
    out, upd = module.apply(
        {"params": params, "batch_stats": state._asdict()},
        x,
        use_running_average=False,
        mutable=["batch_stats", "intermediates"],
    )
    inter = upd["intermediates"]
    return out, BatchRenormState(**upd["batch_stats"]), (inter["r_clipped"][0], inter["d_clipped"][0])


train_mapped(linen_step, None, "pooled linen")

# 2. Per-process micro-batches, state averaged with pmean: one process with microbatch_size on the global batch.
for k in (PER, 2):
    cfg = BatchRenormConfig(microbatch_size=k, **OPTS)

    def per_process(x, p, s, cfg=cfg):
        y, new_state, diag = F.train(x, p, s, cfg)
        new_state = BatchRenormState(
            jax.lax.pmean(new_state.mean, "b"), jax.lax.pmean(new_state.stddev, "b"), new_state.step
        )
        return y, new_state, (jax.lax.pmean(diag.r_clipped, "b"), jax.lax.pmean(diag.d_clipped, "b"))

    train_mapped(per_process, cfg, f"per-process microbatch_size={k}", microbatch_size=k, one_process=cfg)

jax.distributed.shutdown()
print("multiprocess OK", INDEX, flush=True)
