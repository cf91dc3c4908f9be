"""Batch norm in plain torch operations, for graphs that leave bntriton.

An exported or traced model (``torch.onnx.export``, ``torch.jit.trace``,
``torch.export`` for ``torch._inductor.aoti_compile_and_package``) must run where
bntriton's operators are not registered: ONNX has no ``bntriton.batch_norm_eval``, an
AOTInductor package cannot call a Python operator, and a TorchScript trace cannot hold a
Triton launch.  While such a graph is being captured, the eval forward is therefore
recorded as the standard operations it is made of, with the kernels' numerics: the
running mean as the pivot, subtracted before scaling (exact for offset data), in the
accumulator dtype, rounded once into the input's dtype.  ONNX sees Sub, Mul, Add, Sqrt,
Div and Cast, and the fused activations (``BatchNormAct*d``) their standard operators.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..kernels import accumulator_dtype
from ..kernels.activations import ACTIVATIONS


def capturing() -> bool:
    """Whether the current call is being recorded into a graph that leaves bntriton
    (not ``torch.compile``, which keeps bntriton's operators and kernels)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def eager_capturing() -> bool:
    """:func:`capturing` for eager calls on plain tensors (never traced by Dynamo, which
    refuses torch.onnx's private flags): the same three questions, with the ONNX flags
    read directly rather than imported on every call as ``is_in_onnx_export`` does (a
    few microseconds of every eager call's host time)."""
    if torch._C._is_tracing() or torch.compiler.is_exporting():
        return True
    flags = _onnx_export_flags()
    if flags is None:
        return torch.onnx.is_in_onnx_export()
    return bool(flags[0].in_onnx_export or flags[1]._is_onnx_exporting)


@functools.lru_cache(maxsize=None)
def _onnx_export_flags():
    """The two flags ``torch.onnx.is_in_onnx_export`` reads (torch 2.9 and later), or None
    for another torch's layout, whose public function then answers."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    if not (hasattr(GLOBALS, "in_onnx_export") and hasattr(_flags, "_is_onnx_exporting")):
        return None
    return GLOBALS, _flags


def evaluate(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """``(x - running_mean) * weight / sqrt(running_var + eps) + bias``, as the kernels compute it."""
    return _normalized(x, weight, bias, running_mean, running_var, eps).to(x.dtype)


def evaluate_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    residual: Optional[Tensor],
    activation: int,
    slope: float,
) -> Tensor:
    """``act(BN(x) + residual)`` with the running statistics (the fused eval epilogue of
    kernels/activations.py), in the accumulator dtype, rounded once."""
    y = _normalized(x, weight, bias, running_mean, running_var, eps)
    if residual is not None:
        y = y + residual.to(y.dtype)
    if activation == ACTIVATIONS["relu"]:
        y = torch.relu(y)
    elif activation == ACTIVATIONS["leaky_relu"]:
        y = torch.nn.functional.leaky_relu(y, slope)
    elif activation == ACTIVATIONS["silu"]:
        y = torch.nn.functional.silu(y)
    elif activation == ACTIVATIONS["gelu"]:
        y = torch.nn.functional.gelu(y)
    return y.to(x.dtype)


def _normalized(x, weight, bias, running_mean, running_var, eps) -> Tensor:
    acc = accumulator_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = 1.0 / torch.sqrt(running_var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (x.to(acc) - running_mean.to(acc).reshape(shape)) * scale.reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    return y
