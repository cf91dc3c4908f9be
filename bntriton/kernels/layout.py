"""How any (N, C, *spatial) tensor becomes one 2-D problem: rows x channels with strides.

Every kernel in this package sees the input as ``rows`` (batch and spatial positions) by
``C`` channels.  Element ``(r, c)`` lives at::

    (r // S) * stride_n + (r % S) * stride_s + c * stride_c

with ``S`` the number of spatial positions.  Two memory formats cover what users have:

* channels-first (NCHW / NCDHW / (N, C, L) contiguous): ``stride_s == 1``; rows of one
  sample are contiguous along the spatial axis.
* channels-last (NHWC / NDHWC, and a contiguous (N, C)): ``stride_c == 1`` and rows are
  evenly spaced, so the batch and spatial dims fold into one row axis (``S = rows``,
  ``stride_n = 0``) and the kernels skip the division.

Any other strided input is copied once into the channels-first format (see
:func:`channel_view`), which is the only place this package copies an input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INT32_LIMIT = 2**31


@dataclass(frozen=True)
class ChannelView:
    """A tensor seen as ``rows x channels``; ``tensor`` is what the kernels read."""

    tensor: torch.Tensor
    rows: int
    channels: int
    spatial: int  # S: rows per sample, or ``rows`` when the batch axis folds away
    stride_n: int
    stride_c: int
    stride_s: int
    channels_last: bool

    @property
    def split_rows(self) -> bool:
        """Whether a row index must be split into (sample, position)."""
        return self.stride_n != 0 and self.spatial != self.rows

    @property
    def needs_int64(self) -> bool:
        """Offsets overflow int32 once the tensor reaches 2**31 elements (views are dense)."""
        return self.tensor.numel() >= INT32_LIMIT

    def empty_like(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An output with the view's exact strides, so one set of offsets addresses both
        (a channels_last input thus gets a channels_last output)."""
        t = self.tensor
        return torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)

    def same_layout(self, other: torch.Tensor) -> torch.Tensor:
        """``other`` (same shape, e.g. a gradient) with this view's strides."""
        if other.stride() == self.tensor.stride() or other.numel() <= 1:
            return other
        # A gradient arriving in another memory format is copied once so that one set of
        # strides addresses x, dy and dx inside the kernels.
        return self.empty_like(other.dtype).copy_(other)


def _is_channels_last(x: torch.Tensor) -> bool:
    """True when the channel stride is 1 and rows (N, *spatial) are evenly spaced by C."""
    if x.dim() < 2:
        return False
    c = x.shape[1]
    if x.stride(1) != 1 and c != 1:
        return False
    # Walk the non-channel dims from innermost outwards: each must be dense over C.
    expected = c
    for dim in [d for d in range(x.dim()) if d != 1][::-1]:
        if x.shape[dim] != 1 and x.stride(dim) != expected:
            return False
        expected *= x.shape[dim]
    return True


def _is_channels_first(x: torch.Tensor) -> bool:
    """True when the spatial dims are dense (stride 1 innermost) within each (n, c)."""
    expected = 1
    for dim in range(x.dim() - 1, 1, -1):
        if x.shape[dim] != 1 and x.stride(dim) != expected:
            return False
        expected *= x.shape[dim]
    return True


def _is_dense(x: torch.Tensor) -> bool:
    """No gaps and no overlaps: the elements fill ``numel`` consecutive slots."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def channel_view(x: torch.Tensor) -> ChannelView:
    """See ``x`` (N, C, *spatial) as rows x channels without copying when possible."""
    n, c = x.shape[0], x.shape[1]
    spatial = 1
    for size in x.shape[2:]:
        spatial *= size
    rows = n * spatial
    # A contiguous (N, C) input, and (N, C, 1, 1), are channels-last as much as channels-first;
    # channels-last tiles (C contiguous) suit them.
    if _is_channels_last(x):
        return ChannelView(x, rows, c, rows, 0, 1, c, channels_last=True)
    if not (_is_channels_first(x) and _is_dense(x)):
        # Sliced, permuted or overlapping views: one copy into the channels-first format
        # keeps every kernel on two dense layouts (outputs share the input's strides).
        x = x.contiguous()
    stride_n = x.stride(0) if n > 1 else c * spatial
    stride_c = x.stride(1) if c > 1 else spatial
    return ChannelView(x, rows, c, spatial, stride_n, stride_c, 1, channels_last=False)
