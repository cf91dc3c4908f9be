"""The batch-norm implementations the sweep compares, behind one calling convention.

Each provider computes ``F.batch_norm(x, running_mean, running_var, weight, bias,
training, momentum, eps)`` its own way:

* ``bntriton``      : this repository's Triton kernels (``bntriton.batch_norm``);
* ``torch``         : eager ``F.batch_norm`` (cuDNN or ATen's native CUDA kernels);
* ``torch_compile`` : ``torch.compile`` (Inductor) of a function calling ``F.batch_norm``,
  compiled afresh for every case (static shapes), as a network compiled for one input
  size would be;
* ``flag_gems``     : FlagGems' Triton batch norm, reached through ``aten::native_batch_norm``
  while its ``use_gems`` context registers its kernels (when the package imports).

``context()`` wraps everything the sweep runs for a provider: FlagGems' kernels replace
ATen's only inside it, so the torch reference and the other providers never see them.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from schema import PROVIDERS

OPTIONAL_PROVIDERS = ("flag_gems",)  # a third-party package: skipped when it does not import
MOMENTUM = 0.1
EPS = 1e-5


class Provider:
    name = ""

    def unavailable(self, device: torch.device) -> Optional[str]:
        """Why this provider cannot run on ``device``, or None when it can."""
        return None

    def context(self):
        return contextlib.nullcontext()

    def begin_case(self) -> None:
        """Called once per case, before its first call (compile caches are reset here)."""

    def forward(self, x, running_mean, running_var, weight, bias, training: bool):
        raise NotImplementedError


class BnTriton(Provider):
    name = "bntriton"

    def __init__(self):
        import bntriton

        self._batch_norm = bntriton.batch_norm

    def forward(self, x, running_mean, running_var, weight, bias, training):
        return self._batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)


class Torch(Provider):
    name = "torch"

    def forward(self, x, running_mean, running_var, weight, bias, training):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)


def _batch_norm_for_compile(x, running_mean, running_var, weight, bias, training: bool):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)


class TorchCompile(Provider):
    name = "torch_compile"

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self._compiled = None
        # The sweep times backward alone by calling autograd.grad with retain_graph=True on
        # one forward's graph.  AOTAutograd's compiled backward refuses retain_graph when it
        # "donates" saved buffers (reuses their memory for outputs); turning donation off
        # changes memory reuse, not the kernels Inductor generates.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False

    def unavailable(self, device):
        if device.type == "cpu" and self.backend == "inductor":
            return "skipped on CPU (Inductor builds C++ per shape: not cheap, and CPU timings are not reported)"
        return None

    def begin_case(self):
        # A fresh compile per case: dynamo keeps at most a few specializations per code
        # object (cache_size_limit) and silently falls back to eager past them, which a
        # sweep over dozens of shapes would hit.  reset() empties its caches.
        torch._dynamo.reset()
        self._compiled = torch.compile(_batch_norm_for_compile, backend=self.backend,
                                       dynamic=False, fullgraph=True)

    def forward(self, x, running_mean, running_var, weight, bias, training):
        return self._compiled(x, running_mean, running_var, weight, bias, training)


class FlagGems(Provider):
    name = "flag_gems"

    def __init__(self):
        import flag_gems  # ImportError: the sweep skips this provider and says so

        self._flag_gems = flag_gems

    def unavailable(self, device):
        if device.type != "cuda":
            return "skipped: FlagGems runs on CUDA only"
        return None

    def context(self):
        ops = ["native_batch_norm", "native_batch_norm_backward"]
        try:
            return self._flag_gems.use_gems(include=ops)
        except TypeError:  # older FlagGems: no include=, registers all of its ops
            return self._flag_gems.use_gems()

    def forward(self, x, running_mean, running_var, weight, bias, training):
        # F.batch_norm may pick cuDNN and never reach native_batch_norm, which is the op
        # FlagGems replaces: call that op directly (its autograd formula calls
        # native_batch_norm_backward, FlagGems' too inside the context).
        return torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                training, MOMENTUM, EPS)[0]


def make_provider(name: str, compile_backend: str = "inductor") -> Provider:
    """The provider called ``name``; ImportError when its package is missing."""
    if name == "bntriton":
        return BnTriton()
    if name == "torch":
        return Torch()
    if name == "torch_compile":
        return TorchCompile(compile_backend)
    if name == "flag_gems":
        return FlagGems()
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
