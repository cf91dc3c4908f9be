"""The batch-norm operators, registered with ``torch.library``.

Four custom ops (``torch.ops.bntriton.*``), each with a fake implementation so that
``torch.compile`` and ``torch.export`` can trace through them, and autograd formulas:

* ``batch_norm_train``: normalizes with the batch's statistics and returns
  ``(y, mean_shifted, rstd, mean, var_unbiased, pivot)``; ``pivot`` / ``mean_shifted`` /
  ``rstd`` feed the backward, ``mean`` / ``var_unbiased`` the running statistics.
* ``update_running_stats``: the counter and running-statistics update, in place
  (declared as mutated; kept apart so that the statistics op stays functional, which autograd
  registration requires).
* ``batch_norm_eval``: normalizes with the running statistics; mutates nothing.
* ``batch_norm_backward``: ``(dx, dweight, dbias)`` for either forward.

Eager calls on plain tensors run the same implementations and autograd formulas through
a bare ``autograd.Function`` instead (:func:`train`, :func:`update`, :func:`evaluate`, at
the end of this file): torch.library's dispatch costs more host time than a small batch
norm takes on a GPU.  Anything traced goes through the registered ops.

Arguments are checked by :mod:`bntriton.functional` before these run: the ops assume
valid input, so a failing call never reaches the point where state changes.

Graph capture: each fake computes its outputs' strides with the same
:func:`~bntriton.kernels.channel_view` as the real op (``torch.library.opcheck`` checks
them), and nothing here reads a device value on the host, so the ops trace under
``torch.compile`` / ``torch.export`` and replay inside CUDA graphs.  There is
deliberately no autocast registration: batch norm is on neither of torch's autocast
lists, so torch's own runs in whatever dtype reaches it (fp16 / bf16 input with fp32
parameters gives an fp16 / bf16 output and fp32 statistics), and so do these.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels import accumulator_dtype, channel_view, dispatch


def _param_dtype(x: Tensor, weight: Optional[Tensor]) -> torch.dtype:
    return weight.dtype if weight is not None else accumulator_dtype(x.dtype)


def _per_channel(x: Tensor) -> Tensor:
    """A per-channel statistic's (fake) output, in the accumulator dtype."""
    return x.new_empty(x.shape[1], dtype=accumulator_dtype(x.dtype))


def _train_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean_shifted, rstd, mean, var_unbiased, pivot)`` from the batch's statistics."""
    view = channel_view(x)
    if view.rows == 0:
        # An empty batch has no statistics: an empty output (as torch).
        zeros = torch.zeros(view.channels, dtype=accumulator_dtype(x.dtype), device=x.device)
        return view.empty_like(), zeros, zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    y, stats = dispatch.forward_train(view, weight, bias, eps)
    return y, stats.mean_shifted, stats.rstd, stats.mean, stats.var_unbiased, stats.pivot


batch_norm_train = torch.library.custom_op("bntriton::batch_norm_train", _train_impl, mutates_args=())


@batch_norm_train.register_fake
def _(x, weight, bias, eps):
    return (channel_view(x).empty_like(), *(_per_channel(x) for _ in range(5)))


def _update_impl(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var_unbiased: Tensor,
    momentum: Optional[float],
) -> None:
    """``num_batches_tracked += 1`` (when given), then ``running = (1 - m) running + m batch``;
    ``momentum=None``: ``m = 1 / num_batches_tracked``."""
    dispatch.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum)


update_running_stats = torch.library.custom_op(
    "bntriton::update_running_stats", _update_impl,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)


@update_running_stats.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum):
    return None


def _eval_impl(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    view = channel_view(x)
    if view.rows == 0:
        return view.empty_like()
    return dispatch.forward_eval(view, weight, bias, running_mean, running_var, eps)


batch_norm_eval = torch.library.custom_op("bntriton::batch_norm_eval", _eval_impl, mutates_args=())


@batch_norm_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return channel_view(x).empty_like()


def _backward_impl(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    running_mean: Optional[Tensor],
    mean_shifted: Tensor,
    rstd: Tensor,
    pivot: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of either forward: batch statistics when ``running_mean`` is None, else
    the running statistics.  ``pivot`` is what the forward subtracted first: the train
    op's ``pivot`` output, or the running mean."""
    view = channel_view(x)
    dy = view.same_layout(grad_out)
    batch_stats_used = running_mean is None
    return dispatch.backward(
        view, dy, weight, pivot, 1, mean_shifted, rstd,
        batch_stats=batch_stats_used, param_dtype=_param_dtype(x, weight),
    )


batch_norm_backward = torch.library.custom_op("bntriton::batch_norm_backward", _backward_impl, mutates_args=())


@batch_norm_backward.register_fake
def _(grad_out, x, weight, running_mean, mean_shifted, rstd, pivot):
    dtype = _param_dtype(x, weight)
    channels = x.shape[1]
    return channel_view(x).empty_like(), x.new_empty(channels, dtype=dtype), x.new_empty(channels, dtype=dtype)


# ---------------------------------------------------------------------------- autograd


def _train_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean_shifted, rstd, mean, var_unbiased, pivot = output
    # The statistics are outputs for the backward and the running-stat update, not
    # something to differentiate through: say so, rather than drop their gradients.
    ctx.mark_non_differentiable(mean_shifted, rstd, mean, var_unbiased, pivot)
    ctx.save_for_backward(x, weight, mean_shifted, rstd, pivot)
    ctx.has_bias = bias is not None


def _train_backward(ctx, grad_y, *_grads_of_statistics):
    x, weight, mean_shifted, rstd, pivot = ctx.saved_tensors
    dx, dweight, dbias = _backward(grad_y, x, weight, None, mean_shifted, rstd, pivot)
    return (
        dx,
        dweight if weight is not None else None,
        dbias if ctx.has_bias else None,
        None,
    )


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup)


def _eval_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.has_bias = bias is not None
    ctx.eps = eps


def _eval_backward(ctx, grad_y):
    x, weight, running_mean, running_var = ctx.saved_tensors
    # Torch ops, not a kernel launch: an autograd formula must trace under fake tensors.
    rstd = torch.rsqrt(running_var.to(accumulator_dtype(x.dtype)) + ctx.eps)
    dx, dweight, dbias = _backward(grad_y, x, weight, running_mean, torch.zeros_like(rstd), rstd, running_mean)
    return dx, dweight if weight is not None else None, dbias if ctx.has_bias else None, None, None, None


batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


# ----------------------------------------------------------- eager calls, without dispatch
#
# torch.library's Python dispatch costs 10-25 us per call on the host, more than a whole
# small batch norm takes on a GPU.  Eager calls on plain tensors therefore run the same
# implementations and autograd formulas through a bare autograd.Function; anything being
# traced (torch.compile, torch.export, fake or functional tensors) goes through the ops.


def _plain(*tensors) -> bool:
    """True for eager calls on ordinary tensors (not fake, functional or traced)."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in (Tensor, torch.nn.Parameter) for t in tensors)


# forward(ctx, ...) rather than a separate setup_context: the latter binds arguments with
# inspect.signature on every call (~20 us).


class _EagerTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        output = _train_impl(x, weight, bias, eps)
        _train_setup(ctx, (x, weight, bias, eps), output)
        return output

    backward = staticmethod(_train_backward)


class _EagerEval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):
        inputs = (x, weight, bias, running_mean, running_var, eps)
        output = _eval_impl(*inputs)
        _eval_setup(ctx, inputs, output)
        return output

    backward = staticmethod(_eval_backward)


def train(x, weight, bias, eps):
    """``batch_norm_train``: eager fast path or the registered op."""
    if _plain(x, weight, bias):
        return _EagerTrain.apply(x, weight, bias, eps)
    return batch_norm_train(x, weight, bias, eps)


def update(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum):
    """``update_running_stats``: eager fast path or the registered op."""
    tensors = (running_mean, running_var, num_batches_tracked, mean, var_unbiased)
    op = _update_impl if _plain(*tensors) else update_running_stats
    op(*tensors, momentum)


def evaluate(x, weight, bias, running_mean, running_var, eps):
    """``batch_norm_eval``: eager fast path or the registered op."""
    if _plain(x, weight, bias, running_mean, running_var):
        return _EagerEval.apply(x, weight, bias, running_mean, running_var, eps)
    return batch_norm_eval(x, weight, bias, running_mean, running_var, eps)


def _backward(grad_out, x, weight, running_mean, mean_shifted, rstd, pivot):
    tensors = (grad_out, x, weight, running_mean, mean_shifted, rstd, pivot)
    op = _backward_impl if _plain(*tensors) else batch_norm_backward
    return op(*tensors)
