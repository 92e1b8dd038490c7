"""Batch norm in, batch norm out: convert Keras models between the two layers.

At inference Batch Renormalization is batch norm with the moving variance
replaced by the moving standard deviation (``docs/SPEC.md``, section 14)::

    moving_stddev   = sqrt(moving_variance + epsilon)     batch norm -> renorm
    moving_variance = moving_stddev**2 - epsilon          renorm -> batch norm

- :func:`convert_batch_norm` clones a model with every
  ``keras.layers.BatchNormalization`` replaced by
  :class:`~renorm.tf.BatchRenormalization` (fine-tuning a pretrained
  batch-norm network with small batches);
- :func:`export_batch_norm` clones a model with every
  ``BatchRenormalization`` replaced by ``keras.layers.BatchNormalization``: a
  plain Keras model with the same inference outputs, which loads and serves
  without ``renorm`` installed.

Both work on Sequential and Functional models, nested ones included
(``keras.models.clone_model(..., recursive=True)``); every other layer is
cloned from its config with its weights. A layer of the kind being replaced
that the clone cannot reach (inside a subclassed layer or model) is an error,
never a silently half-converted model. Conversions are computed in float64
and rounded once to the variable's dtype. Both run on every Keras backend
(variables are read with the Keras variable's ``numpy()``).

The epsilon of a conversion is the layer's own (``layer.epsilon``: the batch
norm's when converting, the renorm layer's when exporting), never an
argument; one that is not a finite number > 0 is a ``ValueError`` naming the
layer, ``epsilon`` and the value, before anything is cloned.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import initializers

from renorm.conversion import check_negative_variance, stddev_from_variance, variance_from_stddev
from renorm.keras.layer import BatchRenormalization, _constant_value, batch_norm_config_to_renorm

__all__ = ["convert_batch_norm", "export_batch_norm"]

# BatchRenormalization arguments that batch norm does not have (training-time behaviour only).
_RENORM_ONLY = (
    "rmax",
    "dmax",
    "warmup_steps",
    "rmax_steps",
    "dmax_steps",
    "microbatch_size",
    "explicit_gradient",
    "fused",
    "moving_stddev_initializer",
)


def _all_layers(model):
    """Every layer inside ``model``, at any depth (not ``model`` itself)."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found.extend(_all_layers(layer))
    return found


def _clone(model, replace, make):
    """``clone_model`` with layers of type ``replace`` built by ``make``; returns ``(clone, pairs)``."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model, got {type(model).__name__}.")
    pairs = []

    def clone_function(layer):
        new = make(layer) if type(layer) is replace else layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    try:
        clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    except ValueError as err:
        if "only supported for Sequential" not in str(err):
            raise
        raise TypeError(
            f"Only Sequential and Functional models can be converted (their layers are known); got a "
            f"subclassed model of type {type(model).__name__}. Build it with the converted layer instead."
        ) from err
    left = [layer.name for layer in _all_layers(clone) if isinstance(layer, replace)]
    if left:
        raise ValueError(
            f"{len(left)} {replace.__name__} layer(s) could not be replaced because they sit inside "
            f"another layer that is cloned as a whole: {left[:10]}. Nothing was converted; build that "
            f"layer with the new normalization instead."
        )
    return clone, pairs


def _assign(variable, value):
    variable.assign(np.asarray(value).astype(variable.dtype))


def _numpy(variable):
    return np.asarray(variable.numpy())  # a Keras variable on every backend


def _check_epsilons(model, cls):
    """Every ``cls`` layer of ``model`` has a finite ``epsilon > 0`` (docs/SPEC.md, section 14)."""
    for layer in _all_layers(model):
        if not isinstance(layer, cls):
            continue
        eps = getattr(layer, "epsilon", None)
        ok = isinstance(eps, (int, float, np.floating, np.integer)) and not isinstance(eps, bool)
        if not (ok and math.isfinite(float(eps)) and float(eps) > 0):
            raise ValueError(
                f"Layer {layer.name!r} has epsilon={eps!r}; converting between batch norm and batch renorm "
                "needs a finite epsilon > 0 (stddev = sqrt(variance + epsilon)). Nothing was converted."
            )


def _check_built(model, cls):
    """Every ``cls`` layer of ``model`` has its weights: a Sequential model built without ``keras.Input`` has none."""
    unbuilt = [layer.name for layer in _all_layers(model) if isinstance(layer, cls) and not layer.built]
    if unbuilt:
        raise ValueError(
            f"Model {model.name!r} is not built, so its {cls.__name__} layer(s) {unbuilt[:10]} have no weights "
            "to carry: give it a keras.Input (keras.Sequential([keras.Input(shape), ...])), or build it "
            "(model.build(input_shape), or call it on a batch) first. Nothing was converted."
        )


def convert_batch_norm(model, **renorm_options):
    """Clone ``model`` with every ``BatchNormalization`` replaced by ``BatchRenormalization``.

    Each new layer takes the batch norm's config (axis, momentum, epsilon,
    center, scale, initializers, regularizers, constraints, synchronized,
    dtype policy, name, trainable) plus ``renorm_options`` (``rmax``, ``dmax``,
    ``warmup_steps``, ``rmax_steps``, ``dmax_steps``, ``microbatch_size``,
    ``explicit_gradient``, ``fused``), and its weights::

        gamma, beta, moving_mean = those of the batch norm
        moving_stddev = sqrt(moving_variance + epsilon)     (in float64, then rounded)
        step = 0, diagnostics 0

    Every other layer is cloned from its config with its weights. The
    converted model's inference outputs equal the original's (to rounding);
    in training it is batch renormalization with the given options.

    Raises ``TypeError`` for a subclassed model, ``ValueError`` for a batch
    norm with ``renorm=True`` or one the clone cannot reach, and, before
    anything is cloned, for a model that is not built (a ``Sequential``
    without ``keras.Input``) and for a renorm option the layer refuses
    (``rmax=0.5``: the layer's own message).

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()])
    >>> converted = convert_batch_norm(model, rmax=2.0, dmax=1.0)
    >>> [type(layer).__name__ for layer in converted.layers], converted.layers[1].rmax
    (['Dense', 'BatchRenormalization'], 2.0)
    """
    unknown = [k for k in renorm_options if k not in _RENORM_ONLY[:-1]]
    if unknown:
        raise TypeError(
            f"convert_batch_norm takes only renorm options ({', '.join(_RENORM_ONLY[:-1])}); "
            f"got {unknown}. The other arguments come from each batch norm's config."
        )

    # The options' own errors (rmax=0.5, ...) first, in one line, not inside a deserialization error.
    BatchRenormalization(name="renorm_options", **renorm_options)
    _check_epsilons(model, keras.layers.BatchNormalization)
    _check_built(model, keras.layers.BatchNormalization)

    def make(bn):
        config = bn.get_config()
        try:
            _constant_value(config.get("moving_variance_initializer", "ones"), "moving_variance_initializer")
        except ValueError:  # the weights are carried; the initializer only matters for a rebuilt layer
            config["moving_variance_initializer"] = "ones"
        return BatchRenormalization.from_config({**batch_norm_config_to_renorm(config), **renorm_options})

    clone, pairs = _clone(model, keras.layers.BatchNormalization, make)
    for old, new in pairs:
        if isinstance(new, BatchRenormalization) and type(old) is keras.layers.BatchNormalization:
            if old.gamma is not None:
                _assign(new.gamma, _numpy(old.gamma))
            if old.beta is not None:
                _assign(new.beta, _numpy(old.beta))
            _assign(new.moving_mean, _numpy(old.moving_mean))
            _assign(new.moving_stddev, stddev_from_variance(_numpy(old.moving_variance), old.epsilon, name=old.name))
        else:
            new.set_weights(old.get_weights())
    return clone


def _variance(layer, negative_variance):
    """``moving_stddev**2 - epsilon`` in float64, with the rule of docs/SPEC.md, section 14."""
    return variance_from_stddev(
        _numpy(layer.moving_stddev), layer.epsilon, name=layer.name, negative_variance=negative_variance, stacklevel=4
    )


def _batch_norm_config(layer):
    config = layer.get_config()
    stddev_init = config.get("moving_stddev_initializer")
    for key in _RENORM_ONLY:
        config.pop(key, None)
    stddev0 = _constant_value(stddev_init, "moving_stddev_initializer")
    config["moving_variance_initializer"] = initializers.serialize(
        initializers.Constant(max(stddev0 * stddev0 - float(config["epsilon"]), 0.0))
    )
    return config


def export_batch_norm(model, *, negative_variance="raise"):
    """Clone ``model`` with every ``BatchRenormalization`` replaced by ``BatchNormalization``.

    Each batch norm takes the layer's axis, momentum, epsilon, center, scale,
    initializers, regularizers, constraints, synchronized, dtype policy, name
    and trainable flag, and its weights::

        gamma, beta, moving_mean = those of the renorm layer
        moving_variance = moving_stddev**2 - epsilon          (in float64, then rounded)

    so that the inference outputs are the same to rounding (``epsilon`` is
    inside both). The renorm options, ``step`` and the diagnostics are
    dropped: the result is a plain Keras model that saves as ``.keras`` (or a
    SavedModel) and loads without ``renorm``. Training it further is batch
    norm.

    ``moving_stddev**2 - epsilon`` (docs/SPEC.md, section 14): a trained
    state has ``moving_stddev >= sqrt(epsilon)``, so the variance is >= 0;
    values a few float units below ``sqrt(epsilon)`` (rounding) export as
    variance 0. A ``moving_stddev`` clearly below ``sqrt(epsilon)`` (set by
    hand, or an initializer) has no batch-norm equivalent:
    ``negative_variance="raise"`` (default) raises a ``ValueError`` naming the
    layer, ``"clamp"`` exports variance 0 there with a warning naming the
    layer. Where ``moving_stddev**2`` is close to ``epsilon`` the variance
    has few correct digits of its own, but batch norm only uses
    ``variance + epsilon``, which is ``moving_stddev**2`` to rounding: the
    outputs are unaffected. A model that is not built (a ``Sequential``
    without ``keras.Input``) is a ``ValueError``.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), BatchRenormalization(epsilon=0.25)])
    >>> exported = export_batch_norm(model)
    >>> type(exported.layers[0]).__name__, exported.layers[0].moving_variance.numpy().tolist()
    ('BatchNormalization', [0.75, 0.75, 0.75, 0.75])
    """
    check_negative_variance(negative_variance)
    _check_epsilons(model, BatchRenormalization)
    _check_built(model, BatchRenormalization)

    def make(layer):
        return keras.layers.BatchNormalization.from_config(_batch_norm_config(layer))

    clone, pairs = _clone(model, BatchRenormalization, make)
    for old, new in pairs:
        if isinstance(old, BatchRenormalization):
            if old.gamma is not None:
                _assign(new.gamma, _numpy(old.gamma))
            if old.beta is not None:
                _assign(new.beta, _numpy(old.beta))
            _assign(new.moving_mean, _numpy(old.moving_mean))
            _assign(new.moving_variance, _variance(old, negative_variance))
        else:
            new.set_weights(old.get_weights())
    return clone
