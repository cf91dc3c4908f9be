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

from .bounds import BOUNDS, LOOSE_BOUNDS
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



# The three verdicts, worst first.  "unsupported" (a clear refusal of the feature a case
# exercises) sits apart: the case's other outputs are still judged, and a wrong one wins.
WRONG, LESS_PRECISE, WITHIN, UNSUPPORTED = "wrong", "less precise", "within bounds", "unsupported"
VERDICTS = (WRONG, LESS_PRECISE, WITHIN, UNSUPPORTED)


@dataclass
class CaseResult:
    case: Case
    errors: dict = field(default_factory=dict)  # quantity -> error, units of its dtype's eps
    bounds: dict = field(default_factory=dict)  # quantity -> tight bound (bounds.BOUNDS), same units
    # quantity -> the "wrong" tier (bounds.LOOSE_BOUNDS), same units: beyond it no correct
    # implementation in the dtype lands.
    loose: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)  # semantic failures that are not a number: wrong
    imprecise: list = field(default_factory=list)  # bntriton's exactness promises missed: less precise
    seconds: float = 0.0  # wall time of the check (implementation + oracle)
    # Why the implementation refused the feature the case exercises (a clear error it
    # raised), or None.  Unsupported is not wrong: a wrong answer anywhere still fails.
    unsupported: Optional[str] = None

    def _beyond(self, limits: dict) -> list:
        return [q for q in self.errors if not self.errors[q] <= limits.get(q, math.inf)]

    def _wrong_limits(self) -> dict:
        # Never tighter than the tight bound (it is not, for any count; a guard).
        return {q: max(self.loose.get(q, math.inf), self.bounds.get(q, 0.0)) for q in self.errors}

    @property
    def wrong(self) -> bool:
        """A semantic error: a problem (a NaN out of its channel, strides, state written
        where it must not be, a crash...), or an error beyond what any correct
        implementation in the dtype reaches (the loose tier)."""
        return bool(self.problems) or bool(self._beyond(self._wrong_limits()))

    @property
    def less_precise(self) -> bool:
        """Not wrong, but beyond bntriton's tight bounds (or its exactness promises)."""
        return not self.wrong and (bool(self.imprecise) or bool(self._beyond(self.bounds)))

    @property
    def verdict(self) -> str:
        if self.wrong:
            return WRONG
        if self.unsupported:
            return UNSUPPORTED
        return LESS_PRECISE if self.less_precise else WITHIN

    @property
    def passed(self) -> bool:
        """Within the tight bounds and supported: what bntriton's own tests ask of it."""
        return self.verdict == WITHIN

    @property
    def status(self) -> str:
        return self.verdict

    def failures(self) -> list:
        """Why the case is not within bounds: wrong reasons first, each naming the
        output and the check."""
        out = list(self.problems)
        wrong = self._beyond(self._wrong_limits())
        out += [f"{QUANTITIES[q]}: error {_fmt(self.errors[q])} eps > {_fmt(self._wrong_limits()[q])} eps, beyond any "
                f"correct implementation (bntriton's bound {_fmt(self.bounds[q])} eps)" for q in wrong]
        out += list(self.imprecise)
        out += [f"{QUANTITIES[q]}: error {_fmt(self.errors[q])} eps > bound {_fmt(self.bounds[q])} eps (less precise)"
                for q in self._beyond(self.bounds) if q not in wrong]
        return out

    def wrong_reasons(self) -> list:
        """Why the case is wrong, briefly: each semantic problem, and each output beyond
        the loose tier as ``"run_var 7.8e+05 eps > 373"``."""
        limits = self._wrong_limits()
        return list(self.problems) + [f"{QUANTITIES[q]} {_fmt(self.errors[q])} eps > {_fmt(limits[q])}"
                                      for q in self._beyond(limits)]

    def as_dict(self) -> dict:
        finite = lambda v: None if math.isinf(v) or math.isnan(v) else v  # noqa: E731 (JSON has no inf)
        return {
            "case": self.case.describe(),
            "errors": {k: finite(v) for k, v in self.errors.items()},
            "bounds": self.bounds,
            "loose_bounds": {k: finite(v) for k, v in self.loose.items()},
            "problems": self.problems,
            "imprecise": self.imprecise,
            "unsupported": self.unsupported,
            "verdict": self.verdict,
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
    failed: int = 0  # wrong
    less_precise: int = 0  # within what a correct implementation reaches, beyond the tight bounds
    unsupported: int = 0  # refused with a clear error: neither within bounds nor wrong
    seconds: float = 0.0
    worst_quantity: Optional[str] = None  # the quantity closest to (or furthest past) its tight bound
    worst_error: float = 0.0
    worst_bound: float = 0.0
    skipped: Optional[str] = None  # why the family did not run

    @property
    def wrong(self) -> int:
        return self.failed

    @property
    def passed(self) -> int:
        """Cases within the tight bounds."""
        return self.cases - self.failed - self.less_precise - self.unsupported

    @property
    def worst_ratio(self) -> float:
        return 0.0 if self.worst_quantity is None else _ratio(self.worst_error, self.worst_bound)

    def as_dict(self) -> dict:
        finite = lambda v: None if math.isinf(v) or math.isnan(v) else v  # noqa: E731 (JSON has no inf)
        return {
            "cases": self.cases, "within_bounds": self.passed, "less_precise": self.less_precise,
            "wrong": self.failed, "unsupported": self.unsupported,
            "passed": self.passed, "failed": self.failed,  # the same counts under their older names
            "seconds": round(self.seconds, 3), "skipped": self.skipped,
            "worst": None if self.worst_quantity is None else {
                "quantity": self.worst_quantity, "error": finite(self.worst_error),
                "bound": self.worst_bound, "ratio": finite(self.worst_ratio),
            },
        }


def _summarize(results: Iterable, skipped: dict) -> dict:
    out: dict[str, FamilySummary] = {}
    for name, why in skipped.items():
        out[name] = FamilySummary(name, skipped=why)
    for r in results:
        s = out.setdefault(r.case.family, FamilySummary(r.case.family))
        s.cases += 1
        verdict = r.verdict
        s.failed += verdict == WRONG
        s.less_precise += verdict == LESS_PRECISE
        s.unsupported += verdict == UNSUPPORTED
        s.seconds += r.seconds
        for q in r.errors:
            ratio = _ratio(r.errors[q], r.bounds[q])
            if s.worst_quantity is None or ratio > s.worst_ratio:
                s.worst_quantity, s.worst_error, s.worst_bound = q, r.errors[q], r.bounds[q]
    return out


def _counts(results: list) -> str:
    """ "W wrong, L less precise, N/M within bounds[, U unsupported]" """
    n = len(results)
    count = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    text = f"{count[WRONG]} wrong, {count[LESS_PRECISE]} less precise, {count[WITHIN]}/{n} within bounds"
    return text + (f", {count[UNSUPPORTED]} unsupported" if count[UNSUPPORTED] else "")


@dataclass
class Report:
    """What :func:`verify` found: every case's verdict (wrong, less precise, within
    bounds, unsupported), its errors against both tiers of bounds, per family; and the
    same cases run through torch eager on the same device (``reference``), so that a
    reader sees which failures torch shares."""

    impl: str
    impl_spec: Optional[str]  # how to name the implementation again on the command line
    device: str
    seed: int
    quick: bool
    results: list = field(default_factory=list)  # CaseResult, in run order
    skipped: dict = field(default_factory=dict)  # family -> why it did not run
    seconds: float = 0.0
    environment: dict = field(default_factory=dict)
    strict: bool = False  # passed only if every case is within the tight bounds
    reference: Optional["Report"] = None  # torch eager on the same cases (None: not run)
    families_arg: Optional[list] = None  # the families asked for (for rerun commands)

    def __repr__(self) -> str:
        return f"<Report {self.impl}: {self.summary()}>"

    def __str__(self) -> str:
        return self.render()

    @property
    def passed(self) -> bool:
        """No case is wrong (with ``strict``: every case is within the tight bounds).
        Skipped families and cases the implementation refused with a clear error
        (unsupported) do not count against it; the report lists both."""
        return not self.failures

    @property
    def wrong(self) -> list:
        return [r for r in self.results if r.verdict == WRONG]

    @property
    def less_precise(self) -> list:
        return [r for r in self.results if r.verdict == LESS_PRECISE]

    @property
    def within_bounds(self) -> list:
        return [r for r in self.results if r.verdict == WITHIN]

    @property
    def failures(self) -> list:
        """The cases that fail the run: the wrong ones (with ``strict``, also the less precise)."""
        bad = (WRONG, LESS_PRECISE) if self.strict else (WRONG,)
        return [r for r in self.results if r.verdict in bad]

    @property
    def unsupported(self) -> list:
        return [r for r in self.results if r.verdict == UNSUPPORTED]

    def failed_families(self) -> list:
        names = {r.case.family for r in self.failures}
        return [name for name in self.families() if name in names]

    def families(self) -> dict:
        """family name -> :class:`FamilySummary`, in run order."""
        return _summarize(self.results, self.skipped)

    def reference_for(self, result: CaseResult) -> Optional[CaseResult]:
        """torch eager's result on the same case, if the reference ran."""
        if self.reference is None:
            return None
        index = next((k for k, r in enumerate(self.results) if r is result), None)
        if index is None or index >= len(self.reference.results):
            return None
        return self.reference.results[index]

    def summary(self) -> str:
        """One line: the run's verdict and counts, and torch's on the same cases."""
        verdict = "PASSED" if self.passed else "FAILED"
        text = f"{verdict}: {_counts(self.results)}"
        if self.skipped:
            text += f"; skipped: {', '.join(self.skipped)}"
        if self.reference is not None:
            text += f" | torch on this machine: {_counts(self.reference.results)}"
        return text + f" ({self.seconds:.1f}s{', strict' if self.strict else ''})"

    def rerun_command(self, result: CaseResult) -> str:
        """A shell command that reruns one case alone (the case's fields that differ from
        their defaults: ``--case`` fills in the rest)."""
        described = result.case.describe()
        defaults = Case(shape=result.case.shape).describe()
        short = {k: v for k, v in described.items() if k in ("shape", "seed", "family") or v != defaults[k]}
        case_json = json.dumps(short, separators=(",", ":"))
        spec = self.impl_spec or "MODULE:FUNCTION"  # a callable with no importable name
        impl = "" if spec == "bntriton" else f"--impl {spec} "
        device = "" if self.device == default_device() else f"--device {self.device} "
        return f"bntriton verify {impl}{device}--case '{case_json}'"

    def as_dict(self) -> dict:
        out = {
            "impl": self.impl,
            "device": self.device,
            "seed": self.seed,
            "quick": self.quick,
            "strict": self.strict,
            "passed": self.passed,
            "summary": self.summary(),
            "seconds": round(self.seconds, 3),
            "environment": self.environment,
            "bounds": {q: {"rounding": b.rounding, "growth": b.growth} for q, b in BOUNDS.items()},
            "loose_bounds": {q: {"rounding": b.rounding, "stats": b.stats, "sums": b.sums} for q, b in LOOSE_BOUNDS.items()},
            "families": {name: s.as_dict() for name, s in self.families().items()},
            "cases": [dict(r.as_dict(), rerun=self.rerun_command(r)) for r in self.results],
        }
        if self.reference is not None:
            out["reference"] = {
                "impl": self.reference.impl,
                "families": {name: s.as_dict() for name, s in self.reference.families().items()},
                "verdicts": [r.verdict for r in self.reference.results],
            }
        return out

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
        ref = self.reference.families() if self.reference is not None else None
        refused = any(s.unsupported for s in summaries.values())
        rows = [("family", "cases", "within", "less precise", "wrong") + (("unsup",) if refused else ())
                + (("torch here: within",) if ref is not None else ())
                + ("closest to bntriton's bound: error / bound (eps)", "time")]
        for name, s in summaries.items():
            torch_cell = ()
            if ref is not None:
                t = ref.get(name)
                torch_cell = ("-" if t is None or t.skipped else
                              f"{t.passed}/{t.cases}" + (f" ({t.failed} wrong)" if t.failed else ""),)
            if s.skipped:
                rows.append((name, "-", "-", "-", "-") + (("-",) if refused else ()) + torch_cell
                            + (f"skipped: {s.skipped}", ""))
                continue
            worst = "" if s.worst_quantity is None else (
                f"{QUANTITIES[s.worst_quantity]} {_fmt(s.worst_error)} / {_fmt(s.worst_bound)}"
                + _fmt_ratio(s.worst_ratio))
            rows.append((name, str(s.cases), str(s.passed), str(s.less_precise), str(s.failed))
                        + ((str(s.unsupported),) if refused else ()) + torch_cell + (worst, f"{s.seconds:.1f}s"))
        numeric = 5 + refused + (ref is not None)
        right = set(range(1, numeric)) | {numeric + 1}
        return _render(rows, right=right)

    def case_table(self, results: Optional[Iterable] = None) -> str:
        """One row per case: error/bound in eps of the stored dtype against bntriton's tight
        bound; '*' marks an error beyond it, '!' one beyond any correct implementation."""
        results = self.results if results is None else list(results)
        with_ref = self.reference is not None
        rows = [("family", "seed", "shape", "layout", "dtype", "flags") + tuple(QUANTITIES.values())
                + ("verdict",) + (("torch",) if with_ref else ())]
        for r in results:
            c = r.case
            wrong_limits = r._wrong_limits()
            cells = []
            for q in QUANTITIES:
                if q not in r.errors:
                    cells.append("-")
                else:
                    mark = "!" if not r.errors[q] <= wrong_limits[q] else "*" if not r.errors[q] <= r.bounds[q] else ""
                    cells.append(f"{_fmt(r.errors[q])}/{_fmt(r.bounds[q])}{mark}")
            ref = self.reference_for(r)
            rows.append((c.family, str(c.seed), "x".join(map(str, c.shape)), c.layout,
                         _short_dtype(c.dtype), _flags(c), *cells, r.verdict)
                        + ((ref.verdict if ref is not None else "-",) if with_ref else ()))
        return _render(rows, right=set(range(6, 6 + len(QUANTITIES))))

    def _shown_failures(self, limit: int) -> list:
        """Up to ``limit`` failing cases, wrong before less precise, one per family first
        (so that a bug found everywhere does not hide one found in a single family)."""
        ordered = sorted(self.failures, key=lambda r: r.verdict != WRONG)
        first, rest, seen = [], [], set()
        for r in ordered:
            key = (r.verdict, r.case.family)
            (rest if key in seen else first).append(r)
            seen.add(key)
        first.sort(key=lambda r: r.verdict != WRONG)
        return (first + rest)[:limit]

    def render(self, verbose: bool = False, max_failures: int = 10) -> str:
        env = self.environment
        head = (f"bntriton verify: {self.impl} on {self.device} ({env.get('device_name', '')}), "
                f"torch {env.get('torch')}, triton {env.get('triton')}; seed {self.seed}"
                f"{', quick' if self.quick else ''}{', strict' if self.strict else ''}")
        parts = [head]
        failures = self.failures
        shown = self._shown_failures(max_failures)
        if failures:
            wrong = self.wrong
            ref = [self.reference_for(r) for r in wrong]
            shared = "" if self.reference is None else \
                f"; torch on this machine is wrong on {sum(r is not None and r.wrong for r in ref)} of them"
            if wrong:
                outputs: dict = {}
                for r in wrong:
                    limits = r._wrong_limits()
                    names = [QUANTITIES[q] for q in r._beyond(limits)] + [p.split(":")[0] for p in r.problems]
                    for name in dict.fromkeys(names):
                        outputs[name] = outputs.get(name, 0) + 1
                which = ", ".join(f"{name} in {n}" for name, n in sorted(outputs.items(), key=lambda kv: -kv[1]))
                parts += ["", f"WRONG: {len(wrong)} case(s) beyond what any correct implementation in the dtype "
                          f"reaches, or failing a semantic check{shared}.",
                          f"Wrong outputs: {which}.  Errors in eps of the stored dtype:"]
            if self.strict and len(failures) > len(wrong):
                parts += ["", f"strict: {len(failures) - len(wrong)} case(s) less precise, beyond bntriton's tight "
                          "bounds (bntriton verify --strict fails on them):"]
            for r in shown:
                other = self.reference_for(r)
                c = r.case
                why = r.wrong_reasons() if r.verdict == WRONG else r.failures()
                parts.append(f"- {c.family} {'x'.join(map(str, c.shape))} {_short_dtype(c.dtype)} {c.layout} "
                             f"{_flags(c)}: {'; '.join(why)}"
                             + ("" if other is None else f" [torch: {other.verdict}]"))
                parts.append(f"    {self.rerun_command(r)}")
            if len(failures) > len(shown):
                parts.append(f"... and {len(failures) - len(shown)} more (-v shows every case, --json PATH "
                             "writes them all)")
        parts += ["", self.summary_table()]
        if verbose and self.results:
            parts += ["", "all cases (error/bound in eps of the stored dtype, against bntriton's bound; "
                      "* beyond it, ! beyond any correct implementation):", self.case_table()]
        imprecise = self.less_precise
        if imprecise and not self.strict:
            fams = sorted({r.case.family for r in imprecise})
            parts += ["", f"less precise: {len(imprecise)} case(s) in {', '.join(fams)}: beyond bntriton's tight "
                      "bounds, within what a correct implementation in the dtype reaches (-v lists them; "
                      "--strict fails on them)."]
        refused = self.unsupported
        if refused:
            parts += ["", "unsupported (refused with a clear error; not counted as wrong):"]
            reasons: dict = {}
            for r in refused:
                reasons.setdefault(r.unsupported, []).append(r.case.family)
            for why, fams in reasons.items():
                parts.append(f"- {len(fams)} case(s) in {', '.join(sorted(set(fams)))}: {why}")
        parts.append("")
        if failures:
            parts.append(f"failing families: {', '.join(self.failed_families())}")
        parts.append(self.summary())
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
    """Both tiers of :mod:`.bounds` as markdown, with their units and a legend: per
    quantity the coefficients, and the resulting bound in units of the stored dtype's eps
    for a few values-per-channel counts (N x spatial)."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    label = " / ".join(f"2^{int(math.log2(n))}" for n in counts)
    what = {
        "y": "output, max|err| / max|y|", "dx": "input gradient, max|err| / max(terms it cancels)",
        "dweight": "dgamma, per channel |err| / sum|dy * x_hat|", "dbias": "dbeta, per channel |err| / sum|dy|",
        "running_mean": "max|err| / max|x| of the batches", "running_var": "max|err| / max|running_var|",
        "d2x": "2nd order d/dx, normwise", "d2weight": "2nd order d/dgamma, normwise",
        "d2dy": "2nd order d/d(dy), normwise",
    }

    def table(head, rows):
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]

    lines = [
        "Error bounds: every error is measured against a float64 oracle and divided by eps of the dtype the",
        "quantity is stored in (fp16 2^-10, bf16 2^-7, fp32 2^-23, fp64 2^-52); n = values per channel (N x spatial).",
        "A case is WITHIN BOUNDS if every error is within bntriton's bound (table 1), LESS PRECISE if one is",
        "beyond it but within a correct implementation's bound (table 2), WRONG if one is beyond that too, or if",
        "a semantic check fails (a NaN out of its channel, output strides, running statistics or buffers",
        "written where they must not be).  `bntriton verify` exits 1 on a wrong case; `--strict` on any case",
        "not within bounds.",
        "",
        "Metrics (the error of each quantity, before dividing by eps):",
    ] + [f"  {q:<12} {m}" for q, m in what.items()] + [
        "",
        "1. bntriton's bound (tight): rounding (eps of the stored dtype) + growth * log2(n) (eps of the",
        "   accumulator: fp32, fp64 for fp64), + 1 for bf16.  Bound in eps of the stored dtype:",
        "",
    ]
    rows = []
    for q, b in BOUNDS.items():
        if q not in QUANTITIES:
            continue
        cells = [q, f"{b.rounding:g}", f"{b.growth:g}"]
        cells += [" / ".join(f"{b.units(d, n):.3g}" for n in counts) for d in dtypes]
        rows.append(cells)
    lines += table(["quantity", "rounding", "growth"] + [f"{_short_dtype(d)} at n = {label}" for d in dtypes],
                   rows)
    lines += [
        "",
        "2. a correct implementation's bound (beyond it: wrong): (R + T * cond) half-ulps of the coarser of the",
        "   input's and the stored dtype + S sequential sums * n * cond (eps of the accumulator); cond >= 1 is",
        "   how much the data amplify the errors (|offset| / std and the like; bntriton.verification.bounds).",
        "   Bound in eps of the stored dtype for input = stored dtype and cond = 1 (reports show each case's):",
        "",
    ]
    rows = []
    for q, b in LOOSE_BOUNDS.items():
        cells = [q, f"{b.rounding:g}", f"{b.stats:g}", f"{b.sums:g}"]
        cells += [" / ".join(f"{b.units(d, d, n, 1.0):.3g}" for n in counts) for d in dtypes]
        rows.append(cells)
    lines += table(["quantity", "R", "T", "S"] + [f"{_short_dtype(d)} at n = {label}" for d in dtypes], rows)
    return "\n".join(lines)
