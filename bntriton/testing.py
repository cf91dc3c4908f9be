"""Test cases for other projects' test suites: the public face of
:mod:`bntriton.verification.strategies`, with :func:`check_case` beside them::

    from hypothesis import given
    from bntriton.testing import cases, check_case

    @given(cases())
    def test_my_kernel(case):
        assert check_case(my_batch_norm, case).passed
"""
from .verification.harness import check_case
from .verification.strategies import (
    DATA_KINDS, DTYPES, LAYOUTS, PARAM_LAYOUTS, Case, Tensors, apply_layout, cases, make_tensors, place, shapes,
)

__all__ = [
    "DATA_KINDS", "DTYPES", "LAYOUTS", "PARAM_LAYOUTS", "Case", "Tensors", "apply_layout", "cases", "check_case",
    "make_tensors", "place", "shapes",
]
