"""The batch-norm operators, registered with ``torch.library``.

Five custom ops (``torch.ops.bntriton.*``), each with a fake implementation so that
``torch.compile`` and ``torch.export`` can trace through them, and autograd formulas:

* ``batch_norm_train``: normalizes with the batch's statistics and returns
  ``(y, mean_shifted, rstd, mean, var_unbiased, pivot)``; ``pivot`` / ``mean_shifted`` /
  ``rstd`` feed the backward, ``mean`` / ``var_unbiased`` the running statistics.
* ``update_running_stats``: the counter and running-statistics update, in place
  (declared as mutated; kept apart so that the statistics op stays functional, which autograd
  registration requires).
* ``batch_norm_eval``: normalizes with the running statistics; mutates nothing.
* ``batch_norm_backward``: ``(dx, dweight, dbias)`` for either forward, given rstd;
* ``batch_norm_eval_backward``: the same for the eval forward, rstd taken from the
  running variance inside the kernels (what ``batch_norm_eval``'s autograd formula calls).

Eager calls on plain tensors run the same implementations and autograd formulas through
a bare ``autograd.Function`` instead (:func:`train`, :func:`update`, :func:`evaluate`, at
the end of this file): torch.library's dispatch costs more host time than a small batch
norm takes on a GPU.  Anything traced goes through the registered ops.  Under torch.func
transforms a third pair of Functions runs (setup_context, jvp and a vmap rule).  The
eager training forward also updates the running statistics inside the statistics'
launches (the op and its update take one launch more); eager calls that autograd would
not record skip the Function altogether.

Beyond the first derivative: a backward that must itself be differentiable or batched
(``create_graph=True``, torch.func, gradcheck's batched checks) runs as torch ops
(:mod:`.composite`); forward mode (``jvp``) too.  vmap folds the vmapped dimension
into the channels (:mod:`.batching`), for the eager path and the registered ops.

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

from torch.autograd import forward_ad

from .. import dispatch
from ..kernels import RunningStats, accumulator_dtype, channel_view, launch_cache
from . import batching, composite, traceable
from .registration import distinct_outputs, kernel_op
from .routes import (
    EAGER, PLAIN_TYPES, TRANSFORMED, bare_apply, composite_backward, functorch_active,
    is_legacy_batched, plain, requires_grad, route, unwrap_if_dead,
)


def _param_dtype(x: Tensor, weight: Optional[Tensor]) -> torch.dtype:
    return weight.dtype if weight is not None else accumulator_dtype(x.dtype)


def _per_channel(x: Tensor) -> Tensor:
    """A per-channel statistic's (fake) output, in the accumulator dtype."""
    return x.new_empty(x.shape[1], dtype=accumulator_dtype(x.dtype))


def _train_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean_shifted, rstd, mean, var_unbiased, pivot)`` from the batch's statistics."""
    return distinct_outputs(_train_and_update(x, weight, bias, eps, None))


def _train_and_update(x, weight, bias, eps, running: Optional[RunningStats]):
    """:func:`_train_impl`, also updating ``running`` (contiguous, non-empty batch) in the
    same launches: the eager path's training forward (the op must stay functional)."""
    launch = launch_cache.train_launch(x, weight, bias, running)  # the common case: cached per geometry
    if launch is not None:
        return launch(x, weight, bias, eps, running)
    view = channel_view(x)
    if view.rows == 0:
        # An empty batch has no statistics: an empty output (as torch).
        zeros = torch.zeros(view.channels, dtype=accumulator_dtype(x.dtype), device=x.device)
        return view.empty_like(), zeros, zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    y, stats = dispatch.forward_train(view, weight, bias, eps, running=running)
    return y, stats.mean_shifted, stats.rstd, stats.mean, stats.var_unbiased, stats.pivot


batch_norm_train, _batch_norm_train_opaque = kernel_op("batch_norm_train", _train_impl)


@_batch_norm_train_opaque.register_fake
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


update_running_stats, _update_running_stats_opaque = kernel_op(
    "update_running_stats", _update_impl, mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@_update_running_stats_opaque.register_fake
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
    launch = launch_cache.eval_launch(x, weight, bias)  # the common case: its launch cached per geometry
    if launch is not None:
        return launch(x, weight, bias, running_mean, running_var, eps)
    view = channel_view(x)
    if view.rows == 0:
        return view.empty_like()
    return dispatch.forward_eval(view, weight, bias, running_mean, running_var, eps)


batch_norm_eval, _batch_norm_eval_opaque = kernel_op("batch_norm_eval", _eval_impl)


@_batch_norm_eval_opaque.register_fake
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
    if running_mean is None:
        launch = launch_cache.backward_launch(x, grad_out, weight)  # the common case: cached per geometry
        if launch is not None:
            return launch(grad_out, x, weight, pivot, mean_shifted, rstd)
    view = channel_view(x)
    dy = view.same_layout(grad_out)
    batch_stats_used = running_mean is None
    return dispatch.backward(
        view, dy, weight, pivot, 1, mean_shifted, rstd,
        batch_stats=batch_stats_used, param_dtype=_param_dtype(x, weight),
    )


batch_norm_backward, _batch_norm_backward_opaque = kernel_op("batch_norm_backward", _backward_impl)


@_batch_norm_backward_opaque.register_fake
def _(grad_out, x, weight, running_mean, mean_shifted, rstd, pivot):
    dtype = _param_dtype(x, weight)
    channels = x.shape[1]
    return channel_view(x).empty_like(), x.new_empty(channels, dtype=dtype), x.new_empty(channels, dtype=dtype)


def _eval_backward_impl(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``batch_norm_eval``: rstd from the running variance inside the
    kernels, so that no launch computes it (``batch_norm_backward`` takes it computed)."""
    view = channel_view(x)
    return dispatch.backward_eval(view, view.same_layout(grad_out), weight, running_mean, running_var, eps,
                                     param_dtype=_param_dtype(x, weight))


batch_norm_eval_backward, _batch_norm_eval_backward_opaque = kernel_op(
    "batch_norm_eval_backward", _eval_backward_impl)


@_batch_norm_eval_backward_opaque.register_fake
def _(grad_out, x, weight, running_mean, running_var, eps):
    dtype = _param_dtype(x, weight)
    channels = x.shape[1]
    return channel_view(x).empty_like(), x.new_empty(channels, dtype=dtype), x.new_empty(channels, dtype=dtype)


# ---------------------------------------------------------------------------- autograd
#
# First-order backward: the kernels.  When the backward must itself be differentiable
# (``create_graph=True``: double backward, gradient penalties, MAML) or runs under a
# torch.func transform (batched gradients), the same formulas run as torch ops
# (:mod:`.composite`), which autograd and vmap differentiate and batch exactly.
# Forward mode (``jvp``) uses the saved statistics.


def _train_setup(ctx, inputs, output):
    _, mean_shifted, rstd, mean, var_unbiased, pivot = output
    # The statistics are outputs for the backward and the running-stat update, not
    # something to differentiate through: say so, rather than drop their gradients.
    ctx.mark_non_differentiable(mean_shifted, rstd, mean, var_unbiased, pivot)
    _train_save(ctx, inputs, output)


def _train_save(ctx, inputs, output):
    """What the training backward reads: x, the weight and the batch's statistics (not the
    bias: each saved tensor costs the backward an unpack; forward mode saves its own)."""
    x, weight, bias, eps = inputs
    _, mean_shifted, rstd, _, _, pivot = output
    ctx.save_for_backward(x, weight, mean_shifted, rstd, pivot)
    ctx.has_bias = bias is not None
    ctx.eps = eps


def _train_backward(ctx, grad_y, *_grads_of_statistics):
    x, weight, mean_shifted, rstd, pivot = ctx.saved_tensors
    # composite_backward, written out (a frame less on every backward): outside
    # create_graph, grad mode is off while a backward runs.
    if (functorch_active() or is_legacy_batched(grad_y)
            or torch.is_grad_enabled() and requires_grad((grad_y, x, weight))):
        dx, dweight, dbias = composite.train_backward(grad_y, x, weight, ctx.eps)
    elif route(grad_y, x, weight, mean_shifted, rstd, pivot) == EAGER:
        dx, dweight, dbias = _backward_impl(grad_y, x, weight, None, mean_shifted, rstd, pivot)
    else:
        dx, dweight, dbias = batch_norm_backward(grad_y, x, weight, None, mean_shifted, rstd, pivot)
    return (
        dx if ctx.needs_input_grad[0] else None,
        dweight if weight is not None else None,
        dbias if ctx.has_bias else None,
        None,
    )


def _train_jvp(ctx, tangent_x, tangent_weight, tangent_bias, _tangent_eps):
    x, weight, bias, mean_shifted, rstd, pivot = ctx.saved_tensors
    tangent_y = composite.train_jvp(x, weight, bias, pivot, mean_shifted, rstd, tangent_x, tangent_weight,
                                   tangent_bias)
    # The statistics are non-differentiable outputs: no tangent.
    return tangent_y, None, None, None, None, None


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup)


def _eval_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var)  # (the bias: see _train_save)
    ctx.has_bias = bias is not None
    ctx.eps = eps


def _eval_backward(ctx, grad_y):
    x, weight, running_mean, running_var = ctx.saved_tensors
    if composite_backward(grad_y, x, weight):
        dx, dweight, dbias = composite.eval_backward(grad_y, x, weight, running_mean, running_var, ctx.eps)
    else:
        tensors = (grad_y, x, weight, running_mean, running_var)
        op = _eval_backward_impl if plain(*tensors) else batch_norm_eval_backward
        dx, dweight, dbias = op(*tensors, ctx.eps)
    return dx, dweight if weight is not None else None, dbias if ctx.has_bias else None, None, None, None


def _eval_jvp(ctx, tangent_x, tangent_weight, tangent_bias, tangent_mean, tangent_var, _tangent_eps):
    x, weight, bias, running_mean, running_var = ctx.saved_tensors
    # Tangents on the running statistics are refused before the forward where torch
    # refuses them (checks.check_arguments: in eval, with a tangent on the input too);
    # elsewhere they are ignored here, as torch ignores them.
    return composite.eval_jvp(x, weight, bias, running_mean, running_var, ctx.eps,
                             tangent_x, tangent_weight, tangent_bias)


batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


class _EagerTrain(torch.autograd.Function):
    """The eager training forward.  Its only output is y: the statistics go to the caller
    through ``sink`` as plain tensors (they are never differentiated), which spares
    autograd five outputs to track in the forward and five gradient slots in the
    backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running, sink):
        # The running statistics (buffers, never differentiated) are updated in place by
        # the statistics' own launches: one launch fewer than the op and its update.
        output = _train_and_update(x, weight, bias, eps, running)
        # _train_save, written out (a frame less per call).
        ctx.save_for_backward(x, weight, output[1], output[2], output[5])
        ctx.has_bias = bias is not None
        ctx.eps = eps
        if forward_ad._current_level >= 0:
            ctx.save_for_forward(x, weight, bias, output[1], output[2], output[5])
        sink.append(output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_y):
        return (*_train_backward(ctx, grad_y), None, None)

    @staticmethod
    def jvp(ctx, tangent_x, tangent_weight, tangent_bias, tangent_eps, _tangent_running, _tangent_sink):
        return _train_jvp(ctx, tangent_x, tangent_weight, tangent_bias, tangent_eps)[0]


def _eager_train(x, weight, bias, eps, running):
    """``(y, *statistics)`` through :class:`_EagerTrain`."""
    sink = []
    y = _eager_train_apply(x, weight, bias, eps, running, sink)
    return (y, *sink[0][1:])


class _EagerEval(torch.autograd.Function):
    """The eager eval forward.  The running statistics and eps travel in one tuple: they
    are never differentiated, and the C++ apply inspects each tensor argument (two fewer
    cost ~1.7 us of a ~13 us apply)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running):
        running_mean, running_var, eps = running
        output = _eval_impl(x, weight, bias, running_mean, running_var, eps)
        # _eval_setup, written out (a frame less per call).
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.has_bias = bias is not None
        ctx.eps = eps
        if forward_ad._current_level >= 0:
            ctx.save_for_forward(x, weight, bias, running_mean, running_var)
        return output

    @staticmethod
    def backward(ctx, grad_y):
        return (*_eval_backward(ctx, grad_y)[:3], None)

    @staticmethod
    def jvp(ctx, tangent_x, tangent_weight, tangent_bias, _tangent_running):
        return _eval_jvp(ctx, tangent_x, tangent_weight, tangent_bias, None, None, None)


_eager_train_apply = bare_apply(_EagerTrain)
# The C++ apply itself, for the hot paths that unwrap their tensor arguments themselves
# (see bare_apply; a torch without unwrap_if_dead gets the Functions' own apply).
_eager_train_c_apply = (super(torch.autograd.Function, _EagerTrain).apply
                        if hasattr(torch._C._functorch, "unwrap_if_dead") else _EagerTrain.apply)
_eager_eval_c_apply = (super(torch.autograd.Function, _EagerEval).apply
                       if hasattr(torch._C._functorch, "unwrap_if_dead") else _EagerEval.apply)


class _TransformedTrain(torch.autograd.Function):
    """batch_norm_train for torch.func (grad, vjp, jvp, vmap and their compositions)."""

    @staticmethod
    def forward(x, weight, bias, eps):
        return _train_impl(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _train_setup(ctx, inputs, output)
        x, weight, bias, _ = inputs
        ctx.save_for_forward(x, weight, bias, output[1], output[2], output[5])

    backward = staticmethod(_train_backward)
    jvp = staticmethod(_train_jvp)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps):
        return batching.train_rule(train, info, in_dims, x, weight, bias, eps)


class _TransformedEval(torch.autograd.Function):
    """batch_norm_eval for torch.func."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, eps):
        return _eval_impl(x, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _eval_setup(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:5])

    backward = staticmethod(_eval_backward)
    jvp = staticmethod(_eval_jvp)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, eps):
        return batching.eval_rule(evaluate, info, in_dims, x, weight, bias, running_mean, running_var, eps)


def train(x, weight, bias, eps, running: Optional[RunningStats] = None):
    """``batch_norm_train`` and, with ``running`` given, the running-statistics update:
    eager fast path (one set of launches does both), torch.func path or the registered
    ops."""
    way = route(x, weight, bias)
    # (foldable and records_graph written out: two to four frames less per call.)
    if way == EAGER and (running is None or (
            type(running.mean) in PLAIN_TYPES and type(running.var) in PLAIN_TYPES
            and (running.num_batches_tracked is None or type(running.num_batches_tracked) in PLAIN_TYPES)
            and running.mean.is_contiguous() and running.var.is_contiguous())):
        if forward_ad._current_level < 0 and not (torch.is_grad_enabled() and (
                x.requires_grad or weight is not None and weight.requires_grad
                or bias is not None and bias.requires_grad)):
            return _train_and_update(x, weight, bias, eps, running)
        # _eager_train's apply, written out: bare_apply's unwrapping of dead functorch
        # wrappers without its frames.
        sink = []
        y = _eager_train_c_apply(
            unwrap_if_dead(x), None if weight is None else unwrap_if_dead(weight),
            None if bias is None else unwrap_if_dead(bias), eps, running, sink)
        return (y, *sink[0][1:])
    if way == TRANSFORMED:
        output = _TransformedTrain.apply(x, weight, bias, eps)
    elif way == EAGER:
        output = _eager_train(x, weight, bias, eps, None)
    else:
        output = batch_norm_train(x, weight, bias, eps)
    if running is not None:
        update(running.mean, running.var, running.num_batches_tracked, output[3], output[4], running.momentum)
    return output


def update(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum):
    """``update_running_stats``: eager fast path or the registered op (which carries the
    vmap rule)."""
    tensors = (running_mean, running_var, num_batches_tracked, mean, var_unbiased)
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        # The kernel writes C consecutive elements: a strided view (a slice of a larger
        # buffer) is updated through a dense copy, then written back element by element.
        dense = running_mean.contiguous(), running_var.contiguous()
        update(*dense, num_batches_tracked, mean, var_unbiased, momentum)
        running_mean.copy_(dense[0])
        running_var.copy_(dense[1])
        return
    op = _update_impl if plain(*tensors) else update_running_stats
    op(*tensors, momentum)


def evaluate(x, weight, bias, running_mean, running_var, eps):
    """``batch_norm_eval``: eager fast path, torch.func path or the registered op; plain
    torch operations while a graph that leaves bntriton is captured (export, tracing: see
    ops/traceable.py)."""
    way = route(x, weight, bias, running_mean, running_var)
    # torch.jit.trace and the TorchScript ONNX exporter record plain tensors; torch.export
    # and the dynamo ONNX exporter trace (fake tensors, or Dynamo itself).
    if traceable.eager_capturing() if way == EAGER else traceable.capturing():
        return traceable.evaluate(x, weight, bias, running_mean, running_var, eps)
    if way == EAGER:
        # (records_graph written out: a frame or three less per call.)
        if forward_ad._current_level < 0 and not (torch.is_grad_enabled() and (
                x.requires_grad or weight is not None and weight.requires_grad
                or bias is not None and bias.requires_grad)):
            return _eval_impl(x, weight, bias, running_mean, running_var, eps)
        # bare_apply's unwrapping of dead functorch wrappers, written out.
        return _eager_eval_c_apply(
            unwrap_if_dead(x), None if weight is None else unwrap_if_dead(weight),
            None if bias is None else unwrap_if_dead(bias),
            (unwrap_if_dead(running_mean), unwrap_if_dead(running_var), eps))
    if way == TRANSFORMED:
        return _TransformedEval.apply(x, weight, bias, running_mean, running_var, eps)
    return batch_norm_eval(x, weight, bias, running_mean, running_var, eps)


# vmap rules of the registered ops (the torch.func path above carries its own): B problems
# of C channels folded into one of B*C channels.


def _train_vmap(info, in_dims, x, weight, bias, eps):
    return batching.train_rule(batch_norm_train, info, in_dims, x, weight, bias, eps)


def _eval_vmap(info, in_dims, x, weight, bias, running_mean, running_var, eps):
    return batching.eval_rule(batch_norm_eval, info, in_dims, x, weight, bias, running_mean, running_var, eps)


def _backward_vmap(info, in_dims, grad_out, x, weight, running_mean, mean_shifted, rstd, pivot):
    return batching.backward_rule(batch_norm_backward, info, in_dims, grad_out, x, weight, running_mean,
                                  mean_shifted, rstd, pivot)


def _eval_backward_vmap(info, in_dims, grad_out, x, weight, running_mean, running_var, eps):
    return batching.eval_backward_rule(batch_norm_eval_backward, info, in_dims, grad_out, x, weight, running_mean,
                                       running_var, eps)


def _update_vmap(info, in_dims, running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum):
    return batching.update_rule(update, info, in_dims, running_mean, running_var, num_batches_tracked,
                                mean, var_unbiased, momentum)


batch_norm_train.register_vmap(_train_vmap)
batch_norm_eval.register_vmap(_eval_vmap)
batch_norm_backward.register_vmap(_backward_vmap)
batch_norm_eval_backward.register_vmap(_eval_backward_vmap)
update_running_stats.register_vmap(_update_vmap)
