"""Batch Renormalization as PyTorch functions (the core of :mod:`renorm.torch`'s modules).

The algorithm (Ioffe 2017, arXiv:1702.03275, Algorithm 1, extended with micro-batches), its numerics and its
explicit backward are specified once, in ``docs/SPEC.md``: sections 2-6 (the training step, ``r`` and ``d`` as
constants for the gradient, the backward formula), 8 (numerics and precision) and 11 (cross-replica statistics).
Features are on dim 1, as in ``torch.nn.BatchNorm*d``. What is particular to this implementation:

- For a whole batch in float32/float64 the moments are ``torch.batch_norm_update_stats`` (torch's batch-norm
  moments, two-pass); narrower floats (float16, bfloat16, ``torch.autocast``) compute in float32.
- Micro-batches are a free view ``(B, C, ...) -> (G, k, C, ...)`` of any memory format (channels-last
  included): no copy. Eagerly, each pass over it writes into one reused input-sized buffer (``x - mu``, then
  ``y`` or ``dx`` in place), and the sums of products (``sum((x - mu)**2)``, ``sum(dy * (x - mu))``) avoid an
  input-sized product where they can: one ``torch.bmm`` of rows for 16 to 256 spatial values, ``k`` slices for
  dense groups of at most 8 examples (the only Python loop); under ``torch.compile`` the plain expressions,
  which inductor fuses.
- With a ``process_group`` (``synchronized=True`` in the modules) the sums and counts are all-reduced (two
  all-reduces, the variance around the global mean), and the backward all-reduces its two sums, as
  ``torch.nn.SyncBatchNorm`` does; the gradients of ``weight`` and ``bias`` stay per process (DDP averages them).
- :class:`BatchRenormFunction` (a ``torch.autograd.Function``, the paper's explicit backward) saves only the
  input (in its own dtype) and per-group-and-feature vectors (``mu``, ``1 / sigma``, ``r``, ``d``,
  ``weight * r / sigma``). :func:`renorm_autodiff` is the same forward in plain differentiable operations, the
  tested reference (``explicit_backward=False`` in the modules).

>>> import torch
>>> x = torch.randn(8, 3)
>>> xg = group_view(x, 2)  # two micro-batches of 4 examples
>>> y = renorm_explicit(xg, None, None, torch.zeros(3), torch.ones(3), 3.0, 5.0, 1e-5)[0]
>>> y.view_as(x).shape
torch.Size([8, 3])
"""

from __future__ import annotations

import torch

__all__ = [
    "BatchRenormFunction",
    "compute_dtype",
    "group_view",
    "renorm_autodiff",
    "renorm_explicit",
    "inference",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float is computed in float32.

    >>> compute_dtype(torch.bfloat16)
    torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` (``(B, C, ...)``) as ``(G, B / G, C, ...)``, a view for any memory format.

    >>> group_view(torch.zeros(8, 3, 5), 4).shape
    torch.Size([4, 2, 3, 5])
    """
    return x.view((groups, x.shape[0] // groups) + tuple(x.shape[1:]))


def _dims(ndim: int):
    """Reduced dims of a grouped view ``(G, k, C, ...)``: all but the group (0) and the feature (2)."""
    return (1,) + tuple(range(3, ndim))


@torch.library.custom_op("renorm::snapshot", mutates_args=())
def _snapshot_op(t: torch.Tensor) -> torch.Tensor:
    """:func:`snapshot` under ``torch.compile``: an opaque copy that AOTAutograd saves instead of recomputing."""
    return t.clone()


@_snapshot_op.register_fake
def _(t):
    return torch.empty_like(t)


def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that ``torch.compile`` cannot re-read later.

    The modules read their buffers (moving statistics, step counter) through
    this before updating them in place. A plain read or ``clone`` is
    "recomputable": AOTAutograd's partitioner (torch 2.13) may then re-read
    the buffer in the backward, *after* the in-place update, and compute the
    gradient with the new statistics: silently wrong gradients
    (pytorch/pytorch#197039, open). Under ``torch.compile`` the copy is
    therefore the opaque custom op ``renorm::snapshot``, which is saved, not
    recomputed.

    Eagerly it is a plain ``clone`` (the same values; nothing is recomputed
    eagerly). Not the custom op: its first call imports ``torch._dynamo``
    (``torch.library`` wraps the implementation in ``torch._disable_dynamo``),
    which imports ``triton`` where it is installed (torch's CUDA wheels), and
    ``import triton`` after ``import tensorflow`` (TF 2.20/2.21 wheels, loaded
    with ``RTLD_GLOBAL``) crashes the process (tensorflow/tensorflow#124205):
    an eager forward must not be what loads it.

    >>> snapshot(torch.ones(2))
    tensor([1., 1.])
    """
    if torch.compiler.is_compiling():
        return _snapshot_op(t)
    return t.clone()


def _count(shape, dims) -> int:
    """Values per feature in a group of a grouped view (a loop, not a generator: torch.compile traces it)."""
    count = 1
    for d in dims:
        count *= int(shape[d])
    return count


def _feature(v: torch.Tensor | None, ndim: int, cdt) -> torch.Tensor | None:
    """A ``(C,)`` vector shaped ``(1, 1, C, 1, ...)`` for a grouped view of rank ``ndim``, in ``cdt``."""
    if v is None:
        return None
    return v.to(cdt).view((1, 1, -1) + (1,) * (ndim - 3))


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


def _all_reduce_autograd(t: torch.Tensor, group) -> torch.Tensor:
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a private module; still the differentiable one
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t, group=group)


def _moments(xf: torch.Tensor, dims, eps: float, group, all_reduce=_all_reduce):
    """``mu_g``, ``sigma_g`` (keepdim) of a grouped view in its compute dtype.

    Without a ``group``, two passes (the mean, then the mean squared deviation from it). Pooled over ``group``:
    ``[sum, count]`` all-reduced for the mean, then the sum of squared
    deviations from that global mean (two-pass). A process with 0 examples
    joins both all-reduces with zero sums and a zero count (as
    ``torch.nn.SyncBatchNorm``), so the others do not wait for it; where every
    process is empty the pooled count is 0 and the moments are taken as
    ``mu = 0``, ``var = 0`` (finite; the caller then takes no step).

    Returns ``mu``, ``sigma`` and the count of values per feature per group,
    pooled (a tensor shaped like ``mu``) or not (a Python float).
    """
    if group is None:
        # Sums divided by the count, not torch.var_mean: the same two passes, and on the grouped view (a
        # reduction over a short middle dimension) var_mean is 10x to 30x slower on CPU.
        count = float(_count(xf.shape, dims))
        mu = torch.sum(xf, dim=dims, keepdim=True) / count
        var = torch.sum(torch.square(xf - mu), dim=dims, keepdim=True) / count
    else:
        local = _count(xf.shape, dims)
        s = torch.sum(xf, dim=dims, keepdim=True)
        pooled = all_reduce(torch.stack([s, torch.full_like(s, float(local))]), group)
        count = pooled[1].detach()
        n = torch.clamp(count, min=1.0)  # all processes empty: 0 / 1, not 0 / 0
        mu = pooled[0] / n
        sq = all_reduce(torch.sum(torch.square(xf - mu), dim=dims, keepdim=True), group)
        var = sq / n
    return mu, torch.sqrt(var + eps), count


def _eager() -> bool:
    """Not inside ``torch.compile``: reuse buffers (``out=``, in place), which dynamo refuses for strided
    ``out=`` tensors and inductor does not need (it fuses the plain expressions)."""
    return not torch.compiler.is_compiling()


def _sub_into(buf: torch.Tensor, xg: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``x - mu`` into ``buf`` (eagerly), or as a new tensor (compiled)."""
    return torch.sub(xg, mu, out=buf) if _eager() else xg.to(mu.dtype) - mu


def _addcmul_into(buf: torch.Tensor, b, t: torch.Tensor, a) -> torch.Tensor:
    """``b + t * a`` into ``buf`` (eagerly; ``t`` may be ``buf``), or as a new tensor (compiled)."""
    return torch.addcmul(b, t, a, out=buf) if _eager() else torch.addcmul(b, t, a)


def _centered(xg: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """A fresh buffer holding ``x - mu`` in ``mu``'s (compute) dtype; a narrower ``xg`` is converted on the way."""
    if xg.dtype == mu.dtype:
        return xg - mu
    return xg.to(mu.dtype).sub_(mu)


# _bmm_dot applies for a spatial size S (values per example and feature) in this range: measured on this
# project's 2-core CPU (torch 2.13), one batched product beat the in-place product, sum and refill from
# S = 16 (4 x 4) to 256 (16 x 16) and lost at S = 1024 (32 x 32) on one thread.
_BMM_MIN_SPATIAL = 16
_BMM_MAX_SPATIAL = 256


def _bmm_dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Per group and feature, ``sum(u * v)`` over the group (keepdim), as one ``torch.bmm`` of rows; or ``None``.

    For contiguous ``(G, k, C, S...)`` grouped views with ``S`` (the spatial size) from
    :data:`_BMM_MIN_SPATIAL` to :data:`_BMM_MAX_SPATIAL`: each ``(example, feature)`` row of ``S``
    values is one ``1 x S`` by ``S x 1`` product, so ``u * v`` is never materialized (the caller saves
    two passes: an in-place product and a refill of ``x - mu``); the ``k`` row sums are then added.
    Eagerly only (``None`` under ``torch.compile``, which fuses the plain form), and ``None`` for any
    other layout (channels-last, dense inputs, an expanded ``dy``).
    """
    if u.dim() < 4 or not _eager() or not (u.is_contiguous() and v.is_contiguous()):
        return None
    g, k, c = u.shape[0], u.shape[1], u.shape[2]
    rows = g * k * c
    if rows == 0:
        return None
    s = u.numel() // rows
    if not _BMM_MIN_SPATIAL <= s <= _BMM_MAX_SPATIAL:
        return None
    p = torch.bmm(u.view(rows, 1, s), v.view(rows, s, 1)).view(g, k, c)
    return p.sum(1, keepdim=True).view((g, 1, c) + (1,) * (u.dim() - 3))


_SLICE_MAX_K = 8  # dense groups of up to this many examples are summed slice by slice


def _dense_small(t: torch.Tensor) -> bool:
    """A grouped view without spatial dims, ``(G, k, C)``, with ``2 <= k <= _SLICE_MAX_K`` (eagerly)."""
    return t.dim() == 3 and 2 <= t.shape[1] <= _SLICE_MAX_K and _eager()


def _group_sum(t: torch.Tensor, dims) -> torch.Tensor:
    """Per group and feature, ``sum(t)`` (keepdim).

    Dense small groups (:func:`_dense_small`) as ``k - 1`` additions of ``(G, 1, C)`` slices, in the order
    the reduction adds them: a reduction over the short middle dim zero-fills its output and costs
    about twice as much there.
    """
    if not _dense_small(t):
        return torch.sum(t, dim=dims, keepdim=True)
    acc = t[:, 0:1] + t[:, 1:2]
    for j in range(2, t.shape[1]):
        acc.add_(t[:, j : j + 1])
    return acc


def _group_dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Per group and feature, ``sum(u * v)`` (keepdim) without an input-sized product; ``None`` if no such way.

    Dense small groups: one product and ``k - 1`` ``addcmul_`` of ``(G, 1, C)`` slices; else
    :func:`_bmm_dot`.
    """
    if _dense_small(u):
        acc = u[:, 0:1] * v[:, 0:1]
        for j in range(1, u.shape[1]):
            acc.addcmul_(u[:, j : j + 1], v[:, j : j + 1])
        return acc
    return _bmm_dot(u, v)


def _moments_nograd(xg: torch.Tensor, dims, eps: float, group):
    """:func:`_moments` for the explicit forward (no autograd), with one input-sized buffer.

    The same two passes and the same sums, written for speed: the mean, then
    ``x - mu`` into a fresh buffer and the sum of its squares, by
    :func:`_group_dot` where it applies, else squared in place, summed, and the
    buffer refilled with ``x - mu``; the caller turns the buffer into the
    output in place. Returns ``mu``, ``sigma``, the count (as
    :func:`_moments`) and that buffer.
    """
    cdt = compute_dtype(xg.dtype)
    local = _count(xg.shape, dims)
    s = _group_sum(xg, dims) if xg.dtype == cdt else torch.sum(xg, dim=dims, keepdim=True, dtype=cdt)
    if group is None:
        count = float(local)
        n = count
        mu = s.div_(n)
    else:
        pooled = _all_reduce(torch.stack([s, torch.full_like(s, float(local))]), group)
        count = pooled[1]
        n = torch.clamp(count, min=1.0)  # all processes empty: 0 / 1, not 0 / 0
        mu = pooled[0] / n
    buf = _centered(xg, mu)
    sq = _group_dot(buf, buf)
    refill = sq is None
    if refill:  # squared in place, summed, refilled below
        sq = torch.sum(buf.square_() if _eager() else torch.square(buf), dim=dims, keepdim=True)
    if group is not None:
        sq = _all_reduce(sq, group)
    sigma = sq.div_(n).add_(eps).sqrt_()
    return mu, sigma, count, (_sub_into(buf, xg, mu) if refill else buf)


def _corrections(mu, sigma, mean, std, rmax, dmax):
    """``r``, ``d`` clipped (NaN where a statistic is not finite), and the diagnostic counts.

    ``counts`` is an int64 ``(3,)`` tensor: the entries of ``r`` and of ``d`` that the clip changed (its
    input strictly outside the limits; NaN entries not counted), and the NaN entries (the same for
    ``r`` and ``d``: those where ``mu`` or ``sigma`` is not finite). ``rmax``/``dmax``: 0-dim tensors or
    Python floats.

    Seven operations on the ``(G, C)`` statistics (with micro-batches of 2 on a dense input they are half the
    input's size): ``z = mu * 0 + sigma * 0`` is 0 where both are finite and NaN elsewhere, and is added to
    ``sigma / std`` and ``(mu - mean) / std`` (``1 / std`` is a ``(C,)`` vector).
    """
    inv_std = torch.reciprocal(std)
    z = mu * 0.0
    z = z.addcmul_(sigma, z) if _eager() else torch.addcmul(z, sigma, z)  # NaN where mu or sigma is not finite
    r_raw = torch.addcmul(z, sigma, inv_std)
    d_raw = torch.sub(mu, mean)
    d_raw = d_raw.mul_(inv_std).add_(z) if _eager() else d_raw * inv_std + z
    r = torch.clamp(r_raw, 1.0 / rmax, rmax)  # clamp keeps NaN
    d = torch.clamp(d_raw, -dmax, dmax)
    nan = torch.count_nonzero(torch.isnan(r_raw))  # count_nonzero: .sum() of a bool tensor copies it to int64
    # The clip changed an entry iff clamp(v) != v; NaN != NaN, so the NaN entries are taken off again.
    r_changed = torch.count_nonzero(torch.ne(r, r_raw))
    d_changed = torch.count_nonzero(torch.ne(d, d_raw))
    counts = torch.stack([r_changed - nan, d_changed - nan, nan])
    return r, d, counts


def _limit(v, cdt):
    """A clip limit in the compute dtype: a 0-dim tensor converted, a Python float as it is."""
    return v.to(cdt) if isinstance(v, torch.Tensor) else v


def _affine(r, d, sigma, weight, bias):
    """``a``, ``b`` of ``y = (x - mu) * a + b`` (``a = weight r / sigma``, ``b = bias + weight d``), ``1 / sigma``."""
    inv_sigma = torch.reciprocal(sigma)
    a = r * inv_sigma
    if weight is not None:
        a = a.mul_(weight) if _eager() else a * weight
    if bias is None:
        b = d if weight is None else d * weight
    else:
        b = d + bias if weight is None else torch.addcmul(bias, d, weight)
    return a, b, inv_sigma


class BatchRenormFunction(torch.autograd.Function):
    """The training normalization of a grouped view, with the paper's explicit backward.

    ``forward(xg, weight, bias, running_mean, running_std, rmax, dmax, eps, group)``:
    ``xg`` is ``(G, k, C, ...)``; ``weight``/``bias`` ``(C,)`` or ``None``;
    ``running_*`` ``(C,)`` (read, not written); ``rmax``/``dmax`` 0-dim
    tensors, the limits at this step; ``group`` a process group to pool over,
    or ``None`` (Python floats for ``rmax``/``dmax`` work too). Returns ``y``
    (``xg``'s dtype and shape) and, without gradient, ``mu``, ``sigma`` per
    group and feature (keepdim, compute dtype), ``counts`` (the clip and NaN
    counts of :func:`_corrections`), and ``count``: with a ``group``, the number of
    values per feature pooled over the processes (shaped like ``mu``; 0 when
    every process had 0 examples), else ``None``.

    Example (two groups of 4 examples, 3 features):

    >>> xg = torch.randn(2, 4, 3)
    >>> ones, zeros = torch.ones(3), torch.zeros(3)
    >>> y, mu, sigma, counts, count = BatchRenormFunction.apply(xg, ones, zeros, zeros, ones, 3.0, 5.0, 1e-5, None)
    >>> y.shape, mu.shape, count
    (torch.Size([2, 4, 3]), torch.Size([2, 1, 3]), None)
    """

    @staticmethod
    def forward(ctx, xg, weight, bias, running_mean, running_std, rmax, dmax, eps, group):
        cdt = compute_dtype(xg.dtype)
        nd = xg.dim()
        dims = _dims(nd)
        # One group, one process, float32/float64: PyTorch's own batch-norm kernels for the moments and the
        # backward (the same formulas, fused; see _native_backward). Otherwise the grouped view in plain ops
        # (float16/bfloat16 too: torch's CPU moments of a bfloat16 input lose about 1e-4 of the variance).
        native = group is None and xg.shape[0] == 1 and xg.dtype == cdt
        if native:
            mu, var = torch.batch_norm_update_stats(xg[0], None, None, 0.0)  # biased variance, not E[x^2]-E[x]^2
            mu, sigma = _feature(mu, nd, cdt), _feature(torch.sqrt(var.to(cdt) + eps), nd, cdt)
            buf = xg - mu  # the output's buffer
        else:
            mu, sigma, count, buf = _moments_nograd(xg, dims, eps, group)
        mean = _feature(running_mean, nd, cdt)
        std = _feature(running_std, nd, cdt)
        r, d, counts = _corrections(mu, sigma, mean, std, _limit(rmax, cdt), _limit(dmax, cdt))
        w = _feature(weight, nd, cdt)
        a, b, inv_sigma = _affine(r, d, sigma, w, _feature(bias, nd, cdt))
        y = _addcmul_into(buf, b, buf, a).to(xg.dtype)  # (x - mu) * a + b, in the buffer that held x - mu
        pooled = group is not None
        ctx.save_for_backward(xg, weight, mu, inv_sigma, r, d, a, *((count,) if pooled else ()))
        ctx.group = group
        ctx.native = native
        ctx.count = float(_count(xg.shape, dims))
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mu, sigma, counts, *((count,) if pooled else ()))
        # The statistics get no gradient: without this autograd would pass the backward a zero-filled
        # (G, 1, C, ...) tensor for each (allocated and filled, half the input's size on dense micro-batches).
        ctx.set_materialize_grads(False)
        return y, mu, sigma, counts, (count if pooled else None)

    @staticmethod
    def backward(ctx, dy, *_):
        """Per group, with ``g = dy * weight`` and means over the (pooled) group::

            dx      = r / sigma * (g - mean(g) - (x - mu) * mean(g * (x - mu)) / sigma**2)
            dweight = sum(dy * xhat) = sum over groups of (r / sigma * sum(dy * (x - mu)) + d * sum(dy))
            dbias   = sum(dy)

        ``docs/SPEC.md``'s section 6 form ``g r/sigma + dL/dsigma (x - mu)/(m sigma) + dL/dmu / m``,
        rearranged. ``dweight``/``dbias`` are this process's sums.
        """
        xg, weight, mu, inv_sigma, r, d, a = ctx.saved_tensors[:7]
        if dy is None:  # y did not reach the loss (set_materialize_grads(False)): nothing to propagate
            dy = torch.zeros_like(xg)
        cdt = mu.dtype
        nd = xg.dim()
        if ctx.native:
            return _native_backward(ctx, dy, xg, weight, mu, inv_sigma, r, d)
        dims = _dims(nd)
        dyf = dy.to(cdt)
        sum_dy = _group_sum(dyf, dims)
        # sum(dy * (x - mu)) without a second input-sized buffer: dy * (x - mu) in place, summed, and the
        # same buffer then holds x - mu again and becomes dx (a fresh input-sized tensor costs more than a
        # pass over one: above glibc's mmap threshold each allocation is page-faulted in anew).
        buf = _centered(xg, mu)
        sum_dy_xc = _group_dot(dyf, buf)
        refill = sum_dy_xc is None
        if refill:
            sum_dy_xc = torch.sum(buf.mul_(dyf) if _eager() else buf * dyf, dim=dims, keepdim=True)
        # The parameter gradients first (this process's sums), so that the sums can then be reused in place.
        dweight = dbias = None
        if ctx.has_weight and ctx.needs_input_grad[1]:
            dweight = torch.sum(torch.mul(r, inv_sigma).mul_(sum_dy_xc).addcmul_(d, sum_dy), dim=0)
            dweight = dweight.reshape(weight.shape).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = torch.sum(sum_dy, dim=0).reshape(-1).to(ctx.bias_dtype)
        count = ctx.count
        if ctx.group is None:
            tot_dy, tot_dy_xc = sum_dy, sum_dy_xc
        else:
            # A process with 0 examples joins with zero sums (its dx is empty); the count is the forward's.
            pooled = _all_reduce(torch.stack([sum_dy, sum_dy_xc]), ctx.group)
            tot_dy, tot_dy_xc = pooled[0], pooled[1]
            count = torch.clamp(ctx.saved_tensors[7], min=1.0)
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = a * (dy - mean(dy) - (x - mu) * q), q = sum(dy (x - mu)) / (m sigma^2), a = weight r / sigma,
            # as a * dy + (x - mu) * (-a q) + (-a mean(dy)): two passes over the buffer; the (G, C) factors
            # are computed in place in the sums.
            neg_inv_count = -1.0 / count if isinstance(count, float) else torch.reciprocal(count).neg_()
            c1 = tot_dy_xc.mul_(inv_sigma).mul_(inv_sigma).mul_(a).mul_(neg_inv_count)
            c0 = tot_dy.mul_(a).mul_(neg_inv_count)
            if refill:
                buf = _sub_into(buf, xg, mu)
            buf = _addcmul_into(buf, c0, buf, c1)
            dx = (buf.addcmul_(dyf, a) if _eager() else torch.addcmul(buf, dyf, a)).to(xg.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None


def _native_backward(ctx, dy, xg, weight, mu, inv_sigma, r, d):
    """The backward of one whole-batch group by ``aten.native_batch_norm_backward``.

    Batch norm's training backward with weight ``w' = weight * r`` and
    ``save_invstd = 1 / sigma`` is exactly the explicit formula of
    :meth:`BatchRenormFunction.backward`: ``dx = w' / sigma * (dy - mean(dy) -
    (x - mu) * mean(dy * (x - mu)) / sigma**2)``. Its weight gradient is
    ``sum(dy * (x - mu) / sigma)``, so ``dweight = r * that + d * sum(dy)``.
    """
    cdt = mu.dtype
    r1, d1 = r.reshape(-1), d.reshape(-1)
    w1 = r1 if weight is None else weight.to(cdt) * r1
    x0 = xg[0]
    need_dx = ctx.needs_input_grad[0]
    dx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        dy[0], x0, w1, None, None, mu.reshape(-1), inv_sigma.reshape(-1), True, 0.0, [need_dx, True, True]
    )
    dweight = dbias = None
    if ctx.has_weight and ctx.needs_input_grad[1]:
        dweight = (r1 * gw.to(cdt) + d1 * gb.to(cdt)).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = gb.to(ctx.bias_dtype)
    return (None if dx is None else dx.unsqueeze(0)), dweight, dbias, None, None, None, None, None, None


def renorm_explicit(xg, weight, bias, running_mean, running_std, rmax, dmax, eps: float, group=None):
    """:class:`BatchRenormFunction` applied (the default, explicit gradient).

    >>> xg = torch.randn(1, 8, 3, requires_grad=True)  # the whole batch as one group
    >>> y = renorm_explicit(xg, None, None, torch.zeros(3), torch.ones(3), 3.0, 5.0, 1e-5)[0]
    >>> y.sum().backward(); xg.grad.shape
    torch.Size([1, 8, 3])
    """
    return BatchRenormFunction.apply(xg, weight, bias, running_mean, running_std, rmax, dmax, eps, group)


def renorm_autodiff(xg, weight, bias, running_mean, running_std, rmax, dmax, eps: float, group=None):
    """The same forward as :class:`BatchRenormFunction` in plain ops, differentiated by autograd.

    ``r`` and ``d`` are detached (the paper's stop-gradient); pooling uses the
    differentiable ``torch.distributed.nn.functional.all_reduce``. Returns what
    :class:`BatchRenormFunction` returns.

    >>> xg = torch.randn(2, 4, 3, dtype=torch.float64)
    >>> args = (torch.zeros(3), torch.ones(3), 3.0, 5.0, 1e-5)
    >>> torch.allclose(renorm_autodiff(xg, None, None, *args)[0], renorm_explicit(xg, None, None, *args)[0])
    True
    """
    cdt = compute_dtype(xg.dtype)
    nd = xg.dim()
    xf = xg.to(cdt)
    mu, sigma, count = _moments(xf, _dims(nd), eps, group, all_reduce=_all_reduce_autograd)
    mean = _feature(running_mean, nd, cdt).detach()
    std = _feature(running_std, nd, cdt).detach()
    r, d, counts = _corrections(mu.detach(), sigma.detach(), mean, std, _limit(rmax, cdt), _limit(dmax, cdt))
    y = (xf - mu) / sigma * r + d
    if weight is not None:
        y = y * _feature(weight, nd, cdt)
    if bias is not None:
        y = y + _feature(bias, nd, cdt)
    return y.to(xg.dtype), mu.detach(), sigma.detach(), counts, (None if group is None else count)


def inference(x, weight, bias, running_mean, running_std):
    """``y = weight * (x - running_mean) / running_std + bias`` (features on dim 1).

    Only the moving statistics enter; ``running_std`` already includes
    epsilon. Computed in :func:`compute_dtype` of the input, returned in its dtype.

    >>> inference(torch.tensor([[3.0, 2.0]]), None, None, torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
    tensor([[1., 0.]])
    """
    cdt = compute_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    a = 1.0 / running_std.to(cdt).view(shape)
    if weight is not None:
        a = a * weight.to(cdt).view(shape)
    xc = x.to(cdt) - running_mean.to(cdt).view(shape)
    y = xc * a if bias is None else torch.addcmul(bias.to(cdt).view(shape), xc, a)
    return y.to(x.dtype)
