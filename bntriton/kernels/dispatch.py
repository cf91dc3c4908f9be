"""Which implementation runs: for CPU tensors the native path (native_cpu.py, torch's CPU
operations) unless the interpreter is asked for (runtime.current_cpu_backend); else the
kernels: the single-read path when a channel block's rows fit on chip (fused.py), else
the grid-split path (stats.py + normalize.py, backward.py).

An ``epilogue`` (activation, residual, 1-bit mask, in-place output; activations.py) is
a constexpr switch in the kernels; on the native path native_act.py composes it from
torch ops around native_cpu.py's functions.
"""
from __future__ import annotations

import torch

from . import native_act, native_cpu
from .activations import NO_EPILOGUE, Epilogue
from .backward import batch_norm_grads, running_grads
from .fused import fused_backward, fused_forward
from . import plans
from .plans import fused_plan, plan
from .layout import ChannelView, view_params
from .normalize import EvalLaunch, channel_affine, eval_affine
from .runtime import accumulator_dtype, current_cpu_backend
from .stats import BatchStats, RunningStats, batch_stats
from .stats import update_running_stats as _update_running_stats_kernel


def _tiles(view: ChannelView, epilogue: Epilogue):
    """The split path's plan; a 1-bit mask keeps channels-first tiles several channels wide."""
    return plan(view, packed_mask=epilogue.mask is not None)


def native(t: torch.Tensor) -> bool:
    """Whether ``t`` (a CPU tensor) runs on the native CPU path rather than the kernels."""
    return t.is_cpu and current_cpu_backend() == "native"


def forward_train(
    view: ChannelView, weight, bias, eps: float, epilogue: Epilogue = NO_EPILOGUE,
    running: RunningStats | None = None,
) -> tuple[torch.Tensor, BatchStats]:
    """``(y, stats)`` normalized with the batch's statistics (``view.rows >= 1``);
    ``stats.scale`` / ``shift`` are those y was formed with on every path when the
    epilogue has an activation (its backward recomputes z from them); with
    ``running`` given, also updates the running statistics and the counter in the same
    launches: inside the partial statistics' last programs on the split path (two
    launches in all),
    inside the single-read kernel otherwise (one)."""
    if native(view.tensor):
        if epilogue is NO_EPILOGUE:
            y, stats = native_cpu.forward_train(view, weight, bias, eps)
        else:
            y, stats = native_act.forward_train(view, weight, bias, eps, epilogue)
        _update_running(running, stats)
        return y, stats
    single_read = fused_plan(view)
    if single_read is not None:
        # An activation's backward recomputes z from the forward's scale and shift.
        y, stats, updated = fused_forward(view, single_read, weight, bias, eps, epilogue, running,
                                          coefficients=epilogue.activation != 0)
        if not updated:
            _update_running(running, stats)
        return y, stats
    tiles = _tiles(view, epilogue)
    stats = batch_stats(view, tiles, weight, bias, eps, running)
    # The pivot is its own per-channel tensor (BatchStats.pivot): an in-place output
    # cannot overwrite it.
    y = channel_affine(view, tiles, stats.pivot, 1, stats.scale, stats.shift, epilogue=epilogue)
    return y, stats


def _update_running(running: RunningStats | None, stats: BatchStats) -> None:
    if running is not None:
        update_running_stats(
            running.mean, running.var, running.num_batches_tracked, stats.mean, stats.var_unbiased,
            running.momentum,
        )


def backward(
    view: ChannelView, dy, weight, pivot, pivot_stride: int, mean_shifted, rstd,
    batch_stats: bool, param_dtype: torch.dtype, epilogue: Epilogue = NO_EPILOGUE,
):
    """``(dx, dweight, dbias)``; ``dy`` shares the view's strides.  ``pivot`` /
    ``mean_shifted`` / ``rstd``: what the forward normalized with, the batch's
    (``BatchStats.pivot``, stride 1) or the running statistics (``running_mean``, a zero
    shifted mean)."""
    if native(view.tensor):
        if epilogue is NO_EPILOGUE:
            return native_cpu.backward(
                view, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats, param_dtype
            )
        return native_act.backward(
            view, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats, param_dtype, epilogue
        )
    single_read = fused_plan(view)  # None for an empty batch: the split path handles it
    if single_read is not None:
        return fused_backward(
            view, single_read, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats, param_dtype,
            epilogue,
        )
    return batch_norm_grads(
        view, _tiles(view, epilogue), dy, weight, pivot, pivot_stride, mean_shifted, rstd,
        batch_stats=batch_stats, param_dtype=param_dtype, epilogue=epilogue,
    )


def backward_running(view: ChannelView, dy, weight, running_mean, running_var, eps: float,
                     param_dtype: torch.dtype):
    """``(dx, dweight, dbias)`` of a forward that normalized with the running statistics:
    rstd from the running variance inside the kernels (one launch on either path:
    :func:`.backward.running_grads` on the split path)."""
    if native(view.tensor):
        rstd = torch.rsqrt(running_var.to(accumulator_dtype(view.tensor.dtype)) + eps)
        return native_cpu.backward(view, dy, weight, running_mean, 1, torch.zeros_like(rstd), rstd, False,
                                   param_dtype)
    single_read = fused_plan(view)  # None for an empty batch: the split path handles it
    if single_read is not None:
        return fused_backward(view, single_read, dy, weight, running_mean, 1, None, running_var, False,
                              param_dtype, running_eps=eps)
    return running_grads(view, plan(view), dy, weight, running_mean, running_var, eps, param_dtype)


def forward_eval(
    view: ChannelView, weight, bias, running_mean, running_var, eps: float, epilogue: Epilogue = NO_EPILOGUE,
    inference: bool = False,
) -> torch.Tensor:
    """``y`` normalized with the running statistics (``view.rows >= 1``).  ``inference``:
    no backward will follow (autograd records nothing), which lets the native path
    compose a fused epilogue from torch's own eval (native_act.forward_eval)."""
    if native(view.tensor):
        if epilogue is NO_EPILOGUE:
            return native_cpu.forward_eval(view, weight, bias, running_mean, running_var, eps)
        return native_act.forward_eval(view, weight, bias, running_mean, running_var, eps, epilogue, inference)
    # Pivot = running mean: y = (x - running_mean) * scale + bias, the coefficients folded
    # in the same launch.
    return eval_affine(view, _tiles(view, epilogue), running_mean, running_var, weight, bias, eps,
                       epilogue=epilogue)


# EvalLaunch per input geometry (shape, strides, dtype, device, which parameters exist):
# a model sees few, and working out the view and the plan on every call cost an eval
# call ~5 us of host time, a sixth of torch's whole call.
_EVAL_LAUNCHES: dict = {}
_MAX_EVAL_LAUNCHES = 1024


def eval_launch(x: torch.Tensor, weight, bias) -> EvalLaunch | None:
    """The cached launch of :func:`forward_eval` without an epilogue for ``x``, or None
    where the general route decides: the native CPU path, an input the kernels read
    through a copy (not dense) or with no rows, and plans forced or planned for another
    GPU (test hooks, perf/traffic.py)."""
    if native(x) or plans.overridden():
        return None
    key = (x.shape, x.stride(), x.dtype, x.get_device(), weight is None, bias is None)
    launch = _EVAL_LAUNCHES.get(key)
    if launch is None:
        # The view's parameters alone: channel_view would copy a non-dense input, which
        # the general route then copies again.
        params = view_params(tuple(x.shape), x.stride())
        if params is None or params[0] == 0:
            return None
        view = ChannelView(x, *params)
        if len(_EVAL_LAUNCHES) >= _MAX_EVAL_LAUNCHES:
            _EVAL_LAUNCHES.clear()
        launch = _EVAL_LAUNCHES[key] = EvalLaunch(view, plan(view), weight is not None, bias is not None)
    return launch


def affine(view: ChannelView, pivot, pivot_stride: int, scale, shift, out_dtype, epilogue: Epilogue):
    """``(x - K) * scale + shift`` with the epilogue's residual / activation, in ``out_dtype``
    (the fused backward's pre-activation when it cannot be recomputed inside the kernels)."""
    if native(view.tensor):
        return native_act.affine(view, pivot, pivot_stride, scale, shift, out_dtype, epilogue)
    return channel_affine(view, _tiles(view, epilogue), pivot, pivot_stride, scale, shift, out_dtype=out_dtype,
                          epilogue=epilogue)


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum) -> None:
    """The counter and running-statistics update, in place (see stats.update_running_stats)."""
    if native(running_mean):
        if momentum is None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        native_cpu.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum)
        return
    _update_running_stats_kernel(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum)
