"""Bytes moved and kernel launches per pass, under the plan a given GPU would choose.

Batch norm is memory-bound: a pass's time on a GPU is, to first order, the bytes its
kernels load and store over the memory bandwidth, plus a few microseconds per launch.
Both can be counted exactly without a GPU.  The kernels run in Triton's interpreter on
CPU tensors, tiled and split as a GPU with ``--sm-count`` SMs would tile them (132: an
H100 SXM), and every load, store and atomic the interpreter executes is counted: the
bytes of the distinct addresses each load or store instruction touches under its mask (a
broadcast load of one scalar counts once; an atomic counts as a load and a store),
summed over all programs of all launches.  Launches are the Triton kernels started plus
any torch operation that would start a kernel on a GPU (allocations and views start
none), per call once the process is warm: the arrival counters' one-time zeroing is not
counted.

The floor is the large tensors once (B = the input's bytes): ``fwd_train`` 2B (read x,
write y), ``bwd_train`` 3B (read x and dy, write dx), ``fwd_eval`` 2B, ``bwd_eval`` 3B
(the backward of an eval forward: layers frozen in eval mode while the rest trains).  ``moved / floor``
above 1 is what a pass spends beyond one read of each input and one write of each output:
the split path's second read of x (1.5 / 1.67), partial sums, per-channel vectors.  The
counts are deterministic; tests/test_traffic.py pins them.

    python perf/traffic.py                                   # the default table (H100 plans)
    python perf/traffic.py --shape 8,256,28,28 --layout nhwc --dtype bf16 --sm-count 108

Each shape takes a few seconds (the interpreter runs every program of every launch).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bntriton  # noqa: E402
from bntriton.kernels import counters, plans, runtime  # noqa: E402

PASSES = ("fwd_train", "bwd_train", "fwd_eval", "bwd_eval")
FLOOR_TENSORS = {"fwd_train": 2, "bwd_train": 3, "fwd_eval": 2, "bwd_eval": 3}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
LAYOUTS = ("nchw", "nhwc")
H100_SMS = 132

# The shapes the tests pin: the split path in both layouts, the single-read path, and a
# BatchNorm1d problem.  Small enough for the interpreter, large enough that each runs
# the many-split grids of a real GPU (a few seconds each).
DEFAULT_CASES = (
    ((4, 64, 56, 56), "nchw", "fp32"),
    ((16, 256, 14, 14), "nchw", "fp32"),
    ((4, 64, 56, 56), "nhwc", "fp32"),
    ((4, 64, 56, 56), "nhwc", "bf16"),
    ((8192, 128), "nchw", "fp32"),
)

# aten operations that start no kernel on a GPU: allocations, views, metadata.
_NO_KERNEL = (
    "empty", "new_empty", "empty_strided", "new_empty_strided", "empty_like", "view", "_unsafe_view",
    "as_strided", "detach", "alias", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze",
    "select", "slice", "lift_fresh", "_reshape_alias", "is_same_size", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "size", "stride", "_local_scalar_dense",
)


@dataclass
class Traffic:
    """What one pass loaded, stored and launched."""

    loaded: int = 0
    stored: int = 0
    launches: list = field(default_factory=list)
    floor: int = 0

    @property
    def moved(self) -> int:
        return self.loaded + self.stored

    @property
    def ratio(self) -> float:
        return self.moved / self.floor


class _TorchLaunches(TorchDispatchMode):
    """Records the torch operations (outside Triton launches) that would start a kernel."""

    def __init__(self, traffic: Traffic, inside: list):
        super().__init__()
        self.traffic, self.inside = traffic, inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside[0] and name not in _NO_KERNEL:
            self.traffic.launches.append(f"torch.{name}")
        return func(*args, **(kwargs or {}))


def _touched_bytes(ptrs, mask) -> int:
    """Bytes of the distinct addresses one load / store touches under its mask."""
    element_bytes = ptrs.get_element_ty().primitive_bitwidth // 8
    addresses = np.asarray(ptrs.data).ravel()
    active = np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data)).ravel()
    return np.unique(addresses[active]).size * element_bytes


def _argument_reader(method, pointers: str = "ptrs"):
    """``(self, *args, **kwargs) -> {name: value}`` for ``method``'s parameters, checking up
    front that it takes the pointers (``pointers``) and ``mask`` the byte count reads."""
    signature = inspect.signature(method)
    missing = {pointers, "mask"} - set(signature.parameters)
    if missing:
        raise RuntimeError(f"this Triton's interpreter {method.__qualname__}{signature} has no "
                           f"{sorted(missing)}: perf/traffic.py cannot count its bytes")
    return lambda *args, **kwargs: signature.bind(*args, **kwargs).arguments


@contextlib.contextmanager
def counting(traffic: Traffic):
    """Count every interpreted load / store and every launch into ``traffic``."""
    from triton.runtime.interpreter import InterpreterBuilder

    original_load = InterpreterBuilder.create_masked_load
    original_store = InterpreterBuilder.create_masked_store
    original_atomic = InterpreterBuilder.create_atomic_rmw
    original_getitem = runtime.DualKernel.__getitem__
    inside = [False]

    # The hooks forward whatever they are given: the builder methods' signatures change
    # between Triton releases (3.6: cache_modifier, eviction_policy; 3.9: cache_policy).
    # Only the pointers and the mask are read, by name, from the original's signature.
    load_arguments = _argument_reader(original_load)
    store_arguments = _argument_reader(original_store)
    atomic_arguments = _argument_reader(original_atomic, pointers="ptr")

    def load(self, *args, **kwargs):
        arguments = load_arguments(self, *args, **kwargs)
        traffic.loaded += _touched_bytes(arguments["ptrs"], arguments["mask"])
        return original_load(self, *args, **kwargs)

    def store(self, *args, **kwargs):
        arguments = store_arguments(self, *args, **kwargs)
        traffic.stored += _touched_bytes(arguments["ptrs"], arguments["mask"])
        return original_store(self, *args, **kwargs)

    def atomic(self, *args, **kwargs):
        # A read-modify-write (the arrival counters, kernels/counters.py): loaded and stored.
        arguments = atomic_arguments(self, *args, **kwargs)
        touched = _touched_bytes(arguments["ptr"], arguments["mask"])
        traffic.loaded += touched
        traffic.stored += touched
        return original_atomic(self, *args, **kwargs)

    def getitem(kernel, grid):
        launch = original_getitem(kernel, grid)

        def counted(*args, **meta):
            traffic.launches.append(kernel.fn.__name__)
            inside[0] = True
            try:
                return launch(*args, **meta)
            finally:
                inside[0] = False

        return counted

    InterpreterBuilder.create_masked_load = load
    InterpreterBuilder.create_masked_store = store
    InterpreterBuilder.create_atomic_rmw = atomic
    runtime.DualKernel.__getitem__ = getitem
    try:
        with _TorchLaunches(traffic, inside):
            yield traffic
    finally:
        InterpreterBuilder.create_masked_load = original_load
        InterpreterBuilder.create_masked_store = original_store
        InterpreterBuilder.create_atomic_rmw = original_atomic
        runtime.DualKernel.__getitem__ = original_getitem


def _module_for(shape):
    dims = len(shape)
    cls = {2: bntriton.BatchNorm1d, 3: bntriton.BatchNorm1d, 4: bntriton.BatchNorm2d, 5: bntriton.BatchNorm3d}[dims]
    return cls(shape[1])


def _input(shape, layout: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0 + 0.5).to(dtype)
    if layout == "nhwc" and len(shape) >= 3:
        # Channels last for any rank: C becomes the innermost (stride 1) dimension.
        order = (0, *range(2, len(shape)), 1)
        x = x.permute(order).contiguous().permute(np.argsort(order).tolist())
    return x


def measure(shape, layout: str = "nchw", dtype: str = "fp32", sm_count: int = H100_SMS,
            passes=PASSES) -> dict:
    """``{pass: Traffic}`` for one shape, planned for a GPU with ``sm_count`` SMs."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    torch_dtype = DTYPES[dtype]
    x = _input(tuple(shape), layout, torch_dtype)
    floor_unit = x.numel() * x.element_size()
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=g).to(torch_dtype).to(memory_format=torch.preserve_format)
    dy = torch.empty_like(x).copy_(dy)
    module = _module_for(shape)
    results = {}
    # The arrival counters (kernels/counters.py) are allocated and zeroed once per device
    # and stream, on first use, not per call: allocated here, outside the counts.
    counters.arrival_counters(x, 1)
    with bntriton.cpu_backend("interpreter"), plans.planned_for(sm_count):
        if "fwd_train" in passes or "bwd_train" in passes:
            module.train()
            x_grad = x.clone().requires_grad_()
            results["fwd_train"] = traffic = Traffic(floor=FLOOR_TENSORS["fwd_train"] * floor_unit)
            with counting(traffic):
                y = module(x_grad)
            if "bwd_train" in passes:
                results["bwd_train"] = traffic = Traffic(floor=FLOOR_TENSORS["bwd_train"] * floor_unit)
                with counting(traffic):
                    y.backward(dy)
        if "fwd_eval" in passes:
            module.eval()
            results["fwd_eval"] = traffic = Traffic(floor=FLOOR_TENSORS["fwd_eval"] * floor_unit)
            with torch.no_grad(), counting(traffic):
                module(x)
        if "bwd_eval" in passes:
            module.eval()
            module.zero_grad(set_to_none=True)  # autograd would add into the training pass's gradients
            y = module(x.clone().requires_grad_())
            results["bwd_eval"] = traffic = Traffic(floor=FLOOR_TENSORS["bwd_eval"] * floor_unit)
            with counting(traffic):
                y.backward(dy)
    return {p: results[p] for p in passes}


def _shape(text: str) -> tuple:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=_shape, action="append", help="N,C[,spatial...] (repeatable)")
    parser.add_argument("--layout", choices=LAYOUTS, default="nchw", help="with --shape")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="with --shape")
    parser.add_argument("--sm-count", type=int, default=H100_SMS, help="SMs of the GPU to plan for")
    parser.add_argument("--launches", action="store_true", help="also list the kernels each pass starts")
    args = parser.parse_args(argv)
    cases = [(s, args.layout, args.dtype) for s in args.shape] if args.shape else DEFAULT_CASES

    print(f"moved / floor [launches], kernels planned for {args.sm_count} SMs")
    print("| shape | layout | dtype | path | " + " | ".join(PASSES) + " |")
    print("|---|---|---|---|" + "---|" * len(PASSES))
    for shape, layout, dtype in cases:
        result = measure(shape, layout, dtype, args.sm_count)
        path = "single-read" if any("fused" in k for k in result["fwd_train"].launches) else "split"
        cells = [f"{t.ratio:.4f} [{len(t.launches)}]" for t in result.values()]
        print(f"| {'x'.join(map(str, shape))} | {layout} | {dtype} | {path} | " + " | ".join(cells) + " |")
        if args.launches:
            for name, t in result.items():
                print(f"|   {name}: {', '.join(t.launches)} |")


if __name__ == "__main__":
    main()
