"""Device helpers shared by the kernels: where a tile of rows x channels lives.

A rows x channels view (layout.py) puts element ``(r, c)`` at
``(r // S) * stride_n + (r % S) * stride_s + c * stride_c``.  ``SPLIT_ROWS`` is False
when the batch axis folds into the rows (channels-last), which saves the division;
``INT64`` switches to 64-bit offsets for tensors of 2**31 elements or more.
"""
import triton
import triton.language as tl


@triton.jit
def channel_offsets(c, stride, INT64: tl.constexpr):
    """``c * stride``, in 64 bits when asked."""
    if INT64:
        return c.to(tl.int64) * stride
    else:
        return c * stride


@triton.jit
def tile_offsets(r, c, spatial, stride_n, stride_c, stride_s,
                 SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr):
    """Offsets of the [len(r), len(c)] tile of rows ``r`` and channels ``c``."""
    if INT64:
        r = r.to(tl.int64)
    if SPLIT_ROWS:
        n = r // spatial
        row = n * stride_n + (r - n * spatial) * stride_s
    else:
        row = r * stride_s
    return row[:, None] + channel_offsets(c, stride_c, INT64)[None, :]
