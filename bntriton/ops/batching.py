"""vmap batching rules: B vmapped batch norms of C channels are one batch norm of B*C channels.

Batch norm treats channels independently, so ``torch.func.vmap`` over a batch dimension
of size B folds it into the channel axis: an input of per-problem shape (N, C, *S) with
the vmapped dimension anywhere becomes (N, B*C, *S), per-channel tensors (C,) become
(B*C,), and one launch normalizes all B problems.  The outputs unfold the same way.
This serves model ensembles (``torch.func.functional_call`` over
``torch.func.stack_module_state``), per-sample work and gradcheck's batched checks.

A vmapped argument that is not batched (shared weights, say) is repeated B times.  Folding
copies the input once unless its batch dimension already sits next to the channels.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


def fold_input(x: Tensor, bdim: Optional[int], size: int) -> Tensor:
    """(N, C, *S) per problem, vmapped at ``bdim`` (None: shared) -> (N, size*C, *S)."""
    x = x.unsqueeze(1).expand(x.shape[0], size, *x.shape[1:]) if bdim is None else x.movedim(bdim, 1)
    return x.reshape(x.shape[0], size * x.shape[2], *x.shape[3:])


def fold_channels(t: Optional[Tensor], bdim: Optional[int], size: int) -> Optional[Tensor]:
    """A per-channel (C,) tensor vmapped at ``bdim`` -> (size*C,)."""
    if t is None:
        return None
    if bdim is None:
        return t.repeat(size)
    return t.movedim(bdim, 0).reshape(-1)


def unfold_output(y: Tensor, size: int) -> Tensor:
    """(N, size*C, *S) -> (N, size, C, *S): the vmapped dimension at 1."""
    return y.reshape(y.shape[0], size, y.shape[1] // size, *y.shape[2:])


def unfold_channels(t: Tensor, size: int) -> Tensor:
    """(size*C,) -> (size, C): the vmapped dimension at 0."""
    return t.reshape(size, -1)


def train_rule(train: Callable, info, in_dims, x, weight, bias, eps):
    """``train``'s outputs (y, five statistics) for the folded problem, unfolded."""
    size = info.batch_size
    x_dim, w_dim, b_dim, _ = in_dims
    y, *stats = train(
        fold_input(x, x_dim, size), fold_channels(weight, w_dim, size), fold_channels(bias, b_dim, size), eps
    )
    return (unfold_output(y, size), *(unfold_channels(s, size) for s in stats)), (1,) + (0,) * len(stats)


def eval_rule(evaluate: Callable, info, in_dims, x, weight, bias, running_mean, running_var, eps):
    size = info.batch_size
    x_dim, w_dim, b_dim, m_dim, v_dim, _ = in_dims
    y = evaluate(
        fold_input(x, x_dim, size), fold_channels(weight, w_dim, size), fold_channels(bias, b_dim, size),
        fold_channels(running_mean, m_dim, size), fold_channels(running_var, v_dim, size), eps,
    )
    return unfold_output(y, size), 1


def update_rule(update: Callable, info, in_dims, running_mean, running_var, num_batches_tracked,
                mean, var_unbiased, momentum):
    """The running-statistics update of B problems, in place on the (B, C) buffers."""
    size = info.batch_size
    rm_dim, rv_dim, count_dim, mean_dim, var_dim, _ = in_dims
    if rm_dim is None or rv_dim is None:
        # As torch: an in-place update of an unbatched tensor with batched values.
        raise RuntimeError(
            "vmap: batch_norm would update unbatched running statistics with each vmapped "
            "problem's batch statistics; stack the running statistics as well "
            "(torch.func.stack_module_state) or use training=False"
        )
    running = [running_mean.movedim(rm_dim, 0), running_var.movedim(rv_dim, 0)]
    folded = [r.reshape(-1) for r in running]  # views when the stacked buffers are dense
    mean, var_unbiased = fold_channels(mean, mean_dim, size), fold_channels(var_unbiased, var_dim, size)
    if count_dim is None or momentum is not None:
        if count_dim is not None:
            num_batches_tracked.add_(1)  # every problem counts its own batches
            num_batches_tracked = None
        update(*folded, num_batches_tracked, mean, var_unbiased, momentum)
    else:
        # Cumulative average with a counter per problem: factor 1 / count per problem.
        num_batches_tracked.add_(1)
        factor = 1.0 / num_batches_tracked.movedim(count_dim, 0).reshape(size, 1).to(mean.dtype)
        factor = factor.expand(size, mean.numel() // size).reshape(-1)
        for r, batch in zip(folded, (mean, var_unbiased)):
            r.copy_((r.to(mean.dtype) * (1 - factor) + batch * factor).to(r.dtype))
    for r, f in zip(running, folded):
        if f.data_ptr() != r.data_ptr() or not r.is_contiguous():
            r.copy_(f.reshape(r.shape))
    return None, None


def backward_rule(backward: Callable, info, in_dims, grad_out, x, weight, running_mean, mean_shifted, rstd,
                  pivot):
    """``(dx, dweight, dbias)`` for the folded problem, unfolded."""
    size = info.batch_size
    g_dim, x_dim, w_dim, m_dim, s_dim, r_dim, p_dim = in_dims
    dx, dweight, dbias = backward(
        fold_input(grad_out, g_dim, size), fold_input(x, x_dim, size), fold_channels(weight, w_dim, size),
        fold_channels(running_mean, m_dim, size), fold_channels(mean_shifted, s_dim, size),
        fold_channels(rstd, r_dim, size), fold_channels(pivot, p_dim, size),
    )
    return (unfold_output(dx, size), unfold_channels(dweight, size), unfold_channels(dbias, size)), (1, 0, 0)


def eval_backward_rule(backward: Callable, info, in_dims, grad_out, x, weight, running_mean, running_var, eps):
    """``(dx, dweight, dbias)`` of the eval forward for the folded problem, unfolded."""
    size = info.batch_size
    g_dim, x_dim, w_dim, m_dim, v_dim, _ = in_dims
    dx, dweight, dbias = backward(
        fold_input(grad_out, g_dim, size), fold_input(x, x_dim, size), fold_channels(weight, w_dim, size),
        fold_channels(running_mean, m_dim, size), fold_channels(running_var, v_dim, size), eps,
    )
    return (unfold_output(dx, size), unfold_channels(dweight, size), unfold_channels(dbias, size)), (1, 0, 0)
