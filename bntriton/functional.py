"""``bntriton.batch_norm``: ``torch.nn.functional.batch_norm``'s signature and semantics,
with an optional fused epilogue ``act(BN(x) + residual)``.

One path for both: a call with no activation and no residual is plain batch norm
(ops/batch_norm.py, the hot path); anything else runs the activated operators
(ops/activated.py).  Arguments are checked first (checks.py), before any operator runs,
so a call that raises has changed nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import _common_valid_case, _dense, check_arguments, check_epilogue
from .ops import activated as activated_ops, batch_norm as plain_ops, traceable
from .kernels import RunningStats


def _empty_1d(input: Tensor, per_channel: tuple) -> bool:
    """A 1-D input of shape (0,) with (0,)-sized (or no) per-channel tensors: torch returns an
    empty result (its OpInfo samples include this)."""
    return (isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0
            and all(t is None or (isinstance(t, Tensor) and t.numel() == 0) for t in per_channel))


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """Batch normalization with Triton kernels; a drop-in for ``F.batch_norm``.

    Training uses the batch's statistics and, when running statistics are given, updates
    them in place (``momentum``; unbiased variance).  Evaluation uses the running
    statistics.  Differentiable in ``input``, ``weight`` and ``bias``.

    Keyword-only extras fuse the epilogue: ``act(BN(input) + residual)`` with
    ``activation`` in ``None, "relu", "leaky_relu", "silu", "gelu"`` (gelu: torch's default
    erf form; see :func:`batch_norm_act`).
    """
    if activation is not None or residual is not None:
        return batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, None,
                              activation=activation, residual=residual, negative_slope=negative_slope)
    return batch_norm_with_counter(
        input, running_mean, running_var, weight, bias, training, momentum, eps, None
    )


def batch_norm_with_counter(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor],
) -> Tensor:
    """:func:`batch_norm` that also increments ``num_batches_tracked`` (training only) and
    accepts ``momentum=None`` (cumulative average, factor ``1 / num_batches_tracked`` read on
    device: torch's modules read it on the host instead)."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if not training:
        return evaluate(input, running_mean, running_var, weight, bias, momentum, eps)
    if not _common_valid_case(input, running_mean, running_var, weight, bias, True, momentum, eps):
        # Anything unusual: the full checks, then dense copies of strided per-channel
        # tensors (the common case has none to make: it only accepts dense ones).
        if _empty_1d(input, (running_mean, running_var, weight, bias)):
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            return input.clone()
        check_arguments(input, running_mean, running_var, weight, bias, True, momentum, eps)
        weight, bias = _dense(weight), _dense(bias)
    eps = float(eps)
    running = None
    if running_mean is not None and input.numel() > 0:
        # The counter and the running statistics are updated on device: by the
        # statistics' own launches (eager calls) or one launch after them.
        running = RunningStats(
            running_mean, running_var, num_batches_tracked, None if momentum is None else float(momentum)
        )
    elif num_batches_tracked is not None:
        # An empty batch leaves the running statistics as they are (as torch).
        num_batches_tracked.add_(1)
    return plain_ops.train(input, weight, bias, eps, running)[0]


def evaluate(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
) -> Tensor:
    """:func:`batch_norm` in evaluation mode (the running statistics normalize; nothing is
    updated): the common call recognized in one pass, anything else fully checked first
    (``momentum`` is only checked, as torch does)."""
    if not _common_valid_case(input, running_mean, running_var, weight, bias, False, momentum, eps):
        if _empty_1d(input, (running_mean, running_var, weight, bias)):
            return input.clone()
        check_arguments(input, running_mean, running_var, weight, bias, False, momentum, eps)
        weight, bias, running_mean, running_var = (_dense(t) for t in (weight, bias, running_mean, running_var))
        eps = float(eps)
    return plain_ops.evaluate(input, weight, bias, running_mean, running_var, eps)


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
    the output for the backward (see ops/activated.py, InplaceABN, for the conditions).
    With no activation, no residual and not in place, this is plain batch norm."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if activation is None and residual is None and not inplace and type(negative_slope) in (float, int):
        # Plain batch norm (a bad slope takes the path below, which raises in torch's order).
        return batch_norm_with_counter(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                       num_batches_tracked)
    if not _common_valid_case(input, running_mean, running_var, weight, bias, training, momentum, eps):
        # Anything unusual: the full checks, then dense copies of strided per-channel tensors.
        check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps)
        weight, bias = _dense(weight), _dense(bias)
        if not training and running_mean is not None:
            running_mean, running_var = _dense(running_mean), _dense(running_var)
    code = check_epilogue(input, activation, residual, negative_slope)
    eps, slope = float(eps), float(negative_slope)
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
