"""renorm.keras.BatchRenormalization on one Keras backend, in a fresh interpreter (the backend is fixed per process).

    KERAS_BACKEND=jax JAX_ENABLE_X64=1 python tests/keras_backend_script.py parity
    KERAS_BACKEND=jax python tests/keras_backend_script.py citizen [apps]

Run by tests/test_keras_backends.py for every backend installed. ``parity``
runs the shared case registry (tests/parity.py) against the NumPy oracle at
docs/SPEC.md's tolerances (section 9): every training step (y, dx, dgamma,
dbeta of sum(y * dy), moving statistics, step, clip fractions), then
inference; float64 and float32, explicit gradient and autodiff, compiled
(``jax.jit`` of ``stateless_call``) and eager, masks, mixed precision.
``citizen``: errors, fit, a custom loop (``jax.value_and_grad`` of
``stateless_call`` / ``GradientTape`` / torch autograd), save and load
(``.keras``, ``.weights.h5``), ``from_config`` of a batch norm's config.
``apps``: a keras.applications model (weights=None) converted with
``renorm.keras.convert_batch_norm``: inference equal to the original's,
fit, save, reload, export. Prints ``<section> OK`` after each section.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402
from parity import (  # noqa: E402
    CASES,
    CONFIG_ERRORS,
    MASK_CASES,
    assert_close,
    check,
    make_params,
    make_steps,
)

from renorm.keras import BatchRenormalization, convert_batch_norm, export_batch_norm  # noqa: E402
from renorm.numpy_ref import BatchRenormReference  # noqa: E402
from renorm.testing import oracle  # noqa: E402
from renorm.testing.adapters import KerasAdapter  # noqa: E402

BACKEND = keras.backend.backend()
BY_NAME = {c.name: c for c in CASES}


def np_(v):
    return np.asarray(ops.convert_to_numpy(v))


def make_pair(case, seed, *, momentum, dtype, epsilon=1e-3, explicit_gradient=True):
    p = make_params(case, seed)
    layer = BatchRenormalization(
        momentum=momentum,
        epsilon=epsilon,
        center=case.center,
        scale=case.scale,
        dtype=dtype,
        explicit_gradient=explicit_gradient,
        **case.layer_kwargs(),
    )
    layer.build(case.shape)
    for name, key in (("gamma", "gamma"), ("beta", "beta"), ("moving_mean", "mean"), ("moving_stddev", "stddev")):
        if getattr(layer, name) is not None:
            getattr(layer, name).assign(p[key])
    ref = oracle(case, momentum=momentum, epsilon=epsilon, params=p)
    return layer, ref


def check_against_oracle(
    case, seed, *, dtype, momentum=0.5, explicit_gradient=True, compiled=True, masked=False, tol_dtype=None
):
    """Train ``case.steps`` steps, then infer; everything against the float64 oracle at every step, through the
    driver of ``renorm.testing`` (``dtype`` ``"mixed_float16"``/``"mixed_bfloat16"``: that policy). Returns
    ``(layer, report)``."""
    adapter = KerasAdapter(mode="function" if compiled else "eager", explicit_gradient=explicit_gradient)
    run_dtype = tol_dtype or dtype.removeprefix("mixed_")
    report = check(adapter, [case], dtype=run_dtype, momentum=momentum, epsilon=1e-3, seed=seed, masked=masked)
    report.assert_passed()
    return adapter.last_layer, report


def parity():
    n = 0
    for case in CASES:
        for dtype in ("float64", "float32"):
            check_against_oracle(case, 1, dtype=dtype)
            n += 1
        check_against_oracle(case, 2, dtype="float64", explicit_gradient=False, momentum=0.99)
        n += 1
    for name in ("nhwc_mb2_tight", "schedule", "nchw_axis1"):
        check_against_oracle(BY_NAME[name], 3, dtype="float64", compiled=False)
        n += 1
    for case in MASK_CASES:
        for explicit in (True, False):
            check_against_oracle(case, 1, dtype="float64", masked=True, explicit_gradient=explicit)
            n += 1
    for case in MASK_CASES[:3]:
        check_against_oracle(case, 1, dtype="float32", masked=True)
        n += 1
    for name, explicit in (("nhwc_mb2_tight", True), ("dense_mb4_tight", False), ("schedule", True)):
        for policy in ("mixed_float16", "mixed_bfloat16"):
            layer, _ = check_against_oracle(
                BY_NAME[name], 4, dtype=policy, momentum=0.9, explicit_gradient=explicit, tol_dtype=policy.split("_")[1]
            )
            assert layer.compute_dtype == policy.split("_")[1]
            for w in layer.weights:
                assert w.dtype == ("float32" if w.name != "step" else w.dtype), (w.name, w.dtype)
            n += 1
    print(f"parity: {n} runs of the registry against the oracle")
    if BACKEND != "tensorflow":  # the layer imports TensorFlow on the TensorFlow backend only
        assert "tensorflow" not in sys.modules, "renorm.keras imported TensorFlow on the " + BACKEND + " backend"
    print("parity OK")


# ---------------------------------------------------------------- a Keras citizen
def raises(exc, words, fn):
    try:
        fn()
    except exc as err:
        assert words in str(err), (words, str(err))
        return
    raise AssertionError(f"no {exc.__name__} with {words!r}")


def citizen(tmp):
    rng = np.random.default_rng(0)
    # Errors: the shared configuration list, the input errors, the backend-only options.
    for kwargs, exc, words in CONFIG_ERRORS:
        raises(exc, words, lambda: BatchRenormalization(**kwargs))
    raises(ValueError, "holds 1", lambda: BatchRenormalization()(np.zeros((1, 3), "float32"), training=True))
    raises(
        ValueError,
        "batch of 8 examples and microbatch_size=3",
        lambda: BatchRenormalization(microbatch_size=3)(np.zeros((8, 3), "float32"), training=True),
    )
    raises(TypeError, "int32", lambda: BatchRenormalization()(np.zeros((4, 3), "int32"), training=True))
    raises(ValueError, "axis=3", lambda: BatchRenormalization(axis=3)(np.zeros((4, 3), "float32"), training=True))
    raises(
        ValueError,
        "`mask`",
        lambda: BatchRenormalization()(np.zeros((4, 3), "float32"), training=True, mask=np.ones((4, 3), bool)),
    )
    if BACKEND != "tensorflow":
        raises(ValueError, "synchronized=True", lambda: BatchRenormalization(synchronized=True))
        raises(ValueError, "fused=True", lambda: BatchRenormalization(fused=True))

    # Empty batch: empty output, state untouched; a NaN batch keeps the state, advances the step.
    layer = BatchRenormalization(momentum=0.5)
    layer.build((None, 2, 3))
    layer.step.assign(7)
    before = [np_(w).copy() for w in layer.non_trainable_weights]
    assert tuple(layer(np.zeros((0, 2, 3), "float32"), training=True).shape) == (0, 2, 3)
    for w, v in zip(layer.non_trainable_weights, before):
        np.testing.assert_array_equal(np_(w), v, err_msg=w.name)
    x = rng.standard_normal((8, 3)).astype("float32")
    nan_layer = BatchRenormalization(momentum=0.5)
    nan_layer(x, training=True)
    mean = np_(nan_layer.moving_mean).copy()
    x[2, 1] = np.nan
    y = np_(nan_layer(x, training=True))
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    np.testing.assert_array_equal(np_(nan_layer.moving_mean), mean)
    assert int(np_(nan_layer.step)) == 2

    # fit(): one step at learning rate 0 is one oracle step; predict() is the oracle's inference.
    x = rng.normal(2.0, 3.0, (8, 4)).astype(np.float32)
    target = rng.standard_normal((8, 4)).astype(np.float32)
    layer = BatchRenormalization(momentum=0.5, microbatch_size=4, rmax=1.2, dmax=0.2)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    model.fit(x, target, batch_size=8, epochs=1, verbose=0, shuffle=False)
    ref = BatchRenormReference(4, momentum=0.5, epsilon=1e-3, microbatch_size=4, rmax=1.2, dmax=0.2)
    ref.train(x.astype(np.float64))
    assert int(np_(layer.step)) == 1
    assert_close(np_(layer.moving_mean), ref.mean, "float32", "value", "fit mean")
    assert_close(np_(layer.moving_stddev), ref.stddev, "float32", "value", "fit stddev")
    np.testing.assert_allclose(float(np_(layer.r_clipped_fraction)), ref.r_clipped, atol=1e-6)  # a ratio of counts
    assert_close(model.predict(x, verbose=0), ref.infer(x.astype(np.float64)), "float32", "value", "predict")

    # fit() learns: a conv net with micro-batches; gamma and beta move, the schedule's step counts.
    xi = rng.standard_normal((16, 4, 4, 2)).astype(np.float32)
    ti = rng.standard_normal((16, 1)).astype(np.float32)
    brn = BatchRenormalization(microbatch_size=4, warmup_steps=1, rmax_steps=3, rmax=2.0, dmax=1.0)
    net = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.Conv2D(3, 3, padding="same"),
            brn,
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )
    net.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    before = [np_(w).copy() for w in brn.trainable_weights]
    net.fit(xi, ti, batch_size=8, epochs=2, verbose=0)
    assert int(np_(brn.step)) == 4
    assert all(np.abs(np_(a) - b).max() > 0 for a, b in zip(brn.trainable_weights, before))

    # Custom loop: gradients of a whole model against the oracle (first-layer renorm, float32).
    case = BY_NAME["nhwc_mb2_tight"]
    check_against_oracle(case, 5, dtype="float32", compiled=True)

    # Save and load: .keras and .weights.h5, exact weights, same outputs, training continues identically.
    case = BY_NAME["schedule"]
    layer, _ = make_pair(case, 13, momentum=0.5, dtype="float32")
    inp = keras.Input(case.shape[1:])
    model = keras.Model(inp, layer(inp))
    xs, x_eval, _ = make_steps(case, 13, np.float32)
    for x in xs[:3]:
        layer(x, training=True)
    path = os.path.join(tmp, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    new = loaded.layers[-1]
    assert isinstance(new, BatchRenormalization) and new.get_config() == layer.get_config()
    for a, b in zip(layer.weights, new.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(np_(a), np_(b))
    np.testing.assert_array_equal(np_(loaded(x_eval, training=False)), np_(model(x_eval, training=False)))
    np.testing.assert_array_equal(np_(new(xs[3], training=True)), np_(layer(xs[3], training=True)))
    np.testing.assert_array_equal(np_(new.moving_stddev), np_(layer.moving_stddev))
    wpath = os.path.join(tmp, "m.weights.h5")
    model.save_weights(wpath)
    other, _ = make_pair(case, 14, momentum=0.5, dtype="float32")
    inp = keras.Input(case.shape[1:])
    model2 = keras.Model(inp, other(inp))
    model2.load_weights(wpath)
    for a, b in zip(layer.weights, other.weights):
        np.testing.assert_array_equal(np_(a), np_(b))
    assert int(np_(other.step)) == 4

    # from_config of a batch norm's config: its initial inference output.
    bn = keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-2, center=False, name="bn7")
    brn = BatchRenormalization.from_config(bn.get_config())
    assert (brn.axis, brn.momentum, brn.epsilon, brn.center, brn.name) == (1, 0.9, 1e-2, False, "bn7")
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    assert_close(np_(brn(x, training=False)), np_(bn(x, training=False)), "float32", "value", "y vs batch norm")
    assert BatchRenormalization.from_config(brn.get_config()).get_config() == brn.get_config()
    print("citizen OK")


# ---------------------------------------------------------------- keras.applications
def randomize_batch_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.2, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, c).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))


def count(model, cls):
    return sum(isinstance(lay, cls) for lay in model._flatten_layers(include_self=False, recursive=True))


def rel(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    return np.linalg.norm(a - e) / np.linalg.norm(e)


def apps(tmp):
    """MobileNetV2 (weights=None), converted: equal inference, fit, save (.keras), reload, export."""
    model = keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    randomize_batch_norms(model)
    n_bn = count(model, keras.layers.BatchNormalization)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 32, 32, 3)).astype("float32")
    y = np_(model(x, training=False))
    converted = convert_batch_norm(model, rmax=2.0, dmax=1.0, warmup_steps=1, rmax_steps=3, microbatch_size=4)
    assert count(converted, keras.layers.BatchNormalization) == 0 and count(converted, BatchRenormalization) == n_bn
    assert rel(np_(converted(x, training=False)), y) <= 1e-5
    head = keras.layers.Dense(2)(converted.output)
    clf = keras.Model(converted.input, head)
    clf.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    clf.fit(x, rng.normal(size=(8, 2)).astype("float32"), batch_size=8, epochs=2, verbose=0)
    layers = [lay for lay in clf._flatten_layers(include_self=False) if isinstance(lay, BatchRenormalization)]
    assert all(int(np_(lay.step)) == 2 for lay in layers)
    y_fit = np_(clf(x, training=False))
    path = os.path.join(tmp, "app.keras")
    clf.save(path)
    loaded = keras.models.load_model(path)
    assert count(loaded, BatchRenormalization) == n_bn
    assert_close(np_(loaded(x, training=False)), y_fit, "float32", "value", "reloaded model's output")
    exported = export_batch_norm(loaded)
    assert count(exported, BatchRenormalization) == 0
    assert rel(np_(exported(x, training=False)), y_fit) <= 1e-5
    print("apps OK")


if __name__ == "__main__":
    sections = sys.argv[1:] or ["parity", "citizen", "apps"]
    print("backend", BACKEND)
    with tempfile.TemporaryDirectory() as tmp:
        for section in sections:
            if section == "parity":
                parity()
            elif section == "citizen":
                citizen(tmp)
            elif section == "apps":
                apps(tmp)
            else:
                raise SystemExit(f"unknown section {section!r}: parity, citizen or apps")
