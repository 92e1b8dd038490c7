"""Configuration and input checks shared by every backend (framework-free).

Every error of ``docs/SPEC.md``, section 10 (Errors), is raised here, once, so that the
NumPy oracle, the TensorFlow layer and the Flax modules reject the same
things with the same words. Each message names the argument and echoes the
value received. Values that are wrong raise ``ValueError``; values of the
wrong kind (a string for ``rmax``, an integer input) raise ``TypeError``.

Backends that only know a size or a value when the graph runs (TensorFlow
with unknown dimensions at trace time, clipping limits passed as tensors)
build their run-time assertion from the same message functions
(:func:`batch_not_divisible_message`, :func:`too_few_values_message`,
:func:`rmax_message`, :func:`dmax_message`).

A batch of 0 examples (one replica's share of a short last batch) has no
normalization group: it passes the group checks, and every backend returns an
empty output and leaves its state unchanged.

Masks (``docs/SPEC.md``, section 3, "Masks") are checked by :func:`check_mask`:
the NumPy and Flax rule (a mask broadcastable to the input) and the Keras rule
(the input's shape without its feature axis) share one function and one
wording.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = [
    "check_schedule",
    "check_config",
    "check_pooling",
    "check_num_features",
    "normalize_axis",
    "check_input",
    "InputInfo",
    "batch_not_divisible_message",
    "too_few_values_message",
    "rmax_message",
    "dmax_message",
    "check_mask",
]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(name: str, value: object) -> float:
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a real number, got {name}={value!r} ({type(value).__name__}).")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"`{name}` must not be NaN, got {name}={value!r}.")
    return value


def _int(name: str, value: object) -> int:
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an integer, got {name}={value!r} ({type(value).__name__}).")
    return int(value)


def rmax_message(value: object) -> str:
    """The error for an ``rmax`` that is not a finite number >= 1 (``value`` as it should be shown)."""
    return f"`rmax` must be a finite number >= 1 (r is clipped to [1/rmax, rmax]), got rmax={value}."


def dmax_message(value: object) -> str:
    """The error for a ``dmax`` that is not a finite number >= 0 (``value`` as it should be shown)."""
    return f"`dmax` must be a finite number >= 0 (d is clipped to [-dmax, dmax]), got dmax={value}."


def check_schedule(
    *, rmax: object, dmax: object, warmup_steps: object = 0, rmax_steps: object = 0, dmax_steps: object = 0
) -> None:
    """Validate the clipping limits and schedule steps (``docs/SPEC.md``, section 5).

    - ``rmax >= 1`` (``r`` is clipped to ``[1/rmax, rmax]``) and finite;
    - ``dmax >= 0`` and finite;
    - every step count is a non-negative integer;
    - a ramp end is either "no ramp" (``0``, or equal to ``warmup_steps``) or
      after the warm-up: ``0 < rmax_steps < warmup_steps`` is inconsistent (the
      ramp would end before it starts), and so for ``dmax_steps``.
    """
    rmax = _real("rmax", rmax)
    dmax = _real("dmax", dmax)
    if not (rmax >= 1.0 and math.isfinite(rmax)):
        raise ValueError(rmax_message(repr(rmax)))
    if not (dmax >= 0.0 and math.isfinite(dmax)):
        raise ValueError(dmax_message(repr(dmax)))
    steps = {
        "warmup_steps": _int("warmup_steps", warmup_steps),
        "rmax_steps": _int("rmax_steps", rmax_steps),
        "dmax_steps": _int("dmax_steps", dmax_steps),
    }
    for name, value in steps.items():
        if value < 0:
            raise ValueError(f"`{name}` must be >= 0, got {name}={value!r}.")
    warm = steps["warmup_steps"]
    for name in ("rmax_steps", "dmax_steps"):
        end = steps[name]
        if 0 < end < warm:
            raise ValueError(
                f"`{name}` must be 0 (no ramp) or >= warmup_steps={warm} (the ramp starts when the "
                f"warm-up ends), got {name}={end!r}."
            )


def check_config(
    *,
    momentum: object,
    epsilon: object,
    microbatch_size: object = None,
    rmax: object = 3.0,
    dmax: object = 5.0,
    warmup_steps: object = 0,
    rmax_steps: object = 0,
    dmax_steps: object = 0,
) -> None:
    """Validate a layer's whole configuration (``docs/SPEC.md``, section 10).

    ``momentum`` in ``[0, 1)``, ``epsilon > 0``, ``microbatch_size`` ``None`` or
    an integer ``>= 1``, and the schedule (:func:`check_schedule`).
    """
    momentum_v = _real("momentum", momentum)
    if not 0.0 <= momentum_v < 1.0:
        raise ValueError(
            f"`momentum` must be in [0, 1) (the moving statistics move by 1 - momentum each step), "
            f"got momentum={momentum!r}."
        )
    epsilon_v = _real("epsilon", epsilon)
    if not (epsilon_v > 0.0 and math.isfinite(epsilon_v)):
        raise ValueError(f"`epsilon` must be a finite number > 0, got epsilon={epsilon!r}.")
    if microbatch_size is not None:
        k = _int("microbatch_size", microbatch_size)
        if k < 1:
            raise ValueError(f"`microbatch_size` must be None or an integer >= 1, got microbatch_size={k!r}.")
    check_schedule(rmax=rmax, dmax=dmax, warmup_steps=warmup_steps, rmax_steps=rmax_steps, dmax_steps=dmax_steps)


def check_pooling(pooled_by: str | None, microbatch_size: object) -> None:
    """Pooling moments across replicas is per whole batch (``docs/SPEC.md``, section 11).

    ``pooled_by`` names the option that turned pooling on (``"synchronized"``,
    ``"axis_name"``) or is ``None`` when pooling is off.
    """
    if pooled_by is not None and microbatch_size is not None:
        raise ValueError(
            f"`{pooled_by}` pools the batch statistics over replicas, which is defined for whole batches "
            f"only; it cannot be combined with microbatch_size={microbatch_size!r}. Use one or the other."
        )


def check_num_features(num_features: object) -> int:
    """``num_features`` as an ``int``: an integer >= 1 (a statistic is kept per feature)."""
    n = _int("num_features", num_features)
    if n < 1:
        raise ValueError(f"`num_features` must be an integer >= 1, got num_features={n!r}.")
    return n


def normalize_axis(axis: object, ndim: int) -> int:
    """The non-negative feature axis for an input of rank ``ndim``.

    Axis 0 is the batch and cannot be the feature axis.
    """
    if not _is_int(axis):
        raise TypeError(f"`axis` must be a single integer (the feature axis), got axis={axis!r}.")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"`axis` is out of range for an input of rank {ndim}: got axis={axis}.")
    if axis % ndim == 0:
        raise ValueError(
            f"`axis` must not be the batch axis 0 (statistics are per feature, over the batch): got axis={axis} "
            f"for an input of rank {ndim}."
        )
    return axis % ndim


def batch_not_divisible_message(batch: object, microbatch_size: object) -> str:
    """The error for a batch that ``microbatch_size`` does not divide (either may be a tensor's value)."""
    return (
        f"The batch size must be divisible by `microbatch_size`: got a batch of {batch} examples "
        f"and microbatch_size={microbatch_size}."
    )


def too_few_values_message(count: object, group: str) -> str:
    """The error for a normalization ``group`` (a word: "micro-batch", "batch") of fewer than 2 values."""
    return (
        f"Each normalization group must hold at least 2 values per feature (its variance is 0 otherwise): "
        f"a {group} holds {count}. Use a larger `microbatch_size` or batch."
    )


class InputInfo(tuple):
    """``(axis, num_groups, group_count, num_features)`` of a checked input.

    ``num_groups`` is ``None`` where the batch size is unknown (0 for an empty
    batch); ``group_count`` (values per feature in one group) is ``None`` where
    a size it depends on is unknown. Both are ``None`` in inference.
    """

    __slots__ = ()

    def __new__(cls, axis: int, num_groups: int | None, group_count: int | None, num_features: int) -> InputInfo:
        return super().__new__(cls, (axis, num_groups, group_count, num_features))

    axis = property(lambda self: self[0])
    num_groups = property(lambda self: self[1])
    group_count = property(lambda self: self[2])
    num_features = property(lambda self: self[3])


def check_input(
    shape: Sequence[int | None],
    *,
    dtype_name: str,
    is_floating: bool,
    axis: object,
    microbatch_size: object = None,
    num_features: int | None = None,
    training: bool = True,
) -> InputInfo:
    """Validate an input against the layer (``docs/SPEC.md``, section 10).

    Args:
      shape: the input's shape; an entry may be ``None`` (unknown at trace time),
        in which case the checks that need it are left to the caller's run-time
        assertion, built from the message functions of this module.
      dtype_name, is_floating: the input's dtype, as the backend names it, and
        whether it is a floating type.
      axis: the feature axis.
      microbatch_size: ``None`` (one group: the whole batch) or ``k``.
      num_features: the feature size the layer was built for, if built.
      training: group checks only apply to training (batch statistics).

    An empty batch has no group and passes the group checks (but a micro-batch
    size too small for any batch is an error even then); 0 features is an
    error.
    """
    if not is_floating:
        raise TypeError(f"Batch renormalization needs a floating-point input, got an input of dtype {dtype_name}.")
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"The input must have rank >= 2 (batch on axis 0, features on `axis`), got shape {tuple(shape)} "
            f"of rank {ndim}."
        )
    ax = normalize_axis(axis, ndim)
    features = shape[ax]
    if features == 0:
        raise ValueError(
            f"The input has 0 features on axis {axis} (input shape {tuple(shape)}); batch renormalization keeps "
            f"a statistic per feature and needs at least 1."
        )
    if num_features is not None and features is not None and features != num_features:
        raise ValueError(
            f"The input has {features} features on axis {axis} but the layer was built for {num_features} "
            f"(input shape {tuple(shape)})."
        )
    batch = shape[0]
    others = [s for i, s in enumerate(shape) if i not in (0, ax)]
    per_example = None if any(s is None for s in others) else math.prod(others)
    num_groups = group_count = None
    if training:
        if microbatch_size is not None and batch is not None and batch % microbatch_size != 0:
            raise ValueError(batch_not_divisible_message(batch, microbatch_size))
        if microbatch_size is None:
            # One group, the batch, unless it is empty: then there is no group (and no error).
            num_groups = None if batch is None else min(batch, 1)
            group = batch
        else:
            # Groups of k examples: too small for any batch, the empty one included.
            num_groups = None if batch is None else batch // microbatch_size
            group = microbatch_size
        if group is not None and per_example is not None:
            group_count = group * per_example
            if group_count < 2 and (microbatch_size is not None or batch != 0):
                what = "batch" if microbatch_size is None else f"micro-batch of {microbatch_size}"
                raise ValueError(too_few_values_message(group_count, what))
    return InputInfo(ax, num_groups, group_count, features)


def check_mask(
    mask_shape: Sequence[int | None],
    input_shape: Sequence[int | None],
    *,
    dtype_name: str,
    is_valid_dtype: bool,
    feature_axis: int | None = None,
) -> None:
    """Validate a mask against the input it selects from (``docs/SPEC.md``, sections 3 and 10).

    A mask is boolean, or numeric with nonzero meaning selected (as in Keras
    and Flax, which cast it to bool); ``is_valid_dtype`` says whether its
    dtype is one of those. Its shape follows one of two rules:

    - ``feature_axis=None`` (NumPy oracle, Flax): broadcastable to the input's
      shape (NumPy rules: aligned on the right, each size equal or 1, rank at
      most the input's). A mask may then differ from feature to feature.
    - ``feature_axis=a`` (Keras): the input's shape without axis ``a``
      (rank one less than the input), each size equal or 1; the mask selects
      positions, every feature of a position alike.

    Sizes given as ``None`` (unknown when a graph is traced) match anything.
    Raises ``TypeError`` for a dtype, ``ValueError`` for a shape, both naming
    ``mask`` and echoing what was received.
    """
    if not is_valid_dtype:
        raise TypeError(
            f"`mask` must be boolean (or numeric, nonzero meaning selected), got a mask of dtype {dtype_name}."
        )
    mask_shape, input_shape = tuple(mask_shape), tuple(input_shape)
    if feature_axis is None:
        expected = f"broadcastable to the input's shape {input_shape}"
        target = input_shape[len(input_shape) - len(mask_shape) :] if len(mask_shape) <= len(input_shape) else None
    else:
        ax = feature_axis % len(input_shape)
        target = tuple(s for i, s in enumerate(input_shape) if i != ax)
        expected = (
            f"equal to the input's shape without its feature axis {feature_axis}, {target} (rank {len(target)}, "
            f"one less than the input's; a size may be 1)"
        )
        if len(mask_shape) != len(target):
            target = None
    ok = target is not None and all(m is None or t is None or m == t or m == 1 for m, t in zip(mask_shape, target))
    if not ok:
        raise ValueError(
            f"`mask` must have a shape {expected}; got a mask of shape {mask_shape} for an input of shape "
            f"{input_shape}."
        )
