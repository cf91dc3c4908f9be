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

Plain batch norm only (no epilogue): a fused activation or residual takes the general
route.
"""
from __future__ import annotations

import torch

from .activations import NO_EPILOGUE
from .backward import _grad_partial_kernel
from .bound_launch import BoundLaunch
from .counters import arrival_counters
from .fused import _fused_backward_kernel, _fused_forward_kernel
from .layout import ChannelView
from .normalize import _channel_affine_kernel, _geometry, _grid, _meta
from .plans import Plan, cdiv, channel_block, splits_block
from .runtime import accumulator_dtype, split_float, tl_accumulator
from .stats import _partial_launch, stats_meta

# The slope's two parts: unused without an activation, passed all the same.
_SLOPE = split_float(NO_EPILOGUE.slope)
_ZERO = split_float(0.0)


class SplitTrainLaunch:
    """The split path's training forward (stats.batch_stats, then normalize.channel_affine):
    the partial statistics with their last-program merge, then the epilogue."""

    __slots__ = ("channels", "splits", "blocks", "acc", "stats_sizes", "affine_constants", "stats", "affine")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool, has_bias: bool, has_running: bool,
                 has_counter: bool, cumulative: bool):
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
        self.affine_constants = (*_SLOPE, *_geometry(view), 1, *_ZERO)
        self.affine = BoundLaunch(_channel_affine_kernel, _grid(view, plan),
                                  _meta(view, plan, NO_EPILOGUE, False, False, False, False))

    def __call__(self, x, weight, bias, eps: float, running):
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
        # normalize._arguments' order: x, dy, out, pivot, scale, shift, dy_scale, residual,
        # mask, act_scale, act_shift, then the constants, then the backward's sums.
        self.affine(x, x, y, pivot, scale, shift, scale, x, x, scale, scale, *self.affine_constants, x, x, x, 0)
        return y, mean_s, rstd, mean, var_unbiased, pivot


class FusedTrainLaunch:
    """The single-read training forward (fused.fused_forward): one launch."""

    __slots__ = ("channels", "acc", "sizes", "cumulative", "forward")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool, has_bias: bool, has_running: bool,
                 has_counter: bool, cumulative: bool):
        self.channels = view.channels
        self.acc = accumulator_dtype(view.tensor.dtype)
        self.sizes = _geometry(view)
        self.cumulative = cumulative
        self.forward = BoundLaunch(_fused_forward_kernel, (cdiv(view.channels, plan.block_channels),), dict(
            BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
            SPLIT_ROWS=view.split_rows, INT64=plan.int64, ACC=tl_accumulator(view.tensor.dtype),
            **NO_EPILOGUE.constexprs(), HAS_RUNNING=has_running, HAS_COUNTER=has_counter, CUMULATIVE=cumulative,
            STORE_COEFFICIENTS=False, num_warps=plan.num_warps,
        ))

    def __call__(self, x, weight, bias, eps: float, running):
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
        # fused.fused_forward's order; the epilogue's placeholders: residual, mask,
        # act_scale, act_shift, slope.
        self.forward(
            x, y, weight if weight is not None else rstd, bias if bias is not None else rstd,
            pivot, mean_s, rstd, mean, var_unbiased, x, x, rstd, rstd, *_SLOPE,
            *self.sizes, *split_float(eps), running_mean, running_var, counter, *split_float(momentum),
            arrival_counters(x, 1) if self.cumulative else rstd,
        )
        return y, mean_s, rstd, mean, var_unbiased, pivot


class SplitBackwardLaunch:
    """The split path's backward under batch statistics (backward.batch_norm_grads): the
    partial sums, then the dx epilogue.  Where the splits are few for the tile's rows
    (plans.sums_in_epilogue) each epilogue program sums them and the epilogue writes
    dweight and dbias; otherwise (``combine``) the partial sums' last program of each
    channel block does, and writes dx's coefficients for the epilogue."""

    __slots__ = ("channels", "splits", "blocks", "acc", "combine", "sums_constants", "affine_constants", "sums",
                 "affine")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool, combine: bool):
        self.channels = view.channels
        self.splits = plan.num_splits
        self.blocks = cdiv(view.channels, plan.block_channels)
        self.acc = accumulator_dtype(view.tensor.dtype)
        self.combine = combine
        self.sums_constants = (*_SLOPE, *_geometry(view), 1, plan.rows_per_split)
        self.sums = BoundLaunch(_grad_partial_kernel, (plan.num_splits, self.blocks), dict(
            BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, SPLIT_ROWS=view.split_rows, INT64=plan.int64,
            ACC=tl_accumulator(view.tensor.dtype), **NO_EPILOGUE.constexprs(), RUNNING=False,
            HAS_WEIGHT=combine and has_weight, COMBINE=combine, BATCH_STATS=combine, SUMS=False,
            SPLITS=splits_block(plan.num_splits, channel_block(view.channels)), num_warps=plan.num_warps,
        ))
        self.affine_constants = (*_SLOPE, *_geometry(view), 1, *_ZERO)
        if combine:
            affine_meta = _meta(view, plan, NO_EPILOGUE, True, False, False, False)
        else:
            affine_meta = _meta(view, plan, NO_EPILOGUE, True, False, has_weight, False, plan.num_splits, True)
        self.affine = BoundLaunch(_channel_affine_kernel, _grid(view, plan), affine_meta)

    def __call__(self, dy, x, weight, pivot, mean_shifted, rstd):
        channels, acc = self.channels, self.acc
        dweight = x.new_empty(channels, dtype=weight.dtype if weight is not None else acc)
        dbias = torch.empty_like(dweight)
        parts = x.new_empty((2, self.splits, channels), dtype=acc)
        if self.combine:
            coef_a = x.new_empty(channels, dtype=acc)
            coef_b = x.new_empty(channels, dtype=acc)
            coef_c = x.new_empty(channels, dtype=acc)
            # backward._partial_sums' order: x, dy, pivot, mean_shifted, parts, the
            # epilogue's placeholders, the sizes, dx, running_var, weight, eps, then what
            # the last programs read and write: rstd, dweight, dbias, A, B, C, sums, counters.
            self.sums(
                x, dy, pivot, mean_shifted, parts, x, x, parts, parts, *self.sums_constants,
                x, parts, weight if weight is not None else parts, *_ZERO,
                rstd, dweight, dbias, coef_a, coef_b, coef_c, parts, arrival_counters(x, self.blocks),
            )
            dx = torch.empty_like(x)
            # dx = dy * A + (x - K) * B + C (normalize._arguments' order).
            self.affine(x, dy, dx, pivot, coef_b, coef_c, coef_a, x, x, coef_b, coef_b, *self.affine_constants,
                        x, x, x, 0)
            return dx, dweight, dbias
        self.sums(
            x, dy, pivot, mean_shifted, parts, x, x, parts, parts, *self.sums_constants,
            x, parts, parts, *_ZERO, parts, parts, parts, parts, parts, parts, parts, parts,
        )
        dx = torch.empty_like(x)
        # Each program sums the splits' parts and forms A, B, C itself; the first row
        # tile's programs write dweight and dbias.
        self.affine(
            x, dy, dx, pivot, rstd, mean_shifted, weight if weight is not None else rstd, x, x, rstd, rstd,
            *self.affine_constants, parts, dweight, dbias, self.splits,
        )
        return dx, dweight, dbias


class FusedBackwardLaunch:
    """The single-read backward under batch statistics (fused.fused_backward): one launch."""

    __slots__ = ("channels", "acc", "constants", "backward")

    def __init__(self, view: ChannelView, plan: Plan, has_weight: bool):
        self.channels = view.channels
        self.acc = accumulator_dtype(view.tensor.dtype)
        self.constants = (*_SLOPE, *_geometry(view), 1, *_ZERO)
        self.backward = BoundLaunch(_fused_backward_kernel, (cdiv(view.channels, plan.block_channels),), dict(
            BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, HAS_WEIGHT=has_weight, BATCH_STATS=True,
            SPLIT_ROWS=view.split_rows, INT64=plan.int64, ACC=tl_accumulator(view.tensor.dtype),
            **NO_EPILOGUE.constexprs(), RUNNING=False, num_warps=plan.num_warps,
        ))

    def __call__(self, dy, x, weight, pivot, mean_shifted, rstd):
        dx = torch.empty_like(x)
        dweight = x.new_empty(self.channels, dtype=weight.dtype if weight is not None else self.acc)
        dbias = torch.empty_like(dweight)
        self.backward(
            x, dy, dx, weight if weight is not None else rstd, pivot, mean_shifted, rstd, dweight, dbias,
            x, x, rstd, rstd, *self.constants,
        )
        return dx, dweight, dbias
