"""Conversion, fusion and folding never change what a model computes, on the layer
patterns of popular model zoos written out here by hand:

* a batch norm subclass that calls ``F.batch_norm`` with ``self.training`` and then its own
  ``act`` child (timm's ``BatchNormAct2d`` layout), with and without an activation;
* stochastic depth as a free function handed ``self.training`` (torchvision's layout);
* a convolution subclass that only fixes its constructor (torchvision's ``Conv3DSimple``);
* ``Sequential(conv, bn, act)`` (torchvision's ``Conv2dNormActivation``);
* a residual block with an ``nn.Identity`` (drop path of rate 0) between BN and the add.

A converted model, plain or fused, must follow ``.train()`` / ``.eval()`` as the original
does (train -> eval -> train), keep and reload its ``state_dict``, name every batch norm it
leaves, and ``fold_batch_norm`` must fold every convolution / linear -> batch norm pair.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bntriton
from bntriton.verification.bounds import EPS, bound_units, normwise_error

from conftest import DEVICE

BACKENDS = ["native", "interpreter"]


def stochastic_depth(x, p: float, training: bool):
    """Drops whole samples of a residual branch in training; the identity in eval."""
    if not training or p == 0.0:
        return x
    keep = (torch.rand_like(x[:, :1, :1, :1]) >= p).to(x.dtype)
    return x * keep / (1.0 - p)


class StochasticDepth(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return stochastic_depth(x, self.p, self.training)


class BatchNormWithAct2d(nn.BatchNorm2d):
    """Batch norm, then the activation it holds as ``act`` (nn.Identity for none)."""

    def __init__(self, num_features, act_layer=nn.ReLU, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or self.running_mean is None
        keep_running = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if keep_running else None, self.running_var if keep_running else None,
                         self.weight, self.bias, use_batch_stats, factor, self.eps)
        return self.act(self.drop(x))


class PlainConv2d(nn.Conv2d):
    """A subclass that only fixes the constructor (torch.fx traces through it)."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1, bias=False)


class PlainConv3d(nn.Conv3d):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, (3, 3, 3), padding=1, bias=False)


class ConvNormAct(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """conv -> BN + SiLU -> conv -> BN (identity act) -> drop path -> + input -> ReLU."""

    def __init__(self, c, drop):
        super().__init__()
        self.conv1, self.bn1 = PlainConv2d(c, c), BatchNormWithAct2d(c, nn.SiLU)
        self.conv2, self.bn2 = PlainConv2d(c, c), BatchNormWithAct2d(c, None)
        self.drop_path = StochasticDepth(drop) if drop > 0 else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.act(self.drop_path(out) + x)


class PatternNet(nn.Module):
    """Seven batch norms: every pattern above, plus dropout and a layer this forward never
    calls (its parameters still belong to the state_dict)."""

    BATCH_NORMS = 7

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Sequential(PlainConv2d(3, c), BatchNormWithAct2d(c, nn.ReLU))
        self.block1 = ResidualBlock(c, drop=0.0)
        self.block2 = ResidualBlock(c, drop=0.5)
        self.tail = ConvNormAct(c, c)
        self.dropout = nn.Dropout(0.25)
        # No bias before a batch norm: its gradient is zero up to rounding.
        self.head, self.head_bn = nn.Linear(c, 3, bias=False), nn.BatchNorm1d(3)
        self.unused = nn.Linear(c, 2)

    def forward(self, x):
        x = self.tail(self.block2(self.block1(self.stem(x))))
        return self.head_bn(self.head(self.dropout(x.mean((2, 3)))))


def _pattern_net() -> nn.Module:
    torch.manual_seed(0)
    model = PatternNet().to(DEVICE, torch.float64)
    with torch.no_grad():  # parameters away from torch's defaults (weight 1, bias 0)
        for name, p in model.named_parameters():
            if "bn" in name or name.startswith(("stem.1", "tail.1")):
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p))
    return model


def _step_matches(converted, reference, x, seed, training):
    """One forward + backward of each from the same random state (dropout, stochastic
    depth): outputs, gradients and buffers within the table's fp64 bound per batch norm,
    normwise."""
    for model in (converted, reference):
        model.train(training)
        model.zero_grad(set_to_none=True)
    projection = torch.randn(x.shape[0], 3, dtype=x.dtype, device=x.device, generator=torch.Generator().manual_seed(seed))
    outputs = []
    for model in (converted, reference):
        torch.manual_seed(seed)
        outputs.append(model(x))
        (outputs[-1] * projection).sum().backward()
    bound = PatternNet.BATCH_NORMS * bound_units("dx_act", torch.float64, x.numel() // x.shape[1])
    assert normwise_error(*outputs, torch.float64) <= bound
    params, buffers = dict(converted.named_parameters()), dict(converted.named_buffers())
    for name, p in reference.named_parameters():
        assert (p.grad is None) == (params[name].grad is None), name
        if p.grad is not None:
            assert normwise_error(params[name].grad, p.grad, torch.float64) <= bound, name
    for name, buf in reference.named_buffers():
        assert normwise_error(buffers[name], buf, torch.float64) <= bound, name


# (fuse, converted names that carry an activation)
EXPECTED_FUSED = {
    False: {"stem.1", "block1.bn1", "block2.bn1"},
    # + the BN before the residual add (an nn.Identity between them), the Sequential's BN;
    # block2.bn2 feeds stochastic depth, which stays a module.
    True: {"stem.1", "block1.bn1", "block2.bn1", "block1.bn2", "tail.1"},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_converted_model_follows_train_and_eval_like_the_original(fuse, backend):
    reference = _pattern_net()
    keys = set(reference.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left, nothing to warn about
        converted, report = bntriton.convert_model(copy.deepcopy(reference), fuse=fuse, report=True)
    assert isinstance(converted, torch.fx.GraphModule) == fuse
    if fuse:
        assert "training" not in converted.code and "batch_norm" not in converted.code
    assert report.left == [] and len(report.converted) == PatternNet.BATCH_NORMS
    assert {name for name, _ in report.fused} == EXPECTED_FUSED[fuse]
    layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == PatternNet.BATCH_NORMS
    assert all(type(m).__module__.startswith("bntriton") for m in layers)
    assert set(converted.state_dict()) == keys
    converted.load_state_dict(reference.state_dict())  # strict
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, device=DEVICE) * 2 + 1
    with bntriton.cpu_backend(backend):
        for seed, training in [(1, True), (2, False), (3, True)]:  # train -> eval -> train
            _step_matches(converted, reference, x, seed, training)
        # Eval is deterministic and leaves the running statistics alone.
        converted.eval()
        state = {k: v.clone() for k, v in converted.state_dict().items()}
        assert torch.equal(converted(x), converted(x))
        assert all(torch.equal(v, converted.state_dict()[k]) for k, v in state.items())


def test_report_prints_what_happened():
    _, report = bntriton.convert_model(_pattern_net(), fuse=True, report=True)
    text = str(report)
    assert text.splitlines()[0] == (
        "convert_model(fuse=True): converted 7 batch norms, 5 of them fused with their activation; left 0")
    assert "block1.bn2: BatchNormWithAct2d -> bntriton.BatchNormAct2d(relu + residual)" in text
    assert report.counts() == {"converted": 7, "fused": 5, "folded": 0, "left": 0}


class TrainOnlyAuxiliary(nn.Module):
    """The root's own forward reads self.training: no graph can follow both modes."""

    def __init__(self):
        super().__init__()
        self.body = ConvNormAct(3, 4)
        self.aux = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.body(x)
        return y + self.aux(y) if self.training else y


@pytest.mark.parametrize("backend", BACKENDS)
def test_fusion_refuses_a_graph_that_depends_on_the_mode(backend):
    torch.manual_seed(0)
    reference = TrainOnlyAuxiliary().to(DEVICE, torch.float64)
    model = copy.deepcopy(reference)
    with pytest.warns(UserWarning, match="differs between train and eval mode, first in the model's own forward"):
        converted, report = bntriton.convert_model(model, fuse=True, report=True)
    assert converted is model and not isinstance(converted, torch.fx.GraphModule)
    # Sequential(conv, BN, activation) still fuses, from the module tree.
    assert type(model.body[1]) is bntriton.BatchNormAct2d and type(model.body[2]) is nn.Identity
    assert type(model.aux[1]) is bntriton.BatchNorm2d
    assert report.fused == [("body.1", "relu")] and len(report.notes) == 1
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    tol = 2 * bound_units("dx_act", torch.float64, 18) * EPS[torch.float64]
    with bntriton.cpu_backend(backend):
        for training in (True, False, True):
            model.train(training), reference.train(training)
            torch.testing.assert_close(model(x), reference(x), rtol=tol, atol=tol)


def test_fuse_on_a_lone_batch_norm_converts_it_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tracing its own forward would bake the mode in
        converted = bntriton.convert_model(BatchNormWithAct2d(3, nn.SiLU), fuse=True)
    assert type(converted) is bntriton.BatchNormAct2d and converted.activation == "silu"


class OwnForwardBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def _unconvertible():
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), BatchNormWithAct2d(4, nn.Tanh), OwnForwardBatchNorm(4),
        nn.SyncBatchNorm(4), BatchNormWithAct2d(4, lambda: nn.GELU(approximate="tanh")), nn.BatchNorm2d(4),
    )


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_every_batch_norm_left_is_named_in_one_warning(fuse):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted, report = bntriton.convert_model(_unconvertible(), fuse=fuse, report=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith("convert_model" + ("(fuse=True)" if fuse else "") + " left 4 batch norm(s)")
    reasons = dict(report.left)
    assert set(reasons) == {"1", "2", "3", "4"}
    assert "Tanh has no bntriton kernel" in reasons["1"] and "Tanh" in messages[0]
    assert "forward of its own" in reasons["2"]
    assert "convert_sync_batchnorm" in reasons["3"]
    assert "approximate='tanh'" in reasons["4"]
    assert [type(converted.get_submodule(str(i))).__name__ for i in range(1, 6)] == [
        "BatchNormWithAct2d", "OwnForwardBatchNorm", "SyncBatchNorm", "BatchNormWithAct2d", "BatchNorm2d"]
    assert type(converted.get_submodule("5")).__module__ == "bntriton.nn.modules"


def _assert_folds_everything(model, x, pairs):
    model.eval()
    with bntriton.cpu_backend("native"):
        want = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            folded, report = bntriton.fold_batch_norm(model, report=True)
        out = folded(x)
    assert report.left == [] and len(report.folded) == pairs
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    # One y bound per batch norm folded (each rounds differently folded and unfolded).
    assert normwise_error(out, want, torch.float64) <= pairs * bound_units("y", torch.float64, x.numel() // x.shape[1])
    return folded


def test_fold_covers_every_conv_and_linear_pair_subclasses_and_activations_included():
    model = _pattern_net()
    with bntriton.cpu_backend("native"):
        for seed in range(3):  # running statistics away from 0 / 1
            torch.manual_seed(seed)
            model(torch.randn(4, 3, 4, 4, dtype=torch.float64) * 2 + 1)
    folded = _assert_folds_everything(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), 7)
    # Stochastic depth stays a module (its eval forward is the identity).
    assert isinstance(folded.block2.drop_path, StochasticDepth)


class VideoNet(nn.Module):
    """Convolution subclasses before 3-D batch norms."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = PlainConv3d(2, 3), nn.BatchNorm3d(3)
        self.conv2, self.bn2 = PlainConv3d(3, 3), bntriton.BatchNorm3d(3)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


def test_fold_reaches_through_conv3d_subclasses():
    torch.manual_seed(0)
    model = VideoNet().double()
    with bntriton.cpu_backend("native"):
        model(torch.randn(3, 2, 2, 3, 3, dtype=torch.float64) + 1)
    _assert_folds_everything(model, torch.randn(2, 2, 2, 3, 3, dtype=torch.float64), 2)


def test_fold_names_what_it_leaves_and_why():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 3

    model = nn.Sequential(ScaledConv(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 1), OwnForwardBatchNorm(4)).eval()
    with pytest.warns(UserWarning, match="fold_batch_norm left 3 batch norm") as caught:
        folded, report = bntriton.fold_batch_norm(model, report=True)
    assert len(caught) == 1
    reasons = dict(report.left)
    assert "ScaledConv overrides forward" in reasons["1"]
    assert "(ReLU), not a Conv1d/2d/3d or Linear" in reasons["3"]
    assert "forward of its own" in reasons["5"]
    assert report.folded == []
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(folded(x), model(x))


def test_fused_conversion_keeps_each_modules_own_mode():
    """A batch norm frozen in eval inside a training model stays frozen after fusion."""
    reference = _pattern_net()
    reference.block2.bn2.eval()
    converted = bntriton.convert_model(copy.deepcopy(reference), fuse=True)
    modes = {name: m.training for name, m in converted.named_modules()}
    assert all(modes[name] == m.training for name, m in reference.named_modules() if name in modes)
    assert converted.training and not converted.block2.bn2.training


def test_fused_model_exports_the_eval_graph():
    """torch.export (the front of the ONNX exporter) records eval, not the traced mode."""
    reference = _pattern_net()
    converted = bntriton.convert_model(copy.deepcopy(reference), fuse=True)  # traced in training mode
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    with bntriton.cpu_backend("native"):
        for model in (converted, reference):  # one training step moves the running statistics
            torch.manual_seed(0)  # the same dropout and stochastic depth
            model(x)
        converted.eval(), reference.eval()
        program = torch.export.export(converted, (x,))
        out = program.module()(x)
    bound = PatternNet.BATCH_NORMS * bound_units("y_act", torch.float64, x.numel() // x.shape[1])
    assert normwise_error(out, reference(x), torch.float64) <= bound
