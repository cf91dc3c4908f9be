"""GPU time per kernel of one bntriton training forward and backward (torch.profiler).

    python perf/kernel_breakdown.py            # the sweep's largest channels-last and NCHW shapes
    python perf/kernel_breakdown.py --fused    # also BN + add + ReLU (fused, and torch's composition)

Prints, per shape and pass, each kernel's name and median device time over a few calls,
and the same for torch's batch norm: where a pass's time goes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bntriton  # noqa: E402
from bntriton.functional import batch_norm_act  # noqa: E402

SHAPES = [
    ((256, 64, 112, 112), torch.channels_last, torch.bfloat16),
    ((256, 256, 56, 56), torch.contiguous_format, torch.float32),
    ((256, 2048, 7, 7), torch.contiguous_format, torch.bfloat16),
    ((8, 256, 8, 14, 14), torch.contiguous_format, torch.float32),
]
# ResNet-50's training step at batch 64 (perf/resnet50_step.py), for --fused.
FUSED_SHAPES = [
    ((64, 256, 56, 56), torch.channels_last, torch.bfloat16),
    ((64, 2048, 7, 7), torch.channels_last, torch.bfloat16),
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


def _bn_add_relu_torch(x, rm, rv, w, b, training, momentum, eps, residual):
    return F.relu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps) + residual)


def _bn_add_relu_fused(x, rm, rv, w, b, training, momentum, eps, residual):
    return batch_norm_act(x, rm, rv, w, b, training, momentum, eps,
                                   activation="relu", residual=residual)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fused", action="store_true", help="also BN + add + ReLU, fused and torch's composition")
    fused = parser.parse_args(argv).fused
    for shape, memory_format, dtype in SHAPES + (FUSED_SHAPES if fused else []):
        x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype).contiguous(memory_format=memory_format)
        c = shape[1]
        w = (torch.rand(c, device="cuda") + 0.5).requires_grad_()
        b = torch.randn(c, device="cuda").requires_grad_()
        xg = x.detach().requires_grad_()
        dy = torch.randn_like(x)
        residual = torch.randn_like(x)
        impls = [("bntriton", bntriton.batch_norm, ()), ("torch", F.batch_norm, ())]
        if fused:
            impls += [("bntriton BN+add+ReLU", _bn_add_relu_fused, (residual,)),
                      ("torch BN+add+ReLU", _bn_add_relu_torch, (residual,))]
        for label, impl, extra in impls:
            rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
            fwd = kernel_times(lambda: impl(x, rm, rv, w, b, True, 0.1, 1e-5, *extra))
            y = impl(xg, rm, rv, w, b, True, 0.1, 1e-5, *extra)
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
