"""How each op is registered: a ``torch.library.triton_op`` whose kernel launches
Inductor can see, with an opaque ``custom_op`` fallback, and outputs that never alias.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional  # noqa: F401 (Optional: see kernel_op)

import torch
from torch import Tensor


# Each op is a torch.library.triton_op: under torch.compile, on CUDA tensors of static
# shape, AOTAutograd runs the op's implementation itself and every kernel launch in it is
# recorded as a wrap_triton call (kernels/runtime.py, DualKernel), which Inductor copies
# into its generated code and launches itself: no bntriton Python per call inside a
# compiled graph, CUDA graphs under mode="reduce-overhead", AOTInductor packages.  Where
# that cannot work, the implementation runs as an opaque op when the graph runs
# (``bntriton::<name>_opaque``, whose fake the caller registers): CPU tensors (the native
# path reads values on the host to choose its route; the interpreter is no kernel
# Inductor can launch), and symbolic sizes (plans and grids are worked out from concrete
# ones).  torch.export keeps the op itself in either case.


def _kernels_visible(args) -> bool:
    """Whether a traced call can be decomposed into its kernels' launches."""
    for a in args:
        if isinstance(a, Tensor):
            if a.device.type != "cuda":
                return False
            for n in (*a.shape, *a.stride()):
                if type(n) is not int:
                    return False
    return True


def kernel_op(name: str, impl: Callable, mutates_args=()):
    """``(op, opaque)``: ``impl`` registered as ``bntriton::<name>`` (a triton_op) and as
    its opaque fallback ``bntriton::<name>_opaque``."""
    # The schema is inferred from ``impl``'s annotations, which ``from __future__ import
    # annotations`` leaves as strings; the wrapper's are evaluated in this module's
    # globals, so every name they use (Tensor, Optional) is imported here.
    opaque = torch.library.custom_op(f"bntriton::{name}_opaque", impl, mutates_args=mutates_args)

    @functools.wraps(impl)
    def decomposed_where_possible(*args):
        return impl(*args) if _kernels_visible(args) else opaque(*args)

    op = torch.library.triton_op(f"bntriton::{name}", decomposed_where_possible, mutates_args=mutates_args)
    return op, opaque


def distinct_outputs(outputs: tuple) -> tuple:
    """``outputs`` with every tensor that shares memory with an earlier one cloned.

    A registered op may not return one tensor twice (torch.compile, torch.export and
    opcheck refuse it), yet the native CPU path returns its batch mean as both ``mean``
    and ``mean_shifted`` when the pivot is 0 (the two are equal then).  Only the ops pay
    for the copy (C values); the eager path keeps the shared tensor.
    """
    seen = set()
    fresh = []
    for t in outputs:
        if type(t) is Tensor and t.numel():  # (traced outputs are the kernels': never shared)
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(ptr)
        fresh.append(t)
    return tuple(fresh)
