"""Built-in implementations to check besides bntriton: the names ``--impl`` accepts.

Each peer is a batch norm with ``F.batch_norm``'s signature, loaded for a device:

``bntriton``   this project's kernels (``bntriton.batch_norm``)
``torch``      ``torch.nn.functional.batch_norm``, eager (ATen; cuDNN on CUDA where torch picks it)
``inductor``   ``torch.compile(F.batch_norm)``: Inductor's generated kernels (C++ on CPU, Triton on CUDA)
``cudnn``      eager with cuDNN enabled (CUDA only)
``native``     eager with cuDNN disabled: ATen's own CUDA kernels (CUDA only)
``flag_gems``  FlagGems' Triton batch norm (CUDA, when ``flag_gems`` is importable)
``attorch``    attorch's Triton batch norm (CUDA, when ``attorch`` is importable)

A peer that cannot run here (no CUDA device, a library not installed) is refused with
:class:`PeerUnavailable`, a usage error: its cases are neither run nor counted.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


class PeerUnavailable(ValueError):
    """The peer cannot run on this machine or device (and why)."""


@dataclass(frozen=True)
class Peer:
    name: str
    label: str  # what the report calls it
    load: Callable[[torch.device], Callable]  # device -> implementation; raises PeerUnavailable
    doc: str


PEERS: dict[str, Peer] = {}


def _peer(name: str, label: str, doc: str):
    def register(load):
        PEERS[name] = Peer(name, label, load, doc)
        return load

    return register


def _needs_cuda(name: str, device: torch.device) -> None:
    if device.type != "cuda":
        raise PeerUnavailable(f"{name} runs on CUDA tensors only; use --device cuda on a machine with a GPU")
    if not torch.cuda.is_available():
        raise PeerUnavailable(f"{name}: no CUDA device is available")


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerUnavailable(f"{name} needs the '{module}' package ({exc})") from exc


@_peer("bntriton", "bntriton.batch_norm", "this project's Triton kernels")
def _bntriton(device):
    from ..functional import batch_norm

    return batch_norm


@_peer("torch", "torch.nn.functional.batch_norm", "torch eager (ATen; cuDNN on CUDA where torch picks it)")
def _torch(device):
    return F.batch_norm


class InductorBatchNorm:
    """``torch.compile(F.batch_norm)``, compiled afresh for every new signature (shapes,
    strides, dtypes, flags).  Dynamo caches compiled graphs per code object and, past
    its recompile limit, silently runs the function eagerly: a harness that fed a
    hundred shapes through one compiled function would end up judging eager torch.
    ``fullgraph=True`` makes a graph break an error instead of a quiet eager fallback."""

    __name__ = __qualname__ = "inductor"

    def __init__(self):
        self._signature = None
        self._compiled = None

    @staticmethod
    def _describe(t):
        if not isinstance(t, torch.Tensor):
            return t
        return (tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad, t.storage_offset())

    def __call__(self, input, running_mean, running_var, weight=None, bias=None, training=False,
                 momentum=0.1, eps=1e-5):
        args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
        signature = tuple(self._describe(a) for a in args)
        if signature != self._signature:
            torch._dynamo.reset()
            self._compiled = torch.compile(F.batch_norm, dynamic=False, fullgraph=True)
            self._signature = signature
        return self._compiled(*args)


@_peer("inductor", "torch.compile(F.batch_norm) (Inductor)",
       "torch.compile of F.batch_norm (Inductor), compiled per shape")
def _inductor(device):
    return InductorBatchNorm()


def _with_cudnn(enabled: bool, name: str):
    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
        # The flag is read when the forward picks its kernel; the backward follows the
        # forward's choice (its op is recorded in the graph), so it needs no flag.
        with torch.backends.cudnn.flags(enabled=enabled):
            return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)

    batch_norm.__name__ = batch_norm.__qualname__ = name
    return batch_norm


@_peer("cudnn", "F.batch_norm, cuDNN enabled", "torch eager with cuDNN enabled (CUDA only)")
def _cudnn(device):
    _needs_cuda("cudnn", device)
    if not torch.backends.cudnn.is_available():
        raise PeerUnavailable("cudnn: this torch build has no cuDNN")
    return _with_cudnn(True, "cudnn")


@_peer("native", "F.batch_norm, cuDNN disabled (ATen)", "torch eager with cuDNN disabled: ATen's CUDA kernels")
def _native(device):
    _needs_cuda("native", device)
    return _with_cudnn(False, "native")


@_peer("flag_gems", "FlagGems batch_norm", "FlagGems' Triton batch norm (CUDA; needs flag_gems)")
def _flag_gems(device):
    _needs_cuda("flag_gems", device)
    flag_gems = _import("flag_gems", "flag_gems")

    def flag_gems_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                             momentum=0.1, eps=1e-5):
        # use_gems() routes the aten ops through FlagGems; its autograd Function carries
        # the backward, so the backward needs no context.
        with flag_gems.use_gems():
            return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)

    return flag_gems_batch_norm


@_peer("attorch", "attorch batch_norm", "attorch's Triton batch norm (CUDA; needs attorch)")
def _attorch(device):
    _needs_cuda("attorch", device)
    layer = _import("attorch.batch_norm_layer", "attorch")

    def attorch_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                           momentum=0.1, eps=1e-5):
        return layer.BatchNormAutoGrad.apply(input, training, weight, bias, running_mean, running_var,
                                             momentum, eps, running_mean is not None)

    return attorch_batch_norm


def load_peer(name: str, device) -> tuple[Callable, str]:
    """(implementation, label) of a built-in peer for ``device``; :class:`PeerUnavailable`
    if it cannot run there."""
    peer = PEERS[name]
    return peer.load(torch.device(device)), peer.label


def available(device) -> dict:
    """peer name -> None if it can run on ``device``, else why not (no peer is loaded
    twice: loading is cheap, compiling happens on the first call)."""
    out: dict[str, Optional[str]] = {}
    for name in PEERS:
        try:
            load_peer(name, device)
            out[name] = None
        except PeerUnavailable as why:
            out[name] = str(why)
    return out


__all__ = ["InductorBatchNorm", "PEERS", "Peer", "PeerUnavailable", "available", "load_peer"]
