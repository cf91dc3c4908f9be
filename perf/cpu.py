"""bntriton's native CPU path against torch's CPU batch norm, side by side in one run.

    python perf/cpu.py                      # the default cases; writes perf/results/cpu-<date>.{csv,md}
    python perf/cpu.py --quick --out /tmp/x # fewer repetitions, elsewhere

Every case is timed for both providers in the same process, interleaved repetition by
repetition (the order alternating), so that load from other processes on the machine
falls on both alike; the reported time is the median.  Passes: ``fwd_train`` (training
forward, running statistics updated), ``fwd_bwd_train`` (training forward + backward of
input, weight and bias), ``fwd_eval`` (eval forward, no autograd, with the running
statistics the training passes left: the data's mean 1.5 std from zero), ``fwd_eval_near``
and ``fwd_eval_offset`` (the same with the running mean set 0.5 and 8 running stds from
zero: torch's own single pass runs, its error within the y bound there) and
``fwd_eval_far`` (set 1e4 running stds from zero, where torch's single pass leaves the y
bound and the exact two-pass shift runs; its row reports both errors against float64
instead of a target: a fast answer outside the bound is no result to race).  The targets:
the training step within 2x torch's time and eval within 1.5x, NCHW and channels_last.

The CSV has the sweep's columns (perf/schema.py); ``bytes`` is the pass's floor bytes
(perf/NOTES.md: 3B for the training forward, 3B + 5B with the backward, 2B for eval) and
``pct_copy_bw`` the fraction of the copy bandwidth measured in the same run (a clone of
the case's input).  The markdown beside it has the ratio table.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bntriton  # noqa: E402
from schema import COLUMNS  # noqa: E402

# (shape, layout, dtype[, data mean in stds]): the first two are the ones the targets are
# stated for.  The data's mean lies 1.5 stds from zero (N(3, 2)) unless a case says
# otherwise; such a case is its own suite, ``cpu-<k>std``.
CASES = [
    ((32, 64, 56, 56), "nchw", torch.float32),
    ((32, 64, 56, 56), "channels_last", torch.float32),
    ((8, 512, 7, 7), "nchw", torch.float32),
    ((8, 512, 7, 7), "channels_last", torch.float32),
    ((4096, 1024), "nc", torch.float32),
    ((32, 64, 56, 56), "nchw", torch.bfloat16),
    ((32, 64, 56, 56), "nchw", torch.bfloat16, 10.0),
    ((32, 64, 56, 56), "channels_last", torch.bfloat16, 10.0),
]
PASSES = ("fwd_train", "fwd_bwd_train", "fwd_eval", "fwd_eval_near", "fwd_eval_offset", "fwd_eval_far")
FLOOR = {"fwd_train": 3, "fwd_bwd_train": 8, "fwd_eval": 2, "fwd_eval_near": 2, "fwd_eval_offset": 2,
         "fwd_eval_far": 2}  # multiples of the input's bytes
# The running mean, in running stds.
EVAL_OFFSETS = {"fwd_eval_near": 0.5, "fwd_eval_offset": 8.0, "fwd_eval_far": 1e4}
TARGETS = {"fwd_bwd_train": 2.0, "fwd_eval": 1.5, "fwd_eval_near": 1.5, "fwd_eval_offset": 1.5}
# Passes whose row reports the errors against float64 rather than a target.
ACCURACY_ROWS = ("fwd_eval_far",)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def make_modules(shape, dtype):
    channels = shape[1]
    torch_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                 5: torch.nn.BatchNorm3d}[len(shape)]
    reference = torch_cls(channels)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    ours = bntriton.convert_model(torch_cls(channels))
    ours.load_state_dict(reference.state_dict())
    # bf16 input with fp32 parameters, as under autocast.
    return {"torch": reference, "bntriton": ours}


def place_running_mean(module, pass_name):
    """For the eval passes that say so, the running mean that many running stds from zero
    (set once per pass, before timing: an eval loop leaves the running statistics as
    they are)."""
    if pass_name in EVAL_OFFSETS:
        with torch.no_grad():
            module.running_mean.copy_(EVAL_OFFSETS[pass_name] * module.running_var.sqrt())


def step(module, x, grad, pass_name):
    if pass_name.startswith("fwd_eval"):
        module.eval()
        with torch.no_grad():
            return module(x)
    module.train()
    if pass_name == "fwd_train":
        with torch.no_grad():
            return module(x)
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run(reps: int, cases) -> list[dict]:
    device = f"{cpu_name()} ({torch.get_num_threads()} threads)"
    import triton

    rows = []
    for shape, layout, dtype, *offset in cases:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=gen) * 2 + 2 * (offset[0] if offset else 1.5)).to(dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        grad = torch.randn(shape, generator=gen).to(dtype).to(memory_format=torch.channels_last) \
            if layout == "channels_last" else torch.randn(shape, generator=gen).to(dtype)
        modules = make_modules(shape, dtype)
        nbytes = x.numel() * x.element_size()
        copy_ms = statistics.median(timed(lambda: x.clone()) for _ in range(max(reps, 5)))
        copy_gbps = 2 * nbytes / copy_ms / 1e6
        suite = f"cpu-{offset[0]:g}std" if offset else "cpu"
        base = dict(device=device, torch=torch.__version__, triton=triton.__version__, suite=suite,
                    shape="x".join(map(str, shape)), layout=layout, dtype=str(dtype).replace("torch.", ""))
        rows.append(dict(base, **{"pass": "copy", "provider": "copy", "ms": f"{copy_ms:.4f}",
                                  "bytes": 2 * nbytes, "gbps": f"{copy_gbps:.2f}", "pct_copy_bw": "1.000"}))
        for pass_name in PASSES:
            for m in modules.values():
                place_running_mean(m, pass_name)
            xp = _around_running_mean(x, modules["torch"], pass_name)
            # Agreement first (a fast wrong answer is no result), then warm-up: with torch, or
            # where torch's answer leaves the bound, bntriton's with float64.
            outs = {p: step(m, xp, grad, pass_name) for p, m in modules.items()}
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            note = ""
            if pass_name in ACCURACY_ROWS:
                errors, bound = _eval_errors(modules, xp, outs)
                if errors["bntriton"] > bound:
                    raise SystemExit(f"bntriton outside the y bound on {shape} {layout} {dtype} {pass_name}")
                note = (f"errors: torch {errors['torch']:.1f} eps, bntriton {errors['bntriton']:.1f} "
                        f"(y bound {bound:.0f})")
            elif not torch.allclose(outs["bntriton"].float(), outs["torch"].float(), atol=tol, rtol=tol):
                raise SystemExit(f"bntriton disagrees with torch on {shape} {layout} {dtype} {pass_name}")
            times = {p: [] for p in modules}
            order = list(modules)
            for rep in range(reps):
                for p in (order if rep % 2 == 0 else order[::-1]):
                    times[p].append(timed(lambda: step(modules[p], xp, grad, pass_name)))
            for p, ts in times.items():
                ms = statistics.median(ts)
                floor = FLOOR[pass_name] * nbytes
                gbps = floor / ms / 1e6
                rows.append(dict(base, **{"pass": pass_name, "provider": p, "ms": f"{ms:.4f}", "bytes": floor,
                                          "gbps": f"{gbps:.2f}", "pct_copy_bw": f"{gbps / copy_gbps:.3f}",
                                          "note": note}))
            print(f"{base['shape']:>14} {layout:>13} {base['dtype']:>8} {suite:>10} {pass_name:>13}: "
                  f"torch {statistics.median(times['torch']):8.2f} ms  bntriton "
                  f"{statistics.median(times['bntriton']):8.2f} ms  "
                  f"ratio {statistics.median(times['bntriton']) / statistics.median(times['torch']):.2f}",
                  flush=True)
    return rows


def _around_running_mean(x, module, pass_name):
    """The input for ``pass_name``: for the eval passes that place the running mean some
    running stds from zero (:func:`place_running_mean`, already called), the data moved
    with it (centred on it, as eval data lie around the running mean), in ``x``'s dtype
    and layout."""
    if pass_name not in EVAL_OFFSETS:
        return x
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    dims = [d for d in range(x.dim()) if d != 1]
    moved = x.double() - x.double().mean(dims, keepdim=True) + module.running_mean.double().view(per_channel)
    return torch.empty_like(x).copy_(moved)


def _eval_errors(modules, x, outs):
    """``({provider: error}, bound)``: each provider's eval error against float64, with its
    own module's running statistics, in eps of max|y| (the bound table's measure), and
    the y bound."""
    from bntriton.verification.bounds import bound_units, normwise_error

    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    errors = {}
    for p, module in modules.items():
        rm, rv = module.running_mean.double(), module.running_var.double()
        a = module.weight.detach().double() / (rv + module.eps).sqrt()
        exact = ((x.double() - rm.view(per_channel)) * a.view(per_channel)
                 + module.bias.detach().double().view(per_channel))
        errors[p] = normwise_error(outs[p], exact, x.dtype)
    return errors, bound_units("y", x.dtype, x.numel() // x.shape[1])


def summary(rows: list[dict], reps: int) -> str:
    first = rows[0]
    lines = [
        f"# bntriton native CPU path vs torch: {first['device']}",
        "",
        f"torch {first['torch']}, triton {first['triton']}, {datetime.date.today().isoformat()}; "
        f"median of {reps} interleaved repetitions; load average {os.getloadavg()[0]:.1f} at the end "
        f"(other processes on the machine); written by `python perf/cpu.py`.",
        "",
        "| shape | layout | dtype | data mean | pass | torch ms | bntriton ms | ratio | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key, notes = {}, {}
    for r in rows:
        key = (r["shape"], r["layout"], r["dtype"], r["suite"], r["pass"])
        by_key.setdefault(key, {})[r["provider"]] = float(r["ms"])
        notes[key] = r.get("note", "")
    for key, t in by_key.items():
        shape, layout, dtype, suite, pass_name = key
        if pass_name == "copy":
            continue
        ratio = t["bntriton"] / t["torch"]
        target = TARGETS.get(pass_name)
        verdict = notes[key] if target is None else (
            f"<= {target}: " + ("met" if ratio <= target else "MISSED"))
        data_mean = suite.removeprefix("cpu-").replace("std", " stds") if suite != "cpu" else "1.5 stds"
        lines.append(f"| {shape} | {layout} | {dtype} | {data_mean} | {pass_name} | {t['torch']:.2f} "
                     f"| {t['bntriton']:.2f} | {ratio:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=21, help="timed repetitions per provider (default 21)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's choice, one per core)")
    parser.add_argument("--quick", action="store_true", help="5 repetitions, the two target cases only")
    parser.add_argument("--out", type=Path, default=None,
                        help="output path without suffix (default perf/results/cpu-<date>)")
    args = parser.parse_args(argv)
    reps = 5 if args.quick else args.reps
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = CASES[:2] if args.quick else CASES
    with bntriton.cpu_backend("native"):
        rows = run(reps, cases)
    out = args.out or Path(__file__).resolve().parent / "results" / f"cpu-{datetime.date.today().isoformat()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    import csv

    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = summary(rows, reps)
    out.with_suffix(".md").write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
