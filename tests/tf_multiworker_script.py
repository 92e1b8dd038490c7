"""One worker of a 2-process ``MultiWorkerMirroredStrategy`` cluster on CPU (started by tests/multiworker.py).

``python tf_multiworker_script.py``: the layer under ``strategy.run``,
every step compared with the NumPy oracle on the concatenated global batch
(docs/SPEC.md, sections 3, 9 and 11):

- ``synchronized=True``: the oracle on the whole global batch;
- ``synchronized=False``: each replica normalizes its own examples, which is
  the oracle with ``microbatch_size`` = the per-replica batch (or the layer's
  own ``microbatch_size`` when it is smaller), and the
  same layer in one process with that ``microbatch_size`` on the concatenated
  batch;
- a last batch that leaves replica 1 with 0 examples.

Each worker checks its own share of the outputs and input gradients, the
gradients of gamma and beta summed over the workers, and its copy of the state.

``model.fit`` is not checked here: Keras 3 (3.15) cannot run it under
``MultiWorkerMirroredStrategy`` (keras-team/keras#20585; see the README).
"""

import os

import numpy as np
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TensorFlow op

from parity import assert_close  # noqa: E402

from renorm.numpy_ref import BatchRenormReference  # noqa: E402
from renorm.tf import BatchRenormalization  # noqa: E402

WORKER = strategy.cluster_resolver.task_id
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
assert WORKER == int(os.environ["MW_INDEX"])
OPTS = dict(momentum=0.5, rmax=1.2, dmax=0.3, warmup_steps=1, rmax_steps=3, dmax_steps=2)  # the schedule moves


def replica_train_step(layer):
    """``(x, dy) -> (y, dx, dgamma, dbeta)`` of ``sum(y * dy)``; gamma's and beta's summed over the workers."""

    def replica_fn(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
        return y, dx, dgamma, dbeta

    @tf.function
    def step(x, dy):
        y, dx, dgamma, dbeta = strategy.run(replica_fn, args=(x, dy))
        return (
            y,
            dx,
            strategy.reduce(tf.distribute.ReduceOp.SUM, dgamma, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, dbeta, axis=None),
        )

    return step


def shares(a, cuts):
    """Replica ``r`` gets ``a[cuts[r]:cuts[r + 1]]``."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(a[cuts[ctx.replica_id_in_sync_group] : cuts[ctx.replica_id_in_sync_group + 1]])
    )


def local(value):
    (v,) = strategy.experimental_local_results(value)
    return v.numpy()


def check_state(layer, ref, at):
    assert_close(local(layer.moving_mean), ref.mean, "float64", "value", f"{at}: moving_mean")
    assert_close(local(layer.moving_stddev), ref.stddev, "float64", "value", f"{at}: moving_stddev")
    assert int(local(layer.step)) == ref.step, (at, int(local(layer.step)), ref.step)
    assert np.isfinite(local(layer.moving_mean)).all() and np.isfinite(local(layer.moving_stddev)).all(), at


def layer_checks():
    rng = np.random.default_rng(0)
    steps = 4
    xs = [rng.normal(1.0, 2.0, (8, 2, 3)) * rng.uniform(0.5, 2, 3) for _ in range(steps)]
    dys = [rng.standard_normal((8, 2, 3)) for _ in range(steps)]
    cuts = (0, 4, 8)
    mine = slice(cuts[WORKER], cuts[WORKER + 1])

    # (layer options, oracle micro-batch size on the global batch)
    for kw, k in ((dict(synchronized=True), None), (dict(), 4), (dict(microbatch_size=2), 2)):
        with strategy.scope():
            layer = BatchRenormalization(dtype="float64", **OPTS, **kw)
            layer.build((None, 2, 3))
        ref = BatchRenormReference(3, epsilon=1e-3, microbatch_size=k, **OPTS)
        # The equivalence: one process (no strategy) with microbatch_size=k on the concatenated batch.
        single = None if k is None else BatchRenormalization(dtype="float64", microbatch_size=k, **OPTS)
        step = replica_train_step(layer)
        for t, (x, dy) in enumerate(zip(xs, dys)):
            y, dx, dgamma, dbeta = step(shares(x, cuts), shares(dy, cuts))
            y_ref = ref.train(x)
            dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy)
            at = f"worker {WORKER} {kw} step {t}"
            assert_close(local(y), y_ref[mine], "float64", "value", f"{at}: y")
            assert_close(local(dx), dx_ref[mine], "float64", "grad", f"{at}: dx")
            assert_close(dgamma.numpy(), dgamma_ref, "float64", "grad", f"{at}: dgamma")
            assert_close(dbeta.numpy(), dbeta_ref, "float64", "grad", f"{at}: dbeta")
            check_state(layer, ref, at)
            if single is not None:
                xt = tf.constant(x)
                with tf.GradientTape() as tape:
                    tape.watch(xt)
                    ys = single(xt, training=True)
                    loss = tf.reduce_sum(ys * dy)
                dxs, dgs = tape.gradient(loss, [xt, single.gamma])
                assert_close(local(y), ys.numpy()[mine], "float64", "value", f"{at}: y vs one process")
                assert_close(local(dx), dxs.numpy()[mine], "float64", "grad", f"{at}: dx vs one process")
                assert_close(dgamma.numpy(), dgs.numpy(), "float64", "grad", f"{at}: dgamma vs one process")
                assert_close(
                    local(layer.moving_mean),
                    single.moving_mean.numpy(),
                    "float64",
                    "value",
                    f"{at}: moving_mean vs one process",
                )
                assert_close(
                    local(layer.moving_stddev),
                    single.moving_stddev.numpy(),
                    "float64",
                    "value",
                    f"{at}: moving_stddev vs one process",
                )
        print("LAYER OK", kw, flush=True)

    # A last batch of 1 example: replica 0 gets it, replica 1 gets 0 examples (docs/SPEC.md, section 2).
    x = rng.normal(1.0, 2.0, (5, 2, 3)) * rng.uniform(0.5, 2, 3)
    dy = rng.standard_normal((5, 2, 3))
    for kw in (dict(synchronized=True), dict(microbatch_size=1), dict()):
        with strategy.scope():
            layer = BatchRenormalization(dtype="float64", **OPTS, **kw)
            layer.build((None, 2, 3))
        step = replica_train_step(layer)
        ref = BatchRenormReference(3, epsilon=1e-3, **OPTS)
        for cuts in ((0, 2, 4), (4, 5, 5)):
            ref.microbatch_size = kw.get("microbatch_size", None if kw else cuts[1] - cuts[0])
            old = ref.state
            y, dx, dgamma, dbeta = step(shares(x, cuts), shares(dy, cuts))
            sl = slice(cuts[0], cuts[2])
            y_ref = ref.train(x[sl])
            dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy[sl])
            if cuts[2] == cuts[1] and "synchronized" not in kw:
                # The empty replica keeps its old state, and the strategy averages the replicas' states.
                ref.mean, ref.stddev = (ref.mean + old["mean"]) / 2, (ref.stddev + old["stddev"]) / 2
            mine = slice(cuts[WORKER], cuts[WORKER + 1])
            at = f"worker {WORKER} uneven {kw} {cuts}"
            assert local(y).shape == x[mine].shape and local(dx).shape == x[mine].shape, at
            if cuts[WORKER + 1] > cuts[WORKER]:
                rel = slice(cuts[WORKER] - cuts[0], cuts[WORKER + 1] - cuts[0])
                assert_close(local(y), y_ref[rel], "float64", "value", f"{at}: y")
                assert_close(local(dx), dx_ref[rel], "float64", "grad", f"{at}: dx")
            assert_close(dgamma.numpy(), dgamma_ref, "float64", "grad", f"{at}: dgamma")
            assert_close(dbeta.numpy(), dbeta_ref, "float64", "grad", f"{at}: dbeta")
            check_state(layer, ref, at)
        print("UNEVEN OK", kw, flush=True)


if __name__ == "__main__":
    layer_checks()
