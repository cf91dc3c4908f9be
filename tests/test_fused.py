"""Batch norm with a fused epilogue: act(BN(x) + residual), in-place activated batch norm,
BatchNormAct modules and convert_model(fuse=True).

Every activation, residual on and off, each layout and dtype against the float64
composition (a sampled cross product, tiny shapes: the interpreter is slow); gradcheck in
fp64; the bytes kept for backward; fused networks against unfused ones.
"""
from __future__ import annotations

import copy
import itertools
import operator
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bntriton
from bntriton.kernels import forced_plan
from bntriton.verification import activated as act_oracle
from bntriton.verification.bounds import (
    EPS, bound_units, normwise_error, recovery_condition, reduction_error,
)
from bntriton.verification.memory import saved_bytes

from conftest import DEVICE

ACTIVATIONS = [None, "relu", "leaky_relu", "silu", "gelu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = {  # rows not a multiple of 8, so the 1-bit mask's last byte is partial
    "2d": (12, 5), "nchw": (3, 5, 3, 4), "channels_last": (3, 5, 3, 4), "3d": (2, 5, 3, 1, 3),
}
LAYOUTS = list(SHAPES)
TORCH_ACT = {None: lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
             "silu": F.silu, "gelu": F.gelu}
SLOPE = 0.2


def _cases():
    """(activation, residual, layout, dtype, training, path): each combination of activation
    and residual once, layouts, dtypes, train / eval and the two kernel paths cycled."""
    combos = [(a, r) for a, r in itertools.product(ACTIVATIONS, [False, True]) if a or r]
    for i, (act, res) in enumerate(combos):
        yield act, res, LAYOUTS[i % 4], DTYPES[i % 3], i % 3 != 2, "split" if i % 2 else None
    # Both paths for the mask (ReLU after a residual) in training, in the half dtypes.
    yield "relu", True, "channels_last", torch.bfloat16, True, "split"
    yield "leaky_relu", True, "nchw", torch.float16, True, None
    # Row tiles of 8 or more read the mask a byte at a time (activations.load_mask_channels_rows):
    # several tiles and splits, and a partial last byte (36 rows).
    yield "relu", True, "nchw", torch.float32, True, "split8"
    yield "leaky_relu", True, "channels_last", torch.bfloat16, True, "split8"
    # The backward in two launches (its epilogue sums the splits itself), with the mask and
    # the residual, an activation recomputed from z, and the eval backward's coefficients.
    yield "relu", True, "nchw", torch.float32, True, "split8-sums"
    yield "silu", False, "channels_last", torch.bfloat16, True, "split8-sums"
    yield "gelu", True, "2d", torch.float16, False, "split8-sums"


def _tensor(shape, layout, dtype, gen, scale=1.0, offset=0.0):
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    t = t.to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(DEVICE)


def _path(path):
    if path == "split8":
        return forced_plan(path="split", block_rows=8, num_splits=2, backward_sums="combine")
    if path == "split8-sums":
        return forced_plan(path="split", block_rows=8, num_splits=2, backward_sums="epilogue")
    return forced_plan(path="split", block_rows=4) if path == "split" else forced_plan()


@pytest.mark.parametrize("act,res,layout,dtype,training,path", list(_cases()))
def test_matches_float64_composition(act, res, layout, dtype, training, path):
    # A seed per case that is the same in every run (str hashes are salted per process).
    gen = torch.Generator().manual_seed(zlib.crc32(repr((act, res, layout, dtype, training)).encode()))
    shape = SHAPES[layout]
    c = shape[1]
    x = _tensor(shape, layout, dtype, gen, 2.0, 0.5).requires_grad_()
    r = _tensor(shape, layout, dtype, gen).requires_grad_() if res else None
    w = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    b = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    rm, rv = torch.randn(c, generator=gen).to(DEVICE), (torch.rand(c, generator=gen) + 0.5).to(DEVICE)
    rm0, rv0 = rm.clone(), rv.clone()
    dy = _tensor(shape, layout, dtype, gen)
    with _path(path):
        y = bntriton.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5,
                                activation=act, residual=r, negative_slope=SLOPE)
        inputs = [x, w, b] + ([r] if res else [])
        grads = torch.autograd.grad(y, inputs, dy)

    f64 = lambda t: None if t is None else t.detach().cpu().double().numpy()  # noqa: E731
    ref = act_oracle.forward_backward(
        f64(x), f64(rm0), f64(rv0), f64(w), f64(b), training, 0.1, 1e-5, act, f64(r), SLOPE, f64(dy))
    count = x.numel() // c
    assert y.dtype == dtype and y.stride() == x.stride()
    assert normwise_error(y, ref.y, dtype, magnitude=ref.z) <= bound_units("y_act", dtype, count)
    dx, dw, db = grads[:3]
    assert dx.stride() == x.stride()  # a channels_last input gets a channels_last gradient
    assert normwise_error(dx, ref.backward.dx, dtype, ref.backward.dx_scale) <= bound_units("dx_act", dtype, count)
    assert reduction_error(dw, ref.backward.dweight, ref.backward.dweight_scale, torch.float32) <= bound_units(
        "dweight_act", torch.float32, count)
    assert reduction_error(db, ref.backward.dbias, ref.backward.dbias_scale, torch.float32) <= bound_units(
        "dbias_act", torch.float32, count)
    if res:
        assert normwise_error(grads[3], ref.dz, dtype) <= bound_units("dresidual", dtype, count)
    if training:
        assert normwise_error(rm, ref.forward.running_mean, torch.float32,
                              ref.forward.running_mean_magnitude) <= bound_units("running_mean", torch.float32, count)
        assert normwise_error(rv, ref.forward.running_var, torch.float32) <= bound_units(
            "running_var", torch.float32, count)
    else:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("act,res,training", [
    ("relu", True, True), ("leaky_relu", False, True), ("silu", True, True), ("gelu", False, True),
    ("gelu", True, False), (None, True, True),
])
def test_gradcheck_fp64(act, res, training):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64) + 0.3).to(DEVICE).requires_grad_()
    r = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_() if res else None
    w = torch.randn(2, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    rm = torch.randn(2, generator=gen, dtype=torch.float64).to(DEVICE)
    rv = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)

    def fn(x, w, b, *r):
        return bntriton.batch_norm(x, None if training else rm, None if training else rv, w, b, training,
                                   activation=act, residual=r[0] if r else None, negative_slope=SLOPE)

    # fast_mode: random projections of the Jacobian, a few forward passes instead of one per input.
    assert torch.autograd.gradcheck(fn, (x, w, b) + ((r,) if res else ()), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 6), (65, 3, 2, 2)])
def test_no_activation_and_no_residual_is_plain_batch_norm_bit_for_bit(shape, dtype):
    """BatchNormAct with activation=None and no residual runs plain batch norm's path:
    outputs, gradients and running statistics equal BatchNorm's, bit for bit."""
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 3 + 2).to(DEVICE, dtype)
    plain_cls = bntriton.BatchNorm1d if len(shape) == 2 else bntriton.BatchNorm2d
    act_cls = bntriton.BatchNormAct1d if len(shape) == 2 else bntriton.BatchNormAct2d
    plain, act = plain_cls(shape[1]).to(DEVICE, dtype), act_cls(shape[1], activation=None).to(DEVICE, dtype)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5, generator=g)
        plain.bias.uniform_(-1, 1, generator=g)
    act.load_state_dict(plain.state_dict())
    for training in (True, False):
        plain.train(training), act.train(training)
        xp, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
        yp, ya = plain(xp), act(xa)
        dy = torch.randn(yp.shape, generator=g).to(DEVICE, dtype)
        gp = torch.autograd.grad(yp, (xp, plain.weight, plain.bias), dy)
        ga = torch.autograd.grad(ya, (xa, act.weight, act.bias), dy)
        for ours, theirs in zip((ya, *ga, act.running_mean, act.running_var),
                                (yp, *gp, plain.running_mean, plain.running_var)):
            assert torch.equal(ours, theirs)


def test_double_backward_raises_clearly():
    x = torch.randn(4, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = bntriton.batch_norm(x, None, None, training=True, activation="silu")
    # Raised as soon as a graph of the backward is asked for, before any second pass.
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("kwargs,error", [
    (dict(activation="tanh"), ValueError), (dict(activation="relu", negative_slope="a"), TypeError),
    (dict(residual=torch.zeros(4, 2)), ValueError),
    (dict(residual=torch.zeros(4, 3, dtype=torch.float64)), TypeError),
])
def test_bad_epilogue_arguments_raise_and_change_nothing(kwargs, error):
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(error):
        bntriton.batch_norm(torch.randn(4, 3, device=DEVICE), rm, rv, training=True, **kwargs)
    assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))


# ------------------------------------------------------------------- in-place ABN

@pytest.mark.parametrize("act,layout,dtype,training,path", [
    ("leaky_relu", "nchw", torch.float32, True, None),
    ("leaky_relu", "channels_last", torch.bfloat16, True, "split"),
    (None, "2d", torch.float16, True, "split"),
    ("leaky_relu", "3d", torch.float32, False, None),
])
def test_inplace_abn_matches_the_unfused_composition(act, layout, dtype, training, path):
    gen = torch.Generator().manual_seed(11)
    shape = SHAPES[layout]
    c = shape[1]
    base = _tensor(shape, layout, dtype, gen, 2.0, 0.5)
    # Weights away from zero and moderate biases: the recovery condition stays small.
    w = (torch.rand(c, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    b = (torch.rand(c, generator=gen) - 0.5).to(DEVICE).requires_grad_()
    dy = _tensor(shape, layout, dtype, gen)

    def run(inplace):
        bn = bntriton.BatchNormAct2d(c, activation=act, negative_slope=SLOPE, inplace=inplace).to(DEVICE)
        bn.forward = bntriton.BatchNormAct2d.forward.__get__(bn)
        bn._check_input_dim = lambda t: None
        bn.weight, bn.bias = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
        bn.train(training)
        leaf = base.clone().requires_grad_()
        x = leaf * 1.0  # a non-leaf, as after a convolution
        with _path(path):
            y = bn(x)
            y.backward(dy)
        return bn, x, y, leaf.grad

    bn_in, x_in, y_in, dx_in = run(True)
    bn_out, _, y_out, dx_out = run(False)
    assert y_in.data_ptr() == x_in.data_ptr()  # the output lives in the input's storage
    count = base.numel() // c
    assert torch.equal(y_in, y_out)
    assert torch.equal(bn_in.running_mean, bn_out.running_mean)
    cond = recovery_condition(w, b, float(y_out.detach().abs().max()), 1.0)
    for got, want, quantity in ((dx_in, dx_out, "dx_act"), (bn_in.weight.grad, bn_out.weight.grad, "dweight_act"),
                                (bn_in.bias.grad, bn_out.bias.grad, "dbias_act")):
        # x_hat is recovered from the output rounded to the input dtype, so every gradient
        # (fp32 dweight / dbias included) is only as accurate as that dtype, times the
        # recovery condition.  Both results are within their bound of the exact answer,
        # so within the sum of the bounds of each other.
        err = normwise_error(got, want, dtype)
        assert err <= (1 + cond) * bound_units(quantity, dtype, count)


def test_inplace_abn_refuses_what_it_cannot_invert():
    with pytest.raises(ValueError, match="invertible"):
        bntriton.BatchNormAct2d(3, activation="relu", inplace=True)
    with pytest.raises(ValueError, match="negative_slope"):
        bntriton.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.0, inplace=True)
    bn = bntriton.BatchNormAct2d(3, activation="leaky_relu", inplace=True).to(DEVICE)
    x = torch.randn(2, 3, 2, 2, device=DEVICE, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match="residual"):
        bn(x, torch.randn_like(x))
    with torch.no_grad():
        bn.weight[1] = 0.0
    counter = bn.num_batches_tracked.clone()
    with pytest.raises(ValueError, match="zero"):
        bn(x)
    assert torch.equal(bn.num_batches_tracked, counter)


# ------------------------------------------------------------- bytes kept for backward

def _bytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bytes_kept_for_backward(layout):
    shape = (4, 8, 5, 3)  # 60 rows: the mask's last byte is partial
    c = shape[1]
    gen = torch.Generator().manual_seed(5)
    per_channel = 16 * c * 8  # O(C): a handful of per-channel fp32 / fp64 vectors
    x0 = _tensor(shape, layout, torch.float32, gen).requires_grad_()
    r = _tensor(shape, layout, torch.float32, gen).requires_grad_()
    B = _bytes(x0)

    bn_act = bntriton.BatchNormAct2d(c, activation="relu").to(DEVICE)
    kept, _ = saved_bytes(lambda: bn_act(x0 * 1.0))
    assert kept <= B + per_channel
    kept, _ = saved_bytes(lambda: bn_act(x0 * 1.0, r))
    assert kept <= B + -(-x0.numel() // c // 8) * c + per_channel
    kept, _ = saved_bytes(lambda: bntriton.BatchNormAct2d(c, activation="gelu").to(DEVICE)(x0 * 1.0))
    assert kept <= B + per_channel
    abn = bntriton.BatchNormAct2d(c, activation="leaky_relu", inplace=True).to(DEVICE)
    kept, _ = saved_bytes(lambda: abn(x0 * 1.0))  # the input's storage counts: it is the output
    assert kept <= B + per_channel
    # torch eager keeps x for the batch norm and the output for the ReLU: 2B.
    bn = nn.BatchNorm2d(c).to(DEVICE)
    kept, _ = saved_bytes(lambda: F.relu(bn(x0 * 1.0)))
    assert kept >= 2 * B


# ------------------------------------------------------------ convert_model(fuse=True)

class BasicBlock(nn.Module):
    def __init__(self, c, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) if downsample else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, c, mid):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return F.relu(torch.add(self.bn3(self.conv3(out)), x))


class ResNetish(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.SiLU()
        self.block1, self.block2 = BasicBlock(c, downsample=True), Bottleneck(c, 2)
        self.bn1d, self.gelu, self.head = nn.BatchNorm1d(c), nn.GELU(), nn.Linear(c, 2)

    def forward(self, x):
        x = self.block2(self.block1(self.act(self.bn(self.stem(x)))))
        return self.head(self.gelu(self.bn1d(x.mean((2, 3)))))


def _activation_and_add_nodes(gm):
    """The activation and add nodes left in a traced graph."""
    functions = {F.relu, torch.relu, F.leaky_relu, F.silu, F.gelu, operator.add, operator.iadd, torch.add}
    modules = (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU)
    return [
        node for node in gm.graph.nodes
        if (node.op == "call_function" and node.target in functions)
        or (node.op == "call_method" and node.target in ("relu", "relu_", "add", "add_"))
        or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), modules))
    ]


def test_fuse_resnet_style_net_matches_unfused_in_train_and_eval():
    torch.manual_seed(0)
    reference = ResNetish().to(DEVICE).double()
    fused = bntriton.convert_model(copy.deepcopy(reference), fuse=True)
    assert isinstance(fused, torch.fx.GraphModule)
    kinds = [type(m).__name__ for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds.count("BatchNormAct2d") == 6 and kinds.count("BatchNormAct1d") == 1 and "BatchNorm2d" in kinds
    assert _activation_and_add_nodes(fused) == []
    assert fused.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 3, 4, 4, device=DEVICE, dtype=torch.float64)
    for training in (True, False):
        fused.train(training)
        reference.train(training)
        out, want = fused(x), reference(x)
        out.square().sum().backward()
        want.square().sum().backward()
        # Seven batch norms in sequence, each within its fp64 bound; the convolutions and
        # the head between them are torch's own on both sides.
        tol = 7 * bound_units("dx_act", torch.float64, x.numel() // 3) * EPS[torch.float64]
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        grads = dict(fused.named_parameters())
        for name, p in reference.named_parameters():
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=tol, atol=tol)
            p.grad = None
            grads[name].grad = None
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(dict(fused.named_buffers())[name], buf, rtol=tol, atol=tol)


def test_fuse_falls_back_with_a_reason_when_tracing_fails():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return F.relu(self.bn(x)) if x.sum() > 0 else self.bn(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = bntriton.convert_model(Branchy(), fuse=True)
    assert any("could not trace" in str(w.message) for w in caught)
    assert isinstance(model.bn, bntriton.BatchNorm1d)


def test_compiled_fused_model_fullgraph_matches_eager():
    torch.manual_seed(1)
    # One block keeps the tracing time down; both patterns (BN -> ReLU, BN -> add -> ReLU).
    fused = bntriton.convert_model(BasicBlock(3, downsample=True).to(DEVICE), fuse=True)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    assert _activation_and_add_nodes(fused) == []
    out_c = compiled(x)
    out_c.sum().backward()
    grads_c = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    fused.load_state_dict(state)
    out_e = fused(x)
    out_e.sum().backward()
    # The same kernels in the same order; Inductor may reorder the torch ops between them:
    # the table's bound per batch norm, three of them in sequence.
    tol = 3 * bound_units("dx_act", torch.float32, 32) * EPS[torch.float32]
    torch.testing.assert_close(out_c, out_e, rtol=tol, atol=tol)
    for g_c, p in zip(grads_c, fused.parameters()):
        torch.testing.assert_close(g_c, p.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("act,res,layout", [("relu", True, "channels_last"), ("gelu", True, "nchw"),
                                            ("leaky_relu", False, "2d")])
def test_opcheck_activated_ops(act, res, layout):
    from bntriton.kernels.activations import activation_code

    gen = torch.Generator().manual_seed(2)
    shape = SHAPES[layout]
    c = shape[1]
    x = _tensor(shape, layout, torch.float32, gen).requires_grad_()
    r = _tensor(shape, layout, torch.float32, gen).requires_grad_() if res else None
    w = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    b = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    rm, rv = torch.randn(c, generator=gen).to(DEVICE), (torch.rand(c, generator=gen) + 0.5).to(DEVICE)
    code = activation_code(act)
    ops = torch.ops.bntriton
    torch.library.opcheck(ops.batch_norm_act_train, (x, w, b, r, 1e-5, code, SLOPE))
    torch.library.opcheck(ops.batch_norm_act_eval, (x, w, b, rm, rv, r, 1e-5, code, SLOPE))
    with torch.no_grad():
        _, mean_shifted, rstd, _, _, mask, pivot, act_scale, act_shift = ops.batch_norm_act_train(
            x, w, b, r, 1e-5, code, SLOPE)
    grad = _tensor(shape, layout, torch.float32, gen)
    residual = None if r is None else r.detach()
    torch.library.opcheck(ops.batch_norm_act_backward, (
        grad, x.detach(), w.detach(), act_scale, act_shift, None, mean_shifted, rstd, pivot, mask, residual,
        code, SLOPE, res, False))


# ------------------------------------------------------------------ native CPU path

@pytest.mark.skipif(DEVICE != "cpu", reason="the native path is for CPU tensors")
@pytest.mark.parametrize("act,res,layout,dtype,training", [
    ("relu", True, "channels_last", torch.float32, True), ("leaky_relu", True, "3d", torch.bfloat16, False),
    ("silu", True, "nchw", torch.float16, True), ("gelu", False, "2d", torch.float32, True),
    (None, True, "nchw", torch.float32, False),
])
def test_native_cpu_path_matches_float64_composition_and_the_kernels_mask(act, res, layout, dtype, training):
    with bntriton.cpu_backend("native"):
        test_matches_float64_composition(act, res, layout, dtype, training, None)
    if res and act in ("relu", "leaky_relu"):
        from bntriton.ops import activated as fused_ops

        gen = torch.Generator().manual_seed(4)
        x = _tensor(SHAPES[layout], layout, dtype, gen)
        r = _tensor(SHAPES[layout], layout, dtype, gen)
        w, b = torch.randn(x.shape[1], generator=gen), torch.randn(x.shape[1], generator=gen)
        masks = []
        for backend in ("native", "interpreter"):
            with bntriton.cpu_backend(backend):
                masks.append(fused_ops._train_impl(x, w, b, r, 1e-5, 1 if act == "relu" else 2, SLOPE)[5])
        assert torch.equal(masks[0], masks[1])  # the same bit layout on both paths


@pytest.mark.skipif(DEVICE != "cpu", reason="the native path is for CPU tensors")
def test_native_cpu_inplace_abn_matches_out_of_place():
    with bntriton.cpu_backend("native"):
        test_inplace_abn_matches_the_unfused_composition("leaky_relu", "channels_last", torch.float32, True, None)
        test_inplace_abn_matches_the_unfused_composition(None, "nchw", torch.bfloat16, False, None)


@pytest.mark.parametrize("path", ["split", "fused"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_training_forward_updates_running_stats_in_its_own_launches(path, momentum):
    # The activated training forward folds the running-statistics update into the
    # statistics' launches as the plain one does: as many launches as plain batch norm,
    # and the very same running statistics and counter, bit for bit (same kernels).
    from bntriton.kernels.runtime import DualKernel

    launches = []
    original = DualKernel.__getitem__

    def counting(self, grid):
        launch = original(self, grid)

        def run(*args, **meta):
            launches.append(self.fn.__name__)
            return launch(*args, **meta)

        return run

    x = (torch.randn(4, 5, 3, 4, device=DEVICE) * 2 + 3).requires_grad_()
    plain = bntriton.BatchNorm2d(5, momentum=momentum).to(DEVICE)
    fused = bntriton.BatchNormAct2d(5, activation="relu", momentum=momentum).to(DEVICE)
    counts = []
    with forced_plan(path=path):
        for module in (plain, fused):
            for _ in range(2):  # the second step averages into non-trivial running values
                launches.clear()
                DualKernel.__getitem__ = counting
                try:
                    module(x)
                finally:
                    DualKernel.__getitem__ = original
            counts.append(list(launches))
    from bntriton import dispatch

    assert dispatch.native(x) or counts[0], "the kernels ran"
    assert counts[0] == counts[1], counts
    # The update is folded into the statistics' launches, the cumulative average's too.
    assert "_running_update_kernel" not in counts[1], counts
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(plain, name), getattr(fused, name)), name


@pytest.mark.skipif(DEVICE != "cpu", reason="the native path is for CPU tensors")
@pytest.mark.parametrize("act,res,dtype", [
    ("relu", True, torch.float32), ("leaky_relu", False, torch.float64), ("silu", True, torch.float32),
    ("gelu", True, torch.float64), (None, True, torch.float32), ("relu", True, torch.bfloat16),
])
def test_native_cpu_inference_composes_torchs_eval_in_place(act, res, dtype, monkeypatch):
    """Eval that autograd does not record runs fp32 / fp64 as torch's eval plus the
    residual and activation in place (native_act._eval_in_place), within the y_act bound
    at an offset where torch's eval folds (4 running stds) and where the exact shift runs
    (1e4); with a gradient to take, or for fp16 / bf16, the exact composition runs.  The
    kernels (interpreter) take the same calls without the mask the backward would read."""
    from bntriton.native import activations as native_act

    calls = []
    original = native_act._eval_in_place
    monkeypatch.setattr(native_act, "_eval_in_place", lambda *a: calls.append(1) or original(*a))
    gen = torch.Generator().manual_seed(zlib.crc32(repr((act, res, dtype)).encode()))
    shape, c = (4, 6, 5, 7), 6
    for offset in (4.0, 1e4):
        rv = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
        rm = offset * rv.sqrt() * torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).double()
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * rv.sqrt().view(1, -1, 1, 1)
             + rm.view(1, -1, 1, 1)).to(dtype)
        r = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if res else None
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.randn(c, generator=gen, dtype=pdtype)
        b = torch.randn(c, generator=gen, dtype=pdtype)
        stats = rm.to(pdtype), rv.to(pdtype)
        for needs_grad, backend in itertools.product((False, True), ("native", "interpreter")):
            calls.clear()
            with bntriton.cpu_backend(backend):
                y = bntriton.batch_norm(x, *stats, w.clone().requires_grad_(needs_grad), b, False, 0.1, 1e-5,
                                        activation=act, residual=r, negative_slope=SLOPE)
            assert len(calls) == (not needs_grad and dtype != torch.bfloat16 and backend == "native")
            f64 = lambda t: None if t is None else t.detach().double().numpy()  # noqa: E731
            ref = act_oracle.forward_backward(f64(x), f64(stats[0]), f64(stats[1]), f64(w), f64(b), False, 0.1,
                                              1e-5, act, f64(r), SLOPE, f64(torch.ones_like(x)))
            assert y.dtype == dtype and y.stride() == x.stride()
            error = normwise_error(y, ref.y, dtype, magnitude=ref.z)
            assert error <= bound_units("y_act", dtype, x.numel() // c), (offset, needs_grad, error)


@pytest.mark.interpreter_only("pins the kernels' fma, plans and launches; the native path forms z with torch ops")
@pytest.mark.parametrize("path", ["split", "fused"])
def test_fused_training_backward_recomputes_z_from_the_forwards_coefficients(path):
    """The activated training op returns the scale and shift its forward formed z with,
    and the backward recomputes z from them with the forward's fma: the forward's z bit
    for bit, so ReLU's mask in the backward is the forward's own.  The backward starts no
    torch op (a launch on a GPU): none for the coefficients, and no zero-filled gradients
    for the op's eight non-differentiable outputs."""
    import importlib.util
    import pathlib
    import sys

    from bntriton.ops import activated as fused_ops

    spec = importlib.util.spec_from_file_location(
        "perf_traffic", pathlib.Path(__file__).resolve().parents[1] / "perf" / "traffic.py")
    traffic = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = traffic
    spec.loader.exec_module(traffic)

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 3, 4, generator=gen) * 2 + 3).to(DEVICE)
    w = (torch.rand(5, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(5, generator=gen).to(DEVICE).requires_grad_()
    with forced_plan(path=path) if path == "fused" else forced_plan(path="split", block_rows=4):
        out = fused_ops._train_impl(x, w.detach(), b.detach(), None, 1e-5, 1, SLOPE)
        scale, shift = out[7], out[8]
        # The forward's pre-activation, as its kernels formed it: relu(z) is y (to the bit in
        # the interpreter; torch's own multiply-add may round once more than a GPU's fma).
        z = torch.addcmul(shift.view(1, -1, 1, 1), x - out[6].view(1, -1, 1, 1), scale.view(1, -1, 1, 1))
        assert scale.shape == shift.shape == (5,)
        exact = 0.0 if DEVICE == "cpu" else EPS[torch.float32]
        torch.testing.assert_close(torch.relu(z), out[0], rtol=exact, atol=exact)
        leaf = x.clone().requires_grad_()
        y = bntriton.batch_norm(leaf, None, None, w, b, True, activation="relu")
        counted = traffic.Traffic(floor=1)
        dy = torch.ones_like(y)
        with traffic.counting(counted):
            y.backward(dy)
    from bntriton import dispatch

    if not dispatch.native(x):  # the native path is torch ops throughout
        assert not [k for k in counted.launches if k.startswith("torch.")], counted.launches
