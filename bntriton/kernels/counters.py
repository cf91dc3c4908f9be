"""Arrival counters: a reduction's last program combines its partial results itself.

A split reduction writes one partial result per program, and something has to merge them
in a fixed order.  A second launch costs ~12 us of host time on a GPU (perf/NOTES.md,
section 11), more than a small batch norm's kernels take, so the programs count
themselves instead: each writes its partial result, then adds one to its channel block's
counter (an atomic with acquire-release ordering), and the program that sees the count
reach the block's number of programs knows every partial of that block is written and
visible to it.  That program merges them, in the same fixed order a combine launch
would (deterministic: the same bits whichever program arrives last), and sets the
counter back to zero.  One counter per channel block keeps the merges parallel: every
block's last program merges its own channels.

**The counters cost no launch.**  They live in one int32 buffer per device and stream,
zeroed once when first needed (or grown) and reused by every later launch: a launch
leaves every counter it used at zero again, so the next launch finds them zeroed.
Launches on one stream run one after another, so two never share counters; launches on
different streams (which may overlap) get different buffers.  A CUDA graph keeps the
buffer of the stream it was captured on: replays run in stream order like any launch,
but an eager launch on that stream overlapping a replay of the graph on another stream
would share its counters.

**Ordering on a GPU.**  A program's partial results are stored by all of its threads,
and the counter is bumped by one: a barrier first orders every thread's stores before
the bump, whose release makes them visible at device scope; the last program's acquire
(the same atomic) makes the other programs' stores visible to it, and the broadcast of
the atomic's result to its threads orders their loads after it (the pattern of a
cooperative grid barrier).  No float atomics: the counters only say who merges.
Triton's interpreter runs programs one after another, so there the last program of a
block is the one with the largest split index, and its merge runs on the real data.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .plans import next_power_of_2

_BUFFERS: dict = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_MIN_COUNTERS = 1024


def arrival_counters(like: torch.Tensor, count: int) -> torch.Tensor:
    """A buffer of at least ``count`` zeroed int32 counters on ``like``'s device, for
    launches on its current stream (see the module docstring); allocated on first use.
    While a graph is traced (``like`` a fake or functional tensor: torch.compile's view
    of the ops), the graph allocates zeroed counters of its own: a cached buffer would
    be a fake one, and Inductor schedules the graph's launches itself."""
    if type(like) not in _PLAIN:
        return like.new_zeros(count, dtype=torch.int32)
    if like.is_cuda:
        device = like.get_device()
        key = (device, torch._C._cuda_getCurrentRawStream(device))
    else:
        key = (like.device.type, 0)
    counters = _BUFFERS.get(key)
    if counters is None or counters.numel() < count:
        counters = _BUFFERS[key] = torch.zeros(
            max(next_power_of_2(count), _MIN_COUNTERS), dtype=torch.int32, device=like.device
        )
    return counters


@triton.jit
def arrived_last(counter_ptr, programs):
    """Count this program's arrival at ``counter_ptr``; True in the last of ``programs``
    programs to arrive, which then finds every other program's stores visible and the
    counter set back to zero for the next launch."""
    # Every thread's stores of the partial results before the one thread's atomic.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = arrived == programs - 1
    if last:
        tl.store(counter_ptr, 0)
    return last
