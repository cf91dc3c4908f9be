"""bntriton's BatchNorm1d/2d/3d and batch_norm held to the behaviour PyTorch's own test suite
expects of torch's (test_nn.py's batch-norm tests, test_modules.py's ModuleInfo tests for
BatchNorm1d/2d/3d, the OpInfo samples of nn.functional.batch_norm): forward, gradients,
second derivatives, running statistics, memory format, non-contiguous inputs, pickling,
state dicts, empty batches, strided parameters and the errors torch raises.

Written from torch 2.13's behaviour, each test runs the same thing through torch's class
and ours and compares (bounds from the table: each side within its bound of the exact
result, so at most twice it apart), or pins torch's error type and wording.  Where bntriton
chooses differently from torch, the test says so.
"""
from __future__ import annotations

import io
import re
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradgradcheck

import bntriton
from bntriton.verification.bounds import bound_units, normwise_error, reduction_error

from conftest import DEVICE

_CLASSES = {1: (bntriton.BatchNorm1d, nn.BatchNorm1d), 2: (bntriton.BatchNorm2d, nn.BatchNorm2d),
            3: (bntriton.BatchNorm3d, nn.BatchNorm3d)}


def _assert_close(ours, theirs, quantity, count, name=""):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
    bound = 2 * bound_units(quantity, ours.dtype, count)
    err = normwise_error(ours, theirs, ours.dtype)
    assert err <= bound, f"{name}: {err:.1f} eps from torch's (bound {bound:.1f})"


def _pair(dims, channels, dtype=torch.float32, **kwargs):
    """(ours, torch's) with the same non-trivial parameters and running statistics."""
    ours_cls, theirs_cls = _CLASSES[dims]
    theirs = theirs_cls(channels, **kwargs).to(DEVICE, dtype)
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1, 1)
        if theirs.track_running_stats:
            theirs.running_mean.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 1.5)
    ours = ours_cls(channels, **kwargs).to(DEVICE, dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _step(module, x, dy):
    """Forward and backward; returns output, input gradient and parameter gradients."""
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


def _compare_steps(ours, theirs, x, steps=2):
    count = x.numel() // x.shape[1]
    for step in range(steps):
        dy = torch.randn_like(x)
        names = ("y", "dx", "dweight", "dbias")
        for name, a, b in zip(names, _step(ours, x, dy), _step(theirs, x, dy)):
            _assert_close(a, b, name, count, f"step {step} {name}")
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        if name == "num_batches_tracked":
            assert torch.equal(a, b), name
        else:
            _assert_close(a, b, name, count, name)


# --------------------------------------------------------- ModuleInfo: forward and gradients

# (dims, input shape, constructor arguments): the constructor variants torch's ModuleInfo
# samples for BatchNorm*d, spread over the three classes and the inputs they accept.
_MODULE_CASES = [
    (1, (4, 3), {}),
    (1, (4, 3, 5), {"affine": False}),
    (1, (3, 3, 2), {"momentum": None}),
    (1, (4, 3), {"track_running_stats": False}),
    (2, (2, 3, 3, 2), {}),
    (2, (2, 3, 2, 2), {"eps": 1e-3, "momentum": 0.5}),
    (2, (2, 3, 2, 2), {"momentum": None, "affine": False}),
    (2, (3, 3, 2, 1), {"track_running_stats": False, "affine": False}),
    (3, (2, 3, 2, 2, 2), {}),
    (3, (2, 3, 1, 2, 2), {"momentum": None, "track_running_stats": False}),
]


@pytest.mark.parametrize("dims,shape,kwargs", _MODULE_CASES, ids=[f"{d}d-{s}-{k}" for d, s, k in _MODULE_CASES])
def test_module_train_then_eval_matches_torch(dims, shape, kwargs):
    ours, theirs = _pair(dims, shape[1], **kwargs)
    x = torch.randn(shape, device=DEVICE) * 2 + 0.5
    _compare_steps(ours, theirs, x)
    ours.eval()
    theirs.eval()
    _compare_steps(ours, theirs, x, steps=1)  # running statistics (or batch ones, untracked)


def test_module_gradgradcheck():
    ours = bntriton.BatchNorm2d(2).to(DEVICE, torch.float64)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    params = tuple(ours.parameters())

    def fn(x, weight, bias):
        return torch.func.functional_call(ours, {"weight": weight, "bias": bias}, (x,))

    assert gradgradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input_gives_channels_last_output_and_gradient(dims):
    ours, theirs = _pair(dims, 3)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn((2, 3) + (2,) * dims, device=DEVICE).contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    results = [_step(m, x, dy) for m in (ours, theirs)]
    for name, a, b in zip(("y", "dx"), *results):
        assert b.is_contiguous(memory_format=fmt) and a.is_contiguous(memory_format=fmt), name
        _assert_close(a, b, name, x.numel() // 3, name)


def test_non_contiguous_inputs_match_torch():
    ours, theirs = _pair(2, 4)
    base = torch.randn(3, 8, 5, 2, device=DEVICE)
    for x in (base[:, ::2], base[:, :4].transpose(2, 3), base[:, :4].permute(0, 1, 3, 2)[..., ::2]):
        _compare_steps(ours, theirs, x, steps=1)


def test_pickle_and_deepcopy_keep_class_state_and_results():
    ours, _ = _pair(2, 3)
    x = torch.randn(2, 3, 2, 2, device=DEVICE)
    ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for clone in (pickle.loads(pickle.dumps(ours)), torch.load(buffer, weights_only=False)):
        assert type(clone) is bntriton.BatchNorm2d
        for (name, a), (_, b) in zip(clone.state_dict().items(), ours.state_dict().items()):
            assert torch.equal(a, b), name
        torch.testing.assert_close(clone.eval()(x), ours.eval()(x), rtol=0, atol=0)
        ours.train()


def test_state_dict_round_trips_with_torch_and_old_versions():
    ours, theirs = _pair(1, 3)
    theirs.load_state_dict(ours.state_dict())
    state = ours.state_dict()
    # A version-1 state dict (before num_batches_tracked): torch fills the counter in.
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    fresh = bntriton.BatchNorm1d(3).to(DEVICE)
    fresh.load_state_dict(state)
    assert int(fresh.num_batches_tracked) == 0


# ------------------------------------------------------------------------ test_nn behaviours


def test_eval_mode_is_repeatable_and_leaves_buffers_alone():
    ours, _ = _pair(1, 3)
    ours.eval()
    x = torch.randn(4, 3, device=DEVICE)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    first, second = ours(x), ours(x)
    assert torch.equal(first, second)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cumulative_average_with_momentum_none():
    """momentum=None: the running statistics are the plain average of the batches'."""
    ours = bntriton.BatchNorm1d(3, momentum=None).to(DEVICE, torch.float64)
    batches = [torch.randn(5, 3, dtype=torch.float64, device=DEVICE) * (i + 1) + i for i in range(3)]
    for x in batches:
        ours(x)
    mean = torch.stack([x.mean(0) for x in batches]).mean(0)
    var = torch.stack([x.var(0) for x in batches]).mean(0)
    _assert_close(ours.running_mean, mean, "running_mean", 5)
    _assert_close(ours.running_var, var, "running_var", 5)


def test_untracked_statistics_are_not_created_or_updated():
    ours, theirs = _pair(2, 3, track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    x = torch.randn(2, 3, 2, 2, device=DEVICE)
    ours.eval()
    theirs.eval()
    _assert_close(ours(x), theirs(x), "y", 8)  # batch statistics in eval too


@pytest.mark.parametrize("dims,shape", [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)), (3, (1, 3, 1, 1, 1))])
def test_one_value_per_channel_is_refused_in_training(dims, shape):
    ours, theirs = _pair(dims, 3)
    x = torch.randn(shape, device=DEVICE)
    for module in (ours, theirs):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            module(x)
    ours.eval()
    ours(x)  # eval is fine


@pytest.mark.parametrize("dims,bad_dims", [(1, 4), (2, 3), (3, 4)])
def test_wrong_input_rank_is_refused_like_torch(dims, bad_dims):
    ours, theirs = _pair(dims, 3)
    x = torch.randn((2, 3) + (2,) * (bad_dims - 2), device=DEVICE)
    with pytest.raises(ValueError) as theirs_error:
        theirs(x)
    with pytest.raises(ValueError, match=f"^{re.escape(str(theirs_error.value))}$"):
        ours(x)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_per_channel_size_mismatch_is_refused_like_torch(name):
    x = torch.randn(4, 3, device=DEVICE)
    args = dict(running_mean=torch.zeros(3, device=DEVICE), running_var=torch.ones(3, device=DEVICE),
                weight=torch.ones(3, device=DEVICE), bias=torch.zeros(3, device=DEVICE))
    args[name] = torch.ones(4, device=DEVICE)
    with pytest.raises(RuntimeError, match=f"{name} should contain 3 elements not 4"):
        bntriton.batch_norm(x, training=True, **args)


# Inputs with two faults each: torch reports the batch size first, then the per-channel
# sizes, then the dtypes (F.batch_norm's own check, then the C++ checks in that order).
_TWO_FAULTS = [
    ((1, 3), 3, torch.float64, True),    # one value per channel, and float64 parameters
    ((1, 3, 1), 3, torch.float64, True),
    ((1, 3), 4, torch.float32, True),    # one value per channel, and parameters of 4
    ((2, 3), 4, torch.float64, True),    # parameters of 4 in float64
    ((2, 3, 4, 5), 4, torch.float64, False),
]


@pytest.mark.parametrize("shape,channels,param_dtype,training", _TWO_FAULTS, ids=str)
def test_errors_come_in_torchs_order(shape, channels, param_dtype, training):
    x = torch.randn(*shape, device=DEVICE)
    params = [torch.ones(channels, device=DEVICE, dtype=param_dtype) for _ in range(4)]
    errors = []
    for bn in (bntriton.batch_norm, F.batch_norm):
        with pytest.raises((RuntimeError, ValueError)) as caught:
            bn(x, params[0], params[1], params[2], params[3], training=training)
        errors.append(caught.value)
    ours, theirs = errors
    assert type(ours) is type(theirs), (ours, theirs)
    first_words = re.split(r"[(:]", str(theirs))[0].split()[:4]
    assert str(ours).split()[:4] == first_words or str(theirs).startswith("mixed dtype"), (ours, theirs)
    if str(theirs).startswith("mixed dtype"):  # torch's CPU wording for a dtype mismatch
        assert "expected scalar type" in str(ours), ours


def test_empty_batch_gives_empty_output_zero_parameter_gradients_and_keeps_statistics():
    ours, theirs = _pair(2, 3)
    x = torch.randn(0, 3, 2, 2, device=DEVICE)
    results = [_step(m, x, torch.randn_like(x)) for m in (ours, theirs)]
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_empty_batch_with_unusual_strides():
    x = torch.randn(5, 0, 2, 2, device=DEVICE).transpose(0, 1)  # (0, 5, 2, 2), neither layout
    y = bntriton.batch_norm(x, None, None, training=True)
    assert y.shape == x.shape


# ------------------------------------------------------------- strided per-channel tensors


def test_expanded_and_strided_parameters_match_torch():
    x = torch.randn(5, 4, 3, device=DEVICE) * 2 + 1
    buffer = torch.randn(8, device=DEVICE)
    for weight, bias in ((torch.full((1,), 1.5, device=DEVICE).expand(4), None), (buffer[::2], buffer[1::2])):
        ours = bntriton.batch_norm(x, None, None, weight, bias, training=True)
        _assert_close(ours, F.batch_norm(x, None, None, weight, bias, training=True), "y", 15)


def test_expanded_weight_gets_its_gradient_summed():
    # dweight = sum(3 y^2 x_hat) = 6.75 sum(x_hat^3), a sum that cancels: both results are
    # held to float64 against the magnitude of its terms (the bound table's condition), not
    # to each other relative to the result (torch's CUDA result differs from ours by 78 eps
    # of the result on an H100, both within their bound of the exact sum).
    x = torch.randn(5, 4, 3, device=DEVICE)
    grads = {}
    for name, bn, dtype in (("ours", bntriton.batch_norm, torch.float32), ("torch", F.batch_norm, torch.float32),
                            ("exact", F.batch_norm, torch.float64)):
        weight = torch.full((1,), 1.5, device=DEVICE, dtype=dtype, requires_grad=True)
        y = bn(x.to(dtype), None, None, weight.expand(4), None, training=True)
        y.pow(3).sum().backward()
        grads[name] = weight.grad
        if name == "exact":
            magnitude = (3 * y.detach() ** 2 * y.detach() / 1.5).abs().sum().reshape(1)
    bound = bound_units("dweight", torch.float32, 15)
    assert reduction_error(grads["ours"], grads["exact"], magnitude, torch.float32) <= bound
    if DEVICE == "cpu":  # torch's CUDA reductions are not held to the table (docs/conformance.md)
        assert reduction_error(grads["torch"], grads["exact"], magnitude, torch.float32) <= bound


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_running_statistics_are_read_and_written_only_through_the_view(training):
    x = torch.randn(5, 4, 3, device=DEVICE) * 2 + 1
    parents = []
    for bn in (bntriton.batch_norm, F.batch_norm):
        mean_parent = torch.arange(8.0, device=DEVICE)
        var_parent = torch.arange(1.0, 9.0, device=DEVICE)
        y = bn(x, mean_parent[::2], var_parent[1::2], training=training)
        parents.append((y, mean_parent, var_parent))
    (y, mean, var), (y_ref, mean_ref, var_ref) = parents
    _assert_close(y, y_ref, "y", 15)
    _assert_close(mean[::2], mean_ref[::2], "running_mean", 15)
    _assert_close(var[1::2], var_ref[1::2], "running_var", 15)
    # The elements outside the views are untouched (bitwise).
    assert torch.equal(mean[1::2], mean_ref[1::2]) and torch.equal(var[::2], var_ref[::2])


# --------------------------------------------------------------------- errors and edge cases


def _torch_splits_eps_rules_by_mode(x, running):
    """Whether the installed torch has torch 2.13's eps rules (eps > 0 in training, eps >= 0
    in eval) rather than older releases' single rule (eps > 0 always, "batch_norm eps must
    be positive, but got ...")."""
    try:
        F.batch_norm(x, *running, training=False, eps=0.0)
    except ValueError as error:
        assert str(error) == "batch_norm eps must be positive, but got 0.0"
        return False
    return True


def test_eps_rules_match_torch():
    x = torch.randn(4, 3, device=DEVICE)
    running = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    # bntriton keeps torch 2.13's rules and wording whatever torch is installed; the
    # installed torch is held to them where it has them, to its own single rule otherwise.
    split = _torch_splits_eps_rules_by_mode(x, running)
    for bn in (bntriton.batch_norm, F.batch_norm) if split else (bntriton.batch_norm,):
        for eps in (0.0, -1.0):
            with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
                bn(x, *running, training=True, eps=eps)
        with pytest.raises(ValueError, match="batch_norm eps must be non-negative"):
            bn(x, *running, training=False, eps=-1.0)
        bn(x, *running, training=False, eps=0.0)  # allowed in eval, as torch 2.13
    if not split:
        for training in (True, False):
            for eps in (0.0, -1.0):
                with pytest.raises(ValueError, match=r"^batch_norm eps must be positive, but got "):
                    F.batch_norm(x, *running, training=training, eps=eps)


@pytest.mark.parametrize("input_dtype,param_dtypes", [
    (torch.float32, (torch.float16, torch.float32)),   # half running_mean, float input
    (torch.float32, (torch.float64, torch.float64)),
    (torch.float16, (torch.float16, torch.float32)),   # mixed parameters
    (torch.bfloat16, (torch.float16, torch.float16)),
    (torch.float64, (torch.float32, torch.float32)),
])
def test_parameter_dtypes_torch_refuses_are_refused(input_dtype, param_dtypes):
    x = torch.randn(4, 3, device=DEVICE, dtype=input_dtype)
    running_mean = torch.zeros(3, device=DEVICE, dtype=param_dtypes[0])
    running_var = torch.ones(3, device=DEVICE, dtype=param_dtypes[1])
    if x.device.type == "cpu":
        # torch's CPU batch norm refuses these; its CUDA one accepts them (docs/conformance.md).
        # bntriton refuses them on every device.
        with pytest.raises(RuntimeError):
            F.batch_norm(x, running_mean, running_var, training=True)
    before = running_mean.clone()
    with pytest.raises(RuntimeError, match="expected scalar type"):
        bntriton.batch_norm(x, running_mean, running_var, training=True)
    assert torch.equal(running_mean, before)


@pytest.mark.parametrize("input_dtype,param_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64),
])
def test_parameter_dtypes_torch_accepts_are_accepted(input_dtype, param_dtype):
    ours, theirs = _pair(2, 3, dtype=param_dtype)
    x = (torch.randn(2, 3, 2, 2, device=DEVICE) + 0.5).to(input_dtype)
    y, y_ref = ours(x), theirs(x)
    assert y.dtype == y_ref.dtype
    _assert_close(y, y_ref, "y", 8)


def test_running_statistics_requiring_grad_are_refused_like_torch():
    x = torch.randn(4, 3, device=DEVICE)
    running_mean = torch.zeros(3, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
        bntriton.batch_norm(x, running_mean, torch.ones(3, device=DEVICE), training=False)


# OpInfo samples of nn.functional.batch_norm: (input shape, with running stats, weight, bias,
# training, momentum, eps), including its 1-D empty sample.
_OPINFO_SAMPLES = [
    ((5, 5, 5), True, True, True, False, 0.5, 0.6),
    ((5, 5, 5), True, True, True, True, 0.5, 0.6),
    ((2, 1), True, True, True, False, 0.1, 1e-5),
    ((3, 2, 4), False, True, True, True, 0.1, 1e-5),
    ((3, 2, 4), True, False, False, True, 0.2, 0.1),
    ((0, 2), True, True, True, True, 0.1, 1e-5),
    ((0, 2, 3), False, False, True, True, 0.1, 1e-5),
    ((0,), True, False, False, False, 0.1, 1e-5),
    ((0,), True, False, False, True, 0.1, 1e-5),
]


@pytest.mark.parametrize("sample", _OPINFO_SAMPLES, ids=str)
def test_functional_opinfo_samples_match_torch(sample):
    shape, with_running, with_weight, with_bias, training, momentum, eps = sample
    channels = shape[1] if len(shape) > 1 else 0
    gen = torch.Generator().manual_seed(0)

    def make(*s, positive=False):
        t = torch.rand(*s, generator=gen) + 0.5 if positive else torch.randn(*s, generator=gen)
        return t.to(DEVICE)

    x = make(*shape)
    weight = make(channels, positive=True) if with_weight else None
    bias = make(channels) if with_bias else None
    initial = (make(channels), make(channels, positive=True)) if with_running else None
    results = []
    for bn in (bntriton.batch_norm, F.batch_norm):
        running = tuple(t.clone() for t in initial) if with_running else (None, None)
        y = bn(x, *running, weight, bias, training=training, momentum=momentum, eps=eps)
        results.append((y, *running))
    count = max(x.numel() // max(channels, 1), 1)
    for name, a, b in zip(("y", "running_mean", "running_var"), *results):
        if b is not None:
            _assert_close(a, b, name, count, name)
