"""Launches bound to one launch site: a compiled variant called with no lookup at all.

A cached launch (kernels/cached_launches.py, normalize.EvalLaunch) fixes, per input
geometry, each of its kernels' grid, sizes, strides and constexprs; from call to call only
the tensors, the eps / momentum floats, the device and the stream change.  A direct launch
(runtime.DirectLaunches) still pays, per call, DualKernel's closure, a key over every
argument and a dict lookup.  A :class:`BoundLaunch` stands for one ``kernel[grid](...,
**meta)`` of such a site: the first launch goes the usual way, and once the variant it
used is known the launch site keeps it with its pre-packed trailing arguments (the
constexprs in signature order, ``DirectLaunches.bound_tail``) and the device it was
bound on.  A later call checks a guard and calls Triton's C launcher itself.

**The guard** is the direct path's key, checked against the bound call's instead of
looked up, over what a launch site does not fix:

* Triton's launch path is not to be skipped: direct launches on (``runtime._DIRECT_ENABLED``)
  and no launch hook registered (a profiler's hooks need Triton's launch metadata);
* the current CUDA device is the one bound on (Triton compiles and loads a kernel per
  device, and launches on the current one);
* every argument of the same type as when bound (a traced or other tensor subclass, a
  None where a pointer was: another variant or another path);
* every int, bool and None by value (Triton specializes ints on 1, on divisibility by 16
  and on their width);
* every tensor's dtype (the pointer types of the signature) and every pointer 16-byte
  aligned (Triton specializes on pointer alignment; the variant was bound with all
  aligned, since an unaligned one has no direct key).  A tensor passed in several
  positions (a placeholder for an unused pointer) is read once, after checking that
  those positions still hold one and the same tensor.

Floats are not specialized on (Triton passes them as fp32); the keywords (constexprs,
num_warps) and the grid are the launch site's own and fixed.  That is everything the
direct key holds, so a call passing the guard is one the direct path would launch with
the very same variant and arguments, and a call failing it takes the direct path (which
may bind the site anew).  CPU tensors (the interpreter) never bind: a cached launch is
per device, so a bound site only ever sees the device kind it was bound on, and a launch
whose first argument is not a plain CUDA tensor is never bound.
"""
from __future__ import annotations

import functools
import operator

import torch
from triton import knobs as _knobs

from . import runtime

# Module globals so that tests (and perf/frames.py) can stand in for CUDA on a CPU.
_cuda_device = getattr(torch._C, "_cuda_getDevice", None)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_on_cuda = operator.attrgetter("is_cuda")
_hook_knobs = _knobs.runtime
_or = operator.or_
_is = operator.is_
_reduce = functools.reduce
_data_ptr = runtime._data_ptr
_dtype_of = runtime._dtype_of


def _getter(indices: list):
    """``args -> tuple(args[i] for i in indices)`` as one C-level call (no Python frame:
    the guard runs on every launch)."""
    if len(indices) >= 2:
        return operator.itemgetter(*indices)
    if indices:
        return operator.itemgetter(slice(indices[0], indices[0] + 1))
    return operator.itemgetter(slice(0, 0))


class BoundVariant:
    """What a bound launch site calls: Triton's launcher for one compiled variant, with the
    guard's expected values (see the module docstring).

    A launch site passes some tensors several times (placeholders for unused pointers):
    the guard reads dtype and address of each distinct one only, once it has checked that
    the positions that held one tensor when bound still hold one tensor."""

    __slots__ = ("compiled", "launcher", "grid", "function", "metadata", "tail", "device", "types", "keyed",
                 "values", "tensors", "dtypes", "firsts", "repeats")

    def __init__(self, compiled, tail: tuple, device: int, grid: tuple, args: tuple):
        self.compiled = compiled  # keeps the loaded module alive with the function below
        self.launcher = compiled.run  # a property on CompiledKernel: resolved once here
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.tail = tail
        self.device = device
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.types = tuple(map(type, args))
        first_of, distinct, firsts, repeats, keyed = {}, [], [], [], []
        for i, (kind, arg) in enumerate(zip(self.types, args)):
            if kind in runtime._TENSOR_TYPES:
                first = first_of.setdefault(id(arg), i)
                if first == i:
                    distinct.append(i)
                else:
                    firsts.append(first)
                    repeats.append(i)
            elif kind is not float:  # Triton passes floats as fp32, whatever their value
                keyed.append(i)
        self.keyed, self.tensors = _getter(keyed), _getter(distinct)
        self.firsts, self.repeats = _getter(firsts), _getter(repeats)
        self.values = self.keyed(args)
        self.dtypes = tuple(map(_dtype_of, self.tensors(args)))


def bind(kernel, grid: tuple, args: tuple, meta: dict) -> BoundVariant | None:
    """The variant the direct path has for this launch, bound to a launch site, or None
    where the launch is not a direct one (see the module docstring)."""
    first = args[0]
    if type(first) not in runtime._TENSOR_TYPES or not _on_cuda(first) or _raw_stream is None:
        return None
    if not runtime._DIRECT_ENABLED or runtime._hooks_registered():
        return None
    key = runtime.launch_key(args, meta)
    if key is None:
        return None
    device = torch.cuda.current_device()
    variant = kernel.direct.variants.get((device, key))
    if variant is None:
        return None
    compiled, tail = variant
    return BoundVariant(compiled, tail, device, grid, args)


class BoundLaunch:
    """``kernel[grid](*args, **meta)`` at one launch site whose grid and keywords never
    change: called with the positional arguments, it launches the bound variant where the
    guard holds, else takes the usual path and binds the site to what that path used."""

    __slots__ = ("kernel", "grid", "meta", "bound")

    def __init__(self, kernel, grid: tuple, meta: dict):
        self.kernel = kernel
        self.grid = tuple(grid)
        self.meta = meta
        self.bound = None

    def __call__(self, *args):
        b = self.bound
        # The guard, written out with C-level calls only: this runs on every launch.  (A
        # launch hook that is not in a HookChain, or None on an older Triton, counts as
        # registered: the direct path decides then.)
        if (b is not None and runtime._DIRECT_ENABLED
                and not (getattr(_hook_knobs.launch_enter_hook, "calls", True)
                         or getattr(_hook_knobs.launch_exit_hook, "calls", True))
                and _cuda_device() == b.device and tuple(map(type, args)) == b.types and b.keyed(args) == b.values
                and all(map(_is, b.firsts(args), b.repeats(args)))):
            tensors = b.tensors(args)
            if tuple(map(_dtype_of, tensors)) == b.dtypes and not _reduce(_or, map(_data_ptr, tensors), 0) & 15:
                b.launcher(*b.grid, _raw_stream(b.device), b.function, b.metadata, None, None, None, *args, *b.tail)
                return
        self.kernel[self.grid](*args, **self.meta)
        # (A CPU launch, the interpreter's, never binds: no call to find that out.)
        self.bound = bind(self.kernel, self.grid, args, self.meta) if _on_cuda(args[0]) else None
