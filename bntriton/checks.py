"""Argument checks for ``bntriton.batch_norm`` and its activated form, in torch's order
and wording.

Every check happens before any operator runs, so a call that raises has changed nothing:
no running statistic, no ``num_batches_tracked`` (torch's modules bump the counter before
they fail).  Checks read shapes and dtypes only: no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .kernels.activations import ACTIVATIONS, activation_code
from .ops.routes import PLAIN_TYPES

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Names in torch's dtype errors ("expected scalar type Float but found Half").
_TORCH_DTYPE_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
                      torch.float64: "Double"}


def _check_per_channel(name: str, t: Optional[Tensor], input: Tensor) -> None:
    if t is None:
        return
    if (
        type(t) in (Tensor, torch.nn.Parameter) and t.dim() == 1 and t.shape[0] == input.shape[1]
        and t.is_floating_point() and t.device == input.device
    ):
        return  # the common case in one expression: this runs four times per call
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    channels = input.shape[1]
    if t.numel() != channels:
        raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
    if t.dim() != 1:
        raise RuntimeError(f"{name} must be 1-D with {channels} elements, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != input.device:
        raise RuntimeError(
            f"{name} is on {t.device} but input is on {input.device}: expected all tensors on one device"
        )


def _dtype_error(name: str, t: Tensor, expected: torch.dtype, input: Tensor) -> RuntimeError:
    want, got = (_TORCH_DTYPE_NAMES.get(d, str(d)) for d in (expected, t.dtype))
    also = " (or all float32)" if input.dtype in _LOW_PRECISION else ""
    return RuntimeError(
        f"expected scalar type {want} but found {got}: {name} is {t.dtype}; weight, bias, "
        f"running_mean and running_var must all be {input.dtype} like the input{also}"
    )


# Plain tensors (not fake, functional or subclassed): the types the eager route takes.
def _common_valid_case(input, running_mean, running_var, weight, bias, training, momentum, eps) -> bool:
    """True for a call :func:`check_arguments` would accept, recognized in one pass in
    the common case (plain CPU / CUDA tensors, dense per-channel tensors of C elements on
    the input's device in one accepted dtype, nothing needing a gradient it cannot have);
    False whenever anything is unusual, and the full checks then decide."""
    if type(input) not in PLAIN_TYPES or not (input.is_cuda or input.is_cpu) or input.dim() < 2:
        return False
    dtype = input.dtype
    if dtype not in SUPPORTED_DTYPES or type(eps) is not float or not (
            momentum is None or type(momentum) is float):
        return False
    if running_mean is None:
        if running_var is not None or not training:
            return False
    elif running_var is None or running_mean.requires_grad or running_var.requires_grad:
        return False
    if forward_ad._current_level >= 0:
        return False
    shape = input.shape
    channels = shape[1]
    if training and (eps <= 0 or input.numel() == channels) or eps < 0:
        return False
    device = input.device
    param_dtype = None
    for t in (running_mean, running_var, weight, bias):
        if t is None:
            continue
        if type(t) not in PLAIN_TYPES or t.shape != (channels,) or t.device != device or not t.is_contiguous():
            return False
        if param_dtype is None:
            param_dtype = t.dtype
            if param_dtype != dtype and not (param_dtype == torch.float32 and dtype in _LOW_PRECISION):
                return False
        elif t.dtype != param_dtype:
            return False
    return True


def check_arguments(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
) -> None:
    """Raise a clear error for anything the kernels cannot take; change nothing."""
    if _common_valid_case(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, *), got {input.dim()}D input")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"batch_norm supports float16, bfloat16, float32 and float64 inputs, got {input.dtype}"
        )
    if input.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"bntriton runs on CUDA (compiled) and CPU (interpreted), not {input.device}")
    # torch's order: the batch size (F.batch_norm's own check), then every per-channel
    # tensor's size, then their dtypes (the kernels'), then autograd's checks.
    if training:
        values_per_channel = input.numel() // input.shape[1] if input.shape[1] else 0
        if values_per_channel == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
    per_channel = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                   ("bias", bias))
    for name, t in per_channel:
        if t is not None:
            _check_per_channel(name, t, input)
    # As torch: weight, bias and the running statistics share one dtype, the input's, or
    # float32 under a float16 / bfloat16 input (autocast's case).
    param_dtype = None
    for name, t in per_channel:
        if t is None:
            continue
        if param_dtype is None:
            param_dtype = t.dtype
            if param_dtype != input.dtype and not (param_dtype == torch.float32 and input.dtype in _LOW_PRECISION):
                raise _dtype_error(name, t, input.dtype, input)
        elif t.dtype != param_dtype:
            raise _dtype_error(name, t, param_dtype, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad
                                     or forward_ad._current_level >= 0):
        _check_running_not_differentiated(input, running_mean, running_var, training)
    if momentum is not None and not isinstance(momentum, (float, int)):
        raise TypeError(f"momentum must be a float or None, got {type(momentum).__name__}")
    if not isinstance(eps, (float, int)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    # torch 2.13's wording: training divides by sqrt(var + eps) with var possibly 0.
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {float(eps)}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {float(eps)}")


def _has_tangent(t: Tensor) -> bool:
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None


def _check_running_not_differentiated(input: Tensor, running_mean: Tensor, running_var: Tensor,
                                      training: bool) -> None:
    """torch's rules for running statistics that autograd could see: reverse mode never
    (they are buffers); forward mode refuses tangents on them only where the output
    depends on them (evaluation) and the input carries a tangent too, so that the jvp runs
    (torch's batch_norm_jvp); elsewhere their tangents are ignored, as torch ignores them."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"batch_norm is not differentiable with respect to argument '{name}' (as torch): "
                "this input cannot have requires_grad=True"
            )
    if not training and _has_tangent(input) and (_has_tangent(running_mean) or _has_tangent(running_var)):
        raise RuntimeError(
            "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad "
            "defined (as torch)"
        )


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-channel tensor the kernels can read as C consecutive values: an expanded
    (stride 0) or strided view is copied (differentiably, for weight and bias)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def check_epilogue(input: Tensor, activation, residual: Optional[Tensor], negative_slope) -> int:
    """Raise for a bad activation / residual / slope; return the activation's code."""
    try:
        code = ACTIVATIONS[activation]  # (activation_code's lookup, written out: a frame less per call)
    except (KeyError, TypeError):
        code = activation_code(activation)  # raises with the names it takes
    if not isinstance(negative_slope, (float, int)) or isinstance(negative_slope, bool):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"residual must have the input's dtype {input.dtype}, got {residual.dtype}")
        if residual.device != input.device:
            raise RuntimeError(f"residual is on {residual.device} but input is on {input.device}")
    return code
