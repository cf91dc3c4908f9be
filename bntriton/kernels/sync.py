"""SyncBatchNorm's combine: every process's statistics into the global batch's.

Each process contributes one row ``[count, K (C), mean of x - K (C), M2 (C)]`` (its
pivot, shifted mean and sum of squared deviations, from stats.py); after an all-gather
every process holds the same ``(world, 3C + 1)`` tensor and runs this one launch on it.

The ranks are merged in rank order as the statistics kernels merge their splits (a
compensated sum, then ``M2 = sum M2_r + sum n_r (mean_r - mean)^2``), so every process
computes bit-identical global statistics (and running statistics), with an error that
does not grow with the number of ranks.  Means are carried relative to one reference pivot, the first
non-empty rank's: ``(K_r - K_ref) + mean_r`` is accurate to the data's spread, where a
mean rounded with its offset would not be (half an fp32 ulp of 1e4 is 5e-4).  Empty ranks
(count 0) merge with weight zero.  The outputs are those of :func:`stats.batch_stats`,
for this process's own pivot: the forward epilogue and the backward then run unchanged.
"""
from __future__ import annotations

import torch
import triton.language as tl

from .plans import cdiv, channel_block, plan
from .runtime import accumulator_dtype, kernel, split_float, tl_accumulator
from .layout import ChannelView
from .numerics import batch_coefficients, resolve_mean, two_sum
from .stats import BatchStats, batch_stats


@kernel
def _rank_combine_kernel(
    gathered_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
    count_ptr, mean_s_ptr, rstd_ptr, scale_ptr, shift_ptr, mean_ptr, var_unbiased_ptr,
    world, rank, channels, eps_hi, eps_lo,
    BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr, ACC: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    row = 3 * channels + 1
    first = tl.zeros([BLOCK_C], dtype=tl.int32)  # broadcast loads of the per-rank count

    # Pass 1: the global sum of x - reference, compensated (two_sum; the fma catches the
    # rounding of count * mean), so its error does not grow with the number of ranks.
    total = tl.zeros([BLOCK_C], dtype=ACC)
    sum_hi = tl.zeros([BLOCK_C], dtype=ACC)
    sum_lo = tl.zeros([BLOCK_C], dtype=ACC)
    reference = tl.zeros([BLOCK_C], dtype=ACC)
    for r in range(0, world):
        base = gathered_ptr + r * row
        count = tl.load(base + first)
        pivot = tl.load(base + 1 + c, mask=c_mask, other=0.0)
        rank_mean_s = tl.load(base + 1 + channels + c, mask=c_mask, other=0.0)
        # Until a rank with values is seen, nothing is summed: the first such rank's
        # pivot becomes the reference (identical on every process).
        reference = tl.where(total == 0.0, pivot, reference)
        rank_mean = (pivot - reference) + rank_mean_s
        part = count * rank_mean
        sum_hi, carry = two_sum(sum_hi, part)
        sum_lo += carry + tl.fma(count, rank_mean, -part)
        total += count
    mean, correction = resolve_mean(sum_hi, sum_lo, tl.maximum(total, 1.0))  # relative to `reference`

    # Pass 2: M2 = sum M2_r + sum n_r (mean_r - mean)^2, positive terms, compensated.
    m2_hi = tl.zeros([BLOCK_C], dtype=ACC)
    m2_lo = tl.zeros([BLOCK_C], dtype=ACC)
    for r in range(0, world):
        base = gathered_ptr + r * row
        count = tl.load(base + first)
        pivot = tl.load(base + 1 + c, mask=c_mask, other=0.0)
        rank_mean_s = tl.load(base + 1 + channels + c, mask=c_mask, other=0.0)
        rank_m2 = tl.load(base + 1 + 2 * channels + c, mask=c_mask, other=0.0)
        delta = ((pivot - reference) + rank_mean_s) - mean
        # An empty rank (count 0, zeros) adds nothing.
        m2_hi, carry = two_sum(m2_hi, rank_m2 + count * delta * delta)
        m2_lo += carry
    m2 = m2_hi + m2_lo

    # Nothing to normalize when every rank is empty: max(total, 1) only avoids a NaN.
    # This process normalizes (x - K_local): re-express the mean against its own pivot.
    local_pivot = tl.load(gathered_ptr + rank * row + 1 + c, mask=c_mask, other=0.0)
    mean_s = mean - (local_pivot - reference)
    rstd, scale, shift = batch_coefficients(m2 / tl.maximum(total, 1.0), mean_s, weight_ptr, bias_ptr, c, c_mask,
                                            eps_hi, eps_lo, BLOCK_C, HAS_WEIGHT, HAS_BIAS, ACC)
    tl.store(mean_s_ptr + c, mean_s, mask=c_mask)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    tl.store(shift_ptr + c, shift, mask=c_mask)

    batch_mean = (reference + mean) + correction
    var_unbiased = m2 / tl.maximum(total - 1.0, 1.0)  # the maximum only keeps 0/0 out
    if HAS_RUNNING:
        # A statistic the global batch lacks (a mean of nothing, an unbiased variance of
        # one value) is replaced by the running one, so that the running update leaves it
        # as it was, without a host-side check of the count.
        batch_mean = tl.where(total > 0.0, batch_mean,
                              tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(ACC))
        var_unbiased = tl.where(total > 1.0, var_unbiased,
                                tl.load(running_var_ptr + c, mask=c_mask, other=0.0).to(ACC))
    tl.store(mean_ptr + c, batch_mean, mask=c_mask)
    tl.store(var_unbiased_ptr + c, var_unbiased, mask=c_mask)
    tl.store(count_ptr + c, total, mask=c < 1)


def pack_rank_stats(view: ChannelView, eps: float) -> torch.Tensor:
    """This process's row ``[count, K, mean_shifted, M2]``, in the accumulator dtype
    (zeros for an empty batch, which still takes part in the all-gather)."""
    channels, rows = view.channels, view.rows
    x = view.tensor
    packed = torch.zeros(3 * channels + 1, dtype=accumulator_dtype(x.dtype), device=x.device)
    if rows == 0:
        return packed
    stats = batch_stats(view, plan(view), None, None, eps)
    packed[0].fill_(rows)  # fill_ with a Python number: no host-to-device copy
    pivot, mean_shifted, m2 = packed[1:].view(3, channels).unbind(0)
    pivot.copy_(stats.pivot)
    mean_shifted.copy_(stats.mean_shifted)
    if rows > 1:  # M2 from the unbiased variance; with one row that is 0/0, and M2 is 0
        torch.mul(stats.var_unbiased, rows - 1, out=m2)
    return packed


def combine_ranks(
    gathered: torch.Tensor,
    rank: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
) -> tuple[BatchStats, torch.Tensor]:
    """Global statistics from the ``(world, 3C + 1)`` gathered rows, for process ``rank``'s
    pivot, and the global count (a one-element tensor, read on device by the backward).

    With running statistics given, ``mean`` / ``var_unbiased`` fall back to them where the
    global batch has no such statistic (see the kernel).
    """
    world, width = gathered.shape
    channels = (width - 1) // 3
    acc = accumulator_dtype(gathered.dtype)
    stats = BatchStats(*(torch.empty(channels, dtype=acc, device=gathered.device) for _ in range(6)),
                       pivot=gathered[rank, 1:1 + channels])
    count = torch.empty(1, dtype=acc, device=gathered.device)
    block = channel_block(channels)
    has_running = running_mean is not None
    _rank_combine_kernel[(cdiv(channels, block),)](
        gathered,
        weight if weight is not None else stats.rstd,
        bias if bias is not None else stats.rstd,
        running_mean if has_running else stats.rstd,
        running_var if has_running else stats.rstd,
        count, stats.mean_shifted, stats.rstd, stats.scale, stats.shift, stats.mean, stats.var_unbiased,
        world, rank, channels, *split_float(eps),
        BLOCK_C=block, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RUNNING=has_running, ACC=tl_accumulator(gathered.dtype),
    )
    return stats, count
