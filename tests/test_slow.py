"""The long tests: ``pytest -m slow`` (the default run leaves them out).

- Many-step parity: the Keras layer and the Flax module against the NumPy
  oracle over 200 training steps, at the tolerances of ``docs/SPEC.md``,
  section 9, compared at every step. The short registry cases take 5 to 7
  steps; these check that nothing drifts over a run, that the schedule
  crosses its breakpoints at larger step counts, and that one traced
  function is reused for all 200 steps.
- The committed digits results (``results/*/``, the README's main job
  among them), each rerun with its command from ``results/commands.txt``
  into a temporary folder: its ``summary.json`` must equal the committed
  one exactly.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from digits_results import committed_commands
from parity import Case

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]

# Groups of 12 values per feature, momentum 0.99 (the default), the paper's
# schedule shape at a small scale: batch norm for 20 steps, rmax 1 -> 3 by
# step 150, dmax 0 -> 5 by step 100.
LONG = Case(
    "long_schedule",
    (16, 3, 2),
    microbatch_size=4,
    rmax=3.0,
    dmax=5.0,
    warmup_steps=20,
    rmax_steps=150,
    dmax_steps=100,
    steps=200,
)
# Tight limits, groups of 2 values: the clip is active at almost every step.
LONG_TIGHT = Case("long_tight_mb2", (8, 4), microbatch_size=2, rmax=1.1, dmax=0.1, steps=200)


# ----------------------------------------------------------------- many-step parity
@pytest.mark.parametrize(
    "case,dtype,mode",
    [
        (LONG, "float64", "eager"),
        (LONG, "float32", "function"),
        (LONG_TIGHT, "float64", "function"),
    ],
)
def test_tf_layer_matches_oracle_over_200_steps(case, dtype, mode):
    pytest.importorskip("tensorflow")
    from tf_helpers import check_against_oracle

    # Float32 on groups of 2 values is ill-conditioned (docs/SPEC.md, section 6):
    # the TF float32 run uses the case with groups of 12.
    check_against_oracle(case, seed=11, dtype=dtype, momentum=0.99, mode=mode)


@pytest.mark.parametrize("case", [LONG, LONG_TIGHT], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_jax_module_matches_oracle_over_200_steps(case, dtype):
    jax = pytest.importorskip("jax")
    from test_jax_parity import run_parity  # the float32 rule for groups of 2 values lives there

    with jax.enable_x64(dtype == "float64"):
        run_parity(case, 0.99, dtype, seed=12)


# ----------------------------------------------------------------- the committed digits results, rerun
COMMITTED = committed_commands()


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_digits_result_reproduces_exactly(name, tmp_path):
    """Each committed digits result, rerun at HEAD with its command from results/commands.txt (the README's main
    job first among them), gives the committed summary.json, every number equal: the runs use deterministic ops
    and the same seeds and batches, so the same code on the same kind of machine gives the same bits (four reruns
    of the main job agreed exactly). A change of the code that moves any number fails here until the results
    are regenerated (results/commands.txt says how) and the docs quoting them updated. 40-120 s each."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("sklearn")
    from renorm_repro.cli import main

    committed = REPO / "results" / name
    out = tmp_path / name
    assert main(["run", *COMMITTED[name], "--out", str(out), "--no-progress"]) == 0
    new_cfg = json.loads((out / "config.json").read_text())["config"]
    assert new_cfg == json.loads((committed / "config.json").read_text())["config"], "the preset changed"
    new, old = (json.loads((d / "summary.json").read_text()) for d in (out, committed))
    assert new == old, _first_difference(new, old)


def _first_difference(a, b, path="summary"):
    """Where two JSON values first differ (for the assertion message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                return _first_difference(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}[{k!r}]")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} (rerun) != {b!r} (committed)"
