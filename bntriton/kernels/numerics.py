"""Device helpers for the statistics' arithmetic, shared by stats.py, fused.py and sync.py."""
import triton
import triton.language as tl

from .tiles import channel_tile_offsets


@triton.jit
def inverse_std(var, eps_hi, eps_lo, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """``1 / sqrt(var + eps)`` with an IEEE square root.

    Float arguments arrive as fp32, so eps comes in two fp32 parts whose sum restores
    ~48 bits for fp64 statistics (launch.split_float).
    """
    eps = (tl.zeros([BLOCK_C], dtype=ACC) + eps_hi) + eps_lo
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def batch_coefficients(var, mean_s, weight_ptr, bias_ptr, c, c_mask, eps_hi, eps_lo,
                       BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ACC: tl.constexpr):
    """``(rstd, scale, shift)`` with ``y = (x - K) * scale + shift``, each rounded once.

    Per-channel work only, so it is done in fp64 whatever the accumulator: ``rstd``
    (a square root and a division), ``scale = rstd * weight`` and ``shift = bias -
    mean_s * scale`` would otherwise stack three to four fp32 roundings into every output
    (``scale``'s relative error is y's), where torch's CPU batch norm, which keeps its
    statistics in double, has one.
    """
    eps = (tl.zeros([BLOCK_C], dtype=tl.float64) + eps_hi) + eps_lo
    rstd = 1.0 / tl.sqrt(var.to(tl.float64) + eps)
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(tl.float64)
    shift = -mean_s.to(tl.float64) * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
    return rstd.to(ACC), scale.to(ACC), shift.to(ACC)


@triton.jit
def dx_coefficients(sum_dy, sum_dyc, rstd, weight, mean_s, m, ACC: tl.constexpr):
    """``dx = dy * A + (x - K) * B + C`` under batch statistics: ``(A, B, C)``.

    ``x_hat = ((x - K) - mean_s) * rstd``, so the ``x_hat * dgamma / M`` term splits into
    a per-element part (B) and a per-channel constant folded into C with the mean term.
    Per-channel work, so in fp64 whatever the accumulator, each coefficient rounded once
    (as the forward's, numerics.batch_coefficients).
    """
    r = rstd.to(tl.float64)
    coef_a = r * weight.to(tl.float64)
    dgamma = sum_dyc.to(tl.float64) * r
    coef_b = -coef_a * r * dgamma / m.to(tl.float64)
    coef_c = -coef_a * sum_dy.to(tl.float64) / m.to(tl.float64) - coef_b * mean_s.to(tl.float64)
    return coef_a.to(ACC), coef_b.to(ACC), coef_c.to(ACC)


@triton.jit
def fold_affine(rstd, mean_s, weight_ptr, bias_ptr, c, c_mask,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Per-channel ``scale``, ``shift`` with ``y = (x - K) * scale + shift``."""
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(ACC)
    shift = -mean_s * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(ACC)
    return scale, shift


@triton.jit
def two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth; no branch,
    so it holds whichever of a, b is larger).  Carrying ``e`` makes a running sum's error
    independent of the number of terms."""
    s = a + b
    b_virtual = s - a
    a_virtual = s - b_virtual
    return s, (a - a_virtual) + (b - b_virtual)


@triton.jit
def sum_splits(part_ptr, c, c_mask, channels, num_splits, BLOCK_C: tl.constexpr, SPLITS: tl.constexpr,
                ACC: tl.constexpr):
    """Per-channel sum of the ``num_splits`` partial rows, deterministic: ``SPLITS`` rows
    at a time summed as a tree, those sums added in split order with compensation."""
    total = tl.zeros([BLOCK_C], dtype=ACC)
    lost = tl.zeros([BLOCK_C], dtype=ACC)
    for i0 in range(0, num_splits, SPLITS):
        s = i0 + tl.arange(0, SPLITS)
        m = (s < num_splits)[:, None] & c_mask[None, :]
        values = tl.load(part_ptr + s[:, None] * channels + c[None, :], mask=m, other=0.0)
        total, carry = two_sum(total, tl.sum(values, axis=0))
        lost += carry
    return total + lost


@triton.jit
def sum_parts(parts_ptr, c, c_mask, channels, num_splits, BLOCK_C: tl.constexpr, SPLITS: tl.constexpr,
              ACC: tl.constexpr):
    """``(sum(dy), sum(dy * centred))`` per channel from the backward's split reduction
    ``parts`` ((2, splits, C)), each by :func:`sum_splits`."""
    sum_dy = sum_splits(parts_ptr, c, c_mask, channels, num_splits, BLOCK_C, SPLITS, ACC)
    sum_dyc = sum_splits(parts_ptr + num_splits * channels, c, c_mask, channels, num_splits, BLOCK_C, SPLITS, ACC)
    return sum_dy, sum_dyc


@triton.jit
def param_grads_and_coefficients(sum_dy, sum_dyc, rstd, mean_s, weight_ptr, dweight_ptr, dbias_ptr, c, c_mask,
                                 write_mask, rows, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                 BATCH_STATS: tl.constexpr, ACC: tl.constexpr):
    """The backward's per-channel step from its two sums: writes ``dweight`` / ``dbias``
    where ``write_mask``, and returns dx's ``(A, B, C)`` (:func:`dx_coefficients`; ``A =
    rstd * weight`` alone when the forward used running statistics)."""
    tl.store(dweight_ptr + c, (sum_dyc * rstd).to(dweight_ptr.dtype.element_ty), mask=write_mask)
    tl.store(dbias_ptr + c, sum_dy.to(dbias_ptr.dtype.element_ty), mask=write_mask)
    weight = tl.zeros([BLOCK_C], dtype=ACC) + 1.0
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(ACC)
    if BATCH_STATS:
        m = rows + tl.zeros([BLOCK_C], dtype=ACC)
        coef_a, coef_b, coef_c = dx_coefficients(sum_dy, sum_dyc, rstd, weight, mean_s, m, ACC)
    else:
        coef_a = rstd * weight
        coef_b = tl.zeros([BLOCK_C], dtype=ACC)
        coef_c = tl.zeros([BLOCK_C], dtype=ACC)
    return coef_a, coef_b, coef_c


@triton.jit
def grad_coefficients(parts_ptr, num_splits, rows, mean_s_ptr, rstd_ptr, weight_ptr, dweight_ptr, dbias_ptr,
                      c, write_mask, channels, BLOCK_C: tl.constexpr, SPLITS: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, BATCH_STATS: tl.constexpr, ACC: tl.constexpr):
    """:func:`param_grads_and_coefficients` from the split reduction's ``parts`` ((2,
    splits, C): sum(dy), sum(dy * centred)), summed in a fixed order."""
    c_mask = c < channels
    sum_dy, sum_dyc = sum_parts(parts_ptr, c, c_mask, channels, num_splits, BLOCK_C, SPLITS, ACC)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
    mean_s = tl.zeros([BLOCK_C], dtype=ACC)
    if BATCH_STATS:
        mean_s = tl.load(mean_s_ptr + c, mask=c_mask, other=0.0)
    return param_grads_and_coefficients(sum_dy, sum_dyc, rstd, mean_s, weight_ptr, dweight_ptr, dbias_ptr, c,
                                        c_mask, write_mask, rows, BLOCK_C, HAS_WEIGHT, BATCH_STATS, ACC)


# Rows averaged into the pivot.
PIVOT_ROWS = tl.constexpr(16)


@triton.jit
def batch_pivot(x_ptr, c, c_mask, rows, spatial, stride_n, stride_c, stride_s,
                SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr):
    """The statistics' per-channel pivot ``K``, from the channel's first ``m = min(16,
    rows)`` rows: their mean ``x_0 + mean_{i < m}(x_i - x_0)``, or 0 where that mean is
    within two of their standard deviations of zero.

    Data far from zero are shifted by a value close to their mean (about std / 4 from it,
    where ``x_0`` alone is about one std away), so ``x - K`` is exact and the shifted
    values and their sums stay small.  Data near zero need no shift, and unshifted they
    cost the epilogue one rounding less (``x - K`` is exact only when x and K are close):
    their normalized output is then as accurate as ``x * a + b`` can be.  A constant
    channel gets ``K = x_0`` exactly (every deviation is 0) or 0, either way its shifted
    values are exactly equal.  Every program that needs it computes it from the same rows
    with the same code; the statistics store it for the epilogue and the backward.
    """
    r = tl.arange(0, PIVOT_ROWS)
    offs = channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s, SPLIT_ROWS, INT64)
    mask = c_mask[:, None] & (r < rows)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    return pivot_of_rows(x, r, mask, rows)


@triton.jit
def pivot_of_rows(x, r, mask, rows):
    """:func:`batch_pivot` from a channels x rows tile already in registers whose rows
    ``r`` start at row 0 (the single-read kernels hold the whole channel): rows from 16
    on are ignored."""
    first = tl.sum(tl.where((r == 0)[None, :], x, 0.0), axis=1)  # one value and zeros: exact
    m = tl.minimum(rows, PIVOT_ROWS).to(x.dtype)
    used = mask & (r < PIVOT_ROWS)[None, :]
    deviation = tl.where(used, x - first[:, None], 0.0)
    mean_deviation = tl.sum(deviation, axis=1) / m
    spread = tl.where(used, deviation - mean_deviation[:, None], 0.0)
    variance = tl.sum(spread * spread, axis=1) / m
    pivot = first + mean_deviation
    # A NaN fails the comparison and stays the pivot: it stays in its channel.
    return tl.where(pivot * pivot <= 4.0 * variance, 0.0, pivot)


@triton.jit
def tile_moments(shifted, mask, count):
    """``(mean, resid, m2)`` of a channels x rows tile of shifted values (zero where
    masked), ``count`` values per channel.

    ``mean`` is the rounded ``sum / count``; ``resid = sum(shifted - mean)`` is what that
    rounding missed (``count * mean + resid`` is the sum, to the spread of the data rather
    than to its offset), and ``m2`` the sum of squared deviations, corrected two-pass
    (Chan, Golub and LeVeque): ``sum((shifted - mean)**2) - resid**2 / count``.
    """
    mean = tl.sum(shifted, axis=1) / count
    centred = tl.where(mask, shifted - mean[:, None], 0.0)
    resid = tl.sum(centred, axis=1)
    m2 = tl.sum(centred * centred, axis=1) - resid * resid / count
    # resid**2 / count <= the sum of squares (Cauchy-Schwarz), up to rounding; a where, not
    # tl.maximum, so that a NaN stays a NaN.
    return mean, resid, tl.where(m2 < 0.0, 0.0, m2)


@triton.jit
def resolve_mean(total_hi, total_lo, n):
    """The mean of ``total_hi + total_lo`` (a sum carried in two parts) over ``n`` values,
    as ``(mean, correction)``: ``mean`` rounded, ``correction`` the part of the exact
    quotient it misses.  ``K + mean`` rounds the mean once more; adding ``correction``
    after it keeps the un-shifted mean accurate to its own size, not to ``|mean|``."""
    first = total_hi / n
    # The fma takes n * first exactly: this is the remainder of the division, exact.
    remainder = tl.fma(-n, first, total_hi) + total_lo
    tail = remainder / n
    mean = first + tail
    return mean, (first - mean) + tail
