"""Single-read kernels for problems whose rows fit on chip.

When every row of a block of channels fits in one tile (small batches, BatchNorm1d on
moderate N, late CNN layers at small batch), one program can hold the whole channel
block in registers: the statistics, the normalization and the output then cost one
read and one write of x (2B instead of 3B), and one launch instead of two.  The
backward likewise reads x and dy once and writes dx (3B instead of 5B).

The numerics are those of the split path (stats.py / backward.py): the same pivot
(``numerics.batch_pivot``), channels x rows tiles summed over their last axis, the mean's
residual and the corrected two-pass variance of ``numerics.tile_moments`` (here over the
whole channel, as the tile is in registers), fp32 or fp64 accumulation.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton.language as tl

from .activations import (
    NO_EPILOGUE, Epilogue, activate, store_mask, through_activation,
)
from .counters import arrival_counters, arrived_last
from .plans import Plan, cdiv
from .runtime import accumulator_dtype, kernel, split_float, tl_accumulator
from .layout import ChannelView
from .stats import BatchStats, RunningStats, _blend_running, _momentum_factor
from .numerics import (
    batch_coefficients, inverse_std, param_grads_and_coefficients, pivot_of_rows, resolve_mean, tile_moments,
)
from .tiles import channel_offsets, channel_tile_offsets


@kernel
def _fused_forward_kernel(
    x_ptr, y_ptr, weight_ptr, bias_ptr, pivot_ptr, mean_s_ptr, rstd_ptr, mean_ptr, var_unbiased_ptr,
    res_ptr, mask_ptr, act_scale_ptr, act_shift_ptr, slope_hi, slope_lo,
    rows, channels, spatial, stride_n, stride_c, stride_s, eps_hi, eps_lo,
    running_mean_ptr, running_var_ptr, num_batches_ptr, momentum_hi, momentum_lo, counters_ptr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr = 0, HAS_RESIDUAL: tl.constexpr = False,
    MASK: tl.constexpr = False, INVERT: tl.constexpr = False,
    HAS_RUNNING: tl.constexpr = False, HAS_COUNTER: tl.constexpr = False, CUMULATIVE: tl.constexpr = False,
    STORE_COEFFICIENTS: tl.constexpr = False,
):
    # y = act(BN(x) [+ residual]) (see activations.py); y_ptr may be x_ptr (in-place):
    # every element is read before any is written.  STORE_COEFFICIENTS: the scale and
    # shift y was formed with go to act_scale_ptr / act_shift_ptr, for the backward to
    # recompute z with (INVERT is the backward's and unused here).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    c_mask = c < channels
    # Python floats arrive as fp32: two parts keep an fp64 slope exact (runtime.split_float).
    slope = (tl.zeros([BLOCK_C], dtype=ACC) + slope_hi) + slope_lo
    offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
    mask = c_mask[:, None] & (r < rows)[None, :]

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    # The pivot from the tile in registers: no second read of the first rows.
    pivot = pivot_of_rows(x, r, mask, rows)
    n = rows + tl.zeros([BLOCK_C], dtype=ACC)
    shifted = tl.where(mask, x - pivot[:, None], 0.0)
    tile_mean, resid, m2 = tile_moments(shifted, mask, n)
    # The tile's sum is n * tile_mean + resid: the product's rounding is the fma's remainder.
    part = n * tile_mean
    mean_s, correction = resolve_mean(part, tl.fma(n, tile_mean, -part) + resid, n)
    rstd, scale, shift = batch_coefficients(m2 / n, mean_s, weight_ptr, bias_ptr, c, c_mask, eps_hi, eps_lo,
                                            BLOCK_C, HAS_WEIGHT, HAS_BIAS, ACC)
    # The split path's epilogue (normalize.py): one rounding for the product and the shift.
    y = tl.fma(shifted, scale[:, None], shift[:, None])
    if HAS_RESIDUAL:
        y = y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MASK:
        # The packed mask is laid out rows x channels (activations.py); the tile is transposed.
        store_mask(mask_ptr, tl.trans((y > 0) & mask), 0, rows, c, c_mask, channels, BLOCK_R, BLOCK_C)
    y = activate(y, slope[:, None], ACTIVATION)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    tl.store(pivot_ptr + c, pivot, mask=c_mask)
    tl.store(mean_s_ptr + c, mean_s, mask=c_mask)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)
    if STORE_COEFFICIENTS:
        tl.store(act_scale_ptr + c, scale, mask=c_mask)
        tl.store(act_shift_ptr + c, shift, mask=c_mask)
    batch_mean = (pivot + mean_s) + correction
    batch_var = m2 / (n - 1.0)
    tl.store(mean_ptr + c, batch_mean, mask=c_mask)
    tl.store(var_unbiased_ptr + c, batch_var, mask=c_mask)
    if HAS_RUNNING:
        # The running-statistics update of these channels, as stats._running_update_kernel
        # does it, a launch less.  The counter is bumped once: by program 0 where no
        # program reads it for the momentum; under CUMULATIVE, where every program reads
        # it, by the last program to finish (kernels/counters.py), after every read.
        tracked, factor = _momentum_factor(num_batches_ptr, momentum_hi, momentum_lo, BLOCK_C,
                                           HAS_COUNTER, CUMULATIVE, ACC)
        _blend_running(running_mean_ptr, batch_mean, factor, c, c_mask, ACC)
        _blend_running(running_var_ptr, batch_var, factor, c, c_mask, ACC)
        if HAS_COUNTER:
            first = c == tl.program_id(0) * BLOCK_C
            if CUMULATIVE:
                if arrived_last(counters_ptr, tl.num_programs(0)):
                    tl.store(num_batches_ptr + tl.zeros([BLOCK_C], dtype=tl.int32), tracked, mask=first)
            else:
                tl.store(num_batches_ptr + tl.zeros([BLOCK_C], dtype=tl.int32), tracked, mask=c == 0)


@kernel
def _fused_backward_kernel(
    x_ptr, dy_ptr, dx_ptr, weight_ptr, pivot_ptr, mean_s_ptr, rstd_ptr, dweight_ptr, dbias_ptr,
    res_ptr, mask_ptr, act_scale_ptr, act_shift_ptr, slope_hi, slope_lo,
    rows, channels, spatial, stride_n, stride_c, stride_s, pivot_stride, eps_hi, eps_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BATCH_STATS: tl.constexpr, SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr = 0, HAS_RESIDUAL: tl.constexpr = False,
    MASK: tl.constexpr = False, INVERT: tl.constexpr = False, RUNNING: tl.constexpr = False,
):
    # dy is first taken through the activation, as in normalize.py's backward epilogue;
    # dz goes to res_ptr when HAS_RESIDUAL.  RUNNING (running statistics, the shifted
    # mean 0): ``rstd_ptr`` holds the running variance, rstd is taken from it here.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    c_mask = c < channels
    # Python floats arrive as fp32: two parts keep an fp64 slope exact (runtime.split_float).
    slope = (tl.zeros([BLOCK_C], dtype=ACC) + slope_hi) + slope_lo
    offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
    mask = c_mask[:, None] & (r < rows)[None, :]

    pivot = tl.load(pivot_ptr + channel_offsets(c, pivot_stride, INT64), mask=c_mask, other=0.0).to(ACC)
    if RUNNING:
        mean_s = tl.zeros([BLOCK_C], dtype=ACC)
        rstd = inverse_std(tl.load(rstd_ptr + c, mask=c_mask, other=1.0).to(ACC), eps_hi, eps_lo, BLOCK_C, ACC)
    else:
        mean_s = tl.load(mean_s_ptr + c, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    # z = (x - K) * act_scale + act_shift, read only when an activation needs z.
    act_scale = tl.full([BLOCK_C], 1.0, ACC)
    act_shift = tl.zeros([BLOCK_C], dtype=ACC)
    if ACTIVATION != 0 or INVERT:
        act_scale = tl.load(act_scale_ptr + c, mask=c_mask, other=1.0).to(ACC)
        act_shift = tl.load(act_shift_ptr + c, mask=c_mask, other=0.0).to(ACC)
    x_k, dy = through_activation(x, dy, pivot, act_scale, act_shift, slope, mask_ptr, r, c, mask, channels,
                                 ACTIVATION, MASK, INVERT)
    dy = tl.where(mask, dy, 0.0)
    if HAS_RESIDUAL:
        tl.store(res_ptr + offs, dy.to(res_ptr.dtype.element_ty), mask=mask)
    centred = tl.where(mask, x_k - mean_s[:, None], 0.0)
    sum_dy = tl.sum(dy, axis=1)
    sum_dyc = tl.sum(dy * centred, axis=1)
    # centred already holds the mean: C's mean_s term is zero here.
    coef_a, coef_b, coef_c = param_grads_and_coefficients(
        sum_dy, sum_dyc, rstd, tl.zeros([BLOCK_C], dtype=ACC), weight_ptr, dweight_ptr, dbias_ptr, c, c_mask,
        c_mask, rows, BLOCK_C, HAS_WEIGHT, BATCH_STATS, ACC)
    if BATCH_STATS:
        dx = tl.fma(dy, coef_a[:, None], tl.fma(centred, coef_b[:, None], coef_c[:, None]))
    else:
        dx = dy * coef_a[:, None]  # not through B = 0: an infinite x must not turn dx into NaN
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def fused_forward(view: ChannelView, plan: Plan, weight, bias, eps: float, epilogue: Epilogue = NO_EPILOGUE,
                  running: RunningStats | None = None, coefficients: bool = False):
    """``(y, BatchStats, updated)`` in one launch; ``plan`` from :func:`launch.fused_plan`.
    ``coefficients``: the stats carry the scale and shift y was formed with (else None).

    With ``running`` given, the same launch updates the running statistics and the counter
    (``updated`` is then True)."""
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    y = epilogue.out if epilogue.out is not None else view.empty_like()
    if epilogue.mask is not None and plan.block_rows < 8:
        plan = replace(plan, block_rows=8)  # the mask packs 8 rows per byte
    per_channel = [x.new_empty(view.channels, dtype=acc) for _ in range(7 if coefficients else 5)]
    pivot, mean_s, rstd, mean, var_unbiased = per_channel[:5]
    scale, shift = per_channel[5:] if coefficients else (None, None)
    if coefficients:
        epilogue = replace(epilogue, act_scale=scale, act_shift=shift)
    programs = cdiv(view.channels, plan.block_channels)
    fold = running is not None
    has_counter = fold and running.num_batches_tracked is not None
    if fold and running.momentum is None and not has_counter:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    cumulative = fold and running.momentum is None
    _fused_forward_kernel[(programs,)](
        x, y, weight if weight is not None else rstd, bias if bias is not None else rstd,
        pivot, mean_s, rstd, mean, var_unbiased, *epilogue.pointers(x, rstd),
        view.rows, view.channels, view.spatial, view.stride_n, view.stride_c, view.stride_s,
        *split_float(eps),
        running.mean if fold else rstd, running.var if fold else rstd,
        running.num_batches_tracked if has_counter else rstd,
        *split_float(running.momentum if fold and running.momentum is not None else 0.0),
        arrival_counters(x, 1) if cumulative else rstd,
        BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, SPLIT_ROWS=view.split_rows, INT64=plan.int64,
        ACC=tl_accumulator(x.dtype), **epilogue.constexprs(),
        HAS_RUNNING=fold, HAS_COUNTER=has_counter, CUMULATIVE=cumulative,
        STORE_COEFFICIENTS=coefficients, num_warps=plan.num_warps,
    )
    return y, BatchStats(mean_s, rstd, scale, shift, mean, var_unbiased, pivot), fold


def fused_backward(
    view: ChannelView, plan: Plan, dy, weight, pivot, pivot_stride, mean_shifted, rstd,
    batch_stats: bool, param_dtype: torch.dtype, epilogue: Epilogue = NO_EPILOGUE,
    running_eps: float | None = None,
):
    """``(dx, dweight, dbias)`` in one launch; same contract as ``batch_norm_grads``.
    ``running_eps`` given: the running statistics normalized the forward, ``rstd`` is
    their variance (rstd taken from it in the kernel) and ``mean_shifted`` is unused."""
    x = view.tensor
    dx = view.empty_like()
    dweight = x.new_empty(view.channels, dtype=param_dtype)
    dbias = torch.empty_like(dweight)
    running = running_eps is not None
    _fused_backward_kernel[(cdiv(view.channels, plan.block_channels),)](
        x, dy, dx, weight if weight is not None else rstd, pivot, rstd if running else mean_shifted, rstd,
        dweight, dbias,
        *epilogue.pointers(x, rstd), view.rows, view.channels, view.spatial, view.stride_n, view.stride_c, view.stride_s,
        pivot_stride, *split_float(running_eps if running else 0.0),
        BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, HAS_WEIGHT=weight is not None,
        BATCH_STATS=batch_stats and not running, SPLIT_ROWS=view.split_rows, INT64=plan.int64,
        ACC=tl_accumulator(x.dtype), **epilogue.constexprs(), RUNNING=running, num_warps=plan.num_warps,
    )
    return dx, dweight, dbias
