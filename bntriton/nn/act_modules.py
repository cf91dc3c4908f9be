"""``BatchNormAct1d/2d/3d``: batch norm with a fused activation (and optional residual).

Subclasses of torch's ``BatchNorm1d/2d/3d`` (constructor, ``state_dict`` and
``isinstance`` are torch's), computing ``act(BN(input) + residual)`` in one pass.
``inplace=True`` writes the output into the input's storage and keeps only the output
for the backward (in-place activated batch norm, see ops/activated.py, InplaceABN): it needs
``activation=None`` or ``"leaky_relu"`` with ``negative_slope > 0``, no residual, and a
weight with no zero entry when training.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..activated import batch_norm_act
from ..kernels.activations import activation_code
from .modules import batch_norm_arguments


class _BatchNormAct:
    """Mixin: the forward shared by the three classes (state handling as modules.py)."""

    def _init_act(self, activation, negative_slope, inplace):
        activation_code(activation)  # raises for an unknown name
        if inplace and activation not in (None, "leaky_relu"):
            raise ValueError("inplace=True needs activation=None or 'leaky_relu' (an invertible activation)")
        if inplace and activation == "leaky_relu" and not negative_slope > 0:
            raise ValueError("inplace=True with leaky_relu needs negative_slope > 0")
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.inplace = bool(inplace)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        return batch_norm_act(
            input, *batch_norm_arguments(self),
            activation=self.activation, residual=residual, negative_slope=self.negative_slope,
            inplace=self.inplace,
        )

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        if self.inplace:
            extra += ", inplace=True"
        return super().extra_repr() + extra


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """``act(BatchNorm1d(input) + residual)``; input (N, C) or (N, C, L)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, activation="relu", negative_slope=0.01, inplace=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_act(activation, negative_slope, inplace)


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """``act(BatchNorm2d(input) + residual)``; input (N, C, H, W)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, activation="relu", negative_slope=0.01, inplace=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_act(activation, negative_slope, inplace)


class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d):
    """``act(BatchNorm3d(input) + residual)``; input (N, C, D, H, W)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, activation="relu", negative_slope=0.01, inplace=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_act(activation, negative_slope, inplace)


ACT_CLASSES = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}


def from_batch_norm(bn: nn.modules.batchnorm._BatchNorm, activation, negative_slope=0.01) -> nn.Module:
    """A BatchNormAct taking over ``bn``'s parameters and buffers (the same objects).

    ``bn``'s child modules are not taken over: a batch norm that holds its activation as a
    child (timm's ``BatchNormAct2d``: ``act``, an identity ``drop``) has it computed inside."""
    dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
    base = next(cls for cls in dims if isinstance(bn, cls))
    cls = ACT_CLASSES[dims[base]]
    fused = cls.__new__(cls)
    fused.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in bn.__dict__.items()})
    fused._modules = type(bn._modules)()
    fused._init_act(activation, negative_slope, False)
    return fused


