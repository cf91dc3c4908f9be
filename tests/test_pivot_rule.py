"""The kernels' pivot rule at its threshold: a channel is shifted by the mean of its first
16 rows exactly when that mean lies more than two of their standard deviations from zero
(numerics.pivot_of_rows).  Accuracy alone would not notice a wrong threshold between 2
and 8 stds (unshifted statistics are still within the bounds there), so the rule is
checked where it decides: channels whose first rows sit 0.5 to 8 of their stds from zero,
1.9 and 2.1 among them, on the split and the single-read paths."""
from __future__ import annotations

import pytest
import torch

import bntriton
from bntriton.ops import batch_norm as ops
from bntriton.kernels.plans import forced_plan

from conftest import DEVICE

STDS = [0.5, 1.0, 1.9, 2.1, 3.0, 4.0, 6.0, 8.0]  # each channel's first rows: mean / std


def _channels_at(stds, rows=64, scale=0.75, seed=0):
    """(rows, C) data whose channel c has first-16-rows mean ``stds[c] * scale`` and
    first-16-rows (population) std ``scale``, exactly in float64 and closely in fp32."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(16, len(stds), generator=gen, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, correction=0)
    first = (z + torch.tensor(stds, dtype=torch.float64)) * scale
    rest = torch.randn(rows - 16, len(stds), generator=gen, dtype=torch.float64) * scale
    return torch.cat([first, rest]).float().to(DEVICE)


@pytest.mark.parametrize("path", ["split", "fused"])
def test_pivot_is_the_first_rows_mean_beyond_two_of_their_stds(path):
    x = _channels_at(STDS)
    plan = forced_plan(path="split", block_rows=16) if path == "split" else forced_plan(path="fused")
    with bntriton.cpu_backend("interpreter"), plan:
        pivot = ops._train_impl(x, None, None, 1e-5)[5]
    first_mean = x[:16].double().mean(0)
    for c, stds in enumerate(STDS):
        if stds <= 2.0:
            assert pivot[c] == 0, (stds, pivot[c])
        else:
            torch.testing.assert_close(pivot[c].double(), first_mean[c], rtol=1e-6, atol=0)
