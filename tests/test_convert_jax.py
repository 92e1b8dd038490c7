"""Flax batch norm in and out, and the drop-in gaps (docs/SPEC.md, section 14).

The linen model is written the way Flax's ImageNet example writes its ResNet
(``norm`` passed as a ``functools.partial``, ``axis_name="batch"``, automatic
and explicit module names, the last stage 1x1 on a 32x32 input).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from parity import assert_close

import renorm.jax.nnx as rnnx
from renorm.jax import BatchRenorm, convert_batch_norm, export_batch_norm


def rel(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    return np.linalg.norm(a - e) / np.linalg.norm(e)


# ------------------------------------------------- the ImageNet example's ResNet
class ResNetBlock(nn.Module):
    filters: int
    conv: Callable
    norm: Callable
    act: Callable
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    num_classes: int
    norm_cls: Any = nn.BatchNorm
    num_filters: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            self.norm_cls,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name="batch",
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=nn.relu)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def resnet(norm_cls, **kw):
    return ResNet(stage_sizes=[1, 1, 1, 1], num_classes=5, norm_cls=norm_cls, **{"num_filters": 8, **kw})


def randomize(variables, seed=0):
    """A 'trained checkpoint' of the shapes and dtypes of ``variables``: random params and statistics."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = str(path[-1])
        if "var" in name:
            value = rng.uniform(0.3, 2.0, leaf.shape)
        elif jnp.issubdtype(leaf.dtype, jnp.integer):
            value = np.zeros(leaf.shape)
        else:
            value = rng.normal(0, 0.3, leaf.shape) + (1.0 if "scale" in name else 0.0)
        out.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def initialized(model, key=None):
    """The example's init, one 32x32 example, train=True (the default), traced only.

    ``jax.eval_shape`` runs the modules' Python exactly as ``init`` does (where the old
    check raised) without compiling the model: shapes and dtypes of every variable.
    """
    key = jax.random.key(0) if key is None else key
    return jax.eval_shape(model.init, {"params": key}, jnp.ones((1, 32, 32, 3), model.dtype))


# ------------------------------------------------------------------- linen
def test_imagenet_style_init_on_one_example():
    bn_vars = initialized(resnet(nn.BatchNorm))  # the last stage is 1x1: 1 value per feature
    variables = initialized(resnet(BatchRenorm))
    stats = variables["batch_stats"]["ResNetBlock_3"]["BatchRenorm_1"]
    assert stats["step"].dtype == jnp.int32 and stats["stddev"].shape == (64,)
    # The values init gives such a layer: the initial state, nothing computed from the batch.
    v = BatchRenorm(use_running_average=False).init(jax.random.key(0), 5.0 + jnp.arange(8.0).reshape(1, 1, 1, 8))
    np.testing.assert_array_equal(v["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(v["batch_stats"]["stddev"], 1.0)
    assert v["batch_stats"]["step"].dtype == jnp.int32 and int(v["batch_stats"]["step"]) == 0
    # The same parameters as the batch-norm model's (only the norms' names differ).
    assert len(jax.tree.leaves(variables["params"])) == len(jax.tree.leaves(bn_vars["params"]))
    # Same for micro-batches that one example cannot fill.
    BatchRenorm(use_running_average=False, microbatch_size=4).init(jax.random.key(0), jnp.ones((1, 3)))
    # A training call on such a batch is still an error.
    module = BatchRenorm(use_running_average=False)
    v = module.init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="holds 1"):
        module.apply(v, jnp.ones((1, 3)), mutable=["batch_stats"])


def test_linen_checkpoint_in_and_out():
    """A BN checkpoint into the renorm ResNet and back: inference outputs equal to float32 rounding.

    (Flax's BatchNorm keeps its batch_stats in float32 whatever the dtype, so float32 is the
    precision of this comparison; the conversion itself is float64.)
    """
    bn_model, rn_model = resnet(nn.BatchNorm), resnet(BatchRenorm)
    checkpoint = randomize(initialized(bn_model))
    target = initialized(rn_model)  # shapes and dtypes are all a target needs
    converted = convert_batch_norm(checkpoint, target, epsilon=1e-5)
    assert jax.tree.structure(converted) == jax.tree.structure(target)
    assert jax.tree.map(lambda a: a.dtype, converted) == jax.tree.map(lambda a: a.dtype, target)
    var = checkpoint["batch_stats"]["ResNetBlock_2"]["norm_proj"]["var"]
    # Kept elementwise (not assert_close): at section 9's float32 1e-5 a conversion that forgot epsilon=1e-5
    # (stddev off by about 5e-6 relative at these variances) would pass; rtol is the float32 rounding here.
    np.testing.assert_allclose(
        converted["batch_stats"]["ResNetBlock_2"]["norm_proj"]["stddev"], np.sqrt(np.float64(var) + 1e-5), rtol=1e-7
    )
    assert int(converted["batch_stats"]["ResNetBlock_0"]["BatchRenorm_0"]["step"]) == 0
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    infer = lambda model: jax.jit(functools.partial(model.apply, train=False))  # noqa: E731
    y_bn = infer(bn_model)(checkpoint, x)
    assert rel(infer(rn_model)(converted, x), y_bn) <= 1e-5

    exported = export_batch_norm(converted, initialized(bn_model), epsilon=1e-5)
    assert jax.tree.structure(exported) == jax.tree.structure(checkpoint)
    # Kept elementwise, as above: an export that forgot epsilon (variance off by 1e-5 absolute) would pass 1e-5.
    for a, e in zip(jax.tree.leaves(exported), jax.tree.leaves(checkpoint)):
        np.testing.assert_allclose(a, e, rtol=2e-6, atol=1e-7)
    assert rel(infer(bn_model)(exported, x), y_bn) <= 1e-5


def test_linen_mismatched_restore_is_an_error():
    checkpoint = randomize(initialized(resnet(nn.BatchNorm)))
    target = initialized(resnet(BatchRenorm))
    partial_ckpt = {"params": checkpoint["params"], "batch_stats": dict(checkpoint["batch_stats"])}
    del partial_ckpt["batch_stats"]["bn_init"]
    with pytest.raises(ValueError, match="have no source: .*batch_stats/bn_init/stddev"):
        convert_batch_norm(partial_ckpt, target, epsilon=1e-5)
    bigger = initialized(ResNet(stage_sizes=[1, 1, 1, 1], num_classes=5, norm_cls=BatchRenorm, num_filters=16))
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_batch_norm(checkpoint, bigger, epsilon=1e-5)
    deeper = initialized(ResNet(stage_sizes=[1, 1, 1], num_classes=5, norm_cls=BatchRenorm))
    with pytest.raises(ValueError, match="no place in the target"):
        convert_batch_norm(checkpoint, deeper, epsilon=1e-5)
    converted = convert_batch_norm(checkpoint, target, epsilon=1e-5)
    with pytest.raises(ValueError, match="have no source: extra/a"):
        export_batch_norm(converted, {**initialized(resnet(nn.BatchNorm)), "extra": {"a": jnp.ones(1)}}, epsilon=1e-5)


@pytest.mark.parametrize("bad", [-1.0, -4.0, 0.0, float("nan"), float("inf"), True, "1e-3", None])
def test_linen_epsilon_must_be_a_positive_number(bad):
    """issue 22: epsilon=-1 gave stddev 0 (inf outputs) and -4 NaN, with a NumPy warning only."""
    checkpoint = randomize(initialized(resnet(nn.BatchNorm)))
    target = initialized(resnet(BatchRenorm))
    error = TypeError if bad is None else ValueError
    with pytest.raises(error, match="epsilon"):
        convert_batch_norm(checkpoint, target, epsilon=bad)
    converted = convert_batch_norm(checkpoint, target, epsilon=1e-5)
    with pytest.raises(error, match="epsilon"):
        export_batch_norm(converted, initialized(resnet(nn.BatchNorm)), epsilon=bad)
    with pytest.raises(ValueError, match="epsilon"):
        convert_batch_norm(checkpoint, target, epsilon={"bn_init": bad if bad is not None else -1.0})


def test_linen_epsilon_is_required_and_read_from_the_modules():
    """A model built with epsilon 1e-3 (Keras's default): the old 1e-5 default was silently off."""
    from renorm.jax.convert import batch_norm_epsilons

    class Net(nn.Module):
        norm: Any = nn.BatchNorm

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(6)(x)
            x = self.norm(use_running_average=not train, epsilon=1e-3)(x)
            x = nn.relu(nn.Dense(5)(x))
            return self.norm(use_running_average=not train, epsilon=1e-2, name="head_norm")(x)

    x = jax.random.normal(jax.random.key(2), (4, 3))
    bn_model, rn_model = Net(), Net(norm=BatchRenorm)
    checkpoint = randomize(jax.eval_shape(bn_model.init, jax.random.key(0), x))
    for name in ("BatchNorm_0", "head_norm"):  # small variances, where epsilon matters
        checkpoint["batch_stats"][name]["var"] = checkpoint["batch_stats"][name]["var"] * 1e-3
    target = jax.eval_shape(rn_model.init, jax.random.key(0), x)
    with pytest.raises(TypeError, match="needs the batch norms' epsilon"):
        convert_batch_norm(checkpoint, target)
    eps = batch_norm_epsilons(bn_model, x)
    assert eps == {"BatchNorm_0": 1e-3, "head_norm": 1e-2}
    converted = convert_batch_norm(checkpoint, target, epsilon=eps)
    y_bn = bn_model.apply(checkpoint, x)
    assert rel(rn_model.apply(converted, x), y_bn) <= 1e-5
    wrong = convert_batch_norm(checkpoint, target, epsilon=1e-5)
    assert rel(rn_model.apply(wrong, x), y_bn) > 1e-2  # what a wrong epsilon does, silently
    # Back: the renorm model's own epsilons.
    assert batch_norm_epsilons(rn_model, x) == {"BatchRenorm_0": 1e-3, "head_norm": 1e-2}
    exported = export_batch_norm(
        converted, jax.eval_shape(bn_model.init, jax.random.key(0), x), epsilon=batch_norm_epsilons(rn_model, x)
    )
    assert rel(bn_model.apply(exported, x), y_bn) <= 1e-5
    with pytest.raises(ValueError, match="names no epsilon for 1 norm module.*head_norm"):
        convert_batch_norm(checkpoint, target, epsilon={"BatchNorm_0": 1e-3})
    with pytest.raises(ValueError, match="no nn.BatchNorm"):
        batch_norm_epsilons(nn.Dense(3), x)


def test_linen_export_negative_variance():
    module = BatchRenorm(use_running_average=True, epsilon=1e-2)
    v = module.init(jax.random.key(0), jnp.ones((2, 3)))
    v = {**v, "batch_stats": {**v["batch_stats"], "stddev": jnp.asarray([1.0, 0.05, 0.1])}}
    target = nn.BatchNorm(use_running_average=True, epsilon=1e-2).init(jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="1 feature"):
        export_batch_norm(v, target, epsilon=1e-2)
    with pytest.warns(UserWarning, match="moving stddev below sqrt"):
        out = export_batch_norm(v, target, epsilon=1e-2, negative_variance="clamp")
    var = out["batch_stats"]["var"]
    assert_close(var[:1], [0.99], "float32", "value", "exported variance")
    # Clamped (0.05) and at sqrt(epsilon) (0.1): variance 0, an absolute check (a relative one has no scale there).
    np.testing.assert_allclose(var[1:], 0.0, atol=1e-7)


def test_linen_step_survives_the_examples_pmean():
    """The ImageNet example's sync_batch_stats: pmean over batch_stats, then training goes on."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            norm = functools.partial(
                BatchRenorm,
                use_running_average=not train,
                axis_name="batch",
                warmup_steps=1,
                rmax_steps=3,
                dmax_steps=3,
            )
            return nn.Dense(3)(norm(name="bn_init")(nn.Conv(4, (3, 3))(x)).mean((1, 2)))

    model = Net()
    variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    n = jax.local_device_count()
    replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), t)  # noqa: E731
    params, stats = replicate(variables["params"]), replicate(variables["batch_stats"])

    @functools.partial(jax.pmap, axis_name="batch")
    def train_step(params, stats, x):
        y, new = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return new["batch_stats"]

    cross_replica_mean = jax.pmap(lambda x: lax.pmean(x, "x"), "x")
    x = jax.random.normal(jax.random.key(0), (n, 4, 8, 8, 3))
    stats = train_step(params, stats, x)
    synced = cross_replica_mean(stats)
    assert synced["bn_init"]["step"].dtype == jnp.float32  # what pmean does to an int
    stats = train_step(params, synced, x)
    step = stats["bn_init"]["step"]
    assert step.dtype == jnp.int32 and int(step[0]) == 2


def test_functional_train_reads_a_float_step():
    from renorm.jax import functional as F

    state = F.init_state(3)._replace(step=jnp.asarray(6.0, jnp.float32))
    _, new, diag = F.train(
        jnp.ones((4, 3)) * jnp.arange(4.0)[:, None],
        None,
        state,
        F.BatchRenormConfig(rmax=3.0, warmup_steps=2, rmax_steps=10),
    )
    assert new.step.dtype == jnp.int32 and int(new.step) == 7
    np.testing.assert_allclose(diag.rmax, 1 + 2 * 4 / 8)  # a schedule value, not a parity comparison


# --------------------------------------------------------------------- nnx
class CNN(nnx.Module):
    """The Flax MNIST nnx example's CNN, with batch norms."""

    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
        self.blocks = nnx.List([nnx.BatchNorm(16, momentum=0.9, epsilon=1e-3, rngs=rngs)])
        self.head = nnx.Sequential(nnx.Linear(16, 10, rngs=rngs), nnx.BatchNorm(10, rngs=rngs))

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.blocks[0](self.conv2(x)))
        return self.head(x.mean((1, 2)))


def randomize_nnx(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            c = node.num_features
            node.mean[...] = jnp.asarray(rng.normal(0, 0.3, c), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.3, 2.0, c), jnp.float32)
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            node.bias[...] = jnp.asarray(rng.normal(0, 0.3, c), jnp.float32)


def test_nnx_split_with_param_and_batch_stat():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rnnx.BatchRenorm(4, rngs=nnx.Rngs(0)))
    model(jnp.arange(24.0).reshape(6, 4)[:, :3])
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    assert set(nnx.to_pure_dict(batch_stats)["layers"][1]) == {"mean", "stddev", "step", "r_clipped", "d_clipped"}
    merged = nnx.merge(graphdef, params, batch_stats)
    np.testing.assert_array_equal(merged.layers[1].stddev[...], model.layers[1].stddev[...])
    # The diagnostics alone are still selectable.
    diag = nnx.state(model, rnnx.BatchRenormDiagnostic)
    assert set(nnx.to_pure_dict(diag)["layers"][1]) == {"r_clipped", "d_clipped"}


def test_nnx_model_in_and_out():
    model = CNN(rngs=nnx.Rngs(0))
    randomize_nnx(model)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    model.eval()
    y = model(x)

    converted = rnnx.convert_batch_norm(model, rmax=2.0, dmax=1.0, warmup_steps=5)
    norms = [n for _, n in nnx.iter_graph(converted) if isinstance(n, rnnx.BatchRenorm)]
    assert len(norms) == 3 and not any(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(converted))
    assert converted.blocks[0].epsilon == 1e-3 and converted.blocks[0].momentum == 0.9
    assert converted.blocks[0].rmax == 2.0 and converted.blocks[0].warmup_steps == 5
    assert converted.bn1.use_running_average  # eval mode carried
    assert rel(converted(x), y) <= 1e-5
    assert isinstance(model.bn1, nnx.BatchNorm)  # the original is untouched

    exported = rnnx.export_batch_norm(converted)
    assert not any(isinstance(n, rnnx.BatchRenorm) for _, n in nnx.iter_graph(exported))
    assert rel(exported(x), y) <= 1e-5

    # rmax=1, dmax=0 trains as the batch norm it came from (two-pass vs fast variance: float32 rounding).
    model.train()
    as_bn = rnnx.convert_batch_norm(model, rmax=1.0, dmax=0.0)
    # Kept elementwise (see test_linen_checkpoint_in_and_out): section 9's 1e-5 cannot see a forgotten epsilon=1e-5.
    np.testing.assert_allclose(as_bn.bn1.stddev[...], np.sqrt(np.float64(model.bn1.var[...]) + 1e-5), rtol=1e-7)
    assert rel(as_bn(x), model(x)) <= 1e-5


def test_nnx_convert_carries_promote_dtype_and_param_metadata():
    """A converted batch norm computes in the same dtypes and keeps its Params' sharding; export carries them back."""
    meta = dict(scale_metadata={"out_sharding": ("model",), "note": "s"}, bias_metadata={"out_sharding": (None,)})
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0), **meta)
    bn.scale[...] = jnp.asarray([0.5, 1.0, 1.5, 2.0])
    x = jnp.asarray(np.random.default_rng(3).normal(1.0, 2.0, (8, 4)), jnp.bfloat16)
    for layer in (rnnx.convert_batch_norm(bn), rnnx.export_batch_norm(rnnx.convert_batch_norm(bn))):
        assert layer.promote_dtype is bn.promote_dtype
        for name in ("scale", "bias"):
            new, old = getattr(layer, name), getattr(bn, name)
            assert new.get_metadata() == old.get_metadata(), (name, new.get_metadata())
            assert new[...].sharding == old[...].sharding
            np.testing.assert_array_equal(new[...], old[...])
        # Flax's promote_dtype carried: bfloat16 in, float32 parameters -> float32 out, as the batch norm.
        layer.eval()
        assert layer(x).dtype == nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))(x).dtype == jnp.float32
    specs = nnx.get_partition_spec(nnx.state(rnnx.convert_batch_norm(bn), nnx.Param))
    assert specs["scale"].get_value() == jax.sharding.PartitionSpec("model")
    # renorm's own default (no promotion) is not carried out: the export needs no renorm.
    out = rnnx.export_batch_norm(rnnx.BatchRenorm(4, rngs=nnx.Rngs(0)))
    assert out.promote_dtype is nnx.BatchNorm(4, rngs=nnx.Rngs(0)).promote_dtype
    assert "renorm" not in out.promote_dtype.__module__
    spy = lambda args, /, *, dtype=None: args  # noqa: E731
    assert rnnx.export_batch_norm(rnnx.BatchRenorm(4, promote_dtype=spy, rngs=nnx.Rngs(0))).promote_dtype is spy


def test_nnx_convert_errors():
    with pytest.raises(TypeError, match="epsilon"):
        rnnx.convert_batch_norm(CNN(rngs=nnx.Rngs(0)), epsilon=1e-3)
    layer = rnnx.BatchRenorm(3, epsilon=1e-2, rngs=nnx.Rngs(0))
    layer.stddev[...] = jnp.asarray([1.0, 0.05, 0.1])
    with pytest.raises(ValueError, match="1 feature"):
        rnnx.export_batch_norm(layer)
    with pytest.warns(UserWarning, match="below sqrt"):
        bn = rnnx.export_batch_norm(layer, negative_variance="clamp")
    assert isinstance(bn, nnx.BatchNorm)
    assert_close(bn.var[...][:1], [0.99], "float32", "value", "exported variance")
    # Clamped (0.05) and at sqrt(epsilon) (0.1): variance 0, an absolute check (a relative one has no scale there).
    np.testing.assert_allclose(bn.var[...][1:], 0.0, atol=1e-7)


@pytest.mark.parametrize("bad", [None, 3, {"bn": 1}])
def test_nnx_converters_refuse_what_is_not_a_module(bad):
    """issue 22: convert_batch_norm(None) returned None."""
    for fn in (rnnx.convert_batch_norm, rnnx.export_batch_norm):
        with pytest.raises(TypeError, match="`model` must be an nnx.Module"):
            fn(bad)


def test_nnx_convert_under_eval_shape_builds_the_abstract_model():
    """issue 22: nnx.eval_shape (the usual abstract model for an orbax restore) failed with a tracer error."""
    abstract = nnx.eval_shape(lambda: rnnx.convert_batch_norm(CNN(rngs=nnx.Rngs(0)), rmax=3.0, dmax=5.0))
    concrete = rnnx.convert_batch_norm(CNN(rngs=nnx.Rngs(0)), rmax=3.0, dmax=5.0)
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))  # noqa: E731
    assert shapes(abstract) == shapes(concrete)
    assert isinstance(abstract.bn1, rnnx.BatchRenorm) and abstract.blocks[0].epsilon == 1e-3
    back = nnx.eval_shape(lambda: rnnx.export_batch_norm(rnnx.convert_batch_norm(CNN(rngs=nnx.Rngs(0)))))
    assert shapes(back) == shapes(CNN(rngs=nnx.Rngs(0)))


def test_batch_norm_epsilons_with_a_static_keyword_argument():
    """issue 32: the call of its own docstring, ``train=False``, failed with TracerBoolConversionError."""
    from renorm.jax.convert import batch_norm_epsilons

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool, *, scale=None):
            x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(nn.Dense(4)(x))
            return x if scale is None else x * scale

    x = jnp.ones((4, 3))
    assert batch_norm_epsilons(Net(), x, train=False) == {"BatchNorm_0": 1e-3}
    assert batch_norm_epsilons(Net(), x, False) == {"BatchNorm_0": 1e-3}  # positional flags are closed over too
    assert batch_norm_epsilons(Net(), x, train=True, scale=jnp.float32(2.0)) == {"BatchNorm_0": 1e-3}


def test_nnx_converters_take_a_model_of_shapes_only():
    """issue 32: convert_batch_norm(nnx.eval_shape(lambda: Model(...))) failed in float() of a ShapeDtypeStruct."""
    abstract_bn = nnx.eval_shape(lambda: CNN(rngs=nnx.Rngs(0)))
    abstract = rnnx.convert_batch_norm(abstract_bn, rmax=2.0)
    concrete = rnnx.convert_batch_norm(CNN(rngs=nnx.Rngs(0)), rmax=2.0)
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))  # noqa: E731
    assert shapes(abstract) == shapes(concrete)
    assert isinstance(abstract.bn1, rnnx.BatchRenorm) and abstract.bn1.rmax == 2.0
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(abstract)))
    back = rnnx.export_batch_norm(abstract)
    assert isinstance(back.bn1, nnx.BatchNorm) and shapes(back) == shapes(CNN(rngs=nnx.Rngs(0)))
    assert isinstance(abstract_bn.bn1, nnx.BatchNorm)  # the original is untouched
