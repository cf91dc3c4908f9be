"""Triton kernels for batch normalization, their launchers and plans only: each file one kernel
family with its launcher.  bntriton/dispatch.py chooses between them and the native CPU path
(bntriton/native)."""
from .backward import batch_norm_grads, grad_sums, input_grad
from .plans import forced_plan, plan
from .runtime import accumulator_dtype
from .layout import ChannelView, channel_view
from .normalize import channel_affine, eval_affine
from .stats import BatchStats, RunningStats, batch_stats, update_running_stats
from .sync import combine_ranks, pack_rank_stats

__all__ = [
    "BatchStats", "ChannelView", "RunningStats", "accumulator_dtype", "batch_norm_grads", "batch_stats",
    "channel_affine", "channel_view", "combine_ranks", "eval_affine", "forced_plan", "grad_sums", "input_grad",
    "pack_rank_stats", "plan", "update_running_stats",
]
