"""The per-channel affine epilogue shared by the forward and the backward.

    out = (x - K) * scale + shift  [+ dy * dy_scale]

Forward (train): ``K`` is the channel's first element (the statistics' pivot), so the
large common offset cancels exactly before any rounding.  Forward (eval): ``K`` is the
running mean.  Backward: ``dx = dy * A + (x - K) * B + C`` with per-channel A, B, C from
the backward's reduction.  Math in the accumulator dtype, output in ``out``'s dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Plan, kernel, tl_accumulator
from .layout import ChannelView
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
    out = (x - pivot[None, :]) * scale[None, :] + shift[None, :]
    if HAS_DY:
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy_scale = tl.load(dy_scale_ptr + c, mask=c_mask, other=0.0)
        out = out + dy * dy_scale[None, :]
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
    grid = (triton.cdiv(view.rows, plan.block_rows), triton.cdiv(view.channels, plan.block_channels))
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
