"""Python frames per batch-norm call: bntriton's against torch's ``nn.BatchNorm2d``.

Host time per call on a GPU is mostly Python: every frame costs a few hundred
nanoseconds to a microsecond before anything reaches the GPU.  Frames can be counted
exactly on any machine, so this count steers the host path where timings on a CPU
cannot (perf/NOTES.md): the same number on every run, pinned by a test.

bntriton's calls take the CUDA route as planned for an H100 (132 SMs), on CPU tensors
with the kernels' launches stubbed at the launcher; torch's module runs on a tiny CPU
tensor.  A launch that is not bound yet is stubbed at ``DualKernel.__getitem__`` (the
stub registers a compiled variant, as a first direct launch would); a bound launch
(kernels/bound_launch.py) runs its guard for real, as on a GPU, and calls the stand-in
variant's launcher in place of Triton's (``compiled.run``).  The calls measured are
warm: their launches are bound.  Counted: every Python function entered during the call
(``sys.setprofile``'s "call" events), split into bntriton's own and everyone else's
(torch's Python: ``Module.__call__``, autograd's ``Function.apply``, ...), and the
launches.

    python perf/frames.py [--fused]

``--fused`` counts ``BatchNormAct2d(activation="relu")`` against what it replaces in
torch, ``nn.BatchNorm2d`` followed by ``nn.ReLU``.
"""
from __future__ import annotations

import operator
import sys
from collections import Counter
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bntriton  # noqa: E402
from bntriton.kernels import launch_cache  # noqa: E402
from bntriton.kernels import bound_launch, plans, runtime  # noqa: E402

PACKAGE = str(Path(bntriton.__file__).resolve().parent)
H100_SMS = 132


class _Variant:
    """Stands in for a compiled variant: what a bound launch reads of one, and a launcher
    that records the launch."""

    def __init__(self, launches: list):
        self.function, self.packed_metadata = object(), object()
        self.run = lambda *args: launches.append("bound")


def _stub_launches(launches: list, variants: list):
    """Patches standing in for the GPU: the unbound launch path stubbed at
    ``DualKernel.__getitem__`` (registering a variant for device 0 under the direct key,
    as the first direct launch does), the test for a CUDA tensor, and the device and
    stream a bound launch reads (C-level ``int``: ``int()`` and ``int(0)`` are 0, and add
    no Python frame); returns the undo."""
    saved = (runtime.DualKernel.__getitem__, torch.cuda.current_device, bound_launch._on_cuda,
             bound_launch._cuda_device, bound_launch._raw_stream)

    def getitem(kernel, grid):
        def launch(*args, **meta):
            launches.append("unbound")
            key = (0, runtime.launch_key(args, meta))
            if key not in kernel.direct.variants:
                kernel.direct.variants[key] = (_Variant(launches), kernel.direct.bound_tail(args, meta))
                variants.append((kernel.direct.variants, key))

        return launch

    runtime.DualKernel.__getitem__ = getitem
    torch.cuda.current_device = int
    bound_launch._on_cuda = operator.attrgetter("is_cpu")  # these CPU tensors stand for CUDA ones
    bound_launch._cuda_device = bound_launch._raw_stream = int

    def undo():
        (runtime.DualKernel.__getitem__, torch.cuda.current_device, bound_launch._on_cuda,
         bound_launch._cuda_device, bound_launch._raw_stream) = saved

    return undo


def count(fn, launches: list) -> tuple[int, int, int]:
    """``(bntriton frames, other Python frames, launches)`` of one call of ``fn``, with
    the launches stubbed (:func:`_stub_launches`, recording into ``launches``)."""
    frames = Counter()
    launches.clear()

    def profile(frame, event, arg):
        if event == "call":
            frames[frame.f_code.co_filename.startswith(PACKAGE)] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    # Not the call's own: fn's frame, and the stubs' frames, which stand in for Triton's
    # launcher: two per unbound launch (__getitem__ and the launch it returns), one per
    # bound launch (the variant's launcher).
    stubs = sum(2 if kind == "unbound" else 1 for kind in launches)
    return frames[True], frames[False] - 1 - stubs, len(launches)


def calls(make_module, x: torch.Tensor):
    """The call kinds, each ``(name, fn)``: fn runs one call on a warm module."""
    module = make_module(x.shape[1])
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


def _torch_pair(channels: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU())


def _fused(channels: int) -> torch.nn.Module:
    return bntriton.BatchNormAct2d(channels, activation="relu")


def measure(shape=(8, 64, 14, 14), fused: bool = False) -> list[tuple[str, tuple, tuple]]:
    """``[(call kind, (ours: package, other, launches), (torch's: package=0, other, 0))]``;
    ``fused``: BatchNormAct2d(relu) against torch's BatchNorm2d + ReLU."""
    x = torch.randn(shape)
    rows = []
    launches, variants = [], []
    undo = _stub_launches(launches, variants)
    try:
        with plans.planned_for(H100_SMS), bntriton.cpu_backend("interpreter"):
            results = {}
            layers = (("bntriton", _fused), ("torch", _torch_pair)) if fused else (
                ("bntriton", bntriton.BatchNorm2d), ("torch", torch.nn.BatchNorm2d))
            for label, make_module in layers:
                _, prepare, kinds = calls(make_module, x)
                for name, fn in kinds:
                    for _ in range(2):  # warm: caches, first-call paths, bound launches
                        prepare(name)
                        count(fn, launches)
                    prepare(name)
                    results[label, name] = count(fn, launches)
            for name, _ in kinds:
                rows.append((name, results["bntriton", name], results["torch", name]))
    finally:
        undo()
        # The cached launches now hold stand-in variants, bound to a "device" CPU
        # tensors never run on: forget them and the variants.
        launch_cache._LAUNCHES.clear()
        for table, key in variants:
            table.pop(key, None)
    return rows


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fused", action="store_true", help="BatchNormAct2d(relu) against BatchNorm2d + ReLU")
    args = parser.parse_args(argv)
    print(f"{'Python frames per call':24s} {'bntriton':>9s} {'(own)':>6s} {'launches':>9s} {'torch':>6s}")
    for name, ours, theirs in measure(fused=args.fused):
        print(f"{name:24s} {ours[0] + ours[1]:9d} {ours[0]:6d} {ours[2]:9d} {theirs[1]:6d}")
    layers = ("BatchNormAct2d(relu); torch: nn.BatchNorm2d + nn.ReLU" if args.fused else "nn.BatchNorm2d")
    print(f"(bntriton planned as an H100, launches stubbed; torch {torch.__version__}; {layers} on CPU)")


if __name__ == "__main__":
    main()
