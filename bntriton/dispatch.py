"""Which implementation runs: the Triton kernels (bntriton/kernels/backend.py) or the
native CPU path (bntriton/native/backend.py).

Both provide the same four calls, each taking a rows x channels view
(kernels/layout.py) and an optional fused ``epilogue`` (kernels/activations.py):

* ``forward_train(view, weight, bias, eps, epilogue, running) -> (y, BatchStats)``,
  updating the running statistics when given;
* ``forward_eval(view, weight, bias, running_mean, running_var, eps, epilogue, inference) -> y``;
* ``backward(view, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats,
  param_dtype, epilogue) -> (dx, dweight, dbias)``;
* ``backward_eval(view, dy, weight, running_mean, running_var, eps, param_dtype) -> (dx, dweight, dbias)``;

and two helpers: ``update_running_stats`` (the registered update op, the in-place
layer) and ``affine`` (the pre-activation a silu / gelu after a residual needs in its
backward).  tests/test_backend_contract.py holds the two modules' signatures equal.

CPU tensors take the native path unless the interpreter is asked for
(kernels/runtime.py, ``cpu_backend``); CUDA tensors take the kernels.  Eager calls on
the kernels' route look in kernels/launch_cache.py first.
"""
from __future__ import annotations

from .kernels import backend as kernels
from .kernels.runtime import current_cpu_backend
from .native import backend as native_path

BACKENDS = {"kernels": kernels, "native": native_path}


def native(t) -> bool:
    """Whether ``t`` (a CPU tensor) runs on the native CPU path rather than the kernels."""
    return backend_for(t) is native_path


def backend_for(t):
    """The implementation that computes on ``t``'s device: one of :data:`BACKENDS`."""
    return native_path if t.is_cpu and current_cpu_backend() == "native" else kernels


def forward_train(view, weight, bias, eps, epilogue=kernels.NO_EPILOGUE, running=None):
    return backend_for(view.tensor).forward_train(view, weight, bias, eps, epilogue, running)


def forward_eval(view, weight, bias, running_mean, running_var, eps, epilogue=kernels.NO_EPILOGUE,
                 inference=False):
    return backend_for(view.tensor).forward_eval(view, weight, bias, running_mean, running_var, eps, epilogue,
                                                 inference)


def backward(view, dy, weight, pivot, pivot_stride, mean_shifted, rstd, batch_stats, param_dtype,
             epilogue=kernels.NO_EPILOGUE):
    return backend_for(view.tensor).backward(view, dy, weight, pivot, pivot_stride, mean_shifted, rstd,
                                             batch_stats, param_dtype, epilogue)


def backward_eval(view, dy, weight, running_mean, running_var, eps, param_dtype):
    return backend_for(view.tensor).backward_eval(view, dy, weight, running_mean, running_var, eps, param_dtype)


def affine(view, pivot, pivot_stride, scale, shift, out_dtype, epilogue):
    return backend_for(view.tensor).affine(view, pivot, pivot_stride, scale, shift, out_dtype, epilogue)


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum):
    backend_for(running_mean).update_running_stats(running_mean, running_var, num_batches_tracked, mean,
                                                   var_unbiased, momentum)
