"""What :func:`~bntriton.verification.harness.verify` found, as data, text and JSON.

A :class:`Report` holds every case's errors against its bounds (in units of the stored
dtype's eps) and summarizes them per family; :func:`bounds_table` renders the bound table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from .bounds import BOUNDS
from .strategies import Case

QUANTITIES = {
    "y": "y",
    "dx": "dx",
    "dweight": "dgamma",
    "dbias": "dbeta",
    "running_mean": "run_mean",
    "running_var": "run_var",
    "d2x": "d2x",
    "d2weight": "d2gamma",
    "d2dy": "d2dy",
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"



@dataclass
class CaseResult:
    case: Case
    errors: dict = field(default_factory=dict)  # quantity -> error, units of its dtype's eps
    bounds: dict = field(default_factory=dict)  # quantity -> bound, same units
    problems: list = field(default_factory=list)  # failures that are not a number
    seconds: float = 0.0  # wall time of the check (implementation + oracle)
    # Why the implementation refused the feature the case exercises (a clear error it
    # raised), or None.  Unsupported is not wrong: a wrong answer anywhere still fails.
    unsupported: Optional[str] = None

    @property
    def wrong(self) -> bool:
        """A failure: a problem, or an error over its bound."""
        return bool(self.problems) or not all(self.errors[q] <= self.bounds[q] for q in self.errors)

    @property
    def passed(self) -> bool:
        return not self.wrong and self.unsupported is None

    @property
    def status(self) -> str:
        return "FAIL" if self.wrong else "unsupported" if self.unsupported else "pass"

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
            "unsupported": self.unsupported,
            "status": self.status,
            "passed": self.passed,
            "seconds": round(self.seconds, 4),
        }


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
    unsupported: int = 0  # refused with a clear error: neither passed nor failed
    seconds: float = 0.0
    worst_quantity: Optional[str] = None  # the quantity closest to (or furthest past) its bound
    worst_error: float = 0.0
    worst_bound: float = 0.0
    skipped: Optional[str] = None  # why the family did not run

    @property
    def passed(self) -> int:
        return self.cases - self.failed - self.unsupported

    @property
    def worst_ratio(self) -> float:
        return 0.0 if self.worst_quantity is None else _ratio(self.worst_error, self.worst_bound)

    def as_dict(self) -> dict:
        finite = lambda v: None if math.isinf(v) or math.isnan(v) else v  # noqa: E731 (JSON has no inf)
        return {
            "cases": self.cases, "passed": self.passed, "failed": self.failed, "unsupported": self.unsupported,
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
        """No case is wrong.  Skipped families and cases the implementation refused with a
        clear error (unsupported) do not count against it; the report lists both."""
        return not any(r.wrong for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if r.wrong]

    @property
    def unsupported(self) -> list:
        return [r for r in self.results if r.status == "unsupported"]

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
            s.failed += r.wrong
            s.unsupported += r.status == "unsupported"
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
        summaries = self.families()
        refused = any(s.unsupported for s in summaries.values())
        rows = [("family", "cases", "pass", "fail") + (("unsup",) if refused else ())
                + ("closest to its bound: error / bound (eps)", "time")]
        for name, s in summaries.items():
            if s.skipped:
                rows.append((name, "-", "-", "-") + (("-",) if refused else ()) + (f"skipped: {s.skipped}", ""))
                continue
            worst = "" if s.worst_quantity is None else (
                f"{QUANTITIES[s.worst_quantity]} {_fmt(s.worst_error)} / {_fmt(s.worst_bound)}"
                + _fmt_ratio(s.worst_ratio))
            rows.append((name, str(s.cases), str(s.passed), str(s.failed))
                        + ((str(s.unsupported),) if refused else ()) + (worst, f"{s.seconds:.1f}s"))
        right = {1, 2, 3, 4, 6} if refused else {1, 2, 3, 5}
        return _render(rows, right=right)

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
                         _short_dtype(c.dtype), _flags(c), *cells, r.status))
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
        refused = self.unsupported
        if refused:
            parts += ["", "unsupported (refused with a clear error; not counted as wrong):"]
            reasons: dict = {}
            for r in refused:
                reasons.setdefault(r.unsupported, []).append(r.case.family)
            for why, fams in reasons.items():
                parts.append(f"- {len(fams)} case(s) in {', '.join(sorted(set(fams)))}: {why}")
        n, f, u = len(self.results), len(failures), len(refused)
        verdict = "PASSED" if self.passed else "FAILED"
        tail = f"{verdict}: {n - f - u}/{n} cases passed"
        if u:
            tail += f", {u} unsupported"
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
    if c.second_order:
        out.append("2nd")
    if c.param_layout != "contiguous":
        out.append(f"params={c.param_layout}")
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
    """The bound table of :mod:`.bounds` as markdown: per quantity its two
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
