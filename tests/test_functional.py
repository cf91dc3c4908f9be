"""bntriton.batch_norm: F.batch_norm's signature, semantics and errors; failing calls
change nothing."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import bntriton
from bntriton.verification import oracle as reference
from bntriton.functional import batch_norm_with_counter
from bntriton.verification.bounds import bound_units, normwise_error

from conftest import DEVICE


def _stats(c, dtype=torch.float32):
    return torch.randn(c, dtype=dtype, device=DEVICE), torch.rand(c, dtype=dtype, device=DEVICE) + 0.5


def test_signature_matches_torch():
    # The fused epilogue's arguments (activation, residual, negative_slope) are keyword-only extras.
    ours = {k: p for k, p in inspect.signature(bntriton.batch_norm).parameters.items()
            if p.kind != inspect.Parameter.KEYWORD_ONLY}
    theirs = inspect.signature(F.batch_norm).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_functional_fp32(training):
    x = torch.randn(6, 5, 4, 3, device=DEVICE) * 2 + 1
    w, b = torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    rm, rv = _stats(5)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = bntriton.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training, 0.2, 1e-4)
    count = x.numel() // 5
    # Both are within their bound of the exact answer, so within twice of each other.
    assert normwise_error(y, y_t, torch.float32) <= 2 * bound_units("y", torch.float32, count)
    assert normwise_error(rm, rm_t, torch.float32) <= 2 * bound_units("running_mean", torch.float32, count)
    assert normwise_error(rv, rv_t, torch.float32) <= 2 * bound_units("running_var", torch.float32, count)


def test_eval_uses_running_stats_and_leaves_them():
    x = torch.randn(7, 3, 5, device=DEVICE, dtype=torch.float64)
    rm, rv = _stats(3, torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    y = bntriton.batch_norm(x, rm, rv, training=False)
    ref = reference.forward(x.cpu().numpy(), rm0.cpu().numpy(), rv0.cpu().numpy(), training=False).y
    assert normwise_error(y, ref, torch.float64) <= bound_units("y", torch.float64, 35)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_training_without_running_stats():
    x = torch.randn(8, 4, device=DEVICE, dtype=torch.float64)
    y = bntriton.batch_norm(x, None, None, training=True)
    ref = reference.forward(x.cpu().numpy(), None, None, training=True).y
    assert normwise_error(y, ref, torch.float64) <= bound_units("y", torch.float64, 8)


def test_weight_without_bias():
    x = torch.randn(8, 4, 3, device=DEVICE, dtype=torch.float64)
    w = torch.randn(4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = bntriton.batch_norm(x, None, None, w, None, training=True)
    ref = reference.forward(x.cpu().numpy(), None, None, w.detach().cpu().numpy(), None, training=True).y
    assert normwise_error(y, ref, torch.float64) <= bound_units("y", torch.float64, 24)
    y.sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("channels", [3, 2500])  # 2500: more channels than one block
def test_cumulative_momentum_reads_counter_on_device(channels):
    x = torch.randn(10, channels, device=DEVICE, dtype=torch.float64)
    rm, rv = _stats(channels, torch.float64)
    rm0, rv0 = rm.cpu().clone().numpy(), rv.cpu().clone().numpy()
    counter = torch.tensor(3, device=DEVICE)
    batch_norm_with_counter(x, rm, rv, None, None, True, None, 1e-5, counter)
    assert counter.item() == 4
    ref = reference.forward(x.cpu().numpy(), rm0, rv0, training=True, momentum=None, num_batches_tracked=4)
    f64 = torch.float64
    assert normwise_error(rm, ref.running_mean, f64, ref.running_mean_magnitude) <= bound_units("running_mean", f64, 10)
    assert normwise_error(rv, ref.running_var, f64) <= bound_units("running_var", f64, 10)


def _bad_calls():
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    return [
        ("1-D input", dict(input=torch.randn(5)), ValueError, "2D|1D"),
        ("integer input", dict(input=x.long()), TypeError, "float16, bfloat16"),
        ("running_mean size", dict(running_mean=torch.zeros(4)), RuntimeError, "running_mean should contain 3 elements not 4"),
        ("running_var size", dict(running_var=torch.ones(2)), RuntimeError, "running_var should contain 3 elements not 2"),
        ("weight size", dict(weight=torch.ones(4)), RuntimeError, "weight should contain 3 elements not 4"),
        ("bias size", dict(bias=torch.ones(5)), RuntimeError, "bias should contain 3 elements not 5"),
        ("integer weight", dict(weight=torch.ones(3, dtype=torch.long)), TypeError, "floating-point"),
        ("eval without stats", dict(running_mean=None, running_var=None, training=False), RuntimeError,
         "running_mean must be defined in evaluation mode"),
        ("one value per channel", dict(input=torch.randn(1, 3)), ValueError,
         "Expected more than 1 value per channel when training"),
        ("only running_mean", dict(running_var=None), ValueError, "together"),
        ("negative eps", dict(eps=-1.0), ValueError, "eps"),
        ("device mismatch", dict(weight=torch.ones(3, device="meta")), RuntimeError, "device"),
    ], x, rm, rv


@pytest.mark.parametrize("index", range(12))
def test_bad_input_raises_clear_error_and_changes_nothing(index):
    calls, x, rm, rv = _bad_calls()
    name, override, exc, message = calls[index]
    kwargs = dict(input=x, running_mean=rm, running_var=rv, weight=torch.ones(3), bias=torch.zeros(3),
                  training=True, momentum=0.1, eps=1e-5)
    kwargs.update(override)
    before = [t.clone() for t in (rm, rv)]
    with pytest.raises(exc, match=message):
        bntriton.batch_norm(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, (rm, rv))), name


@pytest.mark.parametrize("training", [True, False])
def test_eager_fast_path_matches_the_registered_ops_bitwise(training):
    """Eager calls skip torch.library's dispatch; the ops (used when tracing) must agree."""
    from bntriton.ops import batch_norm as ops

    x = torch.randn(5, 3, 4, device=DEVICE)
    w, b = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    rm, rv = _stats(3)
    dy = torch.randn(5, 3, 4, device=DEVICE)
    results = []
    for use_op in (False, True):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        if training:
            forward = ops.batch_norm_train if use_op else ops.train
            y = forward(xs, ws, bs, 1e-5)[0]
        else:
            forward = ops.batch_norm_eval if use_op else ops.evaluate
            y = forward(xs, ws, bs, rm, rv, 1e-5)
        y.backward(dy)
        results.append([y, xs.grad, ws.grad, bs.grad])
    for eager, registered in zip(*results):
        assert torch.equal(eager, registered)


@pytest.mark.parametrize("training", [True, False])
def test_a_tensor_left_behind_by_a_finished_transform_computes_as_a_plain_one(training):
    """Eager calls start their autograd.Function through the C++ apply (ops.bare_apply),
    unwrapping what a finished torch.func transform left behind (a dead wrapper) as
    autograd.Function.apply does: output and gradients are those of the plain tensor."""
    leaked = []

    def keep(t):
        leaked.append(t)
        return t.sum()

    x = torch.randn(4, 3, 5, device=DEVICE) * 2 + 1
    torch.func.grad(keep)(x)
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    dy = torch.randn(4, 3, 5, device=DEVICE)
    stats = _stats(3)
    results = []
    for inp in (leaked[0], x):
        w, b = torch.ones(3, device=DEVICE, requires_grad=True), torch.zeros(3, device=DEVICE, requires_grad=True)
        rm, rv = (t.clone() for t in stats)
        y = bntriton.batch_norm(inp, rm, rv, w, b, training=training)
        y.backward(dy)
        results.append([y, w.grad, b.grad, rm, rv])
    for left_behind, plain in zip(*results):
        assert torch.equal(left_behind, plain)


@pytest.mark.parametrize("path", ["split", "fused"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_eager_running_update_matches_the_registered_ops_bitwise(path, momentum):
    """Eager training forwards update the running statistics inside the statistics'
    launches (split path) or right after them (single-read path); the registered ops
    update them in a launch of their own.  Same bits either way, counter included."""
    from bntriton.ops import batch_norm as ops
    from bntriton.kernels import RunningStats, forced_plan

    x = torch.randn(4, 3, 5, device=DEVICE) * 3 + 2
    w, b = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    forced = dict(path="split", block_rows=4, num_splits=3) if path == "split" else dict(path="fused")
    stats = _stats(3)
    results = []
    for traced in (False, True):
        rm, rv = (t.clone() for t in stats)
        counter = torch.tensor(4, device=DEVICE)
        running = RunningStats(rm, rv, counter, momentum)
        with forced_plan(**forced):
            if traced:  # what a trace runs: the functional op, then the update op
                out = ops.batch_norm_train(x, w, b, 1e-5)
                ops.update_running_stats(rm, rv, counter, out[3], out[4], momentum)
            else:
                out = ops.train(x, w, b, 1e-5, running)
        results.append([out[0], rm, rv, counter])
    for name, eager, registered in zip(("y", "running_mean", "running_var", "counter"), *results):
        assert torch.equal(eager, registered), (name, eager - registered)
    assert results[0][3].item() == 5


@pytest.mark.parametrize("path", ["split", "fused"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_backward_takes_rstd_in_the_kernels_and_matches_the_registered_op_bitwise(path, layout):
    """The backward of an eval forward computes rstd from the running variance inside its
    launches (two on the split path, one on the single-read path), the same whether the
    eager autograd.Function or the registered op's autograd formula asks; within the
    bounds against float64 either way."""
    from bntriton.kernels import forced_plan
    from bntriton.verification.bounds import reduction_error

    gen = torch.Generator().manual_seed(7)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(4, 3, 5, 6, generator=gen) * 3 + 2).contiguous(memory_format=memory_format).to(DEVICE)
    dy = torch.randn(x.shape, generator=gen).contiguous(memory_format=memory_format).to(DEVICE)
    w, b = (torch.rand(3, generator=gen) + 0.5).to(DEVICE), torch.randn(3, generator=gen).to(DEVICE)
    rm, rv = (torch.randn(3, generator=gen) + 2).to(DEVICE), (torch.rand(3, generator=gen) + 0.5).to(DEVICE)
    forced = dict(path="split", block_rows=4, num_splits=3) if path == "split" else dict(path="fused")
    results = []
    for traced in (False, True):
        leaf, weight, bias = (t.clone().requires_grad_() for t in (x, w, b))
        with forced_plan(**forced):
            if traced:  # what a trace records: the registered op and its autograd formula
                y = torch.ops.bntriton.batch_norm_eval(leaf, weight, bias, rm, rv, 1e-5)
            else:
                y = bntriton.batch_norm(leaf, rm, rv, weight, bias, training=False)
            y.backward(dy)
        results.append((leaf.grad, weight.grad, bias.grad))
    for name, eager, registered in zip(("dx", "dweight", "dbias"), *results):
        assert torch.equal(eager, registered), name
    f64 = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    grad = reference.backward(f64(dy), f64(x), f64(rm), f64(rv), f64(w), False, 1e-5)
    count = x.numel() // 3
    dx, dweight, dbias = results[0]
    assert normwise_error(dx, grad.dx, torch.float32, grad.dx_scale) <= bound_units("dx", torch.float32, count)
    assert reduction_error(dweight, grad.dweight, grad.dweight_scale, torch.float32) <= bound_units(
        "dweight", torch.float32, count)
    assert reduction_error(dbias, grad.dbias, grad.dbias_scale, torch.float32) <= bound_units(
        "dbias", torch.float32, count)


def test_common_case_shortcut_accepts_only_what_the_full_checks_accept(monkeypatch):
    # check_arguments recognizes the common valid call in one pass and otherwise runs the
    # full checks: the shortcut must never accept a call those would refuse.  Every
    # combination of a few ordinary and a few wrong values per argument is tried.
    import itertools

    from bntriton import checks

    c = 3
    x = torch.randn(4, c, 2)
    good = torch.rand(c) + 0.5
    per_channel = [None, good, good.double(), torch.rand(c + 1), torch.rand(1, c), good.half(),
                   torch.rand(c, requires_grad=True), torch.arange(c)]
    inputs = [x, x.half(), x[:, :, :1].reshape(4, c), torch.randn(1, c), x.int(), torch.randn(c)]
    accepted = 0
    for inp, rm, w, training, eps, momentum in itertools.product(
            inputs, per_channel, per_channel[:3] + per_channel[5:6], (True, False), (1e-5, 0.0, -1.0, 1), (0.1, None, 1)):
        args = (inp, rm, None if rm is None else good.to(rm.dtype) if rm.dim() == 1 and rm.numel() == c else rm,
                w, None, training, momentum, eps)
        if not checks._common_valid_case(*args):
            continue
        accepted += 1
        monkeypatch.setattr(checks, "_common_valid_case", lambda *a: False)
        checks.check_arguments(*args)  # the full checks accept it too
        monkeypatch.undo()
    assert accepted > 20  # the shortcut does take the common cases
