"""Drop-in ``BatchNorm1d/2d/3d``: subclasses of torch's, so constructor arguments,
``state_dict``, ``isinstance`` checks and ``_check_input_dim`` are torch's own; only the
computation is ours.  Unlike torch, a call that raises leaves the module's state
(running statistics, ``num_batches_tracked``) untouched.
"""
from __future__ import annotations

from torch import Tensor, nn

from .functional import batch_norm_with_counter


class _TritonBatchNorm:
    """Mixin holding the forward shared by the three module classes."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        # As torch: batch statistics in training, and in eval when no running stats exist.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        counter = self.num_batches_tracked if tracking else None
        momentum = self.momentum
        if momentum is None and counter is None:
            momentum = 0.0  # torch's factor when there is nothing to average over
        return batch_norm_with_counter(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            counter,
        )


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by bntriton's kernels; input (N, C) or (N, C, L)."""


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by bntriton's kernels; input (N, C, H, W)."""


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by bntriton's kernels; input (N, C, D, H, W)."""


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert_model(module: nn.Module, fuse: bool = False) -> nn.Module:
    """Replace every torch ``BatchNorm1d/2d/3d`` in ``module`` by bntriton's, in place.

    ``fuse=True`` first traces ``module`` with torch.fx and replaces BN -> activation and
    BN -> add -> activation by ``BatchNormAct`` modules (bntriton/fuse.py); it returns a new
    ``torch.fx.GraphModule`` sharing the parameters and buffers, or, when the model does not
    trace, converts without fusing and warns why.

    The replacement takes over the original's attributes wholesale: the same Parameter and
    buffer objects (so optimizers keep working), device, dtype, train/eval mode and hooks.
    Subclasses of torch's classes (SyncBatchNorm, bntriton's own, user subclasses) are left
    alone.  Returns the converted module (a new object when ``module`` itself is replaced).
    """
    if fuse:
        from .fuse import convert_fused  # fuse.py imports the module classes

        return convert_fused(module, convert_model)
    replacement = _REPLACEMENTS.get(type(module))
    if replacement is not None:
        converted = replacement.__new__(replacement)
        # Copy the containers (parameters, buffers, hooks), not their contents: the same
        # Parameter and buffer objects, without the old module sharing the new one's dicts.
        converted.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
        return converted
    for name, child in module.named_children():
        new_child = convert_model(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
