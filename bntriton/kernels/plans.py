"""How kernels are tiled: the one place for tile shapes, grid splits and warps.

:func:`plan` picks tile shapes and the grid split for a rows x channels problem, and
:func:`fused_plan` whether the single-read kernels apply.  Heuristics, cached per
problem size, not autotuning: autotuning reruns a kernel, and a training step's
running-statistics update must run exactly once.  Where kernels run (compiled or
interpreted) is :mod:`.runtime`'s business.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch

from .layout import ChannelView


@dataclass(frozen=True)
class Plan:
    """Tiles and grid split for one rows x channels problem."""

    block_rows: int
    block_channels: int
    rows_per_split: int  # a multiple of block_rows; the last split may be shorter
    num_splits: int
    num_warps: int
    int64: bool


# The hooks' state, mutated in place: launch_cache.py reads both for its launches cached per
# geometry (none is used under a forced plan; the planned SM count is part of their keys).
_FORCED: dict = {}
_PLANNED_SM_COUNT: list = []  # planned_for()'s SM count, innermost last


@contextlib.contextmanager
def forced_plan(**fields):
    """Test hook: force tile sizes / splits / int64 offsets, ``path="split"`` or
    ``path="fused"``, and ``backward_sums="epilogue"`` or ``"combine"`` (see
    :func:`sums_in_epilogue`), so that small tensors take the multi-tile, multi-split,
    64-bit and single-read paths, and either route of the split backward, that a GPU-sized
    tensor would take."""
    previous = dict(_FORCED)
    _FORCED.update(fields)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(previous)


@contextlib.contextmanager
def planned_for(sm_count: int):
    """Plan every tensor, CPU ones included, as a GPU with ``sm_count`` SMs would (an
    H100 has 132), so that the interpreter runs the very grids and tiles that GPU would
    launch: perf/traffic.py counts the bytes they move without one."""
    _PLANNED_SM_COUNT.append(int(sm_count))
    try:
        yield
    finally:
        _PLANNED_SM_COUNT.pop()


def _device_sm_count(t: torch.Tensor) -> int | None:
    """SMs of ``t``'s GPU (None on a CPU); read without building a ``torch.device``,
    which costs more than the rest of a cached plan lookup."""
    if _PLANNED_SM_COUNT:
        return _PLANNED_SM_COUNT[-1]
    return _sm_count(t.get_device()) if t.is_cuda else None


_ROUTES = ("path", "backward_sums")  # forced_plan keys that choose a route, not a Plan field


def _forced_fields() -> dict:
    return {k: v for k, v in _FORCED.items() if k not in _ROUTES}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function whose host
    call costs ~1.5 us: launches are on the hot path of every small batch norm)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), on the host; see :func:`cdiv`."""
    return 1 << (n - 1).bit_length()


def _pow2_at_most(value: int, cap: int) -> int:
    return min(next_power_of_2(max(value, 1)), cap)


def plan(view: ChannelView, packed_mask: bool = False) -> Plan:
    """Tile sizes and grid split for ``view`` on its device (see :func:`plan_for`).
    ``packed_mask``: the kernels also write or read a 1-bit mask (activations.py), whose
    bytes lie channels innermost: channels-first tiles then keep several channels side by
    side, so that each mask access covers adjacent bytes."""
    sm_count = _device_sm_count(view.tensor)
    itemsize = view.tensor.element_size()
    run_bytes = 0 if view.channels_last or packed_mask else view.spatial * itemsize
    result = plan_for(
        view.rows, view.channels, view.channels_last, view.needs_int64, sm_count, itemsize, run_bytes
    )
    if _FORCED and _forced_fields():
        result = _with_splits(replace(result, **_forced_fields()), view.rows)
    return result


def fused_plan(view: ChannelView) -> Plan | None:
    """The single-read plan for ``view`` (kernels/fused.py), or None when the split path
    should run (see :func:`fused_plan_for`)."""
    sm_count = _device_sm_count(view.tensor)
    if not _FORCED:
        return fused_plan_for(view.rows, view.channels, view.channels_last, view.needs_int64, sm_count)
    path = _FORCED.get("path")
    if path == "split" or (path is None and _forced_fields()):
        return None  # forced tile sizes are meant for the split path
    result = fused_plan_for(view.rows, view.channels, view.channels_last, view.needs_int64, sm_count)
    if path == "fused" and result is None:
        raise ValueError(f"forced fused path, but {view.rows} rows do not fit one tile")
    if result is not None and "int64" in _FORCED:
        result = replace(result, int64=_FORCED["int64"])
    return result


# Largest tile one program holds in registers for the single-read path (elements).
_FUSED_TILE_GPU = 8192
_FUSED_TILE_INTERPRETER = 16384


@functools.lru_cache(maxsize=4096)
def fused_plan_for(
    rows: int, channels: int, channels_last: bool, int64: bool, sm_count: int | None
) -> Plan | None:
    """One program per channel block holding all of its rows, when that fits on chip.

    On a GPU the channel blocks must also be numerous enough to occupy the SMs: a few
    programs each streaming many rows would leave most of the GPU idle, which the split
    path avoids.  Channels-last tiles need at least 16 channels side by side for 64-byte
    contiguous segments, which caps the rows that fit.
    """
    on_gpu = sm_count is not None
    tile = _FUSED_TILE_GPU if on_gpu else _FUSED_TILE_INTERPRETER
    min_block_c = min(16, next_power_of_2(channels)) if on_gpu and channels_last else 1
    block_r = next_power_of_2(max(rows, 1))
    if rows < 1 or block_r * min_block_c > tile:
        return None
    block_c = _pow2_at_most(channels, max(tile // block_r, 1))
    if on_gpu:
        while block_c > min_block_c and cdiv(channels, block_c) < 2 * sm_count:
            block_c //= 2
        if cdiv(channels, block_c) < sm_count and rows > 1024:
            return None
    # The backward keeps x, dy and two temporaries of the tile live: 16 warps keep an
    # 8192-element tile at 32 values per thread per array, short of register spills.
    elements = block_r * block_c
    warps = 4 if elements <= 2048 else 8 if elements <= 4096 else 16
    return Plan(block_r, block_c, block_r, 1, warps, int64)


# GPU tiles hold 16 KiB of input: 4096 fp32 values, 8192 fp16 / bf16 ones.
_TILE_BYTES_GPU = 16384
# Each split reads at least this many bytes per channel.  Every split costs ~40 bytes per
# channel outside the big tensors (its shift, partial sums and M2 written and read back by
# the merge, the epilogue's per-channel vectors), so 2 KiB keeps that near 1% of a
# pass.  Only small tensors reach this limit (larger ones are split by the programs per
# SM), and their calls are decided by host time, not by a few more programs.
_MIN_SPLIT_BYTES = 2048
# Programs per SM the split grid aims for (enough loads in flight to hide DRAM latency).
_PROGRAMS_PER_SM = 4
# Channels-first tiles hold one channel once each (sample, channel) run of contiguous
# values is at least this long; shorter runs are read several channels side by side.
_MIN_RUN_BYTES = 512


@functools.lru_cache(maxsize=4096)
def plan_for(
    rows: int, channels: int, channels_last: bool, int64: bool, sm_count: int | None, itemsize: int = 4,
    run_bytes: int = 0,
) -> Plan:
    """Tiles and grid split for a rows x channels problem of ``itemsize``-byte values;
    ``sm_count=None`` plans for the interpreter.  ``run_bytes``: channels-first, the bytes
    of each (sample, channel) run of contiguous values (0: plan as if runs were short).

    The reduction runs over rows, split across ``num_splits`` programs per channel block
    so that few channels with many rows still fill the GPU (about four programs per SM);
    the last program of each channel block merges the splits in a fixed order
    (deterministic, no float atomics; kernels/counters.py).
    Splits are never shorter than ``_MIN_SPLIT_BYTES`` per channel: on a small tensor,
    hundreds of short splits would spend more on partial sums and per-channel vectors
    than on the data.  Channels-last tiles narrow from 64 to 16 channels (64 / 32-byte
    contiguous rows for fp32 / bf16: still whole 32-byte sectors) before a grid runs
    short of programs, since narrower channel blocks add programs without adding splits.
    Channels-first tiles take four adjacent channels when a channel's runs are short (a
    7x7 map: four runs side by side make one contiguous segment four times as long), and
    one channel when its runs are long enough to be read whole: the same tile bytes then
    cover four times the rows, so each channel has a quarter of the splits (partial sums
    written and combined) and of the epilogue's tiles (per-channel vectors loaded).
    """
    if sm_count is None:
        # The interpreter pays per program and per op, not per element: big tiles, few programs.
        block_c = _pow2_at_most(channels, 128 if channels_last else 16)
        block_r = _pow2_at_most(rows, max(16384 // block_c, 16))
        splits = max(1, cdiv(cdiv(max(rows, 1), block_r), 4))
        warps = 8 if block_r * block_c >= 4096 else 4
        return _with_splits(Plan(block_r, block_c, 0, splits, warps, int64), rows)

    target = _PROGRAMS_PER_SM * sm_count
    max_splits = max(1, rows * itemsize // _MIN_SPLIT_BYTES)
    tile_elements = _TILE_BYTES_GPU // itemsize
    if channels_last:
        block_c = _pow2_at_most(channels, 64)
        while block_c > 16 and cdiv(channels, block_c) * max_splits < target:
            block_c //= 2
    elif run_bytes >= _MIN_RUN_BYTES:
        block_c = 1
    else:
        block_c = _pow2_at_most(channels, 4)
    block_r = _pow2_at_most(rows, max(tile_elements // block_c, 16))
    row_tiles = cdiv(max(rows, 1), block_r)
    channel_blocks = cdiv(channels, block_c)
    splits = max(1, min(row_tiles, cdiv(target, channel_blocks), max_splits))
    warps = 8 if block_r * block_c >= 4096 else 4
    return _with_splits(Plan(block_r, block_c, 0, splits, warps, int64), rows)


# The backward's epilogue sums the splits itself while each program's reads of the
# partial sums stay under 1/32 of its tile's input.
_SUMS_PER_TILE_FRACTION = 32


def sums_in_epilogue(p: Plan, itemsize: int) -> bool:
    """Whether the backward's epilogue programs should each sum their channels' partial
    sums (2 x splits accumulator values per channel) rather than the partial sums' last
    program of each channel block doing it once (and writing dx's coefficients for them
    to read): true where that stays a small fraction of the tile's own bytes.  Channels-first
    plans (a tile of one to four channels, thousands of rows) always qualify; channels-last
    ones only with a few splits, since their tiles have fewer rows per channel."""
    if _FORCED and "backward_sums" in _FORCED:
        return _FORCED["backward_sums"] == "epilogue"
    partial_bytes = 2 * p.num_splits * max(itemsize, 4)
    return partial_bytes * _SUMS_PER_TILE_FRACTION <= p.block_rows * itemsize


def channel_block(channels: int) -> int:
    """Channels per program of the small per-channel kernels (updates, SyncBatchNorm's
    combines); the last-program merges take their splits in blocks sized for it."""
    return min(next_power_of_2(max(channels, 1)), 1024)


def splits_block(num_splits: int, block_c: int) -> int:
    """Splits a merge loads at once (a splits x channels tile of at most 4096 values):
    one dependent load per split would leave a long merge latency-bound."""
    return max(1, min(next_power_of_2(max(num_splits, 1)), 4096 // block_c, 64))


def _with_splits(p: Plan, rows: int) -> Plan:
    """Round rows per split up to whole tiles and drop splits that would be empty."""
    tiles = cdiv(max(rows, 1), p.block_rows)
    tiles_per_split = cdiv(tiles, max(1, min(p.num_splits, tiles)))
    rows_per_split = tiles_per_split * p.block_rows
    return replace(p, rows_per_split=rows_per_split, num_splits=cdiv(max(rows, 1), rows_per_split))
