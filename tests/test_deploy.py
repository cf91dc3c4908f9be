"""Ways out for a trained model: torch's classes back (revert_model), batch norm folded
into the layer before it (fold_batch_norm), and export with bntriton's layers in place
(torch.export, torch.onnx.export checked with onnxruntime, torch.jit.trace, AOTInductor);
torch.jit.script refuses with the workaround named."""
from __future__ import annotations

import io
import os

import pytest
import torch
from torch import nn

import bntriton
from bntriton.verification.bounds import EPS, bound_units


def _trained_model(channels_last: bool = False) -> nn.Module:
    """A small CNN with bntriton's layers and non-trivial running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, bias=False), nn.BatchNorm2d(6),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.BatchNorm1d(5),
    )
    bntriton.convert_model(model)
    with bntriton.cpu_backend("native"):
        for _ in range(3):
            x = torch.randn(4, 3, 8, 8) * 2 + 3
            model(x.to(memory_format=torch.channels_last) if channels_last else x)
    return model.eval()


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 + 3


def _close(a: torch.Tensor, b: torch.Tensor, count: int = 32) -> bool:
    # Normwise, one y bound per batch norm the models stack (4 in _trained_model): each
    # layer's rounding reaches the output through the (well-conditioned) layers after it.
    tol = 4 * bound_units("y", torch.float32, count) * EPS[torch.float32]
    return bool((a.double() - b.double()).abs().max() <= tol * b.double().abs().max())


def _onnx_roundtrip(ort, model, x: torch.Tensor, path) -> torch.Tensor:
    """Export ``model`` to ONNX (the dynamo exporter) and run it in onnxruntime on ``x``."""
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _no_bntriton_ops(graph_module) -> bool:
    return not any("bntriton" in str(node.target) for node in graph_module.graph.nodes)


# ----------------------------------------------------------------------- revert_model


def test_revert_model_is_convert_models_inverse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    originals = [id(t) for t in list(model.parameters()) + list(model.buffers())]
    bntriton.convert_model(model)
    assert type(model[1]) is bntriton.BatchNorm2d
    reverted = bntriton.revert_model(model)
    assert reverted is model
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is nn.BatchNorm1d
    assert [id(t) for t in list(model.parameters()) + list(model.buffers())] == originals
    top = bntriton.revert_model(bntriton.BatchNorm3d(2))
    assert type(top) is nn.BatchNorm3d
    assert type(bntriton.revert_model(bntriton.SyncBatchNorm(2))) is nn.SyncBatchNorm


def test_reverted_model_computes_the_same_and_scripts():
    model = _trained_model()
    x = _input()
    with bntriton.cpu_backend("native"):
        y = model(x)
    bntriton.revert_model(model)
    assert _close(model(x), y)
    scripted = torch.jit.script(model)
    assert _close(scripted(x), y)
    fused = torch.ao.quantization.fuse_modules(model, [["0", "1"]])
    assert _close(fused(x), y)


def test_jit_script_names_revert_model():
    with pytest.raises(RuntimeError, match=r"bntriton.revert_model\(model\)"):
        torch.jit.script(_trained_model())


# -------------------------------------------------------------------- fold_batch_norm


def test_fold_batch_norm_folds_what_follows_a_conv_or_linear():
    model = _trained_model()
    x = _input()
    with bntriton.cpu_backend("native"):
        y = model(x)
        with pytest.warns(UserWarning, match=r"left 1 batch norm\(s\) as they were: 9: its input comes from 8 \(ReLU\)"):
            folded = bntriton.fold_batch_norm(model)
        assert _close(folded(x), y)
    left = [type(m) for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # Conv+BN, Conv+BN and Linear+BN fold; the BN after the ReLU stays.
    assert left == [bntriton.BatchNorm1d]
    # The original model is untouched.
    assert type(model[1]) is bntriton.BatchNorm2d


def test_fold_batch_norm_leaves_a_layer_with_other_users():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = bntriton.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h

    model = TwoUsers().eval()
    with pytest.warns(UserWarning, match="bn: conv's output is also used elsewhere"):
        folded = bntriton.fold_batch_norm(model)
    assert isinstance(folded.bn, bntriton.BatchNorm2d)
    with bntriton.cpu_backend("native"):
        assert _close(folded(_input()), model(_input()))


def test_batch_norm_with_a_fused_activation_folds_keeping_its_activation_and_is_not_reverted():
    """Folding must not drop the activation; reverting would (no torch class has it)."""
    from bntriton.nn.modules import BatchNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2))
    with bntriton.cpu_backend("native"):
        model(_input())
        model.eval()
        y = model(_input())
    folded = bntriton.fold_batch_norm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert "leaky_relu" in folded.code and "negative_slope = 0.2" in folded.code
    assert _close(folded(_input()), y)
    with pytest.raises(TypeError, match="BatchNormAct2d has no torch class"):
        bntriton.revert_model(model)


def test_fold_batch_norm_needs_eval_mode():
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        bntriton.fold_batch_norm(_trained_model().train())


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_torch_export_records_standard_ops(channels_last):
    model = _trained_model(channels_last)
    x = _input()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with bntriton.cpu_backend("native"):
        y = model(x)
    program = torch.export.export(model, (x,))
    assert _no_bntriton_ops(program.graph_module)
    out = program.module()(x)
    assert _close(out, y)


def test_jit_trace_runs_after_save_and_load():
    model = _trained_model()
    x = _input()
    with bntriton.cpu_backend("native"):
        y = model(x)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    graph = loaded.inlined_graph.str()
    assert "bntriton::" not in graph and "PythonOp" not in graph  # standard ops only
    assert _close(loaded(x), y)
    # Another batch size: the trace holds no shapes baked in as constants.
    x4 = torch.cat([x, x])
    assert _close(loaded(x4)[:2], y)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _trained_model()
    x = _input()
    with bntriton.cpu_backend("native"):
        y = model(x)
    assert _close(_onnx_roundtrip(ort, model, x, tmp_path / "model.onnx"), y)


@pytest.mark.skipif(not os.environ.get("BNTRITON_SLOW_TESTS"), reason="AOTInductor compiles C++ (~1 min): BNTRITON_SLOW_TESTS=1")
def test_aoti_package_runs(tmp_path):
    model = _trained_model()
    x = _input()
    with bntriton.cpu_backend("native"):
        y = model(x)
    program = torch.export.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    assert _close(loaded(x), y)


class _FusedBlock(nn.Module):
    """BN + residual + leaky ReLU, then BN + GELU: the fused modules' eval in a graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = bntriton.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.1)
        self.bn2 = bntriton.BatchNormAct2d(3, activation="gelu")

    def forward(self, x):
        return self.bn2(self.bn(self.conv(x), residual=x))


def _trained_fused_block() -> nn.Module:
    torch.manual_seed(0)
    model = _FusedBlock()
    with bntriton.cpu_backend("native"):
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8) * 2 + 3)
    return model.eval()


def test_fused_modules_export_as_standard_ops():
    model = _trained_fused_block()
    x = _input()
    with bntriton.cpu_backend("native"):
        y = model(x)
    program = torch.export.export(model, (x,))
    assert _no_bntriton_ops(program.graph_module)
    assert _close(program.module()(x), y)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    assert "bntriton::" not in traced.inlined_graph.str()
    assert _close(traced(x), y)


def test_fused_modules_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _trained_fused_block()
    x = _input()
    with bntriton.cpu_backend("native"):
        y = model(x)
    assert _close(_onnx_roundtrip(ort, model, x, tmp_path / "fused.onnx"), y)
