"""GPU time per kernel of one bntriton training forward and backward (torch.profiler).

    python perf/kernel_breakdown.py            # the sweep's largest channels-last and NCHW shapes

Prints, per shape and pass, each kernel's name and median device time over a few calls,
and the same for torch's batch norm: where a pass's time goes.
"""
from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bntriton  # noqa: E402

SHAPES = [
    ((256, 64, 112, 112), torch.channels_last, torch.bfloat16),
    ((256, 256, 56, 56), torch.contiguous_format, torch.float32),
    ((256, 2048, 7, 7), torch.contiguous_format, torch.bfloat16),
    ((8, 256, 8, 14, 14), torch.contiguous_format, torch.float32),
]
CALLS = 5


def kernel_times(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name].append(event.device_time)
    return {name[:60]: (len(v) // CALLS, statistics.median(v)) for name, v in times.items()}


def main() -> int:
    for shape, memory_format, dtype in SHAPES:
        x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype).contiguous(memory_format=memory_format)
        c = shape[1]
        w = (torch.rand(c, device="cuda") + 0.5).requires_grad_()
        b = torch.randn(c, device="cuda").requires_grad_()
        xg = x.detach().requires_grad_()
        dy = torch.randn_like(x)
        for label, impl in (("bntriton", bntriton.batch_norm), ("torch", F.batch_norm)):
            rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
            fwd = kernel_times(lambda: impl(x, rm, rv, w, b, True, 0.1, 1e-5))
            y = impl(xg, rm, rv, w, b, True, 0.1, 1e-5)
            bwd = kernel_times(lambda: torch.autograd.grad(y, (xg, w, b), dy, retain_graph=True))
            for pass_, table in (("fwd_train", fwd), ("bwd_train", bwd)):
                total = sum(n * t for n, t in table.values())
                print(f"{label} {'x'.join(map(str, shape))} {str(dtype)[6:]} {pass_}: {total:.1f} us")
                for name, (n, t) in sorted(table.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
                    print(f"    {n} x {t:8.1f} us  {name}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
