"""Test cases for other projects' test suites: the public face of
:mod:`bntriton.verification.strategies`, with :func:`check_case` beside them::

    from hypothesis import given
    from bntriton.testing import cases, check_case

    @given(cases())
    def test_my_kernel(case):
        result = check_case(my_batch_norm, case)
        assert not result.wrong, result.failures()  # .passed: within bntriton's tight bounds too
"""
from .verification.harness import check_case
from .verification.strategies import (
    DATA_KINDS, DTYPES, LAYOUTS, PARAM_LAYOUTS, Case, Tensors, apply_layout, cases, make_tensors, place, shapes,
)

__all__ = [
    "DATA_KINDS", "DTYPES", "LAYOUTS", "PARAM_LAYOUTS", "Case", "Tensors", "apply_layout", "cases", "check_case",
    "make_tensors", "place", "shapes",
]
