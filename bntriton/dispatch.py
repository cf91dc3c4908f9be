"""Which implementation runs, bntriton/kernels (Triton) or bntriton/native (torch's CPU
operations): for CPU tensors the native path (native/cpu.py) unless the interpreter is
asked for (kernels/runtime.py's current_cpu_backend); else the kernels: the single-read
path when a channel block's rows fit on chip (kernels/fused.py), else the grid-split path
(kernels/stats.py + kernels/normalize.py, kernels/backward.py).

An ``epilogue`` (activation, residual, 1-bit mask, in-place output; kernels/activations.py)
is a constexpr switch in the kernels; on the native path native/activations.py composes it
from torch ops around native/cpu.py's functions.
"""
from __future__ import annotations

import torch

from .native import activations as native_act, cpu as native_cpu
from .kernels.activations import NO_EPILOGUE, Epilogue
from .kernels.backward import batch_norm_grads, running_grads
from .kernels.fused import fused_backward, fused_forward
from .kernels import plans
from .kernels.plans import fused_plan, plan, sums_in_epilogue
from .kernels.cached_launches import FusedBackwardLaunch, FusedTrainLaunch, SplitBackwardLaunch, SplitTrainLaunch
from .kernels.layout import ChannelView, view_params
from .kernels.normalize import EvalLaunch, channel_affine, eval_affine
from .kernels.runtime import accumulator_dtype, current_cpu_backend
from .kernels.stats import BatchStats, RunningStats, batch_stats
from .kernels.stats import update_running_stats as _update_running_stats_kernel


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


# Launches cached per input geometry (shape, strides, dtype, device, which optional
# tensors exist, and the SM count plans are made for under plans.planned_for): a model
# sees few, and working out the view and the plans on every call cost an eval call ~5 us
# of host time (a sixth of torch's whole call) and a training call dozens of frames.
# Only eager calls on plain tensors on the kernels' route use them: the native CPU path
# decides for itself, traced tensors take the general route, and plans forced by a test
# hook are not part of the key, so nothing cached is used (or kept) under one.
_LAUNCHES: dict = {}
_MAX_LAUNCHES = 1024
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_EVAL, _TRAIN, _BACKWARD = 0, 1, 2
# plans' hook state, read here without a call per lookup (both are mutated in place).
_FORCED, _PLANNED_SM_COUNT = plans._FORCED, plans._PLANNED_SM_COUNT


def _cached_view(x: torch.Tensor) -> ChannelView | None:
    """``x``'s view, or None where the general route decides: an input the kernels read
    through a copy (channel_view would copy it, and the general route then again) or
    with no rows or channels."""
    params = view_params(tuple(x.shape), x.stride())
    if params is None or params[0] == 0 or params[1] == 0:
        return None
    return ChannelView(x, *params)


def _remember(key, launch):
    if len(_LAUNCHES) >= _MAX_LAUNCHES:
        _LAUNCHES.clear()
    _LAUNCHES[key] = launch
    return launch


def eval_launch(x: torch.Tensor, weight, bias) -> EvalLaunch | None:
    """The cached launch of :func:`forward_eval` without an epilogue for ``x``, or None
    where the general route decides (see :func:`_cached_view` and the note above)."""
    if type(x) not in _PLAIN or _FORCED or x.is_cpu and current_cpu_backend() == "native":
        return None
    key = (_EVAL, x.shape, x.stride(), x.dtype, x.get_device(), weight is None, bias is None,
           _PLANNED_SM_COUNT[-1] if _PLANNED_SM_COUNT else None)
    launch = _LAUNCHES.get(key)
    if launch is None:
        view = _cached_view(x)
        if view is None:
            return None
        launch = _remember(key, EvalLaunch(view, plan(view), weight is not None, bias is not None))
    return launch


def train_launch(x: torch.Tensor, weight, bias, running: RunningStats | None):
    """The cached launches of :func:`forward_train` without an epilogue for ``x``, updating
    ``running`` (dense buffers) when given: a callable ``(x, weight, bias, eps, running)
    -> (y, mean_shifted, rstd, mean, var_unbiased, pivot)``, or None where the general
    route decides."""
    if type(x) not in _PLAIN or _FORCED or x.is_cpu and current_cpu_backend() == "native":
        return None
    if running is None:
        flags = None
    else:
        counter = running.num_batches_tracked is not None
        cumulative = running.momentum is None
        if cumulative and not counter:
            return None  # an error the general route raises
        flags = (counter, cumulative)
    key = (_TRAIN, x.shape, x.stride(), x.dtype, x.get_device(), weight is None, bias is None, flags,
           _PLANNED_SM_COUNT[-1] if _PLANNED_SM_COUNT else None)
    launch = _LAUNCHES.get(key)
    if launch is None:
        view = _cached_view(x)
        if view is None:
            return None
        has = (weight is not None, bias is not None, running is not None, *(flags or (False, False)))
        single_read = fused_plan(view)
        if single_read is not None:
            launch = FusedTrainLaunch(view, single_read, *has)
        else:
            launch = SplitTrainLaunch(view, plan(view), *has)
        launch = _remember(key, launch)
    return launch


def backward_launch(x: torch.Tensor, dy: torch.Tensor, weight):
    """The cached launches of :func:`backward` under batch statistics without an
    epilogue: a callable ``(dy, x, weight, pivot, mean_shifted, rstd) -> (dx, dweight,
    dbias)``, or None where the general route decides (also for a ``dy`` of other
    strides than ``x``, which that route copies first)."""
    if (type(x) not in _PLAIN or _FORCED or x.is_cpu and current_cpu_backend() == "native"
            or type(dy) not in _PLAIN or dy.stride() != x.stride()):
        return None
    key = (_BACKWARD, x.shape, x.stride(), x.dtype, x.get_device(), weight is None,
           _PLANNED_SM_COUNT[-1] if _PLANNED_SM_COUNT else None)
    launch = _LAUNCHES.get(key)
    if launch is None:
        view = _cached_view(x)
        if view is None:
            return None
        single_read = fused_plan(view)
        if single_read is not None:
            launch = FusedBackwardLaunch(view, single_read, weight is not None)
        else:
            split = plan(view)
            launch = SplitBackwardLaunch(view, split, weight is not None,
                                         combine=not sums_in_epilogue(split, x.element_size()))
        launch = _remember(key, launch)
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
