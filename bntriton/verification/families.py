"""Case families: named groups of :class:`~.strategies.Case` that each aim at one way
a batch norm goes wrong.

A family is a function ``(seed, quick) -> list[Case]``.  ``seed`` picks the data (each case
gets its own seed, derived from the family's name, ``seed`` and its index, and carries it);
the shapes, dtypes and flags of a named family are fixed, so that a failure names the
property that broke.  ``quick`` keeps the cases that matter most, on tensors small enough
for Triton's CPU interpreter; the full set adds dtypes, layouts and sizes.

``random`` is the exception: everything is drawn (:func:`.strategies.draw_case`, the
distributions of :func:`bntriton.testing.cases`) from a ``random.Random`` per case seeded
the same way, so the same seed gives the same cases on every route and in every process.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from .strategies import Case

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[int, bool], list]  # (seed, quick) -> list[Case]
    doc: str  # what it catches, one line


FAMILIES: dict[str, Family] = {}


class FamilyUnavailable(RuntimeError):
    """A family that cannot be built here (a dependency it needs is missing); verify skips it and says why."""


def case_seed(family: str, seed: int, index: int) -> int:
    """A data seed per case.  crc32 (not ``hash``) so it is the same in every process."""
    return zlib.crc32(f"{family}/{seed}/{index}".encode()) & 0x7FFFFFFF


def _family(name: str, doc: str):
    def register(specs: Callable[[bool], list]):
        """``specs(quick)`` lists ``Case`` keyword dicts; a ``"quick": True`` entry keeps a
        case in the quick set (every case is in the full set)."""

        def build(seed: int, quick: bool) -> list:
            out = []
            for spec in specs(quick):
                spec = dict(spec)
                if quick and not spec.pop("quick", False):
                    continue
                spec.pop("quick", None)
                out.append(Case(family=name, seed=case_seed(name, seed, len(out)), **spec))
            return out

        build.__name__ = build.__qualname__ = name
        build.__doc__ = doc
        FAMILIES[name] = Family(name, build, doc)
        return build

    return register


def family_cases(name: str, seed: int = 0, quick: bool = False) -> list:
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name].build(seed, quick)


# ------------------------------------------------------------------------------ random


RANDOM_CASES = {True: (24, 4000), False: (200, 24_000)}  # quick -> (cases, max elements)


def _random(seed: int, quick: bool) -> list:
    import random

    from .strategies import draw_case

    count, max_elements = RANDOM_CASES[quick]
    # One generator per case, seeded like the named families' data: case k is the same
    # whatever the count, the route (command line, bntriton.verify, a test) or the
    # modules loaded.
    return [draw_case(random.Random(case_seed("random", seed, index)), max_elements) for index in range(count)]


FAMILIES["random"] = Family(
    "random", _random, "random shapes, dtypes, layouts, flags and data offsets (the distributions of bntriton.testing.cases)"
)


# ------------------------------------------------------------------------ named families


@_family("large_offset", "mean at 1e4 x std: E[x^2] - E[x]^2 cancels to noise in fp32")
def _large_offset(quick):
    big = dict(offset=1e4, scale=1.0)
    return [
        dict(shape=(16, 6, 4, 4), dtype=f32, **big, quick=True),
        dict(shape=(8, 5, 3, 3), dtype=f32, layout="channels_last", **big, quick=True),
        dict(shape=(256, 3), dtype=f32, offset=1e4, scale=1e-2, quick=True),
        dict(shape=(8, 4, 6), dtype=f32, training=False, **big, quick=True),  # x - running_mean
        # bf16 keeps 8 bits: at 1e4 the data collapse onto a few values per channel, a
        # near-constant channel far from zero; at 100 they keep some spread.
        dict(shape=(16, 4, 8), dtype=bf16, **big, quick=True),
        dict(shape=(16, 4, 8), dtype=bf16, offset=100.0, quick=True),
        dict(shape=(4, 6, 3, 3), dtype=bf16, param_dtype=bf16, layout="channels_last", offset=100.0),
        dict(shape=(4096, 3), dtype=f32, **big, quick=True),  # several row blocks to combine
        dict(shape=(32768, 4), dtype=f32, **big),
        dict(shape=(64, 4, 32, 32), dtype=f32, layout="channels_last", **big),
        dict(shape=(4, 3, 5, 5, 5), dtype=f32, layout="channels_last", **big),
        dict(shape=(32, 4, 5), dtype=f64, param_dtype=f64, **big),
        dict(shape=(32, 4, 5), dtype=f32, steps=3, momentum=None, **big),
    ]


@_family("tiny_variance", "variance below eps (1e-6 vs eps 1e-5): eps dropped or misplaced")
def _tiny_variance(quick):
    tiny = dict(data="tiny_var")
    return [
        dict(shape=(32, 4), dtype=f32, **tiny, quick=True),
        dict(shape=(4, 3, 4, 4), dtype=f32, layout="channels_last", **tiny, quick=True),
        dict(shape=(16, 4, 4), dtype=f16, **tiny, quick=True),
        dict(shape=(16, 4, 4), dtype=bf16, **tiny),
        dict(shape=(16, 4, 4), dtype=f64, param_dtype=f64, **tiny),
        dict(shape=(64, 3), dtype=f32, scale=1e-4, quick=True),  # var 1e-8 << eps
        dict(shape=(32, 4), dtype=f32, offset=1e4, **tiny),
        dict(shape=(16, 5), dtype=f32, training=False, scale=1e-3, quick=True),
    ]


@_family("constant_channel", "a channel with var = 0: output exactly beta, finite gradients")
def _constant_channel(quick):
    const = dict(data="constant_channel")
    return [
        dict(shape=(8, 4, 3), dtype=f32, **const, quick=True),
        dict(shape=(8, 4, 3), dtype=f32, offset=1e4, **const, quick=True),
        dict(shape=(16, 3, 2, 2), dtype=f16, layout="channels_last", **const, quick=True),
        dict(shape=(64, 2), dtype=f32, offset=100.0, scale=30.0, **const, quick=True),
        dict(shape=(32, 3), dtype=bf16, **const),
        dict(shape=(8, 4, 3), dtype=f32, bias=False, **const),
        dict(shape=(8, 4, 3), dtype=f32, param_dtype=None, **const),
        dict(shape=(8, 4, 3), dtype=f64, param_dtype=f64, offset=1e4, **const),
        dict(shape=(8, 4, 3), dtype=f32, steps=2, momentum=None, **const),
    ]


@_family("two_per_channel", "two values per channel: the smallest batch training allows, n/(n-1) = 2")
def _two_per_channel(quick):
    return [
        dict(shape=(2, 8), dtype=f32, quick=True),
        dict(shape=(2, 5, 1, 1), dtype=f32, layout="channels_last", quick=True),
        dict(shape=(2, 16), dtype=f16, quick=True),
        dict(shape=(2, 3), dtype=f32, steps=3, momentum=None, quick=True),
        dict(shape=(1, 6, 2), dtype=f32),
        dict(shape=(2, 16), dtype=bf16, param_dtype=bf16),
        dict(shape=(2, 4), dtype=f64, param_dtype=f64),
        dict(shape=(1, 4, 1, 2), dtype=f32, offset=1e4),
    ]


@_family("fp16_overflow", "fp16 data near 3e4: sums overflow fp16 (not fp32), fp16 outputs stay fp16")
def _fp16_overflow(quick):
    # offset 300 x scale 100: data 3.0e4 .. 3.4e4, the sum of 2 of them already overflows fp16.
    hot = dict(dtype=f16, offset=300.0, scale=100.0)
    return [
        dict(shape=(512, 3), **hot, quick=True),
        dict(shape=(16, 4, 4, 4), layout="channels_last", **hot, quick=True),
        dict(shape=(128, 4, 8), param_dtype=f16, **hot, quick=True),
        dict(shape=(256, 4), dtype=f16, scale=1e4, quick=True),  # +-4e4: squares overflow
        dict(shape=(64, 4, 4), training=False, **hot),
        dict(shape=(8, 4, 4, 4, 4), layout="channels_last", **hot),
        dict(shape=(32, 3), steps=3, momentum=None, param_dtype=f16, **hot),
        dict(shape=(8192, 4), **hot),
    ]


@_family("bf16", "bfloat16 inputs, with bf16, fp32 or no parameters")
def _bf16(quick):
    return [
        dict(shape=(16, 8, 4, 4), dtype=bf16, param_dtype=bf16, quick=True),
        dict(shape=(8, 8, 3, 3), dtype=bf16, layout="channels_last", quick=True),
        dict(shape=(16, 6), dtype=bf16, training=False, quick=True),
        dict(shape=(32, 16), dtype=bf16, param_dtype=None),
        dict(shape=(4, 6, 5), dtype=bf16, layout="strided"),
        dict(shape=(16, 4, 6), dtype=bf16, offset=100.0, scale=30.0),
        dict(shape=(16, 4), dtype=bf16, param_dtype=bf16, steps=3, momentum=None, quick=True),
        dict(shape=(2, 4, 3, 4, 5), dtype=bf16, layout="channels_last", param_dtype=bf16),
        dict(shape=(16, 64, 16, 16), dtype=bf16),
        dict(shape=(16, 64, 16, 16), dtype=bf16, layout="channels_last", param_dtype=bf16),
    ]


@_family("channels_last", "NHWC / NDHWC / NLC inputs: results and gradients keep the input's strides")
def _channels_last(quick):
    cl = dict(layout="channels_last")
    return [
        dict(shape=(4, 8, 5, 5), dtype=f32, **cl, quick=True),
        dict(shape=(2, 16, 3, 3), dtype=f16, **cl, quick=True),
        dict(shape=(2, 6, 3, 3, 3), dtype=f32, **cl, quick=True),
        dict(shape=(4, 8, 3, 3), dtype=f32, training=False, **cl, quick=True),
        dict(shape=(3, 5, 4, 2), dtype=bf16, **cl),
        dict(shape=(2, 4, 2, 3, 4), dtype=bf16, **cl),
        dict(shape=(2, 4, 3, 3, 2), dtype=f16, training=False, **cl),
        dict(shape=(8, 6, 7), dtype=f32, **cl),
        dict(shape=(1, 4, 3, 3), dtype=f32, **cl),
        dict(shape=(4, 3, 4, 4), dtype=f32, param_dtype=None, **cl),
    ]


@_family("non_contiguous", "strided views no fast path takes whole (every other element, reversed dims)")
def _non_contiguous(quick):
    return [
        dict(shape=(4, 6, 10), dtype=f32, layout="strided", quick=True),
        dict(shape=(2, 3, 4, 6), dtype=f16, layout="strided", quick=True),
        dict(shape=(16, 8), dtype=f32, layout="strided", quick=True),  # channel stride 2
        dict(shape=(4, 5, 3, 3), dtype=f32, layout="reversed", quick=True),
        dict(shape=(12, 6), dtype=f32, layout="reversed"),  # (N, C) stored channel-major
        dict(shape=(3, 4, 2, 2, 6), dtype=bf16, layout="strided"),
        dict(shape=(4, 6, 10), dtype=f32, layout="strided", training=False),
        dict(shape=(2, 3, 2, 3, 4), dtype=f64, param_dtype=f64, layout="reversed"),
    ]


@_family("many_channels", "many channels, few rows: channel blocking, per-channel parameters")
def _many_channels(quick):
    return [
        dict(shape=(2, 1024), dtype=f32, quick=True),
        dict(shape=(3, 700), dtype=bf16, quick=True),
        dict(shape=(4, 256, 2, 2), dtype=f16, layout="channels_last", quick=True),
        dict(shape=(2, 2048), dtype=f32),
        dict(shape=(1, 513, 3), dtype=f32),
        dict(shape=(2, 1100), dtype=f32, training=False),
        dict(shape=(2, 600), dtype=f32, param_dtype=None, steps=2),
    ]


@_family("nan_inf", "a NaN or inf stays in its own channel (forward, gradients, running stats)")
def _nan_inf(quick):
    return [
        dict(shape=(8, 4, 3), dtype=f32, data="nan", quick=True),
        dict(shape=(16, 5), dtype=f32, data="inf", quick=True),
        dict(shape=(2, 4, 3, 3), dtype=bf16, layout="channels_last", data="nan", quick=True),
        dict(shape=(8, 4, 3), dtype=f32, data="nan", training=False, quick=True),
        dict(shape=(4, 300), dtype=f32, data="nan", quick=True),  # across channel blocks
        dict(shape=(8, 3, 5), dtype=f16, data="nan"),
        dict(shape=(8, 4, 3), dtype=f32, data="inf", training=False),
        dict(shape=(8, 4, 3), dtype=f32, data="nan", steps=2),
    ]


@_family("running_stats", "running mean / unbiased variance over several steps; momentum 0.1, 0.5, 1, None")
def _running_stats(quick):
    return [
        dict(shape=(16, 4), dtype=f32, steps=3, momentum=0.1, quick=True),
        dict(shape=(8, 3, 2), dtype=f32, steps=4, momentum=None, quick=True),
        dict(shape=(16, 4), dtype=f16, param_dtype=f16, steps=2, momentum=0.5, quick=True),
        dict(shape=(32, 4), dtype=f32, steps=3, offset=100.0, quick=True),
        dict(shape=(8, 4), dtype=f32, running=False, quick=True),  # training without stats
        dict(shape=(16, 4), dtype=f32, steps=2, momentum=1.0),
        dict(shape=(16, 4), dtype=bf16, param_dtype=bf16, steps=3, momentum=None),
        dict(shape=(4, 4, 3, 3), dtype=f32, layout="channels_last", steps=3),
        dict(shape=(16, 4), dtype=f64, param_dtype=f64, steps=3, momentum=None),
    ]


@_family("eval", "evaluation mode: running statistics used, never written; dx = dy * gamma * rstd")
def _eval(quick):
    ev = dict(training=False)
    return [
        dict(shape=(8, 4, 5, 5), dtype=f32, **ev, quick=True),
        dict(shape=(4, 6, 3, 3), dtype=f16, layout="channels_last", **ev, quick=True),
        dict(shape=(8, 6), dtype=f32, param_dtype=None, **ev, quick=True),
        dict(shape=(16, 8), dtype=bf16, param_dtype=bf16, **ev),
        dict(shape=(8, 4, 3), dtype=f64, param_dtype=f64, **ev),
        dict(shape=(8, 4, 3), dtype=f32, offset=100.0, **ev),
        dict(shape=(1, 4, 3), dtype=f32, **ev),  # one value per channel is fine in eval
    ]


@_family("affine_off", "no weight and bias, or a weight without a bias")
def _affine_off(quick):
    return [
        dict(shape=(8, 6, 4), dtype=f32, param_dtype=None, quick=True),
        dict(shape=(4, 4, 3, 3), dtype=f16, param_dtype=None, layout="channels_last", quick=True),
        dict(shape=(8, 6, 4), dtype=f32, bias=False, quick=True),
        dict(shape=(16, 5), dtype=bf16, param_dtype=None),
        dict(shape=(16, 5), dtype=bf16, param_dtype=bf16, bias=False),
        dict(shape=(8, 6), dtype=f32, param_dtype=None, running=False),
    ]


@_family("post_relu", "post-ReLU data: half the values exactly zero, repeated values whose rounding errors add up")
def _post_relu(quick):
    relu = dict(data="post_relu")
    return [
        dict(shape=(8, 2, 32, 32), dtype=f32, **relu, quick=True),
        dict(shape=(4096, 3), dtype=f32, **relu, quick=True),  # several row blocks to combine
        dict(shape=(8, 16, 6, 6), dtype=f32, layout="channels_last", **relu, quick=True),
        dict(shape=(8, 2, 32, 32), dtype=bf16, **relu, quick=True),
        dict(shape=(16, 4, 8, 8), dtype=f16, param_dtype=f16, **relu, quick=True),
        dict(shape=(32, 4, 16, 16), dtype=f32, steps=2, **relu),
        dict(shape=(16, 8, 8, 8), dtype=bf16, layout="channels_last", param_dtype=bf16, **relu),
        dict(shape=(4, 4, 6, 8, 8), dtype=f32, **relu),
        dict(shape=(64, 6), dtype=f32, offset=1e4, scale=1e-2, **relu),
        dict(shape=(16, 4, 8), dtype=f64, param_dtype=f64, **relu),
    ]


@_family("typical", "activations as networks have them: per-channel means ~ N(0, 1), scales e^U(-1, 1)")
def _typical(quick):
    typical = dict(data="typical")
    return [
        dict(shape=(8, 8, 16, 16), dtype=f32, **typical, quick=True),
        dict(shape=(1024, 16), dtype=f32, **typical, quick=True),
        dict(shape=(8, 16, 8, 8), dtype=f32, layout="channels_last", **typical, quick=True),
        dict(shape=(8, 8, 16, 16), dtype=bf16, **typical, quick=True),
        dict(shape=(8, 8, 8, 8), dtype=f16, layout="channels_last", **typical, quick=True),
        dict(shape=(32, 4, 16, 16), dtype=f32, steps=2, **typical),
        dict(shape=(4, 8, 4, 8, 8), dtype=f32, layout="channels_last", **typical),
        dict(shape=(32, 16, 8, 8), dtype=bf16, layout="channels_last", param_dtype=bf16, **typical),
        dict(shape=(8, 16, 12), dtype=f64, param_dtype=f64, **typical),
        dict(shape=(32, 8, 16), dtype=f32, training=False, **typical),
    ]


@_family("strided_params", "weight, bias, running stats as views (strided, offset, stride 0): read through, update in place, nowhere else")
def _strided_params(quick):
    return [
        dict(shape=(8, 4, 3), dtype=f32, param_layout="strided", steps=2, quick=True),
        dict(shape=(8, 4, 3), dtype=f32, param_layout="expanded", quick=True),
        dict(shape=(8, 4, 3), dtype=f32, param_layout="expanded", training=False, quick=True),  # stats stride 0
        dict(shape=(6, 5, 2, 2), dtype=f32, layout="channels_last", param_layout="offset", quick=True),
        dict(shape=(16, 4), dtype=f16, param_layout="strided", quick=True),
        dict(shape=(8, 4, 3), dtype=bf16, param_dtype=bf16, param_layout="strided", training=False),
        dict(shape=(4, 300), dtype=f32, param_layout="strided"),  # across channel blocks
        dict(shape=(8, 4, 3), dtype=f64, param_dtype=f64, param_layout="offset", steps=3, momentum=None),
        dict(shape=(8, 6), dtype=f32, param_layout="strided", bias=False),
        dict(shape=(4, 6, 10), dtype=f32, layout="strided", param_layout="strided"),
        dict(shape=(8, 4, 3), dtype=f32, param_layout="expanded", bias=True, steps=2, momentum=0.5),
    ]


@_family("second_order", "double backward: d/d(x, gamma, beta, dy) of <v, dx> + <u, dgamma>, train and eval")
def _second_order(quick):
    so = dict(second_order=True)
    return [
        dict(shape=(8, 4, 3), dtype=f32, **so, quick=True),
        dict(shape=(8, 4, 3), dtype=f32, training=False, **so, quick=True),
        dict(shape=(6, 3, 2, 2), dtype=f64, param_dtype=f64, **so, quick=True),
        dict(shape=(16, 5), dtype=f32, param_dtype=None, **so, quick=True),
        dict(shape=(4, 3, 3, 3), dtype=f32, layout="channels_last", **so),
        dict(shape=(8, 4, 3), dtype=f16, **so),
        dict(shape=(8, 4, 3), dtype=bf16, training=False, **so),
        dict(shape=(8, 4, 3), dtype=f64, param_dtype=f64, training=False, **so),
        # Not two values per channel: there x_hat = +-1 whatever x, dx is zero up to eps
        # terms, and its derivative is all cancellation (no normwise error means much).
        dict(shape=(3, 6), dtype=f32, **so),
        dict(shape=(8, 4, 3), dtype=f32, bias=False, **so),
        dict(shape=(8, 4, 3), dtype=f32, offset=100.0, **so),
        dict(shape=(8, 4, 3), dtype=f32, running=False, **so),
    ]


__all__ = ["FAMILIES", "Family", "FamilyUnavailable", "case_seed", "family_cases"]
