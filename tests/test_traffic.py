"""Bytes moved and launches per pass, under an H100's plan (perf/traffic.py).

The counts are deterministic (the interpreter runs the very grids and tiles the GPU
would launch, and every load and store is counted), so these are exact guards, not
timings: a change that adds traffic or a launch fails here.  The shapes are small
versions of the regimes that matter (split path in both layouts, BatchNorm1d, the
single-read path) so that each costs the interpreter a few seconds.  ``moved / floor``:
floor = the large tensors once (2B forward, 3B backward, 2B eval).
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bntriton.kernels.plans import fused_plan_for, plan_for, sums_in_epilogue

_SPEC = importlib.util.spec_from_file_location("perf_traffic", Path(__file__).resolve().parents[1] / "perf" / "traffic.py")
traffic = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = traffic  # dataclasses look their module up there
_SPEC.loader.exec_module(traffic)

H100 = 132

# (shape, layout, dtype): bounds on moved / floor for (fwd_train, bwd_train, fwd_eval,
# bwd_eval).
# The split path reads x twice forward (1.5) and x, dy twice backward (5/3); what is left
# above that is the partial sums (four planes of splits x channels, written once and read
# back by each channel block's last program) and the per-channel vectors; each split takes its sums against its
# own first row, so only the first split reads the channel's first rows for the pivot
# (kernels/stats.py).  The pins below are the measured ratios rounded up: 1.52 / 1.69 for
# the channels-last and 2-D split path, 1.505 / 1.671 for NCHW (one channel per tile
# there, its runs being long: a quarter of the splits and epilogue tiles of four-channel
# tiles, which measured 1.5076 / 1.6702).
CASES = {
    "split-nchw-fp32": (((8, 16, 32, 32), "nchw", "fp32"), (1.505, 1.671, 1.01, 1.01)),
    "split-nhwc-fp32": (((4, 32, 32, 32), "nhwc", "fp32"), (1.52, 1.69, 1.01, 1.02)),
    "split-nhwc-bf16": (((4, 32, 32, 32), "nhwc", "bf16"), (1.52, 1.69, 1.01, 1.02)),
    "split-2d-fp32": (((4096, 64), "nchw", "fp32"), (1.52, 1.69, 1.01, 1.02)),
    "single-read-nchw-fp32": (((16, 64, 7, 7), "nchw", "fp32"), (1.01, 1.01, 1.01, 1.01)),
}


@pytest.fixture(scope="module")
def measured():
    cache = {}

    def get(name):
        if name not in cache:
            (shape, layout, dtype), _ = CASES[name]
            cache[name] = traffic.measure(shape, layout, dtype, sm_count=H100)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_bytes_moved_stay_within_the_pinned_ratio(name, measured):
    _, bounds = CASES[name]
    result = measured(name)
    for pass_name, bound in zip(traffic.PASSES, bounds):
        t = result[pass_name]
        assert t.ratio <= bound, f"{name} {pass_name}: moved/floor {t.ratio:.4f} > {bound} ({t.launches})"
        # The floor itself is reached only by reading and writing the big tensors once.
        assert t.ratio >= 1.0


@pytest.mark.parametrize("name", ["split-nchw-fp32", "split-nhwc-bf16", "single-read-nchw-fp32"])
def test_split_and_single_read_paths_are_the_ones_measured(name, measured):
    launches = measured(name)["fwd_train"].launches
    fused = any("fused" in k for k in launches)
    assert fused == name.startswith("single-read"), launches


def test_launch_counts(measured):
    split = measured("split-nhwc-fp32")
    single = measured("single-read-nchw-fp32")
    # The split forward: the partial statistics (each channel block's last program merges
    # the splits and updates the running statistics: kernels/counters.py), then the epilogue.
    for name, partial in (("split-nhwc-fp32", "_partial_lanes_kernel"), ("split-nchw-fp32", "_partial_centred_kernel"),
                          ("split-2d-fp32", "_partial_lanes_kernel")):
        launches = measured(name)["fwd_train"].launches
        assert launches == [partial, "_channel_affine_kernel"], (name, launches)
    # The split backward in two launches on both routes: channels-first (few splits for its
    # tiles' rows) sums the splits in every epilogue program; channels-last fp32 (8 splits)
    # sums them in the partial sums' last program of each channel block, which also writes
    # the epilogue's coefficients.
    assert not sums_in_epilogue(plan_for(4 * 32 * 32, 32, True, False, sm_count=H100, itemsize=4), 4)
    for name in ("split-nchw-fp32", "split-nhwc-fp32", "split-nhwc-bf16", "split-2d-fp32"):
        launches = measured(name)["bwd_train"].launches
        assert launches == ["_grad_partial_kernel", "_channel_affine_kernel"], (name, launches)
    assert len(split["fwd_eval"].launches) == 1, split["fwd_eval"].launches  # coefficients folded in
    assert len(single["fwd_train"].launches) == 1, single["fwd_train"].launches  # running update folded in
    # The backward of an eval forward: dx written with the partial sums, rstd taken from the
    # running variance inside the kernel, dweight and dbias by each block's last program.
    assert split["bwd_eval"].launches == ["_grad_partial_kernel"], split["bwd_eval"].launches
    assert single["bwd_eval"].launches == ["_fused_backward_kernel"], single["bwd_eval"].launches
    # No memset or copy kernels: gradients of the statistics outputs are never materialized.
    for result in (split, single):
        assert not [k for k in result["bwd_train"].launches if k.startswith("torch.")], result["bwd_train"].launches


def test_counter_counts_each_address_once_per_instruction():
    """A broadcast scalar load counts 4 bytes, not 4 per lane; masked-off lanes count nothing."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    ptrs = TensorHandle(np.full(8, 4096, dtype=np.uint64), tl.pointer_type(tl.float32))
    mask = TensorHandle(np.ones(8, dtype=bool), tl.int1)
    assert traffic._touched_bytes(ptrs, mask) == 4
    ptrs = TensorHandle(np.arange(8, dtype=np.uint64) * 4 + 4096, tl.pointer_type(tl.float32))
    mask = TensorHandle(np.arange(8) < 3, tl.int1)
    assert traffic._touched_bytes(ptrs, mask) == 12


def test_short_splits_are_merged_on_small_channels_last_problems():
    """4x64x56x56 channels-last on an H100: the SMs cannot all be busy on 3 MB anyway, so
    each split reads at least 2 KiB per channel (hundreds of 64-row splits cost 4-9% more
    bytes), and the channel blocks narrow to 16 to keep the program count up."""
    p = plan_for(4 * 56 * 56, 64, True, False, sm_count=H100, itemsize=4)
    assert p.block_channels == 16
    assert p.rows_per_split * 4 >= 2048
    assert p.num_splits * 4 >= H100 // 2  # most SMs still busy on a ~1 µs pass
    bf16 = plan_for(4 * 56 * 56, 64, True, False, sm_count=H100, itemsize=2)
    assert bf16.rows_per_split * 2 >= 2048
    # A large problem still gets about four programs per SM.
    big = plan_for(256 * 56 * 56, 64, True, False, sm_count=H100, itemsize=2)
    assert big.num_splits * -(-64 // big.block_channels) >= 2 * H100
    assert fused_plan_for(4 * 56 * 56, 64, True, False, sm_count=H100) is None


def test_channels_first_tiles_hold_one_channel_when_its_runs_are_long():
    """NCHW: a 56x56 map's runs (12 KiB fp32) are read whole one channel at a time, so a
    16 KiB tile covers 4096 rows and each channel needs a quarter of the splits; a 7x7
    map's 196-byte runs are read four channels side by side (one 784-byte segment); and a
    1-bit mask (bytes channels innermost) keeps four channels whatever the runs."""
    long_runs = plan_for(4 * 56 * 56, 64, False, False, sm_count=H100, itemsize=4, run_bytes=56 * 56 * 4)
    assert (long_runs.block_channels, long_runs.block_rows) == (1, 4096)
    four_wide = plan_for(4 * 56 * 56, 64, False, False, sm_count=H100, itemsize=4)
    assert (four_wide.block_channels, four_wide.block_rows) == (4, 1024)
    assert long_runs.num_splits * 4 <= four_wide.num_splits + 3
    short_runs = plan_for(256 * 7 * 7, 512, False, False, sm_count=H100, itemsize=4, run_bytes=7 * 7 * 4)
    assert short_runs.block_channels == 4

    from bntriton.kernels.layout import channel_view
    from bntriton.kernels.plans import plan, planned_for

    x = torch.randn(4, 64, 56, 56)
    with planned_for(H100):
        assert plan(channel_view(x)).block_channels == 1
        assert plan(channel_view(x), packed_mask=True).block_channels == 4
        assert plan(channel_view(x.to(memory_format=torch.channels_last))).block_channels >= 16
