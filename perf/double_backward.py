"""Cost of a double-backward step (gradient penalty) against a first-order step, bntriton vs torch.

Timed apart after the same forward: a first-order backward (the fused kernels), and a
double-backward step, ``grad(loss, x, create_graph=True)`` (the backward as differentiable
torch ops, bntriton.autograd) then the penalty's backward through it.  Both run for a
BatchNorm2d in training mode and for torch's own, on the device given (CPU: bntriton's
kernels in Triton's interpreter unless ``--backend native``), and print the best of several runs.

    python perf/double_backward.py [--shape 16,32,16,16] [--repeats 7] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import bntriton


def _forward(bn, x):
    x = x.detach().requires_grad_()
    return x, bn(x)


def _first_order(x_y):
    x, y = x_y
    y.pow(2).sum().backward()


def _double_backward(x_y):
    x, y = x_y
    (grad_x,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()


def _median_ms(setup, fn, repeats: int, device: str) -> float:
    """Median time of ``fn(setup())``, ``setup`` (the forward) outside the timed region."""
    fn(setup())  # warm-up: kernel compilation, caches
    times = []
    for _ in range(repeats):
        state = setup()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(state)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)  # the least disturbed run: shared machines are noisy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,32,16,16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="interpreter", choices=["interpreter", "native"])
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape, device=args.device) * 2 + 0.5
    rows = []
    with bntriton.cpu_backend(args.backend):
        for name, cls in (("bntriton", bntriton.BatchNorm2d), ("torch", nn.BatchNorm2d)):
            bn = cls(shape[1]).to(args.device)
            forward = _median_ms(lambda: None, lambda _: _forward(bn, x), args.repeats, args.device)
            first = _median_ms(lambda: _forward(bn, x), _first_order, args.repeats, args.device)
            double = _median_ms(lambda: _forward(bn, x), _double_backward, args.repeats, args.device)
            rows.append((name, forward, first, double))
    print(f"shape {shape} fp32 on {args.device} (cpu backend {args.backend}), torch {torch.__version__}, "
          f"best of {args.repeats}")
    print("(ms; backward columns after the forward, which is timed on its own)")
    print(f"{'provider':10} {'forward':>9} {'backward':>9} {'grad(create_graph) + backward':>30} {'ratio':>6}")
    for name, forward, first, double in rows:
        print(f"{name:10} {forward:9.2f} {first:9.2f} {double:30.2f} {double / first:6.2f}")
    (_, _, ours_first, ours_double), (_, _, torch_first, torch_double) = rows
    print(f"bntriton / torch: backward {ours_first / torch_first:.2f}x, "
          f"double backward {ours_double / torch_double:.2f}x")


if __name__ == "__main__":
    main()
