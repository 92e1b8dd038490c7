"""The Keras layer against the NumPy oracle, over the shared case registry.

Every case runs its training steps then one inference call and compares, at
every step, y, dx, dgamma, dbeta (gradient of sum(y * dy)), the moving
statistics, the step counter and the clip diagnostics with
``renorm.numpy_ref.BatchRenormReference`` at the tolerances of ``docs/SPEC.md``, section 9.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from parity import CASE_IDS, CASES, assert_close, make_steps, rel_err  # noqa: E402
from tf_helpers import check_against_oracle, make_pair  # noqa: E402

from renorm.tf import BatchRenormalization  # noqa: E402

BY_NAME = dict(zip(CASE_IDS, CASES))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_oracle_explicit_gradient(case, dtype):
    # momentum 0.5 so that the state update is large and visible.
    check_against_oracle(case, seed=1, dtype=dtype, momentum=0.5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_oracle_autodiff(case):
    check_against_oracle(case, seed=2, dtype="float64", momentum=0.99, explicit_gradient=False)


@pytest.mark.parametrize("mode", ["function", "jit"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_oracle_compiled(case, mode):
    # One traced function per layer, reused for every step.
    check_against_oracle(case, seed=3, dtype="float64", momentum=0.9, mode=mode)


@pytest.mark.parametrize(
    "name,explicit", [("nhwc_mb2_tight", True), ("dense_mb4_tight", False), ("schedule", True), ("nchw_axis1", True)]
)
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_matches_float64_oracle(name, explicit, policy):
    # Input in the compute dtype, statistics in float32, state float32, output in the compute dtype.
    layer, _ = check_against_oracle(
        BY_NAME[name],
        seed=4,
        dtype=policy,
        momentum=0.9,
        explicit_gradient=explicit,
        tol_dtype=policy.split("_")[1],
    )
    assert layer.compute_dtype == policy.split("_")[1]
    for w in layer.weights:
        assert w.dtype == ("int64" if w.name == "step" else "float32"), (w.name, w.dtype)


def test_unknown_batch_size_at_trace_time():
    case = BY_NAME["nhwc_mb2_tight"]
    layer, ref = make_pair(case, 5, momentum=0.5, dtype="float32")
    spec = tf.TensorSpec([None] + list(case.shape[1:]), tf.float32)
    step = tf.function(lambda x: layer(x, training=True), input_signature=[spec])
    xs, _, _ = make_steps(case, 5, np.float32)
    for x in xs[:2]:
        assert_close(step(tf.constant(x)).numpy(), ref.train(x), "float32", "value", "y")
        assert_close(layer.moving_mean.numpy(), ref.mean, "float32", "value", "mean")
    # A batch of 6 (divisible by 2) also runs through the same trace.
    x6 = np.concatenate([xs[2], xs[3][:2]])
    assert_close(step(tf.constant(x6)).numpy(), ref.train(x6), "float32", "value", "y, batch 6")
    assert len(step.get_concrete_function().graph.as_graph_def().node) > 0


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("explicit", [True, False])
def test_rmax1_dmax0_is_keras_batch_norm(explicit, masked):
    """rmax=1, dmax=0 gives keras.layers.BatchNormalization's training outputs and gradients, given the same mask
    or none.

    Only the moving mean is comparable as state: Keras keeps a moving variance
    (an average of variances), we keep a moving stddev (an average of
    sqrt(var + eps)); these are not functions of each other after a step.
    With a mask, Keras divides its masked sums by ``count + 1e-7``
    (``keras.backend.epsilon()``), a relative difference of about 1e-7 / count:
    that comparison is at the float32 tolerance, in float64.
    """
    rng = np.random.default_rng(0)
    tol = "float32" if masked else "float64"
    ours = BatchRenormalization(rmax=1.0, dmax=0.0, momentum=0.8, dtype="float64", explicit_gradient=explicit)
    bn = keras.layers.BatchNormalization(momentum=0.8, dtype="float64")
    for layer in (ours, bn):
        layer.build((16, 5, 3))
    for w in ("gamma", "beta"):
        value = rng.uniform(0.5, 1.5, 3)
        getattr(ours, w).assign(value)
        getattr(bn, w).assign(value)
    for _ in range(3):
        x = tf.constant(rng.normal(3.0, 2.0, (16, 5, 3)))
        dy = tf.constant(rng.standard_normal((16, 5, 3)))
        mask = tf.constant(rng.random((16, 5)) < 0.6) if masked else None
        results = []
        for layer in (ours, bn):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, mask=mask)
                loss = tf.reduce_sum(y * dy)
            results.append([y] + tape.gradient(loss, [x, layer.gamma, layer.beta]))
        for a, b, what in zip(*results, ["y", "dx", "dgamma", "dbeta"]):
            assert_close(a.numpy(), b.numpy(), tol, "value" if what == "y" else "grad", what)
        assert_close(ours.moving_mean.numpy(), bn.moving_mean.numpy(), tol, "value", "moving_mean")
    if masked:  # the mask mattered: the last step without it gives another output
        assert rel_err(bn(x, training=True).numpy(), results[1][0].numpy()) > 1e-3


def test_keras_renorm_is_an_independent_reference():
    """Keras' own renorm (renorm_momentum == momentum, rmin = 1/rmax) follows the paper: same outputs.

    Keras clips ``renorm_stddev`` below at sqrt(epsilon), which does not bind here.
    """
    rng = np.random.default_rng(1)
    ours = BatchRenormalization(rmax=1.5, dmax=0.5, momentum=0.7, dtype="float64")
    kr = keras.layers.BatchNormalization(
        momentum=0.7,
        renorm=True,
        renorm_momentum=0.7,
        renorm_clipping={"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5},
        dtype="float64",
    )
    ours.build((8, 4))
    kr.build((8, 4))
    for _ in range(4):
        x = tf.constant(rng.normal(1.0, 3.0, (8, 4)))
        dy = tf.constant(rng.standard_normal((8, 4)))
        out = []
        for layer in (ours, kr):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            out.append((y, tape.gradient(loss, x)))
        assert_close(out[0][0].numpy(), out[1][0].numpy(), "float64", "value", "y")
        assert_close(out[0][1].numpy(), out[1][1].numpy(), "float64", "grad", "dx")
        assert_close(ours.moving_stddev.numpy(), kr.moving_stddev.numpy(), "float64", "value", "stddev")
        assert_close(ours.moving_mean.numpy(), kr.moving_mean.numpy(), "float64", "value", "mean")
    # Clipping was active, so the comparison is not the trivial batch-norm one.
    assert float(ours.r_clipped_fraction.numpy()) + float(ours.d_clipped_fraction.numpy()) > 0


@pytest.mark.parametrize("shape,microbatch_size", [((64, 3), None), ((64, 3), 2), ((32, 2, 2, 3), 4)])
def test_offset_data_float32(shape, microbatch_size):
    """1000 + 0.01 * noise in float32: y, dx and the state match the float64 oracle.

    The generic path centres on a first mean and corrects it (corrected
    two-pass moments), derives d from ``mu0 - mean`` (exact here) and writes
    dx in terms of the centred values, so even dx, which the oracle itself
    gets 5e-4 to 3e-2 wrong when run in float32, is held to the float64 result.
    """
    rng = np.random.default_rng(2)
    x = (1000.0 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape)
    c = shape[-1]
    layer = BatchRenormalization(dtype="float32", epsilon=1e-6, microbatch_size=microbatch_size)
    layer.build(x.shape)
    layer.moving_mean.assign(np.full(c, 1000.0))
    layer.moving_stddev.assign(np.full(c, 0.01))
    from renorm.numpy_ref import BatchRenormReference

    ref = BatchRenormReference(
        c,
        momentum=0.99,
        epsilon=1e-6,
        mean=np.full(c, 1000.0),
        stddev=np.full(c, 0.01),
        microbatch_size=microbatch_size,
    )
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * dy)
    y_ref = ref.train(x.astype(np.float64))
    assert_close(y.numpy(), y_ref, "float32", "value", "y")
    assert_close(tape.gradient(loss, xt).numpy(), ref.backward(dy)[0], "float32", "grad", "dx")
    assert_close(layer.moving_mean.numpy(), ref.mean, "float32", "value", "mean")
    assert_close(layer.moving_stddev.numpy(), ref.stddev, "float32", "value", "stddev")


def test_gradient_sums_vanish_per_group_and_constant_channel_is_finite():
    # sum(dx * x) per group is exactly 0 only in the limit epsilon -> 0 (it is
    # proportional to epsilon / (var + epsilon)), hence the tiny epsilon.
    layer = BatchRenormalization(microbatch_size=3, epsilon=1e-12, dtype="float64")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3))
    x[:, 1] = 5.0  # a constant channel: sigma_g = sqrt(epsilon)
    xt = tf.constant(x)
    dy = tf.constant(rng.standard_normal((6, 3)))
    for explicit in (True, False):
        layer.explicit_gradient = explicit
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(layer(xt, training=True) * dy)
        dx = tape.gradient(loss, xt).numpy()
        assert np.all(np.isfinite(dx))
        groups = dx.reshape(2, 3, 3)
        # Sums whose exact value is 0: absolute checks (a relative norm has no scale there).
        np.testing.assert_allclose(groups.sum(axis=1), 0.0, atol=1e-9)
        np.testing.assert_allclose((groups * x.reshape(2, 3, 3)).sum(axis=1), 0.0, atol=1e-7)
        assert np.abs(dx[:, 0]).max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("shape,dtype", [((8, 3), "float64"), ((8, 2, 2, 3), "float32")])  # generic, fused
def test_nan_batch_keeps_state_and_advances_step(shape, dtype):
    layer = BatchRenormalization(momentum=0.5, dtype=dtype)
    x = np.random.default_rng(4).standard_normal(shape).astype(dtype)
    layer(tf.constant(x), training=True)
    mean, std = layer.moving_mean.numpy(), layer.moving_stddev.numpy()
    assert np.abs(mean).max() > 0
    x[2, ..., 1] = np.nan
    step = tf.function(lambda v: layer(v, training=True))
    y = step(tf.constant(x))
    assert np.isnan(y.numpy()[..., 1]).all()
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(layer.moving_stddev.numpy(), std)
    assert int(layer.step.numpy()) == 2


def test_frozen_layer_runs_inference():
    layer, ref = make_pair(BY_NAME["dense"], 6, momentum=0.5)
    layer.trainable = False
    x = make_steps(BY_NAME["dense"], 6)[0][0]
    y = layer(tf.constant(x), training=True)
    assert_close(y.numpy(), ref.infer(x), "float64", "value", "frozen output")
    assert int(layer.step.numpy()) == 0
    assert_close(layer.moving_mean.numpy(), ref.mean, "float64", "value", "state untouched")


def test_inference_is_per_example():
    layer, _ = make_pair(BY_NAME["nhwc"], 7, momentum=0.5)
    x = tf.constant(np.random.default_rng(7).standard_normal((4, 3, 3, 4)))
    full = layer(x, training=False).numpy()
    one = layer(x[:1], training=False).numpy()
    assert_close(one, full[:1], "float64", "value", "one example vs its row of the batch")


FUSED_CASES = ["nhwc", "nchw_axis1", "dense", "no_center"]  # 4-D NHWC/NCHW; 2-D viewed as (B, 1, 1, C)


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_kernels_match_oracle(name, fused, mode):
    check_against_oracle(BY_NAME[name], seed=8, dtype="float32", momentum=0.5, mode=mode, fused=fused)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fused_kernels_mixed_precision(policy):
    check_against_oracle(
        BY_NAME["nhwc"], seed=9, dtype=policy, momentum=0.9, fused=True, tol_dtype=policy.split("_")[1]
    )


@pytest.mark.parametrize("shape", [(4, 2, 2, 3), (4, 3), (4, 5, 3)])
@pytest.mark.parametrize("fused,expected", [(None, True), (False, False)])
def test_fused_kernels_are_what_runs(fused, expected, shape):
    layer = BatchRenormalization(fused=fused)
    layer.build(shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    graph = step.get_concrete_function(tf.TensorSpec((None,) + shape[1:], tf.float32)).graph
    ops = set()
    for op in graph.get_operations():
        ops.add(op.type)
        for fn in graph._functions.values():  # custom-gradient bodies
            ops.update(node.op for node in fn.cached_definition.node_def)
    assert ("FusedBatchNormV3" in ops and "FusedBatchNormGradV3" in ops) == expected, sorted(ops)


@pytest.mark.parametrize(
    "kwargs,shape,dtype",
    [
        (dict(microbatch_size=2), (4, 2, 2, 3), "float32"),
        (dict(axis=1), (4, 3, 2), "float32"),
        (dict(), (4, 2, 2, 3), "float64"),
        (dict(axis=2), (4, 2, 2, 3), "float32"),
        (dict(explicit_gradient=False), (4, 2, 2, 3), "float32"),
        (dict(epsilon=1e-6), (4, 2, 2, 3), "float32"),
    ],
)
def test_fused_true_where_it_cannot_apply_is_an_error(kwargs, shape, dtype):
    layer = BatchRenormalization(fused=True, dtype=dtype, **kwargs)
    with pytest.raises(ValueError, match="fused=True"):
        layer(tf.zeros(shape, dtype), training=True)


def _infer_graph_ops(layer, shape, dtype):
    graph = tf.function(lambda x: layer(x, training=False)).get_concrete_function(tf.TensorSpec(shape, dtype)).graph
    ops = {op.type for op in graph.get_operations()}
    for fn in graph._functions.values():  # tf.cond branches
        ops.update(node.op for node in fn.cached_definition.node_def)
    return ops


@pytest.mark.parametrize(
    "dtype,fused,expected", [("float32", None, True), ("float32", False, False), ("float64", None, False)]
)
def test_inference_kernel_is_what_runs(dtype, fused, expected):
    layer = BatchRenormalization(fused=fused, dtype=dtype)
    layer.build((4, 2, 2, 3))
    assert ("FusedBatchNormV3" in _infer_graph_ops(layer, (4, 2, 2, 3), dtype)) == expected


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])  # fused inference kernel / exact fallback
@pytest.mark.parametrize("shape,axis", [((32, 2, 2, 4), -1), ((32, 4, 2, 2), 1), ((32, 4, 3), 1), ((64, 4), -1)])
def test_inference_matches_oracle_with_gradients(shape, axis, offset, mode):
    """Inference output and its gradients (x, gamma, beta; the frozen-layer case) in float32.

    offset 0: moving statistics of ordinary size (the fused kernel runs);
    offset 1000 with stddev 0.01: the kernel's x * a + b form would lose 2e-3
    in float32, so the exact (x - mean) * a + beta runs and must match too.
    """
    rng = np.random.default_rng(10)
    c = shape[axis]
    fshape = [1] * len(shape)
    fshape[axis] = c
    scale = 0.01 if offset else 1.0
    mean = offset + scale * rng.normal(0.0, 1.0, c)
    stddev = scale * rng.uniform(0.5, 2.0, c)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0.0, 0.5, c)
    x = (mean.reshape(fshape) + stddev.reshape(fshape) * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape)
    layer = BatchRenormalization(axis=axis, dtype="float32")
    layer.build(shape)
    for w, v in ((layer.gamma, gamma), (layer.beta, beta), (layer.moving_mean, mean), (layer.moving_stddev, stddev)):
        w.assign(v)

    def run(xv):
        with tf.GradientTape() as tape:
            tape.watch(xv)
            y = layer(xv, training=False)
            loss = tf.reduce_sum(tf.cast(y, tf.float64) * dy)
        return (y,) + tuple(tape.gradient(loss, [xv, layer.gamma, layer.beta]))

    fn = run if mode == "eager" else tf.function(run, jit_compile=(mode == "jit"))
    y, dx, dgamma, dbeta = fn(tf.constant(x))
    g32 = [np.float32(v).astype(np.float64) for v in (gamma, beta, mean, stddev)]
    gamma64, beta64, mean64, std64 = (v.reshape(fshape) for v in g32)
    x64 = x.astype(np.float64)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    assert_close(y.numpy(), gamma64 * (x64 - mean64) / std64 + beta64, "float32", "value", "y")
    assert_close(dx.numpy(), np.broadcast_to(dy * gamma64 / std64, shape), "float32", "grad", "dx")
    assert_close(dgamma.numpy(), (dy * (x64 - mean64) / std64).sum(red), "float32", "grad", "dgamma")
    assert_close(dbeta.numpy(), dy.sum(red), "float32", "grad", "dbeta")
    assert int(layer.step.numpy()) == 0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_inference_mixed_precision(policy, offset):
    rng = np.random.default_rng(11)
    c = 4
    mean = offset + rng.normal(0.0, 1.0, c) * (0.01 if offset else 1.0)
    stddev = rng.uniform(0.5, 2.0, c) * (0.01 if offset else 1.0)
    layer = BatchRenormalization(dtype=policy)
    layer.build((16, 3, 3, c))
    layer.moving_mean.assign(mean)
    layer.moving_stddev.assign(stddev)
    dtype = policy.split("_")[1]
    x = tf.cast(tf.constant(mean + stddev * rng.standard_normal((16, 3, 3, c))), dtype)
    y = layer(x, training=False)
    assert y.dtype == dtype
    x64 = tf.cast(x, tf.float64).numpy()
    ref = (x64 - np.float32(mean)) / np.float32(stddev)
    assert_close(y.numpy(), ref, dtype, "value", "y")
