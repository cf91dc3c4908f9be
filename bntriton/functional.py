"""``bntriton.batch_norm``: ``torch.nn.functional.batch_norm``'s signature and semantics.

Arguments are checked first (checks.py), before any operator runs, so a call that raises
has changed nothing.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .ops import batch_norm as plain_ops
from .activated import batch_norm_act
from .checks import _common_valid_case, _dense, check_arguments
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
    ``activation`` in ``None, "relu", "leaky_relu", "silu", "gelu"`` (see activated.py).
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
