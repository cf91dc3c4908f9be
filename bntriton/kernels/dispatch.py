"""Which kernels run: the single-read path when a channel block's rows fit on chip
(fused.py), else the grid-split path (stats.py + normalize.py, backward.py)."""
from __future__ import annotations

import torch

from .backward import batch_norm_grads
from .fused import fused_backward, fused_forward
from .plans import fused_plan, plan
from .layout import ChannelView
from .normalize import channel_affine
from .stats import BatchStats, batch_stats


def forward_train(view: ChannelView, weight, bias, eps: float) -> tuple[torch.Tensor, BatchStats]:
    """``(y, stats)`` normalized with the batch's statistics (``view.rows >= 1``)."""
    single_read = fused_plan(view)
    if single_read is not None:
        return fused_forward(view, single_read, weight, bias, eps)
    tiles = plan(view)
    stats = batch_stats(view, tiles, weight, bias, eps)
    y = channel_affine(view, tiles, stats.pivot, 1, stats.scale, stats.shift)
    return y, stats


def backward(
    view: ChannelView, dy, weight, pivot, pivot_stride: int, mean_shifted, rstd,
    batch_stats: bool, param_dtype: torch.dtype,
):
    """``(dx, dweight, dbias)``; ``dy`` shares the view's strides.  ``pivot`` /
    ``mean_shifted`` / ``rstd``: what the forward normalized with, the batch's
    (``BatchStats.pivot``, stride 1) or the running statistics (``running_mean``, a zero
    shifted mean)."""
    single_read = fused_plan(view)  # None for an empty batch: the split path handles it
    if single_read is not None:
        return fused_backward(
            view, single_read, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats, param_dtype
        )
    return batch_norm_grads(
        view, plan(view), dy, weight, pivot, pivot_stride, mean_shifted, rstd,
        batch_stats=batch_stats, param_dtype=param_dtype,
    )
