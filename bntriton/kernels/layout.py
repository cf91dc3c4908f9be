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

Any other strided input is copied once (see :func:`channel_view`), into the memory format
torch's ``suggest_memory_format`` names for it (channels-last for a sliced channels-last
4-D / 5-D view, channels-first otherwise): outputs then have the layout torch's batch
norm gives them.  That is the only place this package copies an input.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch._prims_common import suggest_memory_format

INT32_LIMIT = 2**31


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made
# building a view (once per forward and once per backward) cost ~2.5 us of host time.
# Nothing assigns to a view's fields; ``dataclasses.replace`` makes a new one.
@dataclass(eq=False, slots=True)
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
        # The view's tensor is dense and non-overlapping, for which torch's empty_like
        # keeps the exact strides (and costs less host time than empty_strided).
        return torch.empty_like(self.tensor, dtype=dtype)

    def same_layout(self, other: torch.Tensor) -> torch.Tensor:
        """``other`` (same shape, e.g. a gradient) with this view's strides."""
        if other.stride() == self.tensor.stride() or other.numel() <= 1:
            return other
        # A gradient arriving in another memory format is copied once so that one set of
        # strides addresses x, dy and dx inside the kernels.
        return self.empty_like(other.dtype).copy_(other)


def _is_channels_last(shape: tuple, strides: tuple) -> bool:
    """True when the channel stride is 1 and rows (N, *spatial) are evenly spaced by C."""
    c = shape[1]
    if strides[1] != 1 and c != 1:
        return False
    # Walk the non-channel dims from innermost outwards: each must be dense over C.
    expected = c
    for dim in [d for d in range(len(shape)) if d != 1][::-1]:
        if shape[dim] != 1 and strides[dim] != expected:
            return False
        expected *= shape[dim]
    return True


def _is_channels_first(shape: tuple, strides: tuple) -> bool:
    """True when the spatial dims are dense (stride 1 innermost) within each (n, c)."""
    expected = 1
    for dim in range(len(shape) - 1, 1, -1):
        if shape[dim] != 1 and strides[dim] != expected:
            return False
        expected *= shape[dim]
    return True


def _is_dense(shape: tuple, strides: tuple) -> bool:
    """No gaps and no overlaps: the elements fill ``numel`` consecutive slots."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def view_params(shape: tuple, strides: tuple):
    """The view's fields after ``tensor`` for this shape and strides, or None when the
    tensor must first be made contiguous.  Cached for concrete sizes (a model sees few
    distinct layouts, and this runs on every call); symbolic sizes (tracing with dynamic
    shapes) are not hashable and are worked out each time."""
    try:
        return _cached_view_params(shape, strides)
    except TypeError:  # a SymInt: unhashable
        return _compute_view_params(shape, strides)


def _compute_view_params(shape: tuple, strides: tuple):
    n, c = shape[0], shape[1]
    spatial = 1
    for size in shape[2:]:
        spatial *= size
    rows = n * spatial
    # A contiguous (N, C) input, and (N, C, 1, 1), are channels-last as much as channels-first;
    # channels-last tiles (C contiguous) suit them.
    if _is_channels_last(shape, strides):
        return rows, c, rows, 0, 1, c, True
    if not (_is_channels_first(shape, strides) and _is_dense(shape, strides)):
        return None
    stride_n = strides[0] if n > 1 else c * spatial
    stride_c = strides[1] if c > 1 else spatial
    return rows, c, spatial, stride_n, stride_c, 1, False


_cached_view_params = functools.lru_cache(maxsize=4096)(_compute_view_params)


def channel_view(x: torch.Tensor) -> ChannelView:
    """See ``x`` (N, C, *spatial) as rows x channels without copying when possible."""
    params = view_params(tuple(x.shape), x.stride())
    if params is None:
        # Sliced, permuted or overlapping views: one copy keeps every kernel on two dense
        # layouts (outputs share the copy's strides).  The copy takes the memory format
        # torch's batch norm gives its output for this input (a sliced channels-last view
        # stays channels-last).  An empty tensor counts as contiguous whatever its
        # strides, so it gets fresh ones.
        x = x.contiguous(memory_format=suggest_memory_format(x)) if x.numel() else x.new_empty(x.shape)
        params = view_params(tuple(x.shape), x.stride())
    return ChannelView(x, *params)
