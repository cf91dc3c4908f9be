"""Derivatives beyond the first-order backward kernels, written with torch ops.

The backward kernels give ``(dx, dweight, dbias)`` as plain numbers: nothing records how
they depend on ``x``, ``weight`` or ``grad_y``.  That is what ordinary training needs and
it is fast, but a second derivative (``create_graph=True``: gradient penalties, MAML,
``gradgradcheck``) or a batched backward (``torch.func``, gradcheck's batched-gradient
check) needs the backward itself to be differentiable and vmappable.  For those calls
the autograd formulas in :mod:`bntriton.ops` run :func:`train_backward` /
:func:`eval_backward` instead: the same formulas as a composition of torch ops, so
autograd differentiates them exactly, on any device and backend, at the cost of a few
passes over the data (statistics, the two gradient sums, ``dx``).

Forward-mode derivatives (:func:`train_jvp`, :func:`eval_jvp`) use the saved statistics:
batch norm's tangent is the backward's ``dx`` formula applied to the input's tangent plus
the parameters' terms, one pass of elementwise ops and two channel sums.

Everything is computed in the accumulator dtype (fp32, fp64 for fp64 input) and cast to
the input's / parameters' dtype at the end, as the kernels do.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import accumulator_dtype


def _channel_shape(x: Tensor) -> tuple:
    """Shape that broadcasts a per-channel vector against ``x`` (N, C, *spatial)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list:
    return [0, *range(2, x.dim())]


def _pivot(x: Tensor) -> Tensor:
    """Each channel's first element (the kernels' shift ``K``), as a constant: the
    statistics of ``x - K`` do not cancel at large offsets, and a constant shift changes
    no derivative."""
    if x.numel() == 0:  # an empty batch has no first element (and no statistics)
        return x.new_zeros(_channel_shape(x), dtype=accumulator_dtype(x.dtype))
    return x.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)].reshape(_channel_shape(x))


def _param_dtype(x: Tensor, weight: Optional[Tensor]) -> torch.dtype:
    return weight.dtype if weight is not None else accumulator_dtype(x.dtype)


def _like_input(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``x``'s dtype and memory format (a channels_last input gets channels_last
    gradients on this path too)."""
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.channels_last_3d if x.dim() == 5 \
        and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous() \
        else torch.contiguous_format
    return t.to(dtype=x.dtype, memory_format=fmt)


def _normalized(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(x_hat, rstd)`` from the batch's statistics, differentiable in ``x`` (one fused
    mean / variance reduction; its derivative is torch's exact formula)."""
    shifted = x.to(accumulator_dtype(x.dtype)) - _pivot(x)
    var, mean = torch.var_mean(shifted, _reduce_dims(x), correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (shifted - mean) * rstd, rstd


def train_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], eps: float):
    """``(dx, dweight, dbias)`` of the training forward (batch statistics), differentiable
    in ``grad_y``, ``x`` and ``weight``:
    ``dx = weight * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))``."""
    acc = accumulator_dtype(x.dtype)
    dims, shape = _reduce_dims(x), _channel_shape(x)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    x_hat, rstd = _normalized(x, eps)
    dy = grad_y.to(acc)
    sum_dy = dy.sum(dims, keepdim=True)
    sum_dy_x_hat = (dy * x_hat).sum(dims, keepdim=True)
    scale = rstd if weight is None else rstd * weight.to(acc).reshape(shape)
    # dx = scale * dy + (x_hat * c1 + c0): per-channel coefficients, two fused passes.
    c1 = scale * sum_dy_x_hat / -max(count, 1)
    c0 = scale * sum_dy / -max(count, 1)
    dx = torch.addcmul(torch.addcmul(c0, x_hat, c1), dy, scale)
    param_dtype = _param_dtype(x, weight)
    return (_like_input(dx, x), sum_dy_x_hat.reshape(-1).to(param_dtype), sum_dy.reshape(-1).to(param_dtype))


def eval_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], running_mean: Tensor,
                  running_var: Tensor, eps: float):
    """``(dx, dweight, dbias)`` of the eval forward (running statistics, constants here),
    differentiable in ``grad_y``, ``x`` and ``weight``."""
    acc = accumulator_dtype(x.dtype)
    dims, shape = _reduce_dims(x), _channel_shape(x)
    rstd = torch.rsqrt(running_var.detach().to(acc) + eps).reshape(shape)
    x_hat = (x.to(acc) - running_mean.detach().to(acc).reshape(shape)) * rstd
    dy = grad_y.to(acc)
    scale = rstd if weight is None else rstd * weight.to(acc).reshape(shape)
    param_dtype = _param_dtype(x, weight)
    return (_like_input(dy * scale, x), (dy * x_hat).sum(dims).to(param_dtype), dy.sum(dims).to(param_dtype))


def _affine_tangent(x: Tensor, x_hat: Tensor, tangent_x_hat: Optional[Tensor], weight, bias,
                    tangent_weight, tangent_bias) -> Optional[Tensor]:
    """Tangent of ``y = weight * x_hat + bias`` given ``x_hat``'s tangent."""
    shape = _channel_shape(x)
    acc = x_hat.dtype
    out = None
    if tangent_x_hat is not None:
        out = tangent_x_hat if weight is None else tangent_x_hat * weight.to(acc).reshape(shape)
    if tangent_weight is not None:
        term = x_hat * tangent_weight.to(acc).reshape(shape)
        out = term if out is None else out + term
    if tangent_bias is not None:
        term = tangent_bias.to(acc).reshape(shape).expand_as(x_hat)
        out = term if out is None else out + term
    return None if out is None else _like_input(out, x)


def train_jvp(x: Tensor, weight, bias, pivot: Tensor, mean_shifted: Tensor, rstd: Tensor,
              tangent_x, tangent_weight, tangent_bias) -> Optional[Tensor]:
    """Tangent of the training forward's ``y``.  With batch statistics,
    ``d x_hat = rstd * (dx - mean(dx) - x_hat * mean(dx * x_hat))``: the backward's own
    projection (it is symmetric), applied to the input's tangent."""
    acc = accumulator_dtype(x.dtype)
    dims, shape = _reduce_dims(x), _channel_shape(x)
    rstd = rstd.reshape(shape)
    # The forward's own pivot (kernels/stats.py): mean_shifted is relative to it.
    x_hat = (x.to(acc) - pivot.reshape(shape) - mean_shifted.reshape(shape)) * rstd
    tangent_x_hat = None
    if tangent_x is not None:
        t = tangent_x.to(acc)
        tangent_x_hat = rstd * (t - t.mean(dims, keepdim=True) - x_hat * (t * x_hat).mean(dims, keepdim=True))
    return _affine_tangent(x, x_hat, tangent_x_hat, weight, bias, tangent_weight, tangent_bias)


def eval_jvp(x: Tensor, weight, bias, running_mean: Tensor, running_var: Tensor, eps: float,
             tangent_x, tangent_weight, tangent_bias) -> Optional[Tensor]:
    """Tangent of the eval forward's ``y`` (the running statistics are constants)."""
    acc = accumulator_dtype(x.dtype)
    shape = _channel_shape(x)
    rstd = torch.rsqrt(running_var.to(acc) + eps).reshape(shape)
    x_hat = (x.to(acc) - running_mean.to(acc).reshape(shape)) * rstd
    tangent_x_hat = None if tangent_x is None else tangent_x.to(acc) * rstd
    return _affine_tangent(x, x_hat, tangent_x_hat, weight, bias, tangent_weight, tangent_bias)
