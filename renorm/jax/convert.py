"""Batch norm in, batch norm out for Flax linen variables (``docs/SPEC.md``, section 14).

- :func:`convert_batch_norm` turns the variables of a model built with
  ``flax.linen.BatchNorm`` (a checkpoint: ``params`` with ``scale``/``bias``,
  ``batch_stats`` with ``mean``/``var``) into the variables of the same model
  built with :class:`renorm.jax.BatchRenorm`::

      stddev = sqrt(var + epsilon),   step = 0

- :func:`export_batch_norm` goes back: ``var = stddev**2 - epsilon``, ``step``
  dropped, for a model built with ``nn.BatchNorm`` (inference outputs equal to
  rounding; it runs without ``renorm``).

Both take the ``target``: the variables of the model to convert *to* (from
its ``init``), and return variables of exactly that structure. Every leaf of
the target must come from the source and every leaf of the source must land
in the target, with the same shape; anything else is a ``ValueError`` that
lists the paths. A partial or mismatched restore is never silent.

Module names: a norm layer that Flax named automatically is ``BatchNorm_3`` in
one model and ``BatchRenorm_3`` in the other; such names are matched.
Explicit names (``norm(name="bn_init")``) stay as they are.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

from renorm.conversion import check_negative_variance, stddev_from_variance, variance_from_stddev

__all__ = ["convert_batch_norm", "export_batch_norm"]

_SHOW = 12  # paths listed in an error


def _flat(variables, what):
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"`{what}` must be a mapping of collections (such as model.init(...)), got {type(variables).__name__}."
        )
    return traverse_util.flatten_dict(unfreeze(variables) if isinstance(variables, FrozenDict) else dict(variables))


def _norm_modules(flat, stats):
    """Module paths (without the collection) whose ``batch_stats`` hold all of ``stats``."""
    found = {}
    for key in flat:
        if key[0] == "batch_stats" and key[-1] in stats:
            found.setdefault(key[1:-1], set()).add(key[-1])
    return sorted(p for p, names in found.items() if names >= set(stats))


def _rename(path, src_prefix, dst_prefix, target_modules):
    """``path`` in the target's naming: ``{src_prefix}_k`` -> ``{dst_prefix}_k`` where the target has it."""
    if path in target_modules:
        return path
    m = re.fullmatch(rf"{src_prefix}_(\d+)", str(path[-1]))
    if m:
        renamed = path[:-1] + (f"{dst_prefix}_{m.group(1)}",)
        if renamed in target_modules:
            return renamed
    return path


def _shape(value):
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _show(keys):
    keys = sorted("/".join(map(str, k)) for k in keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _match(out, target, direction):
    """``out`` checked against ``target`` (keys and shapes) and cast to its dtypes; unflattened."""
    missing = set(target) - set(out)
    extra = set(out) - set(target)
    problems = []
    if missing:
        problems.append(f"{len(missing)} variable(s) of the target have no source: {_show(missing)}")
    if extra:
        problems.append(f"{len(extra)} variable(s) of the source have no place in the target: {_show(extra)}")
    shapes = [k for k in set(out) & set(target) if _shape(out[k]) != _shape(target[k])]
    if shapes:
        detail = ", ".join(
            f"{'/'.join(map(str, k))} {_shape(out[k])} vs {_shape(target[k])}" for k in sorted(shapes)[:_SHOW]
        )
        problems.append(f"{len(shapes)} shape mismatch(es) (source vs target): {detail}")
    if problems:
        raise ValueError(f"Cannot convert {direction}: " + "; ".join(problems) + ". Nothing was converted.")
    result = {k: jnp.asarray(v, dtype=target[k].dtype) for k, v in out.items()}
    return traverse_util.unflatten_dict(result)


def _wrap(result, like):
    return FrozenDict(result) if isinstance(like, FrozenDict) else result


def convert_batch_norm(bn_variables, target, *, epsilon: float = 1e-5):
    """The variables of a ``nn.BatchNorm`` model, as variables of the same model with ``BatchRenorm``.

    Args:
      bn_variables: the batch-norm model's variables (``{"params": ...,
        "batch_stats": ...}``, a dict or ``FrozenDict``; other collections
        are carried as they are).
      target: the renorm model's variables, e.g. ``model.init(key, x)``, or
        only their shapes: ``jax.eval_shape(model.init, key, x)`` (nothing is
        computed); their structure, shapes and dtypes are used.
      epsilon: the batch norms' epsilon (Flax's default ``1e-5``); it goes into
        ``stddev = sqrt(var + epsilon)``, so that the inference outputs are the
        batch-norm model's. Give the renorm layers the same epsilon.

    Returns:
      Variables of exactly ``target``'s structure and dtypes: every
      non-norm leaf copied, each norm's ``scale``/``bias``/``mean`` copied,
      ``stddev = sqrt(var + epsilon)`` (float64, then rounded), ``step = 0``.

    Raises:
      ValueError: a target leaf without a source, a source leaf without a
        place in the target, a shape mismatch, or a negative ``var``.
    """
    src = _flat(bn_variables, "bn_variables")
    tgt = _flat(target, "target")
    target_norms = set(_norm_modules(tgt, ("mean", "stddev", "step")))
    out = {}
    for path in _norm_modules(src, ("mean", "var")):
        new = _rename(path, "BatchNorm", "BatchRenorm", target_norms)
        for col in list(src):
            if col[1:-1] == path:
                value = src.pop(col)
                if col[0] == "batch_stats" and col[-1] == "var":
                    name = "/".join(map(str, path))
                    out[("batch_stats",) + new + ("stddev",)] = stddev_from_variance(value, epsilon, name=name)
                else:
                    out[(col[0],) + new + (col[-1],)] = value
        step = ("batch_stats",) + new + ("step",)
        if step in tgt:
            out[step] = np.zeros(_shape(tgt[step]), tgt[step].dtype)
    out.update(src)
    return _wrap(_match(out, tgt, "batch-norm variables to renorm"), target)


def export_batch_norm(variables, target, *, epsilon: float = 1e-5, negative_variance: str = "raise"):
    """The variables of a ``BatchRenorm`` model, as variables of the same model with ``nn.BatchNorm``.

    ``var = stddev**2 - epsilon`` (float64, then rounded), ``step`` and the
    ``intermediates`` collection (sown diagnostics) dropped; everything else
    copied. With the batch norms' epsilon equal to the renorm layers', the
    inference outputs are the renorm model's to rounding.

    ``negative_variance`` says what happens where ``stddev`` lies below
    ``sqrt(epsilon)``, where no batch norm has the same output (never in a
    trained state, up to rounding, which exports as ``var = 0``):
    ``"raise"`` (default) a ``ValueError`` naming the layer, ``"clamp"``
    ``var = 0`` with a warning naming the layer (``docs/SPEC.md``, section 14).

    Args:
      variables: the renorm model's variables.
      target: the batch-norm model's variables (``model.init``, or
        ``jax.eval_shape(model.init, ...)``), for the structure, shapes and
        dtypes.
    """
    check_negative_variance(negative_variance)
    src = _flat(variables, "variables")
    src = {k: v for k, v in src.items() if k[0] != "intermediates"}
    tgt = _flat(target, "target")
    target_norms = set(_norm_modules(tgt, ("mean", "var")))
    out = {}
    for path in _norm_modules(src, ("mean", "stddev", "step")):
        new = _rename(path, "BatchRenorm", "BatchNorm", target_norms)
        for col in list(src):
            if col[1:-1] == path:
                value = src.pop(col)
                if col[0] == "batch_stats" and col[-1] == "stddev":
                    name = "/".join(map(str, path))
                    out[("batch_stats",) + new + ("var",)] = variance_from_stddev(
                        np.asarray(jax.device_get(value)), epsilon, name=name, negative_variance=negative_variance,
                        stacklevel=3,
                    )
                elif not (col[0] == "batch_stats" and col[-1] == "step"):
                    out[(col[0],) + new + (col[-1],)] = value
    out.update(src)
    return _wrap(_match(out, tgt, "renorm variables to batch norm"), target)
