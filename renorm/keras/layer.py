"""``BatchRenormalization``: one Keras 3 layer for every Keras backend, drop-in for ``keras.layers.BatchNormalization``.

The layer owns its variables and their one state update; the computation of
a step is picked per Keras backend in :data:`_COMPUTATIONS`: the math written
once in ``keras.ops`` (:mod:`renorm.keras.ops`) on JAX and PyTorch, the fused
TensorFlow kernels of :mod:`renorm.tf.ops` on TensorFlow (its fast path, the
same numbers). TensorFlow is imported only on the TensorFlow backend.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import keras
from keras import constraints, initializers, ops, regularizers

from renorm.config import check_config, check_input, check_pooling
from renorm.keras import ops as kops
from renorm.schedule import ClipSchedule

__all__ = ["BatchRenormalization", "batch_norm_config_to_renorm"]


def _step_dtype():
    """int64, except on JAX without ``jax_enable_x64`` (int32: JAX would narrow an int64 with a warning)."""
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            return "int32"
    return "int64"


# Keys of ``keras.layers.BatchNormalization.get_config()`` that this layer does not take as such.
_BATCH_NORM_ONLY = ("moving_variance_initializer", "renorm", "renorm_clipping", "renorm_momentum")


def _constant_value(initializer, name):
    """The value of a constant initializer (``Zeros``, ``Ones``, ``Constant`` with a scalar)."""
    init = initializers.get(initializer)
    if isinstance(init, initializers.Zeros):
        return 0.0
    if isinstance(init, initializers.Ones):
        return 1.0
    if isinstance(init, initializers.Constant):
        value = init.get_config().get("value")
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(
        f"`{name}` can only be converted when it is a constant initializer (zeros, ones or a scalar "
        f"Constant), got {name}={initializer!r}. Pass the converted initializer yourself instead."
    )


def batch_norm_config_to_renorm(config):
    """A ``keras.layers.BatchNormalization`` config, made acceptable to :class:`BatchRenormalization`.

    - ``moving_variance_initializer`` (a constant ``v``) becomes
      ``moving_stddev_initializer = Constant(sqrt(v + epsilon))``, so that the
      layer's initial inference output is batch norm's; a non-constant one is
      an error (there is no exact mapping), and so is giving both.
    - ``renorm=False`` (with ``renorm_clipping``, ``renorm_momentum``, which
      Keras then ignores) is dropped; ``renorm=True`` is an error that says
      which arguments to use instead.

    A config without these keys is returned unchanged (a copy).

    Example:

    >>> import keras
    >>> config = keras.layers.BatchNormalization(epsilon=0.25, moving_variance_initializer="ones").get_config()
    >>> new = batch_norm_config_to_renorm(config)
    >>> "moving_variance_initializer" in new, new["moving_stddev_initializer"]["config"]["value"]
    (False, 1.118033988749895)
    """
    config = dict(config)
    if config.get("renorm"):
        clipping = config.get("renorm_clipping")
        raise ValueError(
            "BatchRenormalization cannot take a config with renorm=True (Keras' own batch renormalization, "
            f"renorm_clipping={clipping!r}, renorm_momentum={config.get('renorm_momentum')!r}): this layer "
            "is batch renormalization. Remove `renorm`, `renorm_clipping` and `renorm_momentum` and pass "
            "rmax=R, dmax=D (Keras' renorm_clipping={'rmax': R, 'rmin': 1/R, 'dmax': D}); the moving "
            "statistics and r, d all use `momentum`, and a schedule is warmup_steps/rmax_steps/dmax_steps."
        )
    for key in ("renorm", "renorm_clipping", "renorm_momentum"):
        config.pop(key, None)
    if "moving_variance_initializer" in config:
        variance_init = config.pop("moving_variance_initializer")
        if config.get("moving_stddev_initializer") is not None:
            raise ValueError(
                "Got both moving_variance_initializer and moving_stddev_initializer; BatchRenormalization "
                "keeps a moving standard deviation only. Pass moving_stddev_initializer alone."
            )
        epsilon = float(config.get("epsilon", 1e-3))
        value = _constant_value(variance_init, "moving_variance_initializer")
        if value < 0:
            raise ValueError(f"moving_variance_initializer must be >= 0, got the constant {value!r}.")
        config["moving_stddev_initializer"] = initializers.serialize(
            initializers.Constant(float(math.sqrt(value + epsilon)))
        )
    return config


class _Computation(NamedTuple):
    """What the layer runs on one Keras backend: a row of :data:`_COMPUTATIONS`.

    ``batch_renorm``: the step, :func:`renorm.tf.batch_renorm`'s signature (the limits taken as
    valid), returning ``y``, the new moving statistics, the clip fractions and ``empty``. ``read``:
    a variable's value as a tensor. ``clip`` and ``limit_dtype`` (of the input's dtype): how the
    schedule is evaluated on the ``step`` weight. ``after(y)``: a context in which the state is
    assigned once ``y`` is computed. ``known(flag)``: a boolean's value where known when traced,
    else ``None``. ``any_replica(advance)``: the step's increment for the global batch.
    """

    batch_renorm: Callable
    read: Callable
    clip: Callable
    limit_dtype: Callable
    after: Callable
    known: Callable
    any_replica: Callable


def _tensorflow() -> _Computation:
    """The fused TensorFlow kernels of :mod:`renorm.tf.ops`, with ``tf.distribute``'s rules for the state."""
    import tensorflow as tf

    from renorm.tf import ops as tf_ops

    return _Computation(
        batch_renorm=functools.partial(tf_ops.batch_renorm, check_limits=False),
        read=tf.convert_to_tensor,
        clip=tf.clip_by_value,
        limit_dtype=lambda dtype: "float64",
        after=lambda y: tf.control_dependencies([y]),
        known=tf.get_static_value,
        any_replica=tf_ops.any_replica,
    )


def _keras_ops() -> _Computation:
    """:mod:`renorm.keras.ops`, on JAX and PyTorch: eager or traced, one replica, shapes known."""
    return _Computation(
        batch_renorm=kops.batch_renorm,
        read=lambda variable: variable.value,
        clip=ops.clip,
        limit_dtype=kops.compute_dtype,
        after=lambda y: contextlib.nullcontext(),
        known=lambda flag: flag if isinstance(flag, bool) else None,
        any_replica=lambda advance: advance,
    )


# The computation of each Keras backend; the others run keras.ops.
_COMPUTATIONS = {"tensorflow": _tensorflow}


@functools.cache
def _computation_of(backend: str) -> _Computation:
    return _COMPUTATIONS.get(backend, _keras_ops)()


def _computation() -> _Computation:
    """The row of :data:`_COMPUTATIONS` for the current Keras backend (built once per backend)."""
    return _computation_of(keras.backend.backend())


@keras.saving.register_keras_serializable(package="renorm")
class BatchRenormalization(keras.layers.Layer):
    """Batch Renormalization (Ioffe, 2017, arXiv:1702.03275), Algorithm 1, as a Keras 3 layer.

    In training each group of examples (``microbatch_size``, or the whole
    batch) is normalized with its own statistics, then corrected by ``r``
    and ``d`` towards what the moving statistics would give, within the
    limits of the clipping schedule; in inference only the moving statistics
    enter. The algorithm, and what an empty batch, a non-finite batch and a
    mask do, are written once in ``docs/SPEC.md`` (sections 2-5): this layer
    computes exactly that.

    One layer for every Keras 3 backend (TensorFlow, JAX, PyTorch): the math
    is ``keras.ops`` (:mod:`renorm.keras.ops`), and on TensorFlow the fused TF
    kernels of :mod:`renorm.tf.ops` run instead. Backend differences:
    ``synchronized=True`` and ``fused=True`` are TensorFlow-only (a
    ``ValueError`` elsewhere, as Keras' own ``synchronized``); ``step`` is
    int64, except on JAX without ``jax_enable_x64``, where it is int32; the
    explicit gradient is a ``keras.ops.custom_gradient`` on JAX, and on
    PyTorch the gradient is always autodiff of the forward (the same
    gradient, held to the oracle). On JAX, train with ``fit`` or
    ``stateless_call`` under ``jax.jit`` (a jitted direct call cannot assign
    the state: Keras' rule for every stateful layer).

    A drop-in for ``keras.layers.BatchNormalization``: same arguments and
    defaults where the concept is the same (``axis``, ``momentum=0.99``,
    ``epsilon=1e-3``, ``center``, ``scale``, initializers, regularizers,
    constraints, ``synchronized``), and the same rule: batch statistics and a
    state update only when ``training`` is true *and* the layer is trainable.
    The mask is Keras': ``layer(x, training=True, mask=mask)``, or a mask
    Keras propagates (``Embedding(mask_zero=True)``, ``Masking``), has the
    input's shape without the feature axis, and is passed on to the next
    layer. Unlike Keras' batch norm the moving statistic is the standard
    deviation (``epsilon`` included), as in the paper, not the variance.
    Across replicas (``synchronized``, empty replicas, the step of the global
    batch) the layer follows ``docs/SPEC.md``, section 11.

    Args:
      axis: the feature axis (an integer, not 0).
      momentum, epsilon, center, scale: as in ``BatchNormalization``.
      beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_stddev_initializer: initializers (``"zeros"``, ``"ones"``,
        ``"zeros"``, ``"ones"``).
      beta_regularizer, gamma_regularizer, beta_constraint, gamma_constraint:
        as in ``BatchNormalization``.
      rmax, dmax: final clipping limits on ``r`` (to ``[1/rmax, rmax]``) and
        ``|d|``; ``rmax=1, dmax=0`` is batch norm.
      warmup_steps, rmax_steps, dmax_steps: the schedule of
        :class:`renorm.ClipSchedule`, driven by the layer's ``step`` weight.
      microbatch_size: ``None`` (whole batch) or ``k``: the batch is split into
        groups of ``k`` consecutive examples, each normalized by its own
        statistics; the batch must be divisible by ``k``.
      synchronized: pool the batch moments over all replicas of a
        ``tf.distribute`` strategy (whole batches only).
      explicit_gradient: backward by the paper's explicit formula (default,
        two reductions and four element-wise passes) or by autodiff (``False``).
      fused: train on TensorFlow's fused batch-norm kernels (``FusedBatchNormV3``
        and its gradient): ``None`` (default) where they apply
        (:func:`renorm.tf.fused_eligible`: features on the last axis of an
        input of any rank, or on axis 1 of a 4-D input; float32, float16 or
        bfloat16; ``microbatch_size=None``; not synchronized; explicit
        gradient; ``epsilon >= 1.001e-5``; and no mask), ``True`` to require
        them (an error otherwise), ``False`` never. Same numbers, fewer kernels.
        Inference runs on the kernel in inference mode (one pass) for
        float32/float16/bfloat16 where ``|moving_mean| <= 16 * moving_stddev``,
        the exact three-pass form elsewhere; ``fused=False`` never.

    Weights, in this order: ``gamma`` (if ``scale``), ``beta`` (if ``center``),
    then non-trainable ``moving_mean``, ``moving_stddev``, ``step`` (int64),
    ``r_clipped_fraction`` and ``d_clipped_fraction`` (the diagnostics: the
    fraction of ``r`` and ``d`` values the clip changed in the last training
    step, over groups and features; the paper tunes ``rmax``/``dmax`` by them).

    Example:

    >>> import numpy as np
    >>> layer = BatchRenormalization(microbatch_size=2)
    >>> x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    >>> y = layer(x, training=True)  # batch statistics, corrected towards the moving ones
    >>> tuple(y.shape), int(layer.step)
    ((4, 3), 1)
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_stddev_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        rmax=3.0,
        dmax=5.0,
        warmup_steps=0,
        rmax_steps=0,
        dmax_steps=0,
        microbatch_size=None,
        synchronized=False,
        explicit_gradient=True,
        fused=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_config(
            momentum=momentum,
            epsilon=epsilon,
            microbatch_size=microbatch_size,
            rmax=rmax,
            dmax=dmax,
            warmup_steps=warmup_steps,
            rmax_steps=rmax_steps,
            dmax_steps=dmax_steps,
        )
        check_pooling("synchronized" if synchronized else None, microbatch_size)
        backend = keras.backend.backend()
        if backend != "tensorflow" and synchronized:
            raise ValueError(
                f"synchronized=True pools the moments over tf.distribute replicas and needs the TensorFlow "
                f"backend; the Keras backend is {backend!r} (keras.layers.BatchNormalization refuses it too)."
            )
        if backend != "tensorflow" and fused:
            raise ValueError(
                f"fused=True asks for TensorFlow's fused batch-norm kernels and needs the TensorFlow backend; "
                f"the Keras backend is {backend!r}. Use fused=None (the default) or False."
            )
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"`axis` must be a single integer (the feature axis), got axis={axis!r}.")
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_stddev_initializer = initializers.get(moving_stddev_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.schedule = ClipSchedule(rmax, dmax, warmup_steps, rmax_steps, dmax_steps)
        self.microbatch_size = None if microbatch_size is None else int(microbatch_size)
        self.synchronized = bool(synchronized)
        self.explicit_gradient = bool(explicit_gradient)
        if fused not in (None, True, False):
            raise TypeError(f"`fused` must be None, True or False, got fused={fused!r}.")
        self.fused = fused
        self.supports_masking = True
        self.gamma = self.beta = None
        self.moving_mean = self.moving_stddev = self.step = None
        self._r_clipped = self._d_clipped = None
        self._num_features = None

    # ------------------------------------------------------------ properties
    rmax = property(lambda self: self.schedule.rmax)
    dmax = property(lambda self: self.schedule.dmax)
    warmup_steps = property(lambda self: self.schedule.warmup_steps)
    rmax_steps = property(lambda self: self.schedule.rmax_steps)
    dmax_steps = property(lambda self: self.schedule.dmax_steps)

    @property
    def r_clipped_fraction(self):
        """Fraction of ``r`` values the clip changed in the last training step (a variable)."""
        return self._r_clipped

    @property
    def d_clipped_fraction(self):
        """Fraction of ``d`` values the clip changed in the last training step (a variable)."""
        return self._d_clipped

    # ----------------------------------------------------------------- build
    def build(self, input_shape):
        input_shape = tuple(input_shape)
        info = check_input(input_shape, dtype_name="float32", is_floating=True, axis=self.axis, training=False)
        c = info.num_features
        if c is None:
            raise ValueError(
                f"The feature axis {self.axis} of the input must have a known size, got input shape {input_shape}."
            )
        self._num_features = int(c)
        shape = (self._num_features,)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        # Replicas that saw different batches (synchronized=False) average
        # their updates, so the state stays the same on every replica.
        stat = dict(trainable=False, autocast=False, aggregation="mean")
        self.moving_mean = self.add_weight(
            shape=shape, name="moving_mean", initializer=self.moving_mean_initializer, **stat
        )
        self.moving_stddev = self.add_weight(
            shape=shape, name="moving_stddev", initializer=self.moving_stddev_initializer, **stat
        )
        self.step = self.add_weight(
            shape=(),
            name="step",
            dtype=_step_dtype(),
            initializer="zeros",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )
        self._r_clipped = self.add_weight(shape=(), name="r_clipped_fraction", initializer="zeros", **stat)
        self._d_clipped = self.add_weight(shape=(), name="d_clipped_fraction", initializer="zeros", **stat)

    def compute_output_shape(self, input_shape):
        return input_shape

    # ------------------------------------------------------------------ call
    def limits(self, dtype="float64"):
        """``(rmax(t), dmax(t))`` for the next training step, from the ``step`` weight (in ``dtype``)."""
        s = self.schedule
        if s.warmup_steps == 0 and s.rmax_steps == 0 and s.dmax_steps == 0:
            return s.rmax, s.dmax  # constant: no need to read the step
        backend = _computation()
        return s.limits(ops.cast(backend.read(self.step), dtype), clip=backend.clip)

    def call(self, inputs, training=None, mask=None):
        training = bool(training) and self.trainable
        backend = _computation()
        x = ops.convert_to_tensor(inputs)
        # The limits need no check: the schedule validated them at construction. The input errors
        # of docs/SPEC.md, section 10, are raised by the computation before any op runs.
        rmax, dmax = self.limits(backend.limit_dtype(x.dtype)) if training else (self.rmax, self.dmax)
        read = backend.read
        out = backend.batch_renorm(
            x,
            None if self.gamma is None else read(self.gamma),
            None if self.beta is None else read(self.beta),
            read(self.moving_mean),
            read(self.moving_stddev),
            training=training,
            rmax=rmax,
            dmax=dmax,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            microbatch_size=self.microbatch_size,
            synchronized=self.synchronized,
            explicit_gradient=self.explicit_gradient,
            fused=self.fused,
            mask=mask,
        )
        if training:
            self._update(out, backend)
        return ops.cast(out.y, self.compute_dtype)

    def _update(self, out, backend):
        """Assign the new state of a training step: the layer's one state update.

        Every variable is assigned (a mirrored assignment is a synchronization
        point), an empty batch (``out.empty``) its old step and diagnostics.
        The assignments wait for the output, so that a failed run-time check
        of a graph changes nothing. ``step`` counts the steps of the global
        batch: it advances when any replica had examples (``docs/SPEC.md``,
        section 11; ``only_first_replica`` takes each worker's own first
        replica under ``MultiWorkerMirroredStrategy``, so a worker whose
        replica got 0 examples would otherwise fall one step behind).
        """
        with backend.after(out.y):
            self.moving_mean.assign(out.moving_mean)
            self.moving_stddev.assign(out.moving_stddev)
            r_frac = ops.cast(out.r_clipped_fraction, self._r_clipped.dtype)
            d_frac = ops.cast(out.d_clipped_fraction, self._d_clipped.dtype)
            advance = ops.ones((), self.step.dtype)
            if backend.known(out.empty) is not False:  # possibly empty: keep the step and diagnostics
                r_frac = ops.where(out.empty, backend.read(self._r_clipped), r_frac)
                d_frac = ops.where(out.empty, backend.read(self._d_clipped), d_frac)
                advance = backend.any_replica(ops.cast(ops.logical_not(out.empty), self.step.dtype))
            self._r_clipped.assign(r_frac)
            self._d_clipped.assign(d_frac)
            self.step.assign_add(advance)

    # ---------------------------------------------------------------- config
    @classmethod
    def from_config(cls, config):
        """The layer of ``config``; a ``BatchNormalization`` config is accepted too.

        Batch-norm-only keys are mapped by :func:`batch_norm_config_to_renorm`
        (``moving_variance_initializer`` to ``moving_stddev_initializer``,
        ``renorm=False`` dropped, ``renorm=True`` an error).
        """
        return super().from_config(batch_norm_config_to_renorm(config))

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_stddev_initializer": initializers.serialize(self.moving_stddev_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "microbatch_size": self.microbatch_size,
            "synchronized": self.synchronized,
            "explicit_gradient": self.explicit_gradient,
            "fused": self.fused,
            **self.schedule.to_dict(),
        }
        return {**super().get_config(), **config}
