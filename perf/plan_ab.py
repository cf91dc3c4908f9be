"""A plan choice A/B'd on one warm GPU: each pass timed under bntriton's own plan and
under an alternative forced through ``plans.forced_plan``, the two interleaved round by
round so that a drifting clock falls on both.

    python perf/plan_ab.py                                    # every experiment, its shapes
    python perf/plan_ab.py --experiment nchw-tiles --shape 256,256,56,56 --dtype fp32
    python perf/plan_ab.py --device cpu --smoke               # the tooling only (interpreter)

Experiments:

* ``nchw-tiles``: channels-first split tiles of one channel (the plan when each
  (sample, channel) run is long, ``plans.plan_for``) against four adjacent channels (the
  plan before), same tile bytes.  Prediction (perf/NOTES.md section 13): no measurable
  difference on large tensors.
* ``backward-sums``: the training backward with its epilogue summing the splits itself
  against the partial sums' last program of each channel block summing them once and
  writing dx's coefficients (both two launches).  Prediction: within the noise of each
  other where the epilogue route is chosen (its extra reads are under 1/32 of a tile's).

Prints a markdown table per experiment: the path bntriton's own plan takes (split or
single-read), milliseconds under each variant (median of the rounds, each a
``triton.testing.do_bench`` median) and the alternative's time over the default's.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

import bntriton  # noqa: E402
from bntriton.kernels import channel_view, plans  # noqa: E402

import measure  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _four_channel_tiles(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The split plan channels-first tiles had before one-channel tiles: four channels."""
    view = channel_view(x)
    sm_count = plans._device_sm_count(x)
    p = plans.plan_for(view.rows, view.channels, view.channels_last, view.needs_int64, sm_count,
                       x.element_size(), run_bytes=0)
    return plans.forced_plan(path="split", block_rows=p.block_rows, block_channels=p.block_channels,
                             num_splits=p.num_splits)


def _default(_x):
    return contextlib.nullcontext()


# name: (variants {label: context for x}, passes, default shapes (shape, dtype))
EXPERIMENTS = {
    "nchw-tiles": (
        {"one channel (default)": _default, "four channels": _four_channel_tiles},
        ("fwd_train", "bwd_train", "fwd_eval"),
        [((256, 256, 56, 56), "fp32"), ((64, 64, 112, 112), "bf16"), ((32, 128, 28, 28), "fp32")],
    ),
    "backward-sums": (
        {"in the epilogue (default)": lambda _x: plans.forced_plan(backward_sums="epilogue"),
         "in the partial sums' last programs": lambda _x: plans.forced_plan(backward_sums="combine")},
        ("bwd_train",),
        [((256, 256, 56, 56), "fp32"), ((32, 256, 56, 56), "bf16"), ((8, 64, 56, 56), "fp32")],
    ),
}
SMOKE_SHAPES = [((2, 4, 16, 16), "fp32")]


def _pass_fn(pass_: str, x, w, b, dy):
    """A no-argument callable running one pass (the backward's graph built here, once)."""
    c = x.shape[1]
    rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
    if pass_ == "fwd_train":
        return lambda: bntriton.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    if pass_ == "fwd_eval":
        return lambda: bntriton.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    xg = x.detach().requires_grad_()
    y = bntriton.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5)
    return lambda: torch.autograd.grad(y, (xg, w, b), dy, retain_graph=True)


def run(experiment: str, shapes, device: str, rounds: int, timer) -> list[dict]:
    variants, passes, _ = EXPERIMENTS[experiment]
    rows = []
    for shape, dtype_name in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(shape, device=device, generator=gen) * 2 + 3).to(DTYPES[dtype_name])
        c = shape[1]
        w = (torch.rand(c, device=device, generator=gen) + 0.5).requires_grad_()
        b = torch.randn(c, device=device, generator=gen).requires_grad_()
        dy = torch.randn(x.shape, device=device, generator=gen).to(x.dtype)
        for pass_ in passes:
            times = {label: [] for label in variants}
            fns = {}
            for label, context in variants.items():
                with context(x):
                    fns[label] = _pass_fn(pass_, x, w, b, dy)
            for _ in range(rounds):
                for label, context in variants.items():
                    with context(x):
                        times[label].append(timer(fns[label]))
            medians = [statistics.median(times[label]) for label in variants]
            path = "split" if plans.fused_plan(channel_view(x)) is None else "single-read"
            rows.append({"shape": "x".join(map(str, shape)), "dtype": dtype_name, "pass": pass_, "path": path,
                         "ms": medians, "ratio": medians[1] / medians[0]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=list(EXPERIMENTS), action="append",
                        help="repeatable; default: all")
    parser.add_argument("--shape", help="N,C[,spatial...] (with --dtype): replaces the experiments' shapes")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, for testing the tooling on a CPU")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if not on_gpu and not args.smoke:
        parser.error("timings need a GPU; on a CPU pass --smoke (the tooling only)")
    timer = measure.CudaTimer() if on_gpu else measure.WallTimer(reps=1)
    name = torch.cuda.get_device_name() if on_gpu else "CPU (interpreter, smoke: the times mean nothing)"
    print(f"# plan A/B on {name}; torch {torch.__version__}; median of {args.rounds} interleaved rounds")
    for experiment in args.experiment or list(EXPERIMENTS):
        variants, _, shapes = EXPERIMENTS[experiment]
        if args.smoke:
            shapes = SMOKE_SHAPES
        elif args.shape:
            shapes = [(tuple(int(v) for v in args.shape.split(",")), args.dtype)]
        labels = list(variants)
        print(f"\n## {experiment}\n\n| shape | dtype | pass | default path | {labels[0]} ms | {labels[1]} ms | ratio |")
        print("|---|---|---|---|---:|---:|---:|")
        # A CPU run plans as an H100 would, so that the GPU's tiles are what the smoke runs.
        with plans.planned_for(132) if not on_gpu else contextlib.nullcontext(), \
                bntriton.cpu_backend("interpreter"):
            for row in run(experiment, shapes, args.device, args.rounds, timer):
                a, b = row["ms"]
                print(f"| {row['shape']} | {row['dtype']} | {row['pass']} | {row['path']} | {a:.4f} | {b:.4f} "
                      f"| {row['ratio']:.3f} |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
