"""The native CPU path (bntriton/native/cpu.py): a second implementation of the kernels'
algorithm on torch's CPU operations, held to the same oracle and bounds, and compared
with the kernels themselves (in the interpreter) on the same inputs."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import bntriton
from bntriton.kernels.runtime import current_cpu_backend
from bntriton.verification.bounds import EPS, bound_units, normwise_error

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: CPU tensors")


def test_suite_runs_the_interpreter_and_native_is_one_switch_away():
    assert current_cpu_backend() == "interpreter"  # conftest: the suite verifies the kernels
    with bntriton.cpu_backend("native"):
        assert current_cpu_backend() == "native"
        with bntriton.cpu_backend("interpreter"):
            assert current_cpu_backend() == "interpreter"
        assert current_cpu_backend() == "native"
    with pytest.raises(ValueError, match="cpu_backend must be one of"):
        with bntriton.cpu_backend("numpy"):
            pass


def test_native_is_the_default_outside_the_suite():
    env = {k: v for k, v in os.environ.items() if k != "BNTRITON_CPU_BACKEND"}
    code = "from bntriton.kernels.runtime import current_cpu_backend as c; print(c())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "native"


def test_native_passes_verify_quick():
    """Every verification family (large offsets, constant channels, NaN, layouts, dtypes,
    running statistics, eval) against the float64 oracle, on the native path."""
    with bntriton.cpu_backend("native"):
        report = bntriton.verify(device="cpu", quick=True, strict=True, reference=False)
    assert report.environment["cpu_backend"] == "native"
    assert report.passed, report.render()


def _run(backend, x, train, weight, bias, momentum=0.1):
    channels = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    # fp32 statistics and parameters (fp64 for fp64 input), as torch accepts them.
    param_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    running_mean = torch.randn(channels, generator=gen, dtype=param_dtype) + 1000
    running_var = torch.rand(channels, generator=gen, dtype=param_dtype) + 0.5
    counter = torch.tensor(3)
    leaf = x.detach().clone().requires_grad_()
    w = weight.detach().to(param_dtype).requires_grad_() if weight is not None else None
    b = bias.detach().to(param_dtype).requires_grad_() if bias is not None else None
    from bntriton.functional import batch_norm_with_counter

    with bntriton.cpu_backend(backend):
        y = batch_norm_with_counter(leaf, running_mean, running_var, w, b, train, momentum, 1e-5, counter)
        dy = torch.randn(y.shape, generator=gen).to(y.dtype)
        y.backward(dy)
    grads = (leaf.grad, w.grad if w is not None else None, b.grad if b is not None else None)
    return y, grads, (running_mean, running_var, counter)


LAYOUTS = {
    "nchw": lambda x: x,
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "strided": lambda x: x[:, :, ::2],
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_matches_the_kernels(dtype, layout, train):
    """Same outputs, gradients, running statistics and strides as the kernels in the
    interpreter, within the two implementations' bounds added (both are bounded by the
    same table against the oracle); data at an offset 1000x its spread."""
    gen = torch.Generator().manual_seed(0)
    x = LAYOUTS[layout]((torch.randn(3, 5, 6, 4, generator=gen) + 1000).to(dtype))
    weight = torch.rand(5, generator=gen) + 0.5
    bias = torch.randn(5, generator=gen)
    count = x.numel() // x.shape[1]
    native = _run("native", x, train, weight, bias, momentum=None if train else 0.1)
    kernels = _run("interpreter", x, train, weight, bias, momentum=None if train else 0.1)
    y_n, y_k = native[0], kernels[0]
    assert y_n.dtype == y_k.dtype and y_n.stride() == y_k.stride()
    limit = 2 * bound_units("y", dtype, count) * EPS[dtype]
    assert (y_n.double() - y_k.double()).abs().max() <= limit * y_k.double().abs().max()
    for name, g_n, g_k in zip(("dx", "dweight", "dbias"), native[1], kernels[1]):
        assert g_n.dtype == g_k.dtype and g_n.stride() == g_k.stride(), name
        stored = g_n.dtype
        limit = 2 * bound_units(name, stored, count) * EPS[stored] * 4  # vs max|g|, not the sum of terms
        assert (g_n.double() - g_k.double()).abs().max() <= limit * g_k.double().abs().max() + 1e-30, name
    for s_n, s_k in zip(native[2], kernels[2]):
        assert torch.allclose(s_n.double(), s_k.double(), rtol=1e-6, atol=0), (s_n, s_k)


def test_native_keeps_the_pivot_exact_at_large_offsets():
    """The point of the pivot: at mean 1e6 x std, fp32 output within a few ulps of the
    float64 result (torch's own CPU batch norm on unshifted data is far off in eval)."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, 3, 16, generator=gen, dtype=torch.float64) + 1e6
    x = x64.float()
    exact = (x.double() - x.double().mean((0, 2), keepdim=True)) / x.double().std((0, 2), unbiased=False, keepdim=True)
    running_mean = x.double().mean((0, 2)).float()
    running_var = x.double().var((0, 2), unbiased=False).float()
    exact_eval = (x.double() - running_mean.double().view(1, -1, 1)) / running_var.double().sqrt().view(1, -1, 1)
    with bntriton.cpu_backend("native"):
        y = bntriton.batch_norm(x, None, None, training=True, eps=1e-30)
        y_eval = bntriton.batch_norm(x, running_mean, running_var, training=False, eps=1e-30)
    count = x.numel() // x.shape[1]
    bound = bound_units("y", torch.float32, count)
    assert normwise_error(y, exact, torch.float32) <= bound
    assert normwise_error(y_eval, exact_eval, torch.float32) <= bound


def _eval_at_offset(offset_in_stds, gen):
    """fp32 eval inputs whose running means lie ``offset_in_stds`` running stds from zero
    (either sign) and whose data span one running std on both sides of them (256 values
    per channel), with the float64 result and the error allowance of
    ``native_cpu._fold_is_exact_enough``'s analysis, in eps of max|y|: the exact shift's,
    plus the fold's where it runs."""
    channels, eps = 64, 1e-5
    std = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(channels, generator=gen) < 0.5, -1.0, 1.0)
    running_mean = (offset_in_stds * std * sign).float()
    running_var = (std * std).float()
    sigma = (running_var.double() + eps).sqrt()
    spread = torch.rand(16, channels, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    spread[0], spread[1] = 1.0, -1.0  # the data reach one running std on both sides
    x = (spread * sigma.view(1, -1, 1, 1) + running_mean.double().view(1, -1, 1, 1)).float()
    weight = torch.rand(channels, generator=gen) + 0.5
    bias = torch.rand(channels, generator=gen) * 0.5 - 0.25
    a = weight.double() / sigma
    exact = (x.double() - running_mean.double().view(1, -1, 1, 1)) * a.view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    d = ((x.double() - running_mean.double().view(1, -1, 1, 1)) * a.view(1, -1, 1, 1)).abs().max()
    top = exact.abs().max()

    def allowance(folded: bool) -> float:
        # 6u D + u |y| (the shift), + 3u M + u |bias| with M <= k |weight| (the fold), u = eps / 2.
        fold = 1.5 * offset_in_stds * weight.double().abs().max() + 0.5 * bias.double().abs().max()
        return float((3 * d + (fold if folded else 0.0)) / top + 0.5)

    return (x, running_mean, running_var, weight, bias, eps), exact, allowance


# native_cpu._fold_stds for _eval_at_offset's 256 values per channel: 2 (log2(256) - 1).
_FOLD_STDS_256 = 14.0


@pytest.mark.parametrize("offset_in_stds", [0.5, 13.9, 14.1, 100.0, 1e4])
def test_eval_takes_torchs_single_pass_only_where_it_stays_within_the_bound(offset_in_stds, monkeypatch):
    """Eval runs torch's one-pass fold while every running mean lies within
    ``2 (log2(count) - 1)`` running stds of zero (14 at 256 values per channel), where the
    analysis' worst case for the fold (the shift's 3.5 eps plus 1.5 per std and 0.5) still
    meets the y bound, and the exact shift beyond.  The result stays within the analysis'
    allowance and the y bound at every offset.  Forced at 1e4 stds, the fold leaves the
    bound: there the exact shift is what keeps y within it."""
    from bntriton.native import cpu as native_cpu

    bound = bound_units("y", torch.float32, 256)
    assert native_cpu._fold_stds(torch.float32, torch.float32, 256) == _FOLD_STDS_256
    assert 3.5 + 1.5 * _FOLD_STDS_256 + 0.5 <= bound < 3.5 + 1.5 * (_FOLD_STDS_256 + 0.5) + 0.5
    gen = torch.Generator().manual_seed(int(offset_in_stds * 10) + 1)
    args, exact, allowance = _eval_at_offset(offset_in_stds, gen)
    x = args[0]
    assert x.numel() // x.shape[1] == 256
    chosen = []
    original = native_cpu._fold_is_exact_enough
    monkeypatch.setattr(native_cpu, "_fold_is_exact_enough", lambda *a: chosen.append(original(*a)) or chosen[-1])
    with bntriton.cpu_backend("native"):
        y = bntriton.batch_norm(x, args[1], args[2], args[3], args[4], training=False, eps=args[5])
    folds = offset_in_stds <= _FOLD_STDS_256
    assert chosen == [folds]
    error = normwise_error(y, exact, torch.float32)
    assert error <= allowance(folds)
    assert error <= bound
    if offset_in_stds >= 1e4:
        folded = torch.batch_norm(x, args[3], args[4], args[1], args[2], False, 0.0, args[5], False)
        assert normwise_error(folded, exact, torch.float32) > bound


@pytest.mark.parametrize("dtype,offset_in_stds,folds", [
    (torch.bfloat16, 4.0, True), (torch.bfloat16, 1000.0, True),
    (torch.float16, 4.0, True), (torch.float16, 1000.0, True), (torch.float16, 20000.0, False),
])
def test_low_precision_eval_folds_far_further_out(dtype, offset_in_stds, folds, monkeypatch):
    """fp16 / bf16 input is folded in fp32 and rounded once into its own dtype: the fold's
    extra error stays a fraction of the output's eps up to 2 eps_in / eps32 running stds
    (16384 for fp16, 131072 for bf16), so eval takes torch's single pass out there too,
    and the exact shift beyond.  Either way y stays within its bound against float64 on
    the same (rounded) input."""
    from bntriton.native import cpu as native_cpu

    gen = torch.Generator().manual_seed(int(offset_in_stds) + 7)
    args, _, _ = _eval_at_offset(offset_in_stds, gen)
    x, running_mean, running_var, weight, bias, eps = args
    x = x.to(dtype)
    chosen = []
    original = native_cpu._fold_is_exact_enough
    monkeypatch.setattr(native_cpu, "_fold_is_exact_enough", lambda *a: chosen.append(original(*a)) or chosen[-1])
    with bntriton.cpu_backend("native"):
        y = bntriton.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
    assert chosen == [folds] and y.dtype == dtype
    a = weight.double() / (running_var.double() + eps).sqrt()
    exact = (x.double() - running_mean.double().view(1, -1, 1, 1)) * a.view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    assert normwise_error(y, exact, dtype) <= bound_units("y", dtype, x.numel() // x.shape[1])


def test_eval_fold_decision_follows_in_place_updates_of_the_running_statistics():
    """The fold decision is remembered per running-mean tensor for as long as neither
    running statistic changes: an in-place update (a training step, load_state_dict,
    an explicit ``add_``) must bring the exact shift back where the means move far
    from zero, and the fold where they come back."""
    gen = torch.Generator().manual_seed(11)
    args, _, _ = _eval_at_offset(0.5, gen)
    x, running_mean, running_var, weight, bias, eps = args
    with bntriton.cpu_backend("native"):
        for shift in (0.0, 1e4, -1e4):  # near zero, then 1e4 running stds out, then back
            moved_by = shift * running_var.sqrt()
            running_mean.add_(moved_by)
            x = (x.double() + moved_by.double().view(1, -1, 1, 1)).float()  # the data move with it
            y = bntriton.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
            a = weight.double() / (running_var.double() + eps).sqrt()
            exact = ((x.double() - running_mean.double().view(1, -1, 1, 1)) * a.view(1, -1, 1, 1)
                     + bias.double().view(1, -1, 1, 1))
            assert normwise_error(y, exact, torch.float32) <= bound_units("y", torch.float32, x.numel() // x.shape[1])
    with torch.inference_mode():  # inference tensors keep no version counter
        rm, rv = running_mean.clone(), running_var.clone()
        with bntriton.cpu_backend("native"):
            bntriton.batch_norm(x, rm, rv, weight, bias, training=False, eps=eps)


def _train_at_offset(offset_in_stds, gen, rows=4096, channels=32):
    """fp32 (rows, C) data whose batch mean lies ``offset_in_stds`` batch stds from zero
    and whose first 16 rows put it 3 of their own stds out: the kernels' pivot is nonzero
    in every channel, but close enough to the rule's edge that the unshifted problem is
    tried.  With the float64 result."""
    first_spread = offset_in_stds / 3
    head = torch.randn(16, channels, generator=gen, dtype=torch.float64)
    head = first_spread * (head - head.mean(0)) / head.std(0, unbiased=False)
    rest = torch.randn(rows - 16, channels, generator=gen, dtype=torch.float64)
    rest_spread = ((rows - 16 * first_spread**2) / (rows - 16)) ** 0.5  # overall std 1
    rest = rest_spread * (rest - rest.mean(0)) / rest.std(0, unbiased=False)
    sigma = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(channels, generator=gen) < 0.5, -1.0, 1.0)
    x = ((torch.cat([head, rest]) + offset_in_stds * sign) * sigma).float()
    weight = torch.rand(channels, generator=gen) + 0.5
    bias = torch.rand(channels, generator=gen) * 0.5 - 0.25
    eps = 1e-5
    xd = x.double()
    exact = (xd - xd.mean(0)) / (xd.var(0, unbiased=False) + eps).sqrt() * weight.double() + bias.double()
    return x, weight, bias, eps, exact


@pytest.mark.parametrize("offset_in_stds", [1.9, 2.1, 32.0])
def test_training_skips_the_shift_only_where_the_fold_is_as_accurate(offset_in_stds):
    """Training keeps the unshifted problem (pivot 0, no pass spent on x - K) only where
    the batch's mean is within two of its stds of zero (native_cpu.forward_train; the
    fold's analysis is _fold_is_exact_enough's, tested at its edge above), and is within
    the y bound either side of that edge.  A threshold moved past 2.1 stds fails the
    choice."""
    from bntriton.native import cpu as native_cpu
    from bntriton.kernels.layout import channel_view

    gen = torch.Generator().manual_seed(int(offset_in_stds * 10) + 7)
    x, weight, bias, eps, exact = _train_at_offset(offset_in_stds, gen)
    y, stats = native_cpu.forward_train(channel_view(x), weight, bias, eps)
    assert bool((stats.pivot == 0).all()) == (offset_in_stds <= 2.0)
    assert torch.equal(stats.mean, stats.pivot + stats.mean_shifted)
    assert normwise_error(y, exact, torch.float32) <= bound_units("y", torch.float32, x.shape[0])


def test_running_statistics_over_steps_match_torch():
    torch.manual_seed(0)
    ours = bntriton.BatchNorm2d(4, momentum=None)
    theirs = torch.nn.BatchNorm2d(4, momentum=None)
    with bntriton.cpu_backend("native"):
        for _ in range(3):
            x = torch.randn(4, 4, 3, 3) * 3 + 2
            ours(x)
            theirs(x)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    assert torch.allclose(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


def test_interpreter_leaks_no_numpy_warnings_on_nan_and_inf():
    x = torch.randn(4, 3, 5)
    x[0, 0, 0] = float("nan")
    x[1, 1, 1] = float("inf")
    x.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bntriton.cpu_backend("interpreter"):
            y = bntriton.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
            y.sum().backward()
            bntriton.batch_norm(x.detach(), torch.zeros(3), torch.ones(3), training=False)
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 2]).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_native_path_passes_forward_ad_and_batched_checks(training):
    """Forward-mode AD, batched (vmap over jvp) included, on the default CPU path."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    running_mean = torch.randn(2, generator=gen, dtype=torch.float64)
    running_var = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    stats = (None, None) if training else (running_mean, running_var)

    def fn(x, w, b):
        return bntriton.batch_norm(x, *stats, w, b, training=training)

    with bntriton.cpu_backend("native"):
        assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=True, check_forward_ad=True,
                                        check_batched_grad=True, check_batched_forward_grad=True)


def _training_parameters(gen, channels: int):
    """``(weight, bias, running statistics, their values before)`` for a training call:
    fp32 parameters that require grad, running statistics to be updated in place."""
    weight = (torch.rand(channels, generator=gen) + 0.5).requires_grad_()
    bias = (torch.rand(channels, generator=gen) - 0.5).requires_grad_()
    running = [torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.5]
    return weight, bias, running, [t.clone() for t in running]


def _training_errors(x, dy, weight, bias, before, running, y, dx) -> dict:
    """Each training output's error (fp16 / bf16 input, fp32 parameters and running
    statistics updated with momentum 0.5 from ``before``) against the float64 oracle,
    asserted within its bound: ``({quantity: error}, the oracle's forward result)``,
    errors in eps of their stored dtype."""
    from bntriton.verification import oracle
    from bntriton.verification.bounds import reduction_error

    xn, w64, b64 = x.double().numpy(), weight.detach().double().numpy(), bias.detach().double().numpy()
    ref = oracle.forward(xn, before[0].double().numpy(), before[1].double().numpy(), w64, b64, True, 0.5, 1e-5)
    grad = oracle.backward(dy.double().numpy(), xn, ref.mean, ref.var, w64, True, 1e-5)
    count = x.numel() // x.shape[1]
    errors = {
        "y": normwise_error(y, ref.y, x.dtype),
        "dx": normwise_error(dx, grad.dx, x.dtype, grad.dx_scale),
        "running_mean": normwise_error(running[0], ref.running_mean, torch.float32, ref.running_mean_magnitude),
        "running_var": normwise_error(running[1], ref.running_var, torch.float32),
        "dweight": reduction_error(weight.grad, grad.dweight, grad.dweight_scale, torch.float32),
        "dbias": reduction_error(bias.grad, grad.dbias, grad.dbias_scale, torch.float32),
    }
    stored = {"y": x.dtype, "dx": x.dtype}
    for name, error in errors.items():
        assert error <= bound_units(name, stored.get(name, torch.float32), count), (name, error)
    return errors, ref


@pytest.mark.parametrize("offset_in_stds", [0.0, 1.5, 8.0, 32.0, 1e4])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_reads_the_data_as_they_are_within_the_bounds(dtype, layout, offset_in_stds, monkeypatch):
    """fp16 / bf16 training with fp32 parameters and running statistics (autocast's mix):
    data whose means lie within two stds of zero go to torch's mixed-precision kernels
    without a conversion (statistics by runs, native_cpu._runs, unshifted); data a few
    stds out keep those statistics while native_cpu._offset_runs_fit says so (8 stds
    here) and are shifted by the pivot for the backward; data further out take their
    statistics from the exact fp32 shift; y and the gradients come from the data as they
    are (sums centred on the pivot) out to native_cpu._half_shift_stds (1024 stds for
    fp16, 8192 for bf16), from the fp32 shift beyond.  Either way y, dx, dweight, dbias
    and the running statistics are within the bound table against the float64 oracle,
    at a count (50176) where torch's whole-channel fp32 sums leave its running variance
    outside it."""
    from bntriton.native import cpu as native_cpu
    from bntriton.kernels.layout import channel_view

    gen = torch.Generator().manual_seed(int(offset_in_stds) * 7 + (layout == "nchw") + 3 * (dtype == torch.float16))
    channels, shape = 32, (16, 32, 56, 56)
    sigma = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(channels, generator=gen) < 0.5, -1.0, 1.0).double()
    x = ((torch.randn(shape, generator=gen, dtype=torch.float64) + offset_in_stds * sign.view(1, -1, 1, 1))
         * sigma.view(1, -1, 1, 1)).to(dtype)
    dy = (torch.randn(shape, generator=gen) + 3.0).to(dtype)  # one-signed mostly: long sums grow
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    weight, bias, running, before = _training_parameters(gen, channels)

    read = []  # the dtypes the backward's runs read: the input's own out to _half_shift_stds
    original = native_cpu._run_backward
    monkeypatch.setattr(native_cpu, "_run_backward", lambda view, m, *a: read.append(m.dtype) or original(view, m, *a))
    normalized = []  # the dtypes y is computed from: the input's own out to _half_shift_stds
    original_normalized = native_cpu._normalized
    monkeypatch.setattr(native_cpu, "_normalized",
                        lambda m, *a: normalized.append(m.dtype) or original_normalized(m, *a))
    shifted_statistics = []  # whether the forward's statistics came from the fp32 shift
    original_statistics = native_cpu._run_statistics
    monkeypatch.setattr(native_cpu, "_run_statistics", lambda view, m, eps, **k: shifted_statistics.append(
        k.get("pivot") is not None) or original_statistics(view, m, eps, **k))
    leaf = x.clone().requires_grad_()
    with bntriton.cpu_backend("native"):
        y = bntriton.batch_norm(leaf, *running, weight, bias, training=True, momentum=0.5)
        y.backward(dy)
        _, stats = native_cpu.forward_train(channel_view(x), weight.detach(), bias.detach(), 1e-5)
    near = offset_in_stds <= 2.0
    as_they_are = offset_in_stds <= native_cpu._half_shift_stds(dtype, torch.float32)
    assert bool((stats.pivot == 0).all()) == near and (dtype in read) == as_they_are
    # Statistics of the runs as they are within a few stds (one try each call), of the
    # fp32 shift beyond (the first rows say so before any try).
    assert shifted_statistics == [offset_in_stds > 8.0] * 2
    assert normalized == [dtype if as_they_are else torch.float32] * 2
    assert stats.mean.dtype == stats.rstd.dtype == stats.var_unbiased.dtype == torch.float32
    assert y.dtype == leaf.grad.dtype == dtype and y.stride() == leaf.grad.stride() == x.stride()

    errors, ref = _training_errors(x, dy, weight, bias, before, running, y, leaf.grad)
    # torch's own result on the same inputs is no more accurate.
    theirs = [t.clone() for t in before]
    torch.nn.functional.batch_norm(x, *theirs, weight.detach(), bias.detach(), True, 0.5, 1e-5)
    assert errors["running_var"] <= normwise_error(theirs[1], ref.running_var, torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_offset_half_statistics_hold_when_every_runs_rounding_aligns(dtype, layout, monkeypatch):
    """The statistics of fp16 / bf16 data a few stds out from runs as they are
    (native_cpu._offset_run_errors) are within the bounds for a batch of identical
    samples, whose runs are identical too: their roundings add up instead of averaging
    out, the case the runs' length (native_cpu._OFFSET_RUN) and the estimate are for.
    Also a constant dy, which carries the mean's error into dweight undiluted.  At 6 and
    10 stds the estimate keeps these statistics (channels-first), whose running variance
    and dweight then stay within the quarter of their bounds it budgets; at 16 they are not kept
    (the limit on x_hat's error is 11.96 fp32 eps at this count:
    native_cpu._offset_runs_limits) and the fp32 shift runs.  Within the bounds either way."""
    from bntriton.native import cpu as native_cpu

    estimates = []
    original = native_cpu._offset_run_errors
    monkeypatch.setattr(native_cpu, "_offset_run_errors", lambda *a: estimates.append(original(*a)) or estimates[-1])
    for offset_in_stds, kept in ((6.0, True), (10.0, True), (16.0, False)):
        estimates.clear()
        gen = torch.Generator().manual_seed(11 + (layout == "nchw") + 2 * (dtype == torch.float16))
        channels = 32
        sigma = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
        sample = (torch.randn(1, channels, 56, 56, generator=gen, dtype=torch.float64) + offset_in_stds) * sigma.view(
            1, -1, 1, 1)
        x = sample.expand(16, -1, -1, -1).to(dtype).contiguous()
        dy = torch.ones_like(x)
        if layout == "channels_last":
            x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
        weight, bias, running, before = _training_parameters(gen, channels)
        leaf = x.clone().requires_grad_()
        with bntriton.cpu_backend("native"):
            y = bntriton.batch_norm(leaf, *running, weight, bias, training=True, momentum=0.5)
            y.backward(dy)
        # Kept: estimated and within the limits; else not tried (the first rows' gate) or not
        # kept.  (Channels-last runs take rows a quarter of a sample apart, four values of
        # each identical sample: their means spread, and the estimate keeps them at 6 stds
        # but not at 10; their bounds are checked all the same.)
        tried_and_kept = len(estimates) == 1 and native_cpu._offset_runs_fit(estimates[0], x.numel() // channels)
        assert tried_and_kept == kept or layout == "channels_last"
        errors, _ = _training_errors(x, dy, weight, bias, before, running, y, leaf.grad)
        if tried_and_kept:  # what the estimate budgets: a quarter of the bound
            count = x.numel() // channels
            for name in ("running_var", "dweight"):
                assert errors[name] <= bound_units(name, torch.float32, count) / 4, (name, errors[name])


LONG_CASES = {
    # (shape, layout, dtype): 100352 values per channel, where torch's sequential sums
    # (a thread's rows for channels-last data, count / lanes per lane for fp64 NCHW)
    # leave its statistics and gradients outside the bound table.
    "nhwc-fp32": ((32, 64, 56, 56), "channels_last", torch.float32),
    "nc-fp32": ((100352, 64), "nc", torch.float32),
    "nhwc-fp64": ((32, 64, 56, 56), "channels_last", torch.float64),
    "nchw-fp64": ((32, 64, 56, 56), "nchw", torch.float64),
}


@pytest.mark.parametrize("offset_in_stds", [0.0, 1.5, 32.0])
@pytest.mark.parametrize("case", list(LONG_CASES))
def test_long_channels_are_within_the_bounds(case, offset_in_stds):
    """fp32 / fp64 training forward + backward with 100352 values per channel, against the
    float64 oracle: y, dx, dweight, dbias, the running statistics and the saved mean,
    rstd and unbiased variance within the bound table, whether the data are shifted (32
    stds) or not (0 and 1.5), with the input's strides and the accumulator's dtypes kept.
    torch's own kernels at this size put the running variance or the parameter gradients
    outside it (native_cpu._runs), so a native path that handed them through fails."""
    from bntriton.native import cpu as native_cpu
    from bntriton.kernels.layout import channel_view
    from bntriton.verification import oracle
    from bntriton.verification.bounds import reduction_error

    shape, layout, dtype = LONG_CASES[case]
    gen = torch.Generator().manual_seed(list(LONG_CASES).index(case) * 100 + int(offset_in_stds * 10))
    channels = shape[1]
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    sigma = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(channels, generator=gen) < 0.5, -1.0, 1.0).double()
    x = ((torch.randn(shape, generator=gen, dtype=torch.float64) + offset_in_stds * sign.view(per_channel))
         * sigma.view(per_channel)).to(dtype)
    dy = (torch.randn(shape, generator=gen, dtype=torch.float64) + 3.0).to(dtype)  # long sums grow
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    weight = (torch.rand(channels, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    bias = (torch.rand(channels, generator=gen, dtype=dtype) - 0.5).requires_grad_()
    running = [torch.randn(channels, generator=gen, dtype=dtype), torch.rand(channels, generator=gen, dtype=dtype) + 0.5]
    before = [t.clone() for t in running]
    eps = 1e-5

    leaf = x.clone().requires_grad_()
    with bntriton.cpu_backend("native"):
        y = bntriton.batch_norm(leaf, *running, weight, bias, training=True, momentum=0.5, eps=eps)
        y.backward(dy)
        _, stats = native_cpu.forward_train(channel_view(x), weight.detach(), bias.detach(), eps)
    assert bool((stats.pivot == 0).all()) == (offset_in_stds <= 2.0)
    assert y.dtype == leaf.grad.dtype == dtype and y.stride() == leaf.grad.stride() == x.stride()
    assert stats.mean.dtype == stats.rstd.dtype == stats.var_unbiased.dtype == dtype

    # The oracle takes channels-first arrays: NumPy sums the contiguous spatial axis
    # pairwise, while over channels-last strides its float64 sums run in sequence and err,
    # at this size, by more than the fp64 bounds (up to 6x).
    xn = x.double().contiguous().numpy()
    w64, b64 = weight.detach().double().numpy(), bias.detach().double().numpy()
    ref = oracle.forward(xn, before[0].double().numpy(), before[1].double().numpy(), w64, b64, True, 0.5, eps)
    grad = oracle.backward(dy.double().contiguous().numpy(), xn, ref.mean, ref.var, w64, True, eps)
    count = x.numel() // channels
    dims = tuple(d for d in range(x.dim()) if d != 1)
    var = torch.from_numpy(ref.var)
    errors = {
        "y": normwise_error(y, ref.y, dtype),
        "dx": normwise_error(leaf.grad, grad.dx, dtype, grad.dx_scale),
        "dweight": reduction_error(weight.grad, grad.dweight, grad.dweight_scale, dtype),
        "dbias": reduction_error(bias.grad, grad.dbias, grad.dbias_scale, dtype),
        "running_mean": normwise_error(running[0], ref.running_mean, dtype, ref.running_mean_magnitude),
        "running_var": normwise_error(running[1], ref.running_var, dtype),
        # The saved statistics: the mean as a batch mean (relative to max|x|), the unbiased
        # variance as the running one, rstd as y's per-channel scale.
        ("running_mean", "saved mean"): normwise_error(stats.mean, ref.mean, dtype, x.double().abs().amax(dims)),
        ("running_var", "saved var_unbiased"): normwise_error(stats.var_unbiased, var * count / (count - 1), dtype),
        ("y", "saved rstd"): normwise_error(stats.rstd, (var + eps).rsqrt(), dtype),
    }
    over = {}
    for key, error in errors.items():
        name = key[0] if isinstance(key, tuple) else key
        units = bound_units(name, dtype, count)
        if error > units:
            over[key] = round(error / units, 3)
    assert not over, f"outside the bound (multiples of it): {over}"


@pytest.mark.parametrize("gated", [False, True], ids=["small", "gated"])
@pytest.mark.parametrize("offset_in_stds", [1.5, 32.0])
def test_training_tries_the_unshifted_problem_without_asking_the_first_rows_below_the_gate(
        gated, offset_in_stds, monkeypatch):
    """Below native_cpu._GATE_VALUES the training forward runs torch's pass on the data as
    they are before anything else (the first rows are read only if the batch's mean lies
    beyond two stds); from it on, the first rows decide first, so that data far from zero
    spend no pass on a try that is thrown away.  Either way the result is within the y
    bound and shifted exactly where the mean is beyond two stds."""
    from bntriton.native import cpu as native_cpu
    from bntriton.kernels.layout import channel_view

    gen = torch.Generator().manual_seed(int(offset_in_stds) + 11 * gated)
    rows, channels = 512, 16
    x = (torch.randn(rows, channels, generator=gen) + offset_in_stds) * 3.0
    monkeypatch.setattr(native_cpu, "_GATE_VALUES", x.numel() if gated else x.numel() + 1)
    calls = {"first_rows": 0, "native_forward": 0}
    for name in calls:
        original = getattr(native_cpu, "_" + name)

        def counted(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(native_cpu, "_" + name, counted)
    y, stats = native_cpu.forward_train(channel_view(x), None, None, 1e-5)
    near = offset_in_stds <= 2.0
    assert bool((stats.pivot == 0).all()) == near
    assert calls["first_rows"] == (1 if gated or not near else 0)
    assert calls["native_forward"] == (1 if gated or near else 2)
    xd = x.double()
    exact = (xd - xd.mean(0)) / (xd.var(0, unbiased=False) + 1e-5).sqrt()
    assert normwise_error(y, exact, torch.float32) <= bound_units("y", torch.float32, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_running_update_rounds_as_the_kernels_formula_within_an_ulp(dtype, momentum):
    """The native update, ``(1 - f) running + f batch`` with f and 1 - f rounded to the
    accumulator dtype, is within one ulp of the terms' magnitudes of that formula evaluated
    exactly (what its two roundings can cost; the buffers' signs may cancel), over several
    steps, for both buffers and the counter (momentum None: f = 1 / count)."""
    from bntriton.native import cpu as native_cpu

    gen = torch.Generator().manual_seed(3)
    running_mean = torch.randn(64, generator=gen, dtype=dtype) * 5
    running_var = torch.rand(64, generator=gen, dtype=dtype) * 4 + 0.1
    counter = torch.tensor(0, dtype=torch.long)
    for step in range(1, 4):
        mean = torch.randn(64, generator=gen, dtype=dtype) * 5
        var = torch.rand(64, generator=gen, dtype=dtype) * 4 + 0.1
        factor = torch.tensor(momentum if momentum is not None else 1.0 / step, dtype=dtype)
        keep = (1.0 - factor).double()
        pairs = ((running_mean, mean), (running_var, var))
        expected = [keep * r.double() + factor.double() * b.double() for r, b in pairs]
        magnitudes = [keep * r.double().abs() + factor.double() * b.double().abs() for r, b in pairs]
        native_cpu.update_running_stats(running_mean, running_var, counter, mean, var, momentum)
        assert counter.item() == step
        for got, exact, magnitude in zip((running_mean, running_var), expected, magnitudes):
            ulp = torch.finfo(dtype).eps * magnitude
            assert got.dtype == dtype
            assert bool(((got.double() - exact).abs() <= ulp).all())


def test_running_update_of_buffers_in_another_dtype_rounds_once():
    """fp32 statistics into bf16 running buffers (the buffers' dtype is kept): computed in
    fp32 and rounded once, within half a bf16 ulp of the exact update."""
    from bntriton.native import cpu as native_cpu

    gen = torch.Generator().manual_seed(4)
    running_mean = (torch.randn(64, generator=gen) * 5).bfloat16()
    running_var = (torch.rand(64, generator=gen) + 0.5).bfloat16()
    mean, var = torch.randn(64, generator=gen) * 5, torch.rand(64, generator=gen) + 0.5
    expected = [0.9 * r.double() + 0.1 * b.double() for r, b in ((running_mean, mean), (running_var, var))]
    native_cpu.update_running_stats(running_mean, running_var, None, mean, var, 0.1)
    for got, exact in zip((running_mean, running_var), expected):
        assert got.dtype == torch.bfloat16
        assert bool(((got.double() - exact).abs() <= 0.5 * torch.finfo(torch.bfloat16).eps * exact.abs() * 1.01).all())
