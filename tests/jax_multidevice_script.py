"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 and JAX_ENABLE_X64=1.

Pooled statistics (``axis_name``, ``axis_index_groups``) must equal those of the
concatenated global batch: compared with the NumPy oracle run on that batch.
Exits non-zero (an AssertionError) on any mismatch.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from parity import Case, assert_close, make_params, make_steps  # noqa: E402

from renorm.jax import BatchRenorm, BatchRenormConfig, BatchRenormState  # noqa: E402
from renorm.jax import functional as F  # noqa: E402
from renorm.numpy_ref import BatchRenormReference  # noqa: E402

assert jax.device_count() == 4, jax.devices()
assert jnp.ones(1, jnp.float64).dtype == jnp.float64

case = Case("pooled", (16, 2, 3), rmax=1.2, dmax=0.3)
p = make_params(case, 11)
xs, _, dys = make_steps(case, 11)
x, dy = jnp.asarray(xs[0]), jnp.asarray(dys[0])


def reference(x, dy, momentum=0.9):
    ref = BatchRenormReference(3, momentum=momentum, epsilon=1e-5, rmax=1.2, dmax=0.3, **p)
    y = ref.train(np.asarray(x))
    dx, dg, db = ref.backward(np.asarray(dy))
    return ref, y, dx, dg, db


params = {"scale": jnp.asarray(p["gamma"]), "bias": jnp.asarray(p["beta"])}
state = BatchRenormState(jnp.asarray(p["mean"]), jnp.asarray(p["stddev"]), jnp.zeros((), jnp.int32))

# 1. shard_map over 4 devices, functional core: outputs, state and gradients of the global batch.
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("b",))
for fast, explicit in ((False, True), (False, False), (True, True)):
    cfg = BatchRenormConfig(
        momentum=0.9, rmax=1.2, dmax=0.3, axis_name="b", use_fast_variance=fast, explicit_backward=explicit
    )

    def local(x, params, state):
        return F.train(x, params, state, cfg)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("b"), P(), P()), out_specs=(P("b"), P(), P()))

    def loss(x, params):
        y, new_state, diag = sharded(x, params, state)
        return jnp.sum(y * dy), (y, new_state, diag)

    (_, (y, new_state, diag)), (dx, dparams) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        x, params
    )
    ref, y_ref, dx_ref, dg_ref, db_ref = reference(x, dy)
    tol = "float64" if not fast else "float32"  # E[x^2]-E[x]^2 loses digits even in float64
    assert_close(y, y_ref, tol, "value", f"shard_map {fast=} {explicit=} y")
    assert_close(new_state.mean, ref.mean, tol, "value", f"shard_map {fast=} {explicit=} mean")
    assert_close(new_state.stddev, ref.stddev, tol, "value", f"shard_map {fast=} {explicit=} stddev")
    assert_close(dx, dx_ref, tol, "grad", f"shard_map {fast=} {explicit=} dx")
    assert_close(dparams["scale"], dg_ref, tol, "grad", f"shard_map {fast=} {explicit=} dscale")
    assert_close(dparams["bias"], db_ref, tol, "grad", f"shard_map {fast=} {explicit=} dbias")
    assert abs(float(diag.r_clipped) - ref.r_clipped) < 1e-6 and abs(float(diag.d_clipped) - ref.d_clipped) < 1e-6

# 2. pmap of the linen module with axis_index_groups [[0, 1], [2, 3]]: each half is its own global batch.
module = BatchRenorm(
    momentum=0.9, rmax=1.2, dmax=0.3, axis_name="batch", axis_index_groups=[[0, 1], [2, 3]], param_dtype=jnp.float64
)
variables = {"params": params, "batch_stats": state._asdict()}


def apply(variables, x):
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


rep = jax.tree.map(lambda a: jnp.stack([a] * 4), variables)
y, upd = jax.pmap(apply, axis_name="batch")(rep, x.reshape(4, 4, 2, 3))
for half in (0, 1):
    sl = slice(8 * half, 8 * half + 8)
    ref, y_ref, *_ = reference(x[sl], dy[sl])
    assert_close(y.reshape(16, 2, 3)[sl], y_ref, "float64", "value", f"pmap group {half} y")
    for dev in (2 * half, 2 * half + 1):
        assert_close(upd["batch_stats"]["mean"][dev], ref.mean, "float64", "value", "pmap mean")
        assert_close(upd["batch_stats"]["stddev"][dev], ref.stddev, "float64", "value", "pmap stddev")
        assert int(upd["batch_stats"]["step"][dev]) == 1

# 3. An empty global batch (every device's shard empty: shapes are equal on a mapped axis) is no step:
#    empty output, zero gradients, state unchanged, and no collective over empty devices (no NaN).
cfg = BatchRenormConfig(momentum=0.9, rmax=1.2, dmax=0.3, axis_name="b")
empty = jax.shard_map(
    lambda x, params, state: F.train(x, params, state, cfg),
    mesh=mesh,
    in_specs=(P("b"), P(), P()),
    out_specs=(P("b"), P(), P()),
)


def empty_loss(x, params):
    y, new_state, diag = empty(x, params, state)
    return jnp.sum(y), (y, new_state, diag)


x0 = jnp.zeros((0, 2, 3))
(_, (y, new_state, diag)), (dx, dparams) = jax.jit(jax.value_and_grad(empty_loss, argnums=(0, 1), has_aux=True))(
    x0, params
)
assert y.shape == (0, 2, 3) and dx.shape == (0, 2, 3) and bool(diag.finite)
jax.tree.map(np.testing.assert_array_equal, new_state, state)
jax.tree.map(lambda g: np.testing.assert_array_equal(g, np.zeros(3)), dparams)
y, upd = jax.pmap(apply, axis_name="batch")(rep, jnp.zeros((4, 0, 2, 3)))
assert y.shape == (4, 0, 2, 3)
jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.stack([b] * 4)), upd["batch_stats"], state._asdict())

# 4. The init of a module with axis_name works outside any mapped axis (as flax's BatchNorm).
v = module.init(jax.random.key(0), x, use_running_average=False)
assert int(v["batch_stats"]["step"]) == 0
# 5. A mask selecting different numbers of values on each device: the pooled sums and counts give the
#    statistics of the selected values of the global batch (docs/SPEC.md, section 3), both gradients.
rng = np.random.default_rng(12)
mask = rng.random((16, 2, 1)) < np.repeat([0.9, 0.6, 0.3, 0.8], 4)[:, None, None]
for explicit in (True, False):
    cfg = BatchRenormConfig(momentum=0.9, rmax=1.2, dmax=0.3, axis_name="b", explicit_backward=explicit)
    masked = jax.shard_map(
        lambda x, m, params, state: F.train(x, params, state, cfg, mask=m),
        mesh=mesh,
        in_specs=(P("b"), P("b"), P(), P()),
        out_specs=(P("b"), P(), P()),
    )

    def masked_loss(x, params):
        y, new_state, diag = masked(x, mask, params, state)
        return jnp.sum(y * dy), (y, new_state, diag)

    (_, (y, new_state, diag)), (dx, dparams) = jax.jit(jax.value_and_grad(masked_loss, argnums=(0, 1), has_aux=True))(
        x, params
    )
    ref = BatchRenormReference(3, momentum=0.9, epsilon=1e-5, rmax=1.2, dmax=0.3, **p)
    y_ref = ref.train(np.asarray(x), mask=mask)
    dx_ref, dg_ref, db_ref = ref.backward(np.asarray(dy))
    assert_close(y, y_ref, "float64", "value", f"masked {explicit=} y")
    assert_close(new_state.mean, ref.mean, "float64", "value", f"masked {explicit=} mean")
    assert_close(new_state.stddev, ref.stddev, "float64", "value", f"masked {explicit=} stddev")
    assert_close(dx, dx_ref, "float64", "grad", f"masked {explicit=} dx")
    assert_close(dparams["scale"], dg_ref, "float64", "grad", f"masked {explicit=} dscale")
print("multidevice OK")
