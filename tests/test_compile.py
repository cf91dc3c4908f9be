"""torch.compile, torch.library.opcheck, autocast, CUDA graphs and torch.export.

The four custom ops must behave like built-in operators for PyTorch's graph machinery:
fakes with the real outputs' shapes, dtypes and strides, correct mutation annotations,
autograd that traces, and no host synchronization anywhere in a training step.

Compiled, graphed, exported and eager runs launch the very same Triton kernels in the
same order; see ``SAME_KERNELS`` for what may still differ.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bntriton
from bntriton.verification import oracle
from bntriton.verification.bounds import EPS, bound_units, normwise_error, reduction_error

from conftest import DEVICE

ops = torch.ops.bntriton
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Compiled vs eager: the same kernels in the same order, so on CPU the results are
# bitwise equal.  What may differ are the torch ops around them (Inductor fuses and
# reorders them; a GPU may pick another convolution algorithm): allow the table's bound
# for one backward pass over a batch of the test net (4 x 4 x 4 values per channel).
SAME_KERNELS = dict(rtol=bound_units("dx", torch.float32, 64) * EPS[torch.float32],
                    atol=bound_units("dx", torch.float32, 64) * EPS[torch.float32])


class Net(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> flatten -> BatchNorm1d -> Linear: both module kinds,
    a channels_last 4-D input and a 2-D one, affine and not, momentum and ``None``."""

    def __init__(self, channels=4, size=4, momentum2d=0.1, momentum1d=None):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn2d = bntriton.BatchNorm2d(channels, momentum=momentum2d)
        self.bn1d = bntriton.BatchNorm1d(channels * size * size, momentum=momentum1d, affine=False)
        self.head = nn.Linear(channels * size * size, 3)

    def forward(self, x):
        x = F.relu(self.bn2d(self.conv(x)))
        return self.head(self.bn1d(torch.flatten(x, 1)))


def _batches(steps, batch=4, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, generator=gen) * 2 + 0.5
        target = torch.randn(batch, 3, generator=gen)
        out.append((x.to(DEVICE).contiguous(memory_format=torch.channels_last), target.to(DEVICE)))
    return out


def _make_net(**kwargs):
    torch.manual_seed(0)
    return Net(**kwargs).to(DEVICE)


def _train(model, params_of, batches, autocast_dtype=None):
    """SGD steps; returns each step's output and gradients."""
    opt = torch.optim.SGD(params_of.parameters(), lr=0.1)
    history = []
    for x, target in batches:
        opt.zero_grad(set_to_none=True)
        # Autocast around forward and loss only, as torch.amp prescribes (its cast cache
        # would otherwise keep serving weights from before the optimizer step).
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
            loss = F.mse_loss(out, target)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in params_of.named_parameters()}
        history.append((out.detach().clone(), grads))
        opt.step()
    return history


def _assert_same_state(actual: nn.Module, expected: nn.Module, **tol):
    """Parameters and buffers (running statistics, num_batches_tracked), by name."""
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        torch.testing.assert_close(actual_state[name], value, **tol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------ opcheck


def _param(c, dtype, offset=0.0):
    return (torch.rand(c, dtype=dtype, device=DEVICE) + 0.5 + offset).requires_grad_()


def _forward_sample(variant, dtype, param_dtype, layout):
    """(op, args) for one forward / backward variant on a small (2, 3, 2, 3) input."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 3, dtype=dtype, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = _param(3, param_dtype), _param(3, param_dtype, offset=-1.0)
    running_mean = torch.randn(3, dtype=param_dtype, device=DEVICE)
    running_var = torch.rand(3, dtype=param_dtype, device=DEVICE) + 0.5
    if variant == "train-affine":
        return ops.batch_norm_train, (x, w, b, 1e-5)
    if variant == "train-plain":
        return ops.batch_norm_train, (x, None, None, 1e-5)
    if variant == "eval-affine":
        return ops.batch_norm_eval, (x, w, b, running_mean, running_var, 1e-5)
    if variant == "eval-bias-only":
        return ops.batch_norm_eval, (x, None, b, running_mean, running_var, 1e-3)
    with torch.no_grad():
        _, mean_shifted, rstd, _, _, pivot = ops.batch_norm_train(x, w, b, 1e-5)
    # A contiguous gradient: for a channels_last x it comes in the other memory format,
    # and dx must still have x's.
    grad = torch.randn(x.shape, dtype=dtype, device=DEVICE)
    if variant == "backward-train":
        return ops.batch_norm_backward, (grad, x.detach(), w.detach(), None, mean_shifted, rstd, pivot)
    if variant == "backward-eval":
        return ops.batch_norm_backward, (grad, x.detach(), None, running_mean, torch.zeros_like(rstd), rstd,
                                         running_mean)
    assert variant == "eval-backward"  # the eval forward's own backward: rstd from the variance
    return ops.batch_norm_eval_backward, (grad, x.detach(), w.detach(), running_mean, running_var, 1e-5)


def _other_sample(variant):
    """(op, args) for the running-statistics update and the odd layouts and sizes."""
    torch.manual_seed(0)
    dtype = torch.float16 if variant.endswith("float16") else torch.float32
    running = (torch.zeros(3, dtype=dtype, device=DEVICE), torch.ones(3, dtype=dtype, device=DEVICE))
    stats = (torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE))
    if variant.startswith("update-momentum"):
        return ops.update_running_stats, (*running, None, *stats, 0.1)
    if variant.startswith("update-cumulative"):
        return ops.update_running_stats, (*running, torch.tensor(3, device=DEVICE), *stats, None)
    if variant == "train-sliced":  # neither layout: copied once inside
        sliced = torch.randn(4, 6, 5, device=DEVICE)[:, ::2].requires_grad_()
        return ops.batch_norm_train, (sliced, None, None, 1e-5)
    if variant == "train-2d-float64":
        x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
        return ops.batch_norm_train, (x, _param(3, torch.float64), None, 1e-5)
    empty = torch.randn(0, 3, 4, device=DEVICE, requires_grad=True)
    if variant == "train-empty":
        return ops.batch_norm_train, (empty, None, None, 1e-5)
    assert variant == "eval-empty"
    return ops.batch_norm_eval, (empty, None, None, *running, 1e-5)


# fp32; bf16 input with fp32 parameters (autocast's case); fp16 throughout.
_DTYPES = {"float32": (torch.float32, torch.float32), "bfloat16": (torch.bfloat16, torch.float32),
           "float16": (torch.float16, torch.float16)}
_VARIANTS = ("train-affine", "train-plain", "eval-affine", "eval-bias-only",
             "backward-train", "backward-eval", "eval-backward")
_OTHERS = ("update-momentum-float32", "update-cumulative-float32", "update-momentum-float16",
           "update-cumulative-float16", "train-sliced", "train-2d-float64", "train-empty", "eval-empty")


def _run_opcheck(op, args):
    # Schema (mutation annotations), fake tensors (shapes, dtypes, strides), autograd
    # registration and AOT dispatch with dynamic shapes, each against the real kernels.
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtypes", _DTYPES)
@pytest.mark.parametrize("variant", _VARIANTS)
def test_opcheck(variant, dtypes, layout):
    _run_opcheck(*_forward_sample(variant, *_DTYPES[dtypes], layout))


@pytest.mark.parametrize("variant", _OTHERS)
def test_opcheck_running_update_and_odd_inputs(variant):
    _run_opcheck(*_other_sample(variant))


_LAYOUTS = {
    "contiguous": lambda: torch.randn(4, 6, 5, 5),
    "channels_last": lambda: torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last),
    "sliced": lambda: torch.randn(4, 12, 5, 10)[:, ::2, :, ::2],  # neither format
    "sliced-channels-last": lambda: torch.randn(4, 5, 5, 12).permute(0, 3, 1, 2)[:, ::2],
    "permuted": lambda: torch.randn(4, 6, 5, 5).transpose(2, 3),  # dense, neither format
}


@pytest.mark.parametrize("path", ["single-read", "split"])
@pytest.mark.parametrize("layout", _LAYOUTS)
def test_real_output_strides_are_the_fakes_and_torchs(layout, path):
    """The ops' outputs have the strides their fakes promise (a traced graph relies on
    them: e.g. a view of a flattened activation), on the paths and tiles an H100 / H200
    runs, and the memory format torch's batch norm gives its output and input gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bntriton.kernels import forced_plan, plans

    torch.manual_seed(0)
    x = _LAYOUTS[layout]().to(DEVICE)
    c = x.shape[1]
    w, b = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    rm, rv = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
    dy = torch.randn(x.shape, device=DEVICE)  # contiguous whatever x's layout
    with plans.planned_for(132), forced_plan(path="fused" if path == "single-read" else "split"):
        y, mean_shifted, rstd, _, _, pivot = ops.batch_norm_train(x, w, b, 1e-5)
        real = {
            "train": y,
            "eval": ops.batch_norm_eval(x, w, b, rm, rv, 1e-5),
            "backward": ops.batch_norm_backward(dy, x, w, None, mean_shifted, rstd, pivot)[0],
        }
        with FakeTensorMode() as mode:
            fx, fw, fb, frm, frv, fdy = (mode.from_tensor(t) for t in (x, w, b, rm, rv, dy))
            fy, fmean_shifted, frstd, _, _, fpivot = ops.batch_norm_train(fx, fw, fb, 1e-5)
            fake = {
                "train": fy,
                "eval": ops.batch_norm_eval(fx, fw, fb, frm, frv, 1e-5),
                "backward": ops.batch_norm_backward(fdy, fx, fw, None, fmean_shifted, frstd, fpivot)[0],
            }
    xg = x.clone().requires_grad_()
    torch_y = F.batch_norm(xg, None, None, w, b, training=True)
    (torch_dx,) = torch.autograd.grad(torch_y, xg, dy)
    for name in real:
        assert real[name].stride() == fake[name].stride(), (name, real[name].stride(), fake[name].stride())
    assert real["train"].stride() == real["eval"].stride() == torch_y.stride(), (real["train"].stride(), torch_y.stride())
    assert real["backward"].stride() == torch_dx.stride()


# ------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_and_eval_match_eager(backend):
    eager = _make_net()
    compiled_net = copy.deepcopy(eager)
    # fullgraph=True: any graph break is an error.
    compiled = torch.compile(compiled_net, backend=backend, fullgraph=True)
    batches = _batches(3)

    expected = _train(eager, eager, batches)
    actual = _train(compiled, compiled_net, batches)
    for step, ((out, grads), (out_ref, grads_ref)) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(out, out_ref, **SAME_KERNELS, msg=lambda m: f"step {step}: {m}")
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], **SAME_KERNELS,
                                       msg=lambda m: f"step {step} grad {name}: {m}")
    # Running statistics (momentum 0.1 and cumulative) and num_batches_tracked.
    _assert_same_state(compiled_net, eager, **SAME_KERNELS)
    assert int(compiled_net.bn1d.num_batches_tracked) == len(batches)

    eager.eval()
    compiled.eval()
    x, _ = _batches(1, seed=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **SAME_KERNELS)


def test_compiled_with_dynamic_batch_size():
    # Symbolic shapes through the fakes (layout checks become guards, not errors).
    eager = _make_net()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (4, 6):
        x, _ = _batches(1, batch=batch)[0]
        torch.testing.assert_close(compiled(x), eager(x), **SAME_KERNELS)
    _assert_same_state(compiled_net, eager, **SAME_KERNELS)


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize(
    "device_type,dtype",
    [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
     pytest.param("cuda", torch.float16, id="cuda-fp16", marks=needs_cuda),
     pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=needs_cuda)],
)
def _errors_from_exact(inp, weight, bias, dy, results):
    """Each of ``results`` (y, dx, dweight, dbias, running_mean, running_var of one
    training step of a fresh BatchNorm2d) against the float64 oracle on the same rounded
    inputs, in units of its own dtype's eps, measured as bntriton's harness measures."""
    f64 = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    channels = inp.shape[1]
    fwd = oracle.forward(f64(inp), np.zeros(channels), np.ones(channels), f64(weight), f64(bias),
                         training=True, momentum=0.1)
    bwd = oracle.backward(f64(dy), f64(inp), fwd.mean, fwd.var, f64(weight), training=True)
    y, dx, dweight, dbias, running_mean, running_var = results
    return {
        "y": normwise_error(y, fwd.y, y.dtype),
        "dx": normwise_error(dx, bwd.dx, dx.dtype, bwd.dx_scale),
        "dweight": reduction_error(dweight, bwd.dweight, bwd.dweight_scale, dweight.dtype),
        "dbias": reduction_error(dbias, bwd.dbias, bwd.dbias_scale, dbias.dtype),
        "running_mean": normwise_error(running_mean, fwd.running_mean, running_mean.dtype,
                                       fwd.running_mean_magnitude),
        "running_var": normwise_error(running_var, fwd.running_var, running_var.dtype),
    }


@pytest.mark.parametrize(
    "device_type,dtype",
    [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
     pytest.param("cuda", torch.float16, id="cuda-fp16", marks=needs_cuda),
     pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=needs_cuda)],
)
def test_autocast_dtypes_match_torch(device_type, dtype):
    """Batch norm is on neither autocast list: it runs in whatever dtype reaches it, with
    fp32 parameters.  Ours matches torch's dtypes: low-precision input -> low-precision
    output and fp32 statistics and parameter gradients; fp32 input stays fp32.  Ours is
    within the table's bounds of the float64 oracle on the same rounded inputs; so is
    torch's on CPU.  (On CUDA torch reduces half-precision dweight / dbias in low
    precision, thousands of eps from the exact result: there only its dtypes are checked.)"""
    device = torch.device(device_type)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, generator=gen) * 3 + 1).to(device)
    dy = torch.randn(4, 3, 5, 5, generator=gen).to(device)
    count = x.numel() // x.shape[1]
    for low_precision_input in (True, False):
        results = []
        for cls in (bntriton.BatchNorm2d, nn.BatchNorm2d):
            torch.manual_seed(0)
            bn = cls(3).to(device)
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-1, 1)
            # A leaf of its own for each module (x itself would gather both gradients).
            inp = (x.to(dtype) if low_precision_input else x.clone()).requires_grad_()
            with torch.autocast(device_type, dtype=dtype):
                y = bn(inp)
            dy_rounded = dy.to(y.dtype)
            y.backward(dy_rounded)
            outputs = (y, inp.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
            errors = _errors_from_exact(inp, bn.weight, bn.bias, dy_rounded, outputs)
            results.append((outputs, errors))
        (ours, our_errors), (theirs, their_errors) = results
        names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
        for name, a, b in zip(names, ours, theirs):
            assert a.dtype == b.dtype, f"{name}: {a.dtype} vs torch's {b.dtype}"
            bound = bound_units(name, a.dtype, count)
            assert our_errors[name] <= bound, f"{name}: {our_errors[name]:.2f} eps from exact (bound {bound:.1f})"
            if device.type == "cpu":
                assert their_errors[name] <= bound, (
                    f"torch's {name}: {their_errors[name]:.2f} eps from exact (bound {bound:.1f})")


def test_compiled_under_autocast_matches_eager():
    eager = _make_net()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, backend="aot_eager", fullgraph=True)
    batches = _batches(2)
    expected = _train(eager, eager, batches, autocast_dtype=torch.bfloat16)
    actual = _train(compiled, compiled_net, batches, autocast_dtype=torch.bfloat16)
    for (out, grads), (out_ref, grads_ref) in zip(actual, expected):
        assert out.dtype == out_ref.dtype == torch.bfloat16
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        for name in grads_ref:
            assert grads[name].dtype == torch.float32
            torch.testing.assert_close(grads[name], grads_ref[name], **SAME_KERNELS)
    _assert_same_state(compiled_net, eager, **SAME_KERNELS)


# --------------------------------------------------------------- no host synchronization

_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.interpreter_only("the native CPU path reads CPU values on the host by design: no device to sync with")
def test_training_step_never_reads_device_values_on_the_host(monkeypatch):
    """A host read of a device value (``.item()``, ``if tensor:``, ``int(tensor)``) is a
    synchronization on CUDA and breaks CUDA-graph capture.  CPU has no sync detector, so
    the test makes every such read raise during a forward/backward in training mode
    (momentum and cumulative running statistics) and a forward in eval mode."""
    model = _make_net()
    (x, target), = _batches(1)
    F.mse_loss(model(x), target).backward()  # first call: kernel compilation, caches

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read a device value on the host")
        return read

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    with pytest.raises(AssertionError):  # the trap works
        bool(torch.ones(1, device=DEVICE))
    if CUDA:
        torch.cuda.set_sync_debug_mode("error")
    try:
        F.mse_loss(model(x), target).backward()
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.undo()
    assert int(model.bn2d.num_batches_tracked) == 2


# -------------------------------------------------------------------------- CUDA graphs


@needs_cuda
@torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)  # one conv algorithm
def test_cuda_graph_training_step_matches_eager():
    """Capture forward + backward + SGD step of a net with bntriton layers in one CUDA
    graph, replay it on new data and compare with the same steps run eagerly.  Capture
    itself fails on any host synchronization; the eager steps run under sync debug mode."""
    eager = _make_net()
    graphed = copy.deepcopy(eager)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_graphed = torch.optim.SGD(graphed.parameters(), lr=0.1)
    batches = _batches(6)
    warmup = 2

    def step(model, opt, x, target):
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    def eager_step(x, target):
        opt_eager.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = F.mse_loss(eager(x), target)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt_eager.step()
        return loss.detach()

    # Warm-up on a side stream (Triton compiles its kernels on first launch), as
    # torch.cuda.graphs' documentation prescribes; these are real training steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, target in batches[:warmup]:
            opt_graphed.zero_grad(set_to_none=True)
            step(graphed, opt_graphed, x, target)
    torch.cuda.current_stream().wait_stream(side)
    for x, target in batches[:warmup]:
        eager_step(x, target)

    static_x, static_target = (t.clone() for t in batches[warmup])
    graph = torch.cuda.CUDAGraph()
    opt_graphed.zero_grad(set_to_none=True)  # backward in the capture allocates static grads
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_graphed, static_x, static_target)

    for x, target in batches[warmup:]:
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        loss = eager_step(x, target)
        torch.testing.assert_close(static_loss, loss, **SAME_KERNELS)
    torch.cuda.synchronize()
    _assert_same_state(graphed, eager, **SAME_KERNELS)
    assert int(graphed.bn1d.num_batches_tracked) == len(batches)


class ResidualNet(nn.Module):
    """A residual block of fused layers, then a plain one: BatchNormAct2d(relu), then
    BatchNormAct2d(relu) after a residual (the 1-bit mask), then BatchNorm2d."""

    def __init__(self, channels=4, size=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = bntriton.BatchNormAct2d(channels, activation="relu")
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = bntriton.BatchNormAct2d(channels, activation="relu")
        self.bn3 = bntriton.BatchNorm2d(channels)
        self.head = nn.Linear(channels * size * size, 3)

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        h = self.bn2(self.conv2(h), residual=h)
        return self.head(torch.flatten(self.bn3(h), 1))


@needs_cuda
@torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)  # one conv algorithm
@pytest.mark.parametrize("capture", ["cuda.graph", "make_graphed_callables"])
def test_cuda_graph_training_step_with_fused_layers_matches_eager(capture):
    """Plain and fused layers (activation, residual, mask) in a captured training step,
    replayed on new data: the same losses, parameters and running statistics as eager
    steps.  ``cuda.graph`` captures forward, backward and the SGD step whole;
    ``make_graphed_callables`` captures the model's forward and backward as autograd
    knows them (its warm-up runs forward and backward on the sample input, which eager
    steps mirror)."""
    torch.manual_seed(0)
    eager = ResidualNet().to(DEVICE).to(memory_format=torch.channels_last)
    graphed = copy.deepcopy(eager)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_graphed = torch.optim.SGD(graphed.parameters(), lr=0.1)
    batches = _batches(6)
    warmup = 3

    def eager_step(x, target):
        opt_eager.zero_grad(set_to_none=True)
        loss = F.mse_loss(eager(x), target)
        loss.backward()
        opt_eager.step()
        return loss.detach()

    static_x, static_target = (t.clone() for t in batches[warmup])
    if capture == "make_graphed_callables":
        # Its warm-up: forward and backward on the sample input, no optimizer step.
        for _ in range(warmup):
            F.mse_loss(eager(static_x), static_target).backward()
        opt_eager.zero_grad(set_to_none=True)
        model = torch.cuda.make_graphed_callables(graphed, (static_x,), num_warmup_iters=warmup)
        opt_graphed.zero_grad(set_to_none=True)
        for x, target in batches[warmup:]:
            opt_graphed.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt_graphed.step()
            torch.testing.assert_close(loss.detach(), eager_step(x, target), **SAME_KERNELS)
    else:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x, target in batches[:warmup]:
                opt_graphed.zero_grad(set_to_none=True)
                F.mse_loss(graphed(x), target).backward()
                opt_graphed.step()
        torch.cuda.current_stream().wait_stream(side)
        for x, target in batches[:warmup]:
            eager_step(x, target)
        graph = torch.cuda.CUDAGraph()
        opt_graphed.zero_grad(set_to_none=True)  # backward in the capture allocates static grads
        with torch.cuda.graph(graph):
            static_loss = F.mse_loss(graphed(static_x), static_target)
            static_loss.backward()
            opt_graphed.step()
        for x, target in batches[warmup:]:
            static_x.copy_(x)
            static_target.copy_(target)
            graph.replay()
            torch.testing.assert_close(static_loss.detach(), eager_step(x, target), **SAME_KERNELS)
    torch.cuda.synchronize()
    _assert_same_state(graphed, eager, **SAME_KERNELS)
    assert int(graphed.bn2.num_batches_tracked) == int(eager.bn2.num_batches_tracked) > len(batches) - warmup


# ------------------------------------------------------------------------- torch.export


def _bntriton_ops(exported) -> set:
    """Our ops in an exported graph, also where functionalization wrapped a mutating op
    in ``auto_functionalized(op, ...)`` (the ATen IR that run_decompositions() gives)."""
    found = set()
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        for target in (node.target, node.args[0] if node.args else None):
            if "bntriton" in str(target):
                found.add(str(target))
    return found


def test_export_eval_matches_eager():
    model = _make_net()
    with torch.no_grad():
        for x, _ in _batches(2):
            model(x)  # non-trivial running statistics
    model.eval()
    (x, _), = _batches(1, seed=1)
    exported = torch.export.export(model, (x,))
    # Eval is recorded as standard operations (bntriton/ops/traceable.py): the exported
    # program runs where bntriton is not installed (ONNX, AOTInductor; tests/test_deploy.py).
    assert _bntriton_ops(exported) == set()
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), **SAME_KERNELS)


@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "aten-ir"])
def test_export_training_updates_running_stats_like_eager(decompose):
    """The training IR keeps update_running_stats in place; run_decompositions() gives the
    functional ATen form (the op wrapped in auto_functionalized, the statistics returned
    as buffer mutations that the module writes back).  Both must train like eager."""
    model = _make_net()
    reference = copy.deepcopy(model)
    (x, _), = _batches(1)
    program = torch.export.export(model, (x,))
    # Tracing ran on fake tensors: the model's own state is untouched.
    _assert_same_state(model, reference, rtol=0, atol=0)
    if decompose:
        program = program.run_decompositions()
    assert {"bntriton.batch_norm_train.default",
            "bntriton.update_running_stats.default"} <= _bntriton_ops(program)
    module = program.module()  # shares the model's parameter and buffer tensors
    # torch.export traces with cuDNN turned off (torch/export/_trace.py,
    # _ignore_backend_decomps): on CUDA its fake convolution is the slow path's, with a
    # contiguous output, and the ATen graph bakes that layout in (a view of the flattened
    # activation), where cuDNN at run time returns channels_last for a channels_last
    # input.  The same holds with torch's own batch norm; the program runs as it was traced.
    with torch.backends.cudnn.flags(enabled=False):
        out = module(x)
    torch.testing.assert_close(out, reference(x), **SAME_KERNELS)
    _assert_same_state(module, reference, **SAME_KERNELS)
