"""Triton kernels for batch normalization, each file one kernel family with its launcher."""
from .backward import batch_norm_grads
from .launch import accumulator_dtype, forced_plan, plan
from .layout import ChannelView, channel_view
from .normalize import channel_affine
from .stats import BatchStats, batch_stats, update_running_stats

__all__ = [
    "BatchStats", "ChannelView", "accumulator_dtype", "batch_norm_grads", "batch_stats",
    "channel_affine", "channel_view", "forced_plan", "plan", "update_running_stats",
]
