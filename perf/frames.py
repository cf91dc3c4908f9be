"""Python frames per batch-norm call: bntriton's against torch's ``nn.BatchNorm2d``.

Host time per call on a GPU is mostly Python: every frame costs a few hundred
nanoseconds to a microsecond before anything reaches the GPU.  Frames can be counted
exactly on any machine, so this count steers the host path where timings on a CPU
cannot (perf/NOTES.md): the same number on every run, pinned by a test.

bntriton's calls take the CUDA route as planned for an H100 (132 SMs), on CPU tensors
with the kernels' launches stubbed at the launcher (``DualKernel.__getitem__``); torch's
module runs on a tiny CPU tensor.  Counted: every Python function entered during the
call (``sys.setprofile``'s "call" events), split into bntriton's own and everyone
else's (torch's Python: ``Module.__call__``, autograd's ``Function.apply``, ...), and
the launches.

    python perf/frames.py
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bntriton  # noqa: E402
from bntriton.kernels import plans, runtime  # noqa: E402

PACKAGE = str(Path(bntriton.__file__).resolve().parent)
H100_SMS = 132


def count(fn) -> tuple[int, int, int]:
    """``(bntriton frames, other Python frames, launches)`` of one call of ``fn``."""
    frames = Counter()
    launches = []

    def profile(frame, event, arg):
        if event == "call":
            frames[frame.f_code.co_filename.startswith(PACKAGE)] += 1

    original = runtime.DualKernel.__getitem__
    runtime.DualKernel.__getitem__ = lambda self, grid: (lambda *a, **k: launches.append(self.fn.__name__))
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        runtime.DualKernel.__getitem__ = original
    # Not the call's own: fn's frame, and the stub's two per launch (__getitem__ and
    # the launch it returns), which stand in for Triton's launcher.
    return frames[True], frames[False] - 1 - 2 * len(launches), len(launches)


def calls(module_cls, x: torch.Tensor):
    """The call kinds, each ``(name, fn)``: fn runs one call on a warm module."""
    module = module_cls(x.shape[1])
    leaf = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    forward = {}

    def train_forward():
        return module(x)

    def train_backward():
        forward["y"].backward(dy)

    def eval_forward():
        return module(x)

    def eval_no_grad():
        with torch.no_grad():
            return module(x)

    def prepare(name):
        if name == "training backward":
            leaf.grad = None
            module.train()
            forward["y"] = module(leaf)
        elif name.startswith("training"):
            module.train()
        else:
            module.eval()

    return module, prepare, [("training forward", train_forward), ("training backward", train_backward),
                             ("eval forward", eval_forward), ("eval forward, no_grad", eval_no_grad)]


def measure(shape=(8, 64, 14, 14)) -> list[tuple[str, tuple, tuple]]:
    """``[(call kind, (ours: package, other, launches), (torch's: package=0, other, 0))]``."""
    x = torch.randn(shape)
    rows = []
    with plans.planned_for(H100_SMS), bntriton.cpu_backend("interpreter"):
        results = {}
        for label, cls in (("bntriton", bntriton.BatchNorm2d), ("torch", torch.nn.BatchNorm2d)):
            _, prepare, kinds = calls(cls, x)
            for name, fn in kinds:
                for _ in range(2):  # warm: caches, first-call paths
                    prepare(name)
                    count(fn)
                prepare(name)
                results[label, name] = count(fn)
        for name, _ in kinds:
            rows.append((name, results["bntriton", name], results["torch", name]))
    return rows


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(f"{'Python frames per call':24s} {'bntriton':>9s} {'(own)':>6s} {'launches':>9s} {'torch':>6s}")
    for name, ours, theirs in measure():
        print(f"{name:24s} {ours[0] + ours[1]:9d} {ours[0]:6d} {ours[2]:9d} {theirs[1]:6d}")
    print(f"(bntriton planned as an H100, launches stubbed; torch {torch.__version__}, nn.BatchNorm2d on CPU)")


if __name__ == "__main__":
    main()
