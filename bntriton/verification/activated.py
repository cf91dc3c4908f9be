"""The float64 oracle for batch norm with a fused epilogue: ``act(BN(x) + residual)``.

Composes :mod:`.oracle` (forward, backward) with the activation and its derivative in
float64 NumPy: the forward adds the residual and applies the activation; the backward
takes dy through ``act'(z)`` and hands ``dz`` to the plain backward (and to the
residual's gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import oracle

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activate(z: np.ndarray, activation: Optional[str], slope: float = 0.01) -> np.ndarray:
    if activation is None:
        return z
    if activation == "relu":
        return np.where(z > 0, z, 0.0)
    if activation == "leaky_relu":
        return np.where(z > 0, z, z * slope)
    if activation == "silu":
        return z / (1.0 + np.exp(-z))
    if activation == "gelu":
        return z * 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
    raise ValueError(activation)


def activation_grad(z: np.ndarray, dy: np.ndarray, activation: Optional[str], slope: float = 0.01) -> np.ndarray:
    """``dy * act'(z)``; act'(0) = 0 for relu and ``slope`` for leaky relu (torch's choice)."""
    if activation is None:
        return dy
    if activation == "relu":
        return np.where(z > 0, dy, 0.0)
    if activation == "leaky_relu":
        return np.where(z > 0, dy, dy * slope)
    if activation == "silu":
        sig = 1.0 / (1.0 + np.exp(-z))
        return dy * sig * (1.0 + z * (1.0 - sig))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        return dy * (cdf + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi))
    raise ValueError(activation)


@dataclass
class ActivatedResult:
    forward: oracle.ForwardResult  # y there is BN(x) alone
    z: np.ndarray                  # the pre-activation BN(x) + residual
    y: np.ndarray
    backward: Optional[oracle.BackwardResult] = None  # the plain backward of dz
    dz: Optional[np.ndarray] = None                   # also the residual's gradient


def forward_backward(
    x, running_mean, running_var, weight, bias, training, momentum, eps,
    activation: Optional[str], residual=None, slope: float = 0.01, dy=None,
) -> ActivatedResult:
    """Forward (and, given ``dy``, backward) of ``act(BN(x) + residual)`` in float64."""
    fwd = oracle.forward(x, running_mean, running_var, weight, bias, training, momentum, eps)
    z = fwd.y if residual is None else fwd.y + np.asarray(residual, np.float64)
    result = ActivatedResult(fwd, z, activate(z, activation, slope))
    if dy is not None:
        dz = activation_grad(z, np.asarray(dy, np.float64), activation, slope)
        result.dz = dz
        result.backward = oracle.backward(dz, x, fwd.mean, fwd.var, weight, training, eps)
    return result
