"""Candidate partial-statistics kernels, same arguments and outputs as
``stats._stats_partial_kernel`` (per split: the sum of ``x - K`` in two parts and M2).

* ``_partial_centred_kernel``: per tile one round of two reductions (sum and sum of
  squares of the values centred on the split's mean so far), where the current kernel
  needs two dependent rounds of three.
* ``_partial_lanes_kernel``: no reduction per tile at all: every lane of the tile keeps
  its own compensated sum and Welford M2 across the split's tiles; the lanes are merged
  once at the end.
"""
from __future__ import annotations

import triton.language as tl

from .numerics import batch_pivot, two_sum
from .runtime import kernel
from .tiles import channel_tile_offsets


@kernel
def _partial_centred_kernel(
    x_ptr, pivot_ptr, part_hi_ptr, part_lo_ptr, part_m2_ptr,
    rows, channels, spatial, stride_n, stride_c, stride_s, rows_per_split,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
):
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    pivot = batch_pivot(x_ptr, c, c_mask, rows, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64, ACC)
    tl.store(pivot_ptr + c, pivot, mask=c_mask & ((split + tl.zeros([BLOCK_C], dtype=tl.int32)) == 0))

    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows)
    total_hi = tl.zeros([BLOCK_C], dtype=ACC)
    total_lo = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for r0 in range(row_start, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
        mask = c_mask[:, None] & (r < row_end)[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        seen = (r0 - row_start) + tl.zeros([BLOCK_C], dtype=ACC)
        count = tl.minimum(row_end - r0, BLOCK_R) + tl.zeros([BLOCK_C], dtype=ACC)
        # Centred on the split's mean so far (0 for its first tile, which the pivot centres),
        # the tile's sum and sum of squares are small and can be taken in one round.
        centre = total_hi / tl.maximum(seen, 1.0)
        e = tl.where(mask, (x - pivot[:, None]) - centre[:, None], 0.0)
        s = tl.sum(e, axis=1)
        q = tl.sum(e * e, axis=1)
        tile_m2 = q - s * s / count
        tile_m2 = tl.where(tile_m2 < 0.0, 0.0, tile_m2)
        delta = s / count + (centre - (total_hi + total_lo) / tl.maximum(seen, 1.0))
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


@kernel
def _partial_lanes_kernel(
    x_ptr, pivot_ptr, part_hi_ptr, part_lo_ptr, part_m2_ptr,
    rows, channels, spatial, stride_n, stride_c, stride_s, rows_per_split,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
):
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    pivot = batch_pivot(x_ptr, c, c_mask, rows, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64, ACC)
    tl.store(pivot_ptr + c, pivot, mask=c_mask & ((split + tl.zeros([BLOCK_C], dtype=tl.int32)) == 0))

    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows)
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
