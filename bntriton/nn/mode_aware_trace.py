"""A torch.fx trace that never bakes in the train/eval mode.

``torch.fx`` runs ``forward`` with proxies: a Python ``if self.training`` or a
``F.dropout(x, p, self.training)`` is evaluated once, at trace time, and the graph keeps
only the branch (or the constant) of that moment.  A converted model would then go on
normalizing with batch statistics, or dropping out, after ``.eval()``.  Three guards:

1. Modules whose code reads ``training`` (batch norms of every kind, dropout, stochastic
   depth / drop path, anything a user wrote), modules that override ``train()``, and
   convolution / linear subclasses (so folding sees them) stay single ``call_module``
   nodes: they run as modules and follow the mode live.
2. The model is traced once with every module in training mode and once in eval mode;
   a graph that differs between the two depends on the mode somewhere outside a leaf
   (the root's own forward, say) and is refused with the place it differs.
3. ``fx.GraphModule`` keeps only the attributes its graph uses; everything else in the
   original's ``state_dict`` (a layer unused in this forward, a buffer only training
   reads) is put back, so the result saves and loads the original's ``state_dict``.
"""
from __future__ import annotations

import functools
import itertools
import types

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ModeDependentTrace(RuntimeError):
    """The traced graph differs between train and eval mode."""


def _code_reads_training(code: types.CodeType) -> bool:
    return "training" in code.co_names or any(
        isinstance(const, types.CodeType) and _code_reads_training(const) for const in code.co_consts)


@functools.lru_cache(maxsize=None)
def reads_training(cls: type) -> bool:
    """Whether a method of ``cls`` (or of a base other than nn.Module) reads an attribute
    named ``training``: conservative (any method, any object), which costs at most a
    fusion opportunity, never a wrong graph."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for value in vars(klass).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            code = getattr(value, "__code__", None)
            if code is not None and _code_reads_training(code):
                return True
    return False


def overrides_train(module: nn.Module) -> bool:
    return type(module).train is not nn.Module.train or type(module).eval is not nn.Module.eval


class ModeAwareTracer(fx.Tracer):
    """torch.fx's tracer with the leaves of guard 1."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (_BatchNorm,) + FOLDABLE) or reads_training(type(m)) or overrides_train(m)
                or super().is_leaf_module(m, qualname))


def _trace_in_mode(model: nn.Module, modules: list, training: bool) -> fx.Graph:
    for m in modules:
        m.training = training
    return ModeAwareTracer().trace(model)


def _callers(node: fx.Node) -> list:
    """The ``(path, class)`` of the modules whose forward ran ``node``, outermost first."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[:-1] if node.op == "call_module" else stack  # a leaf's entry is the call itself


def _where_graphs_differ(a: fx.Graph, b: fx.Graph) -> str:
    """The innermost module whose forward holds the first node where ``a`` and ``b`` part."""
    def key(n):
        return (n.op, n.target, str(n.args), str(n.kwargs))

    for x, y in zip(a.nodes, b.nodes):
        if key(x) != key(y):
            common = list(itertools.takewhile(lambda pair: pair[0] == pair[1], zip(_callers(x), _callers(y))))
            if common:
                path, cls = common[-1][0]
                return f"{path} ({getattr(cls, '__name__', cls)})"
            break
    return "the model's own forward"


def trace_mode_independent(model: nn.Module) -> fx.GraphModule:
    """A GraphModule computing ``model`` in either mode, sharing its leaf modules, with
    every ``state_dict`` key of ``model``.  Raises ModeDependentTrace (or what torch.fx
    raises) when there is none."""
    if overrides_train(model):
        raise ModeDependentTrace(f"{type(model).__name__} overrides train()/eval(), which a GraphModule would lose")
    modules = list(model.modules())
    flags = [m.training for m in modules]
    try:
        train_graph = _trace_in_mode(model, modules, True)
        eval_graph = _trace_in_mode(model, modules, False)
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag
    if train_graph.python_code("self").src != eval_graph.python_code("self").src:
        where = _where_graphs_differ(train_graph, eval_graph)
        raise ModeDependentTrace(f"the traced graph differs between train and eval mode, first in {where}")
    gm = fx.GraphModule(model, train_graph, class_name=type(model).__name__)
    _restore_untraced_state(model, gm)
    # The containers the GraphModule made for traced-through modules take their
    # originals' flags; the shared leaves keep theirs (a frozen batch norm stays in eval).
    originals = dict(model.named_modules())
    for name, sub in gm.named_modules():
        if name in originals and sub is not originals[name]:
            sub.training = originals[name].training
    return gm


def _restore_untraced_state(model: nn.Module, gm: fx.GraphModule) -> None:
    present = set(gm.state_dict().keys())
    for key in model.state_dict().keys():
        if key in present:
            continue
        owner_path, _, attr = key.rpartition(".")
        source, target = model, gm
        for part in owner_path.split(".") if owner_path else []:
            source = source._modules[part]
            if part not in target._modules:
                target.add_module(part, source)  # the whole subtree, shared
            target = target._modules[part]
        if attr in target._parameters or attr in target._buffers:
            continue
        if attr in source._parameters:
            target.register_parameter(attr, source._parameters[attr])
        elif attr in source._buffers:
            target.register_buffer(attr, source._buffers[attr])
        else:
            raise RuntimeError(f"cannot carry state_dict key {key!r} over to the traced graph")
    missing = set(model.state_dict().keys()) - set(gm.state_dict().keys())
    if missing:
        raise RuntimeError(f"state_dict keys lost in tracing: {sorted(missing)}")
