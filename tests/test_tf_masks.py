"""Masks in the Keras layer and batch_renorm (docs/SPEC.md, section 3).

Masked parity is against the oracle run with the same mask (statistics over the selected positions,
docs/SPEC.md, section 9 tolerances); "rmax=1, dmax=0 is batch norm" is against
keras.layers.BatchNormalization given the same mask.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from parity import MASK_CASE_IDS, MASK_CASES, assert_close, assert_matches_oracle, make_masks, make_steps  # noqa: E402
from test_tf_layer import MIRRORED_PRELUDE, _run  # noqa: E402
from tf_helpers import make_pair  # noqa: E402

from renorm.numpy_ref import BatchRenormReference  # noqa: E402
from renorm.testing.adapters import KerasAdapter  # noqa: E402
from renorm.tf import BatchRenormalization, batch_renorm  # noqa: E402


def check_masked(case, *, dtype="float64", explicit_gradient=True, mode="eager", seed=1):
    """Every masked step against the oracle with the same mask, through the driver; in inference the mask is
    checked and ignored."""
    assert case.microbatch_size is not None or any(not m.any() for m in make_masks(case, seed))  # a no-step call
    adapter = KerasAdapter(mode=mode, explicit_gradient=explicit_gradient)
    assert_matches_oracle(adapter, case, dtype=dtype, momentum=0.5, epsilon=1e-3, seed=seed, masked=True)
    layer = adapter.last_layer
    xe = tf.cast(tf.constant(make_steps(case, seed)[1]), dtype)
    mask = tf.constant(np.squeeze(make_masks(case, seed)[0], case.axis))
    np.testing.assert_array_equal(layer(xe, training=False, mask=mask).numpy(), layer(xe, training=False).numpy())


@pytest.mark.parametrize("case", MASK_CASES, ids=MASK_CASE_IDS)
def test_masked_matches_oracle(case):
    check_masked(case)


@pytest.mark.parametrize("case", MASK_CASES, ids=MASK_CASE_IDS)
def test_masked_matches_oracle_autodiff(case):
    check_masked(case, explicit_gradient=False)


@pytest.mark.parametrize("case", MASK_CASES[:4], ids=MASK_CASE_IDS[:4])
def test_masked_matches_oracle_float32(case):
    check_masked(case, dtype="float32")


@pytest.mark.parametrize("mode", ["function", "jit"])
@pytest.mark.parametrize("name", ["nhwc", "nchw_axis1_mb2"])
def test_masked_matches_oracle_compiled(name, mode):
    check_masked(next(c for c in MASK_CASES if c.name == name), mode=mode)


def test_masked_unknown_batch_size_and_nothing_selected_in_a_graph():
    """One trace for every batch size; a mask selecting nothing is decided when the graph runs: no step."""
    case = next(c for c in MASK_CASES if c.name == "dense_mb4_tight")
    layer, ref = make_pair(case, 5, momentum=0.5)
    step = tf.function(
        lambda x, m: layer(x, training=True, mask=m),
        input_signature=[tf.TensorSpec([None, 3], tf.float64), tf.TensorSpec([None], tf.bool)],
    )
    xs, _, _ = make_steps(case, 5)
    rng = np.random.default_rng(5)
    for x, mask in [(xs[0], rng.random(8) < 0.7), (xs[1][:4], np.zeros(4, bool)), (xs[2], np.ones(8, bool))]:
        y = step(tf.constant(x), tf.constant(mask))
        assert_close(y.numpy(), ref.train(x, mask=mask[:, None]), "float64", "value", "y")
        assert_close(layer.moving_mean.numpy(), ref.mean, "float64", "value", "mean")
        assert int(layer.step.numpy()) == ref.step
        np.testing.assert_allclose(float(layer.r_clipped_fraction.numpy()), ref.r_clipped, atol=1e-6)  # ratio of counts
    assert ref.step == 2


# rmax=1, dmax=0 with a mask is Keras's batch norm: test_tf_parity.test_rmax1_dmax0_is_keras_batch_norm.


def test_mask_from_embedding_reaches_the_layer_and_is_passed_on():
    """A Keras-propagated mask (Embedding(mask_zero=True)): the padding does not enter the statistics."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 20, (8, 6))
    tokens[:, 4:] = 0  # padding
    tokens[2, 2:] = 0

    def model(norm):
        inp = keras.Input((6,), dtype="int32")
        emb = keras.layers.Embedding(
            20, 3, mask_zero=True, embeddings_initializer=keras.initializers.RandomNormal(1.0, 2.0, seed=3)
        )
        h = norm(emb(inp))
        out = keras.layers.GlobalAveragePooling1D()(h)  # mask-aware: averages over the kept steps
        return keras.Model(inp, [h, out]), emb

    (ours, emb), (bn, emb_bn) = (
        model(BatchRenormalization(rmax=1.0, dmax=0.0, momentum=0.5)),
        model(keras.layers.BatchNormalization(momentum=0.5)),
    )
    emb_bn.set_weights(emb.get_weights())
    (h, pooled), (h_bn, pooled_bn) = ours(tokens, training=True), bn(tokens, training=True)
    assert_close(h.numpy(), h_bn.numpy(), "float32", "value", "y")
    assert_close(pooled.numpy(), pooled_bn.numpy(), "float32", "value", "pooled")
    # Against the oracle on the embedded values, masked by the padding.
    x = emb(tokens).numpy().astype(np.float64)
    ref = BatchRenormReference(3, momentum=0.5, epsilon=1e-3, rmax=1.0, dmax=0.0)
    assert_close(h.numpy(), ref.train(x, mask=(tokens != 0)[..., None]), "float32", "value", "y vs oracle")
    norm = ours.layers[2]
    assert_close(norm.moving_mean.numpy(), ref.mean, "float32", "value", "moving_mean")
    # The mask goes on to the next layer (GlobalAveragePooling1D averaged over the kept steps only).
    kept = (tokens != 0)[..., None]
    assert_close(pooled.numpy(), (h.numpy() * kept).sum(1) / kept.sum(1), "float32", "value", "masked average")


def test_masked_nan_padding_does_not_enter_the_statistics():
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, (6, 4, 3))
    mask = np.ones((6, 4), bool)
    mask[:, 3] = False
    bad = x.copy()
    bad[:, 3] = np.nan
    ref = BatchRenormReference(3, momentum=0.5, epsilon=1e-3)
    y_ref = ref.train(x[:, :3])
    for explicit in (True, False):
        layer = BatchRenormalization(momentum=0.5, dtype="float64", explicit_gradient=explicit)
        y = layer(tf.constant(bad), training=True, mask=tf.constant(mask))
        assert_close(layer.moving_mean.numpy(), ref.mean, "float64", "value", "mean")
        assert_close(layer.moving_stddev.numpy(), ref.stddev, "float64", "value", "stddev")
        assert_close(y.numpy()[:, :3], y_ref, "float64", "value", "selected outputs")


def test_batch_renorm_function_takes_a_mask():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (8, 2, 4))
    mask = rng.random((8, 2)) < 0.7
    mask[4:] = False  # the second micro-batch selects nothing
    mean, std = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    out = batch_renorm(
        tf.constant(x),
        None,
        None,
        tf.constant(mean),
        tf.constant(std),
        training=True,
        rmax=1.5,
        dmax=0.5,
        momentum=0.5,
        microbatch_size=4,
        mask=mask.astype(np.float32),
    )  # nonzero selects
    ref = BatchRenormReference(
        4, momentum=0.5, epsilon=1e-3, rmax=1.5, dmax=0.5, microbatch_size=4, mean=mean, stddev=std
    )
    assert_close(out.y.numpy(), ref.train(x, mask=mask[..., None]), "float64", "value", "y")
    assert_close(out.moving_mean.numpy(), ref.mean, "float64", "value", "mean")
    assert_close(out.moving_stddev.numpy(), ref.stddev, "float64", "value", "stddev")
    assert not bool(out.empty)
    none = batch_renorm(
        tf.constant(x), None, None, tf.constant(mean), tf.constant(std), training=True, mask=np.zeros((8, 2), bool)
    )
    assert bool(none.empty)
    np.testing.assert_array_equal(none.moving_mean.numpy(), mean)


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (
            np.ones((4, 3, 2), bool),
            ValueError,
            r"`mask` must have a shape equal to the input's shape without its "
            r"feature axis -1, \(4, 3\).*got a mask of shape \(4, 3, 2\)",
        ),
        (np.ones((4, 2), bool), ValueError, r"`mask`.*\(4, 2\) for an input of shape \(4, 3, 2\)"),
        (np.array([["a"] * 3] * 4), TypeError, "`mask` must be boolean.*dtype string"),
    ],
)
def test_mask_errors(mask, exc, match):
    layer = BatchRenormalization()
    x = tf.ones((4, 3, 2))
    for training in (True, False):
        with pytest.raises(exc, match=match):
            layer(x, training=training, mask=tf.constant(mask))
    with pytest.raises(exc, match=match):
        batch_renorm(x, None, None, tf.zeros(2), tf.ones(2), training=True, mask=tf.constant(mask))


def test_mask_with_fused_true_is_an_error():
    layer = BatchRenormalization(fused=True)
    with pytest.raises(ValueError, match="no mask.*mask=given"):
        layer(tf.ones((4, 2, 2, 3)), training=True, mask=tf.ones((4, 2, 2), bool))


SYNCHRONIZED_MASKED = (
    MIRRORED_PRELUDE
    + """
rng = np.random.default_rng(1)
with strategy.scope():
    layer = BatchRenormalization(momentum=0.5, rmax=1.2, dmax=0.3, synchronized=True, dtype="float64")
    layer.build((None, 3))
ref = BatchRenormReference(3, momentum=0.5, epsilon=1e-3, rmax=1.2, dmax=0.3)


@tf.function
def step(x, dy, m):
    def replica_fn(x, dy, m):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True, mask=m) * dy)
        return tape.gradient(loss, x)
    return strategy.run(replica_fn, args=(x, dy, m))


for _ in range(2):
    x, dy = rng.normal(1.0, 2.0, (8, 3)), rng.standard_normal((8, 3))
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 1], bool)  # 4 selected on replica 0, 2 on replica 1
    parts = strategy.experimental_distribute_values_from_function(
        lambda ctx: tuple(tf.constant(a[4 * ctx.replica_id_in_sync_group: 4 * ctx.replica_id_in_sync_group + 4])
                          for a in (x, dy, mask)))
    dx = np.concatenate([t.numpy() for t in strategy.experimental_local_results(step(*parts))])
    ref.train(x, mask=mask[:, None])
    assert_close(dx, ref.backward(dy)[0], "float64", "grad", "dx")
    for v in strategy.experimental_local_results(layer.moving_mean):
        assert_close(v.numpy(), ref.mean, "float64", "value", "mean")
    for v in strategy.experimental_local_results(layer.moving_stddev):
        assert_close(v.numpy(), ref.stddev, "float64", "value", "stddev")
print("OK masked")
"""
)


def test_synchronized_mask_pools_sums_and_counts_over_replicas():
    """Replicas selecting different numbers of positions: the statistics of the selected global batch."""
    assert "OK masked" in _run(SYNCHRONIZED_MASKED)
