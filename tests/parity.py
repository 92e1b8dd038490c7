"""The tests' names for the public registry, tolerance table and driver of :mod:`renorm.testing`.

Every parity test draws its inputs from the registry and compares through one driver, ``renorm.testing.check``,
at the tolerances of ``docs/SPEC.md`` (section 9), always against the oracle (``renorm.numpy_ref``), never against
the port itself.
"""

from __future__ import annotations

from renorm.testing import (  # noqa: F401 - re-exported for the test modules
    CASES,
    CONFIG_ERRORS,
    MASK_CASES,
    REDUCED_CASES,
    Case,
    assert_close,
    check,
    make_masks,
    make_params,
    make_steps,
    rel_err,
)
from renorm.testing import TOLERANCES as TOL  # noqa: F401

CASE_IDS = [c.name for c in CASES]
MASK_CASE_IDS = [c.name for c in MASK_CASES]
BY_NAME = {c.name: c for c in CASES}


def assert_matches_oracle(adapter, case, **kwargs):
    """``renorm.testing.check`` on one case; fails naming the first quantity and step that missed its tolerance."""
    report = check(adapter, [case], **kwargs)
    report.assert_passed()
    return report
