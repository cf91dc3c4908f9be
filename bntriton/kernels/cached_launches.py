"""The training forward's and backward's launches for one input geometry.

A model calls each of its batch norms with the same few geometries (shape, strides,
dtype, device, which of weight / bias / running statistics exist) on every step, and
working out the view, the plans, grids, sizes and constexprs each time cost a training
call dozens of Python frames before its first launch (perf/frames.py).  These classes
hold what a geometry fixes, worked out once by the general route's own builders
(launch_cache.py caches one per geometry, as it does :class:`~.normalize.EvalLaunch`); a
call then allocates its outputs, looks up the arrival counters (per device and stream:
never cached here) and launches, each kernel through a :class:`~.bound_launch.BoundLaunch`
(once a launch's variant is compiled, the next ones call Triton's launcher directly).
The arguments are written out in the kernels' order;
tests/test_cached_launches.py holds every launch's kernel, grid, arguments and
constexprs equal to the general route's (the outputs aside), on both paths.

Each class is built for an :class:`~.activations.EpilogueKind` (plain batch norm, or an
activation with a residual and a 1-bit mask): the constexprs and the slope are the
kind's, and a call passes the residual's tensor.  The activated forward also returns the
mask and the coefficients its backward recomputes z from, in ops/activated.py's order.
A silu / gelu after a residual (whose backward needs z formed by one more pass), the
in-place layer and the eval backward take the general route.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .activations import PLAIN, EpilogueKind
from .backward import _grad_partial_kernel
from .bound_launch import BoundLaunch
from .counters import arrival_counters
from .fused import _fused_backward_kernel, _fused_forward_kernel
from .layout import ChannelView
from .normalize import _channel_affine_kernel, _geometry, _grid, _meta
from .plans import Plan, cdiv, channel_block, splits_block
from .runtime import accumulator_dtype, split_float, tl_accumulator
from .stats import _partial_launch, stats_meta

_ZERO = split_float(0.0)


def _mask_plan(plan: Plan, kind: EpilogueKind) -> Plan:
    """The plan of a launch that writes or reads the 1-bit mask with its rows packed 8 to
    a byte: at least 8 rows per tile (as the general route's launchers make it)."""
    return replace(plan, block_rows=8) if kind.mask and plan.block_rows < 8 else plan


def _mask_rows(view: ChannelView, kind: EpilogueKind):
    """The mask's rows (ceil(rows / 8)), or None without one."""
    return -(-view.rows // 8) if kind.mask else None


class SplitTrainLaunch:
    """The split path's training forward (stats.batch_stats, then normalize.channel_affine):
    the partial statistics with their last-program merge, then the epilogue."""

    __slots__ = ("channels", "splits", "blocks", "acc", "stats_sizes", "affine_constants", "stats", "affine",
                 "activated", "mask_rows", "coefficients")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool, has_bias: bool, has_running: bool,
                 has_counter: bool, cumulative: bool, kind: EpilogueKind = PLAIN):
        self.activated = kind != PLAIN
        self.mask_rows = _mask_rows(view, kind)
        self.coefficients = kind.activation != 0
        self.channels = view.channels
        self.splits = plan.num_splits
        self.blocks = cdiv(view.channels, plan.block_channels)
        self.acc = accumulator_dtype(view.tensor.dtype)
        stats_kernel, block_rows = _partial_launch(view, plan)
        self.stats_sizes = (*_geometry(view), plan.rows_per_split)
        self.stats = BoundLaunch(stats_kernel, (plan.num_splits, self.blocks), stats_meta(
            view, plan, block_rows, has_weight, has_bias, has_running, has_counter, cumulative))
        # The epilogue's arguments after its placeholders up to eps: the slope, the
        # geometry and the pivot's stride (normalize._arguments' order).
        self.affine_constants = (*split_float(kind.slope), *_geometry(view), 1, *_ZERO)
        affine_plan = _mask_plan(plan, kind)
        self.affine = BoundLaunch(_channel_affine_kernel, _grid(view, affine_plan),
                                  _meta(view, affine_plan, kind, False, False, False, False))

    def __call__(self, x, weight, bias, eps: float, running, residual=None):
        channels, acc = self.channels, self.acc
        # BatchStats' fields: mean_shifted, rstd, scale, shift, mean, var_unbiased, pivot.
        mean_s = x.new_empty(channels, dtype=acc)
        rstd = x.new_empty(channels, dtype=acc)
        scale = x.new_empty(channels, dtype=acc)
        shift = x.new_empty(channels, dtype=acc)
        mean = x.new_empty(channels, dtype=acc)
        var_unbiased = x.new_empty(channels, dtype=acc)
        pivot = x.new_empty(channels, dtype=acc)
        parts = (self.splits, channels)
        part_pivot = x.new_empty(parts, dtype=acc)
        part_hi = x.new_empty(parts, dtype=acc)
        part_lo = x.new_empty(parts, dtype=acc)
        part_m2 = x.new_empty(parts, dtype=acc)
        if running is None:
            running_mean = running_var = counter = rstd
            momentum = 0.0
        else:
            running_mean, running_var, counter, momentum = running
            if counter is None:
                counter = rstd
            if momentum is None:
                momentum = 0.0
        self.stats(
            x, pivot, part_pivot, part_hi, part_lo, part_m2,
            weight if weight is not None else rstd, bias if bias is not None else rstd,
            mean_s, rstd, scale, shift, mean, var_unbiased, running_mean, running_var, counter,
            arrival_counters(x, self.blocks + 1), *self.stats_sizes, *split_float(eps), *split_float(momentum),
        )
        y = torch.empty_like(x)
        mask = x.new_empty((self.mask_rows, channels), dtype=torch.uint8) if self.mask_rows is not None else None
        # normalize._arguments' order: x, dy, out, pivot, scale, shift, dy_scale, residual,
        # mask, act_scale, act_shift, then the constants, then the backward's sums.
        self.affine(x, x, y, pivot, scale, shift, scale, residual if residual is not None else x,
                    mask if mask is not None else x, scale, scale, *self.affine_constants, x, x, x, 0)
        if not self.activated:
            return y, mean_s, rstd, mean, var_unbiased, pivot
        if mask is None:
            mask = x.new_empty(0, dtype=torch.uint8)
        if not self.coefficients:  # ops/activated.py's placeholders: nothing recomputes z
            scale = x.new_zeros(0, dtype=acc)
            shift = x.new_zeros(0, dtype=acc)
        return y, mean_s, rstd, mean, var_unbiased, mask, pivot, scale, shift


class FusedTrainLaunch:
    """The single-read training forward (fused.fused_forward): one launch."""

    __slots__ = ("channels", "acc", "sizes", "cumulative", "forward", "activated", "mask_rows", "slope",
                 "coefficients")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool, has_bias: bool, has_running: bool,
                 has_counter: bool, cumulative: bool, kind: EpilogueKind = PLAIN):
        self.activated = kind != PLAIN
        self.mask_rows = _mask_rows(view, kind)
        self.slope = split_float(kind.slope)
        # An activation's backward recomputes z from the scale and shift y was formed with.
        self.coefficients = kind.activation != 0
        plan = _mask_plan(plan, kind)
        self.channels = view.channels
        self.acc = accumulator_dtype(view.tensor.dtype)
        self.sizes = _geometry(view)
        self.cumulative = cumulative
        self.forward = BoundLaunch(_fused_forward_kernel, (cdiv(view.channels, plan.block_channels),), dict(
            BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
            SPLIT_ROWS=view.split_rows, INT64=plan.int64, ACC=tl_accumulator(view.tensor.dtype),
            **kind.constexprs(), HAS_RUNNING=has_running, HAS_COUNTER=has_counter, CUMULATIVE=cumulative,
            STORE_COEFFICIENTS=self.coefficients, num_warps=plan.num_warps,
        ))

    def __call__(self, x, weight, bias, eps: float, running, residual=None):
        channels, acc = self.channels, self.acc
        y = torch.empty_like(x)
        pivot = x.new_empty(channels, dtype=acc)
        mean_s = x.new_empty(channels, dtype=acc)
        rstd = x.new_empty(channels, dtype=acc)
        mean = x.new_empty(channels, dtype=acc)
        var_unbiased = x.new_empty(channels, dtype=acc)
        if running is None:
            running_mean = running_var = counter = rstd
            momentum = 0.0
        else:
            running_mean, running_var, counter, momentum = running
            if counter is None:
                counter = rstd
            if momentum is None:
                momentum = 0.0
        mask = x.new_empty((self.mask_rows, channels), dtype=torch.uint8) if self.mask_rows is not None else None
        # An activation's coefficients, written by the same launch.
        scale = x.new_empty(channels, dtype=acc) if self.coefficients else None
        shift = x.new_empty(channels, dtype=acc) if self.coefficients else None
        # fused.fused_forward's order; the epilogue's pointers (placeholders where unused):
        # residual, mask, act_scale, act_shift, then the slope.
        self.forward(
            x, y, weight if weight is not None else rstd, bias if bias is not None else rstd,
            pivot, mean_s, rstd, mean, var_unbiased, residual if residual is not None else x,
            mask if mask is not None else x, scale if scale is not None else rstd,
            shift if shift is not None else rstd, *self.slope,
            *self.sizes, *split_float(eps), running_mean, running_var, counter, *split_float(momentum),
            arrival_counters(x, 1) if self.cumulative else rstd,
        )
        if not self.activated:
            return y, mean_s, rstd, mean, var_unbiased, pivot
        if mask is None:
            mask = x.new_empty(0, dtype=torch.uint8)
        if scale is None:  # ops/activated.py's placeholders: nothing recomputes z without an activation
            scale = x.new_zeros(0, dtype=acc)
            shift = x.new_zeros(0, dtype=acc)
        return y, mean_s, rstd, mean, var_unbiased, mask, pivot, scale, shift


class SplitBackwardLaunch:
    """The split path's backward under batch statistics (backward.batch_norm_grads): the
    partial sums, then the dx epilogue.  Where the splits are few for the tile's rows
    (plans.sums_in_epilogue) each epilogue program sums them and the epilogue writes
    dweight and dbias; otherwise (``combine``) the partial sums' last program of each
    channel block does, and writes dx's coefficients for the epilogue."""

    __slots__ = ("channels", "splits", "blocks", "acc", "combine", "sums_constants", "affine_constants", "sums",
                 "affine", "activated", "residual")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool, combine: bool, kind: EpilogueKind = PLAIN):
        self.activated = kind != PLAIN
        self.residual = kind.residual  # the residual's gradient, written by the dx epilogue
        self.channels = view.channels
        self.splits = plan.num_splits
        self.blocks = cdiv(view.channels, plan.block_channels)
        self.acc = accumulator_dtype(view.tensor.dtype)
        self.combine = combine
        slope = split_float(kind.slope)
        self.sums_constants = (*slope, *_geometry(view), 1, plan.rows_per_split)
        self.sums = BoundLaunch(_grad_partial_kernel, (plan.num_splits, self.blocks), dict(
            BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, SPLIT_ROWS=view.split_rows, INT64=plan.int64,
            ACC=tl_accumulator(view.tensor.dtype), **kind.constexprs(), RUNNING=False,
            HAS_WEIGHT=combine and has_weight, COMBINE=combine, BATCH_STATS=combine, SUMS=False,
            SPLITS=splits_block(plan.num_splits, channel_block(view.channels)), num_warps=plan.num_warps,
        ))
        self.affine_constants = (*slope, *_geometry(view), 1, *_ZERO)
        affine_plan = _mask_plan(plan, kind)
        if combine:
            affine_meta = _meta(view, affine_plan, kind, True, False, False, False)
        else:
            affine_meta = _meta(view, affine_plan, kind, True, False, has_weight, False, plan.num_splits, True)
        self.affine = BoundLaunch(_channel_affine_kernel, _grid(view, affine_plan), affine_meta)

    def __call__(self, dy, x, weight, pivot, mean_shifted, rstd, act_scale=None, act_shift=None, mask=None):
        channels, acc = self.channels, self.acc
        dweight = x.new_empty(channels, dtype=weight.dtype if weight is not None else acc)
        dbias = torch.empty_like(dweight)
        parts = x.new_empty((2, self.splits, channels), dtype=acc)
        # The epilogue's tensors (placeholders of the right kind where plain: never read).
        dres = torch.empty_like(x, dtype=dy.dtype) if self.residual else None
        res_ptr = dres if dres is not None else x
        mask_ptr = mask if mask is not None else x
        if self.combine:
            coef_a = x.new_empty(channels, dtype=acc)
            coef_b = x.new_empty(channels, dtype=acc)
            coef_c = x.new_empty(channels, dtype=acc)
            # backward._partial_sums' order: x, dy, pivot, mean_shifted, parts, the
            # epilogue's pointers, the sizes, dx, running_var, weight, eps, then what
            # the last programs read and write: rstd, dweight, dbias, A, B, C, sums, counters.
            self.sums(
                x, dy, pivot, mean_shifted, parts, res_ptr, mask_ptr,
                act_scale if act_scale is not None else parts, act_shift if act_shift is not None else parts,
                *self.sums_constants, x, parts, weight if weight is not None else parts, *_ZERO,
                rstd, dweight, dbias, coef_a, coef_b, coef_c, parts, arrival_counters(x, self.blocks),
            )
            dx = torch.empty_like(x)
            # dx = dy * A + (x - K) * B + C (normalize._arguments' order).
            self.affine(x, dy, dx, pivot, coef_b, coef_c, coef_a, res_ptr, mask_ptr,
                        act_scale if act_scale is not None else coef_b,
                        act_shift if act_shift is not None else coef_b, *self.affine_constants, x, x, x, 0)
        else:
            self.sums(
                x, dy, pivot, mean_shifted, parts, res_ptr, mask_ptr,
                act_scale if act_scale is not None else parts, act_shift if act_shift is not None else parts,
                *self.sums_constants, x, parts, parts, *_ZERO, parts, parts, parts, parts, parts, parts, parts, parts,
            )
            dx = torch.empty_like(x)
            # Each program sums the splits' parts and forms A, B, C itself; the first row
            # tile's programs write dweight and dbias.
            self.affine(
                x, dy, dx, pivot, rstd, mean_shifted, weight if weight is not None else rstd, res_ptr, mask_ptr,
                act_scale if act_scale is not None else rstd, act_shift if act_shift is not None else rstd,
                *self.affine_constants, parts, dweight, dbias, self.splits,
            )
        if self.activated:
            return dx, dweight, dbias, dres
        return dx, dweight, dbias


class FusedBackwardLaunch:
    """The single-read backward under batch statistics (fused.fused_backward): one launch."""

    __slots__ = ("channels", "acc", "constants", "backward", "activated", "residual")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool, kind: EpilogueKind = PLAIN):
        self.activated = kind != PLAIN
        self.residual = kind.residual  # the residual's gradient, written by the same launch
        self.channels = view.channels
        self.acc = accumulator_dtype(view.tensor.dtype)
        self.constants = (*split_float(kind.slope), *_geometry(view), 1, *_ZERO)
        self.backward = BoundLaunch(_fused_backward_kernel, (cdiv(view.channels, plan.block_channels),), dict(
            BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, HAS_WEIGHT=has_weight, BATCH_STATS=True,
            SPLIT_ROWS=view.split_rows, INT64=plan.int64, ACC=tl_accumulator(view.tensor.dtype),
            **kind.constexprs(), RUNNING=False, num_warps=plan.num_warps,
        ))

    def __call__(self, dy, x, weight, pivot, mean_shifted, rstd, act_scale=None, act_shift=None, mask=None):
        dx = torch.empty_like(x)
        dweight = x.new_empty(self.channels, dtype=weight.dtype if weight is not None else self.acc)
        dbias = torch.empty_like(dweight)
        dres = torch.empty_like(x, dtype=dy.dtype) if self.residual else None
        self.backward(
            x, dy, dx, weight if weight is not None else rstd, pivot, mean_shifted, rstd, dweight, dbias,
            dres if dres is not None else x, mask if mask is not None else x,
            act_scale if act_scale is not None else rstd, act_shift if act_shift is not None else rstd,
            *self.constants,
        )
        return (dx, dweight, dbias, dres) if self.activated else (dx, dweight, dbias)
