"""Host (Python) time per batch-norm call, with the kernel launches themselves stubbed out.

Small batch norms are host-bound on a GPU: the time a call spends in Python (argument
checks, layout analysis, planning, allocations, autograd bookkeeping) adds to every
kernel.  That part can be measured on any machine, CPU included, by replacing the
launches with no-ops; what it leaves out is Triton's own launch cost, which only a GPU
run shows (perf/sweep.py).

    python perf/host_overhead.py [--calls 3000]
"""
from __future__ import annotations

import argparse
import time

import torch

import bntriton
from bntriton.kernels import runtime


def _per_call_us(fn, calls: int) -> float:
    for _ in range(min(calls, 200)):  # warm caches (plans, layouts)
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)

    runtime.DualKernel.__getitem__ = lambda self, grid: (lambda *a, **k: None)
    x = torch.randn(4, 2048, 7, 7)  # small_batch's 4x2048x7x7; sizes do not matter here
    module = bntriton.BatchNorm2d(2048)
    x_grad = x.clone().requires_grad_()
    rows = [
        ("BatchNorm2d training forward", lambda: module(x)),
        ("BatchNorm2d training forward + backward", lambda: module(x_grad).backward(x)),
    ]
    for name, fn in rows:
        print(f"{name:42s} {_per_call_us(fn, args.calls):7.1f} us")
    module.eval()
    print(f"{'BatchNorm2d eval forward':42s} {_per_call_us(lambda: module(x), args.calls):7.1f} us")
    print(f"(host time only, launches stubbed; torch {torch.__version__}, Python on this CPU)")


if __name__ == "__main__":
    main()
