"""The Keras layer as a Keras citizen: errors, config, fit(), saving, checkpoints, distribution, no JAX."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from parity import CASE_IDS, CASES, CONFIG_ERRORS, assert_close, make_steps  # noqa: E402
from tf_helpers import make_pair  # noqa: E402

from renorm.numpy_ref import BatchRenormReference  # noqa: E402
from renorm.tf import BatchRenormalization, batch_renorm  # noqa: E402

BY_NAME = dict(zip(CASE_IDS, CASES))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs,exc,words",
    CONFIG_ERRORS
    + [
        (dict(axis=[1, 2]), TypeError, "axis=[1, 2]"),
        (dict(synchronized=True, microbatch_size=2), ValueError, "microbatch_size=2"),
    ],
)
def test_config_errors_at_construction(kwargs, exc, words):
    with pytest.raises(exc) as info:
        BatchRenormalization(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "kwargs,x,exc,words",
    [
        (dict(axis=3), np.zeros((4, 3)), ValueError, "axis=3"),
        (dict(axis=0), np.zeros((4, 3)), ValueError, "axis=0"),
        (dict(), np.zeros((4,)), ValueError, "rank 1"),
        (dict(), np.zeros((4, 3), np.int32), TypeError, "int32"),
        (dict(microbatch_size=3), np.zeros((8, 3)), ValueError, "batch of 8 examples and microbatch_size=3"),
        (dict(microbatch_size=1), np.zeros((8, 3)), ValueError, "holds 1"),
        (dict(), np.zeros((1, 3)), ValueError, "holds 1"),
    ],
)
def test_input_errors_at_first_call(kwargs, x, exc, words):
    layer = BatchRenormalization(**kwargs)
    with pytest.raises(exc) as info:
        layer(tf.constant(x), training=True)
    assert words in str(info.value)


def test_feature_size_differs_from_built():
    layer = BatchRenormalization()
    layer(tf.zeros((4, 3)), training=True)
    with pytest.raises(ValueError, match="4 features on axis -1 but the layer was built for 3"):
        layer(tf.zeros((4, 4)), training=True)


def test_batch_not_divisible_is_checked_in_the_graph_when_batch_is_unknown():
    layer = BatchRenormalization(microbatch_size=2)
    step = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    step(tf.ones((4, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="got a batch of 5 examples and microbatch_size=2"):
        step(tf.ones((5, 3)))
    # Inference does not group: any batch works.
    infer = tf.function(lambda x: layer(x, training=False), input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    assert infer(tf.ones((5, 3))).shape == (5, 3)


def test_too_few_values_is_checked_in_the_graph_when_batch_is_unknown():
    layer = BatchRenormalization()
    step = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="a batch holds 1"):
        step(tf.ones((1, 3)))


def test_functional_op_requires_an_explicit_training_flag():
    x = tf.ones((4, 3))
    with pytest.raises(TypeError, match="training=None"):
        batch_renorm(x, None, None, tf.zeros(3), tf.ones(3), training=None)


def test_functional_op_matches_oracle_and_touches_no_state():
    case = BY_NAME["nchw_axis1_mb2"]
    xs, _, _ = make_steps(case, 9)
    ref = BatchRenormReference(3, momentum=0.9, epsilon=1e-5, axis=1, microbatch_size=2, rmax=1.3, dmax=0.3)
    mean, std = tf.zeros(3, tf.float64), tf.ones(3, tf.float64)
    for x in xs:
        out = batch_renorm(
            tf.constant(x),
            None,
            None,
            mean,
            std,
            training=True,
            rmax=1.3,
            dmax=0.3,
            momentum=0.9,
            epsilon=1e-5,
            axis=1,
            microbatch_size=2,
        )
        y_ref = ref.train(x)
        assert_close(out.y.numpy(), y_ref, "float64", "value", "y")
        assert_close(out.moving_mean.numpy(), ref.mean, "float64", "value", "mean")
        assert_close(out.moving_stddev.numpy(), ref.stddev, "float64", "value", "stddev")
        # Clip fractions are ratios of counts, not values of docs/SPEC.md section 9's table.
        np.testing.assert_allclose(out.r_clipped_fraction.numpy(), ref.r_clipped, atol=1e-7)
        np.testing.assert_allclose(out.d_clipped_fraction.numpy(), ref.d_clipped, atol=1e-7)
        assert bool(out.finite)
        mean, std = out.moving_mean, out.moving_stddev
    assert ref.r_clipped > 0 or ref.d_clipped > 0


# ------------------------------------------------------------------ config
def test_config_round_trip():
    layer = BatchRenormalization(
        axis=1,
        momentum=0.9,
        epsilon=1e-4,
        center=False,
        rmax=2.0,
        dmax=1.0,
        warmup_steps=3,
        rmax_steps=8,
        dmax_steps=6,
        microbatch_size=2,
        explicit_gradient=False,
        gamma_regularizer="l2",
        moving_stddev_initializer="ones",
        name="brn",
    )
    config = layer.get_config()
    clone = BatchRenormalization.from_config(config)
    assert clone.get_config() == config
    for key, value in dict(
        axis=1,
        momentum=0.9,
        epsilon=1e-4,
        center=False,
        rmax=2.0,
        dmax=1.0,
        warmup_steps=3,
        rmax_steps=8,
        dmax_steps=6,
        microbatch_size=2,
        explicit_gradient=False,
    ).items():
        assert config[key] == value and getattr(clone, key) == value, key
    # Registered: deserializable by name.
    assert keras.saving.get_registered_object("renorm>BatchRenormalization") is BatchRenormalization


def test_weights_names_and_order():
    layer = BatchRenormalization()
    layer.build((2, 3))
    assert [w.name for w in layer.weights] == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_stddev",
        "step",
        "r_clipped_fraction",
        "d_clipped_fraction",
    ]
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]
    layer = BatchRenormalization(center=False, scale=False)
    layer.build((2, 3))
    assert layer.trainable_weights == []


# --------------------------------------------------------------------- fit
def _fit_one_step(build_model):
    """One fit() step with lr=0: the layer's state must match one oracle training step."""
    rng = np.random.default_rng(11)
    x = rng.normal(2.0, 3.0, (8, 4)).astype(np.float32)
    target = rng.standard_normal((8, 4)).astype(np.float32)
    layer = BatchRenormalization(momentum=0.5, microbatch_size=4, rmax=1.2, dmax=0.2)
    model = build_model(layer)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    model.fit(x, target, batch_size=8, epochs=1, verbose=0, shuffle=False)
    ref = BatchRenormReference(4, momentum=0.5, epsilon=1e-3, microbatch_size=4, rmax=1.2, dmax=0.2)
    ref.train(x.astype(np.float64))
    assert int(layer.step.numpy()) == 1
    assert_close(layer.moving_mean.numpy(), ref.mean, "float32", "value", "mean")
    assert_close(layer.moving_stddev.numpy(), ref.stddev, "float32", "value", "stddev")
    np.testing.assert_allclose(float(layer.r_clipped_fraction.numpy()), ref.r_clipped, atol=1e-6)  # a ratio of counts
    # predict() is inference: same as the oracle's.
    assert_close(model.predict(x, verbose=0), ref.infer(x.astype(np.float64)), "float32", "value", "predict")


def test_fit_sequential():
    _fit_one_step(lambda layer: keras.Sequential([keras.Input((4,)), layer]))


def test_fit_functional():
    def build(layer):
        inp = keras.Input((4,))
        return keras.Model(inp, layer(inp))

    _fit_one_step(build)


def test_fit_learns_with_conv_and_microbatches():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((16, 4, 4, 2)).astype(np.float32)
    target = rng.standard_normal((16, 1)).astype(np.float32)
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.Conv2D(3, 3, padding="same"),
            BatchRenormalization(microbatch_size=4),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    before = [w.numpy().copy() for w in model.layers[1].trainable_weights]
    model.fit(x, target, batch_size=8, epochs=1, verbose=0)
    after = [w.numpy() for w in model.layers[1].trainable_weights]
    assert int(model.layers[1].step.numpy()) == 2
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before))  # gamma and beta got gradients


# ----------------------------------------------------------------- saving
def _trained_model():
    case = BY_NAME["schedule"]
    layer, ref = make_pair(case, 13, momentum=0.5, dtype="float32")
    inp = keras.Input(case.shape[1:])
    model = keras.Model(inp, layer(inp))
    xs, x_eval, _ = make_steps(case, 13, np.float32)
    for x in xs[:3]:
        layer(tf.constant(x), training=True)
    return model, layer, xs, x_eval


def test_keras_save_and_load_restore_exactly(tmp_path):
    model, layer, xs, x_eval = _trained_model()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    new = loaded.layers[-1]
    assert isinstance(new, BatchRenormalization)
    assert new.get_config() == layer.get_config()
    for a, b in zip(layer.weights, new.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded(x_eval, training=False).numpy(), model(x_eval, training=False).numpy())
    # Training continues identically (the restored step drives the schedule).
    np.testing.assert_array_equal(
        new(tf.constant(xs[3]), training=True).numpy(), layer(tf.constant(xs[3]), training=True).numpy()
    )
    np.testing.assert_array_equal(new.moving_stddev.numpy(), layer.moving_stddev.numpy())


def test_tf_checkpoint_round_trip(tmp_path):
    model, layer, xs, x_eval = _trained_model()
    saved = [w.numpy().copy() for w in layer.weights]
    y_saved = layer(tf.constant(x_eval), training=False).numpy()
    ckpt = tf.train.Checkpoint(model=model)
    path = ckpt.save(str(tmp_path / "ckpt"))
    for x in xs[3:]:
        layer(tf.constant(x), training=True)
    assert int(layer.step.numpy()) == len(xs)
    ckpt.restore(path).assert_existing_objects_matched()
    for w, v in zip(layer.weights, saved):
        np.testing.assert_array_equal(w.numpy(), v)
    np.testing.assert_array_equal(layer(tf.constant(x_eval), training=False).numpy(), y_saved)


# -------------------------------------------------------- subprocess checks
def _run(code: str, env_extra=None, timeout=180):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_import_without_jax():
    out = _run(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax"):
                    raise ImportError(f"blocked: {name}")
                return None
        sys.meta_path.insert(0, Block())
        import renorm.tf
        from renorm.tf import BatchRenormalization, batch_renorm
        import tensorflow as tf
        y = BatchRenormalization(microbatch_size=2)(tf.ones((4, 3)), training=True)
        assert y.shape == (4, 3)
        try:
            import jax
        except ImportError:
            print("JAX BLOCKED")
        assert not any(m.split(".")[0] in ("jax", "flax") for m in sys.modules)
        print("OK")
        """
    )
    assert "JAX BLOCKED" in out and "OK" in out


# The start of the two MirroredStrategy scripts below: 2 logical CPUs, the strategy, and a training step
# that runs a layer on each replica and returns per replica (y, dx, dgamma) of sum(y * dy).
MIRRORED_PRELUDE = """
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from parity import assert_close
from renorm.numpy_ref import BatchRenormReference
from renorm.tf import BatchRenormalization

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def replica_train_step(layer):
    @tf.function
    def step(x, dy):
        def replica_fn(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            dx, dgamma = tape.gradient(loss, [x, layer.gamma])
            return y, dx, dgamma
        return strategy.run(replica_fn, args=(x, dy))
    return step
"""

DISTRIBUTED = (
    MIRRORED_PRELUDE
    + """
assert strategy.num_replicas_in_sync == 2
rng = np.random.default_rng(0)
xs = [rng.normal(1.0, 2.0, (8, 3)) * rng.uniform(0.5, 2, 3) for _ in range(3)]
dys = [rng.standard_normal((8, 3)) for _ in range(3)]

for synchronized in (True, False):
    with strategy.scope():
        layer = BatchRenormalization(momentum=0.5, rmax=1.2, dmax=0.3, synchronized=synchronized, dtype="float64")
        layer.build((None, 3))
    # synchronized: the statistics of the global batch of 8. Not synchronized: each
    # replica normalizes its 4 examples and the replicas average their updates,
    # which is the oracle with micro-batches of 4.
    ref = BatchRenormReference(3, momentum=0.5, epsilon=1e-3, rmax=1.2, dmax=0.3,
                               microbatch_size=None if synchronized else 4)

    step = replica_train_step(layer)

    for x, dy in zip(xs, dys):
        ds = strategy.experimental_distribute_values_from_function(
            lambda ctx: (tf.constant(x[4 * ctx.replica_id_in_sync_group: 4 * ctx.replica_id_in_sync_group + 4]),
                         tf.constant(dy[4 * ctx.replica_id_in_sync_group: 4 * ctx.replica_id_in_sync_group + 4])))
        y, dx, dgamma = step(*ds)
        y = np.concatenate([t.numpy() for t in strategy.experimental_local_results(y)])
        dx = np.concatenate([t.numpy() for t in strategy.experimental_local_results(dx)])
        dgamma = sum(t.numpy() for t in strategy.experimental_local_results(dgamma))
        y_ref = ref.train(x)
        dx_ref, dgamma_ref, _ = ref.backward(dy)
        assert_close(y, y_ref, "float64", "value", f"y sync={synchronized}")
        assert_close(dx, dx_ref, "float64", "grad", f"dx sync={synchronized}")
        assert_close(dgamma, dgamma_ref, "float64", "grad", f"dgamma sync={synchronized}")
        for v in strategy.experimental_local_results(layer.moving_mean):
            assert_close(v.numpy(), ref.mean, "float64", "value", f"mean sync={synchronized}")
        for v in strategy.experimental_local_results(layer.moving_stddev):
            assert_close(v.numpy(), ref.stddev, "float64", "value", f"stddev sync={synchronized}")
        for v in strategy.experimental_local_results(layer.step):
            assert int(v.numpy()) == ref.step, (int(v.numpy()), ref.step)
    print("OK", synchronized)
"""
)


def test_mirrored_strategy_two_cpu_replicas():
    out = _run(DISTRIBUTED)
    assert "OK True" in out and "OK False" in out


# ----------------------------------------------------- empty batches (issue 11)
EMPTY_CONFIGS = [
    dict(),  # fused kernels
    dict(fused=False),
    dict(explicit_gradient=False),
    dict(microbatch_size=2),
    dict(synchronized=True),  # pooled moments, outside any strategy
]


def _set_state(layer, c):
    rng = np.random.default_rng(21)
    layer.moving_mean.assign(rng.normal(size=c))
    layer.moving_stddev.assign(rng.uniform(0.5, 2.0, c))
    layer.step.assign(7)
    layer._r_clipped.assign(0.25)
    layer._d_clipped.assign(0.5)
    return [w.numpy().copy() for w in layer.non_trainable_weights]


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("kwargs", EMPTY_CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "fused")
def test_empty_batch_gives_empty_output_and_leaves_state_unchanged(kwargs, mode):
    """A batch of 0 examples: empty output, zero gradients, moving statistics, step and diagnostics unchanged."""
    layer = BatchRenormalization(**kwargs)
    layer.build((None, 2, 3))
    before = _set_state(layer, 3)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y)
        return (y,) + tuple(tape.gradient(loss, [x, layer.gamma, layer.beta]))

    if mode == "function":
        step = tf.function(step, input_signature=[tf.TensorSpec([None, 2, 3], tf.float32)])
    y, dx, dgamma, dbeta = step(tf.zeros((0, 2, 3)))
    assert y.shape == (0, 2, 3) and dx.shape == (0, 2, 3)
    np.testing.assert_array_equal(dgamma.numpy(), np.zeros(3))
    np.testing.assert_array_equal(dbeta.numpy(), np.zeros(3))
    for w, v in zip(layer.non_trainable_weights, before):
        np.testing.assert_array_equal(w.numpy(), v, err_msg=w.name)
    # A non-empty batch through the same trace still trains.
    step(tf.ones((4, 2, 3)))
    assert int(layer.step.numpy()) == 8
    # Inference on an empty batch, features last or on axis 1 (NCHW view).
    assert layer(tf.zeros((0, 2, 3)), training=False).shape == (0, 2, 3)
    nchw = BatchRenormalization(axis=1)
    assert nchw(tf.zeros((0, 3, 2, 2)), training=False).shape == (0, 3, 2, 2)


@pytest.mark.parametrize("kwargs", EMPTY_CONFIGS[:4], ids=["fused", "generic", "autodiff", "microbatch"])
def test_empty_batch_functional_op(kwargs):
    mean, std = tf.constant([1.0, -2.0, 0.5]), tf.constant([2.0, 0.5, 1.0])
    for spec in ([None, 3], [0, 3]):
        fn = tf.function(
            lambda x: batch_renorm(x, tf.ones(3), tf.zeros(3), mean, std, training=True, **kwargs),
            input_signature=[tf.TensorSpec(spec, tf.float32)],
        )
        out = fn(tf.zeros((0, 3)))
        assert out.y.shape == (0, 3)
        np.testing.assert_array_equal(out.moving_mean.numpy(), mean.numpy())
        np.testing.assert_array_equal(out.moving_stddev.numpy(), std.numpy())
        assert bool(out.empty) and bool(out.finite)
        assert float(out.r_clipped_fraction) == 0.0 and float(out.d_clipped_fraction) == 0.0
    out = batch_renorm(tf.ones((4, 3)), None, None, mean, std, training=True, **kwargs)
    assert not bool(out.empty)


UNEVEN = (
    MIRRORED_PRELUDE
    + """
rng = np.random.default_rng(0)
x = rng.normal(1.0, 2.0, (9, 2, 3)) * rng.uniform(0.5, 2, 3)
dy = rng.standard_normal((9, 2, 3))

# 1. strategy.run, a last batch of 1 example: replica 0 gets it, replica 1 gets an empty batch.
for kw in (dict(synchronized=True), dict(microbatch_size=1), dict()):
    with strategy.scope():
        layer = BatchRenormalization(momentum=0.5, rmax=1.2, dmax=0.3, dtype="float64", **kw)
        layer.build((None, 2, 3))

    step = replica_train_step(layer)

    def shares(a, cuts):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[cuts[ctx.replica_id_in_sync_group]:cuts[ctx.replica_id_in_sync_group + 1]]))

    # The oracle: synchronized is the global batch; otherwise each replica's share is a group
    # (or holds groups of microbatch_size), and the strategy averages the replicas' states.
    ref = BatchRenormReference(3, momentum=0.5, epsilon=1e-3, rmax=1.2, dmax=0.3)
    for cuts in ((0, 4, 8), (8, 9, 9)):
        ref.microbatch_size = kw.get("microbatch_size", None if kw else cuts[1] - cuts[0])
        y, dx, dgamma = step(shares(x, cuts), shares(dy, cuts))
        y = np.concatenate([t.numpy() for t in strategy.experimental_local_results(y)])
        dx = np.concatenate([t.numpy() for t in strategy.experimental_local_results(dx)])
        dgamma = [t.numpy() for t in strategy.experimental_local_results(dgamma)]
        old = ref.state
        sl = slice(cuts[0], cuts[2])
        y_ref = ref.train(x[sl])
        dx_ref, dgamma_ref, _ = ref.backward(dy[sl])
        if cuts[2] - cuts[1] == 0 and "synchronized" not in kw:
            # The empty replica keeps its state; the strategy averages the replicas' states.
            ref.mean, ref.stddev = (ref.mean + old["mean"]) / 2, (ref.stddev + old["stddev"]) / 2
            np.testing.assert_array_equal(dgamma[1], np.zeros(3))
        assert y.shape == x[sl].shape and dx.shape == x[sl].shape
        assert_close(y, y_ref, "float64", "value", f"y {kw} {cuts}")
        assert_close(dx, dx_ref, "float64", "grad", f"dx {kw} {cuts}")
        assert_close(sum(dgamma), dgamma_ref, "float64", "grad", f"dgamma {kw} {cuts}")
        for v in strategy.experimental_local_results(layer.moving_mean):
            assert_close(v.numpy(), ref.mean, "float64", "value", f"mean {kw} {cuts}")
        for v in strategy.experimental_local_results(layer.moving_stddev):
            assert_close(v.numpy(), ref.stddev, "float64", "value", f"stddev {kw} {cuts}")
        for v in strategy.experimental_local_results(layer.step):
            assert int(v.numpy()) == ref.step, (int(v.numpy()), ref.step)
    print("RUN OK", kw)

# 2. Keras fit: 9 examples, batch 8, over 2 replicas; the last batch leaves one replica empty.
target = rng.standard_normal((9, 2, 3)).astype(np.float32)
for kw in (dict(microbatch_size=1), dict(synchronized=True), dict()):
    with strategy.scope():
        layer = BatchRenormalization(momentum=0.5, **kw)
        model = keras.Sequential([keras.Input((2, 3)), layer])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x.astype(np.float32), target, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert int(layer.step.numpy()) == 2
    assert np.isfinite(layer.moving_mean.numpy()).all() and np.isfinite(layer.moving_stddev.numpy()).all()
    assert np.isfinite(model.predict(x.astype(np.float32), verbose=0)).all()
    if "synchronized" in kw:
        ref = BatchRenormReference(3, momentum=0.5, epsilon=1e-3)
        ref.train(x[:8].astype(np.float32).astype(np.float64))
        ref.train(x[8:].astype(np.float32).astype(np.float64))
        assert_close(layer.moving_mean.numpy(), ref.mean, "float32", "value", "fit mean")
        assert_close(layer.moving_stddev.numpy(), ref.stddev, "float32", "value", "fit stddev")
    print("FIT OK", kw)
"""
)


def test_mirrored_strategy_uneven_last_batch():
    """One replica's share of a short last batch is empty: no NaN state, pooled statistics of what exists."""
    out = _run(UNEVEN, timeout=300)
    assert out.count("RUN OK") == 3 and out.count("FIT OK") == 3, out


# ------------------------------------------- group size with unknown dimensions (issue 11)
@pytest.mark.parametrize(
    "spec,x_shape,kwargs,words",
    [
        ([None, None, None, 3], (4, 1, 1, 3), dict(microbatch_size=1), "a micro-batch of 1 holds 1"),
        ([1, None, None, 3], (1, 1, 1, 3), dict(), "a batch holds 1"),
        ([None, None, 3], (1, 1, 3), dict(fused=False), "a batch holds 1"),
    ],
)
def test_too_few_values_is_checked_in_the_graph_when_other_dims_are_unknown(spec, x_shape, kwargs, words):
    layer = BatchRenormalization(**kwargs)
    layer.build((None,) + x_shape[1:])
    before = [w.numpy().copy() for w in layer.non_trainable_weights]
    with pytest.raises(ValueError, match=words):  # eager decides from the static shape
        layer(tf.ones(x_shape), training=True)
    sig = [tf.TensorSpec(spec, tf.float32)]
    step = tf.function(lambda x: layer(x, training=True), input_signature=sig)
    with pytest.raises(tf.errors.InvalidArgumentError, match=words):
        step(tf.ones(x_shape))
    for w, v in zip(layer.non_trainable_weights, before):
        np.testing.assert_array_equal(w.numpy(), v, err_msg=w.name)
    fn = tf.function(
        lambda x: batch_renorm(x, None, None, tf.zeros(3), tf.ones(3), training=True, **kwargs), input_signature=sig
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=words):
        fn(tf.ones(x_shape))
    # Enough values per group through the same traces.
    ok = tuple(2 if s is None else s for s in spec)
    step(tf.random.normal(ok))
    assert int(layer.step.numpy()) == 1
    fn(tf.random.normal(ok))
    # XLA drops assertions (and cannot compile their messages): the graph still compiles and runs.
    xla = tf.function(lambda x: layer(x, training=True), input_signature=sig, jit_compile=True)
    assert xla(tf.random.normal(ok)).shape == ok


# --------------------------------------------- clipping limits of the functional op (issue 11)
@pytest.mark.parametrize(
    "limits,exc,words",
    [
        (dict(rmax="3"), TypeError, "rmax='3'"),
        (dict(dmax=None), TypeError, "dmax=None"),
        (dict(rmax=0.5), ValueError, "rmax=0.5"),
        (dict(dmax=-1.0), ValueError, "dmax=-1.0"),
        (dict(rmax=tf.constant("3")), TypeError, "rmax"),
        (dict(rmax=tf.ones(2)), ValueError, "rmax"),
    ],
)
def test_functional_op_checks_python_limits(limits, exc, words):
    with pytest.raises(exc, match=words):
        batch_renorm(tf.ones((4, 3)), None, None, tf.zeros(3), tf.ones(3), training=True, **limits)


@pytest.mark.parametrize(
    "limits,words",
    [
        (dict(rmax=0.5), "`rmax` must be a finite number >= 1 .*got rmax=0.5"),
        (dict(dmax=-1.0), "`dmax` must be a finite number >= 0 .*got dmax=-1"),
        (dict(rmax=float("inf")), "got rmax=inf"),
        (dict(dmax=float("nan")), "got dmax=nan"),
    ],
)
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_functional_op_checks_tensor_limits_in_the_graph(limits, words, mode):
    def fn(rmax, dmax):
        return batch_renorm(tf.ones((4, 3)), None, None, tf.zeros(3), tf.ones(3), training=True, rmax=rmax, dmax=dmax).y

    if mode == "function":
        fn = tf.function(fn)
    args = {"rmax": tf.constant(3.0), "dmax": tf.constant(5.0)}
    args.update({k: tf.constant(v) for k, v in limits.items()})
    with pytest.raises(tf.errors.InvalidArgumentError, match=words):
        fn(**args)
    assert fn(tf.constant(1.0), tf.constant(0.0)).shape == (4, 3)  # the limits of batch norm are valid


# -------------------------------------------------- overflowing statistics (issue 11)
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(fused=False), dict(explicit_gradient=False), dict(microbatch_size=2), dict(synchronized=True)],
    ids=["fused", "generic", "autodiff", "microbatch", "synchronized"],
)
def test_overflowing_statistics_give_nan_output(kwargs):
    """float32 |x - mean| ~ 1e20 overflows the variance: NaN output for that feature (as the oracle), never ±dmax."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    x[:, 1] = np.array([1e20, -1e20, 3e20, -2e20], np.float32)
    layer = BatchRenormalization(momentum=0.5, **kwargs)
    layer.build((None, 3))
    before = [w.numpy().copy() for w in (layer.moving_mean, layer.moving_stddev)]
    y = layer(tf.constant(x), training=True).numpy()
    ref = BatchRenormReference(
        3, momentum=0.5, epsilon=1e-3, dtype=np.float32, microbatch_size=kwargs.get("microbatch_size")
    )
    y_ref = ref.train(x)
    assert np.isnan(y_ref[:, 1]).all()
    assert np.isnan(y[:, 1]).all(), y
    assert_close(y[:, [0, 2]], y_ref[:, [0, 2]], "float32", "value", "other features")
    for w, v in zip((layer.moving_mean, layer.moving_stddev), before):
        np.testing.assert_array_equal(w.numpy(), v)


# ----------------------------------------------------------- 0 features (issue 11)
def test_zero_features_is_an_error():
    with pytest.raises(ValueError, match="0 features on axis -1"):
        BatchRenormalization().build((None, 0))
    with pytest.raises(ValueError, match="0 features on axis 1"):
        BatchRenormalization(axis=1)(tf.zeros((4, 0, 2)), training=False)
