"""The reductions' numerics: the pivot's definition, round-to-nearest bf16 stores in the
interpreter, and error that does not pile up on repeated values or many tiles."""
import dataclasses

import pytest
import torch

import bntriton
from bntriton.kernels import batch_stats, channel_affine, channel_view, forced_plan, plan
from bntriton.verification import check_case
from bntriton.verification.strategies import Case, make_tensors

from conftest import DEVICE


def _assert_passes(case):
    result = check_case(bntriton.batch_norm, case, DEVICE)
    assert result.passed, f"{case}\n" + "\n".join(result.failures())
    return result


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pivot_is_the_mean_of_the_first_16_rows_or_zero_near_zero(layout):
    x = torch.randn(5, 4, 2, 3, dtype=torch.float64).to(torch.float32) * 3 + 40
    x[:, 1] = torch.randn(5, 2, 3) * 3 + 1  # near zero: no shift
    x[:, 2] = 1.0 + 2.0**-23  # constant: the pivot is exactly the value
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    view = channel_view(x.to(DEVICE))
    rows = x.transpose(0, 1).reshape(4, -1).to(torch.float64)[:, :16]  # rows in (n, spatial) order
    deviation = rows - rows[:, :1]
    expected = rows[:, 0] + deviation.mean(1)
    spread = deviation.var(1, unbiased=False)
    expected = torch.where(expected**2 <= 4 * spread, torch.zeros_like(expected), expected)
    assert expected[1] == 0 and expected[0] != 0 and expected[3] != 0
    for path in ("split", "fused"):
        with forced_plan(path=path):
            if path == "split":
                stats = batch_stats(view, plan(view), None, None, 1e-5)
            else:
                _, stats = bntriton.dispatch.forward_train(view, None, None, 1e-5)
        pivot = stats.pivot.cpu().to(torch.float64)
        assert torch.allclose(pivot, expected, rtol=4 * 2.0**-24, atol=0)
        assert pivot[2] == rows[2, 0]


def test_interpreter_rounds_bf16_stores_to_nearest_even():
    # x * (1 + 2**-9) is exact in fp32 and lands on bf16 ties and near-ties; the store must
    # round as torch (and a GPU) do, not truncate.
    x = (torch.arange(-64, 64, dtype=torch.float32) / 8 + 0.0625).to(torch.bfloat16).reshape(32, 4)
    view = channel_view(x)
    zeros = torch.zeros(4)
    factor = torch.full((4,), 1 + 2.0**-9)
    out = channel_affine(view, plan(view), zeros, 1, factor, zeros)
    assert torch.equal(out, (x.float() * factor).to(torch.bfloat16))


# bf16 data at 100 with std 0.01 collapse onto one or two values per channel: summed row
# after row their rounding errors added up to 112 fp32 eps in the running variance.
REPEATED_BF16 = Case(
    shape=(56, 2, 25), dtype=torch.bfloat16, param_dtype=None, bias=False, steps=2,
    offset=10000.0, scale=0.01, seed=0,
)


@pytest.mark.parametrize("path", ["auto", "split"])
def test_repeated_bf16_values_keep_running_variance_within_bound(path):
    with forced_plan(**({} if path == "auto" else {"path": "split"})):
        _assert_passes(REPEATED_BF16)


@pytest.mark.parametrize("forced", [
    dict(path="fused"),
    dict(block_rows=32, block_channels=2, num_splits=5),
], ids=["fused", "many-tiles-and-splits"])
@pytest.mark.parametrize("data", ["post_relu", "typical"])
def test_repeated_zeros_and_typical_data_within_bound(forced, data):
    case = Case(shape=(8, 2, 8, 8), data=data, seed=11)
    with forced_plan(**forced):
        result = _assert_passes(case)
    # Far below the bound, not just under it: the error must not grow with the rows.
    assert result.errors["y"] <= 0.25 * result.bounds["y"]


def test_running_mean_of_centred_data_is_accurate_to_its_size():
    # Data with mean ~0: the mean is only accurate if the shifted mean's rounding is
    # carried into it (K + mean_shifted alone is off by an fp32 ulp of |K - mean|).
    case = Case(shape=(4096, 4), seed=3)
    t = make_tensors(case)
    x = t.xs[0].to(DEVICE)
    _, stats = bntriton.dispatch.forward_train(channel_view(x), None, None, 1e-5)
    exact = x.double().mean(0).cpu()
    std = x.double().std(0).cpu()
    err = ((stats.mean.cpu().double() - exact).abs() / std).max().item()
    assert err <= 2 * 2.0**-24, err  # about one rounding of a mean ~ std / sqrt(n)
