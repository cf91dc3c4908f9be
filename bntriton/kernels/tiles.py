"""Device helpers shared by the kernels: where a tile of rows x channels lives.

A rows x channels view (layout.py) puts element ``(r, c)`` at
``(r // S) * stride_n + (r % S) * stride_s + c * stride_c``.  ``SPLIT_ROWS`` is False
when the batch axis folds into the rows (channels-last), which saves the division;
``INT64`` switches to 64-bit offsets for tensors of 2**31 elements or more.

Tiles that are reduced over rows are laid out channels x rows (:func:`channel_tile_offsets`)
and reduced over their last axis.  On a GPU the orientation of a tile is a name only: the
compiler orders threads by the pointers' contiguity (the spatial axis channels-first, the
channel axis channels-last), so loads stay coalesced either way.  In Triton's interpreter
it decides the summation: NumPy reduces a contiguous last axis pairwise (error ~log2 n),
but a leading axis row after row (error ~n), which on repeated values adds up coherently.
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
def row_offsets(r, spatial, stride_n, stride_s, SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr):
    """Offsets of rows ``r`` (channel 0)."""
    if INT64:
        r = r.to(tl.int64)
    if SPLIT_ROWS:
        n = r // spatial
        return n * stride_n + (r - n * spatial) * stride_s
    else:
        return r * stride_s


@triton.jit
def tile_offsets(r, c, spatial, stride_n, stride_c, stride_s,
                 SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr):
    """Offsets of the [len(r), len(c)] tile of rows ``r`` and channels ``c``."""
    row = row_offsets(r, spatial, stride_n, stride_s, SPLIT_ROWS, INT64)
    return row[:, None] + channel_offsets(c, stride_c, INT64)[None, :]


@triton.jit
def channel_tile_offsets(c, r, spatial, stride_n, stride_c, stride_s,
                         SPLIT_ROWS: tl.constexpr, INT64: tl.constexpr):
    """Offsets of the [len(c), len(r)] tile of channels ``c`` and rows ``r``: the layout
    of every tile that is summed over its rows (``tl.sum(axis=1)``)."""
    row = row_offsets(r, spatial, stride_n, stride_s, SPLIT_ROWS, INT64)
    return channel_offsets(c, stride_c, INT64)[:, None] + row[None, :]
