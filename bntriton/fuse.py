"""``convert_model(model, fuse=True)``: trace with torch.fx, fuse BN -> activation and
BN -> add -> activation into ``BatchNormAct`` modules, convert the remaining batch norms.

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
import warnings
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .act_modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, from_batch_norm

_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.GELU: "gelu"}
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
        module = modules.get(node.target)
        name = _ACT_MODULES.get(type(module))
        if name is None or len(node.args) != 1 or node.kwargs:
            return None
        if name == "gelu" and module.approximate != "none":
            return None
        if name == "leaky_relu":
            slope = module.negative_slope
        return name, float(slope)
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


def _is_plain_batch_norm(module) -> bool:
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not isinstance(
        module, (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d))


def fuse(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` and fuse its BN -> activation / BN -> add -> activation patterns.

    Raises what torch.fx raises when the model does not trace (convert_model catches it).
    """
    gm = fx.symbolic_trace(model)
    gm.train(model.training)
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for bn in list(graph.nodes):
        if bn.op != "call_module" or not _is_plain_batch_norm(modules.get(bn.target)):
            continue
        if calls[bn.target] != 1 or len(bn.users) != 1 or len(bn.args) != 1 or bn.kwargs:
            continue
        user = next(iter(bn.users))
        residual, add = None, None
        act = _activation(user, modules) if user.args and user.args[0] is bn else None
        if act is None:
            residual = _residual_of_add(user, bn)
            if residual is None or len(user.users) != 1:
                continue
            add, user = user, next(iter(user.users))
            act = _activation(user, modules) if user.args and user.args[0] is add else None
            if act is None:
                continue
        name, slope = act
        gm.add_submodule(bn.target, from_batch_norm(modules[bn.target], name, slope))
        args = (bn.args[0],) if residual is None else (bn.args[0], residual)
        with graph.inserting_after(user):
            fused = graph.call_module(bn.target, args)
        user.replace_all_uses_with(fused)
        for node in (user, add, bn):
            if node is not None:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def convert_fused(model: nn.Module, plain_convert) -> nn.Module:
    """fuse(), then ``plain_convert`` for the batch norms left; on a trace failure, plain
    conversion with a warning that says why."""
    try:
        gm = fuse(model)
    except Exception as error:  # torch.fx raises many kinds (TraceError, TypeError, ...)
        warnings.warn(
            f"convert_model(fuse=True): torch.fx could not trace {type(model).__name__} "
            f"({type(error).__name__}: {error}); converting batch norms without fusing activations",
            stacklevel=3,
        )
        return plain_convert(model)
    return plain_convert(gm)
