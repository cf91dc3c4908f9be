"""``convert_model(model, fuse=True)``: trace with torch.fx, fuse BN -> activation and
BN -> add -> activation into ``BatchNormAct`` modules, convert the remaining batch norms.

The trace is mode_aware_trace's: every module whose behaviour depends on the train/eval
mode stays a module, and a graph that would bake the mode in is refused, so the result
follows ``.train()`` / ``.eval()`` as the original does and keeps its ``state_dict`` keys.

A pattern fuses when each intermediate value has exactly one user (nothing else reads
the batch norm's output or the sum) and the batch-norm module is called once in the
graph.  The added operand must have the batch norm's output shape (a residual; the
fused module raises a clear error otherwise, as tracing records no shapes), and a
parameter or buffer operand is never taken for one.  The fused module replaces the batch norm under the same name (the same
Parameter and buffer objects, so ``state_dict`` keys and optimizers carry over) and is
called where the activation was, with the residual as its second argument.
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import from_batch_norm
from .conversion_report import ConversionReport
from .layer_patterns import PLAIN_BATCH_NORMS, activation_of, batch_norm_with_activation
from .mode_aware_trace import trace_mode_independent

_ACT_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.silu: "silu", F.gelu: "gelu",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def _activation(node: fx.Node, modules: dict) -> Optional[tuple[str, float]]:
    """``(name, negative_slope)`` when ``node`` applies a supported activation to its
    first argument (and nothing else), else None."""
    slope = 0.01
    if node.op == "call_module":
        act = activation_of(modules.get(node.target))
        if isinstance(act, str) or act[0] is None or len(node.args) != 1 or node.kwargs:
            return None
        return act
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name = _ACT_FUNCTIONS[node.target]
        extra = dict(node.kwargs)
        extra.pop("inplace", None)
        positional = list(node.args[1:])
        if name == "leaky_relu":
            slope = extra.pop("negative_slope", positional.pop(0) if positional else 0.01)
            if positional and isinstance(positional[0], bool):
                positional.pop(0)  # inplace
        if name == "gelu" and extra.pop("approximate", "none") != "none":
            return None
        if name == "relu" and positional and isinstance(positional[0], bool):
            positional.pop(0)
        if positional or extra or not isinstance(slope, (int, float)):
            return None
        return name, float(slope)
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1 and not node.kwargs:
        return _ACT_METHODS[node.target], slope
    return None


def _residual_of_add(node: fx.Node, bn: fx.Node) -> Optional[fx.Node]:
    """The other operand when ``node`` is ``bn + other`` (or ``other + bn``), else None."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is bn else a if b is bn else None
    # A parameter or buffer operand is more likely a broadcast bias than a residual of the
    # input's shape (which the fused module requires, and checks at run time).
    if not isinstance(other, fx.Node) or other is bn or other.op == "get_attr":
        return None
    return other


def _fusable_batch_norm(module) -> bool:
    """torch's or bntriton's plain batch norm, or one holding an identity ``act`` (timm's
    ``BatchNormAct2d(apply_act=False)``, used before a residual add)."""
    if type(module) in PLAIN_BATCH_NORMS:
        return True
    if not isinstance(module, _BatchNorm) or type(module).__module__.startswith("bntriton"):
        return False
    found = batch_norm_with_activation(module)
    return not isinstance(found, str) and found[0] is None


def _past_identities(node: fx.Node, modules: dict) -> list:
    """``node`` and the ``nn.Identity`` calls that follow it one by one (a drop path of
    rate 0, say): each passes its input on unchanged to a single user."""
    chain = [node]
    while len(chain[-1].users) == 1:
        user = next(iter(chain[-1].users))
        if not (user.op == "call_module" and type(modules.get(user.target)) is nn.Identity
                and user.args == (chain[-1],) and not user.kwargs):
            break
        chain.append(user)
    return chain


def fuse(model: nn.Module, report: Optional[ConversionReport] = None) -> fx.GraphModule:
    """Trace ``model`` and fuse its BN -> activation / BN -> add -> activation patterns
    (``nn.Identity`` calls between them are passed over and removed).

    Only torch's and bntriton's plain ``BatchNorm1d/2d/3d`` (and a subclass holding an
    identity ``act``) fuse: any other subclass computes its own forward.  Raises what
    torch.fx raises when the model does not trace, and ModeDependentTrace when the trace
    would depend on the mode (convert_model catches both).
    """
    gm = trace_mode_independent(model)
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for bn in list(graph.nodes):
        if bn.op != "call_module" or not _fusable_batch_norm(modules.get(bn.target)):
            continue
        if calls[bn.target] != 1 or len(bn.users) != 1 or len(bn.args) != 1 or bn.kwargs:
            continue
        chain = _past_identities(bn, modules)
        value = chain[-1]
        if len(value.users) != 1:
            continue
        user = next(iter(value.users))
        residual, add = None, None
        act = _activation(user, modules) if user.args and user.args[0] is value else None
        if act is None:
            residual = _residual_of_add(user, value)
            if residual is None or len(user.users) != 1:
                continue
            add, user = user, next(iter(user.users))
            act = _activation(user, modules) if user.args and user.args[0] is add else None
            if act is None:
                continue
        name, slope = act
        original = modules[bn.target]
        fused_module = from_batch_norm(original, name, slope)
        gm.add_submodule(bn.target, fused_module)
        if report is not None:
            fused_with = name if residual is None else f"{name} + residual"
            report.converted.append((bn.target, f"{type(original).__name__} -> "
                                                 f"bntriton.{type(fused_module).__name__}({fused_with})"))
            report.fused.append((bn.target, fused_with))
        args = (bn.args[0],) if residual is None else (bn.args[0], residual)
        with graph.inserting_after(user):
            fused = graph.call_module(bn.target, args)
        user.replace_all_uses_with(fused)
        for node in [user, add] + chain[::-1]:
            if node is not None:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
