"""The demo's networks: MLPs whose batch-norm layers are always ``bntriton.BatchNorm1d``.

``norm`` says where batch norm goes in each hidden layer:

* ``"before"``: Linear -> BatchNorm -> activation, normalizing the pre-activations z (the
  lecture's default); the Linear has no bias, since beta takes its place;
* ``"after"``: Linear -> activation -> BatchNorm, normalizing the activations a;
* ``"none"``: Linear -> activation.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.modules import BatchNorm1d

NORMS = ("none", "before", "after")
INITS = ("he", "small")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def mlp(features: int, width: int, depth: int, classes: int, *, norm: str = "before",
        activation: str = "relu", init: str = "he", affine: bool = True, seed: int = 0) -> nn.Sequential:
    """A ``depth``-hidden-layer MLP; the weights depend on ``seed`` and the shapes only, so
    nets that differ only in ``norm`` start from the same Linear weights."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    g = torch.Generator().manual_seed(seed)
    layers: list = []
    fan_in = features
    for _ in range(depth):
        linear = nn.Linear(fan_in, width, bias=norm != "before")
        _init_linear(linear, init, activation, g)
        act = ACTIVATIONS[activation]()
        if norm == "before":
            layers += [linear, BatchNorm1d(width, affine=affine), act]
        elif norm == "after":
            layers += [linear, act, BatchNorm1d(width, affine=affine)]
        else:
            layers += [linear, act]
        fan_in = width
    head = nn.Linear(fan_in, classes)
    _init_linear(head, init, "linear", g)
    return nn.Sequential(*layers, head)


def _init_linear(linear: nn.Linear, init: str, activation: str, g: torch.Generator) -> None:
    """``he``: N(0, gain^2 / fan_in), the variance-preserving choice (gain sqrt(2) for ReLU);
    ``small``: N(0, 0.01^2), the classic "small random numbers" whose signal shrinks
    geometrically with depth."""
    fan_in = linear.in_features
    if init == "he":
        gain = 2.0 ** 0.5 if activation == "relu" else 1.0
        std = gain / fan_in ** 0.5
    else:
        std = 0.01
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * std)
        if linear.bias is not None:
            linear.bias.zero_()


def batch_norms(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, BatchNorm1d)]
