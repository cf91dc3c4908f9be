"""How the sweep turns a callable into milliseconds, and milliseconds into a fraction of
the device's copy bandwidth (GUIDE section 4).

* Batch norm is memory-bound, so every time is reported against the *floor bytes* of its
  pass (:func:`floor_bytes`) and against a device-to-device copy measured in the same run
  (:func:`copy_bandwidth`).
* On CUDA, :class:`CudaTimer` uses ``triton.testing.do_bench``'s median.  do_bench zeroes a
  256 MB buffer before every timed repetition (outside the timed events), which evicts the
  previous repetition's data from an L2 of 50-60 MB: each repetition reads x from HBM, as
  a layer inside a network does.
* On CPU (the smoke path only) :class:`WallTimer` takes the median of a few wall-clock
  runs.  Those numbers time Triton's interpreter and mean nothing as performance.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # an H100's L2; used when the device does not say


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def floor_bytes(pass_: str, x_bytes: int, l2: int) -> int:
    """The fewest bytes a pass must move through device memory; ``x_bytes`` is B.

    fwd_train: read x for the statistics, read it again to normalize, write y: 3B; the
    second read comes from L2 when x fits there, so 2B.  bwd_train: read x and dy for
    sum(dy) and sum(dy * x_hat), read both again for dx, write dx: 5B; 3B when the second
    reads (x and dy, 2B) hit L2.  fwd_eval: read x, write y: 2B.  Per-channel vectors are
    O(C) and left out.  "Fits" compares the bytes that are read twice with the L2 size
    (B for the forward, 2B for the backward).
    """
    if pass_ == "fwd_train":
        return 2 * x_bytes if x_bytes <= l2 else 3 * x_bytes
    if pass_ == "bwd_train":
        return 3 * x_bytes if 2 * x_bytes <= l2 else 5 * x_bytes
    if pass_ == "fwd_eval":
        return 2 * x_bytes
    raise KeyError(pass_)


class CudaTimer:
    """Median of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run)."""

    name = "do_bench"

    def __init__(self, warmup_ms: float = 10, rep_ms: float = 50):
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms

    def __call__(self, fn: Callable[[], object]) -> float:
        import inspect

        from triton.testing import do_bench

        if "return_mode" in inspect.signature(do_bench).parameters:
            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        # An older Triton without return_mode: its 0.5 quantile is the median.
        return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5])[0])


class WallTimer:
    """Median wall-clock milliseconds of ``reps`` calls after one warm-up (CPU smoke only)."""

    name = "wall clock"

    def __init__(self, reps: int = 3):
        self.reps = reps

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer, nbytes: Optional[int] = None) -> tuple[float, int, float]:
    """(ms, bytes moved, GB/s) of one large device-to-device copy: bytes read plus written.

    1 GiB each way on a GPU: far beyond L2, long enough (~0.7 ms at 3 TB/s) that launch
    cost is noise.  The CPU smoke path copies 16 MiB; its number is only a placeholder
    that keeps the pct_copy_bw arithmetic exercised.
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**24
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    moved = 2 * nbytes
    return ms, moved, moved / (ms * 1e-3) / 1e9


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9
