"""One correctness check per case before anything is timed: each provider, torch eager
included, against torch's batch norm in float64 on the same inputs (upcast, on their
device), pass by pass.  A fast wrong kernel must show up as a failure, not as a number.

The reference is float64, not torch eager at the stored dtype: on CUDA torch reduces
dweight / dbias of half-precision inputs in low precision, and a reference that far off
would fail correct providers.  The bound (:func:`loose_bound`, the one bound of this
check) is loose on purpose.  A correct implementation is within a few roundings of the
stored dtype plus reduction error growing like log2(count) in fp32 of the exact result;
a wrong kernel (bad index, missed tile, wrong channel) is off by O(1).  The float64
oracle and the tight per-quantity table (bntriton.verification.bounds) belong to the test
suite; this only guards the sweep, on data too large for the oracle on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from bntriton.verification.bounds import EPS

from providers import EPS as BN_EPS
from providers import MOMENTUM, Provider


def loose_bound(stored: torch.dtype, count: int) -> float:
    """Allowed error, as a fraction: 8 ulps of the stored dtype plus 32 * log2(count) fp32 ulps."""
    return 8 * EPS[stored] + 32 * math.log2(max(count, 2)) * EPS[torch.float32]


@dataclass
class Inputs:
    x: torch.Tensor            # requires grad
    weight: torch.Tensor       # fp32, requires grad (AMP keeps parameters in fp32)
    bias: torch.Tensor
    running_mean: torch.Tensor  # fp32; cloned per call that updates them
    running_var: torch.Tensor
    dy: torch.Tensor           # same shape, dtype and memory format as x


def make_inputs(case, device: torch.device, seed: int = 0) -> Inputs:
    """Random, non-trivial data (never zeros: they hide unwritten outputs): x with an offset
    from zero, weight around 1, small bias, running statistics away from (0, 1)."""
    from suites import MEMORY_FORMATS

    gen = torch.Generator(device=device).manual_seed(seed)
    fmt = MEMORY_FORMATS[case.layout]
    channels = case.shape[1]

    def randn(shape, dtype, memory_format=torch.contiguous_format):
        t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        return t.normal_(generator=gen)

    x = (randn(case.shape, case.dtype, fmt).mul_(1.5).add_(0.25)).requires_grad_()
    dy = randn(case.shape, case.dtype, fmt)
    weight = randn((channels,), torch.float32).mul_(0.1).add_(1.0).requires_grad_()
    bias = randn((channels,), torch.float32).mul_(0.1).requires_grad_()
    running_mean = randn((channels,), torch.float32).mul_(0.1)
    running_var = randn((channels,), torch.float32).abs_().mul_(0.5).add_(0.75)
    return Inputs(x, weight, bias, running_mean, running_var, dy)


@dataclass
class Outputs:
    y_train: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    y_eval: torch.Tensor
    dx: torch.Tensor
    dweight: torch.Tensor
    dbias: torch.Tensor


def run_once(provider: Provider, inp: Inputs) -> Outputs:
    """Every pass of ``provider`` once (this also compiles and warms it up)."""
    rm, rv = inp.running_mean.clone(), inp.running_var.clone()
    with provider.context():
        y_train = provider.forward(inp.x, rm, rv, inp.weight, inp.bias, True)
        dx, dweight, dbias = torch.autograd.grad(y_train, (inp.x, inp.weight, inp.bias), inp.dy)
        with torch.no_grad():
            y_eval = provider.forward(inp.x.detach(), inp.running_mean, inp.running_var,
                                      inp.weight, inp.bias, False)
    return Outputs(y_train.detach(), rm, rv, y_eval, dx, dweight, dbias)


def reference(inp: Inputs) -> Outputs:
    """Every pass of torch's batch norm in float64 on ``inp`` upcast, on its device."""
    f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731 (keeps x's memory format)
    x, weight, bias = (f64(t).requires_grad_() for t in (inp.x, inp.weight, inp.bias))
    rm, rv = f64(inp.running_mean), f64(inp.running_var)
    y_train = F.batch_norm(x, rm, rv, weight, bias, True, MOMENTUM, BN_EPS)
    dx, dweight, dbias = torch.autograd.grad(y_train, (x, weight, bias), f64(inp.dy))
    with torch.no_grad():
        y_eval = F.batch_norm(x.detach(), f64(inp.running_mean), f64(inp.running_var),
                              weight.detach(), bias.detach(), False, MOMENTUM, BN_EPS)
    return Outputs(y_train.detach(), rm, rv, y_eval, dx, dweight, dbias)


def _normwise(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|, inf when out has a non-finite value where ref has none."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return math.inf
    if not torch.equal(torch.isfinite(out), torch.isfinite(ref)):
        return math.inf
    finite = torch.isfinite(ref)
    diff = torch.where(finite, out - ref, 0).abs().max().item()
    scale = torch.where(finite, ref, 0).abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _per_channel(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> float:
    """max over channels of |out - ref| / sum|terms|: a reduction's rounding error scales
    with the magnitude of what it adds, not with a result that may cancel to ~0."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).abs() / magnitude.clamp_min(1e-30)).max().item()


def compare(out: Outputs, ref: Outputs, inp: Inputs, case) -> Dict[str, List[str]]:
    """Per pass, the quantities where ``out`` is outside the loose bound of ``ref`` (the
    float64 :func:`reference`; empty: all within)."""
    count = case.values_per_channel
    dims = [d for d in range(inp.x.dim()) if d != 1]
    # The terms of the reductions dbias = sum(dy) and dweight = sum(dy * x_hat), with x_hat
    # recovered from the reference's output (y = x_hat * weight + bias).
    with torch.no_grad():
        dy = inp.dy.double()
        shape = [1] * inp.x.dim()
        shape[1] = -1
        x_hat = (ref.y_train.double() - inp.bias.double().view(shape)) / inp.weight.double().view(shape)
        mag_dbias = dy.abs().sum(dims)
        mag_dweight = (dy * x_hat).abs().sum(dims)
        del dy, x_hat
    checks = {
        "fwd_train": [("y", _normwise(out.y_train, ref.y_train), case.dtype),
                      ("running_mean", _normwise(out.running_mean, ref.running_mean), torch.float32),
                      ("running_var", _normwise(out.running_var, ref.running_var), torch.float32)],
        "bwd_train": [("dx", _normwise(out.dx, ref.dx), case.dtype),
                      ("dweight", _per_channel(out.dweight, ref.dweight, mag_dweight), out.dweight.dtype),
                      ("dbias", _per_channel(out.dbias, ref.dbias, mag_dbias), out.dbias.dtype)],
        "fwd_eval": [("y", _normwise(out.y_eval, ref.y_eval), case.dtype)],
    }
    failures: Dict[str, List[str]] = {}
    for pass_, items in checks.items():
        for quantity, err, stored in items:
            bound = loose_bound(stored, count)
            if not err <= bound:  # also catches NaN
                failures.setdefault(pass_, []).append(f"{quantity} error {err:.3g} > bound {bound:.3g}")
    return failures
