"""Where kernels run: compiled on CUDA tensors, in Triton's interpreter on CPU tensors.

:func:`kernel` compiles a Triton function for CUDA tensors and runs the very same code
in Triton's interpreter for CPU tensors, chosen per launch from the arguments' device (no
``TRITON_INTERPRET`` needed).  Without that variable, ``triton.language``'s own ``@jit``
functions (``tl.sum``, ``tl.zeros``, ...) and our device helpers refuse to be called from
Python; while an interpreted kernel runs they are routed to the interpreter too
(:func:`_interpreting`).  Also here: how arguments reach a kernel (the accumulator dtype
as a constexpr, Python floats split into two fp32 parts).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


# ------------------------------------------------------------------ CPU backend switch
#
# CPU tensors have two implementations: "native" (torch's own CPU operations, fed the same
# pivot-shifted problem; the default for people running a model on CPU) and
# "interpreter" (these very kernels in Triton's interpreter: slow, and the way to verify
# the kernels without a GPU).  The environment variable BNTRITON_CPU_BACKEND sets the
# default; :func:`cpu_backend` overrides it for a block of code.  CUDA tensors always
# run the compiled kernels.

CPU_BACKENDS = ("native", "interpreter")
_cpu_backend_override = threading.local()


def current_cpu_backend() -> str:
    """The CPU backend in force: the innermost :func:`cpu_backend` block, else
    ``BNTRITON_CPU_BACKEND``, else ``"native"``."""
    name = getattr(_cpu_backend_override, "name", None) or os.environ.get("BNTRITON_CPU_BACKEND") or "native"
    if name not in CPU_BACKENDS:
        raise ValueError(f"BNTRITON_CPU_BACKEND must be one of {CPU_BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def cpu_backend(name: str):
    """``with bntriton.cpu_backend("interpreter"):`` runs CPU tensors through the Triton
    kernels in the interpreter (``"native"``: torch's CPU operations) inside the block."""
    if name not in CPU_BACKENDS:
        raise ValueError(f"cpu_backend must be one of {CPU_BACKENDS}, got {name!r}")
    previous = getattr(_cpu_backend_override, "name", None)
    _cpu_backend_override.name = name
    try:
        yield
    finally:
        _cpu_backend_override.name = previous


@functools.lru_cache(maxsize=None)
def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


_interpreter_lock = threading.RLock()

# Triton 3.8 and later give tl.tensor a NumPy-2.4-proof ``__index__`` themselves: only
# older interpreters need :func:`_interpreting`'s patch of that private hook.
_INDEX_PATCH_NEEDED = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8)


@contextlib.contextmanager
def _interpreting():
    """Let ``@triton.jit`` device functions be called from an interpreted kernel.

    Compilation never goes through ``JITFunction.__call__`` (the code generator inlines
    calls from the AST), so the patch cannot affect CUDA launches.
    """
    from triton.runtime import interpreter

    with _interpreter_lock:
        original_call = JITFunction.__call__
        original_patch = getattr(interpreter, "_patch_lang_tensor", None) if _INDEX_PATCH_NEEDED else None
        original_cast = interpreter.InterpreterBuilder.cast_impl
        JITFunction.__call__ = _call_interpreted
        interpreter.InterpreterBuilder.cast_impl = _rounding_cast(original_cast)
        if original_patch is not None:

            def patch_with_index(tensor, scope):
                # Triton <= 3.6 gives tl.tensor an ``__index__`` of ``int(array)``, which
                # NumPy >= 2.4 refuses for the one-element arrays scalar arguments become,
                # so a ``range`` over a kernel argument fails there (the GPU machine pairs
                # triton 3.6 with NumPy 2.5).  ``.item()`` works on every version.
                original_patch(tensor, scope)
                scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

            interpreter._patch_lang_tensor = patch_with_index
        try:
            yield
        finally:
            JITFunction.__call__ = original_call
            interpreter.InterpreterBuilder.cast_impl = original_cast
            if original_patch is not None:
                interpreter._patch_lang_tensor = original_patch


def _rounding_cast(original_cast):
    """The interpreter's cast, with fp32 -> bf16 rounded to nearest even as on a GPU.

    The interpreter truncates (drops the low 16 bits, whatever ``fp_downcast_rounding``
    says), which biases every bf16 output towards zero by half an ulp on average and
    doubles its error next to torch's.  fp16 goes through NumPy, which already rounds to
    nearest even.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            # Add half an ulp of bf16, less one unless the kept part is odd: ties to even.
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            # A NaN stays a (quiet) NaN: the addition could carry its payload into inf.
            quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
            data = np.where(np.isnan(src.data), quiet_nan, rounded)
            return TensorHandle(data, dst_type.scalar)
        return original_cast(self, src, dst_type)

    return cast_impl


def _call_interpreted(jit_function, *args, **kwargs):
    """A device-function call inside an interpreted kernel.

    ``InterpretedFunction.__call__`` would patch ``triton.language`` for the callee in a
    scope nobody restores; the leaked patches then break any later compilation for the
    GPU in the same process.  Here the callee's patches are undone when it returns (they
    nest: the restore puts back what the caller's own patch had set).
    """
    from triton.runtime import interpreter

    scope = interpreter._patch_lang(jit_function.fn)
    try:
        return _interpreted(jit_function.fn).rewrite()(*args, **kwargs)
    finally:
        scope.restore()


class DualKernel:
    """A Triton kernel that runs compiled on CUDA tensors and interpreted on CPU tensors."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = triton.jit(fn)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            if device.type == "cuda":
                return self.compiled[grid](*args, **meta)
            meta.pop("num_warps", None)
            # The interpreter computes with NumPy, which warns on NaN / inf arithmetic; the
            # kernels define what NaN and inf produce (a NaN stays in its channel), so
            # those warnings are noise to the caller.
            with _interpreting(), np.errstate(all="ignore"):
                return _interpreted(self.fn)[grid](*args, **meta)

        return launch


def kernel(fn) -> DualKernel:
    """Decorator: ``@kernel`` in place of ``@triton.jit`` for a launchable kernel."""
    return DualKernel(fn)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16 / bf16 / fp32 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulator(dtype: torch.dtype):
    """The Triton dtype matching :func:`accumulator_dtype`, passed as a constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=256)
def split_float(value: float) -> tuple[float, float]:
    """``value`` as fp32 ``hi + lo``: Triton passes Python floats as fp32, which would round
    eps and momentum to 24 bits in fp64 kernels; the kernels add the parts in their own
    accumulator dtype.  Cached: a model passes the same few eps and momenta on every call,
    and the NumPy conversions cost microseconds of host time each."""
    import numpy as np

    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))
