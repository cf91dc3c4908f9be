"""The native CPU path: the kernels' algorithm on torch's own CPU operations.

Triton's interpreter runs the kernels on CPU tensors faithfully but slowly (milliseconds
per program instance), which is right for verifying them and wrong for people who run a
model on a CPU.  This module is a second implementation of :mod:`.dispatch`'s functions,
used for CPU tensors unless ``bntriton.cpu_backend("interpreter")`` /
``BNTRITON_CPU_BACKEND=interpreter`` asks for the kernels.

The numerics are the kernels': every value is first shifted by the per-channel pivot
``K`` (in training the kernels' pivot, from the first rows; the running mean in eval), in the
accumulator dtype, so that ``x - K`` is exact for offset data (data within two stds of zero
skip the shift: :func:`_fold_is_exact_enough`); torch's native CPU batch
norm then takes the statistics of the shifted problem (its CPU reductions accumulate fp32
in fp64), normalizes ``(x - K) - mean_shifted`` and takes the gradients.  Its saved mean
*is* ``mean_shifted`` and its saved inverse std is ``rstd``; the unbiased variance comes
from its running-variance update with momentum 1 on a zero buffer.  Outputs are the
kernels' (same fields, dtypes, strides), so ops.py, autograd and tracing cannot tell the
two apart; ``bntriton verify`` and the tests hold both to the same oracle and bounds.

Each function works on a dense matrix form of the view that torch's fast CPU loops
handle: ``(rows, C)`` for channels-last views, ``(N, C, S)`` for channels-first ones.
"""
from __future__ import annotations

import torch

from .layout import ChannelView
from .runtime import accumulator_dtype
from .stats import BatchStats


def _matrix(view: ChannelView, t: torch.Tensor) -> torch.Tensor:
    """``t`` (the view's shape and strides) as the dense matrix torch's loops take."""
    if view.channels_last:
        return t.as_strided((view.rows, view.channels), (view.channels, 1), t.storage_offset())
    samples = view.rows // view.spatial
    return t.as_strided(
        (samples, view.channels, view.spatial), (view.stride_n, view.stride_c, 1), t.storage_offset()
    )


def _unmatrix(view: ChannelView, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A result in the matrix form back to the view's shape and strides, in ``dtype``:
    re-strided in place when torch kept the layout (the usual case), else copied once."""
    x = view.tensor
    if m.dtype == dtype and m.storage_offset() == 0 and m.stride() == _matrix(view, x).stride():
        # The same storage under the input's shape and strides, as a tensor of its own
        # rather than a view: forward-mode AD refuses an autograd.Function output that is
        # a view of one of its temporaries (batched jvp checks the tangent's layout).
        return m.new_empty(0).set_(m.untyped_storage(), 0, x.shape, x.stride())
    out = view.empty_like(dtype)
    _matrix(view, out).copy_(m)
    return out


def _per_channel(view: ChannelView, c: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against the matrix form."""
    return c if view.channels_last else c.view(1, -1, 1)


def _first_rows(view: ChannelView, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of each channel's first m = min(16, rows) rows, in the
    accumulator dtype: the mean as ``x_0 + mean(x_i - x_0)``."""
    m = _matrix(view, view.tensor)
    count = min(16, view.rows)
    if view.channels_last:
        first_rows = m[:count]
    else:  # rows run over (sample, position): enough samples for `count` rows
        samples = -(-count // view.spatial)
        first_rows = m[:samples].transpose(1, 2).reshape(-1, view.channels)[:count]
    first_rows = first_rows.to(acc)
    deviation = first_rows - first_rows[0]
    mean_deviation = deviation.sum(0) / count
    variance = (deviation - mean_deviation).square().sum(0) / count
    return first_rows[0] + mean_deviation, variance


def _pivot_of(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """K as the kernels define it (numerics.batch_pivot): the first rows' mean, or 0 where
    it is within two of their standard deviations of zero."""
    return torch.where(mean * mean <= 4.0 * variance, torch.zeros_like(mean), mean)


def _pivot(view: ChannelView, acc: torch.dtype) -> torch.Tensor:
    """K (:func:`_pivot_of`) of the view's first rows."""
    return _pivot_of(*_first_rows(view, acc))


def _within(mean: torch.Tensor, variance: torch.Tensor, stds: float) -> bool:
    """Whether every ``|mean| <= stds * sqrt(variance)`` (False for a NaN): one small op
    and a min, as torch's boolean all() costs ~10x as much on C values."""
    if mean.numel() == 0:
        return True
    slack = torch.addcmul(variance.to(mean.dtype), mean, mean, value=-1.0 / (stds * stds))
    return float(slack.min()) >= 0.0


def _minus_pivot(view: ChannelView, pivot: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``x - K`` in the matrix form, in the accumulator dtype (read-only: it may be ``x``).

    Where every pivot is 0 (the pivot's rule gives 0 to data whose first rows' mean is
    within two of their standard deviations of zero: the usual case for activations),
    ``x - 0`` is ``x`` exactly and no pass over the data is spent on it.  Reading K costs
    no synchronization: it is a CPU tensor of C values.
    """
    m = _matrix(view, view.tensor)
    if m.dtype == acc and not bool(pivot.any()):  # a NaN pivot counts as nonzero
        return m
    shifted = torch.sub(m, _per_channel(view, pivot))
    return shifted if shifted.dtype == acc else shifted.to(acc)


def _param(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(acc)


def forward_train(view: ChannelView, weight, bias, eps: float) -> tuple[torch.Tensor, BatchStats]:
    """``(y, stats)`` normalized with the batch's statistics (``view.rows >= 1``).

    torch's training forward folds the batch mean into the shift as its eval does, so
    unshifted data (K = 0) are as accurate as shifted ones while every channel's mean is
    within two of its stds of zero (:func:`_fold_is_exact_enough`'s analysis, the
    batch's statistics for the running ones: data always reach one batch std from their
    mean, the std being their RMS deviation).  The kernels' pivot is 0 where the first
    rows say so; where it is not but the first rows put the mean within four of their
    stds (sampling noise around the rule's edge), the unshifted problem is tried first and
    kept when the batch's own statistics show the mean within two stds: no pass over the
    data is spent on ``x - K``, here or in the backward.  Data further out are shifted.
    """
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    first_mean, first_variance = _first_rows(view, acc)
    pivot = _pivot_of(first_mean, first_variance)
    m = _matrix(view, x)
    if m.dtype == acc and _within(first_mean, first_variance, 4.0):
        y, mean, rstd, var_unbiased = _native_forward(m, weight, bias, eps, acc)
        if _within(first_mean, first_variance, 2.0) or _within(mean, rstd.pow(-2), 2.0):
            zero = torch.zeros_like(mean)
            return _unmatrix(view, y, x.dtype), BatchStats(mean, rstd, None, None, mean, var_unbiased, zero)
    # x - K in the accumulator dtype: exact for values near the pivot, whatever the offset.
    shifted = _minus_pivot(view, pivot, acc)
    y, mean_shifted, rstd, var_unbiased = _native_forward(shifted, weight, bias, eps, acc)
    stats = BatchStats(mean_shifted, rstd, None, None, pivot + mean_shifted, var_unbiased, pivot)
    return _unmatrix(view, y, x.dtype), stats


def _native_forward(m: torch.Tensor, weight, bias, eps: float, acc: torch.dtype):
    """torch's training forward on the matrix form: ``(y, mean, rstd, var_unbiased)``."""
    # Momentum 1 on a zero buffer leaves exactly the unbiased variance in it.
    mean_buffer = torch.zeros(m.shape[1], dtype=acc)
    var_unbiased = torch.zeros(m.shape[1], dtype=acc)
    y, mean, rstd = torch.native_batch_norm(
        m, _param(weight, acc), _param(bias, acc), mean_buffer, var_unbiased, True, 1.0, eps
    )
    return y, mean, rstd, var_unbiased


def backward(
    view: ChannelView, dy, weight, pivot, pivot_stride: int, mean_shifted, rstd,
    batch_stats: bool, param_dtype: torch.dtype,
):
    """``(dx, dweight, dbias)``; same contract as :func:`.dispatch.backward`."""
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    channels = view.channels
    if view.rows == 0:
        zeros = torch.zeros(channels, dtype=param_dtype)
        return view.empty_like(), zeros, zeros.clone()
    # K at ``pivot[c * pivot_stride]``: the forward's pivot or the running mean.
    k = pivot.as_strided((channels,), (pivot_stride,), pivot.storage_offset()).to(acc)
    shifted = _minus_pivot(view, k, acc)
    dy_m = _matrix(view, dy)
    if dy_m.dtype != acc:
        dy_m = dy_m.to(acc)
    if batch_stats:
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy_m, shifted, _param(weight, acc), None, None, mean_shifted, rstd, True, 0.0,
            [True, True, True],
        )
    else:
        # Running statistics: dx = dy * weight * rstd, and the parameter gradients are
        # plain per-channel reductions.
        dims = (0,) if view.channels_last else (0, 2)
        centred = shifted - _per_channel(view, mean_shifted)
        dbias = dy_m.sum(dims)
        dweight = (dy_m * centred).sum(dims) * rstd
        coef = rstd if weight is None else rstd * weight.to(acc)
        dx = dy_m * _per_channel(view, coef)
    return _unmatrix(view, dx, x.dtype), dweight.to(param_dtype), dbias.to(param_dtype)


def forward_eval(view: ChannelView, weight, bias, running_mean, running_var, eps: float) -> torch.Tensor:
    """``(x - running_mean) * weight * rstd + bias`` with ``rstd`` from the running variance."""
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    if _fold_is_exact_enough(running_mean, running_var, eps):
        # torch's own eval: one pass, ``x * a + (bias - running_mean * a)``.
        y = torch.batch_norm(_matrix(view, x), weight, bias, running_mean, running_var, False, 0.0, eps, False)
        return _unmatrix(view, y, x.dtype)
    shifted = torch.sub(_matrix(view, x), _per_channel(view, running_mean.to(acc)))
    if shifted.dtype != acc:
        shifted = shifted.to(acc)
    # The pivot is the running mean itself, so torch's eval sees a zero mean.  Its eval is
    # elementwise, so it normalizes the shifted buffer in place: one pass that writes no
    # new memory (an out-of-place second pass costs ~1.5x as much).
    zero_mean = torch.zeros(view.channels, dtype=acc)
    unused = torch.empty(0, dtype=acc)
    torch.ops.aten.native_batch_norm.out(
        shifted, _param(weight, acc), _param(bias, acc), zero_mean, running_var.to(acc), False, 0.0, eps,
        out=shifted, save_mean=unused, save_invstd=unused,
    )
    return _unmatrix(view, shifted, x.dtype)


def _fold_is_exact_enough(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> bool:
    """Whether torch's single-pass eval is as accurate as the exact shift, within the bound:
    every channel's running mean within two running stds of zero, the rule by which the
    training pivot (numerics.batch_pivot) leaves data unshifted.

    With ``u`` the unit roundoff of the accumulator (eps / 2), ``a = weight / sigma``,
    ``sigma = sqrt(running_var + eps)``, ``D = |(x - mean) * a|`` and ``M = |mean * a|``:
    the exact shift rounds ``x - mean`` (u D), the coefficient ``a`` (about 4u relative:
    the sum, sqrt, division and product by weight), ``(x - mean) * a`` (u D) and ``y``
    (u |y|): about ``6u D + u |y|``.  torch's fold ``y = x * a + (bias - mean * a)``
    rounds ``a`` alike (4u D), then ``mean * a`` (u M), ``bias - mean * a`` (u (|bias| +
    M)), ``x * a`` (u (D + M)) and ``y``: ``5u D + 3u M + u |bias| + u |y|``.  Its extra
    error, ``3u M + u |bias|``, measured as the bound table does (normwise, eps of max|y|,
    where max|y| >= |weight| + |bias| for data reaching one running std on both sides of
    the running mean, which is what running statistics describe) is at most ``(1.5 M +
    0.5 |bias|) / (|weight| + |bias|)`` eps.  With ``|mean| <= 2 sigma``, ``M <= 2
    |weight|``: at most 3.5 eps on top of the shift's 3.5, inside the y bound (1 + 3
    log2(count) eps: 7 from four values per channel on); for fp16 / bf16 input torch folds
    in fp32, where it costs a fraction of the input's ulp.  Beyond two stds the fold's
    error grows with the offset (1.5e4 eps of max|y| at 1e4 stds) and the exact shift
    runs.  Reading the running statistics costs no synchronization: they are CPU tensors,
    O(C) values.
    """
    return _within(running_mean, running_var + eps, 2.0)


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum) -> None:
    """The kernel's running-statistics update, with the same arithmetic in the same dtype."""
    acc = mean.dtype
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / num_batches_tracked.to(acc)
    else:
        factor = torch.tensor(momentum, dtype=acc)
    keep = 1.0 - factor
    running_mean.copy_(keep * running_mean.to(acc) + factor * mean)
    running_var.copy_(keep * running_var.to(acc) + factor * var_unbiased)
