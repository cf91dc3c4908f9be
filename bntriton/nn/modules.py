"""Drop-in ``BatchNorm1d/2d/3d`` and ``BatchNormAct1d/2d/3d`` (batch norm with a fused
activation, an optional residual, in place on request): subclasses of torch's
``BatchNorm1d/2d/3d``, so constructor arguments, ``state_dict``, ``isinstance`` checks
and ``_check_input_dim`` are torch's own; only the computation is ours.  Both read the
module's state the same way (:func:`batch_norm_arguments`).  Unlike torch, a call that
raises leaves the module's state (running statistics, ``num_batches_tracked``) untouched.

``inplace=True`` (``BatchNormAct*d``) writes the output into the input's storage and
keeps only the output for the backward (in-place activated batch norm, see
ops/activated.py, InplaceABN): it needs ``activation=None`` or ``"leaky_relu"`` with
``negative_slope > 0``, no residual, and a weight with no zero entry when training.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..functional import batch_norm_act, batch_norm_with_counter, evaluate
from ..kernels.activations import activation_code


def batch_norm_arguments(module) -> tuple:
    """``(running_mean, running_var, weight, bias, training, momentum, eps, counter)`` for a
    batch-norm module's state and mode, as torch's modules derive them: batch statistics in
    training, and in eval when no running statistics exist; the counter bumped only when
    tracking."""
    try:
        # nn.Module.__getattr__ looks parameters and buffers up in these dicts; reading
        # them directly saves ~1 us per tensor.  Only for the classes themselves: a
        # subclass (torch.nn.utils.parametrize makes one) may compute them otherwise.
        if type(module) not in _DICT_READ_CLASSES:
            raise KeyError
        params, buffers = module._parameters, module._buffers
        weight, bias = params["weight"], params["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        num_batches_tracked = buffers["num_batches_tracked"]
    except KeyError:
        weight, bias = module.weight, module.bias
        running_mean, running_var = module.running_mean, module.running_var
        num_batches_tracked = module.num_batches_tracked
    training = module.training
    tracking = training and module.track_running_stats
    use_batch_stats = training or (running_mean is None and running_var is None)
    use_running = not training or module.track_running_stats
    counter = num_batches_tracked if tracking else None
    momentum = module.momentum
    if momentum is None and counter is None:
        momentum = 0.0  # torch's factor when there is nothing to average over
    return (
        running_mean if use_running else None,
        running_var if use_running else None,
        weight, bias, use_batch_stats, momentum, module.eps, counter,
    )


class _TritonBatchNorm:
    """Mixin holding the forward shared by the three module classes."""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it.
        raise RuntimeError(
            f"torch.jit.script cannot compile bntriton's {type(self).__name__} (TorchScript cannot "
            "call Triton kernels or Python operators).  Use bntriton.revert_model(model) first: it "
            "gives torch's own classes back with the same parameters and buffers.  "
            "torch.jit.trace, torch.export and torch.onnx.export work with bntriton's layers in eval mode."
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if type(self) in _OWN_CLASSES:
            # The common cases, what batch_norm_arguments gives for them read straight
            # from the module's dicts: ~2 us less of host time per call, a tenth of
            # torch's whole eval call.
            buffers = self._buffers
            running_mean = buffers["running_mean"]
            if not self.training:
                if running_mean is not None:  # eval with running statistics
                    params = self._parameters
                    return evaluate(input, running_mean, buffers["running_var"], params["weight"], params["bias"],
                                    self.momentum, self.eps)
            elif self.track_running_stats:  # training, tracking: the counter bumped
                counter = buffers["num_batches_tracked"]
                if counter is not None or self.momentum is not None:
                    params = self._parameters
                    return batch_norm_with_counter(input, running_mean, buffers["running_var"], params["weight"],
                                                   params["bias"], True, self.momentum, self.eps, counter)
        return batch_norm_with_counter(input, *batch_norm_arguments(self))


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by bntriton's kernels; input (N, C) or (N, C, L)."""


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by bntriton's kernels; input (N, C, H, W)."""


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by bntriton's kernels; input (N, C, D, H, W)."""


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_OWN_CLASSES = frozenset(_REPLACEMENTS.values())


class _BatchNormAct:
    """Mixin: the forward shared by the three classes (state read as :func:`batch_norm_arguments` reads it)."""

    def _init_act(self, activation, negative_slope, inplace):
        activation_code(activation)  # raises for an unknown name
        if inplace and activation not in (None, "leaky_relu"):
            raise ValueError("inplace=True needs activation=None or 'leaky_relu' (an invertible activation)")
        if inplace and activation == "leaky_relu" and not negative_slope > 0:
            raise ValueError("inplace=True with leaky_relu needs negative_slope > 0")
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.inplace = bool(inplace)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        if type(self) in _DICT_READ_CLASSES and self.training and self.track_running_stats:
            # The common case, what batch_norm_arguments gives for it read straight from the
            # module's dicts (a frame and ~2 us less per call).
            params, buffers = self._parameters, self._buffers
            counter = buffers["num_batches_tracked"]
            if buffers["running_mean"] is not None and (counter is not None or self.momentum is not None):
                return batch_norm_act(
                    input, buffers["running_mean"], buffers["running_var"], params["weight"], params["bias"], True,
                    self.momentum, self.eps, counter, activation=self.activation, residual=residual,
                    negative_slope=self.negative_slope, inplace=self.inplace,
                )
        return batch_norm_act(
            input, *batch_norm_arguments(self),
            activation=self.activation, residual=residual, negative_slope=self.negative_slope,
            inplace=self.inplace,
        )

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        if self.inplace:
            extra += ", inplace=True"
        return super().extra_repr() + extra


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """``act(BatchNorm1d(input) + residual)``; input (N, C) or (N, C, L)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, activation="relu", negative_slope=0.01, inplace=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_act(activation, negative_slope, inplace)


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """``act(BatchNorm2d(input) + residual)``; input (N, C, H, W)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, activation="relu", negative_slope=0.01, inplace=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_act(activation, negative_slope, inplace)


class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d):
    """``act(BatchNorm3d(input) + residual)``; input (N, C, D, H, W)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, activation="relu", negative_slope=0.01, inplace=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_act(activation, negative_slope, inplace)


ACT_CLASSES = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
# The classes whose state batch_norm_arguments reads from the module's dicts.
_DICT_READ_CLASSES = _OWN_CLASSES | frozenset(ACT_CLASSES.values())


def from_batch_norm(bn: nn.modules.batchnorm._BatchNorm, activation, negative_slope=0.01) -> nn.Module:
    """A BatchNormAct taking over ``bn``'s parameters and buffers (the same objects).

    ``bn``'s child modules are not taken over: a batch norm that holds its activation as a
    child (timm's ``BatchNormAct2d``: ``act``, an identity ``drop``) has it computed inside."""
    dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
    base = next(cls for cls in dims if isinstance(bn, cls))
    cls = ACT_CLASSES[dims[base]]
    fused = cls.__new__(cls)
    fused.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in bn.__dict__.items()})
    fused._modules = type(bn._modules)()
    fused._init_act(activation, negative_slope, False)
    return fused


