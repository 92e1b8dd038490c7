"""``BatchRenorm1d``/``2d``/``3d``: drop-ins for ``torch.nn.BatchNorm1d``/``2d``/``3d``."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from renorm.config import check_config, check_input, check_num_features, check_pooling
from renorm.schedule import ClipSchedule
from renorm.torch import functional as F

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "spec_momentum"]


def _check_torch_args(eps, momentum) -> None:
    """``eps > 0`` and PyTorch's ``momentum`` (the update rate) in ``(0, 1]`` or ``None``.

    Named and echoed as PyTorch spells them (``eps``, not the specification's
    ``epsilon``); the other checks are ``renorm.config``'s.
    """
    for name, value in (("eps", eps), ("momentum", momentum)):
        if name == "momentum" and value is None:
            continue
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"`{name}` must be a real number, got {name}={value!r} ({type(value).__name__}).")
        if math.isnan(float(value)):
            raise ValueError(f"`{name}` must not be NaN, got {name}={value!r}.")
    if not (float(eps) > 0.0 and math.isfinite(float(eps))):
        raise ValueError(f"`eps` must be a finite number > 0, got eps={eps!r}.")
    if momentum is not None and not 0.0 < float(momentum) <= 1.0:
        raise ValueError(
            "`momentum` must be in (0, 1] or None (PyTorch's convention: the update rate, running = "
            f"(1 - momentum) * running + momentum * batch; None: a cumulative average), got momentum={momentum!r}."
        )


def spec_momentum(momentum: float | None) -> float | None:
    """PyTorch's ``momentum`` (update rate) as the specification's (``1 - rate``); ``None`` stays ``None``."""
    return None if momentum is None else 1.0 - float(momentum)


class BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe, 2017, arXiv:1702.03275), features on dim 1, any rank >= 2.

    A drop-in for ``torch.nn.BatchNorm1d``/``2d``/``3d`` (:class:`BatchRenorm1d`,
    :class:`BatchRenorm2d`, :class:`BatchRenorm3d` check the rank as they do):
    the same arguments, defaults and meaning, ``num_features``, ``eps=1e-5``,
    ``momentum=0.1``, ``affine``, ``track_running_stats``, ``device``,
    ``dtype``, ``train()``/``eval()``, plus the renorm arguments of
    ``docs/SPEC.md`` (``rmax=3``, ``dmax=5``, ``warmup_steps``, ``rmax_steps``,
    ``dmax_steps``, ``microbatch_size``).

    In training each group of examples (``microbatch_size`` consecutive
    examples, or the whole batch) is normalized with its own statistics and
    corrected by ``r`` and ``d`` towards the running statistics, within the
    clipping schedule's limits; in ``eval()`` only the running statistics
    enter. The algorithm, and what an empty batch and a non-finite batch do,
    are written once in ``docs/SPEC.md`` (sections 2-5), and what PyTorch
    changes in section 15.

    ``momentum`` is PyTorch's: the **update rate**, ``running = (1 -
    momentum) * running + momentum * batch``, so the paper's and the
    specification's update rate ``alpha = 1 - momentum_spec`` *is* this
    ``momentum`` (torch's default 0.1 is Keras' and Flax's 0.9, not their
    0.99). ``momentum=None`` is PyTorch's cumulative average: the rate is
    ``1 / (num_batches_tracked + 1)``.

    State: parameters ``weight``, ``bias`` (``affine``); buffers
    ``running_mean``, ``running_std`` (the moving **standard deviation**,
    eps included; ``torch.nn.BatchNorm`` keeps ``running_var``, see
    :func:`renorm.torch.convert_batch_norm`) and ``num_batches_tracked``
    (int64), the step counter ``t`` that drives the clipping schedule; and,
    not saved in the ``state_dict``, ``r_clipped``/``d_clipped``: the fraction
    of ``r``/``d`` entries that the clip changed in the last training step.

    ``track_running_stats=False`` is PyTorch's: no running statistics, batch
    statistics in training and in eval. Without them there is nothing to
    correct towards, so ``r = 1, d = 0`` (batch norm, per group) and the
    schedule is unused.

    Other options: ``explicit_backward=True`` (the paper's backward as a
    ``torch.autograd.Function``; ``False``: autograd through the forward, the
    reference); ``synchronized=True`` pools the moments over
    ``process_group`` (default: the whole world), as ``torch.nn.SyncBatchNorm``
    does, and is an error together with ``microbatch_size``.

    With ``synchronized=True`` a process whose batch has 0 examples still
    joins the all-reduces (zero sums and counts, as ``torch.nn.SyncBatchNorm``)
    and takes the step of the pooled statistics like the others; only a step
    where every process has 0 examples is no step.

    Example:

    >>> layer = BatchRenorm(3, microbatch_size=2)  # any rank >= 2, features on dim 1
    >>> y = layer(torch.randn(4, 3, 5))
    >>> y.shape, int(layer.num_batches_tracked)
    (torch.Size([4, 3, 5]), 1)
    """

    _expected_dims: tuple | None = None  # ranks accepted (None: any >= 2)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        rmax_steps: int = 0,
        dmax_steps: int = 0,
        microbatch_size: int | None = None,
        explicit_backward: bool = True,
        synchronized: bool = False,
        process_group=None,
    ):
        super().__init__()
        num_features = check_num_features(num_features)
        _check_torch_args(eps, momentum)
        check_config(
            momentum=0.0 if momentum is None else spec_momentum(momentum),  # in [0, 1): checked above
            epsilon=eps,
            microbatch_size=microbatch_size,
            rmax=rmax,
            dmax=dmax,
            warmup_steps=warmup_steps,
            rmax_steps=rmax_steps,
            dmax_steps=dmax_steps,
        )
        check_pooling("synchronized" if synchronized else None, microbatch_size)
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.schedule = ClipSchedule(rmax, dmax, warmup_steps, rmax_steps, dmax_steps)
        self.microbatch_size = None if microbatch_size is None else int(microbatch_size)
        self.explicit_backward = bool(explicit_backward)
        self.synchronized = bool(synchronized)
        self.process_group = process_group
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_std", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_std", None)
            self.register_buffer("num_batches_tracked", None)
        diag = {"device": device, "dtype": torch.float32}
        self.register_buffer("r_clipped", torch.zeros((), **diag), persistent=False)
        self.register_buffer("d_clipped", torch.zeros((), **diag), persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------- torch API
    @property
    def rmax(self) -> float:
        return self.schedule.rmax

    @property
    def dmax(self) -> float:
        return self.schedule.dmax

    def reset_running_stats(self) -> None:
        """``running_mean = 0``, ``running_std = 1``, ``num_batches_tracked = 0``, diagnostics 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_std.fill_(1.0)
            self.num_batches_tracked.zero_()
        self.r_clipped.zero_()
        self.d_clipped.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = self.schedule
        out = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, rmax={s.rmax}, dmax={s.dmax}"
        )
        for name in ("warmup_steps", "rmax_steps", "dmax_steps"):
            if getattr(s, name):
                out += f", {name}={getattr(s, name)}"
        if self.microbatch_size is not None:
            out += f", microbatch_size={self.microbatch_size}"
        if self.synchronized:
            out += ", synchronized=True"
        return out

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if self._expected_dims is not None and x.dim() not in self._expected_dims:
            names = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
            want = " or ".join(f"{d}-D {names[d]}" for d in self._expected_dims)
            raise ValueError(
                f"{type(self).__name__} expects a {want} input, got an input of shape {tuple(x.shape)} "
                f"(rank {x.dim()})."
            )

    # --------------------------------------------------------------- forward
    def _pool_group(self):
        if not self.synchronized:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{type(self).__name__}(synchronized=True) needs torch.distributed to be initialized "
                "(torch.distributed.init_process_group) to pool the batch statistics in training."
            )
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_stats = self.training or not self.track_running_stats
        check_input(
            tuple(x.shape),
            dtype_name=str(x.dtype),
            is_floating=x.is_floating_point(),
            axis=1,
            microbatch_size=self.microbatch_size,
            num_features=self.num_features,
            training=batch_stats,
        )
        if not batch_stats:
            return F.inference(x, self.weight, self.bias, self.running_mean, self.running_std)
        group = self._pool_group()
        if x.shape[0] == 0 and group is None:  # no example, no group: no step, an empty output
            mean, std = self._moving(x)
            return F.inference(x, self.weight, self.bias, mean, std)
        # Pooled, an empty process joins the collectives (the others would wait for it) and steps with them.
        return self._train(x, group)

    def _moving(self, x):
        """The moving statistics, or ``0`` and ``1`` without running statistics (then ``r = 1``, ``d = 0``)."""
        if self.track_running_stats:
            return F.snapshot(self.running_mean), F.snapshot(self.running_std)
        cdt = F.compute_dtype(x.dtype)
        return (
            torch.zeros(self.num_features, dtype=cdt, device=x.device),
            torch.ones(self.num_features, dtype=cdt, device=x.device),
        )

    def _limits(self, cdt):
        """``(rmax(t), dmax(t))`` as 0-dim tensors for the step counter ``t = num_batches_tracked``."""
        if not self.track_running_stats:  # nothing to correct towards: batch norm
            one = torch.ones((), dtype=cdt, device=self.r_clipped.device)
            return one, one * 0.0
        t = F.snapshot(self.num_batches_tracked).to(torch.float64 if cdt == torch.float64 else torch.float32)
        rmax, dmax = self.schedule.limits(t, clip=torch.clamp)
        return rmax.to(cdt), dmax.to(cdt)

    def _train(self, x: torch.Tensor, group) -> torch.Tensor:
        groups = 1 if self.microbatch_size is None else x.shape[0] // self.microbatch_size
        xg = F.group_view(x, groups)
        cdt = F.compute_dtype(x.dtype)
        mean, std = self._moving(x)
        rmax, dmax = self._limits(cdt)
        if rmax.device.type == "cpu" and not torch.compiler.is_compiling():
            # Eagerly on CPU, Python floats (no device synchronization): clamp with scalar limits is about
            # twice as fast as with 0-dim tensors on the (G, C) statistics.
            rmax, dmax = float(rmax), float(dmax)
        # torch.export traces a custom autograd.Function's forward and differentiates the trace, so the explicit
        # backward (r and d held constant) would be lost, and the gradients wrong; the autodiff path detaches r
        # and d itself, and its gradients equal the explicit backward's (tests/test_torch_module.py).
        explicit = self.explicit_backward and not torch.compiler.is_exporting()
        fn = F.renorm_explicit if explicit else F.renorm_autodiff
        yg, mu, sigma, counts, count = fn(xg, self.weight, self.bias, mean, std, rmax, dmax, self.eps, group)
        with torch.no_grad():
            # Pooled: a step only if some process had examples (count is the same on every process).
            stepped = None if count is None else count.reshape(-1)[0] > 0
            self._update(mu, sigma, counts, groups, stepped)
        return yg.view(x.shape)

    def _update(self, mu, sigma, counts, groups, stepped=None) -> None:
        """Moving statistics (skipped if not finite), step counter and diagnostics, after the output.

        ``stepped``: ``None`` (a step), or a 0-dim bool tensor, False when every process of the pooled
        batch had 0 examples: then nothing changes (no host synchronization: ``torch.where``).
        """
        n = groups * self.num_features
        fractions = counts[:2].to(self.r_clipped.dtype) / n  # entries the clip changed, NaN entries not counted
        r_frac, d_frac = fractions[0], fractions[1]
        if stepped is not None:
            r_frac = torch.where(stepped, r_frac, self.r_clipped)
            d_frac = torch.where(stepped, d_frac, self.d_clipped)
        self.r_clipped.copy_(r_frac)
        self.d_clipped.copy_(d_frac)
        if not self.track_running_stats:
            return
        mu = mu.reshape(groups, self.num_features)
        sigma = sigma.reshape(groups, self.num_features)
        finite = counts[2] == 0  # no NaN entry: every mu and sigma finite
        if stepped is not None:
            finite = finite & stepped
        cdt = mu.dtype
        if self.momentum is None:  # cumulative average, as torch.nn.BatchNorm
            alpha = 1.0 / (self.num_batches_tracked.to(cdt) + 1.0)
        else:
            alpha = self.momentum
        mean = self.running_mean.to(cdt)
        std = self.running_std.to(cdt)
        new_mean = torch.where(finite, mean + alpha * (mu.mean(0) - mean), mean)
        new_std = torch.where(finite, std + alpha * (sigma.mean(0) - std), std)
        self.running_mean.copy_(new_mean)
        self.running_std.copy_(new_std)
        self.num_batches_tracked.add_(1 if stepped is None else stepped.to(self.num_batches_tracked.dtype))


class BatchRenorm1d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C)`` or ``(N, C, L)`` inputs, a drop-in for ``torch.nn.BatchNorm1d``.

    >>> BatchRenorm1d(3)(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    """

    _expected_dims = (2, 3)


class BatchRenorm2d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C, H, W)`` inputs, a drop-in for ``torch.nn.BatchNorm2d``.

    >>> layer = BatchRenorm2d(3, warmup_steps=100).eval()  # eval(): the running statistics only
    >>> layer(torch.ones(2, 3, 4, 4)).mean().item()
    1.0
    """

    _expected_dims = (4,)


class BatchRenorm3d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C, D, H, W)`` inputs, a drop-in for ``torch.nn.BatchNorm3d``.

    >>> BatchRenorm3d(3)(torch.randn(2, 3, 2, 2, 2)).shape
    torch.Size([2, 3, 2, 2, 2])
    """

    _expected_dims = (5,)
