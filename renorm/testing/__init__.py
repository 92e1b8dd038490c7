"""Check any Batch Renormalization implementation against the oracle: ``python -m renorm.testing``.

The case registry, the input and parameter generators, the specification's tolerance table (``docs/SPEC.md``,
section 9) and one driver, :func:`check`, that trains an implementation step by step beside the NumPy oracle and
reports, per case and step, the relative error of every quantity and the first one that failed. An implementation
plugs in through an :class:`Adapter`; :mod:`renorm.testing.adapters` has this project's ports and
:mod:`renorm.testing.peers` other libraries' layers. Imports NumPy only; each adapter imports its framework when it
is built.

>>> from renorm.testing import CASES, OracleAdapter, check
>>> report = check(OracleAdapter(), CASES[:3], dtype="float64")
>>> report.passed
True
"""

from renorm.testing._driver import QUANTITIES, Adapter, CaseResult, Failure, Report, check, oracle
from renorm.testing._registry import (
    CASES,
    CONFIG_ERRORS,
    MASK_CASES,
    PEER_CASES,
    REDUCED_CASES,
    TOLERANCES,
    Case,
    assert_close,
    make_masks,
    make_params,
    make_steps,
    rel_err,
    round_to,
    tolerance,
)
from renorm.testing.adapters import OracleAdapter

__all__ = [
    "Adapter",
    "CASES",
    "CONFIG_ERRORS",
    "Case",
    "CaseResult",
    "Failure",
    "MASK_CASES",
    "OracleAdapter",
    "PEER_CASES",
    "QUANTITIES",
    "REDUCED_CASES",
    "Report",
    "TOLERANCES",
    "assert_close",
    "check",
    "make_masks",
    "make_params",
    "make_steps",
    "oracle",
    "rel_err",
    "round_to",
    "tolerance",
]
