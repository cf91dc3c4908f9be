"""Training statistics: per-channel mean and biased variance, plus the running-stat update.

**The pivot.**  Values are shifted by a per-channel pivot ``K`` before anything is summed:
``x - K`` is exact when x and K are close, which is precisely when the naive
``E[x^2] - E[x]^2`` would cancel catastrophically.  ``K`` is defined as

    m = min(16, rows),   d_i = x_i - x_0 (i < m),   dbar = sum(d_i) / m,
    s2 = sum((d_i - dbar)**2) / m,   P = x_0 + dbar,
    K = 0 if P**2 <= 4 * s2 else P

with ``x_i`` the channel's value in row ``i`` of the rows x channels view (row 0 is
sample 0, position 0; rows run over samples, then positions; layout.py), everything in
the accumulator dtype (:func:`numerics.batch_pivot`; the native CPU path computes the
same).  ``P`` sits about std / 4 from the channel's mean, where ``x_0`` alone sits about
one std away, so the shifted values of offset data have a small mean and so do their
sums; data whose first rows' mean is within two of their standard deviations of zero are
not shifted at all (``x - 0`` is exact, and the epilogue then matches ``x * a + b``).  A
constant channel gets ``K = x_0`` (or 0), and its shifted values are exactly equal.  A
NaN among the first rows makes ``K`` NaN: the channel's statistics are NaN anyway.  ``K``
is stored per channel (``BatchStats.pivot``) and travels with ``mean_shifted`` and
``rstd`` to the forward epilogue and the backward (the train op's sixth output, the
backward op's ``pivot`` argument), as the running mean does in eval.

**The reductions** have an error that grows like log2(rows), on a GPU and in the
interpreter alike: tiles are channels x rows and summed over their last axis (a tree on
the GPU, pairwise in NumPy; tiles.py), and everything summed across tiles and splits is
carried in two parts (``two_sum``), so its error does not grow with their number.

One launch, in two steps:

1. The partial statistics, grid (splits, channel blocks); each program walks its share
   of the rows in tiles and writes, per split, its shift, the sum of ``x - shift`` in two
   parts and M2.  The first split's shift is ``K`` (which it stores), every other split's
   its own first row (a value of the channel's data: as good a shift for the split's
   values, and no second read of the channel's first rows per split):

   * ``_partial_lanes_kernel`` (channels-last tiles): no reduction per tile.  Every lane
     of the tile keeps its own compensated sum (``two_sum``) and Welford mean and M2
     across the split's tiles; the lanes are merged once, after the loop: the sum as
     ``count * mean`` plus the lanes' sums centred on that mean by an fma (small, so
     their tree sum is accurate to the spread rather than the offset), M2 as the lanes'
     M2 plus their counts times their squared deviations from the mean.
   * ``_partial_centred_kernel`` (channels-first tiles): the split's first tile by the
     two-pass tile moments (mean, then the values centred on it), every later tile by
     one round of two reductions, the sum and the sum of squares of the values centred
     on the split's mean so far, so both are small; tiles are merged with Chan's formula
     and their sums added with compensation.

   On an H200 the per-tile rounds of three reductions these replace held the statistics
   of a 411 MB channels-last bf16 tensor to ~950 GB/s; the lanes kernel reads it at
   ~2000 GB/s, and the centred kernel a 822 MB NCHW fp32 one at ~3100 GB/s (perf/NOTES.md).
2. The merge (``_merge_splits``), in the same launch: each program counts its arrival
   on its channel block's counter once its partial results are stored, and the last of
   the block's programs to arrive (kernels/counters.py) moves every split's sum to ``K``
   (adding ``count * (shift - K)``, compensated) and merges the splits in a fixed order
   (deterministic, no float atomics: the same bits whichever program arrives last), a
   block of splits per load (one dependent load per split left a 523-split combine at
   310 us): the block's sum as count * mean plus its splits' sums centred by an fma, its
   M2 within and between splits, then merged into the totals in order by Chan's formula,
   compensated.  It writes the shifted mean and ``rstd`` that the forward epilogue and
   the backward use, folds weight and bias into a per-channel ``scale`` / ``shift``, and
   writes the mean ``(K + mean_shifted) + correction`` (the correction restores what
   rounding ``mean_shifted`` lost, so the mean is accurate to its own size) and the
   unbiased variance.  Given the running statistics (eager calls: see ops/batch_norm.py), it also
   updates its channels' running statistics, with the momentum read from
   ``num_batches_tracked``; the last block to finish (a second counter, counting blocks)
   bumps the counter after every block has read it.  A training forward on the split
   path is then two launches: this one and the epilogue.

``_running_update_kernel``: the same update as a launch of its own, for the registered
op (which must stay functional for autograd) and SyncBatchNorm; on device, the
cumulative momentum read from the counter (no host synchronization).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .counters import arrival_counters, arrived_last
from .plans import Plan, cdiv, channel_block, splits_block
from .runtime import accumulator_dtype, kernel, split_float, tl_accumulator
from .layout import ChannelView
from .numerics import batch_coefficients, batch_pivot, resolve_mean, tile_moments, two_sum
from .tiles import channel_tile_offsets


@triton.jit
def _split_start(x_ptr, pivot_ptr, part_pivot_ptr, rows, channels, spatial, stride_n, stride_c, stride_s,
                 rows_per_split, BLOCK_C: tl.constexpr, SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr,
                 ACC: tl.constexpr):
    """A partial-statistics program's split, channels and rows, and the shift its sums
    are taken against: the channel's pivot ``K`` for the first split (which stores it),
    the split's own first row ``K_s`` for the others.  ``x - K_s`` is as exact for the
    split's data as ``x - K`` (both are values of the channel's data, or 0), and reading
    it costs one row the split reads anyway, where every split re-reading the channel's
    first rows cost up to 3% of a channels-last pass's bytes.  Each split records its
    shift; the combine moves its sum to ``K``."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows)
    if split == 0:
        shift = batch_pivot(x_ptr, c, c_mask, rows, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64, ACC)
        tl.store(pivot_ptr + c, shift, mask=c_mask)
    else:
        r = row_start + tl.arange(0, 1)
        offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
        shift = tl.sum(tl.load(x_ptr + offs, mask=c_mask[:, None], other=0.0).to(ACC), axis=1)  # one value: exact
    tl.store(part_pivot_ptr + split * channels + c, shift, mask=c_mask)
    return split, c, c_mask, shift, row_start, row_end


@kernel
def _partial_centred_kernel(
    x_ptr, pivot_ptr, part_pivot_ptr, part_hi_ptr, part_lo_ptr, part_m2_ptr, weight_ptr, bias_ptr,
    mean_s_ptr, rstd_ptr, scale_ptr, shift_ptr, mean_ptr, var_unbiased_ptr,
    running_mean_ptr, running_var_ptr, num_batches_ptr, counters_ptr,
    rows, channels, spatial, stride_n, stride_c, stride_s, rows_per_split,
    eps_hi, eps_lo, momentum_hi, momentum_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
):
    split, c, c_mask, pivot, row_start, row_end = _split_start(
        x_ptr, pivot_ptr, part_pivot_ptr, rows, channels, spatial, stride_n, stride_c, stride_s, rows_per_split,
        BLOCK_C, SPLIT_ROWS, INT64, ACC)
    # The split's first tile by the two-pass tile moments (its mean, then the values
    # centred on it): nothing is known of where this split's data lie, and the shift (the
    # channel's pivot, or one value of the split) may be far from them.
    r = row_start + tl.arange(0, BLOCK_R)
    offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
    mask = c_mask[:, None] & (r < row_end)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    count = tl.minimum(row_end - row_start, BLOCK_R) + tl.zeros([BLOCK_C], dtype=ACC)
    tile_mean, tile_resid, m2 = tile_moments(tl.where(mask, x - pivot[:, None], 0.0), mask, count)
    total_hi = count * tile_mean
    total_lo = tl.fma(count, tile_mean, -total_hi) + tile_resid
    for r0 in range(row_start + BLOCK_R, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
        mask = c_mask[:, None] & (r < row_end)[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        seen = (r0 - row_start) + tl.zeros([BLOCK_C], dtype=ACC)
        count = tl.minimum(row_end - r0, BLOCK_R) + tl.zeros([BLOCK_C], dtype=ACC)
        # Centred on the split's mean so far, the tile's sum and sum of squares are small
        # and can be taken in one round: a tile far from that mean loses to cancellation
        # about eps * count * delta**2, against the count * delta**2 / 2 or more that the
        # same distance adds to M2 (Chan's term below).
        centre = total_hi / seen
        e = tl.where(mask, (x - pivot[:, None]) - centre[:, None], 0.0)
        s = tl.sum(e, axis=1)
        q = tl.sum(e * e, axis=1)
        tile_m2 = q - s * s / count
        tile_m2 = tl.where(tile_m2 < 0.0, 0.0, tile_m2)
        delta = s / count + (centre - (total_hi + total_lo) / seen)
        m2 += tile_m2 + delta * delta * (seen * count / (seen + count))
        part = count * centre
        total_hi, carry = two_sum(total_hi, part)
        total_lo += carry + tl.fma(count, centre, -part)
        total_hi, carry = two_sum(total_hi, s)
        total_lo += carry
    out = split * channels + c
    tl.store(part_hi_ptr + out, total_hi, mask=c_mask)
    tl.store(part_lo_ptr + out, total_lo, mask=c_mask)
    tl.store(part_m2_ptr + out, m2, mask=c_mask)
    if arrived_last(counters_ptr + tl.program_id(1), tl.num_programs(0)):
        _merge_splits(
            part_pivot_ptr, part_hi_ptr, part_lo_ptr, part_m2_ptr, pivot_ptr, weight_ptr, bias_ptr,
            mean_s_ptr, rstd_ptr, scale_ptr, shift_ptr, mean_ptr, var_unbiased_ptr,
            running_mean_ptr, running_var_ptr, num_batches_ptr, counters_ptr,
            rows, channels, rows_per_split, tl.num_programs(0), eps_hi, eps_lo, momentum_hi, momentum_lo,
            BLOCK_C, SPLITS, HAS_WEIGHT, HAS_BIAS, HAS_RUNNING, HAS_COUNTER, CUMULATIVE, ACC)


@kernel
def _partial_lanes_kernel(
    x_ptr, pivot_ptr, part_pivot_ptr, part_hi_ptr, part_lo_ptr, part_m2_ptr, weight_ptr, bias_ptr,
    mean_s_ptr, rstd_ptr, scale_ptr, shift_ptr, mean_ptr, var_unbiased_ptr,
    running_mean_ptr, running_var_ptr, num_batches_ptr, counters_ptr,
    rows, channels, spatial, stride_n, stride_c, stride_s, rows_per_split,
    eps_hi, eps_lo, momentum_hi, momentum_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
):
    split, c, c_mask, pivot, row_start, row_end = _split_start(
        x_ptr, pivot_ptr, part_pivot_ptr, rows, channels, spatial, stride_n, stride_c, stride_s, rows_per_split,
        BLOCK_C, SPLIT_ROWS, INT64, ACC)
    full_tiles = (row_end - row_start) // BLOCK_R
    s_hi = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    s_lo = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    mean = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    for i in range(0, full_tiles):
        r = row_start + i * BLOCK_R + tl.arange(0, BLOCK_R)
        offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
        d = tl.load(x_ptr + offs, mask=c_mask[:, None], other=0.0).to(ACC) - pivot[:, None]
        s_hi, carry = two_sum(s_hi, d)
        s_lo += carry
        delta = d - mean
        mean += delta * (1.0 / ((i + 1) + tl.zeros([BLOCK_C, 1], dtype=ACC)))
        m2 += delta * (d - mean)
    # The split's last, partial tile (an all-false mask loads nothing).
    r = row_start + full_tiles * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
    tail = c_mask[:, None] & (r < row_end)[None, :]
    d = tl.where(tail, tl.load(x_ptr + offs, mask=tail, other=0.0).to(ACC) - pivot[:, None], 0.0)
    s_hi, carry = two_sum(s_hi, d)
    s_lo += carry
    count = full_tiles + tail.to(ACC)
    delta = tl.where(tail, d - mean, 0.0)
    mean += delta / tl.maximum(count, 1.0)
    m2 += delta * (d - mean)
    # Lanes -> channel.  The sum: the lanes' exact sums added as a tree, then what the
    # rounded mean misses summed over the lanes centred on it (small, of both signs: their
    # tree sum is accurate to the spread, not the offset).  M2: the parallel-variance
    # decomposition, within lanes plus between them.
    lane_sum = s_hi + s_lo
    n = tl.sum(count, axis=1)
    n_safe = tl.maximum(n, 1.0)
    channel_mean = tl.sum(lane_sum, axis=1) / n_safe
    resid = tl.sum(tl.where(count > 0.0, tl.fma(-count, channel_mean[:, None], lane_sum), 0.0), axis=1)
    total_hi = n * channel_mean
    total_lo = tl.fma(n, channel_mean, -total_hi) + resid
    dev = tl.where(count > 0.0, mean - (channel_mean + resid / n_safe)[:, None], 0.0)
    m2_total = tl.sum(m2, axis=1) + tl.sum(count * dev * dev, axis=1)
    out = split * channels + c
    tl.store(part_hi_ptr + out, total_hi, mask=c_mask)
    tl.store(part_lo_ptr + out, total_lo, mask=c_mask)
    tl.store(part_m2_ptr + out, m2_total, mask=c_mask)
    if arrived_last(counters_ptr + tl.program_id(1), tl.num_programs(0)):
        _merge_splits(
            part_pivot_ptr, part_hi_ptr, part_lo_ptr, part_m2_ptr, pivot_ptr, weight_ptr, bias_ptr,
            mean_s_ptr, rstd_ptr, scale_ptr, shift_ptr, mean_ptr, var_unbiased_ptr,
            running_mean_ptr, running_var_ptr, num_batches_ptr, counters_ptr,
            rows, channels, rows_per_split, tl.num_programs(0), eps_hi, eps_lo, momentum_hi, momentum_lo,
            BLOCK_C, SPLITS, HAS_WEIGHT, HAS_BIAS, HAS_RUNNING, HAS_COUNTER, CUMULATIVE, ACC)


@triton.jit
def _momentum_factor(num_batches_ptr, momentum_hi, momentum_lo, BLOCK_C: tl.constexpr,
                     HAS_COUNTER: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr):
    """``(num_batches_tracked + 1, factor)``: the momentum, or ``1 / (counter + 1)`` for
    the cumulative average (``momentum=None``), read on device."""
    tracked = tl.zeros([BLOCK_C], dtype=tl.int64)
    if HAS_COUNTER:
        tracked = tl.load(num_batches_ptr + tl.zeros([BLOCK_C], dtype=tl.int32)) + 1
    if CUMULATIVE:
        factor = 1.0 / tracked.to(ACC)
    else:
        factor = (tl.zeros([BLOCK_C], dtype=ACC) + momentum_hi) + momentum_lo
    return tracked, factor


@triton.jit
def _blend_running(running_ptr, batch, factor, c, c_mask, ACC: tl.constexpr):
    """``running = (1 - factor) * running + factor * batch``, in place."""
    old = tl.load(running_ptr + c, mask=c_mask, other=0.0).to(ACC)
    new = (1.0 - factor) * old + factor * batch
    tl.store(running_ptr + c, new.to(running_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _merge_splits(
    part_pivot_ptr, part_hi_ptr, part_lo_ptr, part_m2_ptr, pivot_ptr, weight_ptr, bias_ptr,
    mean_s_ptr, rstd_ptr, scale_ptr, shift_ptr, mean_ptr, var_unbiased_ptr,
    running_mean_ptr, running_var_ptr, num_batches_ptr, counters_ptr,
    rows, channels, rows_per_split, num_splits, eps_hi, eps_lo, momentum_hi, momentum_lo,
    BLOCK_C: tl.constexpr, SPLITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, CUMULATIVE: tl.constexpr,
    ACC: tl.constexpr,
):
    """The last program of a channel block (counters.arrived_last): every split's partial
    statistics of the block's channels merged in split order, the per-channel results
    written, and the running statistics updated."""
    block = tl.program_id(1)
    c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    pivot = tl.load(pivot_ptr + c, mask=c_mask, other=0.0)
    # One pass over the splits, in order: their sums added with compensation, their
    # M2 merged with Chan's formula (every term positive), also compensated; neither
    # error grows with the number of splits.
    total_hi = tl.zeros([BLOCK_C], dtype=ACC)
    total_lo = tl.zeros([BLOCK_C], dtype=ACC)
    m2_hi = tl.zeros([BLOCK_C], dtype=ACC)
    m2_lo = tl.zeros([BLOCK_C], dtype=ACC)
    for i0 in range(0, num_splits, SPLITS):
        s = i0 + tl.arange(0, SPLITS)
        s_mask = s < num_splits
        m = s_mask[:, None] & c_mask[None, :]
        offs = s[:, None] * channels + c[None, :]
        part_hi = tl.load(part_hi_ptr + offs, mask=m, other=0.0)
        part_lo = tl.load(part_lo_ptr + offs, mask=m, other=0.0)
        part_m2 = tl.load(part_m2_ptr + offs, mask=m, other=0.0)
        counts = tl.where(s_mask, tl.minimum(rows - s * rows_per_split, rows_per_split), 0).to(ACC)
        counts = counts[:, None] + tl.zeros([SPLITS, BLOCK_C], dtype=ACC)
        # Each split summed x - K_s: its sum moves to the channel's pivot by adding
        # count * (K_s - K), compensated.  K_s - K is exact where the two agree to a
        # factor of two (offset data) or K is 0, and accurate to the data's spread
        # otherwise, as SyncBatchNorm carries its ranks' means (sync.py).
        moved_by = tl.where(m, tl.load(part_pivot_ptr + offs, mask=m, other=0.0) - pivot[None, :], 0.0)
        moved = counts * moved_by
        part_hi, carry = two_sum(part_hi, moved)
        part_lo += carry + tl.fma(counts, moved_by, -moved)
        # This block of splits: its sum as count * mean plus what the rounded mean
        # misses (each split's part centred by an fma, so small and exact to the
        # spread), and its M2 within and between the splits.
        count = tl.sum(counts, axis=0)
        block_mean = tl.sum(part_hi, axis=0) / count
        resid = tl.sum(tl.where(m, tl.fma(-counts, block_mean[None, :], part_hi) + part_lo, 0.0), axis=0)
        dev = tl.where(m, (part_hi + part_lo) / tl.maximum(counts, 1.0) - (block_mean + resid / count)[None, :],
                       0.0)
        block_m2 = tl.sum(part_m2 + counts * dev * dev, axis=0)
        part = count * block_mean
        part_err = tl.fma(count, block_mean, -part) + resid
        # Merged into the totals in split order: M2 by Chan's formula, both compensated.
        seen = i0 * rows_per_split + tl.zeros([BLOCK_C], dtype=ACC)
        delta = (part + part_err) / count - (total_hi + total_lo) / tl.maximum(seen, 1.0)
        m2_hi, carry = two_sum(m2_hi, block_m2 + delta * delta * (seen * count / (seen + count)))
        m2_lo += carry
        total_hi, carry = two_sum(total_hi, part)
        total_lo += carry + part_err
    m2 = m2_hi + m2_lo
    n = rows + tl.zeros([BLOCK_C], dtype=ACC)
    mean_s, correction = resolve_mean(total_hi, total_lo, n)

    rstd, scale, shift = batch_coefficients(m2 / n, mean_s, weight_ptr, bias_ptr, c, c_mask, eps_hi, eps_lo,
                                            BLOCK_C, HAS_WEIGHT, HAS_BIAS, ACC)
    tl.store(mean_s_ptr + c, mean_s, mask=c_mask)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    tl.store(shift_ptr + c, shift, mask=c_mask)

    # The un-shifted mean and the unbiased variance, for the running statistics.
    batch_mean = (pivot + mean_s) + correction
    batch_var = m2 / (n - 1.0)
    tl.store(mean_ptr + c, batch_mean, mask=c_mask)
    tl.store(var_unbiased_ptr + c, batch_var, mask=c_mask)
    if HAS_RUNNING:
        # Every block reads the counter before the last block to finish bumps it: each
        # block's read precedes its arrival below (release), the bump follows the last
        # arrival (acquire).
        tracked, factor = _momentum_factor(
            num_batches_ptr, momentum_hi, momentum_lo, BLOCK_C, HAS_COUNTER, CUMULATIVE, ACC
        )
        _blend_running(running_mean_ptr, batch_mean, factor, c, c_mask, ACC)
        _blend_running(running_var_ptr, batch_var, factor, c, c_mask, ACC)
        if HAS_COUNTER:
            blocks = tl.num_programs(1)
            if arrived_last(counters_ptr + blocks, blocks):
                tl.store(num_batches_ptr + tl.zeros([BLOCK_C], dtype=tl.int32), tracked, mask=c == block * BLOCK_C)


@kernel
def _running_update_kernel(
    running_mean_ptr, running_var_ptr, num_batches_ptr, mean_ptr, var_unbiased_ptr,
    channels, momentum_hi, momentum_lo,
    BLOCK_C: tl.constexpr, HAS_COUNTER: tl.constexpr, CUMULATIVE: tl.constexpr,
    ACC: tl.constexpr,
):
    # One program walks every channel: it alone reads and then bumps the counter, so no
    # program can see the counter before or after another's increment.
    lanes = tl.arange(0, BLOCK_C)
    tracked, factor = _momentum_factor(
        num_batches_ptr, momentum_hi, momentum_lo, BLOCK_C, HAS_COUNTER, CUMULATIVE, ACC
    )
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + lanes
        c_mask = c < channels
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
        var = tl.load(var_unbiased_ptr + c, mask=c_mask, other=0.0).to(ACC)
        _blend_running(running_mean_ptr, mean, factor, c, c_mask, ACC)
        _blend_running(running_var_ptr, var, factor, c, c_mask, ACC)
    if HAS_COUNTER:
        tl.store(num_batches_ptr + tl.zeros([BLOCK_C], dtype=tl.int32), tracked, mask=lanes == 0)


@dataclass
class BatchStats:
    """Per-channel results of the statistics launch (all in the accumulator dtype).

    ``pivot`` is ``K`` (:func:`numerics.batch_pivot`), ``mean_shifted`` the mean of
    ``x - K``; ``scale`` / ``shift`` give ``y = (x - K) * scale + shift`` (None from the
    single-read path, which applies them itself); ``mean`` and ``var_unbiased`` feed the
    running statistics.  The epilogue and the backward take ``(pivot, mean_shifted,
    rstd)`` as one: they only describe the batch together.
    """

    mean_shifted: torch.Tensor
    rstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    var_unbiased: torch.Tensor
    pivot: torch.Tensor


class RunningStats(NamedTuple):
    """Running statistics to update in the same launch as the batch statistics (a named
    tuple: built on every training call, and cheaper to build than a frozen dataclass)."""

    mean: torch.Tensor
    var: torch.Tensor
    num_batches_tracked: torch.Tensor | None
    momentum: float | None  # None: cumulative average, needs num_batches_tracked


def _partial_launch(view: ChannelView, plan: Plan):
    """The partial-statistics kernel for ``view`` and its rows per tile: per-lane
    accumulation for channels-last tiles, one round of reductions per tile for
    channels-first ones (see the module docstring), 4096-value tiles for 2-byte dtypes
    (the lane accumulators stay in registers)."""
    block_rows = plan.block_rows
    if view.tensor.element_size() == 2 and block_rows >= 32:
        block_rows //= 2
    return (_partial_lanes_kernel if view.channels_last else _partial_centred_kernel), block_rows


def batch_stats(
    view: ChannelView,
    plan: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running: RunningStats | None = None,
) -> BatchStats:
    """Batch statistics of ``view`` (rows >= 1), folded with weight and bias; with
    ``running`` given, the running statistics and the counter are updated in place by
    the same launches (as :func:`update_running_stats` would, bit for bit)."""
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    channels = view.channels
    stats = BatchStats(*(x.new_empty(channels, dtype=acc) for _ in range(7)))
    partial_pivot, partial_hi, partial_lo, partial_m2 = (
        x.new_empty((plan.num_splits, channels), dtype=acc) for _ in range(4)
    )
    channel_blocks = cdiv(channels, plan.block_channels)
    partial_kernel, block_rows = _partial_launch(view, plan)
    has_running = running is not None
    has_counter = has_running and running.num_batches_tracked is not None
    if has_running and running.momentum is None and not has_counter:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    momentum = running.momentum if has_running and running.momentum is not None else 0.0
    # One counter per channel block, and one for the blocks themselves (the last block to
    # finish bumps num_batches_tracked).
    counters = arrival_counters(x, channel_blocks + 1)
    partial_kernel[(plan.num_splits, channel_blocks)](
        x, stats.pivot, partial_pivot, partial_hi, partial_lo, partial_m2,
        weight if weight is not None else stats.rstd,
        bias if bias is not None else stats.rstd,
        stats.mean_shifted, stats.rstd, stats.scale, stats.shift, stats.mean, stats.var_unbiased,
        running.mean if has_running else stats.rstd,
        running.var if has_running else stats.rstd,
        running.num_batches_tracked if has_counter else stats.rstd, counters,
        view.rows, channels, view.spatial, view.stride_n, view.stride_c, view.stride_s,
        plan.rows_per_split, *split_float(eps), *split_float(momentum),
        **stats_meta(view, plan, block_rows, weight is not None, bias is not None, has_running, has_counter,
                     has_running and running.momentum is None),
    )
    return stats


def stats_meta(view: ChannelView, plan: Plan, block_rows: int, has_weight: bool, has_bias: bool,
               has_running: bool, has_counter: bool, cumulative: bool) -> dict:
    """The partial-statistics kernel's constexprs and warps (``block_rows`` from
    :func:`_partial_launch`)."""
    return dict(
        BLOCK_R=block_rows, BLOCK_C=plan.block_channels,
        # Splits merged as many at a time as for the widest block of channels
        # (channel_block): the order, and so the bits, do not depend on the tile's channels.
        SPLITS=splits_block(plan.num_splits, channel_block(view.channels)),
        SPLIT_ROWS=view.split_rows, INT64=plan.int64,
        HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RUNNING=has_running,
        HAS_COUNTER=has_counter, CUMULATIVE=cumulative,
        ACC=tl_accumulator(view.tensor.dtype), num_warps=plan.num_warps,
    )


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    mean: torch.Tensor,
    var_unbiased: torch.Tensor,
    momentum: float | None,
) -> None:
    """Increment ``num_batches_tracked`` (when given), then
    ``running = (1 - m) * running + m * batch`` in place, all in one launch on device.

    ``momentum=None`` is the cumulative average, ``m = 1 / num_batches_tracked`` (after the
    increment), read inside the kernel: no host synchronization.
    """
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    channels = running_mean.numel()
    has_counter = num_batches_tracked is not None
    block = channel_block(channels)
    _running_update_kernel[(1,)](
        running_mean, running_var, num_batches_tracked if has_counter else mean, mean, var_unbiased,
        channels, *split_float(0.0 if momentum is None else momentum),
        BLOCK_C=block, HAS_COUNTER=has_counter, CUMULATIVE=momentum is None,
        ACC=tl_accumulator(mean.dtype),
    )
