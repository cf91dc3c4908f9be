"""The shapes the sweep measures, grouped into suites, and the layouts and dtypes of each.

A *case* is one input: (suite, shape, memory layout, dtype).  Every case is timed for
every pass and provider the sweep is asked for.  Three sizes of each suite:

* ``full``  : the shapes the suite stands for (what results/ should hold);
* ``quick`` : a few of them, chosen to span the range (small / large tensor, both
  layouts), so that a whole quick sweep runs in a couple of minutes on one GPU;
* ``smoke`` : tiny shapes of the same ranks and layouts, for the CPU tooling test only:
  they go through Triton's interpreter and their timings mean nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Dict, List, Sequence, Tuple

import torch

from schema import SUITES

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}

MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}


@dataclass(frozen=True)
class Case:
    suite: str
    shape: Tuple[int, ...]
    layout: str  # a key of MEMORY_FORMATS
    dtype: torch.dtype

    @property
    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @property
    def dtype_str(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """B of the floor-bytes formulas: the bytes of x."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def values_per_channel(self) -> int:
        return self.numel // self.shape[1]

    @property
    def label(self) -> str:
        return f"{self.suite} {self.shape_str} {self.layout} {self.dtype_str}"


# ResNet-50: the distinct (C, H, W) of its 53 batch-norm layers (conv1's 64x112x112, then
# the four stages' bottleneck widths and outputs at 56, 28, 14 and 7 pixels).
RESNET50_CHW = [
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56),
    (128, 28, 28), (512, 28, 28), (256, 28, 28),
    (256, 14, 14), (1024, 14, 14), (512, 14, 14),
    (512, 7, 7), (2048, 7, 7),
]
RESNET50_BATCH = 256  # its usual training batch on one large GPU; the sweep halves it if memory is short

MLP_NC = [(8192, 1024), (32768, 2048), (65536, 512), (4096, 8192)]

# 3-D video nets (R(2+1)D / SlowFast-like stages): N=8 clips, time shrinking with depth.
VIDEO3D_NCDHW = [(8, 64, 16, 56, 56), (8, 128, 8, 28, 28), (8, 256, 8, 14, 14), (8, 512, 4, 7, 7)]

# Small batch, many channels: detection / segmentation fine-tuning, per-GPU batches of 2..8.
# Few values per channel (4x7x7 = 196, or 8 for the 1-D case) make these latency-bound.
SMALL_BATCH = [(4, 2048, 7, 7), (2, 1024, 14, 14), (8, 4096), (8, 512, 28, 28)]

TWO_DTYPES = (torch.bfloat16, torch.float32)


def _layouts(rank: int) -> Sequence[str]:
    """Both memory formats a real network feeds batch norm for this rank."""
    if rank == 4:
        return ("contiguous", "channels_last")
    if rank == 5:
        return ("contiguous", "channels_last_3d")
    return ("contiguous",)  # (N, C): already channels-last in memory


def _all(suite: str, shapes, dtypes=TWO_DTYPES) -> List[Case]:
    return [Case(suite, tuple(shape), layout, dtype)
            for shape, dtype in product(shapes, dtypes)
            for layout in _layouts(len(shape))]


def full_cases(suite: str, resnet_batch: int = RESNET50_BATCH) -> List[Case]:
    if suite == "resnet50":
        return _all(suite, [(resnet_batch, *chw) for chw in RESNET50_CHW])
    if suite == "mlp":
        return _all(suite, MLP_NC)
    if suite == "video3d":
        return _all(suite, VIDEO3D_NCDHW)
    if suite == "small_batch":
        return _all(suite, SMALL_BATCH)
    raise KeyError(suite)


def quick_cases(suite: str, resnet_batch: int = RESNET50_BATCH) -> List[Case]:
    """A few cases per suite: the largest and smallest tensors, each layout and dtype once."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if suite == "resnet50":
        n = resnet_batch
        return [
            Case(suite, (n, 64, 112, 112), "channels_last", bf16),
            Case(suite, (n, 256, 56, 56), "contiguous", fp32),
            Case(suite, (n, 1024, 14, 14), "channels_last", bf16),
            Case(suite, (n, 2048, 7, 7), "contiguous", bf16),
        ]
    if suite == "mlp":
        return [Case(suite, (32768, 2048), "contiguous", bf16), Case(suite, (8192, 1024), "contiguous", fp32)]
    if suite == "video3d":
        return [Case(suite, (8, 64, 16, 56, 56), "channels_last_3d", bf16),
                Case(suite, (8, 256, 8, 14, 14), "contiguous", fp32)]
    if suite == "small_batch":
        return [Case(suite, (4, 2048, 7, 7), "channels_last", bf16), Case(suite, (8, 4096), "contiguous", fp32)]
    raise KeyError(suite)


def smoke_cases(suite: str) -> List[Case]:
    """Tiny stand-ins with each suite's rank and layouts (interpreter-sized: well under a
    second each)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if suite == "resnet50":
        return [Case(suite, (2, 8, 4, 4), "contiguous", fp32), Case(suite, (2, 8, 4, 4), "channels_last", bf16)]
    if suite == "mlp":
        return [Case(suite, (32, 16), "contiguous", fp32)]
    if suite == "video3d":
        return [Case(suite, (2, 4, 2, 3, 3), "channels_last_3d", fp32)]
    if suite == "small_batch":
        return [Case(suite, (2, 32, 3, 3), "contiguous", bf16)]
    raise KeyError(suite)


def cases_for(suite: str, mode: str, resnet_batch: int = RESNET50_BATCH) -> List[Case]:
    if mode == "smoke":
        return smoke_cases(suite)
    if mode == "quick":
        return quick_cases(suite, resnet_batch)
    return full_cases(suite, resnet_batch)


def sweep_order(suite_names: Sequence[str], mode: str, resnet_batch: int = RESNET50_BATCH) -> List[Case]:
    """The cases of these suites in the order a sweep runs them.  A full sweep starts with
    the quick cases, then takes the suites in turn, one case each, so that a run stopped by
    ``--max-minutes`` has measured every suite about equally, and the quick preset first."""
    per_suite = [cases_for(s, mode, resnet_batch) for s in suite_names]
    if mode != "full":
        return [c for cases in per_suite for c in cases]
    first = [c for s in suite_names for c in quick_cases(s, resnet_batch)]
    rest = [[c for c in cases if c not in first] for cases in per_suite]
    turns = [cases[i] for i in range(max(map(len, rest), default=0)) for cases in rest if i < len(cases)]
    return first + turns


def suite_table() -> Dict[str, List[Case]]:
    """Every full case, for documentation (NOTES.md's floor-bytes table)."""
    return {suite: full_cases(suite) for suite in SUITES}
