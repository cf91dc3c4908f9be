"""Kernels through the public op, against the float64 oracle: generated cases, the
multi-tile / multi-split / 64-bit paths, and the numerical properties we promise."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import bntriton
from bntriton.verification import oracle as reference
from bntriton.kernels import channel_view, forced_plan
from bntriton.kernels.plans import fused_plan_for, plan_for
from bntriton.testing import Case, cases, make_tensors, shapes
from bntriton.verification.bounds import EPS, bound_units, normwise_error
from bntriton.verification import check_case

from conftest import DEVICE


def _assert_passes(case, impl=bntriton.batch_norm):
    result = check_case(impl, case, DEVICE)
    assert result.passed, f"{case}\n" + "\n".join(result.failures())
    return result


@pytest.mark.parametrize("path", ["auto", "split"])
@given(case=cases())
def test_generated_cases_match_reference(path, case):
    # "auto" takes the single-read kernels whenever a channel block's rows fit one tile
    # (most test tensors); "split" forces the grid-split reduction for every case.
    with forced_plan(**({} if path == "auto" else {"path": "split"})):
        _assert_passes(case)


# Small tiles force every kernel through several row tiles, several grid splits (merged
# by each channel block's last program), ragged last tiles and partial channel blocks.
FORCED_PLANS = [
    dict(path="fused", int64=True),
    dict(block_rows=16, block_channels=2, num_splits=3),
    dict(block_rows=16, block_channels=4, num_splits=64),
    dict(block_rows=32, block_channels=8, num_splits=1),
    dict(block_rows=16, block_channels=2, num_splits=2, int64=True),
    # One-channel tiles (channels-first, long runs) and the backward in two launches, every
    # epilogue program summing its channels' splits (the others sum them in the partial
    # sums' last program of each channel block).
    dict(block_rows=64, block_channels=1, num_splits=3, backward_sums="epilogue"),
]


@pytest.mark.parametrize("forced", FORCED_PLANS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
@settings(max_examples=8)
@given(case=cases(), shape=shapes(max_elements=1500, max_channels=12))
def test_multi_tile_and_split_paths_match_reference(forced, case, shape):
    # Few channels keep the number of (interpreted) programs of these tiny tiles small.
    with forced_plan(**forced):
        _assert_passes(dataclasses.replace(case, shape=shape))


@pytest.mark.parametrize("route", ["epilogue", "combine"])
@pytest.mark.parametrize("layout,block_channels,offset", [("contiguous", 1, 0.0), ("channels_last", 4, 30.0)])
def test_split_backward_routes_match_reference(route, layout, block_channels, offset):
    """Both routes of the split training backward on a fixed fp32 case (12 row tiles in 4
    splits per channel): every epilogue program summing its channels' splits itself, and
    the partial sums' last program of each channel block summing them once for the
    epilogue (two launches either way)."""
    case = Case(shape=(6, 5, 7, 9), dtype=torch.float32, layout=layout, offset=offset, seed=11)
    with forced_plan(block_rows=32, block_channels=block_channels, num_splits=4, backward_sums=route):
        _assert_passes(case)


def test_single_read_path_only_when_rows_fit_and_gpu_stays_busy():
    assert fused_plan_for(196, 2048, False, False, sm_count=132) is not None  # 4x2048x7x7
    assert fused_plan_for(12544, 2048, False, False, sm_count=132) is None  # too many rows
    assert fused_plan_for(4096, 64, False, False, sm_count=132) is None  # too few programs
    wide = fused_plan_for(256, 1024, True, False, sm_count=132)
    assert wide is not None and wide.block_channels >= 16  # coalesced channels-last tiles


def test_split_fills_gpu_for_few_channels_many_rows():
    """C=64, N*H*W=800k: the grid must still offer several programs per SM."""
    for channels_last in (False, True):
        p = plan_for(800_000, 64, channels_last, False, sm_count=132)
        programs = p.num_splits * math.ceil(64 / p.block_channels)
        assert programs >= 2 * 132
        assert p.rows_per_split % p.block_rows == 0
        assert (p.num_splits - 1) * p.rows_per_split < 800_000 <= p.num_splits * p.rows_per_split


@pytest.mark.parametrize("forced", [dict(block_rows=64, block_channels=4, num_splits=5), dict(path="fused")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_offset_fp32_within_1e5(channels_last, forced):
    """Data with mean 1e4 x std normalize to 1e-5 normwise relative error (fp32)."""
    shape = (16, 8, 12, 12)
    if forced.get("path") == "fused":
        # The single-read path takes one tile per channel block: on a GPU 8192 elements,
        # with 16 (here all 8) channels side by side when channels-last, and no more than
        # 1024 rows for so few channels; 16 x 8 x 8 x 8 fits there and in the interpreter.
        shape = (16, 8, 8, 8)
        rows = shape[0] * shape[2] * shape[3]
        for sm_count in (None, 132):
            assert fused_plan_for(rows, shape[1], channels_last, False, sm_count) is not None
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) + 1e4
    x32 = x.float()
    if channels_last:
        x32 = x32.contiguous(memory_format=torch.channels_last)
    with forced_plan(**forced):
        y = bntriton.batch_norm(x32.to(DEVICE), None, None, training=True)
    ref = reference.forward(x32.double().numpy(), None, None, training=True).y
    err = np.linalg.norm(y.double().cpu().numpy() - ref) / np.linalg.norm(ref)
    assert err < 1e-5


def test_constant_channel_outputs_beta_with_finite_gradients():
    x = torch.randn(6, 3, 5, dtype=torch.float32)
    x[:, 1] = 1234.5
    w = torch.tensor([1.5, 2.0, -1.0], requires_grad=True)
    b = torch.tensor([0.25, -0.75, 3.0], requires_grad=True)
    xg = x.to(DEVICE).requires_grad_()
    y = bntriton.batch_norm(xg, None, None, w.to(DEVICE), b.to(DEVICE), training=True)
    assert torch.all(y[:, 1] == -0.75)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(xg.grad).all()
    assert torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()


PATHS = {"fused": dict(path="fused"), "split": dict(block_rows=16, block_channels=2, num_splits=2)}


@pytest.mark.parametrize("path", list(PATHS))
def test_nan_stays_in_its_channel(path):
    x = torch.randn(8, 4, 3).to(DEVICE).requires_grad_()
    with torch.no_grad():
        x[3, 2, 1] = float("nan")
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with forced_plan(**PATHS[path]):
        y = bntriton.batch_norm(x, rm, rv, training=True)
        y.backward(torch.randn_like(y))
    others = [0, 1, 3]
    for t in (y, x.grad):
        assert torch.isnan(t[:, 2]).all() and torch.isfinite(t[:, others]).all()
    assert torch.isnan(rm[2]) and torch.isfinite(rm[others]).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_reruns_are_bitwise_identical(path):
    case = Case(shape=(37, 5, 9), layout="channels_last", momentum=0.3, steps=2, seed=11)
    t = make_tensors(case, DEVICE)
    outputs = []
    for _ in range(2):
        with forced_plan(**PATHS[path]):
            x = t.xs[0].detach().requires_grad_()
            w = t.weight.detach().requires_grad_()
            b = t.bias.detach().requires_grad_()
            rm, rv = t.running_mean.clone(), t.running_var.clone()
            y = bntriton.batch_norm(x, rm, rv, w, b, training=True)
            y.backward(t.dy)
            outputs.append([y, x.grad, w.grad, b.grad, rm, rv])
    for first, second in zip(*outputs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(training, channels_last):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 3, 2, generator=g, dtype=torch.float64) * 2 + 5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(DEVICE).requires_grad_()
    w = torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    rm = torch.randn(4, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(4, dtype=torch.float64, device=DEVICE) + 0.5

    def fn(x, w, b):
        # Running statistics are cloned so that every evaluation sees the same ones.
        return bntriton.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, eps=1e-3)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_empty_batch_returns_empty_and_keeps_running_stats():
    x = torch.randn(0, 3, 4, device=DEVICE, requires_grad=True)
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = bntriton.batch_norm(x, rm, rv, training=True)
    assert y.shape == (0, 3, 4)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y.sum().backward()
    assert x.grad.shape == (0, 3, 4)
    assert bntriton.batch_norm(x.detach(), rm, rv, training=False).shape == (0, 3, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_fp32_params_returns_input_dtype(dtype):
    x = torch.randn(4, 3, 5, 5, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.rand(3, device=DEVICE) + 0.5
    y = bntriton.batch_norm(x, None, None, w, None, training=True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    expected = F.batch_norm(x.double(), None, None, w.double(), None, training=True)
    count = x.numel() // 3
    assert normwise_error(y, expected, dtype) <= bound_units("y", dtype, count)


def test_channels_last_gradient_stays_channels_last_for_contiguous_dy():
    x = torch.randn(2, 3, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = bntriton.batch_norm(x, None, None, training=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn(2, 3, 4, 5, device=DEVICE))  # a contiguous (NCHW) gradient
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_views_are_not_copied_for_native_layouts():
    for x in (
        torch.randn(4, 3),
        torch.randn(4, 3, 5),
        torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 3, 2, 4, 5).contiguous(memory_format=torch.channels_last_3d),
    ):
        view = channel_view(x)
        assert view.tensor.data_ptr() == x.data_ptr()


def test_strided_views_are_copied_once_and_normalized():
    x = torch.randn(3, 4, 10)[..., ::2]
    view = channel_view(x)
    assert view.tensor.is_contiguous()
    y = bntriton.batch_norm(x.to(DEVICE), None, None, training=True)
    ref = reference.forward(x.double().numpy(), None, None, training=True).y
    assert normwise_error(y, ref, torch.float32) <= bound_units("y", torch.float32, 3 * 5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels", [3, 64])
def test_single_read_forward_updates_running_stats_in_its_launch(momentum, channels, device):
    # The single-read kernel updates the running statistics itself; with 64 channels the
    # interpreter's plan has two programs, where the cumulative average (momentum=None)
    # is left to the separate update (program 0's counter increment would race).
    torch.manual_seed(0)
    ours = bntriton.BatchNorm1d(channels, momentum=momentum, device=device, dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(channels, momentum=momentum, device=device, dtype=torch.float64)
    with forced_plan(path="fused"):
        for step in range(3):
            x = torch.randn(300, channels, dtype=torch.float64, device=device) * 2 + step
            ours(x)
            theirs(x)
    # Each within the bound table's float64 bound of the exact value: at most twice it apart.
    for name in ("running_mean", "running_var"):
        err = normwise_error(getattr(ours, name).cpu(), getattr(theirs, name).cpu(), torch.float64)
        assert err <= 2 * bound_units(name, torch.float64, 300), (name, err)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3


@pytest.mark.parametrize("outliers", ["first_rows", "split_starts"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_stay_accurate_when_the_first_rows_are_far_from_the_rest(channels_last, outliers):
    # The pivot comes from each channel's first 16 rows (sample 0, positions h = 0, 1 in
    # either layout), every later split's shift from its own first row.  Here either those
    # 16 rows are outliers 1e4 away from every other row (the later splits' data lie far
    # from the pivot), or the first rows of two later splits are (those splits' data lie
    # far from their shifts, and the combine moves their sums by 1e4 * count).  The
    # variance (outliers included) must stay within the running variance's bound and y
    # within the y bound, against float64.  (A split's first tile used to be centred on
    # the pivot alone: its one-round sum of squares then cancelled, an error growing with
    # the rows: 13.0 eps at 512 x 4 x 8 x 8 against 4.7 now, bound 32.)
    shape = (32, 4, 8, 8)  # 2048 rows: 8 splits of 256, each starting at a sample's row 0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if outliers == "first_rows":
        x[0, :, :2, :] += 1e4
    else:
        x[4, :, 0, 0] += 1e4  # row 256: the second split's first row
        x[20, :, 0, 0] -= 1e4  # row 1280: the sixth split's
    x32 = x.float()
    if channels_last:
        x32 = x32.contiguous(memory_format=torch.channels_last)
    count = shape[0] * shape[2] * shape[3]
    running_mean, running_var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with forced_plan(block_rows=64, block_channels=4, num_splits=8):
        y = bntriton.batch_norm(x32.to(DEVICE), running_mean, running_var, training=True, momentum=1.0)
    ref = reference.forward(x32.double().numpy(), None, None, training=True)
    var = x32.double().transpose(0, 1).reshape(4, -1).var(1)
    var_err = ((running_var.double().cpu() - var).abs() / var).max().item() / EPS[torch.float32]
    assert var_err <= bound_units("running_var", torch.float32, count), var_err
    y_err = normwise_error(y.double().cpu(), torch.from_numpy(ref.y), torch.float32)
    assert y_err <= bound_units("y", torch.float32, count), y_err
