"""Batch norm on the native CPU path: the four calls every implementation provides
(bntriton/dispatch.py), and the two helpers the front end also needs.

Plain batch norm is cpu.py's; an ``epilogue`` (activation, residual, 1-bit mask, in-place
output) is composed around it from torch ops by activations.py.
"""
from __future__ import annotations

import torch

from ..kernels.activations import NO_EPILOGUE, Epilogue
from ..kernels.layout import ChannelView
from ..kernels.runtime import accumulator_dtype
from ..kernels.stats import BatchStats, RunningStats
from . import activations, cpu


def forward_train(view: ChannelView, weight, bias, eps: float, epilogue: Epilogue = NO_EPILOGUE,
                  running: RunningStats | None = None) -> tuple[torch.Tensor, BatchStats]:
    """``(y, stats)`` normalized with the batch's statistics (``view.rows >= 1``), then
    ``running`` updated when given."""
    if epilogue is NO_EPILOGUE:
        y, stats = cpu.forward_train(view, weight, bias, eps)
    else:
        y, stats = activations.forward_train(view, weight, bias, eps, epilogue)
    if running is not None:
        update_running_stats(running.mean, running.var, running.num_batches_tracked, stats.mean,
                             stats.var_unbiased, running.momentum)
    return y, stats


def forward_eval(view: ChannelView, weight, bias, running_mean, running_var, eps: float,
                 epilogue: Epilogue = NO_EPILOGUE, inference: bool = False) -> torch.Tensor:
    """``y`` normalized with the running statistics (``view.rows >= 1``).  ``inference``:
    no backward will follow, which lets a fused epilogue be composed from torch's own eval."""
    if epilogue is NO_EPILOGUE:
        return cpu.forward_eval(view, weight, bias, running_mean, running_var, eps)
    return activations.forward_eval(view, weight, bias, running_mean, running_var, eps, epilogue, inference)


def backward(view: ChannelView, dy, weight, pivot, pivot_stride: int, mean_shifted, rstd, batch_stats: bool,
             param_dtype: torch.dtype, epilogue: Epilogue = NO_EPILOGUE):
    """``(dx, dweight, dbias)`` given the forward's rstd."""
    if epilogue is NO_EPILOGUE:
        return cpu.backward(view, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats, param_dtype)
    return activations.backward(view, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats,
                                param_dtype, epilogue)


def backward_eval(view: ChannelView, dy, weight, running_mean, running_var, eps: float, param_dtype: torch.dtype):
    """``(dx, dweight, dbias)`` of the eval forward: the running statistics' rstd, a zero
    shifted mean and the running mean as the pivot."""
    rstd = torch.rsqrt(running_var.to(accumulator_dtype(view.tensor.dtype)) + eps)
    return cpu.backward(view, dy, weight, running_mean, 1, torch.zeros_like(rstd), rstd, False, param_dtype)


def affine(view: ChannelView, pivot, pivot_stride: int, scale, shift, out_dtype, epilogue: Epilogue):
    """``(x - K) * scale + shift`` with the epilogue, in ``out_dtype``."""
    return activations.affine(view, pivot, pivot_stride, scale, shift, out_dtype, epilogue)


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum) -> None:
    """The counter and running-statistics update, in place."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    cpu.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum)
