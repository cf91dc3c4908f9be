"""Where a small batch norm's host time goes on a GPU machine: wall time per call of
bntriton and torch on a tiny CUDA tensor (host-bound: the kernels take microseconds),
one bare Triton launch, each with bntriton's direct launches and through Triton's own
launch path (best of 5 interleaved rounds), and a cProfile of bntriton's calls.

    python perf/host_profile.py [--calls 2000]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bntriton  # noqa: E402


ROUNDS = 5


def per_call_us(fn, calls):
    """Wall time per call of ``fn`` after 20 warm-up calls, synchronized at the end (on a
    machine without a GPU, just the calls)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(20):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    dev = "cuda"
    x = torch.randn(8, 64, 4, 4, device=dev)
    w, b = torch.rand(64, device=dev) + 0.5, torch.randn(64, device=dev)
    rm, rv = torch.zeros(64, device=dev), torch.ones(64, device=dev)
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)

    cases = {
        "train fwd": (lambda: bntriton.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                      lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)),
        "eval fwd": (lambda: bntriton.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
                     lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)),
        "train fwd+bwd": (lambda: bntriton.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5).backward(dy),
                          lambda: F.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5).backward(dy)),
    }
    from bntriton.kernels import runtime, stats

    mean, var = torch.randn(64, device=dev), torch.rand(64, device=dev)
    launch = lambda: stats.update_running_stats(rm, rv, None, mean, var, 0.1)  # noqa: E731
    direct = runtime._DIRECT_ENABLED
    print("| pass | bntriton us/call (direct launches) | bntriton us/call (Triton's launch path) "
          "| torch us/call | ratio (direct) |\n|---|---|---|---|---|")
    for name, (ours, theirs) in [*cases.items(), ("one bare launch (running-stats update, 8 arguments)",
                                                  (launch, None))]:
        # Interleaved rounds, best of each: whichever ran first used to pay for the
        # process's warm-up (allocator growth, autograd's device thread) in its number.
        fast = slow = t = float("inf")
        calls = max(args.calls // ROUNDS, 1)
        for _ in range(ROUNDS):
            runtime._DIRECT_ENABLED = True
            fast = min(fast, per_call_us(ours, calls))
            runtime._DIRECT_ENABLED = False
            slow = min(slow, per_call_us(ours, calls))
            runtime._DIRECT_ENABLED = direct
            t = min(t, per_call_us(theirs, calls)) if theirs is not None else float("nan")
        print(f"| {name} | {fast:.1f} | {slow:.1f} | {t:.1f} | {fast / t:.2f} |", flush=True)

    for name, (ours, _) in cases.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            ours()
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
        print(f"\n## cProfile, 300 calls: {name}\n")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
