"""``BatchRenorm`` for ``flax.nnx``: a drop-in for ``flax.nnx.BatchNorm``."""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import initializers

from renorm.config import check_num_features
from renorm.conversion import check_negative_variance, stddev_from_variance, variance_from_stddev
from renorm.jax import functional as F

__all__ = ["BatchRenorm", "BatchRenormDiagnostic", "convert_batch_norm", "export_batch_norm", "no_promotion"]

_MISSING_FLAG = (
    "No `use_running_average` argument was provided to BatchRenorm. Consider one of the following options:\n\n"
    "1. Pass `use_running_average` to the constructor:\n\n"
    "  self.bn = BatchRenorm(..., use_running_average=True/False)\n\n"
    "2. Pass `use_running_average` to __call__:\n\n"
    "  self.bn(x, use_running_average=True/False)\n\n"
    "3. Call `model.train()` / `model.eval()`, or use `nnx.view(model, use_running_average=True/False)`.\n"
)


class BatchRenormDiagnostic(nnx.BatchStat):
    """A diagnostic of the last training step (not a parameter).

    A subclass of :class:`nnx.BatchStat`, so that the idiom
    ``nnx.split(model, nnx.Param, nnx.BatchStat)`` covers every variable, as
    with ``nnx.BatchNorm``: the diagnostics travel with the statistics. Filter
    on ``BatchRenormDiagnostic`` to pick them alone.

    >>> layer = BatchRenorm(3, rngs=nnx.Rngs(0))
    >>> sorted(nnx.state(layer, BatchRenormDiagnostic))
    ['d_clipped', 'r_clipped']
    """


def no_promotion(args: tuple, /, *, dtype=None) -> tuple:
    """The default ``promote_dtype`` of :class:`BatchRenorm`: the arrays as they are.

    Called, as ``nnx.BatchNorm`` calls its ``promote_dtype``, with
    ``(x, mean, stddev, scale, bias)`` and ``dtype=module.dtype``. Returning
    them unchanged keeps renorm's dtype rule (``docs/SPEC.md``, section 8):
    computation in at least float32, the output in ``dtype`` or the input's
    dtype. Pass ``promote_dtype=flax.nnx.nn.dtypes.promote_dtype`` for
    ``nnx.BatchNorm``'s default instead (every array cast to their common
    type, e.g. a bfloat16 input with float32 parameters gives a float32
    output).

    >>> x, scale = jnp.ones(2, jnp.bfloat16), jnp.ones(2, jnp.float32)
    >>> [str(a.dtype) for a in no_promotion((x, scale), dtype=None)]
    ['bfloat16', 'float32']
    """
    del dtype
    return args


class BatchRenorm(nnx.Module):
    """Batch Renormalization (Ioffe, 2017, arXiv:1702.03275) for ``flax.nnx``.

    A drop-in for :class:`flax.nnx.BatchNorm` (same arguments and defaults:
    ``use_running_average=False``, ``axis=-1``, ``momentum=0.99``,
    ``epsilon=1e-5``, ...) plus ``rmax``, ``dmax``, ``warmup_steps``,
    ``rmax_steps``, ``dmax_steps``, ``microbatch_size``; ``model.train()`` and
    ``model.eval()`` switch it like ``BatchNorm``. The algorithm, and what an
    empty batch, a non-finite batch and a mask do, are written once in
    ``docs/SPEC.md`` (sections 2-5); the computation is that of
    :class:`renorm.jax.BatchRenorm` (linen) and :mod:`renorm.jax.functional`.

    State: ``scale``, ``bias`` (:class:`nnx.Param`); ``mean``, ``stddev``
    (moving standard deviation, epsilon included), ``step`` (int32)
    (:class:`nnx.BatchStat`); ``r_clipped``, ``d_clipped``
    (:class:`BatchRenormDiagnostic`, a subclass of ``nnx.BatchStat``): the
    fraction of ``r``/``d`` entries the clip changed in the last training
    step. ``nnx.split(model, nnx.Param, nnx.BatchStat)`` therefore covers
    every variable, as with ``nnx.BatchNorm``.

    A training call that is no step (a batch of 0 examples, or a mask that
    selects nothing) changes no state, diagnostics included. The mask is
    ``nnx.BatchNorm``'s, ``layer(x, mask=mask)``, broadcastable to ``x``.
    ``num_features`` must be an integer >= 1.

    ``promote_dtype``, ``scale_metadata``, ``bias_metadata`` as in
    ``nnx.BatchNorm``: ``promote_dtype((x, mean, stddev, scale, bias),
    dtype=self.dtype)`` is called on every call and its result used
    (default :func:`no_promotion`); the moving statistics it returns are
    used in inference, while training reads ``mean``/``stddev`` as stored
    (they enter ``r``, ``d`` and their own update, which ``nnx.BatchNorm``
    also computes from the stored values). The metadata dictionaries are
    given to the ``nnx.Param`` of ``scale`` and ``bias`` (e.g.
    ``{"out_sharding": ("model",)}``).

    Differences from ``nnx.BatchNorm``: ``use_fast_variance`` defaults to
    False (the fast formula cancels to 0 on offset data in float32); with
    ``dtype=None`` and the default ``promote_dtype`` the output has the
    input's dtype; a micro-batch (or batch) with no selected value is
    normalized with the moving statistics (``nnx.BatchNorm`` gives NaN).

    Example:

    >>> import jax
    >>> layer = BatchRenorm(3, microbatch_size=2, rngs=nnx.Rngs(0))
    >>> y = layer(jax.random.normal(jax.random.key(0), (4, 3)))  # training mode: the state moves
    >>> y.shape, int(layer.step[...])
    ((4, 3), 1)
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init=initializers.zeros_init(),
        scale_init=initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = False,
        explicit_backward: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        rmax_steps: int = 0,
        dmax_steps: int = 0,
        microbatch_size: int | None = None,
        promote_dtype: tp.Callable = no_promotion,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        self.num_features = num_features = check_num_features(num_features)
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.explicit_backward = explicit_backward
        self.rmax = rmax
        self.dmax = dmax
        self.warmup_steps = warmup_steps
        self.rmax_steps = rmax_steps
        self.dmax_steps = dmax_steps
        self.microbatch_size = microbatch_size
        self.promote_dtype = promote_dtype
        self.config()  # validate at construction

        shape = (num_features,)
        state_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros(shape, state_dtype))
        self.stddev = nnx.BatchStat(jnp.ones(shape, state_dtype))
        self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)
        self.r_clipped = BatchRenormDiagnostic(jnp.zeros((), jnp.float32))
        self.d_clipped = BatchRenormDiagnostic(jnp.zeros((), jnp.float32))

    def config(self) -> F.BatchRenormConfig:
        """The functional configuration of the current attributes (validated)."""
        return F.BatchRenormConfig.from_module(self)

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes ``x``; in training updates the statistics and diagnostics.

        Args:
          x: the input, batch on axis 0, features on ``axis``.
          use_running_average: overrides the attribute (``model.train()`` /
            ``model.eval()`` set it).
          mask: optional array broadcastable to ``x`` (True or nonzero
            selects): the values the batch statistics are computed from, as
            in ``nnx.BatchNorm``.
        """
        use_running_average = first_from(use_running_average, self.use_running_average, error_msg=_MISSING_FLAG)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, mean, stddev, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.stddev[...], scale, bias), dtype=self.dtype
        )
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        config = self.config()
        if use_running_average:
            F.checked_mask(mask, jnp.asarray(x))
            return F.inference(x, params, F.BatchRenormState(mean, stddev, self.step[...]), config, dtype=self.dtype)
        # Training reads the moving statistics as stored (they enter r, d and their own update).
        state = F.BatchRenormState(self.mean[...], self.stddev[...], self.step[...])
        y, new_state, diag = F.train(x, params, state, config, dtype=self.dtype, mask=mask)
        if jnp.shape(x)[0] == 0:  # an empty batch is no step: statistics, step and diagnostics stay
            return y
        self.mean[...] = new_state.mean
        self.stddev[...] = new_state.stddev
        self.step.set_value(new_state.step)  # int32 again after a pmean made it float
        # A call that selected nothing (diag.empty) keeps the last step's diagnostics.
        self.r_clipped[...] = jnp.where(diag.empty, self.r_clipped[...], diag.r_clipped)
        self.d_clipped[...] = jnp.where(diag.empty, self.d_clipped[...], diag.d_clipped)
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


# ------------------------------------------------------------- conversion
# Fields that nnx.BatchNorm and BatchRenorm share, carried by the converters (docs/SPEC.md, section 14).
_SHARED = (
    "use_running_average",
    "axis",
    "momentum",
    "epsilon",
    "dtype",
    "param_dtype",
    "use_bias",
    "use_scale",
    "axis_name",
    "axis_index_groups",
)
_RENORM_OPTIONS = (
    "rmax",
    "dmax",
    "warmup_steps",
    "rmax_steps",
    "dmax_steps",
    "microbatch_size",
    "explicit_backward",
    "use_fast_variance",
)


def _abstract(value) -> bool:
    """Whether ``value`` is a tracer (``nnx.eval_shape``, ``jax.jit``): no number to check or compute in NumPy."""
    import jax

    return isinstance(value, jax.core.Tracer)


def _shapes_only(model) -> bool:
    """Whether ``model`` holds shapes instead of values (``nnx.eval_shape(lambda: Model(...))``)."""
    import jax

    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model)))


def _replace_modules(model, cls, make):
    """A copy of ``model`` with every ``cls`` sub-module replaced by ``make(old)`` (``model`` untouched).

    A model of shapes only (built under ``nnx.eval_shape``) gives one of shapes only: the
    replacement is itself traced by ``nnx.eval_shape``, where ``make`` sees tracers.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"`model` must be an nnx.Module (a model holding {cls.__name__} layers), got {type(model).__name__}."
        )
    if _shapes_only(model):
        return nnx.eval_shape(lambda m: _replace_modules(m, cls, make), model)
    if isinstance(model, cls):
        return make(model, type(model).__name__)
    model = nnx.clone(model)
    found = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, cls)]
    for path, old in found:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) or not hasattr(parent, str(key)) else getattr(parent, key)
        new = make(old, "/".join(map(str, path)))
        if isinstance(path[-1], int) or not hasattr(parent, str(path[-1])):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    left = ["/".join(map(str, p)) for p, node in nnx.iter_graph(model) if isinstance(node, cls)]
    if left:  # a module reachable by two paths is shared: replacing one reference would split it
        raise ValueError(
            f"{len(left)} {cls.__name__} module(s) could not be replaced (shared between several places): "
            f"{left[:10]}. Nothing was converted."
        )
    return model


def _copy(dst, src):
    dst.set_value(jnp.asarray(src, dtype=dst.get_value().dtype))


def _copy_params(dst, src):
    """``src``'s ``scale`` and ``bias`` Params into ``dst``, with their metadata (sharding annotations included).

    The Param objects are copied whole (value and metadata), so an annotated
    value keeps its sharding without a mesh in scope; the value is cast to
    ``dst``'s ``param_dtype`` (the same, as ``param_dtype`` is a shared field).
    """
    for name in ("scale", "bias"):
        old = getattr(src, name)
        if old is not None:
            new = old.copy()
            new.set_value(jnp.asarray(old.get_value(), dtype=getattr(dst, name).get_value().dtype))
            setattr(dst, name, new)


def convert_batch_norm(model, **renorm_options):
    """A copy of ``model`` with every ``nnx.BatchNorm`` replaced by :class:`BatchRenorm`.

    Each new layer takes the batch norm's ``num_features``, ``axis``,
    ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``,
    ``use_scale``, ``axis_name``, ``axis_index_groups``, ``promote_dtype``
    and train/eval mode, plus ``renorm_options`` (``rmax``, ``dmax``, ``warmup_steps``,
    ``rmax_steps``, ``dmax_steps``, ``microbatch_size``,
    ``explicit_backward``, ``use_fast_variance``), and its state: ``scale`` and
    ``bias`` copied with their metadata (sharding annotations included),
    ``mean`` copied, ``stddev = sqrt(var + epsilon)`` (float64, then
    rounded), ``step`` 0. The inference outputs are the original's to
    rounding. ``model`` itself is not changed; every other module is copied
    (``nnx.clone``). To convert a checkpoint, restore it into the batch-norm
    model first (its own state), then convert the model. A model of shapes
    only (``nnx.eval_shape(lambda: Model(...))``) gives the converted model
    of shapes only, e.g. to restore a renorm checkpoint into.

    Example:

    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, epsilon=0.25, rngs=nnx.Rngs(0)))
    >>> converted = convert_batch_norm(model, rmax=2.0)
    >>> type(converted.layers[1]).__name__, converted.layers[1].stddev[...].tolist()  # sqrt(1 + 0.25)
    ('BatchRenorm', [1.1180340051651, 1.1180340051651, 1.1180340051651])
    """
    unknown = [k for k in renorm_options if k not in _RENORM_OPTIONS]
    if unknown:
        raise TypeError(
            f"convert_batch_norm takes only renorm options ({', '.join(_RENORM_OPTIONS)}); got {unknown}. "
            "The other arguments come from each batch norm."
        )

    def make(bn, name):
        layer = BatchRenorm(
            bn.num_features,
            **{k: getattr(bn, k) for k in _SHARED},
            promote_dtype=bn.promote_dtype,
            **renorm_options,
            rngs=nnx.Rngs(0),
        )
        _copy_params(layer, bn)
        _copy(layer.mean, bn.mean[...])
        var = bn.var[...]
        # Under nnx.eval_shape (an abstract model for orbax) the variance is a tracer: the same expression in jnp.
        _copy(
            layer.stddev,
            jnp.sqrt(var + bn.epsilon) if _abstract(var) else stddev_from_variance(var, bn.epsilon, name=name),
        )
        return layer

    return _replace_modules(model, nnx.BatchNorm, make)


def export_batch_norm(model, *, negative_variance: str = "raise"):
    """A copy of ``model`` with every :class:`BatchRenorm` replaced by ``nnx.BatchNorm``.

    ``var = stddev**2 - epsilon`` (float64, then rounded); ``scale`` and
    ``bias`` (with their metadata), ``mean``, the shared fields and a
    ``promote_dtype`` other than :func:`no_promotion` carried (with the
    default, the batch norm gets Flax's own ``promote_dtype``, so that the
    result needs no ``renorm``; its output then comes in the promoted
    dtype, e.g. float32 for a bfloat16 input with float32 parameters); ``step``, the diagnostics and the
    renorm options dropped (``use_fast_variance`` is carried, so training the
    result further keeps renorm's two-pass variance unless changed). The
    inference outputs are the original's to rounding, and the result needs
    no ``renorm``. ``negative_variance`` (``"raise"`` or ``"clamp"``) is the
    rule for a ``stddev`` below ``sqrt(epsilon)`` (``docs/SPEC.md``, section 14).
    A model of shapes only gives one of shapes only, as in :func:`convert_batch_norm`.

    Example:

    >>> layer = BatchRenorm(3, epsilon=0.25, rngs=nnx.Rngs(0))
    >>> exported = export_batch_norm(layer)
    >>> type(exported).__name__, exported.var[...].tolist()  # 1**2 - 0.25
    ('BatchNorm', [0.75, 0.75, 0.75])
    """
    check_negative_variance(negative_variance)

    def make(layer, name):
        promote = {} if layer.promote_dtype is no_promotion else {"promote_dtype": layer.promote_dtype}
        bn = nnx.BatchNorm(
            layer.num_features,
            **{k: getattr(layer, k) for k in _SHARED},
            use_fast_variance=layer.use_fast_variance,
            **promote,
            rngs=nnx.Rngs(0),
        )
        _copy_params(bn, layer)
        _copy(bn.mean, layer.mean[...])
        stddev = layer.stddev[...]
        variance = (
            jnp.maximum(stddev * stddev - layer.epsilon, 0.0)
            if _abstract(stddev)
            else variance_from_stddev(
                np.asarray(stddev),
                layer.epsilon,
                name=name,
                negative_variance=negative_variance,
                stacklevel=5,
            )
        )
        _copy(bn.var, variance)
        return bn

    return _replace_modules(model, BatchRenorm, make)
