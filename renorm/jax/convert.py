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
its ``init``), and return variables of exactly that structure, and the
norms' ``epsilon``, which variables do not record: a number, or per module
(:func:`batch_norm_epsilons` reads it from a model's modules). It has no
default: Flax's ``1e-5`` is silently wrong for a model built with ``1e-3``
(Keras's default, and models ported from Keras). Every leaf of
the target must come from the source and every leaf of the source must land
in the target, with the same shape; anything else is a ``ValueError`` that
lists the paths. A partial or mismatched restore is never silent.

Module names: a norm layer that Flax named automatically is ``BatchNorm_3`` in
one model and ``BatchRenorm_3`` in the other; such names are matched.
Explicit names (``norm(name="bn_init")``) stay as they are.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

from renorm.conversion import check_negative_variance, stddev_from_variance, variance_from_stddev

__all__ = ["convert_batch_norm", "export_batch_norm", "batch_norm_epsilons"]

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


def _is_array(value) -> bool:
    """An array or an array's shape and dtype (``jax.ShapeDtypeStruct``): what ``jax.eval_shape`` may trace."""
    return isinstance(value, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def batch_norm_epsilons(model, *args, method=None, **kwargs):
    """``{"path/of/norm": epsilon}`` of every ``nn.BatchNorm`` (or :class:`renorm.jax.BatchRenorm`) in ``model``.

    Read from the modules themselves by tracing ``model.init(key, *args,
    **kwargs)`` abstractly (``jax.eval_shape``: nothing is computed), so the
    result is exactly what the model uses, whatever its constructor defaults.
    Arrays among ``args`` and ``kwargs`` are traced; every other argument
    (``train=False``, which a model branches on in Python) is passed as it
    was given. Pass the result as ``epsilon=`` to :func:`convert_batch_norm`
    or :func:`export_batch_norm`::

        eps = renorm.jax.convert.batch_norm_epsilons(bn_model, x, train=False)
        variables = renorm.jax.convert_batch_norm(bn_checkpoint, target, epsilon=eps)

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import linen as nn
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x, train: bool):
    ...         return nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(nn.Dense(4)(x))
    >>> batch_norm_epsilons(Net(), jnp.ones((8, 3)), train=False)
    {'BatchNorm_0': 0.001}
    """
    import flax.linen as nn

    from renorm.jax.linen import BatchRenorm

    found = {}

    def record(next_fun, call_args, call_kwargs, context):
        if isinstance(context.module, (nn.BatchNorm, BatchRenorm)) and context.method_name == "__call__":
            found["/".join(map(str, context.module.path))] = float(context.module.epsilon)
        return next_fun(*call_args, **call_kwargs)

    init = model.init if method is None else functools.partial(model.init, method=method)
    # Only the arrays are traced; every other argument (``train=False``, a flag the model branches
    # on in Python) is closed over as it was given, as a static argument of ``init``.
    leaves, tree = jax.tree.flatten((args, kwargs))
    traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def abstract_init(key, arrays):
        given = list(leaves)
        for i, array in zip(traced, arrays):
            given[i] = array
        call_args, call_kwargs = jax.tree.unflatten(tree, given)
        return init(key, *call_args, **call_kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(abstract_init, jax.random.key(0), [leaves[i] for i in traced])
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.BatchNorm or BatchRenorm module (called with these "
            f"inputs), so it has no epsilon to read."
        )
    return found


def _check_epsilon(value, where):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not math.isfinite(float(value))
        or not float(value) > 0
    ):
        raise ValueError(
            f"`epsilon` must be a finite number > 0 (the batch norms' epsilon{where}), got epsilon={value!r}."
        )
    return float(value)


def _epsilons(epsilon, modules, rename, function):
    """``{module path tuple: epsilon}`` for ``modules`` (the source's norm paths) from a number or a mapping."""
    if epsilon is None:
        raise TypeError(
            f"{function}() needs the batch norms' epsilon: epsilon=1e-5 (Flax's default), 1e-3 "
            f"(Keras's, and models ported from it), or "
            f"epsilon=renorm.jax.convert.batch_norm_epsilons(model, x) "
            f"to read it from the model's modules. A wrong epsilon changes every output silently."
        )
    if not isinstance(epsilon, Mapping):
        eps = _check_epsilon(epsilon, "")
        return {m: eps for m in modules}
    given = {str(k): _check_epsilon(v, f" of {k}") for k, v in epsilon.items()}
    out, missing = {}, []
    for m in modules:
        names = ("/".join(map(str, m)), "/".join(map(str, rename(m))))
        key = next((n for n in names if n in given), None)
        if key is None:
            missing.append(names[0])
        else:
            out[m] = given[key]
    if missing:
        raise ValueError(
            f"`epsilon` names no epsilon for {len(missing)} norm module(s): {', '.join(missing[:_SHOW])}"
            f" (it has {', '.join(sorted(given)[:_SHOW])}). Nothing was converted."
        )
    return out


def convert_batch_norm(bn_variables, target, *, epsilon=None):
    """The variables of a ``nn.BatchNorm`` model, as variables of the same model with ``BatchRenorm``.

    Args:
      bn_variables: the batch-norm model's variables (``{"params": ...,
        "batch_stats": ...}``, a dict or ``FrozenDict``; other collections
        are carried as they are).
      target: the renorm model's variables, e.g. ``model.init(key, x)``, or
        only their shapes: ``jax.eval_shape(model.init, key, x)`` (nothing is
        computed); their structure, shapes and dtypes are used.
      epsilon: the batch norms' epsilon, required: a number (Flax's default is
        ``1e-5``, Keras's ``1e-3``), or ``{"path/of/norm": epsilon}`` for
        every norm, e.g. :func:`batch_norm_epsilons` of the batch-norm model
        (read from its modules). It goes into ``stddev = sqrt(var + epsilon)``,
        so that the inference outputs are the batch-norm model's. Give the
        renorm layers the same epsilon.

    Returns:
      Variables of exactly ``target``'s structure and dtypes: every
      non-norm leaf copied, each norm's ``scale``/``bias``/``mean`` copied,
      ``stddev = sqrt(var + epsilon)`` (float64, then rounded), ``step = 0``.

    Raises:
      ValueError: a target leaf without a source, a source leaf without a
        place in the target, a shape mismatch, a negative ``var``, or an
        ``epsilon`` that is not a finite number > 0 (or names no epsilon for
        some norm).
      TypeError: no ``epsilon`` given.

    Example:

    >>> from flax import linen as nn
    >>> from renorm.jax import BatchRenorm
    >>> class Net(nn.Module):
    ...     norm: type = nn.BatchNorm
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return self.norm(use_running_average=True, epsilon=0.25)(nn.Dense(3)(x))
    >>> x, key = jnp.ones((2, 4)), jax.random.key(0)
    >>> bn_variables = Net().init(key, x)  # a checkpoint: var = 1
    >>> target = jax.eval_shape(Net(norm=BatchRenorm).init, key, x)
    >>> variables = convert_batch_norm(bn_variables, target, epsilon=0.25)
    >>> variables["batch_stats"]["BatchRenorm_0"]["stddev"].tolist()  # sqrt(1 + 0.25)
    [1.1180340051651, 1.1180340051651, 1.1180340051651]
    """
    src = _flat(bn_variables, "bn_variables")
    tgt = _flat(target, "target")
    target_norms = set(_norm_modules(tgt, ("mean", "stddev", "step")))
    modules = _norm_modules(src, ("mean", "var"))
    eps = _epsilons(
        epsilon, modules, lambda m: _rename(m, "BatchNorm", "BatchRenorm", target_norms), "convert_batch_norm"
    )
    out = {}
    for path in modules:
        epsilon = eps[path]
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


def export_batch_norm(variables, target, *, epsilon=None, negative_variance: str = "raise"):
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

    ``epsilon`` is required, as in :func:`convert_batch_norm`: the renorm
    layers' (a number, or ``{"path/of/norm": epsilon}``, e.g.
    :func:`batch_norm_epsilons` of the renorm model).

    Args:
      variables: the renorm model's variables.
      target: the batch-norm model's variables (``model.init``, or
        ``jax.eval_shape(model.init, ...)``), for the structure, shapes and
        dtypes.

    Example:

    >>> from flax import linen as nn
    >>> from renorm.jax import BatchRenorm
    >>> class Net(nn.Module):
    ...     norm: type = nn.BatchNorm
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return self.norm(use_running_average=True, epsilon=0.25)(nn.Dense(3)(x))
    >>> x, key = jnp.ones((2, 4)), jax.random.key(0)
    >>> variables = Net(norm=BatchRenorm).init(key, x)  # stddev = 1
    >>> bn_variables = export_batch_norm(variables, jax.eval_shape(Net().init, key, x), epsilon=0.25)
    >>> bn_variables["batch_stats"]["BatchNorm_0"]["var"].tolist()  # 1**2 - 0.25
    [0.75, 0.75, 0.75]
    """
    check_negative_variance(negative_variance)
    src = _flat(variables, "variables")
    src = {k: v for k, v in src.items() if k[0] != "intermediates"}
    tgt = _flat(target, "target")
    target_norms = set(_norm_modules(tgt, ("mean", "var")))
    modules = _norm_modules(src, ("mean", "stddev", "step"))
    eps = _epsilons(
        epsilon, modules, lambda m: _rename(m, "BatchRenorm", "BatchNorm", target_norms), "export_batch_norm"
    )
    out = {}
    for path in modules:
        epsilon = eps[path]
        new = _rename(path, "BatchRenorm", "BatchNorm", target_norms)
        for col in list(src):
            if col[1:-1] == path:
                value = src.pop(col)
                if col[0] == "batch_stats" and col[-1] == "stddev":
                    name = "/".join(map(str, path))
                    out[("batch_stats",) + new + ("var",)] = variance_from_stddev(
                        np.asarray(jax.device_get(value)),
                        epsilon,
                        name=name,
                        negative_variance=negative_variance,
                        stacklevel=3,
                    )
                elif not (col[0] == "batch_stats" and col[-1] == "step"):
                    out[(col[0],) + new + (col[-1],)] = value
    out.update(src)
    return _wrap(_match(out, tgt, "renorm variables to batch norm"), target)
