"""Check a batch-norm implementation against the float64 oracle.

``check_case(impl, case)`` runs ``impl`` (any callable with ``F.batch_norm``'s signature)
on the tensors a :class:`bntriton.testing.Case` stands for, through its forward, backward
and running-statistics updates, and measures every output against
:mod:`bntriton.reference` with the metrics and bounds of :mod:`bntriton.tolerances`.

``verify(impl)`` does that over the case families of :mod:`bntriton.families` and returns
a :class:`Report` (per case errors and bounds, a summary per family, JSON); the command
line ``bntriton verify`` (:mod:`bntriton.cli`) prints it.
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

from . import reference
from .families import FAMILIES, FamilyUnavailable, family_cases
from .testing import Case, make_tensors
from .tolerances import BOUNDS, bound_units, normwise_error, reduction_error

Impl = Callable[..., torch.Tensor]


@dataclass
class CaseResult:
    case: Case
    errors: dict = field(default_factory=dict)  # quantity -> error, units of its dtype's eps
    bounds: dict = field(default_factory=dict)  # quantity -> bound, same units
    problems: list = field(default_factory=list)  # failures that are not a number
    seconds: float = 0.0  # wall time of the check (implementation + oracle)

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
            "seconds": round(self.seconds, 4),
        }


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
QUANTITIES = {
    "y": "y",
    "dx": "dx",
    "dweight": "dgamma",
    "dbias": "dbeta",
    "running_mean": "run_mean",
    "running_var": "run_var",
}

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
    from .functional import batch_norm

    return batch_norm


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # verify can judge other implementations without triton
        env["triton"] = None
    try:
        from . import __version__

        env["bntriton"] = __version__
    except ImportError:
        pass
    dev = torch.device(device)
    env["device_name"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return env


def _ratio(error: float, bound: float) -> float:
    """How far along its bound an error is (1 = at the bound); inf for a non-finite error."""
    if math.isnan(error) or math.isinf(error):
        return math.inf
    return error / bound if bound > 0 else (0.0 if error == 0 else math.inf)


@dataclass
class FamilySummary:
    name: str
    cases: int = 0
    failed: int = 0
    seconds: float = 0.0
    worst_quantity: Optional[str] = None  # the quantity closest to (or furthest past) its bound
    worst_error: float = 0.0
    worst_bound: float = 0.0
    skipped: Optional[str] = None  # why the family did not run

    @property
    def passed(self) -> int:
        return self.cases - self.failed

    @property
    def worst_ratio(self) -> float:
        return 0.0 if self.worst_quantity is None else _ratio(self.worst_error, self.worst_bound)

    def as_dict(self) -> dict:
        finite = lambda v: None if math.isinf(v) or math.isnan(v) else v  # noqa: E731 (JSON has no inf)
        return {
            "cases": self.cases, "passed": self.passed, "failed": self.failed,
            "seconds": round(self.seconds, 3), "skipped": self.skipped,
            "worst": None if self.worst_quantity is None else {
                "quantity": self.worst_quantity, "error": finite(self.worst_error),
                "bound": self.worst_bound, "ratio": finite(self.worst_ratio),
            },
        }


@dataclass
class Report:
    """What :func:`verify` found: every case's errors against its bounds, per family."""

    impl: str
    impl_spec: Optional[str]  # how to name the implementation again on the command line
    device: str
    seed: int
    quick: bool
    results: list = field(default_factory=list)  # CaseResult, in run order
    skipped: dict = field(default_factory=dict)  # family -> why it did not run
    seconds: float = 0.0
    environment: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every case passed (skipped families do not count against it; they are listed)."""
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.passed]

    def failed_families(self) -> list:
        return [name for name, s in self.families().items() if s.failed]

    def families(self) -> dict:
        """family name -> :class:`FamilySummary`, in run order."""
        out: dict[str, FamilySummary] = {}
        for name, why in self.skipped.items():
            out[name] = FamilySummary(name, skipped=why)
        for r in self.results:
            s = out.setdefault(r.case.family, FamilySummary(r.case.family))
            s.cases += 1
            s.failed += not r.passed
            s.seconds += r.seconds
            for q in r.errors:
                ratio = _ratio(r.errors[q], r.bounds[q])
                if s.worst_quantity is None or ratio > s.worst_ratio:
                    s.worst_quantity, s.worst_error, s.worst_bound = q, r.errors[q], r.bounds[q]
        return out

    def rerun_command(self, result: CaseResult) -> str:
        """A shell command that reruns one case alone."""
        case_json = json.dumps(result.case.describe(), separators=(",", ":"))
        spec = self.impl_spec or "MODULE:FUNCTION"  # a callable with no importable name
        impl = "" if spec == "bntriton" else f"--impl {spec} "
        device = "" if self.device == default_device() else f"--device {self.device} "
        return f"bntriton verify {impl}{device}--case '{case_json}'"

    def as_dict(self) -> dict:
        return {
            "impl": self.impl,
            "device": self.device,
            "seed": self.seed,
            "quick": self.quick,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "environment": self.environment,
            "bounds": {q: {"rounding": b.rounding, "growth": b.growth} for q, b in BOUNDS.items()},
            "families": {name: s.as_dict() for name, s in self.families().items()},
            "cases": [dict(r.as_dict(), rerun=self.rerun_command(r)) for r in self.results],
        }

    def to_json(self, path=None, indent: int = 1) -> str:
        """The report as JSON (errors and bounds in units of the stored dtype's eps; null
        for an error that is not finite); also written to ``path`` when given."""
        text = json.dumps(self.as_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    # -------------------------------------------------------------------- text rendering

    def summary_table(self) -> str:
        rows = [("family", "cases", "pass", "fail", "closest to its bound: error / bound (eps)", "time")]
        for name, s in self.families().items():
            if s.skipped:
                rows.append((name, "-", "-", "-", f"skipped: {s.skipped}", ""))
                continue
            worst = "" if s.worst_quantity is None else (
                f"{QUANTITIES[s.worst_quantity]} {_fmt(s.worst_error)} / {_fmt(s.worst_bound)}"
                + _fmt_ratio(s.worst_ratio))
            rows.append((name, str(s.cases), str(s.passed), str(s.failed) if s.failed else "0", worst, f"{s.seconds:.1f}s"))
        return _render(rows, right={1, 2, 3, 5})

    def case_table(self, results: Optional[Iterable] = None) -> str:
        """One row per case: error/bound in eps of the stored dtype, '*' marks an error over its bound."""
        results = self.results if results is None else list(results)
        rows = [("family", "seed", "shape", "layout", "dtype", "flags") + tuple(QUANTITIES.values()) + ("result",)]
        for r in results:
            c = r.case
            cells = []
            for q in QUANTITIES:
                if q not in r.errors:
                    cells.append("-")
                else:
                    over = not r.errors[q] <= r.bounds[q]
                    cells.append(f"{_fmt(r.errors[q])}/{_fmt(r.bounds[q])}" + ("*" if over else ""))
            rows.append((c.family, str(c.seed), "x".join(map(str, c.shape)), c.layout,
                         _short_dtype(c.dtype), _flags(c), *cells, "pass" if r.passed else "FAIL"))
        return _render(rows, right=set(range(6, 6 + len(QUANTITIES))))

    def render(self, verbose: bool = False, max_failures: int = 20) -> str:
        env = self.environment
        head = (f"bntriton verify: {self.impl} on {self.device} ({env.get('device_name', '')}), "
                f"torch {env.get('torch')}, triton {env.get('triton')}; seed {self.seed}"
                f"{', quick' if self.quick else ''}")
        parts = [head, "", self.summary_table()]
        if verbose and self.results:
            parts += ["", "all cases (error/bound in units of the stored dtype's eps; * over its bound):", self.case_table()]
        failures = self.failures
        if failures:
            shown = failures[:max_failures]
            if not verbose:
                parts += ["", "failing cases (error/bound in units of the stored dtype's eps; * over its bound):",
                          self.case_table(shown)]
            parts += ["", "why, and how to rerun each alone:"]
            for r in shown:
                parts.append(f"- {r.case.family} seed {r.case.seed}: " + "; ".join(r.failures()))
                parts.append(f"    {self.rerun_command(r)}")
            if len(failures) > len(shown):
                parts.append(f"... and {len(failures) - len(shown)} more (--json PATH lists them all)")
        n, f = len(self.results), len(failures)
        verdict = "PASSED" if self.passed else "FAILED"
        tail = f"{verdict}: {n - f}/{n} cases passed"
        if f:
            tail += f"; failing families: {', '.join(self.failed_families())}"
        if self.skipped:
            tail += f"; skipped: {', '.join(self.skipped)}"
        parts += ["", tail + f" ({self.seconds:.1f}s)"]
        return "\n".join(parts)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    return f"{v:.3g}" if v < 1e4 else f"{v:.1e}"


def _fmt_ratio(ratio: float) -> str:
    if math.isinf(ratio) or math.isnan(ratio):
        return ""
    return f" ({ratio:.0%})" if ratio <= 10 else f" ({ratio:.3g}x)"


def _short_dtype(dtype) -> str:
    return {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}.get(dtype, str(dtype))


def _flags(c: Case) -> str:
    """The case's switches, compactly: mode, affine, running stats, data kind."""
    out = ["train" if c.training else "eval"]
    if c.param_dtype is None:
        out.append("noaffine")
    else:
        out.append(f"p{_short_dtype(c.param_dtype)}" + ("" if c.bias else ",nobias"))
    if c.training and c.running:
        out.append(f"m={'None' if c.momentum is None else c.momentum}x{c.steps}")
    elif c.training:
        out.append("nostats")
    if c.data != "normal":
        out.append(c.data)
    if c.offset:
        out.append(f"off={c.offset:g}")
    if c.scale != 1.0:
        out.append(f"sd={c.scale:g}")
    if c.eps != 1e-5:
        out.append(f"eps={c.eps:g}")
    if not c.backward:
        out.append("nograd")
    return ",".join(out)


def _render(rows: list, right=frozenset()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bounds_table(counts=(2, 1024, 2**20)) -> str:
    """The bound table of :mod:`bntriton.tolerances` as markdown: per quantity its two
    coefficients, and the resulting bound in units of the stored dtype's eps for a few
    values-per-channel counts (N x spatial)."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    label = " / ".join(f"2^{int(math.log2(n))}" for n in counts)
    head = ["quantity", "rounding", "growth"] + [f"{_short_dtype(d)} at n = {label}" for d in dtypes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q, b in BOUNDS.items():
        cells = [q, f"{b.rounding:g}", f"{b.growth:g}"]
        cells += [" / ".join(f"{b.units(d, n):.3g}" for n in counts) for d in dtypes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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

    ``families``: names from :data:`bntriton.families.FAMILIES` (default: all).  ``cases``:
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
