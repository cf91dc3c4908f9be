"""The split path's merges done by each channel block's last program (kernels/counters.py).

The partial statistics and the backward's partial sums count their programs' arrivals;
the last program of each channel block merges the block's splits, and the last block to
finish bumps ``num_batches_tracked``.  Triton's interpreter runs the programs one after
another, so these run the real merge on real partial results.  What could go wrong: a
program merging before every split is written (the results then differ from float64), a
counter left non-zero (the next call's merge never runs, or runs early: a second call
on other data then differs from float64), the counter bumped by every block (the
cumulative average then uses a wrong factor).  Hence several calls in a row, on
alternating inputs, each held to float64 and the last to the first's bits, and the
counters checked back at zero after each.
"""
import numpy as np
import pytest
import torch

import bntriton
from bntriton.kernels import forced_plan
from bntriton.kernels.counters import arrival_counters
from bntriton.verification import oracle as reference
from bntriton.verification.bounds import bound_units, normwise_error, reduction_error

from conftest import DEVICE

# 126 rows in 8 tiles: 3 splits per channel block, 5 channels in 3 blocks of 2 (the last
# one ragged); the backward sums its splits in the partial sums' last programs.
SPLIT = dict(block_rows=16, block_channels=2, num_splits=3, backward_sums="combine")
SHAPE = (6, 5, 7, 3)
COUNT = SHAPE[0] * SHAPE[2] * SHAPE[3]


def _inputs(layout: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * 2.0 + 40.0
    dy = torch.randn(SHAPE, generator=g)
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x.to(DEVICE), dy.to(DEVICE)


def _np(t):
    return t.detach().cpu().to(torch.float64).numpy()


def _module(momentum):
    module = bntriton.BatchNorm2d(SHAPE[1], momentum=momentum).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        module.weight.copy_(torch.rand(SHAPE[1], generator=g) + 0.5)
        module.bias.copy_(torch.randn(SHAPE[1], generator=g))
    return module


def _counters_left() -> int:
    return int(arrival_counters(torch.empty(0, device=DEVICE), 1).count_nonzero())


@pytest.fixture(autouse=True)
def kernels_on_cpu():
    """CPU tensors through the kernels (Triton's interpreter), whatever the default backend."""
    with bntriton.cpu_backend("interpreter"):
        yield


@pytest.fixture
def arrivals(monkeypatch):
    """Every ``arrived_last`` answer of the interpreted kernels, as (counter address,
    programs, answer).  The interpreter runs a kernel's code in its module's namespace,
    so a wrapper there sees each call (CUDA kernels are compiled: nothing is recorded)."""
    from bntriton.kernels import backward, counters, fused, stats

    record = []

    def recording(counter_ptr, programs):
        last = counters.arrived_last(counter_ptr, programs)
        record.append((int(counter_ptr.handle.data.item()), int(getattr(programs, "value", programs)),
                       bool(last.handle.data.item())))
        return last

    for module in (stats, backward, fused):
        monkeypatch.setattr(module, "arrived_last", recording)
    return record


def _assert_one_merge_per_block_by_its_last_program(record):
    """On each counter, every run of ``programs`` arrivals ends in exactly one True, the
    last: the merge runs once, after every partial result of its block is written."""
    if DEVICE != "cpu":
        return
    assert record, "no arrival was counted: the merge did not run in the partial kernels"
    arrived: dict = {}
    for address, programs, last in record:
        arrived[address] = arrived.get(address, 0) + 1
        assert last == (arrived[address] == programs), (address, arrived[address], programs, last)
        if last:
            arrived[address] = 0
    assert not any(arrived.values()), arrived


def _call(module, x, dy):
    xg = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(xg)
    y.backward(dy)
    return [t.detach().clone() for t in (y, xg.grad, module.weight.grad, module.bias.grad)]


def _assert_grads_within_bounds(outputs, grad, step):
    _, dx, dweight, dbias = outputs
    errors = {
        "dx": (normwise_error(dx, grad.dx, torch.float32, grad.dx_scale), bound_units("dx", torch.float32, COUNT)),
        "dweight": (reduction_error(dweight, grad.dweight, grad.dweight_scale, torch.float32),
                    bound_units("dweight", torch.float32, COUNT)),
        "dbias": (reduction_error(dbias, grad.dbias, grad.dbias_scale, torch.float32),
                  bound_units("dbias", torch.float32, COUNT)),
    }
    for name, (error, bound) in errors.items():
        assert error <= bound, f"call {step}: {name} {error:.3g} eps > {bound:.3g}"


@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_calls_merge_splits_in_each_blocks_last_program(layout, momentum, arrivals):
    module = _module(momentum)
    weight, bias = _np(module.weight), _np(module.bias)
    ref_mean, ref_var, magnitude = np.zeros(SHAPE[1]), np.ones(SHAPE[1]), None
    calls = []
    with forced_plan(**SPLIT):
        for step, seed in enumerate((1, 2, 1), start=1):
            x, dy = _inputs(layout, seed)
            outputs = _call(module, x, dy)
            calls.append(outputs)
            assert _counters_left() == 0, f"call {step} left its arrival counters non-zero"
            _assert_one_merge_per_block_by_its_last_program(arrivals)
            assert int(module.num_batches_tracked) == step

            ref = reference.forward(_np(x), ref_mean, ref_var, weight, bias, True, momentum, module.eps,
                                    num_batches_tracked=step, running_mean_magnitude=magnitude)
            ref_mean, ref_var, magnitude = ref.running_mean, ref.running_var, ref.running_mean_magnitude
            assert normwise_error(outputs[0], ref.y, torch.float32) <= bound_units("y", torch.float32, COUNT)
            for name, out, expected, scale in (("running_mean", module.running_mean, ref_mean, magnitude),
                                               ("running_var", module.running_var, ref_var, None)):
                error = normwise_error(out, expected, torch.float32, scale)
                assert error <= bound_units(name, torch.float32, COUNT), f"call {step}: {name} {error:.3g} eps"
            _assert_grads_within_bounds(
                outputs, reference.backward(_np(dy), _np(x), ref.mean, ref.var, weight, True, module.eps), step)
    # The third call repeats the first's input: the same bits, whatever ran in between.
    for first, third in zip(calls[0], calls[2]):
        assert torch.equal(first, third)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_backward_merges_splits_in_each_blocks_last_program(layout, arrivals):
    """The backward of an eval forward is one launch: dx written with the partial sums,
    dweight and dbias by each channel block's last program."""
    module = _module(0.1)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        module.running_mean.copy_(torch.randn(SHAPE[1], generator=g) + 40.0)
        module.running_var.copy_(torch.rand(SHAPE[1], generator=g) * 3.0 + 1.0)
    module.eval()
    weight = _np(module.weight)
    calls = []
    with forced_plan(**SPLIT):
        for step, seed in enumerate((1, 2, 1), start=1):
            x, dy = _inputs(layout, seed)
            outputs = _call(module, x, dy)
            calls.append(outputs)
            assert _counters_left() == 0, f"call {step} left its arrival counters non-zero"
            _assert_one_merge_per_block_by_its_last_program(arrivals)
            grad = reference.backward(_np(dy), _np(x), _np(module.running_mean), _np(module.running_var), weight,
                                      False, module.eps)
            _assert_grads_within_bounds(outputs, grad, step)
    for first, third in zip(calls[0], calls[2]):
        assert torch.equal(first, third)


def test_single_read_cumulative_average_over_several_programs_in_one_launch(arrivals, monkeypatch):
    """The single-read forward with momentum=None over several channel blocks: every
    program reads num_batches_tracked for the factor, and the last to finish bumps it, in
    the one launch."""
    from bntriton.kernels.runtime import DualKernel

    launches = []
    original = DualKernel.__getitem__

    def counting(kernel, grid):
        launches.append(kernel.fn.__name__)
        return original(kernel, grid)

    monkeypatch.setattr(DualKernel, "__getitem__", counting)
    module = bntriton.BatchNorm1d(40, momentum=None).to(DEVICE)
    ref_mean, ref_var, magnitude = np.zeros(40), np.ones(40), None
    with forced_plan(path="fused"):
        for step, seed in enumerate((1, 2, 1), start=1):
            g = torch.Generator().manual_seed(seed)
            x = (torch.randn(1024, 40, generator=g) * 2.0 + 40.0).to(DEVICE)
            launches.clear()
            with torch.no_grad():
                module(x)
            if DEVICE == "cpu":  # the interpreter's plan: 16-channel tiles, three programs
                assert launches == ["_fused_forward_kernel"], launches
            assert _counters_left() == 0
            assert int(module.num_batches_tracked) == step
            ref = reference.forward(_np(x), ref_mean, ref_var, None, None, True, None, module.eps,
                                    num_batches_tracked=step, running_mean_magnitude=magnitude)
            ref_mean, ref_var, magnitude = ref.running_mean, ref.running_var, ref.running_mean_magnitude
            for name, out, expected, scale in (("running_mean", module.running_mean, ref_mean, magnitude),
                                               ("running_var", module.running_var, ref_var, None)):
                error = normwise_error(out, expected, torch.float32, scale)
                assert error <= bound_units(name, torch.float32, 1024), f"call {step}: {name} {error:.3g} eps"
    _assert_one_merge_per_block_by_its_last_program(arrivals)
    assert DEVICE != "cpu" or {programs for _, programs, _ in arrivals} == {3}


def test_merges_under_a_gpus_own_plan_repeat_bit_for_bit(arrivals):
    """Under the plan an H100 would choose (hundreds of programs on a GPU-sized tensor,
    several splits per channel block on a small one here), alternating inputs: each call
    equal bit for bit to the first call on the same input.  A merge that read a split's
    partial results before they were visible would take them from another call (the
    buffers are reused) and differ; on a GPU this is where a missing ordering would show."""
    from bntriton.kernels.plans import planned_for

    shape = (64, 64, 56, 56) if DEVICE != "cpu" else (4, 32, 16, 16)
    rounds = 6 if DEVICE != "cpu" else 2
    g = torch.Generator().manual_seed(3)
    inputs = [
        ((torch.randn(shape, generator=g) * 2.0 + offset).contiguous(memory_format=torch.channels_last).to(DEVICE),
         torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last).to(DEVICE))
        for offset in (40.0, -3.0)
    ]
    module = bntriton.BatchNorm2d(shape[1], momentum=None).to(DEVICE)
    first = {}
    with planned_for(132):
        for step in range(rounds):
            for i, (x, dy) in enumerate(inputs):
                outputs = _call(module, x, dy)
                if i in first:
                    for name, a, b in zip(("y", "dx", "dweight", "dbias"), first[i], outputs):
                        assert torch.equal(a, b), f"round {step}, input {i}: {name} differs"
                else:
                    first[i] = outputs
    assert _counters_left() == 0
    assert int(module.num_batches_tracked) == 2 * rounds
    _assert_one_merge_per_block_by_its_last_program(arrivals)
    # (Here: 2 splits per channel block, forward and backward; blocks counted as well.)
    assert DEVICE != "cpu" or {programs for _, programs, _ in arrivals} == {2}
