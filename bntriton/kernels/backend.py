"""Batch norm on the Triton kernels: the four calls every implementation provides
(bntriton/dispatch.py), and the two helpers the front end also needs.

Each call picks the kernels' path for the view: the single-read path when a channel
block's rows fit on chip (fused.py: one launch), else the grid-split path (stats.py and
normalize.py forward, backward.py backward: two launches).  An ``epilogue``
(activation, residual, 1-bit mask, in-place output; activations.py) is a constexpr switch
inside the same kernels.
"""
from __future__ import annotations

import torch

from .activations import NO_EPILOGUE, Epilogue
from .backward import batch_norm_grads, running_grads
from .fused import fused_backward, fused_forward
from .layout import ChannelView
from .normalize import channel_affine, eval_affine
from .plans import fused_plan, plan
from .stats import BatchStats, RunningStats, batch_stats
from .stats import update_running_stats as _running_update


def _tiles(view: ChannelView, epilogue: Epilogue):
    """The split path's plan; a 1-bit mask keeps channels-first tiles several channels wide."""
    return plan(view, packed_mask=epilogue.mask is not None)


def forward_train(view: ChannelView, weight, bias, eps: float, epilogue: Epilogue = NO_EPILOGUE,
                  running: RunningStats | None = None) -> tuple[torch.Tensor, BatchStats]:
    """``(y, stats)`` normalized with the batch's statistics (``view.rows >= 1``), updating
    ``running`` when given in the same launches: the partial statistics' last programs on
    the split path (two launches in all), the single-read kernel otherwise (one)."""
    single_read = fused_plan(view)
    if single_read is not None:
        # An activation's backward recomputes z from the forward's scale and shift.
        y, stats, updated = fused_forward(view, single_read, weight, bias, eps, epilogue, running,
                                          coefficients=epilogue.activation != 0)
        if running is not None and not updated:
            update_running_stats(running.mean, running.var, running.num_batches_tracked, stats.mean,
                                 stats.var_unbiased, running.momentum)
        return y, stats
    tiles = _tiles(view, epilogue)
    stats = batch_stats(view, tiles, weight, bias, eps, running)
    # The pivot is its own per-channel tensor (BatchStats.pivot): an in-place output
    # cannot overwrite it.
    y = channel_affine(view, tiles, stats.pivot, 1, stats.scale, stats.shift, epilogue=epilogue)
    return y, stats


def forward_eval(view: ChannelView, weight, bias, running_mean, running_var, eps: float,
                 epilogue: Epilogue = NO_EPILOGUE, inference: bool = False) -> torch.Tensor:
    """``y`` normalized with the running statistics (``view.rows >= 1``): one launch, the
    coefficients folded into it (pivot = running mean).  ``inference`` changes nothing here."""
    return eval_affine(view, _tiles(view, epilogue), running_mean, running_var, weight, bias, eps,
                       epilogue=epilogue)


def backward(view: ChannelView, dy, weight, pivot, pivot_stride: int, mean_shifted, rstd, batch_stats: bool,
             param_dtype: torch.dtype, epilogue: Epilogue = NO_EPILOGUE):
    """``(dx, dweight, dbias)`` given the forward's rstd; one launch on the single-read path,
    two on the split path."""
    single_read = fused_plan(view)  # None for an empty batch: the split path handles it
    if single_read is not None:
        return fused_backward(view, single_read, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats,
                              param_dtype, epilogue)
    return batch_norm_grads(view, _tiles(view, epilogue), dy, weight, pivot, pivot_stride, mean_shifted, rstd,
                            batch_stats=batch_stats, param_dtype=param_dtype, epilogue=epilogue)


def backward_eval(view: ChannelView, dy, weight, running_mean, running_var, eps: float, param_dtype: torch.dtype):
    """``(dx, dweight, dbias)`` of the eval forward: rstd from the running variance inside
    the kernels (one launch on either path)."""
    single_read = fused_plan(view)  # None for an empty batch: the split path handles it
    if single_read is not None:
        return fused_backward(view, single_read, dy, weight, running_mean, 1, None, running_var, False,
                              param_dtype, running_eps=eps)
    return running_grads(view, plan(view), dy, weight, running_mean, running_var, eps, param_dtype)


def affine(view: ChannelView, pivot, pivot_stride: int, scale, shift, out_dtype, epilogue: Epilogue):
    """``(x - K) * scale + shift`` with the epilogue, in ``out_dtype``."""
    return channel_affine(view, _tiles(view, epilogue), pivot, pivot_stride, scale, shift, out_dtype=out_dtype,
                          epilogue=epilogue)


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum) -> None:
    """The counter and running-statistics update, in place, in one launch."""
    _running_update(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum)
