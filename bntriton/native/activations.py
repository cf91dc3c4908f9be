"""The fused epilogue on the native CPU path: activation, residual, 1-bit mask and
in-place output composed from torch ops around native/cpu.py's functions.

Same semantics as the kernels' constexpr switches (kernels/activations.py): the pre-activation
``z = (x - K) * scale + shift [+ residual]`` is formed in the accumulator dtype and
rounded once, after the activation; the mask has the kernels' layout (bit ``r % 8`` of
byte ``(r // 8, c)``, rows in the view's order); the backward takes dy through
``act'(z)`` (z recomputed, read from the mask, or recovered from the output) and hands
dz to native_cpu.backward.  On CPU this costs extra passes over the tensor (the native
statistics also produce an output that is not used): it is the reference behaviour for
CPU users, not a fused kernel.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import cpu as native_cpu
from ..kernels.activations import Epilogue
from ..kernels.layout import ChannelView
from ..kernels.runtime import accumulator_dtype


def _bcast(view: ChannelView, c: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against the view's (N, C, *) tensor."""
    return c.reshape((1, -1) + (1,) * (view.tensor.dim() - 2))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) as (rows, C), rows in the view's order (sample, then position)."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def activate(z: torch.Tensor, code: int, slope: float) -> torch.Tensor:
    if code == 1:
        return torch.where(z > 0, z, 0.0)
    if code == 2:
        return torch.where(z > 0, z, z * slope)
    if code == 3:
        return z / (1.0 + torch.exp(-z))
    if code == 4:
        return z * (0.5 * (1.0 + torch.erf(z * 0.7071067811865476)))
    return z


def activation_grad(z: torch.Tensor, dy: torch.Tensor, code: int, slope: float) -> torch.Tensor:
    """``dy * act'(z)``, as activations.activation_grad."""
    if code == 1:
        return torch.where(z > 0, dy, 0.0)
    if code == 2:
        return torch.where(z > 0, dy, dy * slope)
    if code == 3:
        sig = 1.0 / (1.0 + torch.exp(-z))
        return dy * (sig * (1.0 + z * (1.0 - sig)))
    if code == 4:
        pdf = 0.3989422804014327 * torch.exp(-0.5 * z * z)
        return dy * (0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * pdf)
    return dy


def pack_mask(positive: torch.Tensor, out: torch.Tensor) -> None:
    """``positive`` (N, C, *) bool into ``out`` ((ceil(rows / 8), C) uint8)."""
    bits = _rows(positive).to(torch.uint8)
    rows, channels = bits.shape
    padded = torch.zeros((out.shape[0] * 8, channels), dtype=torch.uint8)
    padded[:rows] = bits
    weights = (1 << torch.arange(8, dtype=torch.int32)).view(1, 8, 1)
    out.copy_((padded.view(-1, 8, channels).to(torch.int32) * weights).sum(1).to(torch.uint8))


def unpack_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool tensor (``like``'s shape, contiguous) that :func:`pack_mask` packed."""
    shifts = torch.arange(8, dtype=torch.int32).view(1, 8, 1)
    bits = (mask.to(torch.int32).unsqueeze(1) >> shifts) & 1
    rows = like.numel() // like.shape[1]
    flat = bits.reshape(-1, like.shape[1])[:rows] != 0
    moved = like.movedim(1, -1).shape
    return flat.reshape(moved).movedim(-1, 1)


def _finish(view: ChannelView, z: torch.Tensor, epilogue: Epilogue, dtype: torch.dtype) -> torch.Tensor:
    """Residual, mask and activation on the pre-activation z; the result in the view's
    strides (or written into ``epilogue.out``)."""
    if epilogue.residual is not None:
        z = z + epilogue.residual
    if epilogue.mask is not None:
        pack_mask(z > 0, epilogue.mask)
    y = activate(z, epilogue.activation, epilogue.slope)
    out = epilogue.out if epilogue.out is not None else view.empty_like(dtype)
    out.copy_(y)
    return out


def forward_train(view: ChannelView, weight, bias, eps: float, epilogue: Epilogue):
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    _, stats = native_cpu.forward_train(view, weight, bias, eps)
    pivot = stats.pivot  # its own tensor: an in-place write into x cannot change it
    scale = stats.rstd if weight is None else stats.rstd * weight.to(acc)
    shift = -stats.mean_shifted * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    z = (x.to(acc) - _bcast(view, pivot)) * _bcast(view, scale) + _bcast(view, shift)
    # The backward recomputes z from these very coefficients (the same ops: the same z).
    return _finish(view, z, epilogue, x.dtype), replace(stats, scale=scale, shift=shift)


def forward_eval(view: ChannelView, weight, bias, running_mean, running_var, eps: float, epilogue: Epilogue,
                 inference: bool = False):
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    if inference and x.dtype == acc and epilogue.mask is None and epilogue.out is None and not epilogue.invert:
        return _eval_in_place(view, weight, bias, running_mean, running_var, eps, epilogue)
    rstd = torch.rsqrt(running_var.to(acc) + eps)
    scale = rstd if weight is None else rstd * weight.to(acc)
    shift = torch.zeros_like(scale) if bias is None else bias.to(acc)
    z = (x.to(acc) - _bcast(view, running_mean.to(acc))) * _bcast(view, scale) + _bcast(view, shift)
    return _finish(view, z, epilogue, x.dtype)


def _eval_in_place(view: ChannelView, weight, bias, running_mean, running_var, eps: float, epilogue: Epilogue):
    """fp32 / fp64 eval that no backward follows: native_cpu's eval (torch's single pass
    where its fold is within the bound, :func:`native_cpu._fold_stds`), then the residual
    and the activation in place on its fresh output, three passes as torch's own
    ``act(bn(x) + residual)`` takes, where composing z from the exact shift takes six.
    z is then rounded once more (before the residual and the activation) than the kernels
    round it, half an ulp of the accumulator's own dtype, within the y_act bound's
    rounding term.  Only without a backward: the backward recomputes z from the exact
    shift, and a fold's z could disagree with it in the sign of values within an ulp of
    zero, where ReLU's mask must not differ between the forward and the backward."""
    y = native_cpu.forward_eval(view, weight, bias, running_mean, running_var, eps)
    if epilogue.residual is not None:
        y.add_(epilogue.residual)
    code = epilogue.activation
    if code == 1:
        torch.relu_(y)
    elif code == 2:
        torch.nn.functional.leaky_relu_(y, epilogue.slope)
    elif code == 3:
        torch.nn.functional.silu(y, inplace=True)
    elif code == 4:
        torch.ops.aten.gelu_(y)
    return y


def affine(view: ChannelView, pivot, pivot_stride: int, scale, shift, out_dtype, epilogue: Epilogue):
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    k = pivot.as_strided((view.channels,), (pivot_stride,), pivot.storage_offset()).to(acc)
    z = (x.to(acc) - _bcast(view, k)) * _bcast(view, scale) + _bcast(view, shift)
    return _finish(view, z, epilogue, out_dtype)


def backward(view: ChannelView, dy, weight, pivot, pivot_stride: int, mean_shifted, rstd,
             batch_stats: bool, param_dtype, epilogue: Epilogue):
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    code, slope = epilogue.activation, epilogue.slope
    dy = dy.to(acc)
    if code != 0 or epilogue.invert:
        act_scale, act_shift = _bcast(view, epilogue.act_scale), _bcast(view, epilogue.act_shift)
    if epilogue.invert:
        # x holds y = act(z): z = act^-1(y), and x - K = (z - act_shift) / act_scale with K = 0.
        y = x.to(acc)
        z = torch.where(y > 0, y, y / slope) if code == 2 else y
        dz = activation_grad(z, dy, code, slope)
        x_k = view.same_layout((z - act_shift) / act_scale)
        dx, dweight, dbias = native_cpu.backward(
            replace(view, tensor=x_k), view.same_layout(dz), weight, torch.zeros_like(rstd), 1,
            mean_shifted, rstd, batch_stats, param_dtype,
        )
        return dx.to(x.dtype), dweight, dbias
    if epilogue.mask is not None:
        positive = unpack_mask(epilogue.mask, x)
        dz = torch.where(positive, dy, dy * slope if code == 2 else 0.0)
    elif code != 0:
        k = pivot.as_strided((view.channels,), (pivot_stride,), pivot.storage_offset()).to(acc)
        z = (x.to(acc) - _bcast(view, k)) * act_scale + act_shift
        dz = activation_grad(z, dy, code, slope)
    else:
        dz = dy
    if epilogue.residual is not None:
        epilogue.residual.copy_(dz)
    return native_cpu.backward(
        view, view.same_layout(dz), weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats, param_dtype,
    )
