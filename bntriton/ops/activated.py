"""Batch norm with a fused epilogue: ``y = act(BN(x) + residual)``, as ``torch.library`` ops.

The activated path has its own ops (their outputs and autograd formulas are not plain
batch norm's); with batch_norm.py it shares the registration, the routes, the two
implementations behind bntriton/dispatch.py and the launches cached per geometry
(kernels/cached_launches.py, keyed by an ``EpilogueKind``):

* ``batch_norm_act_train``: ``(y, mean_shifted, rstd, mean, var_unbiased, mask)``;
* ``batch_norm_act_eval``: ``(y, mask)`` with the running statistics;
* ``batch_norm_act_backward``: ``(dx, dweight, dbias, dresidual)``.

What the backward keeps (bytes, B = the input's size):

* no residual, any activation: x and O(C) per-channel values; the pre-activation is
  recomputed from them inside the backward kernels (B + O(C); torch eager keeps 2B);
* a residual with relu / leaky_relu: x, a 1-bit mask of ``z > 0`` (8 values per byte),
  O(C) (B + numel/8 + O(C));
* a residual with silu / gelu: x and the residual (z cannot be recomputed without it,
  and its sign is not enough); z is then formed by one more pass and the derivative
  taken with torch ops (native/activations.py).  In a
  residual network the residual is the block's input, which the block's first
  convolution keeps anyway.

:class:`InplaceABN` is the in-place variant (eager only): y overwrites x, and the
backward keeps only y and O(C), recovering ``z = act^-1(y)`` and
``x_hat = (z - bias) / (weight * rstd)`` (Rota Bulo et al., "In-Place Activated
BatchNorm", 2018).  That needs an invertible activation (none, or leaky_relu with a
positive slope) and a weight with no zero (checked: one host read of C values per
training call, a clear error instead of a NaN gradient).

Double backward is not supported on the fused path: it raises (never a silently missing
term).  Eager calls on plain tensors skip torch.library's dispatch as batch_norm.py does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .. import dispatch
from ..kernels import RunningStats, accumulator_dtype, channel_view, launch_cache
from ..kernels.activations import MASKABLE, Epilogue, EpilogueKind
from ..native import activations as native_act
from . import batch_norm
from .registration import distinct_outputs, kernel_op
from .routes import EAGER, bare_apply, foldable, plain, route, unwrap_if_dead

ACTIVATION_NAMES = {code: name for name, code in (
    (None, 0), ("relu", 1), ("leaky_relu", 2), ("silu", 3), ("gelu", 4))}


# The activations whose derivative a 1-bit mask of z > 0 gives (after a residual).
_MASKED = frozenset(code for code, name in ACTIVATION_NAMES.items() if name in MASKABLE)


def _needs_mask(activation: int, has_residual: bool) -> bool:
    return has_residual and activation in _MASKED


def _keeps_residual(activation: int, has_residual: bool) -> bool:
    """silu / gelu after a residual: z needs the residual itself in the backward."""
    return has_residual and activation != 0 and not _needs_mask(activation, has_residual)


def _mask_like(x: Tensor, needed: bool) -> Tensor:
    """The 1-bit mask's storage: (ceil(rows / 8), C) bytes, or an empty placeholder."""
    if not needed:
        return x.new_empty(0, dtype=torch.uint8)
    view = channel_view(x)
    return x.new_empty((-(-view.rows // 8), view.channels), dtype=torch.uint8)


def _forward_epilogue(x_view, residual, activation, slope, mask, out=None) -> Epilogue:
    # Without an activation nothing needs the mask; silu / gelu with a residual keep the
    # residual instead (see the module docstring).
    return Epilogue(
        activation=activation, slope=slope,
        residual=x_view.same_layout(residual) if residual is not None else None,
        mask=mask if mask.numel() else None, out=out,
    )


def _train_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    eps: float, activation: int, slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean_shifted, rstd, mean, var_unbiased, mask, pivot, act_scale, act_shift)``:
    the last two are the scale and shift y was formed with (``z = (x - K) * act_scale +
    act_shift``), which the backward recomputes z from; empty without an activation."""
    return distinct_outputs(_train_and_update(x, weight, bias, residual, eps, activation, slope, None))


def _train_and_update(x, weight, bias, residual, eps, activation, slope, running: Optional[RunningStats]):
    """:func:`_train_impl`, also updating ``running`` (dense buffers, a non-empty batch) in
    the statistics' launches: the eager path (the op must stay functional)."""
    has_residual = residual is not None
    if activation != 0 or has_residual:
        # The common case: the launches cached for this geometry and epilogue.
        kind = EpilogueKind(activation, slope, has_residual, has_residual and activation in _MASKED)
        launch = launch_cache.train_launch(x, weight, bias, running, kind, residual)
        if launch is not None:
            return launch(x, weight, bias, eps, running, residual)
    view = channel_view(x)
    mask = _mask_like(view.tensor, _needs_mask(activation, residual is not None))
    if view.rows == 0:
        zeros = torch.zeros(view.channels, dtype=accumulator_dtype(x.dtype), device=x.device)
        return (view.empty_like(), zeros, zeros.clone(), zeros.clone(), zeros.clone(), mask, zeros.clone(),
                *_coefficients_like(x, activation))
    epilogue = _forward_epilogue(view, residual, activation, slope, mask)
    y, stats = dispatch.forward_train(view, weight, bias, eps, epilogue, running=running)
    coefficients = (stats.scale, stats.shift) if activation != 0 else _coefficients_like(x, activation)
    # The pivot after the statistics: what the backward subtracts first (kernels/stats.py).
    return y, stats.mean_shifted, stats.rstd, stats.mean, stats.var_unbiased, mask, stats.pivot, *coefficients


def _coefficients_like(x: Tensor, activation: int) -> tuple[Tensor, Tensor]:
    """Placeholders (empty without an activation, which needs no z) or, for an empty
    batch and in fakes, the shape of the training op's ``act_scale`` / ``act_shift``."""
    channels = x.shape[1] if activation != 0 else 0
    return tuple(x.new_zeros(channels, dtype=accumulator_dtype(x.dtype)) for _ in range(2))


batch_norm_act_train, _batch_norm_act_train_opaque = kernel_op("batch_norm_act_train", _train_impl)


@_batch_norm_act_train_opaque.register_fake
def _(x, weight, bias, residual, eps, activation, slope):
    per_channel = [x.new_empty(x.shape[1], dtype=accumulator_dtype(x.dtype)) for _ in range(5)]
    return (channel_view(x).empty_like(), *per_channel[:4],
            _mask_like(x, _needs_mask(activation, residual is not None)), per_channel[4],
            *_coefficients_like(x, activation))


def _eval_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
    residual: Optional[Tensor], eps: float, activation: int, slope: float,
) -> tuple[Tensor, Tensor]:
    has_residual = residual is not None
    if activation != 0 or has_residual:  # (else a plain kind: plain batch norm's launch)
        launch = launch_cache.eval_launch(
            x, weight, bias, EpilogueKind(activation, slope, has_residual, has_residual and activation in _MASKED),
            residual)  # the common case: cached per geometry
        if launch is not None:
            return launch(x, weight, bias, running_mean, running_var, eps, residual)
    view = channel_view(x)
    mask = _mask_like(view.tensor, _needs_mask(activation, has_residual))
    if view.rows == 0:
        return view.empty_like(), mask
    epilogue = _forward_epilogue(view, residual, activation, slope, mask)
    return dispatch.forward_eval(view, weight, bias, running_mean, running_var, eps, epilogue), mask


batch_norm_act_eval, _batch_norm_act_eval_opaque = kernel_op("batch_norm_act_eval", _eval_impl)


@_batch_norm_act_eval_opaque.register_fake
def _(x, weight, bias, running_mean, running_var, residual, eps, activation, slope):
    return channel_view(x).empty_like(), _mask_like(x, _needs_mask(activation, residual is not None))


def _act_coefficients(weight, bias, mean_shifted, rstd):
    """``z = (x - K) * scale + shift``'s coefficients, per channel, in the accumulator
    dtype (two small ops: each is a launch, and host time, on a GPU), for the backwards
    whose forward did not return them (eval, in-place)."""
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    if bias is None:
        return scale, torch.mul(mean_shifted, scale).neg_()
    return scale, torch.addcmul(bias.to(rstd.dtype), mean_shifted, scale, value=-1.0)


def _backward_impl(
    grad: Tensor, x: Tensor, weight: Optional[Tensor], act_scale: Tensor, act_shift: Tensor,
    running_mean: Optional[Tensor], mean_shifted: Tensor, rstd: Tensor, pivot: Tensor, mask: Tensor,
    residual: Optional[Tensor], activation: int, slope: float, has_residual: bool, invert: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dresidual)`` of either forward (batch statistics when
    ``running_mean`` is None).  ``act_scale`` / ``act_shift``: the forward's ``z = (x - K)
    * act_scale + act_shift`` (read only with an activation).  ``has_residual`` asks for
    dresidual = dz (with an activation: without one it is the incoming gradient itself,
    which the autograd formulas pass on directly, as an op may not return an alias of
    its input)."""
    if running_mean is None and not invert and not _keeps_residual(activation, has_residual):
        # The common case: the launches cached for this geometry and epilogue.
        grads = _cached_backward(grad, x, weight, act_scale, act_shift, mean_shifted, rstd, pivot, mask,
                                 activation, slope, has_residual)
        if grads is not None:
            return grads
    view = channel_view(x)
    dy = view.same_layout(grad)
    batch_stats_used = running_mean is None
    if invert:
        pivot, pivot_stride = torch.zeros_like(rstd), 1
    else:
        pivot_stride = 1  # the train op's pivot output, or the running mean
    param_dtype = weight.dtype if weight is not None else accumulator_dtype(x.dtype)
    dresidual = None
    if _keeps_residual(activation, has_residual):
        # z = BN(x) + residual in the accumulator dtype, then dz with torch ops.
        z = dispatch.affine(view, pivot, pivot_stride, act_scale, act_shift, accumulator_dtype(x.dtype),
                            Epilogue(residual=view.same_layout(residual)))
        # dz stays in the accumulator dtype for the reductions (the kernels read any dtype).
        dy = native_act.activation_grad(z, dy.to(z.dtype), activation, slope)
        epilogue = Epilogue()
        dresidual = dy.to(grad.dtype)
    else:
        dresidual = view.empty_like(grad.dtype) if has_residual else None
        epilogue = Epilogue(
            activation=activation, slope=slope, residual=dresidual, mask=mask if mask.numel() else None,
            act_scale=act_scale, act_shift=act_shift, invert=invert,
        )
    dx, dweight, dbias = dispatch.backward(
        view, dy, weight, pivot, pivot_stride, mean_shifted, rstd,
        batch_stats=batch_stats_used, param_dtype=param_dtype, epilogue=epilogue,
    )
    if dresidual is None:
        dresidual = x.new_empty(0)
    return dx, dweight, dbias, dresidual


def _cached_backward(grad, x, weight, act_scale, act_shift, mean_shifted, rstd, pivot, mask, activation, slope,
                     has_residual):
    """:func:`_backward_impl` under batch statistics through the launches cached per
    geometry (kernels/launch_cache.py), or None where the general route decides.  Without
    an activation the epilogue does nothing in the backward: plain batch norm's launches."""
    if activation == 0:
        launch = launch_cache.backward_launch(x, grad, weight)
        if launch is None:
            return None
        return (*launch(grad, x, weight, pivot, mean_shifted, rstd), x.new_empty(0))
    has_mask = mask.numel() > 0
    launch = launch_cache.backward_launch(x, grad, weight, EpilogueKind(activation, slope, has_residual, has_mask))
    if launch is None:
        return None
    dx, dweight, dbias, dresidual = launch(grad, x, weight, pivot, mean_shifted, rstd, act_scale, act_shift,
                                           mask if has_mask else None)
    return dx, dweight, dbias, dresidual if dresidual is not None else x.new_empty(0)


batch_norm_act_backward, _batch_norm_act_backward_opaque = kernel_op(
    "batch_norm_act_backward", _backward_impl)


@_batch_norm_act_backward_opaque.register_fake
def _(grad, x, weight, act_scale, act_shift, running_mean, mean_shifted, rstd, pivot, mask, residual,
      activation, slope, has_residual, invert):
    dtype = weight.dtype if weight is not None else accumulator_dtype(x.dtype)
    c = x.shape[1]
    like = channel_view(x).empty_like()
    dres = channel_view(x).empty_like(grad.dtype) if has_residual else x.new_empty(0)
    return like, x.new_empty(c, dtype=dtype), x.new_empty(c, dtype=dtype), dres


# ---------------------------------------------------------------------------- autograd

def _no_double_backward():
    if torch.is_grad_enabled():
        raise RuntimeError(
            "bntriton: batch norm with a fused activation / residual does not support double "
            "backward (create_graph=True); use activation=None and residual=None with the "
            "activation applied by torch, or torch's batch norm"
        )


def _train_setup(ctx, inputs, output):
    _, mean_shifted, rstd, mean, var_unbiased, mask, pivot, act_scale, act_shift = output
    ctx.mark_non_differentiable(mean_shifted, rstd, mean, var_unbiased, mask, pivot, act_scale, act_shift)
    _train_save(ctx, inputs, output)


def _train_save(ctx, inputs, output):
    """What the training backward reads (the registered op's formula and the eager
    Function alike)."""
    x, weight, bias, residual, eps, activation, slope = inputs
    _, mean_shifted, rstd, _, _, mask, pivot, act_scale, act_shift = output
    kept_residual = residual if _keeps_residual(activation, residual is not None) else None
    # The forward's own coefficients, not recomputed: no launches for them, and the same z.
    ctx.save_for_backward(x, weight, act_scale, act_shift, mean_shifted, rstd, pivot, mask, kept_residual)
    ctx.flags = (weight is not None, bias is not None, residual is not None, activation, slope)


def _train_backward(ctx, grad_y, *_unused):
    if torch.is_grad_enabled():  # (_no_double_backward's test, written out: a frame less per call)
        _no_double_backward()
    x, weight, act_scale, act_shift, mean_shifted, rstd, pivot, mask, residual = ctx.saved_tensors
    has_weight, has_bias, has_residual, activation, slope = ctx.flags
    # (_backward, written out: the eager route without its frames.)
    eager = route(grad_y, x, weight, act_scale, act_shift, mean_shifted, rstd, pivot, mask, residual) == EAGER
    dx, dweight, dbias, dres = (_backward_impl if eager else batch_norm_act_backward)(
        grad_y, x, weight, act_scale, act_shift, None, mean_shifted, rstd, pivot, mask, residual,
        activation, slope, has_residual and activation != 0, False,
    )
    dres = (dres if activation != 0 else grad_y) if has_residual else None
    return (dx, dweight if has_weight else None, dbias if has_bias else None, dres, None, None, None)


batch_norm_act_train.register_autograd(_train_backward, setup_context=_train_setup)


def _eval_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, residual, eps, activation, slope = inputs
    _, mask = output
    ctx.mark_non_differentiable(mask)
    kept_residual = residual if _keeps_residual(activation, residual is not None) else None
    ctx.save_for_backward(x, weight, bias, running_mean, running_var, mask, kept_residual)
    ctx.flags = (weight is not None, bias is not None, residual is not None, activation, slope, eps)


def _eval_backward(ctx, grad_y, _grad_mask):
    _no_double_backward()
    x, weight, bias, running_mean, running_var, mask, residual = ctx.saved_tensors
    has_weight, has_bias, has_residual, activation, slope, eps = ctx.flags
    # Torch ops, not a kernel launch: an autograd formula must trace under fake tensors.
    rstd = torch.rsqrt(running_var.to(accumulator_dtype(x.dtype)) + eps)
    zero_mean = torch.zeros_like(rstd)
    act_scale, act_shift = _act_coefficients(weight, bias, zero_mean, rstd) if activation != 0 else (rstd, rstd)
    dx, dweight, dbias, dres = _backward(
        grad_y, x, weight, act_scale, act_shift, running_mean, zero_mean, rstd, running_mean, mask, residual,
        activation, slope, has_residual and activation != 0, False,
    )
    dres = (dres if activation != 0 else grad_y) if has_residual else None
    return (dx, dweight if has_weight else None, dbias if has_bias else None, None, None, dres, None, None, None)


batch_norm_act_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


class _EagerActTrain(torch.autograd.Function):
    """The eager training forward.  Its only output is y: the statistics, mask and
    coefficients go to the caller through ``sink`` (never differentiated), which spares
    autograd eight outputs to track and eight gradient slots in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, activation, slope, running, sink):
        inputs = (x, weight, bias, residual, eps, activation, slope)
        output = _train_and_update(*inputs, running)
        _train_save(ctx, inputs, output)
        sink.append(output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_y):
        return (*_train_backward(ctx, grad_y), None, None)


class _EagerActEval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, eps, activation, slope):
        ctx.set_materialize_grads(False)  # the mask's gradient slot stays None (see above)
        inputs = (x, weight, bias, running_mean, running_var, residual, eps, activation, slope)
        output = _eval_impl(*inputs)
        _eval_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_mask):
        if grad_y is None:  # y's gradient undefined (not materialized): nothing flows back
            return (None,) * 9
        return _eval_backward(ctx, grad_y, grad_mask)


# The C++ apply itself (see routes.bare_apply; a torch without unwrap_if_dead gets the
# Function's own apply): the hot path unwraps its tensor arguments itself.
_eager_act_train_c_apply = (super(torch.autograd.Function, _EagerActTrain).apply
                            if hasattr(torch._C._functorch, "unwrap_if_dead") else _EagerActTrain.apply)
_eager_act_eval_apply = bare_apply(_EagerActEval)


def train(x, weight, bias, residual, eps, activation, slope, running: Optional[RunningStats] = None):
    """``batch_norm_act_train``, and with ``running`` given the running-statistics update:
    inside the statistics' launches on the eager path, by one more launch otherwise."""
    if route(x, weight, bias, residual) == EAGER:
        fold = running is not None and foldable(running)
        # (routes.records_graph written out: frames less per call.)
        if forward_ad._current_level < 0 and not (torch.is_grad_enabled() and (
                x.requires_grad or weight is not None and weight.requires_grad
                or bias is not None and bias.requires_grad or residual is not None and residual.requires_grad)):
            # Inference, frozen layers: nothing to record, no Function.
            output = _train_and_update(x, weight, bias, residual, eps, activation, slope, running if fold else None)
        else:
            sink = []
            y = _eager_act_train_c_apply(
                unwrap_if_dead(x), None if weight is None else unwrap_if_dead(weight),
                None if bias is None else unwrap_if_dead(bias), None if residual is None else unwrap_if_dead(residual),
                eps, activation, slope, running if fold else None, sink)
            output = (y, *sink[0][1:])
        if fold:
            return output
    else:
        output = batch_norm_act_train(x, weight, bias, residual, eps, activation, slope)
    if running is not None:
        batch_norm.update(running.mean, running.var, running.num_batches_tracked, output[3], output[4], running.momentum)
    return output


def evaluate(x, weight, bias, running_mean, running_var, residual, eps, activation, slope):
    args = (x, weight, bias, running_mean, running_var, residual, eps, activation, slope)
    if route(x, weight, bias, running_mean, running_var, residual) == EAGER:
        if forward_ad._current_level < 0 and not (torch.is_grad_enabled() and (
                x.requires_grad or weight is not None and weight.requires_grad
                or bias is not None and bias.requires_grad or residual is not None and residual.requires_grad)):
            return _inference(*args)
        return _eager_act_eval_apply(*args)
    return batch_norm_act_eval(*args)


def _inference(x, weight, bias, running_mean, running_var, residual, eps, activation, slope):
    """Eager eval that autograd does not record (inference, frozen layers): no mask, which
    only a backward reads, and the native path's own composition for it
    (native_act.forward_eval)."""
    if activation != 0 or residual is not None:  # (else a plain kind: plain batch norm's launch)
        launch = launch_cache.eval_launch(x, weight, bias, EpilogueKind(activation, slope, residual is not None),
                                          residual)  # the common case: cached per geometry
        if launch is not None:
            return launch(x, weight, bias, running_mean, running_var, eps, residual)
    view = channel_view(x)
    no_mask = _mask_like(view.tensor, False)
    if view.rows == 0:
        return view.empty_like(), no_mask
    epilogue = _forward_epilogue(view, residual, activation, slope, no_mask)
    return dispatch.forward_eval(view, weight, bias, running_mean, running_var, eps, epilogue, inference=True), no_mask


def _backward(*args):
    tensors = [a for a in args if isinstance(a, Tensor)]
    op = _backward_impl if plain(*tensors) else batch_norm_act_backward
    return op(*args)


# ------------------------------------------------------------------- in-place (eager)

def _check_inplace(x: Tensor, weight: Optional[Tensor], activation: int, slope: float, residual, training: bool):
    name = ACTIVATION_NAMES[activation]
    if name not in (None, "leaky_relu") or (name == "leaky_relu" and not slope > 0):
        raise ValueError(
            "in-place activated batch norm recovers the input from the output, so the activation "
            f"must be invertible: None or leaky_relu with negative_slope > 0 (got {name!r}, slope {slope})"
        )
    if residual is not None:
        raise ValueError("in-place activated batch norm takes no residual (z could not be recovered from y)")
    if x.requires_grad and x.is_leaf:
        raise RuntimeError("in-place activated batch norm cannot overwrite a leaf tensor that requires grad")
    if training and torch.is_grad_enabled() and weight is not None and bool((weight == 0).any()):
        # x_hat = (z - bias) / weight: a zero weight loses x_hat, and with it dweight.
        raise ValueError(
            "in-place activated batch norm needs a weight with no zero entry (x_hat is recovered as "
            "(z - bias) / (weight * rstd)); use inplace=False for this layer"
        )


class InplaceABN(torch.autograd.Function):
    """``x <- act(BN(x))`` in x's storage; training (batch statistics) or eval."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, activation, slope, training):
        ctx.set_materialize_grads(False)  # the statistics' gradient slots stay None
        view = channel_view(x)
        if view.tensor is not x:
            raise ValueError("in-place activated batch norm needs a dense NCHW-like or channels_last input")
        epilogue = Epilogue(activation=activation, slope=slope, out=x)
        if training:
            if view.rows == 0:
                zeros = torch.zeros(view.channels, dtype=accumulator_dtype(x.dtype), device=x.device)
                stats = (zeros, zeros.clone(), zeros.clone(), zeros.clone())
            else:
                _, s = dispatch.forward_train(view, weight, bias, eps, epilogue)
                stats = (s.mean_shifted, s.rstd, s.mean, s.var_unbiased)
            mean_shifted, rstd, mean, var_unbiased = stats
        else:
            if view.rows:
                dispatch.forward_eval(view, weight, bias, running_mean, running_var, eps, epilogue)
            rstd = torch.rsqrt(running_var.to(accumulator_dtype(x.dtype)) + eps)
            # With the pivot at 0, the running mean plays the shifted mean's part: the
            # backward's z = x * scale + (bias - running_mean * scale).
            mean_shifted = running_mean.to(rstd.dtype).clone()
            mean, var_unbiased = mean_shifted, rstd  # unused in eval
        ctx.mark_dirty(x)
        ctx.mark_non_differentiable(mean, var_unbiased)
        ctx.save_for_backward(x, weight, bias, mean_shifted, rstd)
        ctx.flags = (weight is not None, bias is not None, activation, slope, training)
        return x, mean, var_unbiased

    @staticmethod
    def backward(ctx, grad_y, *_unused):
        _no_double_backward()
        if grad_y is None:  # the output's gradient undefined (not materialized)
            return (None,) * 9
        y, weight, bias, mean_shifted, rstd = ctx.saved_tensors
        has_weight, has_bias, activation, slope, training = ctx.flags
        view = channel_view(y)
        dy = view.same_layout(grad_y)
        act_scale, act_shift = _act_coefficients(weight, bias, mean_shifted, rstd)
        # x - K is recovered with K = 0, so the pivot is zero and, in eval, the running mean
        # plays the shifted mean's part.
        epilogue = Epilogue(activation=activation, slope=slope, act_scale=act_scale, act_shift=act_shift,
                            invert=True)
        param_dtype = weight.dtype if weight is not None else accumulator_dtype(y.dtype)
        dx, dweight, dbias = dispatch.backward(
            view, dy, weight, torch.zeros_like(rstd), 1, mean_shifted, rstd,
            batch_stats=training, param_dtype=param_dtype, epilogue=epilogue,
        )
        return (dx, dweight if has_weight else None, dbias if has_bias else None,
                None, None, None, None, None, None)


def inplace_abn(x, weight, bias, running_mean, running_var, eps, activation, slope, training):
    _check_inplace(x, weight, activation, slope, None, training)
    return InplaceABN.apply(x, weight, bias, running_mean, running_var, eps, activation, slope, training)
