"""Device helpers for the statistics' arithmetic, shared by stats.py, fused.py and sync.py."""
import triton
import triton.language as tl


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub and LeVeque).

    Exact in exact arithmetic for any split of the data, and stable in floating point: the
    correction term uses the difference of the means, never E[x^2] - E[x]^2.  An empty
    side (count 0) leaves the other unchanged.
    """
    total = count_a + count_b
    share = count_b / tl.maximum(total, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * share
    m2 = m2_a + m2_b + delta * delta * (count_a * share)
    return total, mean, m2


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
