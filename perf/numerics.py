"""Accuracy against torch: the error ratio bntriton / torch per quantity and data kind.

Both implementations run the same cases through the verification harness
(:func:`bntriton.verification.check_case`), so each error is measured against the
float64 oracle in the same units; the ratio of the two errors is then independent of
how an error is normalized.  A ratio below 1 means bntriton is the more accurate.

    PYTHONPATH=$PWD python perf/numerics.py                 # CPU: kernels in the interpreter
    PYTHONPATH=$PWD python perf/numerics.py --device cuda   # GPU: torch's CUDA batch norm as the peer
    PYTHONPATH=$PWD python perf/numerics.py --path split    # force the grid-split kernels

Data kinds: ``offset0`` (N(0, 1)), ``typical`` (per-channel means ~ N(0, 1) and scales
e^U(-1, 1)), ``post_relu`` (max(0, N(0, 1)): half the values exactly zero) and
``offset1e4`` (mean 1e4 x std).  Errors below ``FLOOR`` eps count as ``FLOOR`` on both
sides: a ratio of two roundings-to-nothing says nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time

import numpy as np
import torch

import bntriton
from bntriton.kernels import forced_plan
from bntriton.verification.harness import check_case
from bntriton.verification.strategies import Case

FLOOR = 0.05  # eps

KINDS = {
    "offset0": dict(data="normal"),
    "typical": dict(data="typical"),
    "post_relu": dict(data="post_relu"),
    "offset1e4": dict(data="normal", offset=1e4),
}

# 2-D, NCHW, channels_last and 3-D; few and many rows per channel.
SHAPES = [
    ((64, 16), "contiguous"),
    ((4096, 8), "contiguous"),
    ((32768, 2), "contiguous"),
    ((2, 24, 3), "contiguous"),
    ((8, 16, 8, 8), "contiguous"),
    ((32, 4, 32, 32), "contiguous"),
    ((8, 2, 32, 32), "contiguous"),
    ((8, 16, 8, 8), "channels_last"),
    ((16, 8, 16, 16), "channels_last"),
    ((4, 4, 8, 8, 8), "contiguous"),
    ((2, 8, 6, 8, 8), "channels_last"),
]

QUANTITIES = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")


def _torch_impl(x, running_mean, running_var, weight, bias, training, momentum, eps):
    return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _path(name: str):
    return contextlib.nullcontext() if name == "auto" else forced_plan(path=name)


def measure(dtype: torch.dtype, seeds: int, device: str, path: str, shapes=SHAPES, kinds=KINDS):
    """``{(kind, quantity): [ratio, ...]}`` over shapes x seeds."""
    ratios: dict = {}
    for kind, data in kinds.items():
        for shape, layout in shapes:
            for seed in range(seeds):
                case = Case(shape=shape, dtype=dtype, layout=layout, seed=1000 * seed + len(shape),
                            family="numerics", **data)
                with _path(path):
                    ours = check_case(bntriton.batch_norm, case, device)
                theirs = check_case(_torch_impl, case, device)
                if ours.problems:
                    print(f"  bntriton problems on {case}: {ours.problems}", file=sys.stderr)
                for q in QUANTITIES:
                    if q in ours.errors and q in theirs.errors:
                        a, b = ours.errors[q], theirs.errors[q]
                        ratios.setdefault((kind, q), []).append(max(a, FLOOR) / max(b, FLOOR))
    return ratios


def table(ratios: dict, kinds=KINDS) -> str:
    lines = ["| quantity | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for q in QUANTITIES:
        cells = []
        for kind in kinds:
            r = ratios.get((kind, q))
            cells.append("-" if not r else f"{np.median(r):.2g} / {max(r):.2g}")
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                        help="repeatable (default: float32 and bfloat16)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--path", choices=["auto", "split", "fused"], default="auto",
                        help="force the grid-split or the single-read kernels (fused: shapes that fit only)")
    args = parser.parse_args(argv)
    shapes = SHAPES
    if args.path == "fused":
        shapes = [s for s in SHAPES if math.prod(s[0]) // s[0][1] <= 16384]
    print(f"# bntriton / torch error ratio (median / worst over {len(shapes)} shapes x {args.seeds} seeds)")
    print(f"device {args.device}, path {args.path}, torch {torch.__version__}")
    with bntriton.cpu_backend("interpreter"):
        for name in args.dtype or ["float32", "bfloat16"]:
            start = time.perf_counter()
            ratios = measure(getattr(torch, name), args.seeds, args.device, args.path, shapes)
            print(f"\n## {name} ({time.perf_counter() - start:.0f} s)\n")
            print(table(ratios))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
