"""Check a batch-norm implementation against the float64 oracle.

``check_case(impl, case)`` runs ``impl`` (any callable with ``F.batch_norm``'s signature)
on the tensors a :class:`~.strategies.Case` stands for, through its forward, backward
and running-statistics updates, and measures every output against the float64 oracle
(:mod:`.oracle`) with the metrics and bounds of :mod:`.bounds`.

``verify(impl)`` does that over the case families of :mod:`.families` and returns a
:class:`~.report.Report` (per case errors, both tiers of bounds and a verdict: wrong,
less precise or within bounds; a summary per family; torch eager on the same cases;
JSON); the command line ``bntriton verify`` (:mod:`bntriton.cli`) prints it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from . import oracle as reference
from .bounds import (
    bound_units, loose_conditions, loose_units, normwise_error, reduction_error, second_order_dtype,
)
from .families import FAMILIES, FamilyUnavailable, family_cases
from .peers import PEERS, InductorBatchNorm, load_peer
from .report import CaseResult, Report, default_device
from .strategies import Case, Placed, make_tensors, param_layout, place, second_order_directions

Impl = Callable[..., torch.Tensor]


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().cpu().to(torch.float64).numpy()


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
        # Exactness is bntriton's promise (shifted statistics), not every correct
        # implementation's: the output's error is still judged against the loose bound.
        result.imprecise.append(f"constant channel: output is not exactly beta = {expected.item():.9g} (off by up to {worst:.3g})")


class Unsupported(Exception):
    """The implementation refused a feature with a clear error (raised, not a silent
    answer): the case is reported as unsupported, apart from the wrong ones."""


# The exceptions that count as a clear refusal when a case exercises a feature an
# implementation may not have (second-order gradients, per-channel tensors that are
# views): what libraries raise to say "not supported".  Anything else is a crash, and
# any answer, however quiet, is judged against the oracle.
CLEAR_ERRORS = (NotImplementedError, RuntimeError, ValueError, TypeError)
# RuntimeErrors that are crashes, not refusals: a kernel that faulted did not decline.
CRASH_SIGNS = ("illegal memory access", "CUDA error", "device-side assert", "out of bounds")


@contextmanager
def _feature(what: str, applies: bool = True):
    """Turn a clear error raised inside the block into :class:`Unsupported` (``what``
    names the feature in the report); outside a feature's cases errors stay failures."""
    try:
        yield
    except CLEAR_ERRORS as exc:
        if not applies or any(sign in str(exc) for sign in CRASH_SIGNS):
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise Unsupported(f"{what}: {type(exc).__name__}: {first_line}") from exc


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
    except Unsupported as why:
        result.unsupported = str(why)
    except Exception as exc:  # an implementation that raises fails the case, with the reason
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result.problems.append(f"raised {last}")
    result.seconds = time.perf_counter() - start
    return result


def _placed(case: Case, role: str, values, grad: bool = False) -> Optional[Placed]:
    return None if values is None else place(values, param_layout(case, role), grad)


def _check_untouched(name: str, p: Optional[Placed], values, result: CaseResult) -> None:
    """A per-channel tensor the implementation must only read: same values, and its
    buffer untouched outside the view."""
    if p is None:
        return
    if not torch.equal(p.view.detach(), values):
        result.problems.append(f"{name} was modified")
    _check_buffer(name, p, result)


def _check_buffer(name: str, p: Optional[Placed], result: CaseResult) -> None:
    if p is None:
        return
    touched = p.outside_touched()
    if touched:
        shown = ", ".join(map(str, touched[:8])) + (", ..." if len(touched) > 8 else "")
        result.problems.append(f"{name}: written outside its view, at buffer elements [{shown}]")


def _check(impl: Impl, case: Case, device, result: CaseResult) -> None:
    t = make_tensors(case, device)
    views = case.param_layout != "contiguous"
    running_mean = _placed(case, "running_mean", t.running_mean)
    running_var = _placed(case, "running_var", t.running_var)
    ref_mean, ref_var = _np(t.running_mean), _np(t.running_var)
    mean_magnitude = None  # the running mean's error scale, chained over the steps
    grads = case.backward
    for step, x in enumerate(t.xs, start=1):
        last = step == len(t.xs)
        # momentum=None (cumulative average) goes through F.batch_norm's signature as the
        # factor torch's modules pass: 1 / step.
        momentum = case.momentum if case.momentum is not None else 1.0 / step
        x_in = x.detach().requires_grad_(grads and last)
        weight = _placed(case, "weight", t.weight, grads and last)
        bias = _placed(case, "bias", t.bias, grads and last)
        with _feature(f"per-channel tensors as {case.param_layout} views", views):
            y = impl(x_in, _view(running_mean), _view(running_var), _view(weight), _view(bias),
                     case.training, momentum, case.eps)
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
    # How much the data amplify a straightforward implementation's rounding: the loose
    # ("wrong") tier of every quantity (bounds.LOOSE_BOUNDS).
    cond = loose_conditions(_np(x), ref.mean, ref.var, case.eps, _np(t.weight), ref.y)
    # Evaluation mode sums nothing for y and dx: only their roundings (times the data's
    # condition, for a folded x * scale + shift) reach them.
    elementwise = 1 if not case.training else count
    result.errors["y"] = normwise_error(y, ref.y, case.dtype)
    _nonfinite_leak("output", y, ref.y, result)
    _expect_exact_beta(case, y, t.bias, result)
    result.bounds["y"] = bound_units("y", case.dtype, count)
    result.loose["y"] = loose_units("y", case.dtype, case.dtype, elementwise, cond["y"])

    if case.running and case.training:
        # The running mean is a batch mean, computed from values as large as max|x|: its
        # error is relative to that scale (the oracle's magnitude), not to a mean near 0.
        for name, out, expected, magnitude in (("running_mean", running_mean, ref_mean, mean_magnitude),
                                               ("running_var", running_var, ref_var, None)):
            result.errors[name] = normwise_error(out.view, expected, out.view.dtype, magnitude)
            result.bounds[name] = bound_units(name, out.view.dtype, count)
            # Every step's update rounds anew, and the earlier steps' errors carry over
            # (times 1 - momentum <= 1): the loose tier adds up over the steps.
            result.loose[name] = case.steps * loose_units(name, case.dtype, out.view.dtype, count, cond[name])
            _check_buffer(name, out, result)
    elif case.running:
        if not (torch.equal(running_mean.view, t.running_mean) and torch.equal(running_var.view, t.running_var)):
            result.problems.append("running statistics changed in evaluation mode")
        _check_buffer("running_mean", running_mean, result)
        _check_buffer("running_var", running_var, result)

    if not grads:
        _check_untouched("weight", weight, t.weight, result)
        _check_untouched("bias", bias, t.bias, result)
        return
    with _feature(f"per-channel tensors as {case.param_layout} views", views):
        y.backward(t.dy)
    _check_untouched("weight", weight, t.weight, result)
    _check_untouched("bias", bias, t.bias, result)
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
    result.loose["dx"] = loose_units("dx", case.dtype, case.dtype, elementwise, cond["dx"])
    cond["dweight"] = loose_conditions(_np(x), ref.mean, ref.var, case.eps, dbias_scale=ref_grad.dbias_scale,
                                       dweight_scale=ref_grad.dweight_scale)["dweight"]
    for name, leaf in (("weight", weight), ("bias", bias)):
        if leaf is not None and leaf.view.grad is None:
            result.problems.append(f"no gradient reached the {name}")
            return
    if weight is not None:
        result.errors["dweight"] = reduction_error(weight.view.grad, ref_grad.dweight, ref_grad.dweight_scale, weight.view.dtype)
        result.bounds["dweight"] = bound_units("dweight", weight.view.dtype, count)
        result.loose["dweight"] = loose_units("dweight", case.dtype, weight.view.dtype, count, cond["dweight"])
    if bias is not None:
        result.errors["dbias"] = reduction_error(bias.view.grad, ref_grad.dbias, ref_grad.dbias_scale, bias.view.dtype)
        result.bounds["dbias"] = bound_units("dbias", bias.view.dtype, count)
        result.loose["dbias"] = loose_units("dbias", case.dtype, bias.view.dtype, count, cond["dbias"])
    if case.second_order:
        _check_second_order(impl, case, t, x, momentum, result, cond)


def _view(p: Optional[Placed]):
    return None if p is None else p.view


def _check_second_order(impl: Impl, case: Case, t, x: torch.Tensor, momentum: float, result: CaseResult,
                        cond: dict) -> None:
    """Gradients of ``L = <v, dx> + <u, dweight>`` with respect to x, weight and bias,
    through the implementation's own backward (``create_graph=True``), against the
    float64 oracle.  A backward that is not differentiable and says nothing gives zero
    (or partial) second-order gradients: judged like any other wrong answer."""
    v, u = second_order_directions(case, x.device)
    x_in = x.detach().requires_grad_(True)
    weight = _placed(case, "weight", t.weight, True)
    bias = _placed(case, "bias", t.bias, True)
    # Fresh running statistics: the forward's update was checked above.
    running_mean = _placed(case, "running_mean", t.running_mean)
    running_var = _placed(case, "running_var", t.running_var)
    leaves = [x_in] + [p.view for p in (weight, bias) if p is not None]
    y = impl(x_in, _view(running_mean), _view(running_var), _view(weight), _view(bias),
             case.training, momentum, case.eps)
    # dy requires grad, as it does inside a network (it comes from the layers above):
    # that is when a backward marked once-differentiable raises its clear error.
    dy = t.dy.detach().requires_grad_(True)
    with _feature("second-order gradients"):  # create_graph=True is where some refuse already
        first = torch.autograd.grad(y, leaves, dy, create_graph=True, allow_unused=True)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    if first[0] is not None:
        loss = loss + (first[0].to(torch.float64) * v.to(torch.float64)).sum()
    if weight is not None and first[1] is not None:
        loss = loss + (first[1].to(torch.float64) * u.to(torch.float64)).sum()
    if loss.requires_grad:
        with _feature("second-order gradients"):
            # backward(), not autograd.grad(inputs=...): it walks the whole graph, so a
            # node that refuses to be differentiated (once_differentiable) gets to raise.
            loss.backward()
    second = [leaf.grad for leaf in leaves]
    ddy = dy.grad
    if all(g is None for g in second):  # dx and dweight hang off x and weight by no graph
        result.problems.append("the backward is not differentiable (its gradients do not depend on x or "
                               "weight), yet it raised nothing: second-order gradients silently zero")
    second = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(second, leaves)]
    ref = reference.second_order(
        _np(t.dy), _np(x), _np(v), _np(u), _np(t.weight), _np(t.running_mean), _np(t.running_var),
        case.training, case.eps,
    )
    count = case.count
    result.errors["d2x"] = normwise_error(second[0], ref.dx, case.dtype)
    result.bounds["d2x"] = bound_units("d2x", case.dtype, count)
    result.loose["d2x"] = loose_units("d2x", case.dtype, case.dtype, count, cond["d2x"])
    # d/d(dy): the backward is linear in dy, so this is the forward's derivative in the
    # direction v (plus u's term): the graph a once-differentiable backward cuts.
    ddy = torch.zeros_like(dy) if ddy is None else ddy
    result.errors["d2dy"] = normwise_error(ddy, ref.ddy, case.dtype)
    result.bounds["d2dy"] = bound_units("d2dy", case.dtype, count)
    result.loose["d2dy"] = loose_units("d2dy", case.dtype, case.dtype, count, cond["d2dy"])
    if weight is not None:
        unit = second_order_dtype(case.dtype, weight.view.dtype)
        result.errors["d2weight"] = normwise_error(second[1], ref.dweight, unit)
        result.bounds["d2weight"] = bound_units("d2weight", unit, count)
        result.loose["d2weight"] = loose_units("d2weight", case.dtype, unit, count, cond["d2weight"])
    if bias is not None and bool(second[-1].detach().ne(0).any()):
        result.problems.append("second-order gradient of the bias is not zero (bias enters neither dx nor dweight)")


# ------------------------------------------------------------------ the harness as a product

# Column names for the quantities (check_case's keys are F.batch_norm's argument names).

def resolve_impl(spec, device=None) -> tuple[Impl, str]:
    """The implementation to check, and its name for the report, from:

    * ``None`` / a built-in peer's name (:data:`.peers.PEERS`: ``bntriton``, ``torch``,
      ``inductor``, ``cudnn``, ``native``, ``flag_gems``, ``attorch``), loaded for ``device``;
    * ``"module:function"`` (dotted attributes allowed after the colon), the module found
      on ``sys.path`` or else in the current directory;
    * ``"path/to/file.py:function"``;
    * a callable.
    """
    if spec is None:
        spec = "bntriton"
    if callable(spec):
        name = f"{getattr(spec, '__module__', None) or '?'}.{getattr(spec, '__qualname__', repr(spec))}"
        return spec, name
    spec = str(spec)
    if spec in PEERS:
        return load_peer(spec, device or default_device())
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"--impl {spec!r}: expected one of {', '.join(PEERS)}, MODULE:FUNCTION "
                         "or path/to/file.py:FUNCTION")
    obj = _load_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable")
    return obj, f"{module_name}.{attr}"


def _load_module(name: str):
    """A module by dotted name, or by file path (``x/y.py``).  A console script does not
    put the current directory on ``sys.path`` (``python -m`` does), so a module there is
    looked for explicitly: ``bntriton verify --impl mymod:fn`` works either way."""
    if name.endswith(".py") or os.sep in name or (os.altsep and os.altsep in name):
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise ImportError(f"no such file: {name}")
        module_name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(module_name, module)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            sys.path.remove(cwd)
            raise exc from None


def _importable_name(fn) -> Optional[str]:
    """``module:qualname`` for a callable that can be imported back under that name (so a
    report can say how to rerun a case from the command line), else None."""
    if fn is _default_impl():
        return "bntriton"
    if fn is torch.nn.functional.batch_norm:
        return "torch"
    if isinstance(fn, InductorBatchNorm):
        return "inductor"
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
        from ..version import __version__

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
    strict: bool = False,
    reference: bool = True,
) -> Report:
    """Check ``impl`` (``F.batch_norm``'s signature; default ``bntriton.batch_norm``; or a
    name as in :func:`resolve_impl`) against the float64 oracle over case families.

    Every case gets a verdict: *wrong* (a semantic error, or an error beyond what any
    correct implementation in the dtype reaches: :data:`.bounds.LOOSE_BOUNDS`), *less
    precise* (beyond bntriton's tight bounds, :data:`.bounds.BOUNDS`, only), *within
    bounds*, or *unsupported* (a clear refusal).  ``report.passed`` is true when no case
    is wrong; with ``strict``, when every case is within the tight bounds.
    ``print(report)`` shows what ``bntriton verify`` prints; ``report.summary()`` its
    last line ("... N/M within bounds ...").

    ``families``: names from :data:`.families.FAMILIES` (default: all).  ``cases``:
    run exactly these instead (to rerun one case).  ``reference``: also run torch eager
    (``F.batch_norm``) on the same cases and device, for the report's torch column.
    ``progress(done, total, result)`` is called once before the first case (``result``
    None) and after each case of ``impl``.
    """
    device = str(device or default_device())
    fn, name = resolve_impl(impl, device)
    spec = impl if isinstance(impl, str) else _importable_name(fn)
    report = Report(name, spec, device, seed, quick, environment=_environment(device), strict=strict)
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
    if reference:
        report.reference = _torch_reference(fn, report, todo, device)
    return report


def _torch_reference(fn, report: Report, todo: list, device: str) -> Report:
    """torch eager on the same cases: what a reader compares a failure with.  Costs about
    as much as the cases' oracle (torch's CPU batch norm is fast); when ``fn`` is torch
    itself its own results serve."""
    torch_fn, label = load_peer("torch", device)
    ref = Report(label, "torch", device, report.seed, report.quick, skipped=dict(report.skipped))
    if fn is torch_fn:
        ref.results, ref.seconds = list(report.results), report.seconds
        return ref
    start = time.perf_counter()
    ref.results = [check_case(torch_fn, case, device) for case in todo]
    ref.seconds = time.perf_counter() - start
    return ref
