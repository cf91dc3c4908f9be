"""Which kernels run: the single-read path when a channel block's rows fit on chip
(fused.py), else the grid-split path (stats.py + normalize.py, backward.py)."""
from __future__ import annotations

import torch

from .backward import batch_norm_grads
from .fused import fused_backward, fused_forward
from .plans import fused_plan, plan
from .layout import ChannelView
from .normalize import channel_affine
from .stats import BatchStats, RunningStats, batch_stats, update_running_stats


def forward_train(
    view: ChannelView, weight, bias, eps: float, running: RunningStats | None = None
) -> tuple[torch.Tensor, BatchStats]:
    """``(y, stats)`` normalized with the batch's statistics (``view.rows >= 1``); with
    ``running`` given, also updates the running statistics and the counter: inside the
    statistics' combine on the split path (three launches in all), after the single read
    otherwise (two)."""
    single_read = fused_plan(view)
    if single_read is not None:
        y, stats = fused_forward(view, single_read, weight, bias, eps)
        if running is not None:
            update_running_stats(
                running.mean, running.var, running.num_batches_tracked, stats.mean, stats.var_unbiased,
                running.momentum,
            )
        return y, stats
    tiles = plan(view)
    stats = batch_stats(view, tiles, weight, bias, eps, running)
    y = channel_affine(view, tiles, view.tensor, view.stride_c, stats.scale, stats.shift)
    return y, stats


def backward(
    view: ChannelView, dy, weight, pivot, pivot_stride: int, mean_shifted, rstd,
    batch_stats: bool, param_dtype: torch.dtype,
):
    """``(dx, dweight, dbias)``; ``dy`` shares the view's strides."""
    single_read = fused_plan(view)  # None for an empty batch: the split path handles it
    if single_read is not None:
        return fused_backward(
            view, single_read, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats, param_dtype
        )
    return batch_norm_grads(
        view, plan(view), dy, weight, pivot, pivot_stride, mean_shifted, rstd,
        batch_stats=batch_stats, param_dtype=param_dtype,
    )
