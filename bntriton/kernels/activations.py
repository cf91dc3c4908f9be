"""Device helpers for the fused epilogues: an activation, its derivative, its inverse, and
the 1-bit ReLU mask.

The activation is a constexpr code (``ACTIVATION``) so that every epilogue compiles only
the branch it uses: one kernel per family, not one copy per activation.

Codes: 0 none, 1 relu, 2 leaky_relu (``slope`` for z < 0), 3 silu, 4 gelu (torch's
default erf form).  The derivative is evaluated at the pre-activation ``z``, which the
backward recomputes from x and the per-channel statistics (no extra tensor kept), or
reads as one bit per element (``MASK``: ReLU / leaky ReLU after a residual add, where z
cannot be recomputed without the residual).

The mask of a rows x channels problem is a ``(ceil(rows / 8), channels)`` uint8 array:
bit ``k`` of byte ``(r // 8, c)`` is ``z[r, c] > 0``.  Packing along rows needs row tiles
that start at multiples of 8 and hold at least 8 rows (``pack_mask``'s caller checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .runtime import split_float

ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}
# Activations whose derivative depends only on the sign of z: a 1-bit mask suffices.
MASKABLE = frozenset({"relu", "leaky_relu"})


def activation_code(name) -> int:
    """The constexpr code for an activation name (None for none)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(k for k in ACTIVATIONS if k)} or None, got {name!r}"
        ) from None


@dataclass(frozen=True)
class Epilogue:
    """What an epilogue adds to the plain batch norm (host side; all optional).

    Forward: ``out = act(BN(x) + residual)``; ``mask`` (uint8, see the module docstring)
    receives ``z > 0``; ``out`` is where to write (the input itself for in-place).
    Backward: the incoming gradient is taken through the activation first, with z
    recomputed as ``(x - K) * act_scale + act_shift`` (the forward's per-channel
    coefficients), or read from ``mask``, or, with ``invert``, recovered from the saved
    output (x then holds y); ``residual`` receives dz, the residual's gradient.
    """

    activation: int = 0
    slope: float = 0.0
    residual: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    out: torch.Tensor | None = None
    act_scale: torch.Tensor | None = None
    act_shift: torch.Tensor | None = None
    invert: bool = False

    def pointers(self, fallback: torch.Tensor, per_channel: torch.Tensor) -> tuple:
        """``res, mask, act_scale, act_shift, slope_hi, slope_lo`` kernel arguments (unused ones get a
        placeholder of the right kind: the kernels never touch them)."""
        return (
            self.residual if self.residual is not None else fallback,
            self.mask if self.mask is not None else fallback,
            self.act_scale if self.act_scale is not None else per_channel,
            self.act_shift if self.act_shift is not None else per_channel,
            *split_float(self.slope),
        )

    def constexprs(self) -> dict:
        return dict(
            ACTIVATION=self.activation, HAS_RESIDUAL=self.residual is not None,
            MASK=self.mask is not None, INVERT=self.invert,
        )


NO_EPILOGUE = Epilogue()


class EpilogueKind(NamedTuple):
    """An epilogue's static part: what a launch worked out once per input geometry is
    built for (kernels/cached_launches.py).  ``residual`` and ``mask`` say whether the
    tensors exist; its constexprs are those of an :class:`Epilogue` with them."""

    activation: int = 0
    slope: float = 0.0
    residual: bool = False
    mask: bool = False

    def constexprs(self) -> dict:
        return dict(ACTIVATION=self.activation, HAS_RESIDUAL=self.residual, MASK=self.mask, INVERT=False)


PLAIN = EpilogueKind()


@triton.jit
def _gelu_cdf(z):
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def activate(z, slope, ACTIVATION: tl.constexpr):
    """``act(z)`` in z's dtype."""
    if ACTIVATION == 1:
        return tl.where(z > 0, z, 0.0)
    elif ACTIVATION == 2:
        return tl.where(z > 0, z, z * slope)
    elif ACTIVATION == 3:
        return z / (1.0 + tl.exp(-z))
    elif ACTIVATION == 4:
        return z * _gelu_cdf(z)
    else:
        return z


@triton.jit
def activation_grad(z, dy, slope, ACTIVATION: tl.constexpr):
    """``dy * act'(z)``; act'(0) = 0 for relu (torch's choice) and ``slope`` for leaky relu."""
    if ACTIVATION == 1:
        return tl.where(z > 0, dy, 0.0)
    elif ACTIVATION == 2:
        return tl.where(z > 0, dy, dy * slope)
    elif ACTIVATION == 3:
        sig = 1.0 / (1.0 + tl.exp(-z))
        return dy * (sig * (1.0 + z * (1.0 - sig)))
    elif ACTIVATION == 4:
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return dy * (_gelu_cdf(z) + z * pdf)
    else:
        return dy


@triton.jit
def mask_grad(positive, dy, slope, ACTIVATION: tl.constexpr):
    """``dy * act'(z)`` from the sign bit ``positive = z > 0`` (relu / leaky relu)."""
    if ACTIVATION == 2:
        return tl.where(positive, dy, dy * slope)
    else:
        return tl.where(positive, dy, 0.0)


@triton.jit
def invert_activation(y, slope, ACTIVATION: tl.constexpr):
    """``z`` from ``y = act(z)`` for the invertible ones (none; leaky relu, slope > 0)."""
    if ACTIVATION == 2:
        return tl.where(y > 0, y, y / slope)
    else:
        return y


@triton.jit
def store_mask(mask_ptr, positive, r0, rows, c, c_mask, channels,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pack ``positive`` (the [BLOCK_R, BLOCK_C] tile of rows ``r0 + arange(BLOCK_R)``,
    ``r0`` a multiple of 8, False outside the problem) into bytes."""
    bits = tl.where(positive, 1, 0).to(tl.int32)
    weights = (1 << tl.arange(0, 8)).to(tl.int32)
    packed = tl.sum(tl.reshape(bits, [BLOCK_R // 8, 8, BLOCK_C]) * weights[None, :, None], axis=1)
    byte_rows = r0 // 8 + tl.arange(0, BLOCK_R // 8)
    byte_mask = (byte_rows * 8 < rows)[:, None] & c_mask[None, :]
    offs = byte_rows.to(tl.int64)[:, None] * channels + c[None, :]
    tl.store(mask_ptr + offs, packed.to(tl.uint8), mask=byte_mask)


@triton.jit
def load_mask(mask_ptr, r, c, mask, channels):
    """``z > 0`` for the tile of rows ``r`` and channels ``c`` from the packed mask."""
    offs = (r // 8).to(tl.int64)[:, None] * channels + c[None, :]
    byte = tl.load(mask_ptr + offs, mask=mask, other=0).to(tl.int32)
    return ((byte >> (r % 8)[:, None]) & 1) != 0


@triton.jit
def load_mask_channels_rows(mask_ptr, r, c, mask, channels):
    """:func:`load_mask` for a channels x rows tile (``mask`` is [BLOCK_C, BLOCK_R]).

    Each byte is loaded once and its 8 bits spread over the tile's rows.  Loading a byte
    per element instead gave the compiler a load whose layout it preferred to the data
    tiles': it moved every x and dy tile through shared memory on each iteration (32 KiB
    per program under an sm_90 plan's 64 x 128 bf16 tile, against 4 KiB this way).  Needs
    ``r`` to start at a multiple of 8 when the tile holds 8 rows or more."""
    BLOCK_C: tl.constexpr = mask.shape[0]
    BLOCK_R: tl.constexpr = mask.shape[1]
    if BLOCK_R < 8:
        offs = (r // 8).to(tl.int64)[None, :] * channels + c[:, None]
        byte = tl.load(mask_ptr + offs, mask=mask, other=0).to(tl.int32)
        return ((byte >> (r % 8)[None, :]) & 1) != 0
    else:
        byte_rows = tl.min(tl.reshape(r, [BLOCK_R // 8, 8]), axis=1) // 8
        offs = byte_rows.to(tl.int64)[None, :] * channels + c[:, None]
        byte_mask = tl.max(tl.reshape(mask.to(tl.int32), [BLOCK_C, BLOCK_R // 8, 8]), axis=2) != 0
        byte = tl.load(mask_ptr + offs, mask=byte_mask, other=0).to(tl.int32)
        bits = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        return tl.reshape(bits, [BLOCK_C, BLOCK_R]) != 0


@triton.jit
def through_activation(x, dy, pivot, act_scale, act_shift, slope, mask_ptr, r, c, mask, channels,
                       ACTIVATION: tl.constexpr, MASK: tl.constexpr, INVERT: tl.constexpr):
    """``(x - K, dz)`` for a channels x rows tile: the backward's view of ``x`` and the
    gradient at the pre-activation ``z = (x - K) * act_scale + act_shift``.

    ``x`` is the saved input, or with ``INVERT`` the saved output (in-place activated batch
    norm), from which ``z`` and ``x - K`` are recovered.  A packed ReLU mask (``MASK``,
    rows x channels, see :func:`store_mask`) stands in for ``z > 0``; otherwise ``z`` is
    recomputed from ``x``.  Per-channel arguments are [BLOCK_C] vectors.
    """
    if INVERT:
        z = invert_activation(x, slope[:, None], ACTIVATION)
        dz = activation_grad(z, dy, slope[:, None], ACTIVATION)
        x_k = (z - act_shift[:, None]) / act_scale[:, None]
    else:
        x_k = x - pivot[:, None]
        dz = dy
        if MASK:
            positive = load_mask_channels_rows(mask_ptr, r, c, mask, channels)
            dz = mask_grad(positive, dy, slope[:, None], ACTIVATION)
        elif ACTIVATION != 0:
            # The forward's fma on the forward's coefficients: the same z, bit for bit.
            dz = activation_grad(tl.fma(x_k, act_scale[:, None], act_shift[:, None]), dy, slope[:, None], ACTIVATION)
    return x_k, dz
