"""Time and check candidate partial-statistics kernels against the current one.

    python perf/stats_variants.py            # GPU: the sweep's large shapes
    python perf/stats_variants.py --smoke    # CPU interpreter: tiny shapes, accuracy only

Per shape and candidate (kernel, tile, warps, programs per SM): the partial kernel's
median time (do_bench), its bandwidth over one read of x, and the error of the mean and
M2 merged from its partials against float64 (mean error / std and M2's relative error,
in fp32 eps).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import triton  # noqa: E402

from bntriton.kernels import plans, stats, stats_variants  # noqa: E402
from bntriton.kernels.layout import channel_view  # noqa: E402
from bntriton.kernels.runtime import accumulator_dtype, tl_accumulator  # noqa: E402

KERNELS = {
    "current": stats._stats_partial_kernel,
    "centred": stats_variants._partial_centred_kernel,
    "lanes": stats_variants._partial_lanes_kernel,
}
FP32_EPS = 2.0**-23

SHAPES = [
    ((256, 64, 112, 112), "channels_last", torch.bfloat16),
    ((256, 256, 56, 56), "contiguous", torch.float32),
    ((256, 1024, 14, 14), "channels_last", torch.bfloat16),
    ((32768, 2048), "contiguous", torch.bfloat16),
    ((8, 64, 16, 56, 56), "channels_last_3d", torch.bfloat16),
    ((256, 2048, 7, 7), "contiguous", torch.bfloat16),
]
SMOKE = [((4, 8, 5, 5), "contiguous", torch.float32), ((6, 16, 3, 3), "channels_last", torch.bfloat16),
         ((300, 24), "contiguous", torch.float32)]


def make_x(shape, layout, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2.0 + 3.0).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def candidates(view, default, sm_count, smoke):
    """(name, kernel, plan) to try."""
    out = [("current", "current", default), ("centred", "centred", default), ("lanes", "lanes", default)]
    if smoke:
        return out
    itemsize = view.tensor.element_size()
    for ppsm in (2, 8):
        p = plans.plan_for.__wrapped__  # uncached: vary the programs per SM
        saved = plans._PROGRAMS_PER_SM
        plans._PROGRAMS_PER_SM = ppsm
        try:
            alt = p(view.rows, view.channels, view.channels_last, view.needs_int64, sm_count, itemsize)
        finally:
            plans._PROGRAMS_PER_SM = saved
        for k in ("centred", "lanes"):
            out.append((f"{k} ppsm{ppsm}", k, alt))
    for warps in (4, 16):
        for k in ("centred", "lanes"):
            out.append((f"{k} w{warps}", k, replace(default, num_warps=warps)))
    # Half and double the rows per tile (same splits).
    for factor in (0.5, 2):
        block_r = max(16, int(default.block_rows * factor))
        alt = plans._with_splits(replace(default, block_rows=block_r, num_splits=default.num_splits), view.rows)
        for k in ("centred", "lanes"):
            out.append((f"{k} r{block_r}", k, alt))
    return out


def launch(kernel, view, plan, bufs):
    pivot, hi, lo, m2 = bufs
    grid = (plan.num_splits, plans.cdiv(view.channels, plan.block_channels))
    kernel[grid](
        view.tensor, pivot, hi, lo, m2,
        view.rows, view.channels, view.spatial, view.stride_n, view.stride_c, view.stride_s,
        plan.rows_per_split,
        BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels,
        SPLIT_ROWS=view.split_rows, INT64=plan.int64, ACC=tl_accumulator(view.tensor.dtype),
        num_warps=plan.num_warps,
    )


def merged_error(view, plan, bufs, ref_mean, ref_m2):
    pivot, hi, lo, m2 = (b.double() for b in bufs)
    rows = view.rows
    counts = torch.tensor([min(plan.rows_per_split, rows - i * plan.rows_per_split) for i in range(plan.num_splits)],
                          dtype=torch.float64, device=hi.device)[:, None]
    sums = hi + lo
    total = sums.sum(0)
    mean_s = total / rows
    m2_total = (m2 + counts * (sums / counts - mean_s) ** 2).sum(0)
    mean = pivot + mean_s
    std = (ref_m2 / rows).sqrt()
    mean_err = ((mean - ref_mean).abs() / std).max().item() / FP32_EPS
    m2_err = ((m2_total - ref_m2).abs() / ref_m2).max().item() / FP32_EPS
    return mean_err, m2_err


def whole_pass_times(x):
    """fwd_train and bwd_train of bntriton.batch_norm with the current kernels and with the
    lane-accumulating ones, and torch's, timed as the sweep times them."""
    import bntriton
    import torch.nn.functional as F

    c = x.shape[1]
    w = (torch.rand(c, device=x.device) + 0.5).requires_grad_()
    b = torch.randn(c, device=x.device).requires_grad_()
    dy = torch.randn_like(x)
    xg = x.detach().requires_grad_()
    results = []
    for label, legacy in (("legacy", True), ("current", False)):
        stats._LEGACY_PARTIAL[0] = legacy
        rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
        fwd = triton.testing.do_bench(lambda: bntriton.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                                      warmup=10, rep=40, return_mode="median")
        y = bntriton.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5)
        bwd = triton.testing.do_bench(lambda: torch.autograd.grad(y, (xg, w, b), dy, retain_graph=True),
                                      warmup=10, rep=40, return_mode="median")
        grads = torch.autograd.grad(y, (xg, w, b), dy)
        results.append((label, fwd, bwd, grads))
    stats._LEGACY_PARTIAL[0] = False
    rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
    fwd = triton.testing.do_bench(lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                                  warmup=10, rep=40, return_mode="median")
    y = F.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(y, (xg, w, b), dy, retain_graph=True),
                                  warmup=10, rep=40, return_mode="median")
    # Gradients against float64 (weight and bias grads, relative to sum|terms| loosely: max rel).
    x64, w64, b64 = x.double().requires_grad_(), w.double().requires_grad_(), b.double().requires_grad_()
    y64 = F.batch_norm(x64, None, None, w64, b64, True, 0.1, 1e-5)
    ref = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    line = f"whole passes {tuple(x.shape)} {x.dtype}: torch fwd {fwd * 1e3:.1f} us, bwd {bwd * 1e3:.1f} us"
    for label, f, bw, grads in results:
        errs = [((g.double() - r).abs().max() / r.abs().max()).item() / FP32_EPS for g, r in zip(grads, ref)]
        line += (f"; {label} fwd {f * 1e3:.1f} us, bwd {bw * 1e3:.1f} us "
                 f"(dx/dw/db err {errs[0]:.1f}/{errs[1]:.1f}/{errs[2]:.1f} fp32 eps)")
    print(line, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    sm_count = 132 if args.smoke else torch.cuda.get_device_properties(0).multi_processor_count
    rows_out = []
    print(f"| shape | layout | dtype | candidate | tile | splits | warps | us | GB/s (1 read) | mean err | M2 err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, layout, dtype in (SMOKE if args.smoke else SHAPES):
        x = make_x(shape, layout, dtype, device)
        view = channel_view(x)
        xd = x.double().transpose(0, 1).reshape(x.shape[1], -1)
        ref_mean = xd.mean(1)
        ref_m2 = ((xd - ref_mean[:, None]) ** 2).sum(1)
        del xd
        with plans.planned_for(sm_count):
            default = plans.plan(view)
        for name, kname, plan in candidates(view, default, sm_count, args.smoke):
            acc = accumulator_dtype(dtype)
            bufs = (torch.empty(view.channels, dtype=acc, device=device),
                    *(torch.empty((plan.num_splits, view.channels), dtype=acc, device=device) for _ in range(3)))
            kernel = KERNELS[kname]
            try:
                launch(kernel, view, plan, bufs)
                errs = merged_error(view, plan, bufs, ref_mean, ref_m2)
                if args.smoke:
                    us = float("nan")
                else:
                    us = 1e3 * triton.testing.do_bench(lambda: launch(kernel, view, plan, bufs), warmup=10, rep=40,
                                                       return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"| {shape} | {layout} | {dtype} | {name} | error: {type(e).__name__}: {str(e)[:200]} |")
                continue
            gbps = x.numel() * x.element_size() / (us * 1e3)
            line = (f"| {'x'.join(map(str, shape))} | {layout} | {str(dtype)[6:]} | {name} | "
                    f"{plan.block_channels}x{plan.block_rows} | {plan.num_splits} | {plan.num_warps} | {us:.1f} | "
                    f"{gbps:.0f} | {errs[0]:.2f} | {errs[1]:.2f} |")
            print(line, flush=True)
            rows_out.append(line)
        if not args.smoke:
            whole_pass_times(x)
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
