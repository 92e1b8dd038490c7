"""Every batch norm of a model to batch renorm and back (``docs/SPEC.md``, section 14).

In the style of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the
modules are replaced in place (the root itself is returned replaced when it
is a norm), each new module keeps the old one's ``requires_grad`` flags,
device, dtype and train/eval mode. The state is carried with
``renorm.conversion`` (float64, rounded once)::

    running_std = sqrt(running_var + eps)          batch norm -> renorm
    running_var = running_std**2 - eps             renorm -> batch norm

``torch.nn.BatchNorm``'s ``running_var`` is the *unbiased* variance of the
batches; renorm's ``running_std`` averages ``sqrt(biased var + eps)``. The
conversion keeps the inference output (the quantity both use), not the
estimator: a converted model infers exactly as the original, and its
running statistics then move by renorm's rule.
"""

from __future__ import annotations

import torch
from torch import nn

from renorm.conversion import check_negative_variance, stddev_from_variance, variance_from_stddev
from renorm.torch.modules import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = ["convert_batch_norm", "export_batch_norm"]

_TO_RENORM = {nn.BatchNorm1d: BatchRenorm1d, nn.BatchNorm2d: BatchRenorm2d, nn.BatchNorm3d: BatchRenorm3d}
_TO_NORM = {BatchRenorm1d: nn.BatchNorm1d, BatchRenorm2d: nn.BatchNorm2d, BatchRenorm3d: nn.BatchNorm3d}


def _replace(module: nn.Module, make, function: str) -> nn.Module:
    """Every replacement is made before any is applied: an error in one module leaves ``module`` untouched."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{function}() takes a torch.nn.Module as `module`, got {type(module).__name__}.")
    root = make(module, type(module).__name__)
    if root is not None:
        return root
    planned = []  # (parent, child name, replacement)

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            new = make(child, path)
            if new is None:
                walk(child, path)
            else:
                planned.append((parent, name, new))

    walk(module, "")
    for parent, name, new in planned:
        parent.add_module(name, new)
    return module


def _like(dst: nn.Module, src: nn.Module) -> nn.Module:
    if src.affine:
        with torch.no_grad():
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        dst.weight.requires_grad_(src.weight.requires_grad)
        dst.bias.requires_grad_(src.bias.requires_grad)
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _factory(src: nn.Module) -> dict:
    t = src.weight if src.affine else src.running_mean
    return {} if t is None else {"device": t.device, "dtype": t.dtype}


def convert_batch_norm(module: nn.Module, **renorm_options) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` of ``module`` by batch renorm.

    ``BatchNorm{1,2,3}d`` become ``BatchRenorm{1,2,3}d`` and ``SyncBatchNorm``
    a :class:`BatchRenorm` (any rank) with ``synchronized=True`` and its
    ``process_group``. ``num_features``, ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``, the parameters (and their ``requires_grad``),
    device, dtype and mode are carried; ``running_std = sqrt(running_var +
    eps)`` computed in float64; ``num_batches_tracked`` (the schedule's step)
    and the diagnostics start at 0. ``renorm_options`` (``rmax``, ``dmax``, the
    schedule, ``microbatch_size``, ``explicit_backward``) go to every new
    module. A negative or non-finite ``running_var`` is a ``ValueError``
    naming the module, and so is a batch norm setting that batch renorm
    refuses (``momentum=0``, ``eps=0``); every error leaves ``module``
    untouched (the replacements are all made before any is applied), and a
    ``module`` that is not a ``torch.nn.Module`` is a ``TypeError``. Modules
    are replaced in place; the result is ``module`` itself unless ``module``
    is a norm.

    Example:

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.25))
    >>> model = convert_batch_norm(model, rmax=2.0)
    >>> type(model[1]).__name__, model[1].running_std.tolist()  # sqrt(1 + 0.25)
    ('BatchRenorm2d', [1.1180340051651, 1.1180340051651, 1.1180340051651, 1.1180340051651])
    """

    BatchRenorm(1, **renorm_options)  # the options' own errors first, naming the argument (not a module)

    def make(bn, name):
        if isinstance(bn, BatchRenorm) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return None
        if isinstance(bn, nn.SyncBatchNorm):
            cls, extra = BatchRenorm, {"synchronized": True, "process_group": bn.process_group}
        elif type(bn) in _TO_RENORM:
            cls, extra = _TO_RENORM[type(bn)], {}
        else:
            raise TypeError(f"Module {name!r} is a {type(bn).__name__}, which convert_batch_norm does not know.")
        try:
            new = cls(
                bn.num_features,
                eps=bn.eps,
                momentum=bn.momentum,
                affine=bn.affine,
                track_running_stats=bn.track_running_stats,
                **_factory(bn),
                **extra,
                **renorm_options,
            )
        except (TypeError, ValueError) as err:  # e.g. momentum=0: name the module whose setting it is
            kind = "" if name == type(bn).__name__ else f" ({type(bn).__name__})"
            raise type(err)(f"Module {name!r}{kind}: {err}") from err
        if bn.track_running_stats:
            std = stddev_from_variance(bn.running_var.detach().cpu().double().numpy(), bn.eps, name=name)
            with torch.no_grad():
                new.running_mean.copy_(bn.running_mean)
                new.running_std.copy_(torch.from_numpy(std))
        return _like(new, bn)

    return _replace(module, make, "convert_batch_norm")


def export_batch_norm(module: nn.Module, *, negative_variance: str = "raise") -> nn.Module:
    """Replace every batch renorm of ``module`` by ``torch.nn.BatchNorm1d/2d/3d`` (the inverse of
    :func:`convert_batch_norm`); the result needs no ``renorm``.

    ``running_var = running_std**2 - eps`` in float64; ``num_batches_tracked``
    is copied. A ``running_std`` below ``sqrt(eps)`` (more than rounding) has
    no batch-norm equivalent: ``negative_variance="raise"`` (default) raises
    a ``ValueError`` naming the module, ``"clamp"`` writes variance 0 there
    and warns. A synchronized :class:`BatchRenorm` becomes ``SyncBatchNorm``;
    any other :class:`BatchRenorm` of unspecified rank is a ``TypeError``
    naming the module (torch has no rank-free batch norm); every error leaves
    ``module`` untouched. The renorm options
    (``rmax``, ...) have no batch-norm equivalent and are dropped.

    Example:

    >>> model = export_batch_norm(nn.Sequential(nn.Linear(2, 3), BatchRenorm1d(3, eps=0.25)))
    >>> type(model[1]).__name__, model[1].running_var.tolist()  # 1**2 - 0.25
    ('BatchNorm1d', [0.75, 0.75, 0.75])
    """
    check_negative_variance(negative_variance)

    def make(layer, name):
        if not isinstance(layer, BatchRenorm):
            return None
        if layer.synchronized:
            cls, extra = nn.SyncBatchNorm, {"process_group": layer.process_group}
        elif type(layer) in _TO_NORM:
            cls, extra = _TO_NORM[type(layer)], {}
        else:
            raise TypeError(
                f"Module {name!r} is a {type(layer).__name__} of no fixed rank; export_batch_norm needs "
                "BatchRenorm1d/2d/3d (or synchronized=True, exported as SyncBatchNorm)."
            )
        new = cls(
            layer.num_features,
            eps=layer.eps,
            momentum=layer.momentum,
            affine=layer.affine,
            track_running_stats=layer.track_running_stats,
            **_factory(layer),
            **extra,
        )
        if layer.track_running_stats:
            var = variance_from_stddev(
                layer.running_std.detach().cpu().numpy(),
                layer.eps,
                name=name,
                negative_variance=negative_variance,
                stacklevel=5,
            )
            with torch.no_grad():
                new.running_mean.copy_(layer.running_mean)
                new.running_var.copy_(torch.from_numpy(var))
                new.num_batches_tracked.copy_(layer.num_batches_tracked)
        return _like(new, layer)

    return _replace(module, make, "export_batch_norm")
