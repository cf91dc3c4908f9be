"""Triton kernels for batch normalization, their launchers and plans only: each kernel file
one kernel family with its launcher; backend.py the four calls the front end makes on them
(bntriton/dispatch.py chooses between them and the native CPU path, bntriton/native);
cached_launches.py and launch_cache.py the launches worked out once per input geometry."""
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
