"""The native CPU path: the kernels' algorithm on torch's own CPU operations.

Triton's interpreter runs the kernels on CPU tensors faithfully but slowly (milliseconds
per program instance), which is right for verifying them and wrong for people who run a
model on a CPU.  This module is a second implementation of :mod:`bntriton.dispatch`'s functions,
used for CPU tensors unless ``bntriton.cpu_backend("interpreter")`` /
``BNTRITON_CPU_BACKEND=interpreter`` asks for the kernels.

The numerics are the kernels': every value is first shifted by the per-channel pivot
``K`` (in training the kernels' pivot, from the first rows; the running mean in eval), in the
accumulator dtype, so that ``x - K`` is exact for offset data (training data within two
stds of zero skip the shift, fp16 / bf16 training data a few stds out take their
statistics from short runs as they are, :func:`_offset_run_errors`, and eval data within
:func:`_fold_stds` running stds skip it: :func:`_fold_is_exact_enough`); torch's native CPU batch
norm then takes the statistics of the shifted problem (its CPU reductions accumulate fp32
in fp64), normalizes ``(x - K) - mean_shifted`` and takes the gradients.  Its saved mean
*is* ``mean_shifted`` and its saved inverse std is ``rstd``; the unbiased variance comes
from its running-variance update with momentum 1 on a zero buffer.  Outputs are the
kernels' (same fields, dtypes, strides), so the ops, autograd and tracing cannot tell the
two apart; ``bntriton verify`` and the tests hold both to the same oracle and bounds.

Each function works on a dense matrix form of the view that torch's fast CPU loops
handle: ``(rows, C)`` for channels-last views, ``(N, C, S)`` for channels-first ones.
"""
from __future__ import annotations

import math
import struct
import weakref
from typing import NamedTuple

import torch

from ..kernels.layout import ChannelView
from ..kernels.runtime import accumulator_dtype
from ..kernels.stats import BatchStats


def _matrix(view: ChannelView, t: torch.Tensor) -> torch.Tensor:
    """``t`` (the view's shape and strides) as the dense matrix torch's loops take."""
    if view.channels_last:
        return t.as_strided((view.rows, view.channels), (view.channels, 1), t.storage_offset())
    samples = view.rows // view.spatial
    return t.as_strided(
        (samples, view.channels, view.spatial), (view.stride_n, view.stride_c, 1), t.storage_offset()
    )


def _unmatrix(view: ChannelView, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A result in the matrix form back to the view's shape and strides, in ``dtype``:
    re-strided in place when torch kept the layout (the usual case), else copied once."""
    x = view.tensor
    if m.dtype == dtype and m.storage_offset() == 0 and m.stride() == _matrix(view, x).stride():
        # The same storage under the input's shape and strides, as a tensor of its own
        # rather than a view: forward-mode AD refuses an autograd.Function output that is
        # a view of one of its temporaries (batched jvp checks the tangent's layout).
        return m.new_empty(0).set_(m.untyped_storage(), 0, x.shape, x.stride())
    out = view.empty_like(dtype)
    _matrix(view, out).copy_(m)
    return out


def _per_channel(view: ChannelView, c: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against the matrix form."""
    return c if view.channels_last else c.view(1, -1, 1)


def _first_rows(view: ChannelView, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of each channel's first m = min(16, rows) rows, in the
    accumulator dtype: the mean as ``x_0 + mean(x_i - x_0)``."""
    m = _matrix(view, view.tensor)
    count = min(16, view.rows)
    if view.channels_last:
        first_rows = m[:count]
    else:  # rows run over (sample, position): enough samples for `count` rows, and of
        # each only the first `count` positions (the transposed copy is of those alone)
        samples = -(-count // view.spatial)
        first_rows = m[:samples, :, :count].transpose(1, 2).reshape(-1, view.channels)[:count]
    first_rows = first_rows.to(acc)
    deviation = first_rows - first_rows[0]
    mean_deviation = deviation.sum(0) / count
    variance = (deviation - mean_deviation).square().sum(0) / count
    return first_rows[0] + mean_deviation, variance


def _pivot_of(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """K as the kernels define it (numerics.batch_pivot): the first rows' mean, or 0 where
    it is within two of their standard deviations of zero."""
    return torch.where(mean * mean <= 4.0 * variance, torch.zeros_like(mean), mean)


def _within(mean: torch.Tensor, variance: torch.Tensor, stds: float, eps: float = 0.0) -> bool:
    """Whether every ``|mean| <= stds * sqrt(variance + eps)`` (False for a NaN): one small
    op and a min, as torch's boolean all() costs ~10x as much on C values."""
    if mean.numel() == 0:
        return True
    slack = torch.addcmul(variance.to(mean.dtype), mean, mean, value=-1.0 / (stds * stds))
    return float(slack.min()) >= -eps


def _minus_pivot(view: ChannelView, pivot: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``x - K`` in the matrix form, in the accumulator dtype (read-only: it may be ``x``).

    Where every pivot is 0 (the pivot's rule gives 0 to data whose first rows' mean is
    within two of their standard deviations of zero: the usual case for activations),
    ``x - 0`` is ``x`` exactly and no pass over the data is spent on it.  Reading K costs
    no synchronization: it is a CPU tensor of C values.
    """
    m = _matrix(view, view.tensor)
    if m.dtype == acc and not bool(pivot.any()):  # a NaN pivot counts as nonzero
        return m
    shifted = torch.sub(m, _per_channel(view, pivot))
    return shifted if shifted.dtype == acc else shifted.to(acc)


def _param(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(acc)


def forward_train(view: ChannelView, weight, bias, eps: float) -> tuple[torch.Tensor, BatchStats]:
    """``(y, stats)`` normalized with the batch's statistics (``view.rows >= 1``).

    torch's training forward folds the batch mean into the shift as its eval does, so
    unshifted data (K = 0) are as accurate as shifted ones while every channel's mean is
    within two of its stds of zero (:func:`_fold_is_exact_enough`'s analysis, the
    batch's statistics for the running ones: data always reach one batch std from their
    mean, the std being their RMS deviation).  So the unshifted problem is tried first and
    kept when the batch's own statistics show every mean within two stds, or when the
    kernels' rule leaves it unshifted (the first rows' mean within two of their stds): no
    pass over the data is spent on ``x - K``, here or in the backward.  Data further out
    are shifted by the kernels' pivot.  For large tensors (:data:`_GATE_VALUES`) the first
    rows decide whether the try is worth a pass: not where they put some mean beyond four
    of their stds.  fp16 / bf16 data are read as they are on the unshifted path
    (:func:`_run_statistics`), and for y when shifted (:func:`_half_shift_stds`); a few
    stds out their statistics still come from runs of the data as they are, shorter ones
    (:data:`_OFFSET_RUN`), as long as :func:`_offset_run_errors` bounds what that costs
    within a quarter of the bounds (the first rows decide whether to try: beyond four of
    their stds and within :func:`_offset_runs_stds`; the runs' statistics whether to keep);
    the statistics of long fp32 / fp64 channels are taken by runs too (:func:`_long_sums`).
    """
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    m = _matrix(view, x)
    long = _long_sums(view, acc)
    native = m.dtype == acc and not long
    half = x.dtype != acc
    first = None if native and x.numel() < _GATE_VALUES else _first_rows(view, acc)
    runs = None
    if first is None or _within(*first, _offset_runs_stds(view.rows) if half else 4.0):
        if native:
            y, mean, rstd, var_unbiased = _native_forward(m, weight, bias, eps, acc)
            # rstd**-2 is variance + eps: |mean| * rstd <= 2 is _within's test.
            kept = _scaled_within(mean, rstd, 2.0)
        else:
            y = None
            # Data the first rows put beyond four stds from zero take shorter runs
            # (_OFFSET_RUN), whose statistics may be kept though the means lie that far out.
            offset = half and first is not None and not _within(*first, 4.0)
            runs = _run_statistics(view, m, eps, offset_errors=offset, run=_OFFSET_RUN if offset else _RUN)
            mean, variance, rstd, var_unbiased = runs[:4] if runs is not None else (None,) * 4
            kept = mean is not None and _within(mean, variance, 2.0)
        if mean is not None and not kept:
            if first is None:
                first = _first_rows(view, acc)
            kept = _within(*first, 2.0)
        if kept:
            if y is None:
                y = _normalized(m, weight, bias, mean, variance, eps, acc)
            zero = torch.zeros_like(mean)
            return _unmatrix(view, y, x.dtype), BatchStats(mean, rstd, None, None, mean, var_unbiased, zero)
    if first is None:
        first = _first_rows(view, acc)
    pivot = _pivot_of(*first)
    if half:
        if runs is not None and _offset_runs_fit(runs.offset_errors, view.rows):
            # fp16 / bf16 a few stds from zero: the unshifted runs' statistics hold (their
            # x_hat error is at most a quarter of the bound's, so the means lie well within
            # _half_shift_stds: y from the data as they are).  The backward's sums are
            # centred on K, with the mean's offset from K taken before its rounding.
            mean_shifted = (runs.mean64 - pivot).to(acc)
            y = _normalized(m, weight, bias, runs.mean, runs.variance, eps, acc)
            stats = BatchStats(mean_shifted, runs.rstd, None, None, runs.mean, runs.var_unbiased, pivot)
            return _unmatrix(view, y, x.dtype), stats
        # Further out: the statistics of the fp32 shift x - K by runs, shifted a chunk at a
        # time (centred sums for channels-first data); y from the data as they are where
        # that is exact enough, else from the whole shift.
        runs = _run_statistics(view, m, eps, centred=not view.channels_last, pivot=pivot)
        if runs is not None:
            mean_shifted, variance, rstd, var_unbiased = runs[:4]
            mean = pivot + mean_shifted
            if _scaled_within(mean, rstd, _half_shift_stds(x.dtype, acc)):
                y = _normalized(m, weight, bias, mean, variance, eps, acc)
            else:
                y = _normalized(_minus_pivot(view, pivot, acc), weight, bias, mean_shifted, variance, eps, acc)
            stats = BatchStats(mean_shifted, rstd, None, None, mean, var_unbiased, pivot)
            return _unmatrix(view, y, x.dtype), stats
    # x - K in the accumulator dtype: exact for values near the pivot, whatever the offset.
    shifted = _minus_pivot(view, pivot, acc)
    # Statistics by runs (_runs) where torch's would be long sequential sums in the
    # accumulator: fp32 / fp64 channels-last and fp64 channels-first data of more than
    # _RUN rows (_long_sums).  (fp16 / bf16 data reach here only as channels-first planes
    # that cannot be cut into runs.)
    runs = _run_statistics(view, shifted, eps) if long else None
    if runs is not None:
        mean_shifted, variance, rstd, var_unbiased = runs[:4]
        y = _normalized(shifted, weight, bias, mean_shifted, variance, eps, acc)
    else:
        y, mean_shifted, rstd, var_unbiased = _native_forward(shifted, weight, bias, eps, acc)
    stats = BatchStats(mean_shifted, rstd, None, None, pivot + mean_shifted, var_unbiased, pivot)
    return _unmatrix(view, y, x.dtype), stats


def _half_shift_stds(dtype: torch.dtype, acc: torch.dtype) -> float:
    """How far from zero, in stds, shifted fp16 / bf16 training data take their y from
    the data as they are and their gradients from sums centred on the pivot
    (:func:`forward_train`, :func:`backward`).  y comes from torch's mixed-precision eval
    with the batch's mean and variance, rounded once into the input's dtype; torch folds
    the mean into the shift in fp32, which at ``k`` stds costs ``1.5 k`` fp32 eps of
    max|y| (:func:`_fold_is_exact_enough`), and rounding the mean ``K + mean_shifted``
    to fp32 half as much again.  The limit is ``eps_in / eps32 / 8`` (1024 for
    fp16, 8192 for bf16), where the fp32 fold and the mean's rounding cost at most 0.19
    of an output eps, and dx's x_hat (centred on the mean rounded to fp32) 0.13 of its
    scale.  Further out the data resolve their own spread only coarsely (a bf16 value
    8192 stds from zero is rounded to 32 stds) and the fp32 shift runs throughout."""
    return torch.finfo(dtype).eps / torch.finfo(acc).eps / 8


def _offset_runs_stds(count: int) -> float:
    """How far from zero, in first-rows stds, fp16 / bf16 training data try the statistics
    of their runs as they are (:func:`_offset_runs_fit`): where the first rows' mean is
    within twice the offset those statistics can take (``x_hat``'s error is at least
    the offset in fp32 eps), a gate for the try, not its decision."""
    return 2.0 * _offset_runs_limits(count)[0]


def _offset_runs_limits(count: int) -> tuple[float, float]:
    """The largest ``(x_hat error, variance error)`` (:func:`_offset_run_errors`, fp32 eps)
    that statistics from runs of unshifted fp16 / bf16 data may carry: a quarter of the
    bound table's fp32 ``dweight`` bound (``1 + 3 log2(count)``: sum(dy * x_hat) moves
    with x_hat) and of its ``running_var`` bound (``2 + 2 log2(count)``); both are
    verification/bounds.py's, for ``count`` values per channel."""
    depth = math.log2(max(count, 2))
    return (1.0 + 3.0 * depth) / 4.0, (2.0 + 2.0 * depth) / 4.0


def _offset_runs_fit(errors, count: int) -> bool:
    """Whether the unshifted runs' statistics of fp16 / bf16 data away from zero are
    within :func:`_offset_runs_limits` (no estimate: False).  At (32, 64, 56, 56) that
    holds out to about 12 stds; beyond, the exact fp32 shift runs."""
    if errors is None:
        return False
    x_hat_limit, var_limit = _offset_runs_limits(count)
    return errors[0] <= x_hat_limit and errors[1] <= var_limit


# From this many values on, the training forward asks the first rows (a dozen small ops
# on C values, ~0.1 ms on a 2-core CPU) whether trying the unshifted problem is worth a
# pass over the data; below, a wasted try on offset data costs less than asking on
# every call.
_GATE_VALUES = 1 << 20


def _scaled_within(mean: torch.Tensor, rstd: torch.Tensor, stds: float) -> bool:
    """Whether every ``|mean| * rstd <= stds`` (False for a NaN): :func:`_within` for
    the statistics torch's training forward returns, in two small ops."""
    if mean.numel() == 0:
        return True
    return float(torch.linalg.vector_norm(mean * rstd, float("inf"))) <= stds


# The longest run of values that one accumulator of torch's batch-norm kernels adds in
# sequence on the run-statistics path (see _runs).
_RUN = 512
# The same for the centred sums of squares (_run_statistics), whose rounding reaches the
# variance undiluted.
_CENTRED_RUN = 16
# The same for the statistics of fp16 / bf16 data a few stds from zero taken as they are
# (:func:`_offset_run_errors`): with few distinct values around such a mean, the
# roundings of a run's sum of squared deviations align, and its error grows with the
# run, not its square root; measured (fp16 and bf16 at 2-300 stds, 256 runs each), a
# run's variance errs by up to 8.5 fp32 eps at 64 values per lane, 16.5 at 128 and 65 at
# 512.  At 128, even runs that all err alike (identical runs) and the estimate's quarter
# keep the running variance within its bound from 4096 values per channel on (below,
# the channels' planes make shorter runs); measured on identical samples 10 stds out,
# 1.2 eps against 33.  Twice the runs, at 64, cost a quarter more time (~0.5 ms at
# (32, 64, 56, 56)) for no error that shows.
_OFFSET_RUN = 128
# Bytes of the vector registers over which torch's channels-first kernels spread a
# channel's values (its Vectorized<float>: 8 fp32 lanes, 4 fp64; twice that with AVX-512).
_VECTOR_BYTES = 32


def _long_sums(view: ChannelView, acc: torch.dtype) -> bool:
    """Whether torch's own kernels, given data in the accumulator dtype ``acc``, would add
    more than ``_RUN`` of a channel's values in sequence in ``acc`` (:func:`_runs`):
    channels-last fp32 / fp64 sums run over a thread's share of the rows, channels-first
    fp64 ones over ``count / 4`` values per lane and then over the samples.  Channels-first
    fp32 data accumulate in fp64 there, and ``rows <= _RUN`` channels are runs already."""
    return view.rows > _RUN and (view.channels_last or acc == torch.float64)


def _runs(view: ChannelView, m: torch.Tensor, run: int = _RUN):
    """The dense matrix form ``m`` of a view as batch-norm inputs whose channels are runs
    of one channel's values, each with its map from its channels to the view's and the
    shape and dims that fold its per-run results into per-channel ones (:func:`_merged`);
    None where the view's strides or size allow no such cut.

    Why: torch's CPU kernels accumulate a channel's sum and sum of squared deviations,
    and the backward's ``sum(dy)`` and ``sum(dy * (x - mean))``, in sequence in one
    accumulator dtype: fp32 for fp16 / bf16 input with fp32 parameters (the mixed
    precision they run under autocast), over ``count / 8`` values per lane for
    channels-first data and over a thread's rows for channels-last; for fp32 and fp64
    channels-last input in the input's own dtype over a thread's rows; for fp64
    channels-first input over ``count / 4`` values per lane and then the samples.  A
    sequential sum of L terms errs by up to ``(L - 1) u`` of the sum of their magnitudes,
    and by about ``sqrt(L) u`` for independent roundings; over a whole channel of a
    32x64x56x56 batch (tests/test_native_cpu.py measures it) that put the running
    variance 2 to 30 times outside the bound table's ``(2 + 2 log2(count)) eps`` for
    fp16 / bf16; for fp32 channels-last and (N, C) data the running variance 1.7, the
    saved unbiased variance 2.5, dweight 2.1 and dbias 1.8 times; for fp64 dweight 4.0
    (NCHW) and 2.0 (channels-last) times, and NCHW y and dx 1.3 and 1.5 times.  Cut into
    runs of at most ``_RUN`` values per accumulator and merged in fp64 by a pairwise sum
    (:func:`_merged`), the sums err as 512-term sums do plus ``O(log(runs)) u`` of fp64:
    measured under 2 fp32 eps for the variance of fp16 / bf16 data, against a bound of at
    least 10 (and 35 at that size); every fp32 output within 0.02 of its bound there, and
    every fp64 one within 0.15 (the float64 oracle's own error included).

    Channels-first: each (sample, channel) plane of S values is cut into runs of S'
    consecutive values (S' divides S, at most one register's lanes times ``_RUN``: one
    lane adds at most ``_RUN`` of them), as the channels of a (1, N * C * S / S', S')
    input.  Channels-last: the first ``G * R`` rows of the ``rows x C`` matrix as R rows
    of ``G * C`` channels (channel ``j * C + c`` holds rows ``j, j + G, ...`` of channel
    c), R = min(rows, ``_RUN``) (each thread adds its share of a run's rows in sequence),
    the last ``rows - G * R < R`` rows as one more input.
    """
    channels = view.channels
    index = torch.arange(channels)
    if view.channels_last:
        rows = view.rows
        run = min(rows, run)
        groups = rows // run
        whole = groups * run
        pieces = [(m[:whole].reshape(run, groups * channels), index.repeat(groups), (groups, channels), (0,))]
        if whole < rows:
            pieces.append((m[whole:], index, (1, channels), (0,)))
        return pieces
    samples, _, spatial = m.shape
    if m.stride() != (channels * spatial, spatial, 1):
        return None
    cuts = _cuts(spatial, accumulator_dtype(m.dtype), run)
    if cuts is None:
        return None
    planes = index.view(1, -1, 1).expand(samples, channels, cuts).reshape(-1)
    return [(m.reshape(1, samples * channels * cuts, spatial // cuts), planes, (samples, channels, cuts), (0, 2))]


def _cuts(spatial: int, acc: torch.dtype, run: int):
    """Into how many runs of consecutive values a channels-first plane of ``spatial``
    values is cut so that one lane of torch's vector registers adds at most ``run`` of a
    run's values (a divisor of ``spatial``), or None where no divisor fits."""
    lanes = _VECTOR_BYTES * 8 // torch.finfo(acc).bits
    least = -(-spatial // (lanes * run))
    return next((k for k in range(least, 2 * least + 1) if spatial % k == 0), None)


def _shifted_runs(view: ChannelView, m: torch.Tensor, pivot: torch.Tensor, run: int):
    """:func:`_runs` of ``m - pivot`` in the accumulator dtype, made lazily a chunk of
    about ``_CHUNK_BYTES`` at a time in one reused buffer (each piece is valid until the
    next is made); None where the view cannot be cut into runs.  The whole shift of a
    large tensor costs a fresh fp32 buffer twice its fp16 / bf16 size, whose first touch
    (page faults) cost more than the subtraction itself: 9-16 ms of a (32, 64, 56, 56)
    bf16 training step whose torch time is 8-11 ms."""
    acc = accumulator_dtype(m.dtype)
    itemsize = torch.finfo(acc).bits // 8
    channels = view.channels
    index = torch.arange(channels)
    if view.channels_last:
        rows = view.rows
        run = min(rows, run)
        chunk_rows = max(1, _CHUNK_BYTES // (run * channels * itemsize)) * run
        buffer = torch.empty(min(rows, chunk_rows), channels, dtype=acc)
        repeated = index.repeat(chunk_rows // run)

        def pieces():
            for start in range(0, rows, chunk_rows):
                out = buffer[: min(rows, start + chunk_rows) - start]
                out.copy_(m[start:start + len(out)]).sub_(pivot)  # exact conversion, then x - K
                groups = len(out) // run
                if groups:
                    yield (out[: groups * run].reshape(run, groups * channels), repeated[: groups * channels],
                           (groups, channels), (0,))
                if groups * run < len(out):
                    yield out[groups * run:], index, (1, channels), (0,)

        return pieces()
    samples, _, spatial = m.shape
    if m.stride() != (channels * spatial, spatial, 1):
        return None
    cuts = _cuts(spatial, acc, run)
    if cuts is None:
        return None
    chunk = max(1, _CHUNK_BYTES // (channels * spatial * itemsize))
    buffer = torch.empty(min(samples, chunk), channels, spatial, dtype=acc)
    per_channel = pivot.view(1, -1, 1)

    planes = index.view(1, -1, 1).expand(len(buffer), channels, cuts).reshape(-1)

    def pieces():
        for start in range(0, samples, chunk):
            out = buffer[: min(samples, start + chunk) - start]
            out.copy_(m[start:start + len(out)]).sub_(per_channel)
            n = len(out)
            yield (out.reshape(1, n * channels * cuts, spatial // cuts), planes[: n * channels * cuts],
                   (n, channels, cuts), (0, 2))

    return pieces()


# The shifted runs' chunk (_shifted_runs): a few MiB, a few dozen chunks of a large tensor
# (two small ops each), each read back from cache.
_CHUNK_BYTES = 2 << 20


def _stacked(pieces, values) -> torch.Tensor:
    """``values`` (one per piece, per run) in fp64, each in its piece's shape and stacked
    along the first dim: (runs, C) for channels-last pieces, (samples, C, cuts) for
    channels-first ones, channel c at index c of dim 1 either way."""
    return torch.cat([v.reshape(shape) for (_, _, shape, _), v in zip(pieces, values)]).to(torch.float64)


def _merged(pieces, values) -> torch.Tensor:
    """Per-channel fp64 sums of ``values`` (one per piece, per run) over the runs: torch's
    sum over the runs of each channel, which adds them pairwise (cascade), so that fp64
    runs (fp64 input) merge with an error of ``O(log(runs))`` fp64 ulps, not ``runs``."""
    return _stacked(pieces, values).sum(pieces[0][3])


class _RunStatistics(NamedTuple):
    """:func:`_run_statistics`' result: the first four in the accumulator dtype."""

    mean: torch.Tensor
    variance: torch.Tensor  # biased
    rstd: torch.Tensor
    var_unbiased: torch.Tensor
    mean64: torch.Tensor  # the mean before its rounding, fp64
    # (x_hat error, variance error) of runs of data far from zero: _offset_run_errors.
    offset_errors: tuple[float, float] | None


def _run_statistics(view: ChannelView, m: torch.Tensor, eps: float, centred: bool = False, pivot=None,
                    offset_errors: bool = False, run: int | None = None):
    """:class:`_RunStatistics` of the matrix form ``m``, from torch's statistics of short
    runs (:func:`_runs`) merged in fp64 by Chan's formula; None where the view cannot be
    cut into runs.  ``offset_errors`` (runs of the data as they are): with the estimate
    of :func:`_offset_run_errors`.  ``run``: the values per accumulator, if not the
    default (:data:`_RUN`, or :data:`_CENTRED_RUN` for centred sums).

    ``centred``: ``m`` is fp32 data shifted by a pivot near their mean (within a fraction
    of a std), whose runs' sums of values and of squares then come from torch's backward
    kernel (``dy = x = m``, mean 0, rstd 1: its ``dweight`` is the sum of squares, its
    ``dbias`` the sum), merged in fp64, with ``M2 = sum(s^2) - sum(s)^2 / n`` there:
    channels-first fp32 statistics accumulate in fp64 in torch and run ~7x slower.  The
    sums of squares err as a run's sequential sum of positive terms does, about
    ``sqrt(L) u`` of themselves for L values per accumulator, and centred data lose at
    most a factor ``1 + mean_shifted^2 / variance`` (~1.1) of that to the subtraction:
    hence runs of ``_CENTRED_RUN`` values per accumulator, not ``_RUN``: measured on
    (32, 64, 56, 56) fp16 data 10 and 32 stds from zero, the running variance came to
    0.82 of its bound at 392 values per lane, 0.15 at 56 and 0.03 at 14 (for no
    measurable time: the runs' count hardly matters to torch's kernel).

    ``pivot``: the statistics of ``m - pivot`` in the accumulator dtype, shifted a chunk
    at a time (:func:`_shifted_runs`)."""
    if run is None:
        run = _CENTRED_RUN if centred else _RUN
    pieces = _runs(view, m, run) if pivot is None else _shifted_runs(view, m, pivot, run)
    if pieces is None:
        return None
    acc = accumulator_dtype(m.dtype)
    count = view.rows
    # Each piece's results, taken before the next piece is made (a shifted piece lives in a
    # buffer the next one reuses); the merges read only the pieces' shapes.
    results, shapes, constants = [], [], {}
    for x, i, shape, dims in pieces:
        channels = len(i)
        if channels not in constants:  # the pieces of a chunked shift share their sizes
            constants[channels] = (torch.ones(channels, dtype=acc), torch.zeros(channels, dtype=acc),
                                   torch.zeros(channels, dtype=acc))
        ones, zeros, other_zeros = constants[channels]
        if centred:
            results.append(torch.ops.aten.native_batch_norm_backward(
                x, x, ones, None, None, zeros, ones, True, 0.0, [False, True, True],
            )[1:])
        else:
            # Buffers in the accumulator dtype (fp32 for fp16 / bf16 data make torch take
            # its mixed-precision kernel: fp32 results); the statistics come back as (run
            # means, biased run variances).  With momentum 1 the buffers' old contents count
            # for nothing (and the results are not read from them): reused across pieces.
            results.append(torch.ops.aten.batch_norm_update_stats(x, zeros, other_zeros, 1.0))
        shapes.append((x.numel() // channels, i, shape, dims))
    pieces = shapes
    if centred:
        total = _merged(pieces, [squares_and_sum[1] for squares_and_sum in results])
        mean = total / count
        m2 = (_merged(pieces, [squares_and_sum[0] for squares_and_sum in results]) - total * mean).clamp_min(0.0)
    else:
        # Chan, in fp64 over all runs at once: the runs' sums of squared deviations plus
        # their counts times their means' squared deviations from the mean.
        dims = pieces[0][3]
        run_means = _stacked(pieces, [run_mean for run_mean, _ in results])
        run_vars = _stacked(pieces, [run_var for _, run_var in results])
        sizes = torch.cat([torch.full(shape[:1], float(n), dtype=torch.float64) for n, _, shape, _ in pieces])
        sizes = sizes.view((-1,) + (1,) * (run_means.dim() - 1))
        mean = (run_means * sizes).sum(dims) / count
        centred_means = run_means - mean.view((1, -1) + (1,) * (run_means.dim() - 2))
        m2 = (sizes * (run_vars + centred_means.square())).sum(dims)
    variance = m2 / count
    rstd = (variance + eps).rsqrt()
    var_unbiased = m2 / (count - 1)
    errors = None
    if offset_errors and not centred:
        errors = _offset_run_errors(run_means.abs().amax(dims), (sizes * centred_means.abs()).sum(dims) / count,
                                    variance, rstd)
    return _RunStatistics(mean.to(acc), variance.to(acc), rstd.to(acc), var_unbiased.to(acc), mean, errors)


def _offset_run_errors(reach: torch.Tensor, spread: torch.Tensor, variance: torch.Tensor,
                       rstd: torch.Tensor) -> tuple[float, float]:
    """Bounds, in fp32 eps, on what runs of unshifted data far from zero cost the
    statistics merged from them by Chan's formula: ``(x_hat error, variance error)``, the
    largest over channels, from each channel's largest run mean ``reach``, the runs' mean
    distance from the merged mean ``spread`` (weighted by their sizes) and the variance.

    torch returns each run's mean rounded, ``m_r + d_r``, and its squared deviations
    about that rounded mean.  The merged mean then errs by at most ``max |d_r|`` (a
    weighted average of the ``d_r``), which moves ``x_hat`` by ``max |d_r| * rstd``; and
    ``sum (x - mean)^2 = sum (x - m_r - d_r)^2 + 2 (m_r + d_r - mean) sum (x - m_r - d_r)
    + n_r (m_r + d_r - mean)^2`` has a middle term, ``-2 n_r d_r (m_r + d_r - mean)``,
    that the merge leaves out: relative to the variance at most ``2 max |d_r| * spread /
    variance``.  ``|d_r| <= gamma |m_r|`` with ``gamma`` one fp32 eps (two roundings): an
    fp32 sum of fp16 / bf16 values (8 to 11 significant bits) is exact while they span a
    few binades, as data beyond a few stds from zero do, which leaves the division's
    rounding; measured, at most 0.4 fp32 eps of ``|m_r|`` from 5 stds out (1.4 at 3 stds,
    where values near zero make the sums round; the estimate is asked for only where the
    first rows put the data beyond four stds), so the estimate is a worst case (the
    roundings rarely align).  Both grow with the offset, ``|mean| * rstd``; the first
    one reaches ``dweight`` (through ``sum(dy * x_hat)``) and y, the second the running
    and saved variances.  A zero variance (a constant channel) gives inf: no estimate."""
    reach = reach.to(variance.dtype)
    x_hat = float((reach * rstd).amax())
    # amax propagates a NaN, and float comparisons with it are False: no estimate.
    var = float((2.0 * reach * spread / variance).amax())
    return x_hat, var


def _normalized(m: torch.Tensor, weight, bias, mean, variance, eps: float, acc: torch.dtype) -> torch.Tensor:
    """torch's eval on the matrix form with the batch's statistics: y computed in fp32 and
    rounded once (the fold's extra error is _fold_is_exact_enough's, a fraction of an
    fp16 / bf16 ulp; the shifted data are centred)."""
    return torch.native_batch_norm(m, _param(weight, acc), _param(bias, acc), mean, variance, False, 0.0, eps)[0]


def _native_forward(m: torch.Tensor, weight, bias, eps: float, acc: torch.dtype):
    """torch's training forward on the matrix form: ``(y, mean, rstd, var_unbiased)``."""
    # Momentum 1 on a zero buffer leaves exactly the unbiased variance in it.
    mean_buffer = torch.zeros(m.shape[1], dtype=acc)
    var_unbiased = torch.zeros(m.shape[1], dtype=acc)
    y, mean, rstd = torch.native_batch_norm(
        m, _param(weight, acc), _param(bias, acc), mean_buffer, var_unbiased, True, 1.0, eps
    )
    return y, mean, rstd, var_unbiased


def backward(
    view: ChannelView, dy, weight, pivot, pivot_stride: int, mean_shifted, rstd,
    batch_stats: bool, param_dtype: torch.dtype,
):
    """``(dx, dweight, dbias)``; same contract as :func:`bntriton.dispatch.backward`."""
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    channels = view.channels
    if view.rows == 0:
        zeros = torch.zeros(channels, dtype=param_dtype)
        return view.empty_like(), zeros, zeros.clone()
    # K at ``pivot[c * pivot_stride]``: the forward's pivot or the running mean.
    k = pivot.as_strided((channels,), (pivot_stride,), pivot.storage_offset()).to(acc)
    if batch_stats and x.dtype != acc and dy.dtype == x.dtype:
        # fp16 / bf16 data read as they are: unshifted (K = 0), or shifted and within
        # _half_shift_stds of zero, their sums then centred on K.
        centre = None if not bool(k.any()) else k
        if centre is None or _scaled_within(k + mean_shifted, rstd, _half_shift_stds(x.dtype, acc)):
            runs = _run_backward(view, _matrix(view, x), _matrix(view, dy), weight, mean_shifted, rstd, acc, centre)
            if runs is not None:
                dx, dweight, dbias = runs
                return _unmatrix(view, dx, x.dtype), dweight.to(param_dtype), dbias.to(param_dtype)
    shifted = _minus_pivot(view, k, acc)
    dy_m = _matrix(view, dy)
    if dy_m.dtype != acc:
        dy_m = dy_m.to(acc)
    runs = None
    if batch_stats and (_long_sums(view, acc) or (view.channels_last and x.dtype != acc)):
        # Sums that torch would take in long sequences: by runs (as the forward's statistics).
        runs = _run_backward(view, shifted, dy_m, weight, mean_shifted, rstd, acc)
    if runs is not None:
        dx, dweight, dbias = runs
    elif batch_stats:
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy_m, shifted, _param(weight, acc), None, None, mean_shifted, rstd, True, 0.0,
            [True, True, True],
        )
    else:
        # Running statistics: dx = dy * weight * rstd, and the parameter gradients are
        # plain per-channel reductions.
        dims = (0,) if view.channels_last else (0, 2)
        centred = shifted - _per_channel(view, mean_shifted)
        dbias = dy_m.sum(dims)
        dweight = (dy_m * centred).sum(dims) * rstd
        coef = rstd if weight is None else rstd * weight.to(acc)
        dx = dy_m * _per_channel(view, coef)
    return _unmatrix(view, dx, x.dtype), dweight.to(param_dtype), dbias.to(param_dtype)


def _run_backward(view: ChannelView, m, dy_m, weight, mean, rstd, acc: torch.dtype, pivot=None):
    """``(dx, dweight, dbias)`` from sums over runs (:func:`_runs`) merged in fp64: of
    fp16 / bf16 data read as they are (``mean`` their mean; or, with ``pivot`` K given,
    ``mean`` their mean minus K) or of their fp32 shift (channels-last), and of fp32 /
    fp64 data whose sums torch would take in long sequences (:func:`_long_sums`); None
    where the view cannot be cut into runs."""
    pieces, dy_pieces = _runs(view, m), _runs(view, dy_m)
    if pieces is None or dy_pieces is None:
        return None
    # sum(dy) and sum(dy * (x - c)) per run, c the mean or K: with rstd 1 torch's
    # "dweight" of a run is the latter exactly (torch centres each value before the
    # product, in fp32: x - K is exact near K, else rounded relative to itself); merged
    # in fp64.
    centre = mean if pivot is None else pivot
    sums = [
        torch.ops.aten.native_batch_norm_backward(
            g, x, torch.ones(len(i), dtype=acc), None, None, centre[i], torch.ones(len(i), dtype=acc), True, 0.0,
            [False, True, True],
        )
        for (x, i, _, _), (g, _, _, _) in zip(pieces, dy_pieces)
    ]
    dot = _merged(pieces, [s[1] for s in sums])
    dbias = _merged(pieces, [s[2] for s in sums])
    if pivot is not None:
        # sum(dy (x - mean)) = sum(dy (x - K)) - (mean - K) sum(dy), in fp64: K lies within
        # a fraction of a std of the mean (the first rows' mean), so little cancels.
        dot = dot - mean.double() * dbias
    rstd64 = rstd.double()
    dweight = dot * rstd64
    if view.tensor.dtype != acc:
        # dx of fp16 / bf16 data from torch's backward: its whole-channel fp32 sums
        # (errors of up to ~1e-4 relative, :func:`_runs`) reach only dx, stored in fp16 /
        # bf16 whose eps is 2**13 / 2**16 times fp32's, and rounded once.  Shifted data
        # are centred on K + mean rounded to fp32 (:func:`_half_shift_stds`).
        centre = mean if pivot is None else pivot + mean
        dx = torch.ops.aten.native_batch_norm_backward(
            dy_m, m, _param(weight, acc), None, None, centre, rstd, True, 0.0, [True, False, False]
        )[0]
        return dx, dweight, dbias
    assert pivot is None, "the runs' dx of fp32 / fp64 data takes them shifted"
    # fp32 / fp64: dx = k (dy - mean(dy) - x_hat mean(dy x_hat)), k = weight * rstd, from
    # the merged sums, as two elementwise passes over x (or x - K) and dy:
    #     dx = dy * k + (x * q + r),  q = -k b,  r = k (b mean - a),
    # a = mean(dy), b = mean(dy * x_hat) * rstd, the coefficients formed in fp64 and
    # rounded once.  Each product and sum rounds once (u of its terms), so the error is a
    # few u of |k dy| + |k b x| + |r|.  Against the bound's scale, dx_scale = |k| (|dy| +
    # |a| + |x_hat b / rstd|), the only term the centred form (x - mean) would not have is
    # |k b mean|, and |mean| is at most two stds here (unshifted data are kept only then,
    # and shifted ones are centred by the first rows' mean) while the data reach one std
    # from it: at most 2 max(dx_scale), a few eps against the dx bound (55 eps from
    # _RUN values per channel on).  One pass fewer than the centred form.
    count = view.rows
    k = rstd64 if weight is None else rstd64 * weight.double()
    a = dbias / count
    b = dot / count * rstd64.square()
    q = _per_channel(view, (-k * b).to(acc))
    r = _per_channel(view, (k * (b * mean.double() - a)).to(acc))
    dx = torch.addcmul(r, m, q).addcmul_(dy_m, _per_channel(view, k.to(acc)))
    return dx, dweight, dbias


def forward_eval(view: ChannelView, weight, bias, running_mean, running_var, eps: float) -> torch.Tensor:
    """``(x - running_mean) * weight * rstd + bias`` with ``rstd`` from the running variance."""
    x = view.tensor
    acc = accumulator_dtype(x.dtype)
    if _fold_is_exact_enough(running_mean, running_var, eps, _fold_stds(x.dtype, acc, view.rows)):
        # torch's own eval: one pass, ``x * a + (bias - running_mean * a)``, on the input
        # as it is (its output takes the input's strides for contiguous and channels_last
        # tensors, the layouts models use; anything else is re-strided once).
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)
        if y.stride() == x.stride():
            return y
        out = view.empty_like()
        out.copy_(y)
        return out
    shifted = torch.sub(_matrix(view, x), _per_channel(view, running_mean.to(acc)))
    if shifted.dtype != acc:
        shifted = shifted.to(acc)
    # The pivot is the running mean itself, so torch's eval sees a zero mean.  Its eval is
    # elementwise, so it normalizes the shifted buffer in place: one pass that writes no
    # new memory (an out-of-place second pass costs ~1.5x as much).
    zero_mean = torch.zeros(view.channels, dtype=acc)
    unused = torch.empty(0, dtype=acc)
    torch.ops.aten.native_batch_norm.out(
        shifted, _param(weight, acc), _param(bias, acc), zero_mean, running_var.to(acc), False, 0.0, eps,
        out=shifted, save_mean=unused, save_invstd=unused,
    )
    return _unmatrix(view, shifted, x.dtype)


def _fold_stds(dtype: torch.dtype, acc: torch.dtype, count: int) -> float:
    """How many running stds from zero the running means may lie for torch's one-pass
    fold to keep y within its bound (:func:`_fold_is_exact_enough`), ``count`` values per
    channel.

    fp32 / fp64 input: the exact shift's own 3.5 eps of max|y| plus the fold's extra
    ``1.5 k + 0.5`` at ``k`` stds stay within the y bound, ``1 + 3 log2(count)`` eps
    (verification/bounds.py), while ``k <= 2 (log2(count) - 1)``: 2 stds for four values
    per channel, 14 for 256, 31 for 100352 (fewer than four values keep the rule of four).
    Beyond, torch's fold can leave the bound, and grows with the offset (measured on
    (8, 64, 28, 28): 10 eps at 100 stds, 580 at 1e4, where the exact shift stays under
    1.3), so the exact shift runs.

    fp16 / bf16 input is folded in fp32 and rounded once into its own dtype, so the fold's
    extra error, ``1.5 k`` fp32 eps of max|y| at ``k`` stds, is ``1.5 k eps32 / eps_in``
    of the output's eps: 3 such eps are reached only at ``2 eps_in / eps32`` stds (16384
    for fp16, 131072 for bf16), beyond what data of that precision can resolve around
    such a mean; measured, 0.2-0.4 eps out there."""
    if dtype == acc:
        return 2.0 * (math.log2(max(count, 4)) - 1.0)
    return 2.0 * torch.finfo(dtype).eps / torch.finfo(acc).eps


def _fold_is_exact_enough(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                          stds: float) -> bool:
    """Whether torch's single-pass eval keeps y within its bound: every channel's running
    mean within ``stds`` running stds of zero (:func:`_fold_stds`).

    With ``u`` the unit roundoff of the accumulator (eps / 2), ``a = weight / sigma``,
    ``sigma = sqrt(running_var + eps)``, ``D = |(x - mean) * a|`` and ``M = |mean * a|``:
    the exact shift rounds ``x - mean`` (u D), the coefficient ``a`` (about 4u relative:
    the sum, sqrt, division and product by weight), ``(x - mean) * a`` (u D) and ``y``
    (u |y|): about ``6u D + u |y|``.  torch's fold ``y = x * a + (bias - mean * a)``
    rounds ``a`` alike (4u D), then ``mean * a`` (u M), ``bias - mean * a`` (u (|bias| +
    M)), ``x * a`` (u (D + M)) and ``y``: ``5u D + 3u M + u |bias| + u |y|``.  Its extra
    error, ``3u M + u |bias|``, measured as the bound table does (normwise, eps of max|y|,
    where max|y| >= |weight| + |bias| for data reaching one running std on both sides of
    the running mean, which is what running statistics describe) is at most ``(1.5 M +
    0.5 |bias|) / (|weight| + |bias|)`` eps: with ``|mean| <= k sigma``, ``M <= k
    |weight|``, at most ``1.5 k + 0.5`` eps on top of the shift's 3.5.  This is a worst
    case: the roundings rarely align (measured ~0.1 eps per std of offset).  For fp16 /
    bf16 input torch folds in fp32, where it costs a fraction of the input's ulp.  Reading
    the running statistics costs no synchronization: they are CPU tensors, O(C) values.
    """
    try:
        key = (running_mean._version, running_mean.data_ptr(), id(running_var), running_var._version,
               running_var.data_ptr(), eps, stds)
    except RuntimeError:  # inference tensors keep no version counter: decide every time
        return _within(running_mean, running_var, stds, eps)
    tensor_id = id(running_mean)
    known = _fold_decisions.get(tensor_id)
    if known is not None and known[0]() is running_mean and known[1] == key:
        return known[2]
    decision = _within(running_mean, running_var, stds, eps)
    _fold_decisions[tensor_id] = (
        weakref.ref(running_mean, lambda _, i=tensor_id: _fold_decisions.pop(i, None)), key, decision,
    )
    return decision


# The fold decision per running-mean tensor (by identity, held weakly: tensors compare
# elementwise, so they cannot be dictionary keys themselves), with the version counters
# and storages of both running statistics it was made for: eval calls between two
# training steps, or a whole inference run, reuse it instead of spending four small ops
# on C values per call.  Any in-place update bumps a version.
_fold_decisions: dict = {}


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum) -> None:
    """The kernel's running-statistics update, ``(1 - f) running + f batch`` in the
    accumulator dtype with ``f = momentum`` or ``1 / num_batches_tracked``.

    Buffers in the accumulator dtype (the usual case) take two in-place ops for both:
    the products by ``1 - f`` and then ``+ f batch`` fused (torch's add with alpha), which
    rounds once where the kernel's ``(1 - f) r + f b`` may round twice (less than an ulp
    apart).  Others are updated in the accumulator and rounded once into their dtype."""
    acc = mean.dtype
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean.dtype == acc and running_var.dtype == acc:
        # f and 1 - f rounded as the kernel rounds them, in the accumulator dtype (reading
        # the counter costs no synchronization: it is a CPU tensor).
        factor = _rounded(momentum if momentum is not None else 1.0 / float(num_batches_tracked), acc)
        keep = _rounded(1.0 - factor, acc)
        torch._foreach_mul_([running_mean, running_var], keep)
        torch._foreach_add_([running_mean, running_var], [mean, var_unbiased], alpha=factor)
        return
    if momentum is None:
        factor = 1.0 / num_batches_tracked.to(acc)
    else:
        factor = torch.tensor(momentum, dtype=acc)
    keep = 1.0 - factor
    running_mean.copy_(keep * running_mean.to(acc) + factor * mean)
    running_var.copy_(keep * running_var.to(acc) + factor * var_unbiased)


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (fp32 / fp64), as a Python float."""
    return value if dtype == torch.float64 else struct.unpack("f", struct.pack("f", value))[0]
