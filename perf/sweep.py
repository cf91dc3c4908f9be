"""Time batch norm: providers x suites x passes, against the device's copy bandwidth.

    python perf/sweep.py                      # every suite, pass and provider on the GPU
    python perf/sweep.py --quick              # a few shapes per suite (a couple of minutes)
    python perf/sweep.py --suites resnet50 --passes fwd_train,bwd_train --providers bntriton,torch
    python perf/sweep.py --device cpu --smoke --out /tmp/x   # tooling test (interpreter): not performance

Writes ``<out>/<device>-<date>.csv`` (columns in schema.COLUMNS, one row per
measurement, rows written as they are taken so a killed run keeps what it measured),
``<same stem>.notes`` (run notes, also written as they arise), ``<same stem>.md``
(summarize.py) and ``<same stem>.png`` (plot.py, when matplotlib imports).  A progress
bar goes to stderr; the overview table is printed last.

Per case: every provider, torch eager included, runs each pass once and is compared
with torch's batch norm in float64 on the same inputs (check.py); a provider that disagrees gets a ``fail`` row for that pass instead of a
time.  Then each pass is timed per provider, bntriton first and again last, so that the
spread of its two times measures the run's noise.  Exit status 1 when any bntriton row
failed or raised.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
# The sibling modules, and the bntriton of this checkout (the code being measured) ahead
# of any installed copy.
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import triton  # noqa: E402

import check  # noqa: E402
import measure  # noqa: E402
import plot  # noqa: E402
import suites  # noqa: E402
import summarize  # noqa: E402
from providers import OPTIONAL_PROVIDERS, Provider, Torch, make_provider  # noqa: E402
from schema import COLUMNS, COPY, ERROR, FAILED, PASSES, PROVIDERS, REFERENCE, SUITES  # noqa: E402


class Progress:
    """A one-line progress bar on stderr: redrawn in place on a terminal; on a pipe (the
    GPU machine's captured output) a plain line at most every ``every_s`` seconds."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 28, every_s: float = 20.0):
        self.total, self.done, self.stream, self.width, self.every_s = max(total, 1), 0, stream, width, every_s
        self.start = self.last = time.monotonic()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(seconds)
        return f"{seconds // 60}m{seconds % 60:02d}s"

    def step(self, label: str) -> None:
        self.done += 1
        now = time.monotonic()
        if not self.tty and now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done)
        filled = self.width * self.done // self.total
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{self._clock(elapsed)} eta {self._clock(eta)}  {label}")
        self.stream.write(f"\r{line[:150]}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _list(text: str, known: Sequence[str], what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise SystemExit(f"sweep: unknown {what} {unknown}; known: {', '.join(known)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes per suite")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, for testing this tooling (required with --device cpu)")
    parser.add_argument("--suites", default=",".join(SUITES), help="comma list of " + ", ".join(SUITES))
    parser.add_argument("--passes", default=",".join(PASSES), help="comma list of " + ", ".join(PASSES))
    parser.add_argument("--providers", default=None,
                        help="comma list of " + ", ".join(PROVIDERS) + " (default: all; flag_gems when it "
                        "imports; torch_compile not on CPU)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default perf/results)")
    parser.add_argument("--stem", help="output file name without extension (default <device>-<date>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up (ms of runs)")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench repetitions (ms of runs)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new case after this long; what was measured is kept and summarized")
    parser.add_argument("--skip-measured", type=Path, nargs="+", default=None, metavar="CSV",
                        help="leave out the cases these earlier CSVs measured (the rest of a run stopped "
                             "by --max-minutes; merge the parts with summarize.py --merge-into)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for torch_compile (tooling tests use aot_eager)")
    args = parser.parse_args(argv)
    args.suites = _list(args.suites, SUITES, "suite")
    args.passes = _list(args.passes, PASSES, "pass")
    args.providers = _list(args.providers or ",".join(PROVIDERS), PROVIDERS, "provider")
    if torch.device(args.device).type == "cpu" and not args.smoke:
        parser.error("--device cpu runs Triton's interpreter: only --smoke (a tooling test) is allowed there")
    return args


def resolve_providers(args, device: torch.device, notes: List[str]) -> List[Provider]:
    chosen = []
    for name in args.providers:
        try:
            provider = make_provider(name, args.compile_backend)
        except Exception as e:  # noqa: BLE001
            if name not in OPTIONAL_PROVIDERS:
                raise
            # Skipped, and the summary says so.  Not only ImportError: FlagGems raises
            # RuntimeError on import when it finds no GPU.
            notes.append(f"provider {name} skipped: not importable ({_brief(e)})")
            continue
        reason = provider.unavailable(device)
        if reason:
            notes.append(f"provider {name} {reason}")
            continue
        chosen.append(provider)
    if not any(p.name == REFERENCE for p in chosen):
        notes.append(f"{REFERENCE} not among the providers: no speedups and no noise estimate")
    return chosen


def resnet_batch(device: torch.device, notes: List[str]) -> int:
    """256, or 128 when the GPU cannot hold ~12 copies of the largest fp32 layer input (x,
    dy, outputs and gradients of two providers, check temporaries, do_bench's flush)."""
    batch = suites.RESNET50_BATCH
    if device.type == "cuda":
        largest = batch * 64 * 112 * 112 * 4
        free, _ = torch.cuda.mem_get_info(device)
        if free < 12 * largest:
            batch //= 2
            notes.append(f"resnet50 at batch {batch}: {free / 2**30:.1f} GiB free is under 12 x the largest input")
    return batch


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def output_stem(out: Path, name: str, stem: Optional[str]) -> str:
    """``<device>-<date>``, made of letters, digits, '.', '_' and '-' only (file names the GPU
    machine can send back), with -2, -3 ... when that name is taken."""
    if stem:
        return stem
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") + "-" + datetime.date.today().isoformat()
    candidate, n = base, 1
    while (out / f"{candidate}.csv").exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


class Notes(list):
    """The run notes (skipped providers, failures with their errors, ...): kept for the
    summary and appended to ``<stem>.notes`` as they arise, so that a killed run keeps
    them and summarize.py can rebuild the whole markdown from the files."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        path.write_text("")

    def append(self, line: str) -> None:
        line = line.replace("\n", " ")
        super().append(line)
        with open(self.path, "a") as f:
            f.write(line + "\n")


class Writer:
    """The CSV: header once, each row flushed as soon as it is measured."""

    def __init__(self, path: Path, device: str):
        self.file = open(path, "w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(COLUMNS)
        self.fixed = [device, torch.__version__, triton.__version__]
        self.rows: List[Dict[str, str]] = []

    def row(self, suite, shape, layout, dtype, pass_, provider, ms, nbytes, copy_gbps) -> None:
        if isinstance(ms, float):
            rate = measure.gbps(nbytes, ms)
            values = [f"{ms:.6g}", str(nbytes), f"{rate:.5g}", f"{rate / copy_gbps:.4g}"]
        else:  # FAILED or ERROR: no time, no rate
            values = [ms, str(nbytes), "", ""]
        cells = self.fixed + [suite, shape, layout, dtype, pass_, provider] + values
        self.csv.writerow(cells)
        self.file.flush()
        self.rows.append(dict(zip(COLUMNS, cells)))

    def close(self) -> None:
        self.file.close()


def timed_callable(provider: Provider, pass_: str, inp: check.Inputs):
    """What the timer calls for one pass; build it inside ``provider.context()``.

    fwd_train updates its own copy of the running statistics on every call (as training
    does).  fwd_eval runs under no_grad, as inference does.  bwd_train runs the forward
    once here and times only the backward: ``autograd.grad`` with retain_graph, so no
    gradient accumulates into ``.grad`` (that would add a read-modify-write of x's size).
    """
    if pass_ == "fwd_train":
        rm, rv = inp.running_mean.clone(), inp.running_var.clone()
        return lambda: provider.forward(inp.x, rm, rv, inp.weight, inp.bias, True)
    if pass_ == "fwd_eval":
        x = inp.x.detach()

        def eval_forward():
            with torch.no_grad():
                return provider.forward(x, inp.running_mean, inp.running_var, inp.weight, inp.bias, False)

        return eval_forward
    if pass_ == "bwd_train":
        rm, rv = inp.running_mean.clone(), inp.running_var.clone()
        y = provider.forward(inp.x, rm, rv, inp.weight, inp.bias, True)
        wrt = (inp.x, inp.weight, inp.bias)
        return lambda: torch.autograd.grad(y, wrt, inp.dy, retain_graph=True)
    raise KeyError(pass_)


def _brief(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:300]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def check_case(case, providers: List[Provider], inp, notes: List[str]) -> Dict[tuple, str]:
    """(provider, pass) -> FAILED / ERROR for what must not be timed; also warms every
    provider up (compiles) before its first timing."""
    status: Dict[tuple, str] = {}
    ref = check.reference(inp)
    for provider in providers:
        provider.begin_case()
        try:
            out = check.run_once(provider, inp)
            failures = check.compare(out, ref, inp, case)
            del out
        except Exception as e:  # noqa: BLE001 (any provider error is recorded, not fatal)
            notes.append(f"error: {provider.name} {case.label} (check): {_brief(e)}")
            for pass_ in PASSES:
                status[(provider.name, pass_)] = ERROR
            continue
        for pass_, messages in failures.items():
            if isinstance(provider, Torch):
                # The baseline every speedup is taken against: timed all the same (torch's
                # CUDA half-precision dweight / dbias miss the float64 bound), and said so.
                notes.append(f"inaccurate, timed as the baseline: torch {case.label} {pass_}: {'; '.join(messages)}")
                continue
            status[(provider.name, pass_)] = FAILED
            notes.append(f"fail: {provider.name} {case.label} {pass_}: {'; '.join(messages)}")
    return status


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sweep: --device cuda but torch sees no GPU")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    name = device_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args.out, name, args.stem)
    csv_path = args.out / f"{stem}.csv"
    writer = Writer(csv_path, name)
    notes = Notes(csv_path.with_suffix(".notes"))
    providers = resolve_providers(args, device, notes)
    if device.type == "cpu":
        timer = measure.WallTimer(reps=3)
        notes.append("CPU smoke run: Triton's interpreter, wall-clock median of 3; tooling test, not performance")
    else:
        timer = measure.CudaTimer(args.warmup_ms, args.rep_ms)
        notes.append(f"timer: triton.testing.do_bench median (warm-up {args.warmup_ms:g} ms, "
                     f"repetitions {args.rep_ms:g} ms), L2 flushed before each repetition")
    l2 = measure.l2_bytes(device)
    notes.append(f"mode {mode}; L2 {l2 / 2**20:.0f} MiB (floor bytes: 2B/3B forward-train, 3B/5B backward, "
                 "2B eval; see NOTES.md)")
    batch = resnet_batch(device, notes) if "resnet50" in args.suites else suites.RESNET50_BATCH
    cases = suites.sweep_order(args.suites, mode, batch)
    if args.skip_measured:
        measured = summarize.measured_cases(args.skip_measured)
        cases = [c for c in cases if (c.suite, c.shape_str, c.layout, c.dtype_str) not in measured]
        notes.append(f"{len(cases)} cases left after those measured in {', '.join(map(str, args.skip_measured))}")

    ms, moved, copy_gbps = measure.copy_bandwidth(device, timer)
    writer.row(COPY, str(moved // 2), "contiguous", "uint8", COPY, "torch", ms, moved, copy_gbps)

    # bntriton first and last: the spread of its two times is the run's noise.
    order = list(providers) + [p for p in providers if p.name == REFERENCE]
    progress = Progress(len(cases) * len(args.passes) * len(order))
    started = time.monotonic()
    done_cases = 0
    for case in cases:
        if args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes:
            notes.append(f"stopped at --max-minutes {args.max_minutes:g}: {done_cases} of {len(cases)} cases measured")
            break
        inp = None
        try:
            inp = check.make_inputs(case, device)
            status = check_case(case, providers, inp, notes)
        except Exception as e:  # noqa: BLE001 (inputs or the torch reference failed: nothing to time)
            notes.append(f"error: {case.label}: {_brief(e)}")
            status = {(p.name, pass_): ERROR for p in providers for pass_ in PASSES}
        _free(device)
        for pass_ in args.passes:
            nbytes = measure.floor_bytes(pass_, case.nbytes, l2)
            for provider in order:
                label = f"{case.label} {pass_} {provider.name}"
                result = status.get((provider.name, pass_))
                if result is None:
                    # The timed callable (and, for bwd_train, its graph) is freed by
                    # reference counting as soon as the timer returns.
                    try:
                        with provider.context():
                            result = timer(timed_callable(provider, pass_, inp))
                    except Exception as e:  # noqa: BLE001
                        notes.append(f"error: {provider.name} {case.label} {pass_} (timing): {_brief(e)}")
                        result = ERROR
                        _free(device)  # the traceback held tensors (an out-of-memory error, say)
                writer.row(case.suite, case.shape_str, case.layout, case.dtype_str, pass_, provider.name,
                           result, nbytes, copy_gbps)
                progress.step(label)
        del inp
        _free(device)
        done_cases += 1
    progress.close()
    notes.append(f"wall clock {time.monotonic() - started:.0f} s for {done_cases} of {len(cases)} cases "
                 "(checks, compilation and timing)")

    ms, moved, end_gbps = measure.copy_bandwidth(device, timer)
    writer.row(COPY, str(moved // 2), "contiguous", "uint8", COPY, "torch", ms, moved, copy_gbps)
    writer.close()

    md_path = summarize.write_summary([csv_path], csv_path.with_suffix(".md"))  # notes: from <stem>.notes
    png_path = plot.plot([csv_path], csv_path.with_suffix(".png"))
    text = md_path.read_text()
    overview = text[text.index("## Overview"):].split("\n## ")[0] if "## Overview" in text else ""
    print(overview.rstrip())
    print(f"\ncopy bandwidth {copy_gbps:.0f} GB/s (start), {end_gbps:.0f} GB/s (end)")
    print("wrote", csv_path, md_path, png_path or "(no PNG: matplotlib missing)", sep="\n  ")
    bad = [r for r in writer.rows if r["provider"] == REFERENCE and r["ms"] in (FAILED, ERROR)]
    return 1 if bad else 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
