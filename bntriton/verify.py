"""Check a batch-norm implementation against the float64 oracle.

``check_case(impl, case)`` runs ``impl`` (any callable with ``F.batch_norm``'s signature)
on the tensors a :class:`bntriton.testing.Case` stands for, through its forward, backward
and running-statistics updates, and measures every output against
:mod:`bntriton.reference` with the metrics and bounds of :mod:`bntriton.tolerances`.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import reference
from .testing import Case, make_tensors
from .tolerances import accumulator, bound_units, normwise_error, reduction_error

Impl = Callable[..., torch.Tensor]


@dataclass
class CaseResult:
    case: Case
    errors: dict = field(default_factory=dict)  # quantity -> error, units of its dtype's eps
    bounds: dict = field(default_factory=dict)  # quantity -> bound, same units
    problems: list = field(default_factory=list)  # failures that are not a number

    @property
    def passed(self) -> bool:
        return not self.problems and all(self.errors[q] <= self.bounds[q] for q in self.errors)

    def failures(self) -> list:
        out = list(self.problems)
        out += [f"{q}: error {self.errors[q]:.3g} eps > bound {self.bounds[q]:.3g} eps"
                for q in self.errors if not self.errors[q] <= self.bounds[q]]
        return out

    def as_dict(self) -> dict:
        return {
            "case": self.case.describe(),
            "errors": {k: (None if math.isinf(v) or math.isnan(v) else v) for k, v in self.errors.items()},
            "bounds": self.bounds,
            "problems": self.problems,
            "passed": self.passed,
        }


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().cpu().to(torch.float64).numpy()


def _leaf(t: torch.Tensor | None, grad: bool):
    return None if t is None else t.detach().clone().requires_grad_(grad)


def _expect_layout(case: Case, x: torch.Tensor, out: torch.Tensor, name: str, result: CaseResult):
    """Memory format is part of the result for the formats torch defines."""
    if case.layout == "strided" or x.dim() < 4 and case.layout == "channels_last":
        return
    if out.stride() != x.stride():
        result.problems.append(
            f"{name} strides {tuple(out.stride())} differ from the input's {tuple(x.stride())} ({case.layout})"
        )


def check_case(impl: Impl, case: Case, device: str | torch.device = "cpu") -> CaseResult:
    """Run ``impl`` on ``case`` and compare every output with the float64 oracle."""
    result = CaseResult(case)
    try:
        _check(impl, case, device, result)
    except Exception as exc:  # an implementation that raises fails the case, with the reason
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result.problems.append(f"raised {last}")
    return result


def _check(impl: Impl, case: Case, device, result: CaseResult) -> None:
    t = make_tensors(case, device)
    running_mean = None if t.running_mean is None else t.running_mean.clone()
    running_var = None if t.running_var is None else t.running_var.clone()
    ref_mean, ref_var = _np(t.running_mean), _np(t.running_var)
    grads = case.backward
    for step, x in enumerate(t.xs, start=1):
        last = step == len(t.xs)
        # momentum=None (cumulative average) goes through F.batch_norm's signature as the
        # factor torch's modules pass: 1 / step.
        momentum = case.momentum if case.momentum is not None else 1.0 / step
        x_in = x.detach().requires_grad_(grads and last)
        weight = _leaf(t.weight, grads and last)
        bias = _leaf(t.bias, grads and last)
        y = impl(x_in, running_mean, running_var, weight, bias, case.training, momentum, case.eps)
        ref = reference.forward(
            _np(x), ref_mean, ref_var, _np(t.weight), _np(t.bias), case.training, momentum, case.eps
        )
        if ref.running_mean is not None:
            ref_mean, ref_var = ref.running_mean, ref.running_var
    count = case.count

    if y.dtype != case.dtype or tuple(y.shape) != tuple(case.shape):
        result.problems.append(f"output is {y.dtype} {tuple(y.shape)}, expected {case.dtype} {case.shape}")
        return
    _expect_layout(case, x, y, "output", result)
    result.errors["y"] = normwise_error(y, ref.y, case.dtype)
    result.bounds["y"] = bound_units("y", case.dtype, count)

    if case.running and case.training:
        for name, out, expected in (("running_mean", running_mean, ref_mean), ("running_var", running_var, ref_var)):
            result.errors[name] = normwise_error(out, expected, out.dtype)
            result.bounds[name] = bound_units(name, out.dtype, count)
    elif case.running:
        if not (torch.equal(running_mean, t.running_mean) and torch.equal(running_var, t.running_var)):
            result.problems.append("running statistics changed in evaluation mode")

    if not grads:
        return
    y.backward(t.dy)
    ref_grad = reference.backward(
        _np(t.dy), _np(x), ref.mean, ref.var, _np(t.weight), case.training, case.eps
    )
    if x_in.grad is None:
        result.problems.append("no gradient reached the input")
        return
    _expect_layout(case, x, x_in.grad, "input gradient", result)
    result.errors["dx"] = normwise_error(x_in.grad, ref_grad.dx, case.dtype, ref_grad.dx_scale)
    result.bounds["dx"] = bound_units("dx", case.dtype, count)
    if weight is not None:
        result.errors["dweight"] = reduction_error(weight.grad, ref_grad.dweight, ref_grad.dweight_scale, weight.dtype)
        result.bounds["dweight"] = bound_units("dweight", weight.dtype, count)
    if bias is not None:
        result.errors["dbias"] = reduction_error(bias.grad, ref_grad.dbias, ref_grad.dbias_scale, bias.dtype)
        result.bounds["dbias"] = bound_units("dbias", bias.dtype, count)
