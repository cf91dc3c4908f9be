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
import operator
import os
import threading

import numpy as np
import torch
import triton
import triton.language as tl
from triton import knobs as _knobs
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
        self.direct = DirectLaunches(fn)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            first = args[0]
            tensor = first if isinstance(first, torch.Tensor) else next(a for a in args if isinstance(a, torch.Tensor))
            if tensor.is_cuda:
                if type(tensor) not in _TENSOR_TYPES:
                    # Traced (fake or functional tensors: torch.compile's view of the ops in
                    # ops/): recorded as a call of this kernel, which Inductor copies into
                    # its generated code and launches itself.
                    return torch.library.wrap_triton(self.compiled)[grid](*args, **meta)
                return self.direct.launch(self.compiled, grid, args, meta)
            meta.pop("num_warps", None)
            # The interpreter computes with NumPy, which warns on NaN / inf arithmetic; the
            # kernels define what NaN and inf produce (a NaN stays in its channel), so
            # those warnings are noise to the caller.
            with _interpreting(), np.errstate(all="ignore"):
                return _interpreted(self.fn)[grid](*args, **meta)

        return launch


# ------------------------------------------------------------------ direct CUDA launches
#
# ``JITFunction.run`` works out, on every call, which compiled variant the arguments
# select (it specializes each argument: dtype, 16-byte alignment of pointers, integers
# equal to 1 or divisible by 16), formats a cache key, reads the current device and
# stream, builds launch metadata for hooks and only then launches: ~25 us of host time
# per launch on a GPU machine, more than a small batch norm's kernels take.  Once a
# variant is compiled, :class:`DirectLaunches` launches it itself, under a key of its own
# that is finer than Triton's specialization (a different key only ever means one more
# trip through ``JITFunction.run``, never a wrong variant):
#
# * the arguments' types, every tensor's dtype, and whether all pointers are 16-byte
#   aligned (a call with any unaligned pointer always takes Triton's path);
# * every int, bool, None and constexpr by value (a new shape is one more variant to
#   look up, and the key stays cheap: no per-argument Python code); floats by type only
#   (Triton passes them as fp32 without specializing on them);
# * the keyword arguments (constexprs, num_warps) with their values, and the current CUDA
#   device.
#
# The key is built with C-level iteration over argument positions worked out once per
# argument-type signature.  Launch hooks (profilers) need Triton's launch metadata:
# while any is registered, every launch takes Triton's path.  BNTRITON_DIRECT_LAUNCH=0
# turns the direct path off.

_DIRECT_ENABLED = os.environ.get("BNTRITON_DIRECT_LAUNCH", "1") != "0"
_MAX_VARIANTS = 1024  # per kernel; a model uses a handful of shapes and dtypes
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _positions(indices: list):
    """A function returning ``args[i] for i in indices`` as a tuple (itemgetter returns a
    bare item for one index)."""
    if not indices:
        return lambda args: ()
    if len(indices) == 1:
        (i,) = indices
        return lambda args: (args[i],)
    return operator.itemgetter(*indices)


@functools.lru_cache(maxsize=256)
def _signature_layout(types: tuple):
    """``(tensors, keyed)`` position getters for arguments of these types, or None when
    one is a tensor subclass (Triton's own path decides for those)."""
    tensors, keyed = [], []
    for i, kind in enumerate(types):
        if kind in _TENSOR_TYPES:
            tensors.append(i)
        elif issubclass(kind, torch.Tensor):
            return None
        elif kind is not float:
            keyed.append(i)
    return _positions(tensors), _positions(keyed)


_data_ptr = torch.Tensor.data_ptr
_dtype_of = operator.attrgetter("dtype")


def launch_key(args: tuple, meta: dict):
    """The direct path's key for a launch, or None when it must take Triton's path (an
    unaligned pointer, a tensor subclass)."""
    types = tuple(map(type, args))
    layout = _signature_layout(types)
    if layout is None:
        return None
    tensors = layout[0](args)
    if functools.reduce(operator.or_, map(_data_ptr, tensors), 0) & 15:
        return None
    return (types, *map(_dtype_of, tensors), *layout[1](args), *meta.items())


def _hooks_registered() -> bool:
    knobs = _knobs.runtime
    enter, leave = knobs.launch_enter_hook, knobs.launch_exit_hook
    # triton >= 3.5 keeps hooks in HookChain objects (never None); older: a callable or None.
    return bool((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True)))


# The call ``JITFunction.run`` ends with (triton 3.6 to 3.9), which direct and bound
# launches make themselves with launch metadata and hooks None.
_LAUNCHER_CALL = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
                  "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
                  "*bound_args.values())")


@functools.lru_cache(maxsize=None)
def launcher_convention_known() -> bool:
    """Whether this Triton's ``JITFunction.run`` calls the compiled kernel's launcher as
    direct launches do (read from its source once): a Triton that calls it otherwise, or
    whose source cannot be read, keeps every launch on its own path."""
    import inspect

    try:
        source = inspect.getsource(JITFunction.run)
    except (OSError, TypeError):
        return False
    return _LAUNCHER_CALL in " ".join(source.split()).replace("( ", "(")


class DirectLaunches:
    """Compiled variants of one kernel, launched without ``JITFunction.run`` once known."""

    def __init__(self, fn):
        import inspect

        params = inspect.signature(fn).parameters
        self.names = tuple(params)
        self.defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
        self.variants: dict = {}

    def bound_tail(self, args: tuple, meta: dict) -> tuple:
        """The values of the parameters after the positional ones (keywords, else
        defaults): with ``args`` before them, every parameter's value in signature order,
        as ``JITFunction.run`` hands them to the launcher.  Fixed for a key (keywords are
        part of it)."""
        return tuple(meta[name] if name in meta else self.defaults[name] for name in self.names[len(args):])

    def launch(self, jit_function, grid, args: tuple, meta: dict):
        if not _DIRECT_ENABLED or _hooks_registered():
            return jit_function[grid](*args, **meta)
        key = launch_key(args, meta)
        if key is None:
            return jit_function[grid](*args, **meta)
        device = torch.cuda.current_device()
        key = (device, key)
        variant = self.variants.get(key)
        if variant is None:
            compiled = jit_function[grid](*args, **meta)
            # What Triton's own launch path needs of a compiled kernel; anything else (an
            # unknown Triton version) keeps every launch on Triton's path.
            if (all(getattr(compiled, name, None) is not None for name in ("function", "packed_metadata", "run"))
                    and launcher_convention_known()):
                if len(self.variants) >= _MAX_VARIANTS:
                    self.variants.clear()
                self.variants[key] = (compiled, self.bound_tail(args, meta))
            return compiled
        compiled, tail = variant
        grid_x = grid[0]
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        compiled.run(grid_x, grid_y, grid_z, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)
        return compiled


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
