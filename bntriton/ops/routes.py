"""Which way a call goes: eager on plain tensors, under a torch.func transform, or traced.

torch.library's Python dispatch costs 10-25 us per call on the host, more than a whole
small batch norm takes on a GPU.  Eager calls on plain tensors therefore run the ops'
implementations and autograd formulas through a bare ``autograd.Function``; anything
being traced (torch.compile, torch.export, fake or functional tensors) goes through the
registered ops; under torch.func transforms a Function with ``setup_context`` and a vmap
rule runs.  The tests here are written for the hot path: loops rather than generator
expressions, C functions bound to names once.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ..kernels import RunningStats


def composite_backward(*tensors) -> bool:
    """Whether the backward must be built from differentiable / vmappable torch ops."""
    if torch._C._are_functorch_transforms_active() or torch._C._functorch.is_legacy_batchedtensor(tensors[0]):
        return True  # torch.func, or autograd.grad(is_grads_batched=True) (gradcheck's batched check)
    return requires_grad(tensors) if torch.is_grad_enabled() else False


def requires_grad(tensors) -> bool:
    """Whether any of ``tensors`` (None allowed) requires grad; a loop, since a generator
    expression costs ~1 us more per call on this hot path."""
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def route(*tensors) -> int:
    """EAGER for ordinary tensors, TRANSFORMED under torch.func, TRACED for anything
    being traced (fake, functional, proxy tensors; torch.compile)."""
    if torch.compiler.is_compiling():
        return TRACED
    for t in tensors:
        if t is not None and type(t) not in PLAIN_TYPES:
            return TRACED
    return TRANSFORMED if functorch_active() else EAGER


EAGER, TRANSFORMED, TRACED = 0, 1, 2
unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", lambda t: t)
PLAIN_TYPES = (Tensor, torch.nn.Parameter)
functorch_active = torch._C._are_functorch_transforms_active
is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def plain(*tensors) -> bool:
    """True for eager calls on ordinary tensors (not fake, functional, traced or under torch.func)."""
    return route(*tensors) == EAGER


def forward_ad_active() -> bool:
    return forward_ad._current_level >= 0


# forward(ctx, ...) rather than a separate setup_context: the latter binds arguments with
# inspect.signature on every call (~20 us).  Forward mode (torch.autograd.forward_ad)
# works on this path too: jvp reads what save_for_forward kept, only when a dual level is open.


def bare_apply(function: type) -> Callable:
    """``function.apply`` for eager calls, without ``autograd.Function.apply``'s Python
    layer (~10 us per call on a CPU host, half of the whole apply).  Outside torch.func
    transforms, and for a Function without ``setup_context`` (these take ``ctx`` in
    ``forward``), all that layer does before the C++ ``apply`` is unwrap any tensor a
    finished transform left behind (a dead functorch wrapper); done here alike."""
    c_apply = super(torch.autograd.Function, function).apply
    unwrap = getattr(torch._C._functorch, "unwrap_if_dead", None)
    if unwrap is None:  # a torch without it: its own apply
        return function.apply

    def apply(*args):
        return c_apply(*[unwrap(a) if isinstance(a, Tensor) else a for a in args])

    return apply


def records_graph(*tensors) -> bool:
    """Whether autograd (reverse or forward mode) would record this call; when not
    (inference, frozen layers), eager calls skip ``autograd.Function.apply``."""
    if forward_ad_active():
        return True
    return requires_grad(tensors) if torch.is_grad_enabled() else False


def foldable(running: RunningStats) -> bool:
    """Whether the statistics' launches can update ``running`` themselves: plain, dense
    buffers (the kernel writes C consecutive elements).  Called on the eager route only,
    so the tensors' types are all there is to check."""
    counter = running.num_batches_tracked
    return (
        type(running.mean) in PLAIN_TYPES and type(running.var) in PLAIN_TYPES
        and (counter is None or type(counter) in PLAIN_TYPES)
        and running.mean.is_contiguous() and running.var.is_contiguous()
    )
