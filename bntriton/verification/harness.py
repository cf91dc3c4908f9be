"""Check a batch-norm implementation against the float64 oracle.

``check_case(impl, case)`` runs ``impl`` (any callable with ``F.batch_norm``'s signature)
on the tensors a :class:`~.strategies.Case` stands for, through its forward, backward
and running-statistics updates, and measures every output against the float64 oracle
(:mod:`.oracle`) with the metrics and bounds of :mod:`.bounds`.

``verify(impl)`` does that over the case families of :mod:`.families` and returns a
:class:`~.report.Report` (per case errors and bounds, a summary per family, JSON); the
command line ``bntriton verify`` (:mod:`bntriton.cli`) prints it.
"""
from __future__ import annotations

import importlib
import json
import math
import platform
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from . import oracle as reference
from .bounds import bound_units, normwise_error, reduction_error
from .families import FAMILIES, FamilyUnavailable, family_cases
from .report import CaseResult, Report, default_device
from .strategies import Case, make_tensors

Impl = Callable[..., torch.Tensor]


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().cpu().to(torch.float64).numpy()


def _leaf(t: torch.Tensor | None, grad: bool):
    return None if t is None else t.detach().clone().requires_grad_(grad)


def _expect_layout(case: Case, x: torch.Tensor, out: torch.Tensor, name: str, result: CaseResult):
    """Memory format is part of the result for the formats torch defines."""
    if case.layout not in ("contiguous", "channels_last") or x.dim() < 4 and case.layout == "channels_last":
        return
    # The stride of a size-1 dim is arbitrary (an (N, C, 1, 1) tensor is contiguous and
    # channels_last at once), so only the dims with more than one element are compared.
    if any(n > 1 and a != b for n, a, b in zip(x.shape, out.stride(), x.stride())):
        result.problems.append(
            f"{name} strides {tuple(out.stride())} differ from the input's {tuple(x.stride())} ({case.layout})"
        )


def _nonfinite_leak(name: str, out, ref, result: CaseResult) -> None:
    """Name the channels where ``out`` is finite and ``ref`` is not, or the other way round:
    the error alone (inf) would not say that a NaN left its channel."""
    out = _np(out) if isinstance(out, torch.Tensor) else np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        return
    differs = np.isfinite(out) != np.isfinite(ref)
    if differs.any():
        channels = np.flatnonzero(differs.any(axis=(0,) + tuple(range(2, differs.ndim))))
        shown = ", ".join(str(c) for c in channels[:8]) + (", ..." if len(channels) > 8 else "")
        result.problems.append(f"{name}: finite where the reference is not, or not where it is, in channels [{shown}]")


def _expect_exact_beta(case: Case, y: torch.Tensor, bias, result: CaseResult) -> None:
    """A constant channel has x_hat = 0 exactly, so its output must be beta exactly (0
    without a bias), rounded to the output dtype: no rounding noise times 1/sqrt(eps)."""
    if case.data != "constant_channel" or not case.training or y.numel() == 0:
        return
    got = y.detach().select(1, 0).cpu()
    beta = 0.0 if bias is None else float(bias.detach()[0].cpu().to(torch.float64))
    expected = torch.tensor(beta, dtype=torch.float64).to(y.dtype)
    if not torch.equal(got, expected.expand_as(got)):
        worst = (got.to(torch.float64) - expected.to(torch.float64)).abs().max().item()
        result.problems.append(f"constant channel: output is not exactly beta = {expected.item():.9g} (off by up to {worst:.3g})")


def check_case(impl: Impl, case: Case, device: str | torch.device = "cpu") -> CaseResult:
    """Run ``impl`` on ``case`` and compare every output with the float64 oracle."""
    result = CaseResult(case)
    start = time.perf_counter()
    try:
        # NaN / inf cases are deliberate: their RuntimeWarnings (NumPy in the oracle, the
        # Triton interpreter) are expected, and the outcome is judged, not warned about.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            _check(impl, case, device, result)
    except Exception as exc:  # an implementation that raises fails the case, with the reason
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result.problems.append(f"raised {last}")
    result.seconds = time.perf_counter() - start
    return result


def _check(impl: Impl, case: Case, device, result: CaseResult) -> None:
    t = make_tensors(case, device)
    running_mean = None if t.running_mean is None else t.running_mean.clone()
    running_var = None if t.running_var is None else t.running_var.clone()
    ref_mean, ref_var = _np(t.running_mean), _np(t.running_var)
    mean_magnitude = None  # the running mean's error scale, chained over the steps
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
            _np(x), ref_mean, ref_var, _np(t.weight), _np(t.bias), case.training, momentum, case.eps,
            running_mean_magnitude=mean_magnitude,
        )
        if ref.running_mean is not None:
            ref_mean, ref_var = ref.running_mean, ref.running_var
            mean_magnitude = ref.running_mean_magnitude
    count = case.count

    if y.dtype != case.dtype or tuple(y.shape) != tuple(case.shape):
        result.problems.append(f"output is {y.dtype} {tuple(y.shape)}, expected {case.dtype} {case.shape}")
        return
    _expect_layout(case, x, y, "output", result)
    result.errors["y"] = normwise_error(y, ref.y, case.dtype)
    _nonfinite_leak("output", y, ref.y, result)
    _expect_exact_beta(case, y, t.bias, result)
    result.bounds["y"] = bound_units("y", case.dtype, count)

    if case.running and case.training:
        # The running mean is a batch mean, computed from values as large as max|x|: its
        # error is relative to that scale (the oracle's magnitude), not to a mean near 0.
        for name, out, expected, magnitude in (("running_mean", running_mean, ref_mean, mean_magnitude),
                                               ("running_var", running_var, ref_var, None)):
            result.errors[name] = normwise_error(out, expected, out.dtype, magnitude)
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
    _nonfinite_leak("input gradient", x_in.grad, ref_grad.dx, result)
    result.bounds["dx"] = bound_units("dx", case.dtype, count)
    for name, leaf in (("weight", weight), ("bias", bias)):
        if leaf is not None and leaf.grad is None:
            result.problems.append(f"no gradient reached the {name}")
            return
    if weight is not None:
        result.errors["dweight"] = reduction_error(weight.grad, ref_grad.dweight, ref_grad.dweight_scale, weight.dtype)
        result.bounds["dweight"] = bound_units("dweight", weight.dtype, count)
    if bias is not None:
        result.errors["dbias"] = reduction_error(bias.grad, ref_grad.dbias, ref_grad.dbias_scale, bias.dtype)
        result.bounds["dbias"] = bound_units("dbias", bias.dtype, count)


# ------------------------------------------------------------------ the harness as a product

# Column names for the quantities (check_case's keys are F.batch_norm's argument names).

IMPL_ALIASES = {
    "bntriton": ("bntriton", "batch_norm"),
    "torch": ("torch.nn.functional", "batch_norm"),
}


def resolve_impl(spec) -> tuple[Impl, str]:
    """``None`` / ``"bntriton"``, ``"torch"``, ``"module:function"`` (dotted attributes
    allowed after the colon) or a callable -> (callable, name for the report)."""
    if spec is None:
        spec = "bntriton"
    if callable(spec):
        name = f"{getattr(spec, '__module__', None) or '?'}.{getattr(spec, '__qualname__', repr(spec))}"
        return spec, name
    if spec in IMPL_ALIASES:
        module_name, attr = IMPL_ALIASES[spec]
    else:
        module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise ValueError(f"--impl {spec!r}: expected 'bntriton', 'torch' or MODULE:FUNCTION")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable")
    return obj, f"{module_name}.{attr}"


def _importable_name(fn) -> Optional[str]:
    """``module:qualname`` for a callable that can be imported back under that name (so a
    report can say how to rerun a case from the command line), else None."""
    if fn is _default_impl():
        return "bntriton"
    if fn is torch.nn.functional.batch_norm:
        return "torch"
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        return None
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if obj is fn else None


def _default_impl():
    from ..functional import batch_norm

    return batch_norm


def _environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # verify can judge other implementations without triton
        env["triton"] = None
    try:
        from .. import __version__

        env["bntriton"] = __version__
    except ImportError:
        pass
    dev = torch.device(device)
    if dev.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(dev)
    else:
        from ..kernels.runtime import current_cpu_backend

        # Which of the two CPU implementations ran: torch's CPU operations or the kernels
        # in Triton's interpreter.
        env["cpu_backend"] = current_cpu_backend()
        env["device_name"] = f"{platform.processor() or 'cpu'}, {env['cpu_backend']} backend"
    return env


def verify(
    impl=None,
    device=None,
    quick: bool = False,
    seed: int = 0,
    families=None,
    progress: Optional[Callable] = None,
    cases: Optional[Iterable[Case]] = None,
) -> Report:
    """Check ``impl`` (``F.batch_norm``'s signature; default ``bntriton.batch_norm``; or a
    name as in :func:`resolve_impl`) against the float64 oracle over case families.

    ``families``: names from :data:`.families.FAMILIES` (default: all).  ``cases``:
    run exactly these instead (to rerun one case).  ``progress(done, total, result)`` is
    called once before the first case (``result`` None) and after each case.
    """
    fn, name = resolve_impl(impl)
    spec = impl if isinstance(impl, str) else _importable_name(fn)
    device = str(device or default_device())
    report = Report(name, spec, device, seed, quick, environment=_environment(device))
    if cases is not None:
        todo = list(cases)
    else:
        names = list(FAMILIES) if families is None else [families] if isinstance(families, str) else list(families)
        todo = []
        for fam in names:
            try:
                todo += family_cases(fam, seed, quick)
            except FamilyUnavailable as why:
                report.skipped[fam] = str(why)
    start = time.perf_counter()
    if progress:
        progress(0, len(todo), None)
    for k, case in enumerate(todo, start=1):
        result = check_case(fn, case, device)
        report.results.append(result)
        if progress:
            progress(k, len(todo), result)
    report.seconds = time.perf_counter() - start
    return report
