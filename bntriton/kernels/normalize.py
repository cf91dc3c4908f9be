"""The per-channel affine epilogue shared by the forward and the backward.

    out = (x - K) * scale + shift  [+ dy * dy_scale]

Forward (train): ``K`` is the channel's first element (the statistics' pivot), so the
large common offset cancels exactly before any rounding.  Forward (eval): ``K`` is the
running mean.  Backward: ``dx = dy * A + (x - K) * B + C`` with per-channel A, B, C from
the backward's reduction.  Math in the accumulator dtype, output in ``out``'s dtype.
"""
from __future__ import annotations

import torch
import triton.language as tl

from .plans import Plan, cdiv, channel_block
from .runtime import accumulator_dtype, kernel, split_float, tl_accumulator
from .layout import ChannelView
from .numerics import fold_affine, inverse_std
from .tiles import channel_offsets, tile_offsets


@kernel
def _channel_affine_kernel(
    x_ptr, dy_ptr, out_ptr, pivot_ptr, scale_ptr, shift_ptr, dy_scale_ptr,
    rows, channels, spatial, stride_n, stride_c, stride_s, pivot_stride,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DY: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    offs = tile_offsets(r, c, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
    mask = (r < rows)[:, None] & c_mask[None, :]

    pivot = tl.load(pivot_ptr + channel_offsets(c, pivot_stride, INT64), mask=c_mask, other=0.0).to(ACC)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    # fma: one rounding where multiply-then-add takes two (the GPU would contract them
    # anyway; the interpreter does not), so (x - K) costs no extra rounding next to x * a + b.
    out = tl.fma(x - pivot[None, :], scale[None, :], shift[None, :])
    if HAS_DY:
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy_scale = tl.load(dy_scale_ptr + c, mask=c_mask, other=0.0)
        out = tl.fma(dy, dy_scale[None, :], out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def channel_affine(
    view: ChannelView,
    plan: Plan,
    pivot: torch.Tensor,
    pivot_stride: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    dy: torch.Tensor | None = None,
    dy_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(x - pivot[c * pivot_stride]) * scale + shift [+ dy * dy_scale]`` over ``view``.

    ``dy`` must share the view's strides (see :meth:`ChannelView.same_layout`).  The
    result has the view's shape and strides.
    """
    x = view.tensor
    out = view.empty_like(out_dtype)
    if out.numel() == 0:
        return out
    grid = (cdiv(view.rows, plan.block_rows), cdiv(view.channels, plan.block_channels))
    _channel_affine_kernel[grid](
        x, dy if dy is not None else x, out, pivot, scale, shift,
        dy_scale if dy_scale is not None else scale,
        view.rows, view.channels, view.spatial, view.stride_n, view.stride_c, view.stride_s,
        pivot_stride,
        BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, HAS_DY=dy is not None,
        SPLIT_ROWS=view.split_rows, INT64=plan.int64, ACC=tl_accumulator(x.dtype),
        num_warps=plan.num_warps,
    )
    return out


@kernel
def _eval_coefficients_kernel(
    var_ptr, weight_ptr, bias_ptr, rstd_ptr, scale_ptr, shift_ptr, channels, eps_hi, eps_lo,
    BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    var = tl.load(var_ptr + c, mask=c_mask, other=1.0).to(ACC)
    rstd = inverse_std(var, eps_hi, eps_lo, BLOCK_C, ACC)
    # The pivot is the running mean itself, so the shifted mean is zero.
    zero = tl.zeros([BLOCK_C], dtype=ACC)
    scale, shift = fold_affine(rstd, zero, weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS, ACC)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    tl.store(shift_ptr + c, shift, mask=c_mask)


def eval_coefficients(
    x_dtype: torch.dtype,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rstd, scale, shift)`` from the running variance, in one launch, so that eval is
    ``channel_affine(view, plan, running_mean, 1, scale, shift)``."""
    channels = running_var.numel()
    acc = accumulator_dtype(x_dtype)
    rstd, scale, shift = (running_var.new_empty(channels, dtype=acc) for _ in range(3))
    block = channel_block(channels)
    _eval_coefficients_kernel[(cdiv(channels, block),)](
        running_var, weight if weight is not None else rstd, bias if bias is not None else rstd,
        rstd, scale, shift, channels, *split_float(eps),
        BLOCK_C=block, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ACC=tl_accumulator(x_dtype),
    )
    return rstd, scale, shift
