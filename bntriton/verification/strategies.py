"""Test cases for batch-norm implementations: a description (``Case``), the tensors it
stands for (``make_tensors``), and hypothesis strategies to generate them.

Exported for other projects' test suites as :mod:`bntriton.testing`.
A ``Case`` is plain data with a seed, so a failing one can be printed and rerun.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

LAYOUTS = ("contiguous", "channels_last", "strided")
# Layouts beyond the default strategies' (kept out of LAYOUTS so that ``cases()`` draws
# exactly what it always drew): "reversed" stores the dims in reverse order (N innermost),
# a dense layout that is neither channels-first nor channels-last.
EXTRA_LAYOUTS = ("reversed",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# "typical": per-channel means ~ N(0, 1) and scales e^U(-1, 1) (in units of ``scale``), as
# a network's activations have; "post_relu": max(0, normal) - half the values exactly
# zero, the repeated values that make summation errors add up coherently.
DATA_KINDS = ("normal", "constant_channel", "nan", "inf", "tiny_var", "typical", "post_relu")
# How the per-channel tensors (weight, bias, running_mean, running_var) are stored:
# "contiguous"; "offset": a dense slice that starts a few elements into a larger buffer;
# "strided": every other element of a larger buffer; "expanded": weight and bias are one
# value expanded to C (stride 0), and so are the running statistics in evaluation mode
# (read only); in training they are strided, since an update cannot write C values
# through one element.  Every buffer is NaN outside the view: reading past the view
# shows in the outputs, writing past it shows in the buffer.
PARAM_LAYOUTS = ("contiguous", "offset", "strided", "expanded")


@dataclass(frozen=True)
class Case:
    """One batch-norm call (or several, ``steps``, for running statistics)."""

    shape: tuple
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    param_dtype: Optional[torch.dtype] = torch.float32  # None: affine off (no weight, no bias)
    bias: bool = True  # with affine on: False gives a weight without a bias
    running: bool = True  # running statistics given
    training: bool = True
    momentum: Optional[float] = 0.1  # None: cumulative average (factor 1/step)
    steps: int = 1
    offset: float = 0.0  # data mean, in units of its std
    scale: float = 1.0  # data std
    data: str = "normal"
    seed: int = 0
    family: str = "random"
    backward: bool = True
    eps: float = 1e-5
    param_layout: str = "contiguous"  # one of PARAM_LAYOUTS
    # Also check second-order gradients: d/d(x, weight, bias) of <v, dx> + <u, dweight>
    # (v, u random), through the implementation's backward with create_graph=True.
    second_order: bool = False

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def count(self) -> int:
        """Values per channel."""
        return math.prod(self.shape) // self.shape[1]

    def describe(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["param_dtype"] = None if self.param_dtype is None else str(self.param_dtype).replace("torch.", "")
        return d

    @classmethod
    def from_description(cls, d: dict) -> "Case":
        """The inverse of :meth:`describe` (JSON-friendly dict -> Case); missing fields
        take their defaults, unknown ones raise, so a typo cannot pass silently."""
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Case fields {sorted(unknown)}")
        if "shape" in d:
            d["shape"] = tuple(int(n) for n in d["shape"])
        for key in ("dtype", "param_dtype"):
            if isinstance(d.get(key), str):
                dtype = getattr(torch, d[key].replace("torch.", ""), None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"{key}: {d[key]!r} is not a torch dtype")
                d[key] = dtype
        return cls(**d)


def apply_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in the memory layout ``layout`` (same shape)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        # C innermost: (N, *spatial, C) storage seen as (N, C, *spatial).
        perm = (0,) + tuple(range(2, x.dim())) + (1,)
        inverse = [0] * x.dim()
        for i, p in enumerate(perm):
            inverse[p] = i
        return x.permute(perm).contiguous().permute(inverse)
    if layout == "strided":
        # Every other element of a twice-as-long last dim: a view no fast path takes whole.
        wide = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
        view = wide[..., ::2]
        view.copy_(x)
        return view
    if layout == "reversed":
        # Storage in reverse dim order: x.permute(reversed) is contiguous.
        rev = tuple(range(x.dim() - 1, -1, -1))
        return x.permute(rev).contiguous().permute(rev)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS + EXTRA_LAYOUTS}")


@dataclass
class Tensors:
    """The inputs of one step (``x``) and what every step shares."""

    xs: list  # one input per step
    dy: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]


def _data(case: Case, gen: torch.Generator) -> torch.Tensor:
    shape = case.shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * case.scale
    # A per-channel offset around case.offset (in units of the std).
    channel_offset = case.offset * case.scale * (1 + 0.1 * torch.rand(case.channels, generator=gen, dtype=torch.float64))
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    if case.data == "typical":
        spread = torch.exp(2 * torch.rand(case.channels, generator=gen, dtype=torch.float64) - 1)
        centre = torch.randn(case.channels, generator=gen, dtype=torch.float64)
        x = x * spread.reshape(per_channel) + (centre * case.scale).reshape(per_channel)
    x = x + channel_offset.reshape(per_channel)
    if case.data == "post_relu":
        # The channel's offset is the floor (zero at offset 0): repeated values either way.
        x = torch.maximum(x, channel_offset.reshape(per_channel))
    if case.data == "constant_channel":
        x[:, 0] = case.offset * case.scale + 0.5
    elif case.data == "tiny_var":
        x = x * 1e-3 + case.scale
    elif case.data in ("nan", "inf") and x.numel():
        x[(0, 0) + (0,) * (len(shape) - 2)] = math.nan if case.data == "nan" else math.inf
    return x


def make_tensors(case: Case, device: str | torch.device = "cpu") -> Tensors:
    """Fresh random tensors for ``case``, drawn from its seed (reproducible).

    The per-channel tensors are contiguous here whatever ``case.param_layout``: they hold
    the values; :func:`place` puts them in the case's layout for each call.  Under the
    "expanded" layout their values are one per tensor (what a stride-0 view can hold).
    """
    gen = torch.Generator().manual_seed(case.seed)
    xs = [apply_layout(_data(case, gen).to(case.dtype), case.layout).to(device) for _ in range(case.steps)]
    dy = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(case.dtype).to(device)
    c = case.channels
    pd = case.param_dtype

    def uniform_if_expanded(t: torch.Tensor, role: str) -> torch.Tensor:
        return t[:1].expand(c).clone() if param_layout(case, role) == "expanded" else t

    weight = bias = None
    if pd is not None:
        weight = uniform_if_expanded(1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64), "weight").to(pd).to(device)
        if case.bias:
            bias = uniform_if_expanded(torch.randn(c, generator=gen, dtype=torch.float64), "bias").to(pd).to(device)
    running_mean = running_var = None
    if case.running:
        stat_dtype = pd or (torch.float64 if case.dtype == torch.float64 else torch.float32)
        mean = case.offset * case.scale + torch.randn(c, generator=gen, dtype=torch.float64)
        var = case.scale**2 * (0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
        running_mean = uniform_if_expanded(mean, "running_mean").to(stat_dtype).to(device)
        running_var = uniform_if_expanded(var, "running_var").to(stat_dtype).to(device)
    return Tensors(xs, dy, weight, bias, running_mean, running_var)


def second_order_directions(case: Case, device: str | torch.device = "cpu") -> tuple:
    """(v, u): the random weights of the scalar ``<v, dx> + <u, dweight>`` whose gradient
    the second-order check takes; v in the input's dtype, u in the parameters' (so that
    the values the implementation sees are exactly the oracle's)."""
    gen = torch.Generator().manual_seed(case.seed ^ 0x5EC0_0D)
    v = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(case.dtype).to(device)
    u = None
    if case.param_dtype is not None:
        u = torch.randn(case.channels, generator=gen, dtype=torch.float64).to(case.param_dtype).to(device)
    return v, u


# ------------------------------------------------------------- per-channel tensor layouts


def param_layout(case: Case, role: str) -> str:
    """The layout of one per-channel tensor (``role``: weight, bias, running_mean,
    running_var): ``case.param_layout``, except that running statistics updated in
    training are strided rather than expanded (an update writes C values)."""
    if case.param_layout not in PARAM_LAYOUTS:
        raise ValueError(f"unknown param_layout {case.param_layout!r}; expected one of {PARAM_LAYOUTS}")
    if case.param_layout == "expanded" and role.startswith("running") and case.training:
        return "strided"
    return case.param_layout


@dataclass
class Placed:
    """A per-channel tensor as an implementation receives it, and the storage around it."""

    view: torch.Tensor  # what the implementation is given
    buffer: torch.Tensor  # the storage the view lives in: NaN outside the view
    inside: torch.Tensor  # bool, buffer's shape: the elements the view covers

    def outside_touched(self) -> list:
        """Indices of buffer elements outside the view that are no longer NaN."""
        outside = ~self.inside & ~torch.isnan(self.buffer.detach())
        return torch.nonzero(outside.cpu()).flatten().tolist()


def place(values: torch.Tensor, layout: str, grad: bool = False) -> Placed:
    """``values`` (1-D) as a view laid out as ``layout`` (:data:`PARAM_LAYOUTS`) in a fresh
    NaN-filled buffer.  With ``grad`` the buffer is the leaf that requires grad and the
    view keeps its gradient (``retain_grad``), so ``view.grad`` is the gradient the
    implementation computed for the tensor it was given."""
    n = values.numel()
    values = values.detach()
    if layout == "contiguous":
        size, select = n, (lambda b: b)
    elif layout == "offset":  # a dense slice, 3 elements into its buffer
        size, select = n + 5, (lambda b: b[3:3 + n])
    elif layout == "strided":  # every other element, starting at 1: NaN on both sides
        size, select = 2 * n + 1, (lambda b: b[1:2 * n:2])
    elif layout == "expanded":  # one element, stride 0
        if n and not bool((values == values[:1]).all()):
            raise ValueError("an expanded per-channel tensor holds one value")
        size, select = 3, (lambda b: b[1:2].expand(n))
    else:
        raise ValueError(f"unknown per-channel layout {layout!r}; expected one of {PARAM_LAYOUTS}")
    buffer = torch.full((size,), math.nan, dtype=values.dtype, device=values.device)
    inside = torch.zeros(size, dtype=torch.bool, device=values.device)
    if layout == "expanded":
        buffer[1:2] = values[:1]
        inside[1] = True
    else:
        select(buffer).copy_(values)
        select(inside).fill_(True)
    if grad:
        buffer.requires_grad_(True)
    view = select(buffer)
    if grad and view is not buffer:
        view.retain_grad()
    return Placed(view, buffer, inside)


# ------------------------------------------------------------- seeded draws, no hypothesis


def draw_case(rng, max_elements: int = 24_000, family: str = "random") -> Case:
    """One random ``Case`` from ``rng`` (a :class:`random.Random`), from the same
    distributions as :func:`cases` (and the same shape rules as :func:`shapes`).

    The ``random`` family draws with this rather than with hypothesis: hypothesis biases
    its draws with constants it collects from the modules loaded in the process, so the
    same seed gave different cases from ``bntriton verify`` and from ``bntriton.verify``
    called in a script.  A ``random.Random`` depends on its seed alone."""
    dtype = rng.choice(DTYPES)
    param = rng.choice([None, torch.float32, dtype])
    if dtype == torch.float64 and param is not None:
        param = torch.float64
    is_training = rng.random() < 0.5
    running = True if not is_training else rng.random() < 0.5
    scale = rng.choice([1e-2, 1.0, 30.0])
    offset = rng.choice([0.0, 1.0, 100.0, 1e4])
    if dtype == torch.float16 and (1.1 * offset + 8) * scale > 3e4:
        offset = 0.0  # keep fp16 data (and its deviations) inside fp16's range
    rank = rng.randint(2, 5)
    c = rng.randint(1, max(1, min(1100, max_elements // 2)))
    budget = max(2, max_elements // c)
    n = rng.randint(1, min(budget, 64 if rank > 2 else budget))
    spatial = []
    for _ in range(rank - 2):
        room = max(1, budget // (n * math.prod(spatial or [1])))
        spatial.append(rng.randint(1, min(room, 40)))
    shape = (n, c, *spatial)
    if math.prod(shape) // c < 2:  # training needs two values per channel
        shape = (2,) + shape[1:]
    return Case(
        shape=shape,
        dtype=dtype,
        layout=rng.choice(LAYOUTS),
        param_dtype=param,
        bias=(rng.random() < 0.5) if param is not None else False,
        running=running,
        training=is_training,
        momentum=rng.choice([0.1, 0.5, 1.0, None]),
        steps=rng.randint(1, 3) if running and is_training else 1,
        offset=offset,
        scale=scale,
        seed=rng.randint(0, 2**31 - 1),
        family=family,
    )


# ----------------------------------------------------------------- hypothesis strategies


def shapes(min_rank: int = 2, max_rank: int = 5, max_elements: int = 24_000, max_channels: int = 1100):
    """(N, C, *spatial) shapes, at least 2 values per channel, at most ``max_elements``."""
    from hypothesis import strategies as st

    @st.composite
    def draw(d):
        rank = d(st.integers(min_rank, max_rank))
        c = d(st.integers(1, max(1, min(max_channels, max_elements // 2))))
        budget = max(2, max_elements // c)
        n = d(st.integers(1, min(budget, 64 if rank > 2 else budget)))
        spatial = []
        for _ in range(rank - 2):
            room = max(1, budget // (n * math.prod(spatial or [1])))
            spatial.append(d(st.integers(1, min(room, 40))))
        shape = (n, c, *spatial)
        if math.prod(shape) // c < 2:  # training needs two values per channel
            shape = (2,) + shape[1:]
        return shape

    return draw()


def cases(
    dtypes=DTYPES,
    layouts=LAYOUTS,
    max_elements: int = 24_000,
    min_rank: int = 2,
    max_rank: int = 5,
    training=None,
    backward: bool = True,
):
    """Random ``Case``s: shapes, layouts, dtypes, affine / bias / running-stat flags,
    momentum (None included), several steps, data offsets and scales."""
    from hypothesis import strategies as st

    @st.composite
    def draw(d):
        dtype = d(st.sampled_from(dtypes))
        param = d(st.sampled_from([None, torch.float32, dtype]))
        if dtype == torch.float64 and param is not None:
            param = torch.float64
        is_training = d(st.booleans()) if training is None else training
        running = True if not is_training else d(st.booleans())
        scale = d(st.sampled_from([1e-2, 1.0, 30.0]))
        offset = d(st.sampled_from([0.0, 1.0, 100.0, 1e4]))
        if dtype == torch.float16 and (1.1 * offset + 8) * scale > 3e4:
            offset = 0.0  # keep fp16 data (and its deviations) inside fp16's range
        return Case(
            shape=d(shapes(min_rank, max_rank, max_elements)),
            dtype=dtype,
            layout=d(st.sampled_from(layouts)),
            param_dtype=param,
            bias=d(st.booleans()) if param is not None else False,
            running=running,
            training=is_training,
            momentum=d(st.sampled_from([0.1, 0.5, 1.0, None])),
            steps=d(st.integers(1, 3)) if running and is_training else 1,
            offset=offset,
            scale=scale,
            seed=d(st.integers(0, 2**31 - 1)),
            backward=backward,
        )

    return draw()


__all__ = [
    "Case", "DTYPES", "EXTRA_LAYOUTS", "draw_case", "LAYOUTS", "PARAM_LAYOUTS", "Placed", "Tensors", "apply_layout", "cases",
    "make_tensors", "param_layout", "place", "second_order_directions", "shapes",
]
