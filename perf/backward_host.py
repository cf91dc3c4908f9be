"""Host time of a small training backward on a GPU, with autograd's device threads on and off.

    python perf/backward_host.py [--calls 1000]

On CUDA tensors autograd runs the backward on a worker thread per device, and the calling
thread waits for it: a handoff that a CPU backward does not pay.  This times, per call on
an 8x64x4x4 fp32 tensor (the kernels take microseconds, so the times are host time):

* a trivial Python ``autograd.Function`` (forward ``clone``, backward the identity) against
  the same graph made of torch's own ``clone``: what a Python backward adds;
* bntriton's and torch's training forward and backward (``autograd.grad`` with
  ``retain_graph``), the backward also with ``torch.autograd.set_multithreading_enabled(False)``
  (run on the calling thread) and, for bntriton, through Triton's own launch path.

CPU rows are printed too, for comparison (bntriton takes its native CPU path there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bntriton  # noqa: E402
from bntriton.kernels import runtime  # noqa: E402
from host_profile import per_call_us  # noqa: E402  (perf/ is this script's folder)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv)
    print("| device | call | µs |\n|---|---|---:|")
    for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        x = torch.randn(8, 64, 4, 4, device=dev, requires_grad=True)
        dy = torch.randn_like(x)
        w = (torch.rand(64, device=dev) + 0.5).requires_grad_()
        b = torch.randn(64, device=dev).requires_grad_()
        rm, rv = torch.zeros(64, device=dev), torch.ones(64, device=dev)
        rows = [("Python Function fwd + bwd", lambda: torch.autograd.grad(_Identity.apply(x), x, dy)),
                ("torch's clone fwd + bwd", lambda: torch.autograd.grad(x.clone(), x, dy))]
        for name, impl in (("bntriton", bntriton.batch_norm), ("torch", F.batch_norm)):
            y = impl(x, rm, rv, w, b, True, 0.1, 1e-5)
            backward = (lambda y=y: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True))
            rows += [(f"{name} training forward", lambda impl=impl: impl(x, rm, rv, w, b, True, 0.1, 1e-5)),
                     (f"{name} backward", backward)]
            for label, t in rows:
                print(f"| {dev} | {label} | {per_call_us(t, args.calls):.1f} |", flush=True)
            rows = []
            with torch.autograd.set_multithreading_enabled(False):
                print(f"| {dev} | {name} backward, autograd multithreading off | "
                      f"{per_call_us(backward, args.calls):.1f} |", flush=True)
            if name == "bntriton":
                direct = runtime._DIRECT_ENABLED
                runtime._DIRECT_ENABLED = False
                try:
                    print(f"| {dev} | bntriton backward, Triton's launch path | "
                          f"{per_call_us(backward, args.calls):.1f} |", flush=True)
                finally:
                    runtime._DIRECT_ENABLED = direct
    return 0


if __name__ == "__main__":
    sys.exit(main())
