"""Backward: per-channel sum(dy) and sum(dy * x_hat), then the fused dx epilogue.

With ``x_hat = ((x - K) - mean_shifted) * rstd`` and ``g`` the weight (1 without one)::

    dbeta  = sum(dy)
    dgamma = sum(dy * x_hat)
    dx     = g * rstd * (dy - dbeta / M - x_hat * dgamma / M)        (batch statistics)
    dx     = g * rstd * dy                                           (running statistics)

Two launches: the split partial reduction (same grid as the statistics), then the
shared per-channel affine epilogue (normalize.py) ``dx = dy * A + (x - K) * B + C``.
Where the splits are few for the tile's rows (plans.sums_in_epilogue), each epilogue
program sums its channels' splits itself in a fixed order (deterministic, the same bits
in every program) and forms A, B, C.  Otherwise (channels-last tensors split hundreds
of ways: re-reading every split in every epilogue program would cost more than it
saves) the last program of each channel block of the partial reduction
(kernels/counters.py) sums the block's splits once, in the same fixed order, and writes
A, B, C, dweight and dbias for the epilogue.  Under running statistics dx needs no sum:
one launch (:func:`running_grads`), the partial pass writing dx and its last programs
dweight and dbias.

SyncBatchNorm needs the two halves apart, with an all-reduce of the sums in between
(``M`` is then the global count): :func:`grad_sums` is the reduction (one launch, its
last programs writing the sums and the local dweight / dbias), and :func:`input_grad` the
coefficients and epilogue from given sums.  The coefficient formula itself is one device
function shared by both paths.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import triton.language as tl

from .activations import NO_EPILOGUE, Epilogue, through_activation
from .counters import arrival_counters, arrived_last
from .plans import Plan, cdiv, channel_block, splits_block, sums_in_epilogue
from .runtime import accumulator_dtype, kernel, split_float, tl_accumulator
from .layout import ChannelView
from .normalize import channel_affine, grad_affine
from .numerics import dx_coefficients, grad_coefficients, inverse_std, sum_parts, two_sum
from .tiles import channel_offsets, channel_tile_offsets


@kernel
def _grad_partial_kernel(
    x_ptr, dy_ptr, pivot_ptr, mean_s_ptr, parts_ptr,
    res_ptr, mask_ptr, act_scale_ptr, act_shift_ptr, slope_hi, slope_lo,
    rows, channels, spatial, stride_n, stride_c, stride_s, pivot_stride, rows_per_split,
    dx_ptr, var_ptr, weight_ptr, eps_hi, eps_lo,
    rstd_ptr, dweight_ptr, dbias_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, sums_ptr, counters_ptr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
    ACTIVATION: tl.constexpr = 0, HAS_RESIDUAL: tl.constexpr = False, MASK: tl.constexpr = False,
    INVERT: tl.constexpr = False, RUNNING: tl.constexpr = False, HAS_WEIGHT: tl.constexpr = False,
    COMBINE: tl.constexpr = False, BATCH_STATS: tl.constexpr = False, SPLITS: tl.constexpr = 1,
    SUMS: tl.constexpr = False,
):
    # With an activation the sums are over dz = dy * act'(z), z recomputed (or read from
    # the mask, or recovered from the output when INVERT) exactly as normalize.py's
    # backward epilogue does.  RUNNING (the running statistics normalized the forward:
    # K is the running mean, the shifted mean 0; no epilogue): dx = dy * weight * rstd
    # needs no sum, so the same pass writes it, with rstd from the running variance at
    # ``var_ptr``; otherwise those pointers are unused.
    # COMBINE: the last program of each channel block (counters.arrived_last) sums the
    # block's partial sums in split order and writes dweight and dbias, and under RUNNING
    # that is all; SUMS (SyncBatchNorm) also writes the two sums, for the all-reduce;
    # otherwise dx's coefficients A, B, C (from rstd and the shifted mean) for the
    # epilogue launch.
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    # Python floats arrive as fp32: two parts keep an fp64 slope exact (runtime.split_float).
    slope = (tl.zeros([BLOCK_C], dtype=ACC) + slope_hi) + slope_lo
    pivot = tl.load(pivot_ptr + channel_offsets(c, pivot_stride, INT64), mask=c_mask, other=0.0).to(ACC)
    if RUNNING:
        mean_s = tl.zeros([BLOCK_C], dtype=ACC)
        running_rstd = inverse_std(tl.load(var_ptr + c, mask=c_mask, other=1.0).to(ACC), eps_hi, eps_lo, BLOCK_C,
                                   ACC)
        dx_scale = running_rstd
        if HAS_WEIGHT:
            dx_scale = dx_scale * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(ACC)
    else:
        mean_s = tl.load(mean_s_ptr + c, mask=c_mask, other=0.0)
    # z = (x - K) * act_scale + act_shift, read only when an activation needs z.
    act_scale = tl.full([BLOCK_C], 1.0, ACC)
    act_shift = tl.zeros([BLOCK_C], dtype=ACC)
    if ACTIVATION != 0 or INVERT:
        act_scale = tl.load(act_scale_ptr + c, mask=c_mask, other=1.0).to(ACC)
        act_shift = tl.load(act_shift_ptr + c, mask=c_mask, other=0.0).to(ACC)

    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows)
    # Sums carried in two parts (hi + lo): the tiles' pairwise sums are added with their
    # rounding errors kept, so the error does not grow with the number of tiles.
    dy_hi = tl.zeros([BLOCK_C], dtype=ACC)
    dy_lo = tl.zeros([BLOCK_C], dtype=ACC)
    dyc_hi = tl.zeros([BLOCK_C], dtype=ACC)
    dyc_lo = tl.zeros([BLOCK_C], dtype=ACC)
    for r0 in range(row_start, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
        mask = c_mask[:, None] & (r < row_end)[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x_k, dy = through_activation(x, dy, pivot, act_scale, act_shift, slope, mask_ptr, r, c, mask, channels,
                                     ACTIVATION, MASK, INVERT)
        if RUNNING:
            tl.store(dx_ptr + offs, (dy * dx_scale[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)
        # (x - K) is exact for offset data; subtracting the shifted mean second keeps it so.
        centred = tl.where(mask, x_k - mean_s[:, None], 0.0)
        dy_hi, carry = two_sum(dy_hi, tl.sum(dy, axis=1))
        dy_lo += carry
        dyc_hi, carry = two_sum(dyc_hi, tl.sum(dy * centred, axis=1))
        dyc_lo += carry
    sum_dy = dy_hi + dy_lo
    sum_dyc = dyc_hi + dyc_lo
    # ``parts`` is (2, splits, C): sum(dy) above sum(dy * centred), one buffer.
    out = split * channels + c
    tl.store(parts_ptr + out, sum_dy, mask=c_mask)
    tl.store(parts_ptr + tl.num_programs(0) * channels + out, sum_dyc, mask=c_mask)
    if COMBINE:
        if arrived_last(counters_ptr + tl.program_id(1), tl.num_programs(0)):
            if RUNNING:
                sum_dy, sum_dyc = sum_parts(parts_ptr, c, c_mask, channels, tl.num_programs(0), BLOCK_C, SPLITS, ACC)
                tl.store(dweight_ptr + c, (sum_dyc * running_rstd).to(dweight_ptr.dtype.element_ty), mask=c_mask)
                tl.store(dbias_ptr + c, sum_dy.to(dbias_ptr.dtype.element_ty), mask=c_mask)
            elif SUMS:
                sum_dy, sum_dyc = sum_parts(parts_ptr, c, c_mask, channels, tl.num_programs(0), BLOCK_C, SPLITS, ACC)
                tl.store(sums_ptr + c, sum_dy, mask=c_mask)
                tl.store(sums_ptr + channels + c, sum_dyc, mask=c_mask)
                dgamma = sum_dyc * tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
                tl.store(dweight_ptr + c, dgamma.to(dweight_ptr.dtype.element_ty), mask=c_mask)
                tl.store(dbias_ptr + c, sum_dy.to(dbias_ptr.dtype.element_ty), mask=c_mask)
            else:
                coef_a, coef_b, coef_c = grad_coefficients(
                    parts_ptr, tl.num_programs(0), rows, mean_s_ptr, rstd_ptr, weight_ptr, dweight_ptr, dbias_ptr,
                    c, c_mask, channels, BLOCK_C, SPLITS, HAS_WEIGHT, BATCH_STATS, ACC)
                tl.store(coef_a_ptr + c, coef_a, mask=c_mask)
                tl.store(coef_b_ptr + c, coef_b, mask=c_mask)
                tl.store(coef_c_ptr + c, coef_c, mask=c_mask)


@kernel
def _input_grad_coef_kernel(
    sums_ptr, count_ptr, mean_s_ptr, rstd_ptr, weight_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr,
    channels,
    BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    sum_dy = tl.load(sums_ptr + c, mask=c_mask, other=0.0)
    sum_dyc = tl.load(sums_ptr + channels + c, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
    mean_s = tl.load(mean_s_ptr + c, mask=c_mask, other=0.0)
    # The count is read on device (a one-element tensor): no host synchronization.
    m = tl.load(count_ptr + tl.zeros([BLOCK_C], dtype=tl.int32)).to(ACC)
    weight = tl.zeros([BLOCK_C], dtype=ACC) + 1.0
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(ACC)
    coef_a, coef_b, coef_c = dx_coefficients(sum_dy, sum_dyc, rstd, weight, mean_s, m, ACC)
    tl.store(coef_a_ptr + c, coef_a, mask=c_mask)
    tl.store(coef_b_ptr + c, coef_b, mask=c_mask)
    tl.store(coef_c_ptr + c, coef_c, mask=c_mask)


class _Combine(NamedTuple):
    """What the partial sums' last program of each channel block writes (``_grad_partial_kernel``'s
    COMBINE): dweight and dbias, and with ``coefficients`` given, dx's ``(A, B, C)`` from
    ``rstd``, the weight and (``batch_stats``) the shifted mean, or with ``sums`` given
    (a (2, C) buffer) the two sums themselves."""

    dweight: torch.Tensor
    dbias: torch.Tensor
    coefficients: tuple | None = None
    rstd: torch.Tensor | None = None
    batch_stats: bool = False
    sums: torch.Tensor | None = None


def _partial_sums(
    view: ChannelView, plan: Plan, dy: torch.Tensor, pivot: torch.Tensor, pivot_stride: int,
    mean_shifted: torch.Tensor, weight: torch.Tensor | None = None, epilogue: Epilogue = NO_EPILOGUE,
    running: tuple | None = None, combine: _Combine | None = None,
) -> torch.Tensor:
    """Launch the split reduction: ``(2, num_splits, C)`` partial sum(dy) and
    sum(dy * centred), one buffer.  ``running = (dx, running_var, eps)``: the forward
    normalized with the running statistics (``pivot`` their mean, ``mean_shifted``
    unused, no epilogue), and the same pass writes dx.  ``combine``: the same launch also
    sums the splits (see :class:`_Combine`)."""
    x = view.tensor
    channels = view.channels
    channel_blocks = cdiv(channels, plan.block_channels)
    parts = x.new_empty((2, plan.num_splits, channels), dtype=accumulator_dtype(x.dtype))
    dx, running_var, eps = running if running is not None else (x, parts, 0.0)
    if combine is not None:
        counters = arrival_counters(x, channel_blocks)
        coef_a, coef_b, coef_c = combine.coefficients or (parts,) * 3
        grads = (combine.rstd if combine.rstd is not None else parts, combine.dweight, combine.dbias,
                 coef_a, coef_b, coef_c, combine.sums if combine.sums is not None else parts, counters)
    else:
        grads = (parts,) * 8
    _grad_partial_kernel[(plan.num_splits, channel_blocks)](
        x, dy, pivot, mean_shifted if mean_shifted is not None else parts, parts,
        *epilogue.pointers(x, parts),
        view.rows, channels, view.spatial, view.stride_n, view.stride_c, view.stride_s,
        pivot_stride, plan.rows_per_split,
        dx, running_var, weight if weight is not None else running_var, *split_float(eps), *grads,
        BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels,
        SPLIT_ROWS=view.split_rows, INT64=plan.int64, ACC=tl_accumulator(x.dtype),
        **epilogue.constexprs(), RUNNING=running is not None, HAS_WEIGHT=weight is not None,
        COMBINE=combine is not None, BATCH_STATS=combine is not None and combine.batch_stats,
        SUMS=combine is not None and combine.sums is not None,
        # Splits summed as many at a time as for the widest block of channels
        # (channel_block): the order, and so the bits, do not depend on the tile's channels.
        SPLITS=splits_block(plan.num_splits, channel_block(channels)),
        num_warps=plan.num_warps,
    )
    return parts


def batch_norm_grads(
    view: ChannelView,
    plan: Plan,
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    pivot: torch.Tensor,
    pivot_stride: int,
    mean_shifted: torch.Tensor,
    rstd: torch.Tensor,
    batch_stats: bool,
    param_dtype: torch.dtype,
    epilogue: Epilogue = NO_EPILOGUE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) for ``view``; ``dy`` must share the view's strides.

    ``pivot`` / ``mean_shifted`` / ``rstd`` are the statistics the forward normalized with:
    the batch's (pivot = the input itself, stride ``stride_c``) or the running ones.
    ``epilogue`` takes dy through the forward's activation first (and writes the
    residual's gradient); see :class:`~.activations.Epilogue`.
    """
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    channels = view.channels
    dweight = x.new_empty(channels, dtype=param_dtype)
    dbias = torch.empty_like(dweight)
    if view.rows == 0:
        return view.empty_like(), dweight.zero_(), dbias.zero_()

    needs_x = batch_stats or epilogue.activation != 0
    if needs_x and sums_in_epilogue(plan, x.element_size()):
        parts = _partial_sums(view, plan, dy, pivot, pivot_stride, mean_shifted, epilogue=epilogue)
        dx = grad_affine(view, plan, dy, parts, pivot, pivot_stride, mean_shifted, rstd, weight, dweight, dbias,
                         batch_stats, epilogue)
        return dx, dweight, dbias
    coef_a, coef_b, coef_c = (x.new_empty(channels, dtype=acc) for _ in range(3))
    _partial_sums(view, plan, dy, pivot, pivot_stride, mean_shifted, weight, epilogue,
                  combine=_Combine(dweight, dbias, (coef_a, coef_b, coef_c), rstd, batch_stats))
    if needs_x:
        # (With an activation, z needs x even under running statistics: B and C are zero.)
        dx = channel_affine(
            view, plan, pivot, pivot_stride, coef_b, coef_c, dy=dy, dy_scale=coef_a,
            out_dtype=x.dtype, epilogue=epilogue,
        )
    else:
        # Running statistics: dx = dy * A.  Read dy alone (B and C are zero, so B doubles
        # as a zero pivot) rather than paying for a read of x.
        dx = channel_affine(replace(view, tensor=dy), plan, coef_b, 1, coef_a, coef_c, out_dtype=x.dtype)
    return dx, dweight, dbias


def running_grads(
    view: ChannelView,
    plan: Plan,
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    param_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of a forward that normalized with the running statistics, in
    one launch: dx = dy * weight * rstd needs no sum, so the partial sums' pass writes it
    (one read of x and dy, one write of dx: the floor), and each channel block's last
    program sums the splits into dweight and dbias; rstd comes from the running variance
    inside the kernel.  Plain batch norm only: a fused epilogue's eval backward takes
    :func:`batch_norm_grads`."""
    x = view.tensor
    channels = view.channels
    dweight = x.new_empty(channels, dtype=param_dtype)
    dbias = torch.empty_like(dweight)
    dx = view.empty_like()
    if view.rows == 0:
        return dx, dweight.zero_(), dbias.zero_()
    _partial_sums(view, plan, dy, running_mean, 1, None, weight, running=(dx, running_var, eps),
                  combine=_Combine(dweight, dbias))
    return dx, dweight, dbias


def grad_sums(
    view: ChannelView,
    plan: Plan,
    dy: torch.Tensor,
    pivot: torch.Tensor,
    pivot_stride: int,
    mean_shifted: torch.Tensor,
    rstd: torch.Tensor,
    param_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduction half of the backward under batch statistics: ``(sums, dweight, dbias)``.

    ``sums`` is ``(2, C)`` in the accumulator dtype, rows ``sum(dy)`` and
    ``sum(dy * ((x - K) - mean_shifted))``: one buffer, ready for a single all-reduce
    before :func:`input_grad`.  ``dweight`` / ``dbias`` are this view's own (zeros for an
    empty view).
    """
    x = view.tensor
    channels = view.channels
    sums = x.new_empty((2, channels), dtype=accumulator_dtype(x.dtype))
    dweight = x.new_empty(channels, dtype=param_dtype)
    dbias = torch.empty_like(dweight)
    if view.rows == 0:
        return sums.zero_(), dweight.zero_(), dbias.zero_()
    _partial_sums(view, plan, dy, pivot, pivot_stride, mean_shifted,
                  combine=_Combine(dweight, dbias, rstd=rstd, sums=sums))
    return sums, dweight, dbias


def input_grad(
    view: ChannelView,
    plan: Plan,
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    pivot: torch.Tensor,
    pivot_stride: int,
    mean_shifted: torch.Tensor,
    rstd: torch.Tensor,
    sums: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """dx under batch statistics from :func:`grad_sums`' ``sums`` (possibly summed over
    processes) and ``count``, a one-element tensor: the number of values per channel the
    statistics were taken over."""
    x = view.tensor
    channels = view.channels
    if view.rows == 0:
        return view.empty_like()
    acc = accumulator_dtype(x.dtype)
    coef_a, coef_b, coef_c = (x.new_empty(channels, dtype=acc) for _ in range(3))
    block = channel_block(channels)
    _input_grad_coef_kernel[(cdiv(channels, block),)](
        sums, count, mean_shifted, rstd, weight if weight is not None else rstd,
        coef_a, coef_b, coef_c, channels,
        BLOCK_C=block, HAS_WEIGHT=weight is not None, ACC=tl_accumulator(x.dtype),
    )
    return channel_affine(view, plan, pivot, pivot_stride, coef_b, coef_c, dy=dy, dy_scale=coef_a)
