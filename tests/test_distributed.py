"""SyncBatchNorm over torch.distributed (gloo, CPU processes) against the float64 oracle.

One spawn of ``WORLD`` processes runs every multi-process scenario (process start-up and
imports cost seconds; the interpreted kernels milliseconds); each rank saves what it saw
and the tests below judge it in this process.  Ranks hold uneven batches, one of them
empty: the statistics are those of the concatenated batch.
"""
from __future__ import annotations

import datetime
import inspect
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bntriton
from bntriton.verification import oracle as reference
from bntriton.kernels import (
    batch_norm_grads, batch_stats, channel_view, combine_ranks, forced_plan, grad_sums, input_grad, plan,
)
from bntriton.verification.bounds import EPS, bound_units, normwise_error, reduction_error

WORLD = 3
BATCHES = (5, 0, 2)  # samples per rank: uneven, rank 1 empty
CHANNELS = 3
SPATIAL = (2, 3)
TOTAL = sum(BATCHES)
COUNT = TOTAL * math.prod(SPATIAL)  # values per channel in the global batch

# (name, input dtype, parameter dtype, data offset in units of the std, momentum, layout)
SCENARIOS = [
    ("fp64", torch.float64, torch.float64, 3.0, None, torch.contiguous_format),
    # An offset of 1e4 std: a mean exchanged without its pivot would cost ~1e3 fp32 ulps.
    ("fp32", torch.float32, torch.float32, 1e4, 0.1, torch.channels_last),
    ("bf16", torch.bfloat16, torch.float32, 1.0, 0.1, torch.contiguous_format),
]
STEPS = 2  # forward steps (running statistics accumulate); backward after the last


def _rank_slice(rank: int, batches=BATCHES) -> slice:
    start = sum(batches[:rank])
    return slice(start, start + batches[rank])


def _global_batch(dtype, offset, step):
    """The whole batch, identical on every rank (seeded): (TOTAL, C, *SPATIAL) and dy."""
    gen = torch.Generator().manual_seed(100 + step)
    shape = (TOTAL, CHANNELS) + SPATIAL
    x = offset + torch.randn(shape, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.5, 2.0]).view(1, -1, 1, 1)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


def _params(dtype):
    gen = torch.Generator().manual_seed(7)
    return (1 + 0.5 * torch.randn(CHANNELS, generator=gen, dtype=torch.float64)).to(dtype), \
        torch.randn(CHANNELS, generator=gen, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------ what each rank runs


def _run_scenario(rank, dtype, param_dtype, offset, momentum, layout):
    layer = bntriton.SyncBatchNorm(CHANNELS, momentum=momentum, dtype=param_dtype)
    weight, bias = _params(param_dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    for step in range(STEPS):
        x, dy = (t[_rank_slice(rank)].contiguous(memory_format=layout) for t in _global_batch(dtype, offset, step))
        x.requires_grad_(True)
        y = layer(x)
    y.backward(dy)
    return dict(
        y=y.detach(), y_stride=y.stride(), x_stride=x.stride(), dx=x.grad, dx_stride=x.grad.stride(),
        dweight=layer.weight.grad, dbias=layer.bias.grad,
        running_mean=layer.running_mean, running_var=layer.running_var,
        num_batches_tracked=layer.num_batches_tracked,
    )


def _ddp_model():
    torch.manual_seed(3)
    # No bias before the batch norm: its gradient would be zero, up to rounding (as the
    # usual conv-without-bias before a batch norm).
    return nn.Sequential(
        nn.Linear(4, CHANNELS, bias=False), nn.BatchNorm1d(CHANNELS), nn.ReLU(), nn.Linear(CHANNELS, 2)
    ).double()


def _ddp_batch():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(TOTAL, 4, generator=gen, dtype=torch.float64) + 2.0


def _run_ddp(rank):
    model = bntriton.SyncBatchNorm.convert_sync_batchnorm(_ddp_model())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ddp(_ddp_batch()[_rank_slice(rank)]).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()
    return dict(grads=grads, state=model.state_dict())


def _run_bad_inputs(rank):
    """Calls that must raise on every rank before any collective or state change; a good
    call afterwards proves that no rank was left inside a collective."""
    layer = bntriton.SyncBatchNorm(CHANNELS)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(BATCHES[rank], CHANNELS, 4, dtype=torch.float64)
    errors = []
    for bad in (x[:, :2], x.to(torch.int32), x[:, 0, 0]):
        try:
            layer(bad)
        except (ValueError, RuntimeError, TypeError) as exc:
            errors.append(type(exc).__name__)
    unchanged = all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    layer(x.float())
    return dict(errors=errors, unchanged=unchanged, tracked_after_good_call=int(layer.num_batches_tracked))


ONE_VALUE = (1, 0, 1)  # one value per channel on some ranks: legal, the global batch has two


def _one_value_batch():
    return torch.randn(sum(ONE_VALUE), CHANNELS, generator=torch.Generator().manual_seed(13), dtype=torch.float64) + 5


def _run_one_value(rank):
    layer = bntriton.SyncBatchNorm(CHANNELS, dtype=torch.float64)
    y = layer(_one_value_batch()[_rank_slice(rank, ONE_VALUE)])
    return dict(y=y, running_var=layer.running_var)


def _run_local_paths(rank):
    """Eval mode, and a process group of one rank: plain (unsynchronized) batch norm."""
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    x = torch.randn(max(BATCHES[rank], 2), CHANNELS, 5, dtype=torch.float64)
    sync = bntriton.SyncBatchNorm(CHANNELS, process_group=groups[rank], dtype=torch.float64)
    plain = bntriton.BatchNorm1d(CHANNELS, dtype=torch.float64)
    same_train = torch.equal(sync(x), plain(x)) and torch.equal(sync.running_var, plain.running_var)
    sync.eval()
    plain.eval()
    same_eval = torch.equal(sync(x), plain(x))
    return dict(same_train=same_train, same_eval=same_eval)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {name: _run_scenario(rank, *args) for name, *args in SCENARIOS}
        results["ddp"] = _run_ddp(rank)
        results["bad"] = _run_bad_inputs(rank)
        results["one_value"] = _run_one_value(rank)
        results["local"] = _run_local_paths(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results, from one spawn of WORLD gloo processes."""
    out = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------ multi-process tests


def _cat(ranks, name, key):
    return torch.cat([r[name][key] for r in ranks])


def _np(t):
    return t.detach().to(torch.float64).numpy()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_matches_one_batch_norm_over_the_concatenated_batch(ranks, scenario):
    name, dtype, param_dtype, offset, momentum, _ = scenario
    weight, bias = _params(param_dtype)
    running_mean, running_var = np.zeros(CHANNELS), np.ones(CHANNELS)
    for step in range(STEPS):
        x, dy = _global_batch(dtype, offset, step)
        ref = reference.forward(_np(x), running_mean, running_var, _np(weight), _np(bias), True,
                                momentum, 1e-5, num_batches_tracked=step + 1)
        running_mean, running_var = ref.running_mean, ref.running_var
    grads = reference.backward(_np(dy), _np(x), ref.mean, ref.var, _np(weight), True, 1e-5)

    errors = {
        "y": normwise_error(_cat(ranks, name, "y"), ref.y, dtype),
        "dx": normwise_error(_cat(ranks, name, "dx"), grads.dx, dtype, grads.dx_scale),
        # DDP sums (then averages) the per-rank parameter gradients.
        "dweight": reduction_error(sum(r[name]["dweight"] for r in ranks), grads.dweight,
                                   grads.dweight_scale, param_dtype),
        "dbias": reduction_error(sum(r[name]["dbias"] for r in ranks), grads.dbias,
                                 grads.dbias_scale, param_dtype),
        "running_mean": normwise_error(ranks[0][name]["running_mean"], running_mean, param_dtype),
        "running_var": normwise_error(ranks[0][name]["running_var"], running_var, param_dtype),
    }
    print(f"\n{name} errors (units of eps): " + ", ".join(f"{k}={v:.2f}" for k, v in errors.items()))
    for quantity, error in errors.items():
        stored = dtype if quantity in ("y", "dx") else param_dtype
        assert error <= bound_units(quantity, stored, COUNT), (quantity, error)

    for r in ranks:  # the global statistics (hence running ones) are bit-identical on every rank
        assert torch.equal(r[name]["running_mean"], ranks[0][name]["running_mean"])
        assert torch.equal(r[name]["running_var"], ranks[0][name]["running_var"])
        assert int(r[name]["num_batches_tracked"]) == STEPS
        assert r[name]["y_stride"] == r[name]["x_stride"] == r[name]["dx_stride"]  # memory format kept
    assert ranks[1][name]["y"].numel() == 0 and torch.equal(ranks[1][name]["dweight"], torch.zeros(CHANNELS, dtype=param_dtype))


def test_ddp_step_matches_single_process_training(ranks):
    model = bntriton.SyncBatchNorm.convert_sync_batchnorm(_ddp_model())  # no process group: local
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # DDP averages the ranks' gradients, each of a sum over the rank's rows: the gradient
    # of the global sum over WORLD.
    (model(_ddp_batch()).sum() / WORLD).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()
    # Each gradient is a float64 sum a few reductions deep: 64 eps of its largest value.
    tol = 64 * EPS[torch.float64]
    worst = 0.0
    for r in ranks:
        for name, grad in r["ddp"]["grads"].items():
            assert torch.equal(grad, ranks[0]["ddp"]["grads"][name]), name  # DDP: one gradient
            error = ((grad - expected[name]).abs().max() / expected[name].abs().max()).item()
            worst = max(worst, error)
            assert error <= tol, name
        for name, value in model.state_dict().items():
            error = (r["ddp"]["state"][name].double() - value.double()).abs().max()
            assert error <= tol * max(value.double().abs().max(), 1), name
    print(f"\nDDP gradients: largest error {worst / EPS[torch.float64]:.1f} eps of the gradient's largest value")


def test_bad_input_raises_on_every_rank_and_changes_nothing(ranks):
    for r in ranks:
        assert r["bad"]["errors"] == ["RuntimeError", "TypeError", "ValueError"]
        assert r["bad"]["unchanged"]
        assert r["bad"]["tracked_after_good_call"] == 1


def test_one_value_per_rank_is_enough_when_the_global_batch_has_more(ranks):
    ref = reference.forward(_one_value_batch().numpy(), np.zeros(CHANNELS), np.ones(CHANNELS), training=True)
    count = sum(ONE_VALUE)
    assert normwise_error(torch.cat([r["one_value"]["y"] for r in ranks]), ref.y, torch.float64) <= \
        bound_units("y", torch.float64, count)
    for r in ranks:
        assert normwise_error(r["one_value"]["running_var"], ref.running_var, torch.float64) <= \
            bound_units("running_var", torch.float64, count)


def test_eval_mode_and_single_rank_group_are_a_plain_batch_norm(ranks):
    for r in ranks:
        assert r["local"] == dict(same_train=True, same_eval=True)


# ------------------------------------------------------------------ single-process tests


def test_without_process_group_it_is_bntriton_batch_norm():
    x = torch.randn(4, CHANNELS, 3, 2, dtype=torch.float64, requires_grad=True)
    outputs = []
    for cls in (bntriton.SyncBatchNorm, bntriton.BatchNorm2d):
        layer = cls(CHANNELS, momentum=None, dtype=torch.float64)
        y = layer(x)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        outputs.append((y, dx, layer.running_mean, layer.running_var, layer.num_batches_tracked))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at least 2D"):
        bntriton.SyncBatchNorm(CHANNELS)(torch.randn(CHANNELS))


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_mode():
    # ``bias=`` is a keyword of newer torch releases' batch norms: test a layer without a
    # bias where the installed torch can build one, a plain one where it cannot.
    bias_keyword = "bias" in inspect.signature(nn.SyncBatchNorm.__init__).parameters
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=None, eps=1e-3),
        nn.Sequential(bntriton.BatchNorm1d(4, affine=False), nn.LazyBatchNorm1d()),
        nn.SyncBatchNorm(5, bias=False) if bias_keyword else nn.SyncBatchNorm(5),
    )
    model[2][0].eval()
    originals = [model[1], model[2][0], model[3]]
    group = object()  # any process-group handle; stored, not used until a synchronized call
    converted = bntriton.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model and type(model[0]) is nn.Conv2d
    assert type(model[2][1]) is nn.LazyBatchNorm1d  # other subclasses are left alone
    for old, new in zip(originals, [model[1], model[2][0], model[3]]):
        assert type(new) is bntriton.SyncBatchNorm and new.process_group is group
        assert (new.num_features, new.eps, new.momentum, new.affine, new.track_running_stats, new.training) == (
            old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, old.training)
        for name, tensor in list(old.named_parameters()) + list(old.named_buffers()):
            assert getattr(new, name) is tensor  # the same objects: optimizers keep working
        assert new._parameters is not old._parameters
    assert (model[3].bias is None) == bias_keyword and model[2][0].weight is None
    single = bntriton.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(single) is bntriton.SyncBatchNorm


def _rank_row(values, pivot=None):
    """A process's packed row ``[count, K, mean of x - K, M2]`` from its (n, C) values."""
    n, channels = values.shape
    if n == 0:
        return torch.zeros(3 * channels + 1, dtype=values.dtype)
    pivot = values[0] if pivot is None else pivot
    mean_s = (values - pivot).mean(0)
    m2 = ((values - pivot - mean_s) ** 2).sum(0)
    return torch.cat([torch.tensor([float(n)], dtype=values.dtype), pivot, mean_s, m2])


def test_combine_ranks_merges_uneven_and_empty_ranks_exactly():
    gen = torch.Generator().manual_seed(5)
    # Offset 1e6 std: only means carried relative to the pivots survive it.
    parts = [torch.randn(n, 2, generator=gen, dtype=torch.float64) * 3 + 1e6 for n in (0, 4, 0, 1, 9)]
    gathered = torch.stack([_rank_row(p) for p in parts])
    whole = torch.cat(parts)
    centred = whole - parts[1][0]  # exact; variance and rstd judged without the offset
    spread = 16 * EPS[torch.float64] * 3
    for rank in (0, 1, 3, 4):
        stats, count = combine_ranks(gathered, rank, None, None, None, None, eps=0.0)
        assert count.item() == whole.shape[0]
        assert torch.allclose(stats.var_unbiased, centred.var(0), rtol=16 * EPS[torch.float64], atol=0)
        assert torch.allclose(stats.rstd, centred.var(0, correction=0).rsqrt(), rtol=16 * EPS[torch.float64], atol=0)
        assert (stats.mean - whole.mean(0)).abs().max() <= EPS[torch.float64] * 1e6 + spread
        if parts[rank].numel():  # the mean relative to this rank's own pivot, to the spread
            pivot = gathered[rank, 1:3]
            assert (stats.mean_shifted - (whole - pivot).mean(0)).abs().max() <= spread


def test_combine_ranks_keeps_running_stats_where_the_global_batch_has_none():
    running_mean, running_var = torch.tensor([0.25, -1.5]), torch.tensor([2.0, 0.5])
    empty = torch.zeros(2, 7)  # every rank empty: no mean, no variance
    stats, count = combine_ranks(empty, 1, None, None, running_mean, running_var, eps=1e-5)
    assert count.item() == 0 and torch.equal(stats.mean, running_mean) and torch.equal(stats.var_unbiased, running_var)
    one = torch.stack([_rank_row(torch.tensor([[3.0, 4.0]])), torch.zeros(7)])  # one value: a mean only
    stats, count = combine_ranks(one, 0, None, None, running_mean, running_var, eps=1e-5)
    assert torch.equal(stats.mean, torch.tensor([3.0, 4.0])) and torch.equal(stats.var_unbiased, running_var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_backward_matches_the_fused_one_bitwise(dtype):
    """grad_sums + input_grad (SyncBatchNorm's two halves) against batch_norm_grads."""
    x = (torch.randn(6, 5, 3, 4, dtype=torch.float64) * 2 + 100).to(dtype)
    dy = torch.randn(6, 5, 3, 4).to(dtype)
    weight = torch.randn(5)
    view = channel_view(x)
    with forced_plan(block_rows=16, block_channels=2, num_splits=3):
        tiles = plan(view)
        stats = batch_stats(view, tiles, weight, None, 1e-5)
        dx, dweight, dbias = batch_norm_grads(view, tiles, dy, weight, stats.pivot, 1, stats.mean_shifted,
                                              stats.rstd, True, torch.float32)
        sums, dweight_split, dbias_split = grad_sums(view, tiles, dy, stats.pivot, 1, stats.mean_shifted,
                                                     stats.rstd, torch.float32)
        count = torch.tensor([float(view.rows)])
        dx_split = input_grad(view, tiles, dy, weight, stats.pivot, 1, stats.mean_shifted, stats.rstd,
                              sums, count)
    assert torch.equal(dx, dx_split) and torch.equal(dweight, dweight_split) and torch.equal(dbias, dbias_split)
