"""Error metrics and per-dtype error bounds: the one place that tests and `verify` take
tolerances from.  Two tiers: bntriton's tight table (:data:`BOUNDS`: beyond it a result
is *less precise*) and, at the end of this module, the loose tier of a straightforward
correct implementation (:data:`LOOSE_BOUNDS`: beyond it a result is *wrong*).

Every error is measured against the float64 oracle (verification/oracle.py) and expressed in
units of the machine epsilon of the dtype the quantity is stored in (``EPS``):

* ``y`` and the running variance: ``max|out - ref| / max|ref|`` (normwise, infinity
  norm);
* the running mean: ``max|out - ref| / max(magnitude)`` with the magnitude the update
  was computed from (``reference.ForwardResult.running_mean_magnitude``: the old value
  and the largest ``|x|`` of each batch): a batch mean near zero of data with a large
  spread is only accurate relative to that spread;
* ``dx``: ``max|out - ref| / max(magnitude)`` with the magnitude of the terms dx is the
  difference of (``reference.BackwardResult.dx_scale``): with two values per channel,
  say, dx is nearly zero by cancellation and only an error relative to those terms
  means anything;
* the reductions ``dweight = sum(dy * x_hat)`` and ``dbias = sum(dy)``: per channel
  ``|out - ref| / sum|term|``, the largest over channels.  Dividing by the sum of the
  magnitudes (not by the result) is what a reduction's rounding error is proportional
  to, so a sum that cancels to nearly zero is judged fairly.

A bound has two parts, in units of the stored dtype's eps:

``rounding``
    the final rounding into the stored dtype (half an ulp for the result plus half an
    ulp for the per-channel coefficients it is computed from when those are stored in
    the same dtype; one more for the running statistics' momentum update), plus one ulp
    for bf16: an implementation may round a bf16 result twice (torch's eager bf16 batch
    norm is off by up to 1.1 ulp, e.g. strided_params).  bntriton's own bf16 outputs
    need no such allowance since the interpreter's bf16 stores round to nearest even as
    the GPU's do (kernels/runtime.py; it used to truncate): its bf16 errors measure under
    half an ulp (perf/bound_margins.py).
``growth * log2(count)``
    in units of the *accumulator's* eps (fp32, or fp64 for fp64 input): the rounding
    error of the reductions over ``count`` values.  Every reduction is a tree (tiles
    summed pairwise in the interpreter, as a tree on the GPU) whose partial results are
    added with compensation (two_sum), so its error grows with the depth, log2(count),
    not with the count.  Per tree level a sum rounds once, relative to the sum of
    |terms|; ``growth`` is twice the number of such sums that reach a quantity, because
    a GPU thread adds its own few elements in sequence before the tree, which makes the
    tree up to twice as deep as log2(count) for the tile sizes plans.py picks:

    ======================  ==========================================  ======
    quantity                sums reaching it (per level)                growth
    ======================  ==========================================  ======
    y                       the mean; half the variance's (a sqrt)       3
    dx                      sum(dy), sum(dy * x_hat), rstd**2            6
    dweight                 sum(dy * x_hat), half the variance's         3
    dbias                   sum(dy)                                      2
    running_mean            the mean                                     2
    running_var             the sum of squares                           2
    ======================  ==========================================  ======

    This term is what dominates for fp32 and fp64; it is negligible next to the
    rounding term for fp16 and bf16.

Measured (``perf/bound_margins.py``, every family, CPU interpreter): the largest error
is at most half of its bound for every quantity and dtype, and the growth coefficient it
implies at most 1 (the table's are 2 to 6, for the GPU's deeper trees).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

EPS = {
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    torch.float32: 2.0**-23,
    torch.float64: 2.0**-52,
}


def accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Bound:
    rounding: float  # units of the stored dtype's eps
    growth: float    # units of the accumulator's eps, per log2(count)

    def units(self, stored: torch.dtype, count: int) -> float:
        """The bound in units of ``EPS[stored]`` for a reduction over ``count`` values."""
        extra_bf16 = 1.0 if stored == torch.bfloat16 else 0.0
        depth = math.log2(max(count, 2))
        ratio = EPS[accumulator(stored)] / EPS[stored]
        return self.rounding + extra_bf16 + self.growth * depth * ratio


# The table.  ``count`` is the number of values per channel (N * spatial).
BOUNDS = {
    "y": Bound(rounding=1.0, growth=3.0),
    "dx": Bound(rounding=1.0, growth=6.0),
    "dweight": Bound(rounding=1.0, growth=3.0),
    "dbias": Bound(rounding=1.0, growth=2.0),
    "running_mean": Bound(rounding=2.0, growth=2.0),
    "running_var": Bound(rounding=2.0, growth=2.0),
    # Second-order gradients (d/dx, d/dgamma, d/ddy of <v, dx> + <u, dgamma>), normwise, in
    # units of the coarser of the input's and the stored dtype (see ``second_order_dtype``).
    # The derivative of the backward chains two rounds of reductions (the backward's, and
    # the forward statistics it depends on): twice the backward's growth.  Rounding: an
    # implementation may differentiate through the intermediates of its backward kept in
    # the input's dtype (x_hat, dy - mean(dy), their combination, dx), half an ulp each,
    # plus the result's own rounding: 4 half-ulps in all, rounded up to 4 ulps.
    "d2x": Bound(rounding=4.0, growth=16.0),
    "d2weight": Bound(rounding=4.0, growth=16.0),
    "d2dy": Bound(rounding=4.0, growth=16.0),
}


def second_order_dtype(input_dtype: torch.dtype, stored: torch.dtype) -> torch.dtype:
    """The dtype whose eps measures a second-order gradient: the coarser of the input's
    and the one it is stored in.  A second-order gradient is the derivative of the first
    one, dx, which exists only in the input's dtype; so fp32 parameters of an fp16 input
    get second-order gradients good to fp16's precision, not fp32's."""
    return input_dtype if EPS[input_dtype] > EPS[stored] else stored


# Batch norm with a fused epilogue, act(BN(x) + residual).  The activations are at most
# 1.13-Lipschitz (gelu; silu 1.10, relu 1) with second derivatives below 1, so an error
# in z passes to y and to act'(z) nearly unchanged; evaluating exp / erf and the
# derivative in the accumulator adds a few of its ulps (the rounding terms below, in
# the stored dtype's units, cover them for fp32 / fp64 and overestimate for fp16 / bf16).
# y and the residual's gradient are measured normwise against the pre-activation's and
# dz's magnitude; dx, dweight and dbias as above, of dz.
BOUNDS.update({
    "y_act": Bound(rounding=4.0, growth=5.0),
    "dresidual": Bound(rounding=4.0, growth=5.0),
    "dx_act": Bound(rounding=2.0, growth=10.0),
    "dweight_act": Bound(rounding=2.0, growth=6.0),
    "dbias_act": Bound(rounding=2.0, growth=6.0),
})


def recovery_condition(weight, bias, z_max: float, x_hat_max: float) -> float:
    """How much in-place activated batch norm amplifies the rounding of its saved output.

    The backward recovers ``x_hat = (z - bias) / weight`` from z, which was rounded to
    the stored dtype (relative error eps of |z|): the error in x_hat is then up to
    ``eps * (|z| + |bias|) / |weight|``, against an x_hat of size ``x_hat_max``.  The
    bounds for dx / dweight / dbias of the in-place path are the table's times this
    factor (at least 1).
    """
    w = np.abs(_f64(weight)) if weight is not None else np.ones(1)
    b = np.abs(_f64(bias)) if bias is not None else np.zeros_like(w)
    return float(max(1.0, np.max((z_max + b) / w) / max(x_hat_max, 1e-300)))


def bound_units(quantity: str, stored: torch.dtype, count: int) -> float:
    return BOUNDS[quantity].units(stored, count)


def identity_units(stored: torch.dtype, count: int) -> float:
    """Bound on ``max|y - x| / max|x|`` (units of ``EPS[stored]``) for a training-mode batch
    norm whose gamma = sqrt(var + eps) and beta = mean are the batch's own statistics,
    computed exactly and rounded to ``stored``: the layer is then the identity up to rounding.

    ``y`` is within the ``"y"`` bound of the exact output for the rounded parameters, ``ref``
    (taken relative to ``max|ref|``, which is ``max|x|`` to within 1.5 eps).  Rounding gamma
    and beta to ``stored`` (half an ulp each) moves ``ref`` from ``x`` by at most
    ``eps/2 * (|x - mean| + |mean|) <= eps/2 * 3 max|x|``: 1.5 units more.
    """
    return bound_units("y", stored, count) + 1.5


def _f64(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def normwise_error(out, ref, stored: torch.dtype, magnitude=None) -> float:
    """``max|out - ref| / max|magnitude|`` (``magnitude`` defaults to ``ref``) in units of
    ``EPS[stored]``; inf if ``out`` is not finite exactly where ``ref`` is finite."""
    out, ref = _f64(out), _f64(ref)
    magnitude = ref if magnitude is None else _f64(magnitude)
    if out.size == 0:
        return 0.0
    if not np.array_equal(np.isfinite(out), np.isfinite(ref)):
        return math.inf
    finite = np.isfinite(ref)
    diff = np.abs(out[finite] - ref[finite]).max(initial=0.0)
    scale = np.abs(magnitude[finite]).max(initial=0.0)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return float(diff / scale / EPS[stored])


def reduction_error(out, ref, magnitude, stored: torch.dtype) -> float:
    """Per channel ``|out - ref| / magnitude`` (``magnitude = sum|term|``), the largest,
    in units of ``EPS[stored]``."""
    out, ref, magnitude = _f64(out), _f64(ref), _f64(magnitude)
    if out.size == 0:
        return 0.0
    if not np.array_equal(np.isfinite(out), np.isfinite(ref)):
        return math.inf
    finite = np.isfinite(ref)
    diff = np.abs(out[finite] - ref[finite])
    scale = np.where(magnitude[finite] > 0, magnitude[finite], 1.0)
    if np.any(diff[magnitude[finite] == 0] > 0):
        return math.inf
    return float((diff / scale).max(initial=0.0) / EPS[stored])


# ------------------------------------------------------------------ the "wrong" tier
#
# The table above is tight on purpose: bntriton meets it with a 2x margin, thanks to tree
# reductions with compensation and shifted statistics.  A correct implementation written
# the straightforward way (sequential sums in the accumulator, unshifted two-pass
# statistics, intermediates rounded to the input's dtype) can miss it, as torch's own
# batch norm does.  Missing it makes an implementation *less precise*, not wrong.  An
# implementation is *wrong* only where its error is beyond what that straightforward
# implementation can reach; the bound for that, per quantity:
#
#     loose = (R + T * cond) * eps(coarse) + S * n * cond * eps(acc)   (in units of eps(stored))
#
# ``n * eps(acc)``
#     a sequential (recursive) sum of n terms in the accumulator (fp32, fp64 for fp64
#     input) errs by at most gamma_(n-1) ~ (n - 1) eps relative to the sum of |terms|
#     (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 4.2): the
#     worst case of the simplest correct code, not its typical sqrt(n) growth.
# ``S``
#     the number of such sums that reach the quantity (their errors add to first order).
# ``cond``
#     how much the data amplify those errors: :func:`loose_conditions`.  A batch mean
#     errs by n eps relative to max|x|, not to the spread, so an unshifted x - mean errs
#     by n eps * |offset| / std in units of the spread: the data's condition
#     ``kappa = max over channels of (max|x| + |mean|) / sqrt(var + eps)`` (at least 1,
#     and at least max|x_hat|).  In an unshifted two-pass variance the mean's error
#     enters squared, (n eps kappa)^2 <= n eps kappa while n eps kappa < 1: kappa covers it.
# ``R * eps(coarse)``
#     rounding the result and the elementwise intermediates (x - mean, x_hat, gamma *
#     x_hat, dweight before its cast...) to the input's dtype, half an ulp each, counted
#     in the coarser of the input's and the stored dtype (``coarse``: an fp16 input's
#     dweight may pass through fp16 on its way to an fp32 parameter's gradient, as in
#     torch's CPU bf16 batch norm), plus one ulp for bf16 as in the table above.
# ``T * cond * eps(coarse)``
#     the per-channel statistics (mean, rstd, or a folded scale and shift) kept in the
#     coarse dtype, half an ulp each: the mean's rounding is amplified by |offset| / std
#     like its summation error.  torch's CPU batch norm keeps them in the parameters'
#     dtype (bf16 parameters, bf16 mean: 20 bf16 eps of y at offset 100).  T = 1 for the
#     quantities that normalize with them and for the running variance (a variance taken
#     about a mean rounded to the coarse dtype errs by (eps * cond)^2 <= eps * cond
#     relatively: torch's bf16 running variance, 9.5 bf16 eps at offset 100 x std), 0
#     for dbias and the running mean (its rounding is relative to max|x|, as its error).
#
# Running statistics updated over several steps: every update rounds anew and the earlier
# steps' errors carry over (times 1 - momentum <= 1), so their tier is the above times the
# number of steps (harness.py).
#
# Where ``S * n * cond * eps(acc)`` reaches 1 the straightforward implementation
# promises nothing, and neither does this bound: only a non-finite answer, a NaN out of
# its channel or a semantic problem (strides, running statistics, buffers) is wrong then.
#
# Checked (tests/test_verify_verdicts.py, docs/conformance.md): torch eager and a
# textbook fp32 two-pass implementation with sequential sums are never wrong on the
# quick set of any family, nor on the full random family for seeds 0 to 8 (their
# largest error is a third of this tier); on the full set torch is wrong only where its
# CPU backward of an (N, C) input reads a strided weight as if it were contiguous (NaN
# from outside the view reaches dx: a torch bug).  The planted bugs of the tests
# (biased running variance, E[x^2] - E[x]^2 in the input's dtype, statistics updated in
# a copy, a silently first-order backward, dweight * (1 + 1e-3), dweight without its
# mean term) are wrong.

@dataclass(frozen=True)
class LooseBound:
    rounding: float  # R: half-ulps of the coarser of the input's and the stored dtype, counted as ulps
    stats: float     # T: the per-channel statistics' rounding in that dtype, times cond
    sums: float      # S: sequential sums of the values per channel that reach the quantity

    def units(self, input_dtype: torch.dtype, stored: torch.dtype, count: int, condition: float) -> float:
        coarse = second_order_dtype(input_dtype, stored)
        condition = max(condition, 1.0)
        extra_bf16 = 1.0 if torch.bfloat16 in (coarse, stored) else 0.0
        rounding = (self.rounding + extra_bf16 + self.stats * condition) * EPS[coarse] / EPS[stored]
        growth = self.sums * max(count, 1) * condition * EPS[accumulator(input_dtype)] / EPS[stored]
        return rounding + growth


LOOSE_BOUNDS = {
    # y = (x - mean) * rstd * gamma + beta: the mean and the variance (2 sums);
    # x - mean, x_hat, gamma * x_hat, + beta, the result: rounding.
    "y": LooseBound(rounding=4.0, stats=1.0, sums=2.0),
    # dx: the mean, the variance, sum(dy), sum(dy * x_hat); six elementwise roundings.
    "dx": LooseBound(rounding=6.0, stats=1.0, sums=4.0),
    # dweight = sum(dy * x_hat): the mean, the variance (through x_hat), the sum itself.
    "dweight": LooseBound(rounding=4.0, stats=1.0, sums=3.0),
    "dbias": LooseBound(rounding=2.0, stats=0.0, sums=1.0),
    # The batch statistics (the variance's sum and the mean it subtracts) and the
    # momentum update (two products and a sum, one rounding each).
    "running_mean": LooseBound(rounding=3.0, stats=0.0, sums=1.0),
    "running_var": LooseBound(rounding=3.0, stats=1.0, sums=2.0),
    # The derivative of the backward: the backward's sums, twice (the forward statistics
    # it depends on and its own), and its roundings, twice.
    "d2x": LooseBound(rounding=8.0, stats=2.0, sums=8.0),
    "d2weight": LooseBound(rounding=8.0, stats=2.0, sums=8.0),
    "d2dy": LooseBound(rounding=8.0, stats=2.0, sums=8.0),
}


def loose_units(quantity: str, input_dtype: torch.dtype, stored: torch.dtype, count: int, condition: float) -> float:
    """The "wrong" tier of ``quantity`` in units of ``EPS[stored]``: an error beyond it is
    beyond any correct implementation in the dtype (see :data:`LOOSE_BOUNDS`)."""
    return LOOSE_BOUNDS[quantity].units(input_dtype, stored, count, condition)


def loose_conditions(x, mean, var, eps: float, weight=None, y_ref=None, dbias_scale=None,
                     dweight_scale=None) -> dict:
    """The amplification ``cond`` of :data:`LOOSE_BOUNDS` per quantity, from the float64
    data (``x``: (N, C, ...)) and the statistics it was normalized with (the batch's, or
    the running ones in evaluation).  Channels with non-finite statistics are left out:
    a NaN is judged by where it goes, not by how large an error it makes.

    * ``kappa`` (per channel) ``(max|x| + |mean|) / sqrt(var + eps)``: the mean's error in
      units of the spread; ``x_hat_max``: ``max|x - mean| / sqrt(var + eps)``.
    * y, normwise against max|y|: ``max(|gamma| * kappa) / max|y|``.
    * dx, against the terms it cancels: ``kappa * (1 + x_hat_max)`` (x_hat's error times
      mean(dy * x_hat), and the x_hat factor of that term).
    * dweight, per channel against sum|dy * x_hat|: ``kappa * (1 + sum|dy| / sum|dy * x_hat|)``
      (x_hat's error is a shift per channel, which sum(dy * x_hat) weights by sum(dy)).
    * dbias = sum(dy), the running mean (against max|x|): 1.  The running variance: kappa.
    * second order: ``kappa * (1 + x_hat_max)^2``.
    """
    x, mean, var = _f64(x), _f64(mean).reshape(-1), _f64(var).reshape(-1)
    channels = x.shape[1] if x.ndim > 1 else 0
    flat = np.moveaxis(x, 1, 0).reshape(channels, -1) if channels else np.zeros((0, 1))
    with np.errstate(all="ignore"):
        finite_stats = np.isfinite(mean) & np.isfinite(var)
        abs_x = np.where(np.isfinite(flat), np.abs(flat), 0.0)
        sigma = np.sqrt(np.maximum(var, 0.0) + eps)
        kappa_c = np.where(finite_stats, (abs_x.max(axis=1, initial=0.0) + np.abs(mean)) / sigma, 0.0)
        centred = np.where(np.isfinite(flat), np.abs(flat - mean[:, None]), 0.0)
        x_hat_c = np.where(finite_stats, centred.max(axis=1, initial=0.0) / sigma, 0.0)
    kappa = max(1.0, float(kappa_c.max(initial=0.0)))
    x_hat_max = float(x_hat_c.max(initial=0.0))
    out = {"dbias": 1.0, "running_mean": 1.0, "running_var": kappa, "dx": kappa * (1 + x_hat_max)}
    out["d2x"] = out["d2weight"] = out["d2dy"] = kappa * (1 + x_hat_max) ** 2
    gamma = np.ones(channels) if weight is None else np.abs(_f64(weight).reshape(-1))
    y_scale = 0.0
    if y_ref is not None:
        y = _f64(y_ref)
        y_scale = float(np.abs(y[np.isfinite(y)]).max(initial=0.0))
    amplified = float((gamma * kappa_c)[finite_stats].max(initial=0.0))
    out["y"] = max(1.0, amplified / y_scale) if y_scale > 0 else kappa
    ratio = 1.0
    if dbias_scale is not None and dweight_scale is not None:
        db, dw = _f64(dbias_scale).reshape(-1), _f64(dweight_scale).reshape(-1)
        with np.errstate(all="ignore"):
            r = np.where((dw > 0) & np.isfinite(dw) & np.isfinite(db), db / np.where(dw > 0, dw, 1.0), 0.0)
        ratio = 1.0 + float(r.max(initial=0.0))
    out["dweight"] = kappa * ratio
    return out
