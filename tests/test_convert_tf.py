"""Keras batch norm in and out (docs/SPEC.md, section 14): configs, whole-model conversion, export."""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from parity import assert_close  # noqa: E402

from renorm.tf import BatchRenormalization, convert_batch_norm, export_batch_norm  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"float32": 1e-5, "float64": 1e-12}


def rel(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    return np.linalg.norm(a - e) / np.linalg.norm(e)


@pytest.fixture
def floatx():
    """Set Keras' default float type and dtype policy for the test (keras.applications builds in it)."""
    old, old_policy = keras.config.floatx(), keras.config.dtype_policy()

    def set_dtype(dtype):
        keras.config.set_floatx(dtype)
        keras.config.set_dtype_policy(dtype)

    yield set_dtype
    keras.config.set_floatx(old)
    keras.config.set_dtype_policy(old_policy)


def randomize_batch_norms(model, seed=0):
    """Random BN weights and statistics, as a trained checkpoint would have."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.2, c).astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, c).astype(layer.moving_variance.dtype))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype(layer.gamma.dtype))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.2, c).astype(layer.beta.dtype))


def count(model, cls):
    return sum(isinstance(layer, cls) for layer in model._flatten_layers(include_self=False, recursive=True))


# ------------------------------------------------------------- from_config
def test_from_config_of_a_batch_norm():
    bn = keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-2, center=False, name="bn7")
    layer = BatchRenormalization.from_config(bn.get_config())
    assert (layer.axis, layer.momentum, layer.epsilon, layer.center, layer.name) == (1, 0.9, 1e-2, False, "bn7")
    # moving_variance_initializer "ones" is mapped exactly: the initial inference output is batch norm's.
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype("float32")
    assert_close(layer(x, training=False).numpy(), bn(x, training=False).numpy(), "float32", "value", "y vs batch norm")
    assert_close(layer.moving_stddev.numpy(), np.full(3, np.sqrt(1.01)), "float32", "value", "moving_stddev")
    # ... and the result round-trips through its own config.
    again = BatchRenormalization.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()


def test_from_config_constant_variance():
    bn = keras.layers.BatchNormalization(moving_variance_initializer=keras.initializers.Constant(4.0), epsilon=0.5)
    layer = BatchRenormalization.from_config(bn.get_config())
    layer.build((2, 3))
    assert_close(layer.moving_stddev.numpy(), np.full(3, np.sqrt(4.5)), "float32", "value", "moving_stddev")


def test_from_config_renorm_true_is_a_clear_error():
    bn = keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0})
    with pytest.raises(ValueError) as info:
        BatchRenormalization.from_config(bn.get_config())
    msg = str(info.value)
    assert "renorm=True" in msg and "rmax=R, dmax=D" in msg and "'rmax': 2.0" in msg


def test_from_config_unmappable_initializers():
    bn = keras.layers.BatchNormalization(moving_variance_initializer="random_uniform")
    with pytest.raises(ValueError, match="moving_variance_initializer"):
        BatchRenormalization.from_config(bn.get_config())
    config = {**keras.layers.BatchNormalization().get_config(), "moving_stddev_initializer": "ones"}
    with pytest.raises(ValueError, match="both"):
        BatchRenormalization.from_config(config)


# ------------------------------------------------------- whole models in/out
APPS = {
    "ResNet50": lambda: keras.applications.ResNet50(
        weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3)
    ),
    "MobileNetV2": lambda: keras.applications.MobileNetV2(
        weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3)
    ),
}


@pytest.mark.parametrize("app,dtype", [("ResNet50", "float32"), ("ResNet50", "float64"), ("MobileNetV2", "float32")])
def test_application_in_and_out(app, dtype, floatx):
    floatx(dtype)
    model = APPS[app]()
    randomize_batch_norms(model)
    n_bn = count(model, keras.layers.BatchNormalization)
    assert n_bn > 10
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(dtype)
    y = model(x, training=False).numpy()

    converted = convert_batch_norm(model, rmax=2.0, dmax=1.0, warmup_steps=10, rmax_steps=20)
    assert count(converted, keras.layers.BatchNormalization) == 0
    assert count(converted, BatchRenormalization) == n_bn
    layer = next(lay for lay in converted.layers if isinstance(lay, BatchRenormalization))
    assert (layer.rmax, layer.dmax, layer.warmup_steps, layer.rmax_steps) == (2.0, 1.0, 10, 20)
    assert int(layer.step.numpy()) == 0 and layer.moving_stddev.dtype == dtype
    y_in = converted(x, training=False).numpy()
    assert y_in.dtype == dtype
    assert rel(y_in, y) <= TOL[dtype]

    exported = export_batch_norm(converted)
    assert count(exported, BatchRenormalization) == 0
    assert count(exported, keras.layers.BatchNormalization) == n_bn
    assert rel(exported(x, training=False).numpy(), y) <= TOL[dtype]
    # The original model was left alone.
    assert count(model, keras.layers.BatchNormalization) == n_bn
    np.testing.assert_array_equal(model(x, training=False).numpy(), y)


def test_converted_with_batch_norm_limits_trains_as_batch_norm(floatx):
    """rmax=1, dmax=0: the converted model's training output is the original's (float64).

    The tolerance is section 9's float64 one: in training the last stages' groups hold only a few
    values per feature (4 examples of 1x1), where rounding is amplified (section 6).
    """
    floatx("float64")
    model = APPS["MobileNetV2"]()
    randomize_batch_norms(model, seed=3)
    converted = convert_batch_norm(model, rmax=1.0, dmax=0.0)
    x = np.random.default_rng(2).normal(size=(4, 32, 32, 3))
    assert rel(converted(x, training=True).numpy(), model(x, training=True).numpy()) <= 1e-10


def test_nested_model_and_frozen_layers():
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4),
            # a random variance initializer has no stddev counterpart; the carried weights make it moot
            keras.layers.BatchNormalization(trainable=False, moving_variance_initializer="random_uniform"),
        ],
        name="inner",
    )
    inp = keras.Input((6,))
    out = keras.layers.BatchNormalization(name="outer_bn", epsilon=0.1)(inner(inp))
    model = keras.Model(inp, out)
    randomize_batch_norms(model)
    converted = convert_batch_norm(model)
    assert count(converted, BatchRenormalization) == 2 and count(converted, keras.layers.BatchNormalization) == 0
    renorms = [lay for lay in converted._flatten_layers(include_self=False) if isinstance(lay, BatchRenormalization)]
    assert sorted(lay.trainable for lay in renorms) == [False, True]  # the frozen batch norm stays frozen
    assert converted.get_layer("outer_bn").epsilon == 0.1
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    assert rel(converted(x).numpy(), model(x).numpy()) <= 1e-6


def test_unknown_option_subclassed_model_and_hidden_layer_are_errors():
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    with pytest.raises(TypeError, match="epsilon"):
        convert_batch_norm(model, epsilon=1e-3)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    sub = Sub()
    sub(np.zeros((2, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed"):
        convert_batch_norm(sub)

    @keras.saving.register_keras_serializable(package="renorm_test")
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    hidden = keras.Sequential([keras.Input((3,)), Block()])
    with pytest.raises(ValueError, match="could not be replaced"):
        convert_batch_norm(hidden)


# ------------------------------------------------------------------ export
def _renorm_model(stddev):
    model = keras.Sequential([keras.Input((3,)), BatchRenormalization(epsilon=1e-2, name="brn")])
    model.layers[0].moving_stddev.assign(np.asarray(stddev, "float32"))
    return model


def test_export_negative_variance_raises_or_clamps():
    model = _renorm_model([1.0, 0.05, 0.1])  # sqrt(epsilon) = 0.1
    with pytest.raises(ValueError, match="'brn'.*1 feature"):
        export_batch_norm(model)
    with pytest.warns(UserWarning, match="'brn'"):
        exported = export_batch_norm(model, negative_variance="clamp")
    variance = exported.layers[0].moving_variance.numpy()
    assert_close(variance[:1], [1.0 - 1e-2], "float32", "value", "exported variance")
    # Clamped (0.05) and at sqrt(epsilon) (0.1): variance 0, an absolute check (a relative one has no scale there).
    np.testing.assert_allclose(variance[1:], 0.0, atol=1e-7)


def test_export_rounding_below_sqrt_epsilon_is_variance_zero():
    s = np.float32(0.1)
    below = np.nextafter(s, np.float32(0))  # one float32 unit below sqrt(epsilon): rounding, not a bad state
    model = _renorm_model([1.0, below, s])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = export_batch_norm(model)
    variance = exported.layers[0].moving_variance.numpy()
    assert variance[1] == 0.0 and abs(variance[2]) < 1e-8
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    assert rel(exported(x).numpy(), model(x).numpy()) <= 1e-6


def test_exported_model_loads_without_renorm(tmp_path):
    """Train a little, export, save as .keras, load and run with renorm blocked from import."""
    inp = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, padding="same")(inp)
    h = BatchRenormalization(microbatch_size=2, rmax=2.0, dmax=1.0)(h)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(8, 8, 8, 2)).astype("float32")
    model.compile("sgd", "mse")
    model.fit(x, rng.normal(size=(8, 3)), batch_size=4, epochs=2, verbose=0)
    assert int(model.layers[2].step.numpy()) == 4
    y = model(x, training=False).numpy()

    path = str(tmp_path / "plain.keras")
    export_batch_norm(model).save(path)
    np.save(tmp_path / "x.npy", x)
    code = f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "renorm":
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, keras
        model = keras.models.load_model({path!r})
        assert not any(m.split(".")[0] == "renorm" for m in sys.modules)
        np.save({str(tmp_path / "y.npy")!r}, model(np.load({str(tmp_path / "x.npy")!r}), training=False).numpy())
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rel(np.load(tmp_path / "y.npy"), y) <= 1e-5


# ------------------------------------------------------ epsilon (issue 22)
@pytest.mark.parametrize("epsilon", [0.0, -2.0, -1e-3, float("inf"), float("nan")])
def test_convert_refuses_a_batch_norm_epsilon_that_is_not_positive_and_finite(epsilon):
    """The converter reads epsilon from each batch norm (it takes none as argument); a bad one names it."""
    bn = keras.layers.BatchNormalization(epsilon=epsilon, name="bad_bn")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), bn])
    with pytest.raises(ValueError) as info:
        convert_batch_norm(model)
    assert f"epsilon={epsilon!r}" in str(info.value) and "'bad_bn'" in str(info.value)


@pytest.mark.parametrize("epsilon", [0.0, -1e-3, float("inf"), float("nan")])
def test_export_refuses_a_renorm_epsilon_that_is_not_positive_and_finite(epsilon):
    """The layer refuses such an epsilon at construction; one set on the layer afterwards is refused by export."""
    model = _renorm_model([1.0, 1.0, 1.0])
    model.layers[0].epsilon = epsilon
    with pytest.raises(ValueError) as info:
        export_batch_norm(model)
    assert f"epsilon={epsilon!r}" in str(info.value) and "'brn'" in str(info.value)


# ------------------------------------------------------ the edges (issue 32)
def test_a_model_that_is_not_built_is_a_clear_error():
    """A Sequential without keras.Input has no weights yet (it failed with "'NoneType' ... no attribute 'numpy'")."""
    cases = ((convert_batch_norm, keras.layers.BatchNormalization), (export_batch_norm, BatchRenormalization))
    for convert, layer in cases:
        model = keras.Sequential([keras.layers.Dense(3), layer()])
        with pytest.raises(ValueError, match="is not built.*keras.Input.*model.build"):
            convert(model)
        model.build((None, 4))
        assert count(convert(model), BatchRenormalization) == (1 if convert is convert_batch_norm else 0)


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"rmax": 0.5}, ValueError, r"^`rmax` must be a finite number >= 1 .* got rmax=0.5\.$"),
        ({"dmax": -1.0}, ValueError, r"^`dmax` must be"),
        ({"microbatch_size": 0}, ValueError, r"^`microbatch_size` must be"),
        ({"warmup_steps": 10, "rmax_steps": 5}, ValueError, r"^`rmax_steps` must be"),
        ({"rmax": "3"}, TypeError, r"^`rmax` must be a real number"),
    ],
)
def test_convert_refuses_a_bad_option_in_one_line(options, error, message):
    """The layer's own message, before anything is cloned (it was buried in a deserialization TypeError)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    with pytest.raises(error, match=message) as info:
        convert_batch_norm(model, **options)
    assert "deserializing" not in str(info.value) and "\n" not in str(info.value)
