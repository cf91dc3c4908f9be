"""Under torch.compile, Inductor sees the kernels: on CUDA tensors of static shape each
registered op decomposes into its kernels' launches (torch.library.triton_op, launches
recorded through wrap_triton), so that a compiled graph launches them from Inductor's
generated code; elsewhere (CPU tensors; symbolic sizes, which the plans cannot take) the
op stays one opaque call.

A CPU machine cannot launch a CUDA kernel, but it can trace: fake CUDA tensors, planned
as an H100 plans them, go through the functionalization AOTAutograd runs before Inductor,
and the graph shows what Inductor would be handed.  Compiling and running those graphs is
the GPU suite's part (tests/test_compile.py on a CUDA device).
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

import bntriton  # noqa: F401  (registers the ops)
from bntriton.kernels import plans

OPS = torch.ops.bntriton
H100_SMS = 132


def _trace(fn, *args, device="cuda"):
    """The functionalized graph of ``fn`` on fake tensors of ``device`` (shapes of ``args``)."""
    with plans.planned_for(H100_SMS):
        with FakeTensorMode():
            fakes = [torch.empty(a.shape, dtype=a.dtype, device=device) for a in args]
        return make_fx(dispatch_functionalize(fn))(*fakes)


def _targets(graph) -> list:
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]


def _kernels(graph) -> list:
    return [t for t in _targets(graph) if "triton_kernel_wrapper" in t]


def _bntriton_calls(graph) -> list:
    return [t for t in _targets(graph) if t.startswith("bntriton.")]


def _inputs(shape=(8, 16, 14, 14)):
    c = shape[1]
    return torch.randn(shape), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c), torch.rand(c) + 0.5


@pytest.mark.parametrize("shape", [(8, 16, 14, 14), (64, 32, 56, 56), (512, 64)], ids=str)
def test_training_forward_and_backward_decompose_into_kernels_on_cuda(shape):
    x, w, b, rm, rv = _inputs(shape)

    def forward_and_backward(x, w, b):
        y, mean_shifted, rstd, _, _, pivot = OPS.batch_norm_train(x, w, b, 1e-5)
        return OPS.batch_norm_backward(y, x, w, None, mean_shifted, rstd, pivot)

    graph = _trace(forward_and_backward, x, w, b)
    assert _bntriton_calls(graph) == []
    assert 2 <= len(_kernels(graph)) <= 8, _targets(graph)


def test_eval_update_and_fused_ops_decompose_into_kernels_on_cuda():
    x, w, b, rm, rv = _inputs()

    def eval_and_update(x, w, b, rm, rv):
        y = OPS.batch_norm_eval(x, w, b, rm, rv, 1e-5)
        dx = OPS.batch_norm_eval_backward(y, x, w, rm, rv, 1e-5)
        _, _, _, mean, var, _ = OPS.batch_norm_train(x, w, b, 1e-5)
        OPS.update_running_stats(rm, rv, None, mean, var, 0.1)
        return y, dx

    def fused(x, w, b, rm, rv):
        y, mean_shifted, rstd, _, _, mask, pivot, scale, shift = OPS.batch_norm_act_train(x, w, b, x, 1e-5, 1, 0.0)
        grads = OPS.batch_norm_act_backward(y, x, w, scale, shift, None, mean_shifted, rstd, pivot, mask, x, 1,
                                            0.0, True, False)
        return OPS.batch_norm_act_eval(x, w, b, rm, rv, None, 1e-5, 3, 0.0)[0], grads

    for fn in (eval_and_update, fused):
        graph = _trace(fn, x, w, b, rm, rv)
        assert _bntriton_calls(graph) == [], fn.__name__
        assert len(_kernels(graph)) >= 4, (fn.__name__, _targets(graph))


def test_cpu_tensors_keep_one_opaque_call():
    x, w, b, _, _ = _inputs()

    def forward(x, w, b):
        return OPS.batch_norm_train(x, w, b, 1e-5)[0]

    graph = _trace(forward, x, w, b, device="cpu")
    assert _kernels(graph) == []
    assert _bntriton_calls(graph) == ["bntriton.batch_norm_train_opaque.default"], _targets(graph)
