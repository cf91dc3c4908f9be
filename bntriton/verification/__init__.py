"""Verification: the third part of bntriton, beside the kernels and the PyTorch front end.

Checks any batch-norm implementation (``F.batch_norm``'s signature) against a float64
oracle, with error bounds derived per dtype:

* :mod:`.oracle`: the float64 NumPy reference (forward, backward, running statistics);
* :mod:`.bounds`: the error metrics and the two tiers of bounds: bntriton's tight table
  (beyond it: less precise) and the loose tier of a straightforward correct
  implementation (beyond it: wrong);
* :mod:`.strategies`: test cases (``Case``), the tensors they stand for, hypothesis
  strategies (public as :mod:`bntriton.testing`);
* :mod:`.families`: named groups of cases, each aimed at one way to be wrong;
* :mod:`.harness`: :func:`check_case` and :func:`verify`;
* :mod:`.peers`: the built-in implementations to check (torch eager, Inductor, cuDNN,
  ATen native, FlagGems, attorch), by name;
* :mod:`.report`: :class:`Report`, what a run found, as text and JSON.

Nothing here is imported by the kernels; the command line lives in :mod:`bntriton.cli`.
"""
from .harness import check_case, resolve_impl, verify
from .report import CaseResult, Report

__all__ = ["CaseResult", "Report", "check_case", "resolve_impl", "verify"]
