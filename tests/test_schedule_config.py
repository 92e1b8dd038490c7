"""The shared, framework-free core: clipping schedule and configuration checks."""

import math

import numpy as np
import pytest

from renorm import ClipSchedule
from renorm.config import check_config, check_input, check_num_features, check_pooling
from renorm.numpy_ref import BatchRenormReference


def _design_limits(t, rmax, dmax, w, r_end, d_end):
    """The schedule of docs/SPEC.md, section 5, written out with if/else, independently of ClipSchedule."""
    if t < w:
        return 1.0, 0.0

    def ramp(end):
        if end <= w:
            return 1.0
        return min(max((t - w) / (end - w), 0.0), 1.0)

    return 1.0 + (rmax - 1.0) * ramp(r_end), dmax * ramp(d_end)


SCHEDULES = [
    dict(rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_steps=40000, dmax_steps=25000),
    dict(rmax=2.0, dmax=1.0, warmup_steps=0, rmax_steps=10, dmax_steps=7),
    dict(rmax=1.5, dmax=0.5, warmup_steps=4, rmax_steps=0, dmax_steps=4),
    dict(rmax=3.0, dmax=5.0),
    dict(rmax=1.0, dmax=0.0, warmup_steps=3, rmax_steps=9, dmax_steps=5),
]


@pytest.mark.parametrize("kw", SCHEDULES)
def test_schedule_at_and_around_every_breakpoint(kw):
    sched = ClipSchedule(**kw)
    w, re_, de = kw.get("warmup_steps", 0), kw.get("rmax_steps", 0), kw.get("dmax_steps", 0)
    ts = sorted({max(t + d, 0) for t in (0, w, re_, de) for d in (-2, -1, 0, 1, 2)} | {10**6})
    for t in ts:
        got = sched.limits(t)
        exp = _design_limits(t, kw["rmax"], kw["dmax"], w, re_, de)
        assert got == pytest.approx(exp, abs=1e-12), t
    # The same expression on arrays (as backends evaluate it on tensors).
    got_r, got_d = sched.limits(np.array(ts, np.float64))
    exp = np.array([_design_limits(t, kw["rmax"], kw["dmax"], w, re_, de) for t in ts])
    np.testing.assert_allclose(got_r, exp[:, 0], atol=1e-12)
    np.testing.assert_allclose(got_d, exp[:, 1], atol=1e-12)


def test_paper_schedule_values():
    """Warm-up 5k steps, rmax 1->3 by 40k, dmax 0->5 by 25k (the paper, section 4)."""
    s = ClipSchedule.paper()
    assert s.limits(0) == (1.0, 0.0)
    assert s.limits(4999) == (1.0, 0.0)
    assert s.limits(5000) == (1.0, 0.0)
    assert s.limits(15000) == pytest.approx((1.0 + 2.0 * 10000 / 35000, 2.5))
    assert s.limits(22500) == pytest.approx((2.0, 5.0 * 17500 / 20000))
    assert s.limits(25000) == pytest.approx((1.0 + 2.0 * 20000 / 35000, 5.0))
    assert s.limits(40000) == (3.0, 5.0)
    assert s.limits(160000) == (3.0, 5.0)


def test_paper_schedule_scaled_keeps_fractions():
    s = ClipSchedule.paper(total_steps=8000)  # 1/20 of the paper's run
    assert (s.warmup_steps, s.rmax_steps, s.dmax_steps) == (250, 2000, 1250)
    assert (s.rmax, s.dmax) == (3.0, 5.0)
    assert ClipSchedule.paper(160000) == ClipSchedule.paper()
    tiny = ClipSchedule.paper(total_steps=10)  # ramps survive rounding
    assert tiny.rmax_steps > tiny.warmup_steps and tiny.dmax_steps > tiny.warmup_steps
    with pytest.raises(ValueError, match="factor=0"):
        ClipSchedule().scaled(0)


def test_default_schedule_is_constant_and_batch_norm_schedule():
    assert ClipSchedule().limits(0) == (3.0, 5.0)
    assert ClipSchedule().limits(12345) == (3.0, 5.0)
    assert ClipSchedule.batch_norm().limits(7) == (1.0, 0.0)
    assert ClipSchedule(rmax=np.float32(2), warmup_steps=np.int64(3)).to_dict() == dict(
        rmax=2.0, dmax=5.0, warmup_steps=3, rmax_steps=0, dmax_steps=0
    )


# --------------------------------------------------------------------------- configuration errors
BAD_CONFIGS = [
    (dict(rmax=0.5), ValueError, r"rmax.*>= 1.*rmax=0.5"),
    (dict(rmax=math.inf), ValueError, r"rmax=inf"),
    (dict(rmax=math.nan), ValueError, r"rmax=nan"),
    (dict(rmax="3"), TypeError, r"rmax='3'"),
    (dict(dmax=-0.1), ValueError, r"dmax.*>= 0.*dmax=-0.1"),
    (dict(momentum=1.0), ValueError, r"momentum.*\[0, 1\).*momentum=1.0"),
    (dict(momentum=-0.01), ValueError, r"momentum=-0.01"),
    (dict(momentum=True), TypeError, r"momentum=True"),
    (dict(epsilon=0.0), ValueError, r"epsilon.*> 0.*epsilon=0.0"),
    (dict(epsilon=-1e-3), ValueError, r"epsilon=-0.001"),
    (dict(microbatch_size=0), ValueError, r"microbatch_size.*>= 1.*microbatch_size=0"),
    (dict(microbatch_size=2.0), TypeError, r"microbatch_size=2.0"),
    (dict(warmup_steps=-1), ValueError, r"warmup_steps.*>= 0.*warmup_steps=-1"),
    (dict(rmax_steps=-5), ValueError, r"rmax_steps=-5"),
    (dict(dmax_steps=1.5), TypeError, r"dmax_steps=1.5"),
    (dict(warmup_steps=10, rmax_steps=5), ValueError, r"rmax_steps.*warmup_steps=10.*rmax_steps=5"),
    (dict(warmup_steps=10, dmax_steps=9), ValueError, r"dmax_steps.*dmax_steps=9"),
]


@pytest.mark.parametrize("kw, exc, match", BAD_CONFIGS)
def test_configuration_errors(kw, exc, match):
    full = dict(momentum=0.99, epsilon=1e-3) | kw
    with pytest.raises(exc, match=match):
        check_config(**full)
    # The oracle's stateful wrapper rejects the same configurations at construction.
    with pytest.raises(exc, match=match):
        BatchRenormReference(3, **full)


def test_valid_configurations_pass():
    check_config(momentum=0.0, epsilon=1e-12, microbatch_size=1, rmax=1.0, dmax=0.0)
    check_config(momentum=0.99, epsilon=1e-3, warmup_steps=10, rmax_steps=10, dmax_steps=0)
    check_config(momentum=np.float32(0.9), epsilon=np.float64(1e-5), microbatch_size=np.int64(4))


def test_pooling_with_microbatches_is_an_error():
    check_pooling(None, 4)
    check_pooling("synchronized", None)
    with pytest.raises(ValueError, match=r"`axis_name`.*microbatch_size=2"):
        check_pooling("axis_name", 2)


def test_check_input_with_unknown_sizes_defers_checks():
    info = check_input((None, 3, 4), dtype_name="float32", is_floating=True, axis=-1, microbatch_size=2)
    assert info.axis == 2 and info.num_groups is None and info.group_count == 6 and info.num_features == 4
    info = check_input((None, 4), dtype_name="float32", is_floating=True, axis=-1)
    assert info.group_count is None


def test_core_imports_no_framework():
    """`import renorm` and the oracle need NumPy only."""
    import subprocess
    import sys

    code = (
        "import sys, renorm, renorm.numpy_ref, renorm.schedule, renorm.config\n"
        "bad = [m for m in ('tensorflow', 'jax', 'keras', 'flax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_input_empty_batch_and_zero_features():
    """An empty batch has no group to check; a micro-batch too small for any batch is still an error."""
    info = check_input((0, 3), dtype_name="float32", is_floating=True, axis=-1)
    assert info.num_groups == 0 and info.num_features == 3
    info = check_input((0, 2, 3), dtype_name="float32", is_floating=True, axis=-1, microbatch_size=1)
    assert info.num_groups == 0 and info.group_count == 2
    with pytest.raises(ValueError, match="micro-batch of 1 holds 1"):
        check_input((0, 3), dtype_name="float32", is_floating=True, axis=-1, microbatch_size=1)
    with pytest.raises(ValueError, match=r"0 features on axis -1.*\(4, 0\)"):
        check_input((4, 0), dtype_name="float32", is_floating=True, axis=-1, training=False)
    for bad, exc in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("3", TypeError)):
        with pytest.raises(exc, match=f"num_features={bad!r}"):
            check_num_features(bad)
    assert check_num_features(np.int64(3)) == 3
