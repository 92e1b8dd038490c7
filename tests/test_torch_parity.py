"""The PyTorch port against the NumPy oracle (docs/SPEC.md, section 9) and torch.nn.BatchNorm.

Every comparison is with the oracle run in float64 on the values the port received,
at the tolerances of ``tests/parity.py`` (``TOL``), over the shared case registry.
The registry's cases keep features on ``case.axis``; the port keeps them on dim 1,
so the input is ``x.movedim(axis, 1)``: for the NHWC cases that is a channels-last
NCHW tensor, the layout a channels-last model feeds its norms.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from parity import (
    CASE_IDS,
    CASES,
    REDUCED_CASES,
    Case,
    assert_close,
    assert_matches_oracle,
    make_params,
    make_steps,
    rel_err,
)

from renorm.numpy_ref import BatchRenormReference
from renorm.testing.adapters import TorchAdapter
from renorm.torch import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def module_class(ndim: int):
    return {2: BatchRenorm1d, 3: BatchRenorm1d, 4: BatchRenorm2d, 5: BatchRenorm3d}.get(ndim, BatchRenorm)


def torch_module(case, momentum, *, eps=1e-5, param_dtype=torch.float32, p=None, **kw):
    """The port for ``case`` with PyTorch's ``momentum`` (the update rate), parameters and state from ``p``."""
    cls = module_class(len(case.shape))
    m = cls(
        case.num_features,
        eps=eps,
        momentum=momentum,
        affine=True,
        dtype=param_dtype,
        microbatch_size=case.microbatch_size,
        **case.schedule_kwargs,
        **kw,
    )
    if p is not None:
        with torch.no_grad():
            m.weight.copy_(torch.as_tensor(p["gamma"] if p["gamma"] is not None else np.ones(case.num_features)))
            m.bias.copy_(torch.as_tensor(p["beta"] if p["beta"] is not None else np.zeros(case.num_features)))
            m.running_mean.copy_(torch.as_tensor(p["mean"]))
            m.running_std.copy_(torch.as_tensor(p["stddev"]))
    if not case.scale:
        m.weight.requires_grad_(False)
    if not case.center:
        m.bias.requires_grad_(False)
    return m


def oracle(case, momentum, p, eps=1e-5, dtype=np.float64):
    """The oracle with the specification's momentum, ``1 - `` PyTorch's."""
    spec = None if momentum is None else 1.0 - momentum
    return BatchRenormReference(
        case.num_features,
        momentum=0.0 if spec is None else spec,
        epsilon=eps,
        center=case.center,
        scale=case.scale,
        dtype=dtype,
        **case.layer_kwargs(),
        **p,
    )


def to_port(a, case, dtype):
    """A registry array (features on ``case.axis``) as the port's input: features on dim 1."""
    return torch.from_numpy(np.asarray(a, np.float64)).movedim(case.axis, 1).to(dtype)


def from_port(t, case):
    """The port's tensor back to the registry's layout, in float64."""
    return t.detach().movedim(1, case.axis).to(torch.float64).numpy()


def rounded(p, dtype):
    """Parameters as the port holds them (rounded to ``dtype``), in float64, for the oracle."""
    return {k: None if v is None else torch.as_tensor(v).to(dtype).to(torch.float64).numpy() for k, v in p.items()}


def run_parity(case, momentum, dtype, *, seed=0, explicit_backward=True, compiled=False, exported=False, steps=None):
    """Train ``case.steps`` steps (or ``steps``) and infer once, every step against the oracle, through the driver.

    ``momentum`` is PyTorch's (the update rate); ``compiled`` a ``torch.compile`` backend name; ``exported``: the
    module is ``torch.export``-ed in training mode first and the exported program trained (no inference step).
    Returns the module trained.
    """
    adapter = TorchAdapter(explicit_backward=explicit_backward, compiled=compiled or None, exported=exported)
    if steps is not None:
        case = dataclasses.replace(case, steps=steps)
    assert_matches_oracle(adapter, case, dtype=dtype, momentum=1.0 - momentum, epsilon=1e-5, seed=seed)
    return adapter.last_module


@pytest.mark.parametrize("momentum", [0.01, 0.5])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float64(case, momentum):
    """The default gradient: the paper's explicit backward (torch.autograd.Function)."""
    run_parity(case, momentum, "float64")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float64_autodiff(case):
    """The reference gradient: autograd through the forward pass."""
    run_parity(case, 0.5, "float64", explicit_backward=False)


@pytest.mark.parametrize("momentum", [0.01, 0.5])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float32(case, momentum):
    run_parity(case, momentum, "float32")


REDUCED = REDUCED_CASES


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", REDUCED, ids=[c.name for c in REDUCED])
def test_parity_reduced_precision(case, dtype):
    """float16/bfloat16 inputs, float32 parameters and statistics (docs/SPEC.md, section 8)."""
    run_parity(case, 0.5, dtype)


# The eager speed paths of renorm/torch/functional.py that the registry's small spatial sizes (<= 9 values)
# do not reach: one batched product per (example, feature) row (_bmm_dot: contiguous layouts, 16 to 256
# values), the in-place product, sum and refill above 256 values and for channels-last inputs, and the
# grouped sequence. Each against the oracle like the registry; `bmm` says which path the case must take.
SPEED_CASES = [
    (Case("nchw_4x4_mb4_tight", (8, 3, 4, 4), axis=1, microbatch_size=4, rmax=1.2, dmax=0.2, steps=3), True),
    (Case("nchw_8x8_mb2", (4, 3, 8, 8), axis=1, microbatch_size=2, rmax=1.3, dmax=0.3, steps=3), True),
    (Case("seq_axis1_L20_mb2", (4, 3, 20), axis=1, microbatch_size=2, rmax=1.3, dmax=0.3, steps=3), True),
    (Case("nchw_32x32_mb2", (4, 2, 32, 32), axis=1, microbatch_size=2, rmax=1.3, dmax=0.3, steps=3), False),
    (Case("nhwc_8x8_mb2", (4, 8, 8, 3), microbatch_size=2, rmax=1.3, dmax=0.3, steps=3), False),
]


@pytest.mark.parametrize("dtype", ["float64", "float64-autodiff", "float32", "bfloat16"])
@pytest.mark.parametrize("case,bmm", SPEED_CASES, ids=[c.name for c, _ in SPEED_CASES])
def test_parity_eager_speed_paths(case, bmm, dtype, monkeypatch):
    import renorm.torch.functional as F

    taken = []
    dot = F._bmm_dot

    def spy(u, v):
        out = dot(u, v)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(F, "_bmm_dot", spy)
    autodiff = dtype.endswith("autodiff")
    run_parity(case, 0.5, dtype.split("-")[0], explicit_backward=not autodiff)
    if not autodiff:  # forward and backward of every step
        assert taken and all(t == bmm for t in taken), (case.name, taken)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("dense_mb2", "schedule")], ids=lambda c: c.name)
def test_momentum_none_is_a_cumulative_average(case):
    """PyTorch's momentum=None: the update rate at step t is 1 / (t + 1), checked against the oracle."""
    xs, _, dys = make_steps(case, 3)
    p = rounded(make_params(case, 3), torch.float64)
    m = torch_module(case, None, param_dtype=torch.float64, p=p)
    ref = oracle(case, 0.5, p)
    for t, x_np in enumerate(xs):
        ref.momentum = 1.0 - 1.0 / (t + 1)
        y = m(to_port(x_np, case, torch.float64))
        assert_close(from_port(y, case), ref.train(x_np), "float64", "value", f"step {t} y")
        assert_close(m.running_mean.numpy(), ref.mean, "float64", "value", f"step {t} running_mean")
        assert_close(m.running_std.numpy(), ref.stddev, "float64", "value", f"step {t} running_std")
    # After the first step the state is the first batch's statistics (rate 1): the test would see a constant rate.
    assert ref.step == len(xs) > 2


def test_parity_cases_exercise_clipping():
    """The registry clips (else parity would not test the clip), and the port reports it."""
    case = next(c for c in CASES if c.name == "nhwc_mb2_tight")
    m = run_parity(case, 0.5, "float64", steps=1)
    assert float(m.r_clipped) > 0 and float(m.d_clipped) > 0


# ---------------------------------------------------------------- batch norm
BN_SHAPES = [
    ((8, 5), BatchRenorm1d, torch.nn.BatchNorm1d),
    ((8, 3, 4), BatchRenorm1d, torch.nn.BatchNorm1d),
    ((6, 3, 2, 2), BatchRenorm2d, torch.nn.BatchNorm2d),
    ((4, 2, 2, 2, 3), BatchRenorm3d, torch.nn.BatchNorm3d),
]
BN_IDS = ["1d", "1d_seq", "2d", "3d"]


def bn_pair(cls, bn_cls, c, *, momentum=0.3, microbatch_size=None, explicit=True, track=True, seed=0):
    rng = np.random.default_rng(seed)
    ours = cls(
        c,
        eps=1e-3,
        momentum=momentum,
        rmax=1.0,
        dmax=0.0,
        dtype=torch.float64,
        track_running_stats=track,
        microbatch_size=microbatch_size,
        explicit_backward=explicit,
    )
    theirs = bn_cls(c, eps=1e-3, momentum=momentum, dtype=torch.float64, track_running_stats=track)
    weight, bias = torch.from_numpy(rng.uniform(0.5, 1.5, c)), torch.from_numpy(rng.normal(size=c))
    with torch.no_grad():
        for mod in (ours, theirs):
            mod.weight.copy_(weight)
            mod.bias.copy_(bias)
        if track:
            mean = torch.from_numpy(rng.normal(size=c))
            ours.running_mean.copy_(mean)
            theirs.running_mean.copy_(mean)
            ours.running_std.fill_(7.0)  # far from the batch's: r and d would clip if rmax, dmax allowed
    return ours, theirs


def grads(mod, x, dy):
    x = x.clone().requires_grad_(True)
    mod.zero_grad(set_to_none=True)
    y = mod(x)
    y.backward(dy)
    return y.detach(), x.grad, mod.weight.grad, mod.bias.grad


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "autodiff"])
@pytest.mark.parametrize("shape,cls,bn_cls", BN_SHAPES, ids=BN_IDS)
def test_rmax1_dmax0_is_torch_batchnorm(shape, cls, bn_cls, explicit):
    """rmax=1, dmax=0 is torch.nn.BatchNorm in training: outputs, gradients, running_mean, over 3 steps.

    running_var is not comparable: torch keeps the *unbiased* variance, renorm the moving mean of
    sigma_g = sqrt(biased var + eps) (docs/SPEC.md, section 3), checked against the oracle here.
    """
    c = shape[1]
    ours, theirs = bn_pair(cls, bn_cls, c, explicit=explicit)
    ref = BatchRenormReference(
        c,
        momentum=0.7,
        epsilon=1e-3,
        rmax=1.0,
        dmax=0.0,
        axis=1,
        gamma=ours.weight.detach().numpy(),
        beta=ours.bias.detach().numpy(),
        mean=ours.running_mean.numpy(),
        stddev=ours.running_std.numpy(),
    )
    rng = np.random.default_rng(1)
    for step in range(3):
        x = torch.from_numpy(3.0 + 2.0 * rng.standard_normal(shape))
        dy = torch.from_numpy(rng.standard_normal(shape))
        a, b = grads(ours, x, dy), grads(theirs, x, dy)
        for what, u, v, kind in zip(("y", "dx", "dweight", "dbias"), a, b, ("value", "grad", "grad", "grad")):
            assert_close(u.numpy(), v.numpy(), "float64", kind, f"step {step} {what}")
        assert_close(ours.running_mean.numpy(), theirs.running_mean.numpy(), "float64", "value", "running_mean")
        ref.train(x.numpy())
        assert_close(ours.running_std.numpy(), ref.stddev, "float64", "value", "running_std")
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == step + 1
    # The moving std started at 7, far from the batches': every r was clipped to 1 (the limits were active).
    assert float(ours.r_clipped) == 1.0


@pytest.mark.parametrize("shape,cls,bn_cls", BN_SHAPES[1:3], ids=BN_IDS[1:3])
def test_rmax1_dmax0_microbatches_are_ghost_batch_norm(shape, cls, bn_cls):
    """With microbatch_size=k and rmax=1, dmax=0 each group of k examples is torch's batch norm of that group."""
    c = shape[1]
    ours, theirs = bn_pair(cls, bn_cls, c, microbatch_size=2)
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal(shape) * 2 + 1)
    dy = torch.from_numpy(rng.standard_normal(shape))
    y, dx, dw, db = grads(ours, x, dy)
    xr = x.clone().requires_grad_(True)
    y_bn = torch.cat([theirs(chunk) for chunk in xr.split(2)])
    y_bn.backward(dy)
    assert_close(y.numpy(), y_bn.detach().numpy(), "float64", "value", "y")
    assert_close(dx.numpy(), xr.grad.numpy(), "float64", "grad", "dx")
    assert_close(dw.numpy(), theirs.weight.grad.numpy(), "float64", "grad", "dweight")
    assert_close(db.numpy(), theirs.bias.grad.numpy(), "float64", "grad", "dbias")
    whole = grads(bn_pair(cls, bn_cls, c)[1], x, dy)[0]
    assert rel_err(y.numpy(), whole.numpy()) > 1e-2  # the grouping mattered


@pytest.mark.parametrize("shape,cls,bn_cls", BN_SHAPES, ids=BN_IDS)
def test_track_running_stats_false_is_torch_batchnorm(shape, cls, bn_cls):
    """Without running statistics both use batch statistics in train and eval, with r = 1, d = 0 whatever rmax."""
    c = shape[1]
    ours, theirs = bn_pair(cls, bn_cls, c, track=False)
    ours.schedule = type(ours.schedule)(rmax=1.5, dmax=0.5)  # unused without running statistics
    assert ours.running_mean is None and ours.running_std is None and ours.num_batches_tracked is None
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight", "bias"}
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal(shape) * 3 + 2)
    dy = torch.from_numpy(rng.standard_normal(shape))
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        for what, u, v in zip(("y", "dx", "dweight", "dbias"), grads(ours, x, dy), grads(theirs, x, dy)):
            assert_close(u.numpy(), v.numpy(), "float64", "value" if what == "y" else "grad", f"{mode} {what}")
