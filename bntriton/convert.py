"""Ways out of bntriton's layers for deployment: torch's classes back, or batch norm
folded into the convolution or linear layer before it.

* :func:`revert_model` is the inverse of :func:`~bntriton.convert_model`: every bntriton
  batch norm becomes torch's class again, keeping the very Parameter and buffer objects,
  so a model trained with bntriton can go wherever torch's modules go
  (``torch.jit.script``, ``torch.ao.quantization.fuse_modules``, tools that match on
  exact classes).
* :func:`fold_batch_norm` (eval only) rewrites the model with ``torch.fx`` so that every
  batch norm whose input is a convolution or linear layer (used by nothing else)
  disappears into that layer's weight and bias; the rest stay as they are.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import modules
from .distributed import SyncBatchNorm


def _torch_classes() -> dict:
    reverse = {ours: theirs for theirs, ours in modules._REPLACEMENTS.items()}
    reverse[SyncBatchNorm] = nn.SyncBatchNorm
    return reverse


def revert_model(module: nn.Module) -> nn.Module:
    """Replace every bntriton batch norm in ``module`` by torch's own class, in place.

    The inverse of :func:`~bntriton.convert_model`: the replacement takes over the
    original's attributes wholesale (the same Parameter and buffer objects, so optimizers
    keep working; device, dtype, train/eval mode, hooks).  ``bntriton.SyncBatchNorm``
    becomes ``torch.nn.SyncBatchNorm``.  Returns the reverted module (a new object when
    ``module`` itself is replaced).
    """
    torch_class = _torch_classes().get(type(module))
    if torch_class is not None:
        reverted = torch_class.__new__(torch_class)
        reverted.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
        return reverted
    if isinstance(module, modules._TritonBatchNorm):
        raise TypeError(
            f"revert_model: {type(module).__name__} has no torch equivalent to revert to"
        )
    for name, child in module.named_children():
        new_child = revert_model(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class _LeafBatchNorm(fx.Tracer):
    """Keeps batch norms (torch's and bntriton's) as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _folded(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` with ``bn``'s running statistics."""
    folded = copy.deepcopy(layer)
    weight = layer.weight.detach()
    # In float64, then rounded once into the layer's dtype.
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if layer.bias is not None:
        shift = shift + layer.bias.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    shape = (-1,) + (1,) * (weight.dim() - 1)  # output channels / features come first
    folded.weight = nn.Parameter((weight.double() * scale.view(shape)).to(weight.dtype))
    folded.bias = nn.Parameter(shift.to(weight.dtype))
    return folded


def fold_batch_norm(model: nn.Module) -> fx.GraphModule:
    """``model`` (in eval mode) with every batch norm that follows a convolution or a
    linear layer folded into that layer's weights, via ``torch.fx``.

    Folded: a ``Conv1d/2d/3d`` (not transposed) or ``Linear`` whose only user is a batch
    norm (torch's or bntriton's) with running statistics and as many channels as the
    layer has outputs (a ``Linear``'s output is taken to be ``(N, features)``, the only
    input on which a ``BatchNorm1d`` normalizes its features).  Everything else stays as it is.  ``model`` is not modified: the
    result is a new ``GraphModule`` whose unfolded layers are copies.  The model must be
    symbolically traceable by ``torch.fx`` (no data-dependent control flow).
    """
    if model.training:
        raise ValueError(
            "fold_batch_norm folds the running statistics, which only eval mode uses: call model.eval() first"
        )
    root = copy.deepcopy(model)
    traced = fx.GraphModule(root, _LeafBatchNorm().trace(root))
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(traced.get_submodule(node.target), _BatchNorm):
            continue
        bn = traced.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        # Looked up now: a layer already folded once (a batch norm after a batch norm) is
        # the folded copy.
        layer = traced.get_submodule(source.target)
        if not isinstance(layer, _FOLDABLE) or bn.running_mean is None:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        _replace_module(traced, source.target, _folded(layer, bn))
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _replace_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, name = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, new)
