"""``batch_norm`` with ``activation=`` / ``residual=``: argument checks and the path choice.

``y = act(BN(x) + residual)`` with ``act`` one of ``None, "relu", "leaky_relu", "silu",
"gelu"`` (gelu: torch's default erf form).  Checks run before anything changes state, as
in checks.py; the operators are in ops/activated.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import activated as activated_ops, batch_norm as plain_ops, traceable
from .checks import _dense, check_arguments
from .kernels import RunningStats
from .kernels.activations import activation_code


def check_epilogue(input: Tensor, activation, residual: Optional[Tensor], negative_slope) -> int:
    """Raise for a bad activation / residual / slope; return the activation's code."""
    code = activation_code(activation)
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


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
    *,
    activation=None,
    residual: Optional[Tensor] = None,
    negative_slope: float = 0.01,
    inplace: bool = False,
) -> Tensor:
    """``act(batch_norm(input) + residual)``; ``inplace``: write into ``input`` and keep only
    the output for the backward (see activated_ops.InplaceABN for the conditions)."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps)
    code = check_epilogue(input, activation, residual, negative_slope)
    eps, slope = float(eps), float(negative_slope)
    weight, bias = _dense(weight), _dense(bias)
    if not training and running_mean is not None:
        running_mean, running_var = _dense(running_mean), _dense(running_var)
    if not training and running_mean is not None and traceable.capturing():
        # Export / tracing: standard operations that run outside bntriton (ops/traceable.py).
        return traceable.evaluate_act(input, weight, bias, running_mean, running_var, eps, residual, code, slope)
    if inplace and torch.compiler.is_compiling():
        inplace = False  # traced graphs get the out-of-place op (same values; see README)
    if inplace:
        activated_ops._check_inplace(input, weight, code, slope, residual, training)
    if not training:
        if inplace:
            return activated_ops.InplaceABN.apply(
                input, weight, bias, running_mean, running_var, eps, code, slope, training)[0]
        return activated_ops.evaluate(input, weight, bias, running_mean, running_var, residual, eps, code, slope)[0]
    running = None
    if running_mean is not None and input.numel() > 0:
        running = RunningStats(running_mean, running_var, num_batches_tracked,
                               None if momentum is None else float(momentum))
    if inplace:
        y, mean, var_unbiased = activated_ops.InplaceABN.apply(
            input, weight, bias, running_mean, running_var, eps, code, slope, training)
        if running is not None:
            plain_ops.update(running.mean, running.var, running.num_batches_tracked, mean, var_unbiased, running.momentum)
    else:
        # The eager path updates the running statistics inside the statistics' launches.
        y = activated_ops.train(input, weight, bias, residual, eps, code, slope, running)[0]
    if running is None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # no statistics, or an empty batch: they stay (as torch)
    return y
