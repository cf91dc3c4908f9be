"""The per-channel affine epilogue shared by the forward and the backward.

    out = (x - K) * scale + shift  [+ dy * dy_scale]

Forward (train): ``K`` is the channel's first element (the statistics' pivot), so the
large common offset cancels exactly before any rounding.  Forward (eval): ``K`` is the
running mean.  Backward: ``dx = dy * A + (x - K) * B + C`` with per-channel A, B, C from
the backward's reduction.  Math in the accumulator dtype, output in ``out``'s dtype.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton.language as tl

from .activations import (
    NO_EPILOGUE, PLAIN, Epilogue, EpilogueKind, activate, activation_grad, invert_activation, load_mask, mask_grad,
    store_mask,
)
from .bound_launch import BoundLaunch
from .plans import Plan, cdiv, splits_block
from .runtime import kernel, split_float, tl_accumulator
from .layout import ChannelView
from .numerics import fold_affine, grad_coefficients, inverse_std
from .tiles import channel_offsets, tile_offsets


@kernel
def _channel_affine_kernel(
    x_ptr, dy_ptr, out_ptr, pivot_ptr, scale_ptr, shift_ptr, dy_scale_ptr,
    res_ptr, mask_ptr, act_scale_ptr, act_shift_ptr, slope_hi, slope_lo,
    rows, channels, spatial, stride_n, stride_c, stride_s, pivot_stride, eps_hi, eps_lo,
    parts_ptr, dweight_ptr, dbias_ptr, num_splits,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DY: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
    ACTIVATION: tl.constexpr = 0, HAS_RESIDUAL: tl.constexpr = False, MASK: tl.constexpr = False,
    INVERT: tl.constexpr = False,
    EVAL: tl.constexpr = False, HAS_WEIGHT: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
    GRAD_SUMS: tl.constexpr = False, BATCH_STATS: tl.constexpr = False, SPLITS: tl.constexpr = 1,
):
    # Forward (HAS_DY False): out = act((x - K) * scale + shift [+ residual]), with the
    # sign of the pre-activation packed into ``mask`` when MASK.
    # Backward (HAS_DY): dz = dy * act'(z), z recomputed as (x - K) * act_scale + act_shift
    # (or read from ``mask``); out = dz * dy_scale + (x - K) * scale + shift, and dz goes
    # to ``res`` when HAS_RESIDUAL (the residual's gradient).  INVERT (in-place activated
    # batch norm): ``x`` holds the forward's output y, so z = act^-1(y) and
    # x - K = (z - act_shift) / act_scale (K = 0).
    # EVAL (forward under running statistics): every program folds its channels' scale and
    # shift from the running variance (``scale_ptr``), the weight (``dy_scale_ptr``) and the
    # bias (``shift_ptr``) itself: no launch of its own for the coefficients.
    # GRAD_SUMS (backward in two launches): every program sums its channels' partial sums
    # (``parts``, the backward's split reduction) and forms A, B, C itself from rstd
    # (``scale_ptr``), the shifted mean (``shift_ptr``) and the weight (``dy_scale_ptr``);
    # the programs of the first row tile also write dweight and dbias.
    r0 = tl.program_id(0) * BLOCK_R
    r = r0 + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    # Python floats arrive as fp32: two parts keep an fp64 slope exact (runtime.split_float).
    slope = (tl.zeros([BLOCK_C], dtype=ACC) + slope_hi) + slope_lo
    offs = tile_offsets(r, c, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
    mask = (r < rows)[:, None] & c_mask[None, :]

    if GRAD_SUMS:
        # (The first-tile test as a vector: the interpreter refuses a scalar in a mask.)
        first_tile = (tl.program_id(0) + tl.zeros([BLOCK_C], dtype=tl.int32)) == 0
        dy_scale, scale, shift = grad_coefficients(
            parts_ptr, num_splits, rows, shift_ptr, scale_ptr, dy_scale_ptr, dweight_ptr, dbias_ptr, c,
            c_mask & first_tile, channels, BLOCK_C, SPLITS, HAS_WEIGHT, BATCH_STATS, ACC)
    elif EVAL:
        var = tl.load(scale_ptr + c, mask=c_mask, other=1.0).to(ACC)
        rstd = inverse_std(var, eps_hi, eps_lo, BLOCK_C, ACC)
        scale, shift = fold_affine(rstd, tl.zeros([BLOCK_C], dtype=ACC), dy_scale_ptr, shift_ptr, c, c_mask,
                                   HAS_WEIGHT, HAS_BIAS, ACC)
    else:
        scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
        shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_DY:
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if ACTIVATION != 0 or INVERT:
            act_scale = tl.load(act_scale_ptr + c, mask=c_mask, other=1.0)
            act_shift = tl.load(act_shift_ptr + c, mask=c_mask, other=0.0)
        if INVERT:
            z = invert_activation(x, slope[None, :], ACTIVATION)
            dy = activation_grad(z, dy, slope[None, :], ACTIVATION)
            x_k = (z - act_shift[None, :]) / act_scale[None, :]
        else:
            pivot = tl.load(pivot_ptr + channel_offsets(c, pivot_stride, INT64), mask=c_mask, other=0.0).to(ACC)
            x_k = x - pivot[None, :]
            if MASK:
                dy = mask_grad(load_mask(mask_ptr, r, c, mask, channels), dy, slope[None, :], ACTIVATION)
            elif ACTIVATION != 0:
                z = tl.fma(x_k, act_scale[None, :], act_shift[None, :])  # the forward's z, bit for bit
                dy = activation_grad(z, dy, slope[None, :], ACTIVATION)
        if HAS_RESIDUAL:
            tl.store(res_ptr + offs, dy.to(res_ptr.dtype.element_ty), mask=mask)
        if not GRAD_SUMS:
            dy_scale = tl.load(dy_scale_ptr + c, mask=c_mask, other=0.0)
        # fmas: one rounding per product and sum where multiply-then-add takes two (the
        # GPU would contract them anyway; the interpreter does not).
        out = tl.fma(dy, dy_scale[None, :], tl.fma(x_k, scale[None, :], shift[None, :]))
    else:
        pivot = tl.load(pivot_ptr + channel_offsets(c, pivot_stride, INT64), mask=c_mask, other=0.0).to(ACC)
        out = tl.fma(x - pivot[None, :], scale[None, :], shift[None, :])
        if HAS_RESIDUAL:
            out = out + tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        if MASK:
            store_mask(mask_ptr, (out > 0) & mask, r0, rows, c, c_mask, channels, BLOCK_R, BLOCK_C)
        out = activate(out, slope[None, :], ACTIVATION)
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
    epilogue: Epilogue | None = None,
) -> torch.Tensor:
    """``(x - pivot[c * pivot_stride]) * scale + shift [+ dy * dy_scale]`` over ``view``.

    ``dy`` must share the view's strides (see :meth:`ChannelView.same_layout`).  The
    result has the view's shape and strides.  ``epilogue`` adds an activation, a residual
    and the 1-bit mask (see :class:`~.activations.Epilogue`).
    """
    return _launch_affine(view, plan, pivot, pivot_stride, scale, shift, dy, dy_scale, out_dtype, epilogue)


def eval_affine(
    view: ChannelView,
    plan: Plan,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    epilogue: Epilogue | None = None,
) -> torch.Tensor:
    """``(x - running_mean) * scale + shift`` with ``scale = weight / sqrt(running_var +
    eps)`` and ``shift = bias``, each program folding its channels' coefficients itself
    (one launch for eval)."""
    return _launch_affine(
        view, plan, running_mean, 1, running_var, bias, None, weight, None, epilogue,
        eval_eps=eps, has_weight=weight is not None, has_bias=bias is not None,
    )


def grad_affine(
    view: ChannelView,
    plan: Plan,
    dy: torch.Tensor,
    parts: torch.Tensor,
    pivot: torch.Tensor,
    pivot_stride: int,
    mean_shifted: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    dweight: torch.Tensor,
    dbias: torch.Tensor,
    batch_stats: bool,
    epilogue: Epilogue | None = None,
) -> torch.Tensor:
    """dx of the backward, each program forming its channels' ``A, B, C`` from the split
    reduction's ``parts`` (``(2, splits, C)``) itself, and the first row tile's programs
    writing ``dweight`` / ``dbias``: no combine launch between the two passes.  Every
    program sums the splits in the same order, so all of them use the same bits."""
    return _launch_affine(
        view, plan, pivot, pivot_stride, rstd, mean_shifted, dy, weight, view.tensor.dtype, epilogue,
        has_weight=weight is not None, sums=(parts, dweight, dbias, batch_stats),
    )


class EvalLaunch:
    """The eval forward's launch for one input geometry and epilogue kind: its grid, the
    view's sizes and strides and the constexprs worked out once (kernels/launch_cache.py
    caches one per geometry), so that an eval call only allocates its output (and the
    1-bit mask its kind keeps) and launches.  Grid and constexprs come from
    :func:`eval_affine`'s builders; the arguments are written out (building them through
    ``_arguments`` costs a call and the epilogue's placeholders), and
    tests/test_direct_launch.py and tests/test_cached_launches.py hold them equal to that
    launch's.  A plain kind returns ``y``, an activated one ``(y, mask)``."""

    __slots__ = ("constants", "affine", "activated", "mask_shape")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool, has_bias: bool, kind: EpilogueKind = PLAIN):
        self.activated = kind != PLAIN
        # The mask's shape (rows 8 to a byte), and tiles of at least 8 rows to pack them.
        self.mask_shape = (-(-view.rows // 8), view.channels) if kind.mask else 0
        if kind.mask and plan.block_rows < 8:
            plan = replace(plan, block_rows=8)
        # The arguments after the epilogue's placeholders up to eps: the slope (unused
        # without an activation), the geometry and the pivot's stride.
        self.constants = (*split_float(kind.slope), *_geometry(view), 1)
        self.affine = BoundLaunch(_channel_affine_kernel, _grid(view, plan),
                                  _meta(view, plan, kind, False, True, has_weight, has_bias))

    def __call__(self, x, weight, bias, running_mean, running_var, eps: float, residual=None):
        out = torch.empty_like(x)
        mask = x.new_empty(self.mask_shape, dtype=torch.uint8) if self.activated else None
        # _arguments' order, written out (tests/test_direct_launch.py holds the two equal):
        # x, dy, out, pivot, scale, shift, dy_scale, residual, mask, act_scale, act_shift.
        self.affine(
            x, x, out, running_mean, running_var, bias if bias is not None else running_var,
            weight if weight is not None else running_var, residual if residual is not None else x,
            mask if self.mask_shape else x, running_var, running_var,
            *self.constants, *split_float(eps), x, x, x, 0,
        )
        return (out, mask) if self.activated else out


def _grid(view, plan):
    return cdiv(view.rows, plan.block_rows), cdiv(view.channels, plan.block_channels)


def _geometry(view):
    return view.rows, view.channels, view.spatial, view.stride_n, view.stride_c, view.stride_s


def _arguments(x, dy, out, pivot, pivot_stride, scale, shift, dy_scale, ep, geometry, eval_eps, sums):
    """``_channel_affine_kernel``'s positional arguments, in its order (unused pointers get
    a placeholder of the right kind: the kernel never touches them)."""
    parts, dweight, dbias, splits = (x, x, x, 0) if sums is None else (*sums[:3], sums[0].shape[1])
    return (
        x, dy if dy is not None else x, out, pivot, scale, shift if shift is not None else scale,
        dy_scale if dy_scale is not None else scale, *ep.pointers(x, scale), *geometry, pivot_stride,
        *split_float(eval_eps if eval_eps is not None else 0.0), parts, dweight, dbias, splits,
    )


def _meta(view, plan, ep, has_dy, evaluating, has_weight, has_bias, summed_splits=None, batch_stats=False):
    """``_channel_affine_kernel``'s constexprs and warps; ``summed_splits``: the number of
    splits whose partial sums each program sums (the backward's GRAD_SUMS), else None."""
    return dict(
        BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, HAS_DY=has_dy,
        SPLIT_ROWS=view.split_rows, INT64=plan.int64, ACC=tl_accumulator(view.tensor.dtype),
        **ep.constexprs(), EVAL=evaluating, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
        GRAD_SUMS=summed_splits is not None, BATCH_STATS=summed_splits is not None and batch_stats,
        SPLITS=splits_block(summed_splits, plan.block_channels) if summed_splits is not None else 1,
        num_warps=plan.num_warps,
    )


def _launch_affine(view, plan, pivot, pivot_stride, scale, shift, dy, dy_scale, out_dtype, epilogue,
                   eval_eps=None, has_weight=False, has_bias=False, sums=None):
    x = view.tensor
    ep = epilogue or NO_EPILOGUE
    out = ep.out if ep.out is not None else view.empty_like(out_dtype)
    if out.numel() == 0:
        return out
    if ep.mask is not None and plan.block_rows < 8:
        plan = replace(plan, block_rows=8)  # the mask packs 8 rows per byte
    _channel_affine_kernel[_grid(view, plan)](
        *_arguments(x, dy, out, pivot, pivot_stride, scale, shift, dy_scale, ep, _geometry(view), eval_eps, sums),
        **_meta(view, plan, ep, dy is not None, eval_eps is not None, has_weight, has_bias,
                *((sums[0].shape[1], sums[3]) if sums is not None else ())),
    )
    return out
