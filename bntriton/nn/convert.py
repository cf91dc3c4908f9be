"""Model conversion, both ways: into bntriton's layers, and out of them for deployment.

* :func:`convert_model` replaces torch's batch norms with bntriton's (and, with
  ``fuse=True``, fuses batch norm -> (add ->) activation through fuse.py).
* :func:`revert_model` is the inverse of :func:`~bntriton.convert_model`: every bntriton
  batch norm becomes torch's class again, keeping the very Parameter and buffer objects,
  so a model trained with bntriton can go wherever torch's modules go
  (``torch.jit.script``, ``torch.ao.quantization.fuse_modules``, tools that match on
  exact classes).
* :func:`fold_batch_norm` (eval only) rewrites the model with ``torch.fx`` so that every
  batch norm whose input is a convolution or linear layer (used by nothing else)
  disappears into that layer's weight and bias; the rest stay as they are, named in a
  warning with the reason.

convert_model's work: convert / convert_tree / fuse_sequential_blocks.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import modules
from .modules import from_batch_norm
from .conversion_report import ConversionReport
from .sync_batchnorm import SyncBatchNorm
from .fuse import fuse as fuse_graph
from .layer_patterns import ACTIVATED_BATCH_NORMS, PLAIN_BATCH_NORMS, activation_of, batch_norm_with_activation
from .mode_aware_trace import FOLDABLE, ModeAwareTracer


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
        return _take_over(torch_class, module)
    if isinstance(module, _BatchNorm) and type(module).__module__.startswith("bntriton"):
        # E.g. a batch norm with a fused activation: no single torch class computes it.
        raise TypeError(
            f"revert_model: bntriton's {type(module).__name__} has no torch class to revert to"
        )
    for name, child in module.named_children():
        new_child = revert_model(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _take_over(cls: type, module: nn.Module, keep_children: bool = True) -> nn.Module:
    """An instance of ``cls`` with ``module``'s attributes: the same Parameter and buffer
    objects (optimizers keep working), device, dtype, mode and hooks; the containers are
    copied so that the old module does not share the new one's dicts."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    if not keep_children:
        new._modules = type(module._modules)()  # an `act` / `drop` now computed inside
    return new


def _convert_layer(module: nn.Module, report: ConversionReport, name: str) -> Optional[nn.Module]:
    """The bntriton layer replacing ``module``, ``module`` itself when it is a batch norm
    that stays (recorded in ``report.left`` unless it is bntriton's), or None for a
    module that is not a batch norm (its children are looked at)."""
    replacement = modules._REPLACEMENTS.get(type(module))
    if replacement is not None:
        report.converted.append((name, f"{type(module).__name__} -> bntriton.{replacement.__name__}"))
        return _take_over(replacement, module)
    if not isinstance(module, _BatchNorm):
        return None
    if type(module).__module__.startswith("bntriton"):
        return module
    found = batch_norm_with_activation(module)
    if isinstance(found, str):
        report.left.append((name, found))
        return module
    activation, slope = found
    if activation is None:
        plain = next(ours for theirs, ours in modules._REPLACEMENTS.items() if isinstance(module, theirs))
        report.converted.append((name, f"{type(module).__name__} (identity act) -> bntriton.{plain.__name__}"))
        return _take_over(plain, module, keep_children=False)
    fused = from_batch_norm(module, activation, slope)
    report.converted.append((name, f"{type(module).__name__} -> bntriton.{type(fused).__name__}({activation})"))
    report.fused.append((name, activation))
    return fused


def convert_tree(module: nn.Module, report: ConversionReport, name: str = "") -> nn.Module:
    """convert_model without fusion, recording each batch norm in ``report``."""
    new = _convert_layer(module, report, name)
    if new is not None:
        return new
    for child_name, child in module.named_children():
        new_child = convert_tree(child, report, f"{name}.{child_name}" if name else child_name)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module


def fuse_sequential_blocks(module: nn.Module, report: ConversionReport, name: str = "") -> None:
    """``Sequential(..., BatchNorm, activation, ...)`` (torchvision's ``Conv2dNormActivation``
    and the like): the batch norm becomes a ``BatchNormAct`` and the activation an
    ``nn.Identity``, in place, without tracing (what fusion can still do when the model
    does not trace).  The Sequential's own forward hands each output to the next child
    only, so nothing else can read the batch norm's output."""
    for child_name, child in module.named_children():
        fuse_sequential_blocks(child, report, f"{name}.{child_name}" if name else child_name)
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        return
    names = list(module._modules)
    for bn_name, act_name in zip(names, names[1:]):
        bn, act = module._modules[bn_name], module._modules[act_name]
        if type(bn) not in PLAIN_BATCH_NORMS or any(
                m._forward_hooks or m._forward_pre_hooks for m in (bn, act)):
            continue
        found = activation_of(act)
        if isinstance(found, str) or found[0] is None:
            continue
        qualified = f"{name}.{bn_name}" if name else bn_name
        fused = from_batch_norm(bn, *found)
        report.converted.append((qualified, f"{type(bn).__name__} -> bntriton.{type(fused).__name__}({found[0]})"))
        report.fused.append((qualified, found[0]))
        setattr(module, bn_name, fused)
        setattr(module, act_name, nn.Identity())


def convert(module: nn.Module, fuse: bool) -> tuple[nn.Module, ConversionReport]:
    """convert_model's work: the converted model and the report."""
    if not fuse or isinstance(module, _BatchNorm):  # a lone batch norm: nothing follows it to fuse
        report = ConversionReport("convert_model(fuse=True)" if fuse else "convert_model")
        return convert_tree(module, report), report
    report = ConversionReport("convert_model(fuse=True)")
    try:
        graph_report = ConversionReport(report.call)
        target = fuse_graph(module, graph_report)
        report.converted, report.fused = graph_report.converted, graph_report.fused
    except Exception as error:  # torch.fx raises many kinds (TraceError, TypeError, ...)
        why = f"torch.fx could not trace {type(module).__name__} ({type(error).__name__}: {error})"
        warnings.warn(f"convert_model(fuse=True): {why}; converting batch norms without fusing activations "
                      "(except BatchNorm -> activation inside nn.Sequential)", stacklevel=3)
        report.notes.append(f"{why}: fused only BatchNorm -> activation inside nn.Sequential")
        fuse_sequential_blocks(module, report)
        target = module
    return convert_tree(target, report), report


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


_ACTIVATION_CALLS = {"relu": torch.relu, "leaky_relu": F.leaky_relu, "silu": F.silu, "gelu": F.gelu}
# Eval computes the same affine map in each of these: the running statistics, weight, bias.
_FOLDABLE_BATCH_NORMS = PLAIN_BATCH_NORMS | {nn.SyncBatchNorm, SyncBatchNorm}


def _activation_after_fold(bn: _BatchNorm, node: fx.Node):
    """``(activation, negative_slope)`` that must follow the folded layer (activation None
    for none), or the reason ``bn`` cannot be folded."""
    if type(bn) in _FOLDABLE_BATCH_NORMS:
        found = (None, 0.01)
    elif isinstance(bn, ACTIVATED_BATCH_NORMS):
        if len(node.args) != 1 or node.kwargs:
            return f"{type(bn).__name__} adds a residual before its activation"
        found = (bn.activation, bn.negative_slope)
    else:
        found = batch_norm_with_activation(bn)
        if isinstance(found, str):
            return found
    if len(node.args) != 1 or node.kwargs:
        return "it is called with more than its input"
    if bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False): eval normalizes with batch statistics"
    return found


def _overrides_computation(layer: nn.Module) -> Optional[str]:
    base = next(cls for cls in FOLDABLE if isinstance(layer, cls))
    for method in ("forward", "_conv_forward"):
        if getattr(type(layer), method, None) is not getattr(base, method, None):
            return f"{type(layer).__name__} overrides {method}: what it computes is its own"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return f"{type(layer).__name__}'s weight is parametrized"
    return None


def _why_source_does_not_fold(traced: fx.GraphModule, source, bn: _BatchNorm, calls: dict) -> Optional[str]:
    if not isinstance(source, fx.Node) or source.op != "call_module":
        what = source.target if isinstance(source, fx.Node) else repr(source)
        return f"its input ({what}) is not a convolution or linear layer's output"
    layer = traced.get_submodule(source.target)
    if not isinstance(layer, FOLDABLE):
        return f"its input comes from {source.target} ({type(layer).__name__}), not a Conv1d/2d/3d or Linear"
    why = _overrides_computation(layer)
    if why is not None:
        return why
    if len(source.users) != 1:
        return f"{source.target}'s output is also used elsewhere"
    if calls[source.target] != 1:
        return f"{source.target} is called more than once"
    if layer.weight.shape[0] != bn.num_features:
        return f"{source.target} has {layer.weight.shape[0]} outputs, the batch norm {bn.num_features} channels"
    return None


def fold_batch_norm(model: nn.Module, report: bool = False):
    """``model`` (in eval mode) with every batch norm that follows a convolution or a
    linear layer folded into that layer's weights, via ``torch.fx``.

    Folded: a ``Conv1d/2d/3d`` (not transposed) or ``Linear``, subclasses included unless
    they override ``forward`` / ``_conv_forward``, whose only user is a batch norm with
    running statistics and as many channels as the layer has outputs (a ``Linear``'s
    output is taken to be ``(N, features)``, the only input on which a ``BatchNorm1d``
    normalizes its features).  The batch norm may be torch's, bntriton's,
    ``SyncBatchNorm`` (eval is the same affine map), a ``BatchNormAct`` without residual or a
    batch norm holding its activation as ``act`` (timm's ``BatchNormAct2d`` layout): its
    activation then follows the folded layer.  Every other batch norm stays, named with
    the reason in one warning; ``report=True`` returns ``(folded, ConversionReport)``.
    ``model`` is not modified: the result is a new ``GraphModule`` whose unfolded layers are
    copies.  The model must be symbolically traceable by ``torch.fx`` (no data-dependent
    control flow); modules whose forward reads ``self.training`` stay modules.
    """
    if model.training:
        raise ValueError(
            "fold_batch_norm folds the running statistics, which only eval mode uses: call model.eval() first"
        )
    what = ConversionReport("fold_batch_norm")
    root = copy.deepcopy(model)
    traced = fx.GraphModule(root, ModeAwareTracer().trace(root))
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(traced.get_submodule(node.target), _BatchNorm):
            continue
        bn = traced.get_submodule(node.target)
        found = _activation_after_fold(bn, node)
        source = node.args[0] if node.args else None
        why = found if isinstance(found, str) else _why_source_does_not_fold(traced, source, bn, calls)
        if why is not None:
            what.left.append((node.target, why))
            continue
        # Looked up now: a layer already folded once (a batch norm after a batch norm) is
        # the folded copy.
        _replace_module(traced, source.target, _folded(traced.get_submodule(source.target), bn))
        activation, slope = found
        result = source
        if activation is not None:
            kwargs = {"negative_slope": slope} if activation == "leaky_relu" else {}
            with traced.graph.inserting_after(node):
                result = traced.graph.call_function(_ACTIVATION_CALLS[activation], (source,), kwargs)
        node.replace_all_uses_with(result)
        traced.graph.erase_node(node)
        what.folded.append((node.target, f"into {source.target}" + (f", then {activation}" if activation else "")))
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    what.warn_left(stacklevel=2)
    return (traced, what) if report else traced


def _replace_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, name = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, new)


def convert_model(module: nn.Module, fuse: bool = False, report: bool = False):
    """Replace every torch ``BatchNorm1d/2d/3d`` in ``module`` by bntriton's, in place.

    A subclass of them that holds its activation as an ``act`` child (timm's
    ``BatchNormAct2d``) becomes bntriton's ``BatchNormAct*d`` when bntriton has the
    activation (relu, leaky_relu, silu, gelu, identity).  Every batch norm left as it was
    (``nn.SyncBatchNorm``, other subclasses, activations bntriton lacks) is named, with the
    reason, in one warning.

    ``fuse=True`` also fuses BN -> activation and BN -> add -> activation into
    ``BatchNormAct`` modules: it traces ``module`` with torch.fx, keeping every module whose
    behaviour depends on the train/eval mode a module (bntriton/nn/mode_aware_trace.py), and
    returns a new ``torch.fx.GraphModule`` sharing the parameters and buffers, with the
    original's ``state_dict`` keys.  When the model does not trace, or only traces into a
    graph that depends on the mode, it warns why, fuses only ``Sequential(..., BN,
    activation, ...)`` blocks, and converts the rest in place.

    The replacement takes over the original's attributes wholesale: the same Parameter and
    buffer objects (so optimizers keep working), device, dtype, train/eval mode and hooks.
    Returns the converted module (a new object when ``module`` itself is replaced), or
    ``(module, ConversionReport)`` with ``report=True``: which layers were converted, fused
    or left, and why (``print`` it).
    """
    converted, what = convert(module, fuse)
    what.warn_left(stacklevel=2)
    return (converted, what) if report else converted
