"""The PyTorch modules' behaviour: state_dict, errors (docs/SPEC.md, section 10), edge cases (section 3),
torch.compile, autocast, channels-last, export. Values are checked against the NumPy oracle."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from parity import CASES, CONFIG_ERRORS, assert_close, make_params, make_steps
from test_torch_parity import run_parity

from renorm.numpy_ref import BatchRenormReference
from renorm.torch import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d


def trained(seed=0, **kw):
    """A BatchRenorm2d after 3 training steps (a non-trivial state), and an input."""
    torch.manual_seed(seed)
    m = BatchRenorm2d(3, momentum=0.3, rmax=1.5, dmax=0.5, warmup_steps=1, rmax_steps=4, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    for _ in range(3):
        m(torch.randn(4, 3, 2, 2) * 2 + 1)
    return m, torch.randn(4, 3, 2, 2) * 2 + 1


# ---------------------------------------------------------------- state
def test_state_dict_round_trip_is_exact():
    """torch.save / torch.load of the state_dict: identical tensors, then identical training and inference."""
    m, x = trained()
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_std", "num_batches_tracked"}  # diagnostics: not state
    assert sd["num_batches_tracked"].dtype == torch.int64 and int(sd["num_batches_tracked"]) == 3
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = BatchRenorm2d(3, momentum=0.3, rmax=1.5, dmax=0.5, warmup_steps=1, rmax_steps=4)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # the step counter travels: the schedule continues where it was (rmax(3) = 1.25 here, not rmax(0) = 1)
    for mod in (m, fresh):
        torch.testing.assert_close(mod._limits(torch.float32)[0], torch.tensor(1 + 0.5 * 2 / 3))
    y1, y2 = m(x), fresh(x)
    assert torch.equal(y1, y2)
    assert torch.equal(m.running_std, fresh.running_std) and torch.equal(m.r_clipped, fresh.r_clipped)
    m.eval(), fresh.eval()
    assert torch.equal(m(x), fresh(x))


def test_momentum_is_torch_update_rate():
    """One step from mean 0, std 1: running_mean = momentum * batch mean (PyTorch's convention), exactly."""
    m = BatchRenorm1d(2, momentum=0.25, dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    m(x)
    torch.testing.assert_close(m.running_mean, 0.25 * x.mean(0), rtol=0, atol=0)
    sigma = torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(m.running_std, 0.75 + 0.25 * sigma, rtol=1e-15, atol=0)


def test_defaults_and_factory_kwargs():
    m = BatchRenorm2d(5)
    assert (m.eps, m.momentum, m.affine, m.track_running_stats, m.rmax, m.dmax) == (1e-5, 0.1, True, True, 3.0, 5.0)
    assert m.microbatch_size is None and m.explicit_backward and not m.synchronized
    assert torch.equal(m.running_std, torch.ones(5)) and torch.equal(m.weight.detach(), torch.ones(5))
    d = BatchRenorm1d(4, dtype=torch.float64, device="meta")
    for t in (d.weight, d.bias, d.running_mean, d.running_std):
        assert t.dtype == torch.float64 and t.device.type == "meta"
    assert d.num_batches_tracked.dtype == torch.int64
    n = BatchRenorm1d(4, affine=False)
    assert n.weight is None and n.bias is None and list(n.parameters()) == []
    assert repr(BatchRenorm2d(3, microbatch_size=2, warmup_steps=5)) == (
        "BatchRenorm2d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, rmax=3.0, dmax=5.0, "
        "warmup_steps=5, microbatch_size=2)"
    )


def test_reset_running_stats():
    m, _ = trained()
    assert float(m.r_clipped) > 0 or float(m.d_clipped) > 0
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_std, torch.ones(3))
    assert int(m.num_batches_tracked) == 0 and float(m.r_clipped) == 0 and float(m.d_clipped) == 0


def test_eval_is_inference_with_any_batch():
    """eval(): y = w (x - running_mean) / running_std + b, the oracle's inference; one example alone is fine."""
    m, x = trained()
    m.eval()
    ref = BatchRenormReference(
        3,
        momentum=0.7,
        epsilon=1e-5,
        axis=1,
        gamma=m.weight.detach().numpy(),
        beta=m.bias.detach().numpy(),
        mean=m.running_mean.numpy(),
        stddev=m.running_std.numpy(),
    )
    state = {k: v.clone() for k, v in m.state_dict().items()}
    y = m(x)
    assert_close(y.detach().numpy(), ref.infer(x.numpy()), "float32", "value", "eval")
    assert torch.equal(m(x[:1]), y[:1])  # each example alone
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval changes no state


def test_no_grad_training_still_updates_state():
    m, x = trained()
    with torch.no_grad():
        m(x)
    assert int(m.num_batches_tracked) == 4


# ---------------------------------------------------------------- errors
def _torch_config(kw):
    """CONFIG_ERRORS in PyTorch's spelling: ``eps`` for ``epsilon``; ``momentum`` is the update rate."""
    kw = dict(kw)
    if "epsilon" in kw:
        kw["eps"] = kw.pop("epsilon")
    return kw


TORCH_CONFIG_ERRORS = [
    (_torch_config(kw), exc, _torch_config({"x": words})["x"].replace("epsilon=", "eps="))
    for kw, exc, words in CONFIG_ERRORS
    if "momentum" not in kw
] + [
    # PyTorch's momentum is the update rate: (0, 1] or None. 0 would never move the state (the spec's momentum=1).
    (dict(momentum=0.0), ValueError, "momentum=0.0"),
    (dict(momentum=-0.1), ValueError, "momentum=-0.1"),
    (dict(momentum=1.5), ValueError, "momentum=1.5"),
    (dict(momentum="0.1"), TypeError, "momentum='0.1'"),
    (dict(eps=float("nan")), ValueError, "eps=nan"),
    (dict(synchronized=True, microbatch_size=2), ValueError, "microbatch_size=2"),
]


@pytest.mark.parametrize("kw,exc,words", TORCH_CONFIG_ERRORS, ids=[str(k) for k, _, _ in TORCH_CONFIG_ERRORS])
def test_config_errors(kw, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        BatchRenorm2d(4, **kw)


def test_momentum_one_and_none_are_accepted():
    BatchRenorm2d(4, momentum=1.0)
    BatchRenorm2d(4, momentum=None)


@pytest.mark.parametrize("num_features,exc", [(0, ValueError), (2.0, TypeError)])
def test_num_features_errors(num_features, exc):
    with pytest.raises(exc, match=f"num_features={num_features}"):
        BatchRenorm1d(num_features)


@pytest.mark.parametrize(
    "cls,x,exc,words",
    [
        (BatchRenorm2d, torch.zeros(4, 3, 2, 2, dtype=torch.int32), TypeError, "int32"),
        (BatchRenorm, torch.zeros(4), ValueError, r"shape \(4,\) of rank 1"),
        (BatchRenorm2d, torch.zeros(4, 3, 2), ValueError, r"BatchRenorm2d expects a 4-D \(N, C, H, W\) input.*rank 3"),
        (BatchRenorm1d, torch.zeros(4, 3, 2, 2), ValueError, r"2-D \(N, C\) or 3-D \(N, C, L\).*rank 4"),
        (BatchRenorm3d, torch.zeros(4, 3, 2, 2), ValueError, "5-D"),
        (BatchRenorm2d, torch.zeros(4, 5, 2, 2), ValueError, "5 features on axis 1 but the layer was built for 3"),
        (BatchRenorm1d, torch.zeros(1, 3), ValueError, "a batch holds 1"),
    ],
)
def test_input_errors(cls, x, exc, words):
    with pytest.raises(exc, match=words):
        cls(3)(x)


def test_microbatch_errors():
    with pytest.raises(ValueError, match="a batch of 6 examples and microbatch_size=4"):
        BatchRenorm1d(3, microbatch_size=4)(torch.zeros(6, 3))
    with pytest.raises(ValueError, match="a micro-batch of 1 holds 1"):
        BatchRenorm1d(3, microbatch_size=1)(torch.zeros(6, 3))
    BatchRenorm1d(3, microbatch_size=4).eval()(torch.zeros(6, 3))  # inference has no groups


def test_synchronized_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="init_process_group"):
        BatchRenorm1d(3, synchronized=True)(torch.randn(4, 3))


# ---------------------------------------------------------------- edge cases
def test_empty_batch_is_no_step():
    m, _ = trained()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    diag = (m.r_clipped.clone(), m.d_clipped.clone())
    x = torch.zeros(0, 3, 2, 2, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(m.weight.grad, torch.zeros(3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(m.r_clipped, diag[0]) and torch.equal(m.d_clipped, diag[1])


def test_non_finite_batch_keeps_the_state_and_gives_nan_outputs():
    """A NaN in feature 1 of micro-batch 0: that group's feature-1 outputs are NaN, the rest is the oracle's;
    the moving statistics stay, the step advances (docs/SPEC.md, section 3)."""
    case = next(c for c in CASES if c.name == "nchw_axis1_mb2")
    xs, _, _ = make_steps(case, 0)
    x = xs[0].copy()
    x[0, 1, 0, 0] = np.nan
    p = make_params(case, 0)
    ref = BatchRenormReference(case.num_features, momentum=0.5, epsilon=1e-5, **case.layer_kwargs(), **p)
    m = BatchRenorm2d(case.num_features, momentum=0.5, dtype=torch.float64, microbatch_size=2, **case.schedule_kwargs)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(p["gamma"]))
        m.bias.copy_(torch.from_numpy(p["beta"]))
        m.running_mean.copy_(torch.from_numpy(p["mean"]))
        m.running_std.copy_(torch.from_numpy(p["stddev"]))
    y = m(torch.from_numpy(x)).detach().numpy()
    y_ref = ref.train(x)
    bad = np.isnan(y_ref)
    assert bad[:2, 1].all() and bad.sum() == bad[:2, 1].size  # exactly the group and feature with the NaN
    np.testing.assert_array_equal(np.isnan(y), bad)
    assert_close(y[~bad], y_ref[~bad], "float64", "value", "finite outputs")
    np.testing.assert_array_equal(m.running_mean.numpy(), p["mean"])
    np.testing.assert_array_equal(m.running_std.numpy(), p["stddev"])
    assert int(m.num_batches_tracked) == ref.step == 1


def test_offset_data_float32():
    """1000 + 0.01 * noise in float32: E[x^2] - E[x]^2 would give variance 0 and a wrong r (docs/SPEC.md, section 8)."""
    rng = np.random.default_rng(0)
    x = (1000.0 + 0.01 * rng.standard_normal((64, 4))).astype(np.float32)
    m = BatchRenorm1d(4, momentum=0.5, rmax=1e3, dmax=1e6)
    with torch.no_grad():
        m.running_mean.fill_(1000.0)
        m.running_std.fill_(0.02)
    y = m(torch.from_numpy(x)).detach().numpy()
    ref = BatchRenormReference(
        4, momentum=0.5, epsilon=1e-5, rmax=1e3, dmax=1e6, mean=np.full(4, 1000.0), stddev=np.full(4, 0.02)
    )
    assert_close(y, ref.train(x.astype(np.float64)), "float32", "value", "y")
    assert_close(m.running_std.numpy(), ref.stddev, "float32", "value", "running_std")


@pytest.mark.parametrize("cls,shape", [(BatchRenorm2d, (4, 3, 5, 2)), (BatchRenorm3d, (4, 3, 2, 3, 2))])
def test_channels_last(cls, shape):
    """A channels-last input gives a channels-last output, gradient and the same values as a contiguous one."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, dtype=torch.float64)
    outs = []
    for xx in (x.contiguous(), x.to(memory_format=fmt)):
        xx = xx.detach().requires_grad_(True)
        m = cls(3, dtype=torch.float64, microbatch_size=2, rmax=1.2, dmax=0.1)
        y = m(xx)
        y.backward(dy)
        outs.append((y, xx.grad, m.running_std))
    (y0, g0, s0), (y1, g1, s1) = outs
    assert y1.is_contiguous(memory_format=fmt) and g1.is_contiguous(memory_format=fmt)
    for a, b in ((y0, y1), (g0, g1), (s0, s1)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- compile, autocast, export
COMPILE_CONFIGS = [
    dict(),
    dict(microbatch_size=2, warmup_steps=1, rmax_steps=3),
    dict(momentum=None),
    dict(explicit_backward=False),
    dict(track_running_stats=False),
    dict(affine=False),
]


@pytest.mark.parametrize("kw", COMPILE_CONFIGS, ids=[str(k) for k in COMPILE_CONFIGS])
def test_torch_compile_has_no_graph_break(kw):
    """torch._dynamo.explain: one graph, no break, in training (with backward) and in eval."""
    m = BatchRenorm2d(4, **kw)
    x = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_(True)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        torch._dynamo.reset()
        ex = torch._dynamo.explain(m)(x)
        assert ex.graph_break_count == 0, ex.break_reasons
        assert ex.graph_count == 1


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("nhwc_mb2_tight", "schedule")], ids=lambda c: c.name)
def test_compiled_parity_aot_eager(case):
    """torch.compile (forward and backward traced by AOTAutograd, fullgraph) against the oracle, state included."""
    torch._dynamo.reset()
    run_parity(case, 0.5, "float64", compiled="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("nhwc_mb2_tight", "schedule", "dense")], ids=lambda c: c.name
)
def test_compiled_parity_inductor(case, dtype):
    """torch.compile with the default (inductor) backend against the oracle (about a minute per case on CPU)."""
    torch._dynamo.reset()
    run_parity(case, 0.5, dtype, compiled="inductor")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    """Under torch.autocast a conv feeds a half-precision input: the output keeps it, statistics stay float32."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    m = BatchRenorm2d(4, momentum=0.5, rmax=1.5, dmax=0.5)
    x = torch.randn(6, 3, 5, 5)
    with torch.autocast("cpu", dtype=dtype):
        h = conv(x)
        h.retain_grad()
        y = m(h)
    assert h.dtype == dtype and y.dtype == dtype
    assert m.running_mean.dtype == torch.float32 and m.running_std.dtype == torch.float32
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    assert h.grad.dtype == dtype and m.weight.grad.dtype == torch.float32
    ref = BatchRenormReference(4, momentum=0.5, epsilon=1e-5, rmax=1.5, dmax=0.5, axis=1)
    h64 = h.detach().double().numpy()
    assert_close(y.detach().double().numpy(), ref.train(h64), "bfloat16", "value", "y")
    dx, dw, db = ref.backward(dy.double().numpy())
    assert_close(h.grad.double().numpy(), dx, "bfloat16", "grad", "dx")
    assert_close(m.weight.grad.numpy(), dw, "bfloat16", "grad", "dweight")
    assert_close(m.running_std.numpy(), ref.stddev, "float32", "value", "running_std")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("nhwc_mb2_tight", "schedule")], ids=lambda c: c.name)
def test_export_in_training_mode_against_the_oracle(case):
    """torch.export of the training module: the exported program, trained step by step, against the oracle
    (outputs, gradients, moving statistics, step counter and clip fractions, through the schedule)."""
    run_parity(case, 0.5, "float64", exported=True)


def test_export_and_trace_in_eval():
    """torch.export and torch.jit.trace of the eval module reproduce its output.

    torch.jit.script cannot compile the module (its configuration is a Python dataclass, its checks are
    renorm.config's Python).
    """
    m, x = trained()
    m.eval()
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x), rtol=0, atol=0)
    traced = torch.jit.trace(m, (x,))
    torch.testing.assert_close(traced(x * 2), m(x * 2), rtol=0, atol=0)


def test_import_loads_no_other_framework():
    """``import renorm.torch`` imports neither TensorFlow, Keras, JAX nor Flax (docs/torch.md)."""
    import subprocess
    import sys

    code = (
        "import sys, renorm.torch; bad = [m for m in ('tensorflow', 'keras', 'jax', 'flax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
