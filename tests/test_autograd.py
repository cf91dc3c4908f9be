"""Autograd beyond the first derivative: double backward, forward mode, torch.func and vmap.

gradcheck / gradgradcheck in float64 pin the derivatives down exactly (against finite
differences); the comparisons with torch's batch norm (gradient penalty, MAML, jvp,
per-sample gradients) use the bound table: each side within its bound of the exact
result, so at most twice it apart.  gradcheck evaluates the forward many times, each a
kernel launch in Triton's interpreter on CPU, hence tiny shapes and ``fast_mode`` where
a layout sweep would otherwise cost minutes.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad, gradcheck, gradgradcheck
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vmap

import bntriton
from bntriton.ops import composite
from bntriton.ops import batch_norm as ops
from bntriton.verification.bounds import bound_units, normwise_error

from conftest import DEVICE

F64 = torch.float64


def _close_to_torch(ours, theirs, quantity, count, name="", magnitude=None):
    """Both fp64 results within the table's bound of the exact one: at most twice it apart
    (normwise, relative to ``magnitude``, by default ``theirs``)."""
    bound = 2 * bound_units(quantity, F64, count)
    err = normwise_error(ours, theirs, F64, magnitude)
    assert err <= bound, f"{name}: {err:.1f} eps from torch's (bound {bound:.1f})"


def _input(shape, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=F64) * 2 + 0.5).to(DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "sliced":  # neither layout: every other channel of a wider tensor
        x = torch.cat([x, x], dim=1)[:, ::2]
    return x.requires_grad_()


def _params(channels, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.rand(channels, generator=gen, dtype=F64) + 0.5).to(DEVICE).requires_grad_()
    bias = torch.randn(channels, generator=gen, dtype=F64).to(DEVICE).requires_grad_()
    running_mean = torch.randn(channels, generator=gen, dtype=F64).to(DEVICE)
    running_var = (torch.rand(channels, generator=gen, dtype=F64) + 0.5).to(DEVICE)
    return weight, bias, running_mean, running_var


def _function(training, running_mean, running_var):
    if training:
        return lambda x, w=None, b=None: bntriton.batch_norm(x, None, None, w, b, training=True)
    return lambda x, w=None, b=None: bntriton.batch_norm(x, running_mean, running_var, w, b, training=False)


# ------------------------------------------------------------------------ double backward

_LAYOUTS = [((4, 3), "contiguous"), ((3, 2, 3), "contiguous"), ((2, 2, 2, 2), "contiguous"),
            ((2, 2, 2, 2), "channels_last"), ((2, 2, 1, 2, 2), "channels_last"), ((3, 2, 3), "sliced")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape,layout", _LAYOUTS, ids=[f"{len(s)}d-{l}" for s, l in _LAYOUTS])
def test_gradgradcheck_every_path_and_layout(shape, layout, affine, training):
    x = _input(shape, layout)
    weight, bias, running_mean, running_var = _params(shape[1])
    inputs = (x, weight, bias) if affine else (x,)
    fn = _function(training, running_mean, running_var)
    # fast_mode: random projections of the Jacobians (a handful of evaluations, not one per element).
    assert gradgradcheck(fn, inputs, fast_mode=True)


def test_gradgradcheck_full_jacobian_with_batch_statistics():
    # Every entry of the second derivative, on the path where it has the most terms (the
    # statistics' own derivatives); the sweep above covers the rest by projections.
    x = _input((3, 2, 2))
    weight, bias, running_mean, running_var = _params(2)
    assert gradgradcheck(_function(True, running_mean, running_var), (x, weight, bias))


def test_double_backward_through_the_module_matches_torch():
    x = _input((4, 3, 2, 2))
    ours = bntriton.BatchNorm2d(3).to(DEVICE, F64)
    theirs = nn.BatchNorm2d(3).to(DEVICE, F64)
    results = []
    for bn in (ours, theirs):
        (dx,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(dx.pow(2).sum(), (x, bn.weight, bn.bias)))
    # The bias term is a near-cancellation (~1e-9 of the others): judge every gradient
    # against the largest, the scale its rounding errors come from.
    scale = max(g.abs().max() for g in results[1])
    for name, a, b in zip(("x", "weight", "bias"), *results):
        _close_to_torch(a, b, "dx", 16, name, magnitude=torch.full_like(b, scale))


def test_gradient_penalty_through_conv_and_batch_norm_matches_torch():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DEVICE, F64)
    nets = [(conv, bntriton.BatchNorm2d(3).to(DEVICE, F64)),
            (copy.deepcopy(conv), nn.BatchNorm2d(3).to(DEVICE, F64))]
    x = _input((4, 2, 4, 4))
    grads = []
    for c, bn in nets:
        (g,) = torch.autograd.grad(bn(c(x)).pow(3).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(g.pow(2).sum(), c.weight)[0])
    _close_to_torch(*grads, "dx", 64, "conv.weight")


def _maml_meta_gradient(batch_norm):
    """One inner SGD step with create_graph, then the meta-gradient on new data."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(3, 4, generator=gen, dtype=F64), torch.rand(4, generator=gen, dtype=F64) + 0.5,
              torch.randn(4, generator=gen, dtype=F64)]
    params = [p.to(DEVICE).requires_grad_() for p in params]
    support, query = (torch.randn(8, 3, generator=gen, dtype=F64).to(DEVICE) for _ in range(2))
    target = torch.randn(8, 4, generator=gen, dtype=F64).to(DEVICE)

    def loss(w, gamma, beta, x):
        return (batch_norm(x @ w, None, None, gamma, beta, training=True) - target).pow(2).mean()

    inner = torch.autograd.grad(loss(*params, support), params, create_graph=True)
    fast = [p - 0.1 * g for p, g in zip(params, inner)]
    return torch.autograd.grad(loss(*fast, query), params)


def test_maml_meta_gradient_matches_torch():
    for name, a, b in zip(("w", "gamma", "beta"), _maml_meta_gradient(bntriton.batch_norm),
                          _maml_meta_gradient(F.batch_norm)):
        _close_to_torch(a, b, "dx", 8, name)


def test_first_order_backward_stays_on_the_kernels(monkeypatch):
    """Plain training (no create_graph) never takes the composite path."""
    def refuse(*args, **kwargs):
        raise AssertionError("composite backward used without create_graph")

    monkeypatch.setattr(composite, "train_backward", refuse)
    monkeypatch.setattr(composite, "eval_backward", refuse)
    bn = bntriton.BatchNorm2d(3).to(DEVICE)
    x = torch.randn(4, 3, 2, 2, device=DEVICE, requires_grad=True)
    bn(x).sum().backward()
    bn.eval()
    bn(x).sum().backward()
    assert x.grad is not None


# ----------------------------------------------------------------------------- forward AD


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_forward_ad_and_batched_checks(training):
    x = _input((3, 2, 2))
    weight, bias, running_mean, running_var = _params(2)
    assert gradcheck(_function(training, running_mean, running_var), (x, weight, bias), fast_mode=True,
                     check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_jvp_matches_torch(training, layout):
    x = _input((3, 2, 2, 2), layout).detach()
    weight, bias, running_mean, running_var = (t.detach() for t in _params(2))
    tangents = tuple(torch.randn_like(t) for t in (x, weight, bias))
    stats = (None, None) if training else (running_mean, running_var)
    results = [jvp(lambda x, w, b: bn(x, *stats, w, b, training=training), (x, weight, bias), tangents)
               for bn in (bntriton.batch_norm, F.batch_norm)]
    _close_to_torch(results[0][0], results[1][0], "y", 12, "y")
    _close_to_torch(results[0][1], results[1][1], "dx", 12, "tangent")
    with forward_ad.dual_level():  # the eager path, without torch.func
        dual = forward_ad.make_dual(x, tangents[0])
        tangent = forward_ad.unpack_dual(bntriton.batch_norm(dual, *stats, weight, bias, training=training)).tangent
    expected = jvp(lambda x: F.batch_norm(x, *stats, weight, bias, training=training), (x,), tangents[:1])[1]
    _close_to_torch(tangent, expected, "dx", 12, "forward_ad")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_dual_running_statistics_follow_torchs_forward_ad_rules(training):
    """torch refuses tangents on the running statistics only in evaluation and only when
    the input carries one too (test_nn's check of batch_norm_jvp); elsewhere it ignores
    them.  Each combination of duals among (input, running_mean, running_var) is run
    through both: the same refusal and message, or the same output tangent."""
    gen = torch.Generator().manual_seed(5)
    primals = [torch.randn(3, 2, 5, generator=gen, dtype=F64), torch.randn(2, generator=gen, dtype=F64),
               torch.rand(2, generator=gen, dtype=F64) + 0.5]
    tangents = [torch.rand(p.shape, generator=gen, dtype=F64) for p in primals]
    primals, tangents = [p.to(DEVICE) for p in primals], [t.to(DEVICE) for t in tangents]
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        outcomes = []
        for bn in (bntriton.batch_norm, F.batch_norm):
            with forward_ad.dual_level():
                args = [forward_ad.make_dual(p.clone(), t) if i in dual_indices else p.clone()
                        for i, (p, t) in enumerate(zip(primals, tangents))]
                try:
                    outcomes.append(forward_ad.unpack_dual(bn(*args, training=training, momentum=-1.2)).tangent)
                except RuntimeError as error:
                    outcomes.append(str(error))
        ours, theirs = outcomes
        if isinstance(theirs, str):
            assert isinstance(ours, str), (dual_indices, "accepted what torch refuses")
            assert "batch_norm is not differentiable wrt running_mean and running_var" in theirs
            assert "batch_norm is not differentiable wrt running_mean and running_var" in ours, ours
        elif theirs is None:
            assert ours is None, dual_indices
        else:
            assert not isinstance(ours, str), ours
            _close_to_torch(ours, theirs, "dx", 15, f"tangent {dual_indices}")


# ------------------------------------------------------------------------------ torch.func


def test_func_transforms_match_torch():
    x = _input((4, 2, 3)).detach()
    weight, bias, running_mean, running_var = (t.detach() for t in _params(2))
    for training in (False, True):
        stats = (None, None) if training else (running_mean, running_var)

        def loss(x, bn):
            return bn(x, *stats, weight, bias, training=training).pow(3).sum()

        ours, theirs = (grad(loss)(x, bn) for bn in (bntriton.batch_norm, F.batch_norm))
        _close_to_torch(ours, theirs, "dx", 12, f"grad training={training}")
        ours, theirs = (hessian(loss)(x, bn) for bn in (bntriton.batch_norm, F.batch_norm))
        _close_to_torch(ours, theirs, "dx", 12, f"hessian training={training}")
        for transform in (jacrev, jacfwd):
            ours, theirs = (transform(lambda w: bn(x, *stats, w, bias, training=training))(weight)
                            for bn in (bntriton.batch_norm, F.batch_norm))
            _close_to_torch(ours, theirs, "dx", 12, f"{transform.__name__} training={training}")


def test_per_sample_gradients_match_torch():
    xs = torch.randn(3, 4, 2, 3, dtype=F64, device=DEVICE)
    weight, bias, _, _ = (t.detach() for t in _params(2))

    def loss(x, bn):
        return bn(x, None, None, weight, bias, training=True).pow(3).sum()

    ours, theirs = (vmap(grad(loss), in_dims=(0, None))(xs, bn) for bn in (bntriton.batch_norm, F.batch_norm))
    _close_to_torch(ours, theirs, "dx", 12)


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (2, None, 0), (0, 0, None)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap_matches_a_loop_in_one_launch(in_dims, training, monkeypatch):
    size, channels = 3, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, 4, channels, 3, generator=gen, dtype=F64).to(DEVICE)
    weight = (torch.rand(size, channels, generator=gen, dtype=F64) + 0.5).to(DEVICE)
    bias = torch.randn(size, channels, generator=gen, dtype=F64).to(DEVICE)
    running = [torch.randn(size, channels, generator=gen, dtype=F64).to(DEVICE),
               (torch.rand(size, channels, generator=gen, dtype=F64) + 0.5).to(DEVICE)]
    x_dim, w_dim, b_dim = in_dims
    args = (x.movedim(0, x_dim) if x_dim is not None else x[0],
            weight if w_dim is not None else weight[0], bias if b_dim is not None else bias[0])

    def call(bn, running_mean, running_var):
        return lambda x, w, b: bn(x, running_mean, running_var, w, b, training=training)

    def problem(i, t, dim):
        return t.select(dim, i) if dim is not None else t

    ours_running = [r.clone() for r in running]
    launches = []
    # Every training forward, cached launches or the general route, goes through here.
    real_forward = ops._train_and_update
    monkeypatch.setattr(ops, "_train_and_update", lambda *a, **k: launches.append(1) or real_forward(*a, **k))
    out = vmap(lambda x, w, b, m, v: call(bntriton.batch_norm, m, v)(x, w, b), in_dims=(*in_dims, 0, 0))(
        *args, *ours_running)
    assert len(launches) == (1 if training else 0)
    for i in range(size):
        m, v = (r[i] for r in running)
        expected = call(F.batch_norm, m, v)(*(problem(i, t, d) for t, d in zip(args, in_dims)))
        _close_to_torch(out[i], expected, "y", 12, f"problem {i}")
        _close_to_torch(ours_running[0][i], m, "running_mean", 12, f"running_mean {i}")
        _close_to_torch(ours_running[1][i], v, "running_var", 12, f"running_var {i}")


def test_vmap_refuses_to_update_shared_running_statistics():
    x = torch.randn(3, 4, 2, device=DEVICE)
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(lambda x: bntriton.batch_norm(x, torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE),
                                           training=True))(x)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_functional_call_ensemble_matches_separate_models(momentum):
    """Model ensembling: stacked parameters and buffers, one vmapped call, in train and eval."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bntriton.BatchNorm2d(3, momentum=momentum),
                             nn.ReLU()).to(DEVICE, F64)

    models = [make() for _ in range(3)]
    references = []
    for model in models:
        reference = nn.Sequential(copy.deepcopy(model[0]), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU())
        reference[1].load_state_dict(model[1].state_dict())
        references.append(reference.to(DEVICE, F64))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(4, 2, 3, 3, dtype=F64, device=DEVICE)

    def ensemble(params, buffers, x):
        return functional_call(base, (params, buffers), (x,))

    for step in range(2):
        out = vmap(ensemble, in_dims=(0, 0, None))(params, buffers, x)
        for i, reference in enumerate(references):
            _close_to_torch(out[i], reference(x), "y", 36, f"step {step} model {i}")
    for name in ("running_mean", "running_var"):
        for i, reference in enumerate(references):
            _close_to_torch(buffers[f"1.{name}"][i], getattr(reference[1], name), name, 36, f"{name} {i}")
    assert buffers["1.num_batches_tracked"].tolist() == [2, 2, 2]
    base.eval()
    out = vmap(ensemble, in_dims=(0, 0, None))(params, buffers, x)
    for i, reference in enumerate(references):
        _close_to_torch(out[i], reference.eval()(x), "y", 36, f"eval model {i}")


def test_autograd_page_snippet_runs():
    """docs/autograd.md's example, on this test's CPU backend (tests/test_docs.py runs it
    as a user would, on the default one)."""
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "autograd.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    exec(compile(snippet, "docs/autograd.md", "exec"), {})


def test_registered_ops_vmap_like_a_loop():
    """torch.ops.bntriton.* carry the same folding rules as the eager path (bitwise: the
    folded problem normalizes each channel exactly as the separate ones do)."""
    ops = torch.ops.bntriton
    gen = torch.Generator().manual_seed(0)
    x, grad_out = (torch.randn(3, 4, 2, 5, generator=gen, dtype=F64).to(DEVICE) for _ in range(2))
    weight, bias, running_mean = (torch.randn(3, 2, generator=gen, dtype=F64).to(DEVICE) for _ in range(3))
    running_var = weight.abs() + 0.5

    def loop(fn, *args):
        results = [fn(*(a[i] for a in args)) for i in range(3)]
        return torch.stack(results) if isinstance(results[0], torch.Tensor) else \
            tuple(torch.stack(r) for r in zip(*results))

    def check(fn, *args):
        for a, b in zip(*(torch.utils._pytree.tree_leaves(r) for r in (vmap(fn)(*args), loop(fn, *args)))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    check(lambda x, w, b: ops.batch_norm_train(x, w, b, 1e-5), x, weight, bias)
    check(lambda x, w, b, m, v: ops.batch_norm_eval(x, w, b, m, v, 1e-5), x, weight, bias, running_mean, running_var)
    _, mean_shifted, rstd, _, _, pivot = loop(lambda x, w, b: ops.batch_norm_train(x, w, b, 1e-5), x, weight, bias)
    check(lambda g, x, w, m, r, k: ops.batch_norm_backward(g, x, w, None, m, r, k), grad_out, x, weight,
          mean_shifted, rstd, pivot)
    check(lambda g, x, w, m, v: ops.batch_norm_eval_backward(g, x, w, m, v, 1e-5), grad_out, x, weight,
          running_mean, running_var)
