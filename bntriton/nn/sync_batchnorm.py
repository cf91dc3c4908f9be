"""``SyncBatchNorm``: batch statistics over every process of a torch.distributed group.

Forward (training, world size > 1), per layer and step:

1. each process takes its local statistics with our kernels and packs
   ``[count, K, mean of x - K, M2]`` (``3C + 1`` values, accumulator dtype; ``K`` is the
   statistics' pivot, from each channel's first rows);
2. one ``all_gather`` of those rows;
3. one launch merges the rows in rank order (kernels/sync.py): every process computes
   bit-identical global statistics, and running statistics;
4. the local batch is normalized with them by the usual epilogue.

Backward: the local ``sum(dy)`` and ``sum(dy * (x - mean))``, one ``all_reduce`` of both,
then dx with the global count.  ``dweight`` / ``dbias`` stay local (DDP averages them).

Why the pivot travels too (torch sends ``mean, invstd, count``: 2C + 1): a mean rounded
with its offset is off by half an ulp of the offset, at ``|mean| = 1e4 std`` some 800
fp32 ulps of the output.  Means relative to each process's pivot keep the single-process
accuracy whatever the offset.  perf/SYNCBN.md has the communication costs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import modules
from ..functional import check_arguments
from ..kernels import (
    channel_affine, channel_view, combine_ranks, grad_sums, input_grad, pack_rank_stats, plan,
    update_running_stats,
)


def _all_gather(row: Tensor, group: Any) -> Tensor:
    """``(world, len(row))``: row ``r`` from the group's rank ``r``."""
    gathered = row.new_empty(dist.get_world_size(group), row.numel())
    # Views of one buffer as the output list: a single collective that every backend and
    # supported torch version has (torch's own SyncBatchNorm keeps all_gather_into_tensor
    # off gloo).
    dist.all_gather(list(gathered.unbind(0)), row, group=group)
    return gathered


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, group):
        view = channel_view(input)
        tiles = plan(view)
        gathered = _all_gather(pack_rank_stats(view, eps), group)
        stats, count = combine_ranks(gathered, dist.get_rank(group), weight, bias,
                                     running_mean, running_var, eps)
        if running_mean is not None:  # also bumps num_batches_tracked, in the same launch
            update_running_stats(running_mean, running_var, num_batches_tracked,
                                 stats.mean, stats.var_unbiased, momentum)
        elif num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        # y = (x - K) * scale + shift, K this process's pivot, as the local forward.
        y = channel_affine(view, tiles, stats.pivot, 1, stats.scale, stats.shift)
        ctx.save_for_backward(view.tensor, weight, stats.pivot, stats.mean_shifted, stats.rstd, count)
        ctx.group = group
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable  # no double backward across processes (as torch's): a clear error, not a missing term
    def backward(ctx, grad_y):
        x, weight, pivot, mean_shifted, rstd, count = ctx.saved_tensors
        view = channel_view(x)
        tiles = plan(view)
        dy = view.same_layout(grad_y)
        param_dtype = weight.dtype if weight is not None else rstd.dtype
        sums, dweight, dbias = grad_sums(view, tiles, dy, pivot, 1,
                                         mean_shifted, rstd, param_dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            # One collective for both sums; every process, an empty one too, joins it.
            dist.all_reduce(sums, group=ctx.group)
            dx = input_grad(view, tiles, dy, weight, pivot, 1,
                            mean_shifted, rstd, sums, count)
        return (dx, dweight if weight is not None else None, dbias if ctx.has_bias else None,
                None, None, None, None, None, None)


class SyncBatchNorm(modules._TritonBatchNorm, _BatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by bntriton's kernels, on CPU (gloo) as well as
    on CUDA.

    Same constructor, attributes, state_dict keys and ``convert_sync_batchnorm`` as torch's.
    In training with an initialized process group of more than one rank, the batch
    statistics are those of the whole group's batch; otherwise (eval, no process group,
    world size 1) it is a plain bntriton batch norm.  Ranks may hold uneven batches, and
    empty ones (which must still call forward and backward: the collectives need them).

    It derives from torch's ``_BatchNorm``, not from ``nn.SyncBatchNorm``: DDP refuses any
    ``nn.SyncBatchNorm`` instance in a CPU model, and this class is meant to work there.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        # **kwargs: keyword arguments of the installed torch's batch norm beyond these
        # (e.g. ``bias=`` in newer releases), so the constructor is that torch's.
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self) -> Optional[Any]:
        """The group to synchronize over in this call, or None for a local batch norm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        group = self._sync_group()
        if group is None:
            return super().forward(input)

        tracking = self.track_running_stats
        running_mean = self.running_mean if tracking else None
        running_var = self.running_var if tracking else None
        # All checks but "more than one value per channel": that rule is about the global
        # batch, and a rank may hold a single sample (or none).  An empty slice of the input
        # has its dims, dtype and device, and no values per channel.
        check_arguments(input.narrow(0, 0, 0), running_mean, running_var, self.weight, self.bias,
                        True, self.momentum, self.eps)
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var,
            self.num_batches_tracked if tracking else None,
            None if self.momentum is None else float(self.momentum), float(self.eps), group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
        """Replace every ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (torch's or bntriton's)
        in ``module`` by this class, synchronizing over ``process_group`` (None: the world).

        The replacement shares the original's Parameter and buffer objects (optimizers keep
        working) and takes its settings, train/eval mode and hooks.  Other subclasses of
        torch's batch norms (lazy ones, user classes) are left alone.  Returns ``module``
        with its layers converted (a new object when ``module`` itself is converted).
        """
        if type(module) in _convertible():
            converted = cls.__new__(cls)
            # Copy the containers (parameters, buffers, children, hooks), not their
            # contents: the old and the new module must not share one _parameters dict.
            converted.__dict__.update(
                {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
            )
            converted.process_group = process_group
            module = converted
        for name, child in module.named_children():
            new_child = cls.convert_sync_batchnorm(child, process_group)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


def _convertible() -> tuple[type, ...]:
    return (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        modules.BatchNorm1d, modules.BatchNorm2d, modules.BatchNorm3d, SyncBatchNorm,
    )
