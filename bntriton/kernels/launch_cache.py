"""The kernels' launches cached per input geometry, for eager calls on plain tensors.

A model calls each batch norm with the same few geometries on every step; working out
the view and the plans on every call cost an eval call ~5 us of host time (a sixth of
torch's whole call) and a training call dozens of frames.  The front end asks here
first (:func:`eval_launch`, :func:`train_launch`, :func:`backward_launch`) and takes
the general route (bntriton/dispatch.py) when the answer is None.
"""
from __future__ import annotations

import torch

from . import plans
from .activations import PLAIN, EpilogueKind
from .cached_launches import FusedBackwardLaunch, FusedTrainLaunch, SplitBackwardLaunch, SplitTrainLaunch
from .layout import ChannelView, view_params
from .normalize import EvalLaunch
from .plans import fused_plan, plan, sums_in_epilogue
from .runtime import current_cpu_backend
from .stats import RunningStats


# Cached per geometry: shape, strides, dtype, device, which optional tensors exist,
# and the SM count plans are made for under plans.planned_for.
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


def eval_launch(x: torch.Tensor, weight, bias, kind: EpilogueKind = PLAIN, residual=None) -> EvalLaunch | None:
    """The cached launch of the eval forward for ``x`` with an epilogue of ``kind``, or
    None where the general route decides (see :func:`_cached_view` and the note above;
    also for a residual of other strides than ``x``)."""
    if type(x) not in _PLAIN or _FORCED or x.is_cpu and current_cpu_backend() == "native":
        return None
    if residual is not None and (type(residual) not in _PLAIN or residual.stride() != x.stride()):
        return None
    key = (_EVAL, x.shape, x.stride(), x.dtype, x.get_device(), weight is None, bias is None, kind,
           _PLANNED_SM_COUNT[-1] if _PLANNED_SM_COUNT else None)
    launch = _LAUNCHES.get(key)
    if launch is None:
        view = _cached_view(x)
        if view is None:
            return None
        # A 1-bit mask keeps channels-first tiles several channels wide.
        launch = _remember(key, EvalLaunch(view, plan(view, packed_mask=kind.mask), weight is not None,
                                           bias is not None, kind))
    return launch


def train_launch(x: torch.Tensor, weight, bias, running: RunningStats | None, kind: EpilogueKind = PLAIN,
                 residual=None):
    """The cached launches of the training forward for ``x`` with an epilogue of ``kind``,
    updating ``running`` (dense buffers) when given: a callable ``(x, weight, bias, eps,
    running, residual=None) -> (y, mean_shifted, rstd, mean, var_unbiased, pivot)`` (an
    activated kind: ``(y, mean_shifted, rstd, mean, var_unbiased, mask, pivot, act_scale,
    act_shift)``), or None where the general route decides (also for a residual of other
    strides than ``x``, which that route copies first)."""
    if type(x) not in _PLAIN or _FORCED or x.is_cpu and current_cpu_backend() == "native":
        return None
    if residual is not None and (type(residual) not in _PLAIN or residual.stride() != x.stride()):
        return None
    if running is None:
        flags = None
    else:
        counter = running.num_batches_tracked is not None
        cumulative = running.momentum is None
        if cumulative and not counter:
            return None  # an error the general route raises
        flags = (counter, cumulative)
    key = (_TRAIN, x.shape, x.stride(), x.dtype, x.get_device(), weight is None, bias is None, flags, kind,
           _PLANNED_SM_COUNT[-1] if _PLANNED_SM_COUNT else None)
    launch = _LAUNCHES.get(key)
    if launch is None:
        view = _cached_view(x)
        if view is None:
            return None
        has = (weight is not None, bias is not None, running is not None, *(flags or (False, False)))
        single_read = fused_plan(view)
        if single_read is not None:
            launch = FusedTrainLaunch(view, single_read, *has, kind)
        else:
            # A 1-bit mask keeps channels-first tiles several channels wide.
            launch = SplitTrainLaunch(view, plan(view, packed_mask=kind.mask), *has, kind)
        launch = _remember(key, launch)
    return launch


def backward_launch(x: torch.Tensor, dy: torch.Tensor, weight, kind: EpilogueKind = PLAIN):
    """The cached launches of the backward under batch statistics with an epilogue of
    ``kind`` (its residual: the residual's gradient, written by the launches): a callable
    ``(dy, x, weight, pivot, mean_shifted, rstd) -> (dx, dweight, dbias)`` (an activated
    kind: ``(dy, x, weight, pivot, mean_shifted, rstd, act_scale, act_shift, mask) ->
    (dx, dweight, dbias, dresidual)``), or None where the general route decides (also
    for a ``dy`` of other strides than ``x``, which that route copies first)."""
    if (type(x) not in _PLAIN or _FORCED or x.is_cpu and current_cpu_backend() == "native"
            or type(dy) not in _PLAIN or dy.stride() != x.stride()):
        return None
    key = (_BACKWARD, x.shape, x.stride(), x.dtype, x.get_device(), weight is None, kind,
           _PLANNED_SM_COUNT[-1] if _PLANNED_SM_COUNT else None)
    launch = _LAUNCHES.get(key)
    if launch is None:
        view = _cached_view(x)
        if view is None:
            return None
        single_read = fused_plan(view)
        if single_read is not None:
            launch = FusedBackwardLaunch(view, single_read, weight is not None, kind)
        else:
            split = plan(view, packed_mask=kind.mask)
            launch = SplitBackwardLaunch(view, split, weight is not None,
                                         not sums_in_epilogue(split, x.element_size()), kind)
        launch = _remember(key, launch)
    return launch
