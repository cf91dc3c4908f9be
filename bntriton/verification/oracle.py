"""The float64 NumPy oracle: batch norm forward, backward and running statistics.

Written for clarity, not speed: two-pass statistics in float64 on (N, C, *) arrays, the
textbook formulas, no shared code with the kernels.  Inputs are the *same* (already
rounded) values the implementation under test sees, cast to float64.

One numerical precaution: each channel is first shifted by one of its own samples.
Mean-centring and variance are invariant under that shift, and the subtraction is exact
when the data sit far from zero (the case where it matters), so the oracle stays accurate
to ~1e-16 *relative to the data's spread* whatever their offset.  Without it, rounding
the mean of data at 1e4 x their std to float64 alone costs ~1e-12 in the normalized
output: far more than the float64 implementations it has to judge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def _axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel axis (1)."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Shape a (C,) array to broadcast against (N, C, *)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@dataclass
class ForwardResult:
    y: np.ndarray
    mean: np.ndarray  # statistics used to normalize: the batch's, or the running ones
    var: np.ndarray   # biased batch variance, or the running variance
    running_mean: Optional[np.ndarray] = None  # after the update (training with running stats)
    running_var: Optional[np.ndarray] = None
    # The scale of the updated running mean's rounding error: a batch mean is computed
    # from values as large as max|x|, so its error is relative to that, not to the mean
    # (which may be ~0 for data of large spread).  Chained over steps via
    # ``forward(..., running_mean_magnitude=...)``.
    running_mean_magnitude: Optional[np.ndarray] = None


def _pivot(x: np.ndarray) -> np.ndarray:
    """One sample per channel (the first finite one when there is one): the shift."""
    flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    if flat.shape[1] == 0:
        return np.zeros(x.shape[1])
    finite = np.isfinite(flat)
    first = np.where(finite.any(axis=1), finite.argmax(axis=1), 0)
    return flat[np.arange(flat.shape[0]), first]


def _centred_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pivot, mean of x - pivot, biased variance), two-pass in float64."""
    pivot = _pivot(x)
    d = x - _per_channel(pivot, x.ndim)
    mean_d = d.mean(axis=_axes(x))
    var = ((d - _per_channel(mean_d, x.ndim)) ** 2).mean(axis=_axes(x))
    return pivot, mean_d, var


def batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance, float64."""
    x = np.asarray(x, dtype=np.float64)
    pivot, mean_d, var = _centred_stats(x)
    return pivot + mean_d, var


def _x_hat(x: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float, batch: bool) -> np.ndarray:
    """(x - mean) / sqrt(var + eps); with batch statistics, centred through the pivot."""
    if batch:
        pivot, mean_d, _ = _centred_stats(x)
        centred = (x - _per_channel(pivot, x.ndim)) - _per_channel(mean_d, x.ndim)
    else:
        centred = x - _per_channel(mean, x.ndim)
    return centred / np.sqrt(_per_channel(var, x.ndim) + eps)


def forward(
    x: np.ndarray,
    running_mean: Optional[np.ndarray],
    running_var: Optional[np.ndarray],
    weight: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: int = 1,
    running_mean_magnitude: Optional[np.ndarray] = None,
) -> ForwardResult:
    """``F.batch_norm`` semantics in float64.

    ``momentum=None`` is the cumulative average with factor ``1 / num_batches_tracked``
    (the counter's value *after* this batch, as in torch's modules).
    """
    x = np.asarray(x, dtype=np.float64)
    channels = x.shape[1]
    count = x.size // channels if channels else 0
    new_mean = new_var = new_magnitude = None
    if training:
        mean, var = batch_stats(x)
        if running_mean is not None and count > 0:
            factor = 1.0 / num_batches_tracked if momentum is None else momentum
            unbiased = var * count / (count - 1)
            new_mean = (1 - factor) * np.asarray(running_mean, np.float64) + factor * mean
            new_var = (1 - factor) * np.asarray(running_var, np.float64) + factor * unbiased
            old_magnitude = np.abs(np.asarray(
                running_mean if running_mean_magnitude is None else running_mean_magnitude, np.float64
            ))
            new_magnitude = (1 - factor) * old_magnitude + factor * np.abs(x).max(axis=_axes(x))
    else:
        mean = np.asarray(running_mean, np.float64)
        var = np.asarray(running_var, np.float64)
    x_hat = _x_hat(x, mean, var, eps, batch=training)
    y = x_hat
    if weight is not None:
        y = y * _per_channel(np.asarray(weight, np.float64), x.ndim)
    if bias is not None:
        y = y + _per_channel(np.asarray(bias, np.float64), x.ndim)
    return ForwardResult(y, mean, var, new_mean, new_var, new_magnitude)


@dataclass
class BackwardResult:
    dx: np.ndarray
    dweight: np.ndarray
    dbias: np.ndarray
    # The magnitudes against which rounding errors are measured (their condition): per
    # channel sum|dy * x_hat| and sum|dy| for the reductions; for dx, elementwise
    # |g rstd| (|dy| + |dbias| / M + |x_hat dweight| / M), the terms that dx cancels.
    dweight_scale: np.ndarray
    dbias_scale: np.ndarray
    dx_scale: np.ndarray


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    weight: Optional[np.ndarray] = None,
    training: bool = True,
    eps: float = 1e-5,
) -> BackwardResult:
    """Gradients given the statistics the forward normalized with (``ForwardResult``)."""
    dy = np.asarray(dy, np.float64)
    x = np.asarray(x, np.float64)
    axes = _axes(x)
    count = x.size // x.shape[1] if x.shape[1] else 0
    rstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    x_hat = _x_hat(x, mean, var, eps, batch=training)
    gamma = np.ones_like(rstd) if weight is None else np.asarray(weight, np.float64)
    dbias = dy.sum(axis=axes)
    dweight = (dy * x_hat).sum(axis=axes)
    g_rstd = _per_channel(gamma * rstd, x.ndim)
    if training:
        mean_dy = _per_channel(dbias / max(count, 1), x.ndim)
        mean_dy_x_hat = _per_channel(dweight / max(count, 1), x.ndim)
        dx = g_rstd * (dy - mean_dy - x_hat * mean_dy_x_hat)
        dx_scale = np.abs(g_rstd) * (np.abs(dy) + np.abs(mean_dy) + np.abs(x_hat * mean_dy_x_hat))
    else:
        dx = g_rstd * dy
        dx_scale = np.abs(dx)
    return BackwardResult(
        dx, dweight, dbias, np.abs(dy * x_hat).sum(axis=axes), np.abs(dy).sum(axis=axes), dx_scale
    )


@dataclass
class SecondOrderResult:
    """Gradients of ``L = <v, dx> + <u, dweight>`` (dx, dweight: the first-order gradients
    for the upstream gradient dy) with respect to x, weight and dy; bias does not enter dx
    or dweight, so its gradient is zero."""

    dx: np.ndarray
    dweight: Optional[np.ndarray]
    ddy: np.ndarray  # gradient with respect to dy (the backward is linear in dy)


def second_order(
    dy: np.ndarray,
    x: np.ndarray,
    v: np.ndarray,
    u: Optional[np.ndarray],
    weight: Optional[np.ndarray],
    running_mean: Optional[np.ndarray],
    running_var: Optional[np.ndarray],
    training: bool,
    eps: float = 1e-5,
) -> SecondOrderResult:
    """Second-order gradients in float64.

    Differentiating the backward formula by hand is where implementations drop terms, so
    the oracle does not: it writes the forward as elementary float64 operations and lets
    torch's autograd (each elementary derivative well tested) differentiate it twice.
    tests/test_reference.py checks it against finite differences (gradgradcheck).  The
    per-channel shift by one sample is a constant here: the centred values do not depend
    on it, so treating it as one changes no derivative.
    """
    import torch  # the second-order oracle differentiates with torch; the rest is NumPy

    f64 = torch.float64
    X = torch.tensor(np.asarray(x, np.float64), dtype=f64, requires_grad=True)
    nd = X.dim()
    axes = _axes(X)
    has_weight = weight is not None
    W = torch.tensor(np.asarray(weight, np.float64) if has_weight else np.ones(X.shape[1]), dtype=f64,
                     requires_grad=has_weight)
    if training:
        pivot = torch.tensor(_pivot(np.asarray(x, np.float64)), dtype=f64)
        d = X - _per_channel(pivot, nd)
        centred = d - d.mean(dim=axes, keepdim=True)
        var = (centred * centred).mean(dim=axes, keepdim=True)
    else:
        centred = X - _per_channel(torch.tensor(np.asarray(running_mean, np.float64), dtype=f64), nd)
        var = _per_channel(torch.tensor(np.asarray(running_var, np.float64), dtype=f64), nd)
    y = centred * torch.rsqrt(var + eps) * _per_channel(W, nd)
    leaves = [X, W] if has_weight else [X]
    DY = torch.tensor(np.asarray(dy, np.float64), requires_grad=True)
    first = torch.autograd.grad(y, leaves, DY, create_graph=True)
    loss = (first[0] * torch.tensor(np.asarray(v, np.float64))).sum()
    if has_weight:
        loss = loss + (first[1] * torch.tensor(np.asarray(u, np.float64))).sum()
    second = torch.autograd.grad(loss, leaves + [DY], allow_unused=True)
    as_np = [np.zeros(t.shape) if g is None else g.detach().numpy() for g, t in zip(second, leaves + [DY])]
    return SecondOrderResult(as_np[0], as_np[1] if has_weight else None, as_np[-1])
