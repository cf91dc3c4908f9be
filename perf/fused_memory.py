"""Bytes kept for backward and bytes moved per pass, ResNet-style blocks, four ways.

    python perf/fused_memory.py [--out docs/fused_memory.md] [--no-compile]

Runs on CPU (Triton's interpreter for bntriton; Inductor's C++ backend for
torch.compile) and prints a markdown report; every number is a count, not a timing, so
it is the same on every run and on every machine.

Providers: ``fused`` (convert_model(fuse=True)), ``bntriton`` (convert_model: the batch
norms only, activations and adds by torch), ``torch`` (eager), ``torch_compile``
(Inductor, default mode).  Blocks: torchvision-style BasicBlock and Bottleneck (identity
shortcut), after a conv -> BN -> ReLU stem.

**Bytes kept for backward** are measured: the distinct storages saved for the backward
(``bntriton.verification.memory.saved_bytes``), for the whole network (convolutions
included: they keep their inputs, which are the previous activation's outputs).  For
torch_compile the saved tensors are the compiled graph's (AOTAutograd saves them with
``save_for_backward``, which the hooks see).

**Bytes moved per pass** are a model of the memory traffic of the normalization,
activation and add steps (convolutions left out: the same for all four), B = the bytes
of one activation tensor, per BN site; see ``site_traffic`` for the formulas.  They
assume tensors larger than L2 (the split kernels: statistics read x once, the
epilogue reads it again).  For torch_compile the model is Inductor's usual schedule (one
reduction kernel for the statistics, one pointwise kernel for the tail; in backward one
reduction kernel and one pointwise kernel, with the ReLU's mask recomputed from x and the
statistics where possible) and is flagged as such.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bntriton  # noqa: E402
from bntriton.verification.memory import saved_bytes  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class Bottleneck(nn.Module):
    def __init__(self, c, mid):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + x)


class Net(nn.Module):
    def __init__(self, block: str, c: int):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = BasicBlock(c) if block == "basic" else Bottleneck(c, c // 4)

    def forward(self, x):
        return self.block(F.relu(self.bn(self.stem(x))))


@dataclass
class Site:
    """One batch norm in the network: its tensor's bytes and what follows it."""

    bytes: int
    residual: bool
    numel: int


def sites(block: str, n: int, c: int, hw: int, elem: int) -> list[Site]:
    spatial = n * hw * hw
    if block == "basic":
        return [Site(spatial * c * elem, False, spatial * c)] * 2 + [Site(spatial * c * elem, True, spatial * c)]
    mid = c // 4
    return ([Site(spatial * c * elem, False, spatial * c)] + [Site(spatial * mid * elem, False, spatial * mid)] * 2
            + [Site(spatial * c * elem, True, spatial * c)])


def site_traffic(provider: str, s: Site) -> tuple[int, int]:
    """(forward, backward) bytes moved by BN [+ add] + ReLU at one site (model)."""
    B = s.bytes
    mask = -(-s.numel // 8)  # bntriton's 1-bit mask
    if provider == "fused":
        # fwd: statistics read x; the epilogue reads x (+ residual), writes y (+ mask).
        # bwd: the sums read x, dy (+ mask); the dx epilogue reads x, dy (+ mask), writes dx (+ dresidual).
        fwd = 3 * B + (B + mask if s.residual else 0)
        bwd = 5 * B + (2 * mask + B if s.residual else 0)
        return fwd, bwd
    if provider in ("bntriton", "torch"):
        # BN as bntriton's split path / cuDNN: fwd 3B, bwd 5B.  Then torch's add (read 2, write 1)
        # and ReLU (read 1, write 1); backward: ReLU reads dy and its output, writes dz (3B);
        # the add's gradient is dz itself (no traffic).
        fwd = 3 * B + 2 * B + (3 * B if s.residual else 0)
        bwd = 5 * B + 3 * B
        return fwd, bwd
    if provider == "torch_compile":
        # Inductor: statistics kernel reads x (B); pointwise kernel reads x (+ residual),
        # writes y (2B [+B]).  Backward: a reduction reads dy, x and the saved output (for the
        # ReLU mask) (3B); a pointwise kernel reads them again and writes dx (+ dresidual).
        fwd = 3 * B + (B if s.residual else 0)
        bwd = 3 * B + 4 * B + (B if s.residual else 0)
        return fwd, bwd
    raise ValueError(provider)


def build(provider: str, block: str, c: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net(block, c)
    if provider == "fused":
        return bntriton.convert_model(model, fuse=True)
    if provider == "bntriton":
        return bntriton.convert_model(model)
    if provider == "torch_compile":
        return torch.compile(model)
    return model


def kept_bytes(model: nn.Module, x: torch.Tensor) -> int:
    kept, out = saved_bytes(model, x)
    out.sum().backward()  # the graph must be usable (and is freed after)
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown report here too")
    parser.add_argument("--no-compile", action="store_true", help="skip torch_compile (needs a C++ compiler)")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--c", type=int, default=64)
    parser.add_argument("--hw", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("BNTRITON_CPU_BACKEND", "interpreter")
    providers = ["fused", "bntriton", "torch"] + ([] if args.no_compile else ["torch_compile"])
    x = torch.randn(args.n, 3, args.hw, args.hw)
    elem = x.element_size()
    B = args.n * args.c * args.hw * args.hw * elem
    lines = [
        "# Fused epilogues: bytes kept for backward and bytes moved per pass",
        "",
        f"Generated by `python perf/fused_memory.py` (torch {torch.__version__}, CPU). Input "
        f"({args.n}, 3, {args.hw}, {args.hw}) fp32; blocks at C = {args.c} channels (Bottleneck: "
        f"{args.c // 4} inside); B = {B} bytes, one {args.c}-channel activation. Counts, not timings.",
        "",
        "## Bytes kept for backward (measured: distinct saved storages, whole network)",
        "",
        "| block | provider | bytes kept | in units of B | vs torch eager |",
        "|---|---|---:|---:|---:|",
    ]
    kept = {}
    for block in ("basic", "bottleneck"):
        for provider in providers:
            try:
                kept[block, provider] = kept_bytes(build(provider, block, args.c), x)
            except Exception as error:  # report, don't hide: a provider that fails shows why
                kept[block, provider] = None
                print(f"{block}/{provider}: {type(error).__name__}: {error}", file=sys.stderr)
        for provider in providers:
            k = kept[block, provider]
            base = kept.get((block, "torch"))
            if k is None:
                lines.append(f"| {block} | {provider} | error | | |")
            else:
                lines.append(f"| {block} | {provider} | {k} | {k / B:.3f} | {k / base:.3f} |")
    lines += [
        "",
        "## Bytes moved per pass (model: BN [+ add] + ReLU sites, convolutions left out)",
        "",
        "| block | provider | forward bytes | backward bytes | fwd / B | bwd / B |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for block in ("basic", "bottleneck"):
        for provider in ["fused", "bntriton", "torch", "torch_compile"]:
            fwd = bwd = 0
            for s in sites(block, args.n, args.c, args.hw, elem):
                f, b = site_traffic(provider, s)
                fwd, bwd = fwd + f, bwd + b
            note = " (model of Inductor)" if provider == "torch_compile" else ""
            lines.append(f"| {block} | {provider}{note} | {fwd} | {bwd} | {fwd / B:.3f} | {bwd / B:.3f} |")
    lines += [
        "",
        "## In-place activated batch norm (leaky_relu), one layer on a (N, C, H, W) activation",
        "",
        "Alone, and followed by a 1x1 convolution (which keeps its input, the layer's output: the",
        "case in a network). Distinct storages, the layer's input storage included.",
        "",
        "| layer | alone | followed by a conv | conv alone |",
        "|---|---:|---:|---:|",
    ]
    layer_x = torch.randn(args.n, args.c, args.hw, args.hw)
    conv = nn.Conv2d(args.c, args.c, 1, bias=False)
    conv_weight = conv.weight.numel() * elem
    for name, make in (
        ("torch eager BN + leaky_relu", lambda: nn.Sequential(nn.BatchNorm2d(args.c), nn.LeakyReLU())),
        ("bntriton fused, out of place", lambda: bntriton.BatchNormAct2d(args.c, activation="leaky_relu")),
        ("bntriton in-place ABN", lambda: bntriton.BatchNormAct2d(args.c, activation="leaky_relu", inplace=True)),
    ):
        row = []
        for tail in (None, conv):
            layer = make()
            leaf = layer_x.clone().requires_grad_()
            step = (lambda t: layer(t)) if tail is None else (lambda t: tail(layer(t)))
            k, out = saved_bytes(lambda: step(leaf * 1.0))
            out.sum().backward()
            row.append(f"{k} ({k / B:.3f} B)")
        lines.append(f"| {name} | {row[0]} | {row[1]} | {conv_weight} (weight) + B |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
