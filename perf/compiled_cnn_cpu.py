"""A compiled small CNN's training step on a CPU: torch's layers and bntriton's, eager and
under torch.compile (Inductor), timed in interleaved rounds in one process.

    python perf/compiled_cnn_cpu.py [--batch 32] [--size 32] [--rounds 15] [--threads 1]

Under torch.compile, bntriton's batch norms on CPU tensors are one opaque call each (the
native path runs when the graph runs; docs/compile.md), so Inductor compiles everything
around them and cannot fuse the batch norm into its neighbours, as it does with torch's.
Prints the median step time (forward + backward + SGD step) of each provider and the
ratio of bntriton's compiled step to torch's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bntriton  # noqa: E402


class SmallCNN(nn.Module):
    """conv-BN-ReLU stem, two residual blocks, pooling and a classifier."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
            for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(block(x) + x)
        return self.head(x.mean((2, 3)))


def _provider(name: str, backend: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SmallCNN()
    if name.startswith("bntriton"):
        model = bntriton.convert_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step_model = torch.compile(model, backend=backend) if name.endswith("compile") else model
    return step_model, optimizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: steadier timings)")
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager: a tooling check only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))
    names = ["torch", "bntriton", "torch_compile", "bntriton_compile"]
    providers = {name: _provider(name, args.compile_backend) for name in names}

    def step(name):
        model, optimizer = providers[name]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    for name in names:  # compile and warm up
        for _ in range(3):
            step(name)
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            start = time.perf_counter()
            step(name)
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"training step, batch {args.batch}, {args.size}x{args.size}, fp32, {args.threads} thread(s); "
          f"median of {args.rounds} interleaved rounds, torch {torch.__version__}")
    for name in names:
        print(f"  {name:18s} {medians[name]:8.2f} ms")
    print(f"bntriton_compile / torch_compile: {medians['bntriton_compile'] / medians['torch_compile']:.2f}")


if __name__ == "__main__":
    main()
