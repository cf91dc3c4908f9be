"""Which layers bntriton can take over, decided from the module tree alone.

Conversion, fusion and folding replace a layer only when they know what it computes;
everything here answers "is this exactly X?" and, when not, says why in words that end
up in the warning and the conversion report.

* torch's ``BatchNorm1d/2d/3d`` (the exact classes) become bntriton's.
* A subclass of them that carries its activation as a child module ``act`` (and at most
  an identity ``drop``: the layout of timm's ``BatchNormAct2d``) computes
  ``act(batch_norm(x))``: it becomes bntriton's ``BatchNormAct*d`` when the activation is
  one bntriton has, else it is left with the reason.
* Any other subclass has a forward of its own that nothing here can read: left.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .modules import _REPLACEMENTS

# Exact classes: a subclass of nn.ReLU (say) may compute something else.
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.GELU: "gelu"}
PLAIN_BATCH_NORMS = frozenset(_REPLACEMENTS) | frozenset(_REPLACEMENTS.values())
ACTIVATED_BATCH_NORMS = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)
SUPPORTED = "relu, leaky_relu, silu, gelu (approximate='none') or identity"


def activation_of(module: nn.Module) -> Union[tuple[Optional[str], float], str]:
    """``(name, negative_slope)`` when ``module`` applies an activation bntriton has
    (``name`` None for ``nn.Identity``), else the reason it is not one."""
    if type(module) is nn.Identity:
        return None, 0.01
    name = _ACTIVATION_MODULES.get(type(module))
    if name is None:
        return f"activation {type(module).__name__} has no bntriton kernel (bntriton has {SUPPORTED})"
    if name == "gelu" and module.approximate != "none":
        return f"GELU(approximate={module.approximate!r}) has no bntriton kernel (bntriton has {SUPPORTED})"
    return name, float(module.negative_slope) if name == "leaky_relu" else 0.01


def batch_norm_with_activation(bn: _BatchNorm) -> Union[tuple[Optional[str], float], str]:
    """For a subclass of torch's ``BatchNorm1d/2d/3d`` that is not bntriton's:
    ``(activation, negative_slope)`` when it is a batch norm followed by the activation it
    holds as ``act`` (timm's ``BatchNormAct2d`` layout), else why it cannot be converted."""
    base = next((cls.__name__ for cls in _REPLACEMENTS if isinstance(bn, cls)), None)
    if isinstance(bn, nn.SyncBatchNorm):
        return "torch's SyncBatchNorm: bntriton.SyncBatchNorm.convert_sync_batchnorm(model) converts it"
    if base is None:
        return f"{type(bn).__name__} is not a BatchNorm1d/2d/3d: its forward is its own"
    children = dict(bn.named_children())
    act = children.pop("act", None)
    if act is None:
        return f"{type(bn).__name__} subclasses nn.{base} with a forward of its own (no `act` child to read)"
    others = [name for name, child in children.items() if type(child) is not nn.Identity]
    if others:
        return f"{type(bn).__name__} has children besides `act` ({', '.join(others)}) that bntriton cannot fuse"
    return activation_of(act)
