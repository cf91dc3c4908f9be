"""The training launches cached per input geometry (kernels/cached_launches.py, looked up
in bntriton/kernels/launch_cache.py) against the general route: the same kernels, grids, constexprs
and arguments (each route's own fresh buffers aside, which must line up one for one),
so their results are the same bits; and where they step aside for the general route."""
import pytest
import torch

import bntriton
from bntriton import dispatch
from bntriton.kernels import launch_cache
from bntriton.kernels import RunningStats, channel_view, forced_plan, plans
from bntriton.kernels.activations import Epilogue, EpilogueKind
from bntriton.kernels.runtime import DualKernel, accumulator_dtype

pytestmark = pytest.mark.interpreter_only("the kernels' launches themselves; the native path is checked to step aside")


class _Recording:
    """Launches recorded as ``(kernel, grid, args, meta)``, not run (interpreter backend)."""

    def __enter__(self):
        self.seen = []
        self._original = DualKernel.__getitem__
        DualKernel.__getitem__ = lambda kernel, grid: (
            lambda *args, **meta: self.seen.append((kernel, grid, args, meta)))
        self._backend = bntriton.cpu_backend("interpreter")
        self._backend.__enter__()
        return self

    def __exit__(self, *exc):
        self._backend.__exit__(*exc)
        DualKernel.__getitem__ = self._original

    def take(self):
        seen, self.seen = self.seen, []
        return seen


def _assert_same_launches(cached, general, inputs, cached_out, general_out):
    """Launch for launch, the same kernel, grid and constexprs (in the same order: the
    direct launch path keys on it), and the same arguments: the caller's tensors (and the
    shared arrival counters) as the very objects, each route's fresh buffers in the same
    places with the same shape, strides and dtype, one for one; the outputs likewise."""
    assert len(cached) == len(general) > 0
    forward = {id(t): id(t) for t in inputs if t is not None}
    backward = dict(forward)

    def same_tensor(a, b, where):
        assert isinstance(b, torch.Tensor), where
        assert (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device), where
        assert forward.setdefault(id(a), id(b)) == id(b) and backward.setdefault(id(b), id(a)) == id(a), where

    for n, ((ka, ga, aa, ma), (kb, gb, ab, mb)) in enumerate(zip(cached, general)):
        name = ka.fn.__name__
        assert ka is kb and ga == gb, (n, name)
        assert list(ma.items()) == list(mb.items()), (n, name)
        assert len(aa) == len(ab), (n, name)
        for i, (a, b) in enumerate(zip(aa, ab)):
            if isinstance(a, torch.Tensor):
                same_tensor(a, b, (n, name, i))
            else:
                assert type(a) is type(b) and a == b, (n, name, i, a, b)
    assert len(cached_out) == len(general_out)
    for a, b in zip(cached_out, general_out):
        assert forward.get(id(a)) == id(b), "outputs must be the buffers the launches wrote"


_SHAPES = {  # (layout, size): shape; "large" takes the split path under an H100's plan
    ("nchw", "small"): (3, 5, 4, 4), ("channels_last", "small"): (3, 5, 4, 4), ("2d", "small"): (6, 5),
    ("nchw", "large"): (8, 5, 40, 40), ("channels_last", "large"): (8, 5, 40, 40), ("2d", "large"): (3000, 5),
    # Fewer than 8 rows: a 1-bit mask needs tiles of at least 8 (its rows packed to a byte).
    ("nchw", "tiny"): (2, 5, 1, 2), ("channels_last", "tiny"): (2, 5, 1, 2), ("2d", "tiny"): (4, 5),
}
_PARAMS = ["both", "no_weight", "no_bias", "fp32_params", "bf16", "fp64"]
_RUNNING = ["none", "momentum", "cumulative", "no_counter"]


def _inputs(layout, size, params):
    dtype = {"fp32_params": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}.get(params, torch.float32)
    x = torch.randn(_SHAPES[layout, size]).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    param_dtype = torch.float32 if params == "fp32_params" else dtype
    w, b = (torch.rand(5) + 0.5).to(param_dtype), torch.randn(5).to(param_dtype)
    return x, (None if params == "no_weight" else w), (None if params == "no_bias" else b), param_dtype


def _running(kind, param_dtype):
    if kind == "none":
        return None
    counter = None if kind == "no_counter" else torch.zeros((), dtype=torch.long)
    return RunningStats(torch.zeros(5, dtype=param_dtype), torch.ones(5, dtype=param_dtype), counter,
                        None if kind == "cumulative" else 0.1)


@pytest.mark.parametrize("planned", [None, 132])
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_cached_training_forward_passes_what_the_general_route_passes(layout, size, planned):
    cases = [(p, "momentum") for p in _PARAMS] + [("both", r) for r in _RUNNING if r != "momentum"]
    with _Recording() as rec, plans.planned_for(planned) if planned else _nothing():
        for params, running_kind in cases:
            x, w, b, param_dtype = _inputs(layout, size, params)
            running = _running(running_kind, param_dtype)
            launch = launch_cache.train_launch(x, w, b, running)
            assert launch is not None, (params, running_kind)
            cached_out = launch(x, w, b, 1e-3, running)
            cached = rec.take()
            y, stats = dispatch.forward_train(channel_view(x), w, b, 1e-3, running=running)
            general = rec.take()
            general_out = (y, stats.mean_shifted, stats.rstd, stats.mean, stats.var_unbiased, stats.pivot)
            _assert_same_launches(cached, general, (x, w, b, *(running or ())[:3]), cached_out, general_out)
            if planned and size == "large":
                assert len(cached) == 2  # the split path, with its merge in the statistics' launch


@pytest.mark.parametrize("planned", [None, 132])
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_cached_backward_passes_what_the_general_route_passes(layout, size, planned):
    routes = set()
    with _Recording() as rec, plans.planned_for(planned) if planned else _nothing():
        for params in _PARAMS:
            x, w, _, param_dtype = _inputs(layout, size, params)
            dy = torch.randn_like(x)
            acc = accumulator_dtype(x.dtype)
            pivot, mean_s, rstd = torch.randn(5, dtype=acc), torch.randn(5, dtype=acc), torch.rand(5, dtype=acc)
            launch = launch_cache.backward_launch(x, dy, w)
            assert launch is not None
            cached_out = launch(dy, x, w, pivot, mean_s, rstd)
            cached = rec.take()
            general_out = dispatch.backward(channel_view(x), dy, w, pivot, 1, mean_s, rstd, batch_stats=True,
                                            param_dtype=param_dtype)
            general = rec.take()
            _assert_same_launches(cached, general, (x, dy, w, pivot, mean_s, rstd), cached_out, general_out)
            routes.add(_backward_route(x))
    if size == "small" or not planned:
        assert routes == {"single-read"}
    else:
        assert "single-read" not in routes


def _backward_route(x):
    view = channel_view(x)
    if plans.fused_plan(view) is not None:
        return "single-read"
    return "sums in epilogue" if plans.sums_in_epilogue(plans.plan(view), x.element_size()) else "combine"


def test_the_backward_cases_reach_every_route():
    with bntriton.cpu_backend("interpreter"), plans.planned_for(132):
        routes = {_backward_route(_inputs(layout, "large", params)[0])
                  for layout in ("nchw", "channels_last") for params in ("both", "bf16")}
    assert routes == {"sums in epilogue", "combine"}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cached_launches_are_per_geometry_and_plan_and_step_aside():
    x = torch.randn(3, 5, 4, 4)
    w = b = torch.ones(5)
    running = RunningStats(torch.zeros(5), torch.ones(5), torch.zeros((), dtype=torch.long), 0.1)
    with bntriton.cpu_backend("interpreter"):
        train = launch_cache.train_launch(x, w, b, running)
        assert launch_cache.train_launch(x.clone(), w, b, running._replace(mean=torch.zeros(5))) is train
        assert launch_cache.train_launch(x.to(memory_format=torch.channels_last), w, b, running) is not train
        assert launch_cache.train_launch(x, None, b, running) is not train
        assert launch_cache.train_launch(x, w, b, None) is not train
        assert launch_cache.train_launch(x, w, b, running._replace(momentum=None)) is not train
        assert launch_cache.train_launch(x, w, b, running._replace(num_batches_tracked=None)) is not train
        assert launch_cache.train_launch(x, w, b, running._replace(num_batches_tracked=None, momentum=None)) is None
        assert launch_cache.train_launch(x[:, :, :, :3], w, b, running) is None  # read through a copy
        assert launch_cache.train_launch(x[:0], w, b, running) is None  # no rows
        backward = launch_cache.backward_launch(x, torch.randn_like(x), w)
        assert backward is not None and launch_cache.backward_launch(x, torch.randn_like(x), None) is not backward
        # A gradient of other strides (a sum's expanded one) is copied first by the general route.
        assert launch_cache.backward_launch(x, torch.ones(()).expand_as(x), w) is None
        for planned in (132, 108):
            with plans.planned_for(planned):
                assert launch_cache.train_launch(x, w, b, running) not in (None, train)
                assert launch_cache.backward_launch(x, torch.randn_like(x), w) not in (None, backward)
        with plans.planned_for(132):
            h100 = launch_cache.train_launch(x, w, b, running)
            with plans.planned_for(108):
                assert launch_cache.train_launch(x, w, b, running) is not h100
        with forced_plan(path="split"):
            assert launch_cache.train_launch(x, w, b, running) is None
            assert launch_cache.backward_launch(x, torch.randn_like(x), w) is None
    with bntriton.cpu_backend("native"):
        assert launch_cache.train_launch(x, w, b, running) is None  # the native CPU path decides itself
        assert launch_cache.backward_launch(x, torch.randn_like(x), w) is None


@pytest.mark.parametrize("layout, planned, shape", [
    ("nchw", None, (2, 3, 40, 40)), ("channels_last", None, (2, 3, 40, 40)),
    ("nchw", 132, (2, 3, 40, 40)), ("channels_last", 132, (2, 3, 40, 40)),
    ("channels_last", 132, (8, 5, 40, 40)),  # the backward's splits summed by last programs
])
def test_module_training_step_on_the_cached_route_is_bit_identical(layout, planned, shape):
    """A module's training step (running statistics, counter, both gradients) on the
    cached launches, in the interpreter, against the same step through the general
    route's functions: the same bits everywhere."""
    torch.manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape) * 3 + 5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    launch_cache._LAUNCHES.clear()
    with bntriton.cpu_backend("interpreter"), plans.planned_for(planned) if planned else _nothing():
        module = bntriton.BatchNorm2d(channels)
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_()
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        y.backward(dy)
        running = RunningStats(torch.zeros(channels), torch.ones(channels), torch.zeros((), dtype=torch.long), 0.1)
        view = channel_view(x)
        routes = {_backward_route(x)}
        y_ref, stats = dispatch.forward_train(view, module.weight.detach(), module.bias.detach(), 1e-5,
                                              running=running)
        grads = dispatch.backward(view, dy, module.weight.detach(), stats.pivot, 1, stats.mean_shifted, stats.rstd,
                                  batch_stats=True, param_dtype=torch.float32)
    # The module's step took the cached launches.
    kinds = {key[0] for key, launch in launch_cache._LAUNCHES.items() if launch is not None}
    assert {launch_cache._TRAIN, launch_cache._BACKWARD} <= kinds
    assert routes == ({"combine"} if shape[0] == 8 else {"single-read"} if planned is None else {"sums in epilogue"})
    for got, want in ((y, y_ref), (leaf.grad, grads[0]), (module.weight.grad, grads[1]),
                      (module.bias.grad, grads[2]), (module.running_mean, running.mean),
                      (module.running_var, running.var), (module.num_batches_tracked, running.num_batches_tracked)):
        assert got.stride() == want.stride()
        assert torch.equal(_bits(got), _bits(want))


def _bits(t):
    t = t.detach().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


# Activated kinds: (activation code, residual, mask); a mask only where ops/activated.py
# keeps one (relu / leaky_relu after a residual).
_KINDS = [(1, True, True), (2, True, True), (1, False, False), (3, False, False), (4, True, False),
          (0, True, False)]


def _activated_forward_general(x, w, b, running, kind, residual):
    """The general route as ops/activated.py takes it: its mask buffer, then dispatch."""
    activation, has_residual, has_mask = kind
    view = channel_view(x)
    mask = (x.new_empty((-(-view.rows // 8), view.channels), dtype=torch.uint8) if has_mask
            else x.new_empty(0, dtype=torch.uint8))
    epilogue = Epilogue(activation=activation, slope=0.2, residual=residual, mask=mask if has_mask else None)
    y, stats = dispatch.forward_train(view, w, b, 1e-3, epilogue, running=running)
    out = (y, stats.mean_shifted, stats.rstd, stats.mean, stats.var_unbiased, mask, stats.pivot)
    return out + ((stats.scale, stats.shift) if activation else ())


@pytest.mark.parametrize("planned", [None, 132])
@pytest.mark.parametrize("size", ["tiny", "small", "large"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_cached_activated_forward_passes_what_the_general_route_passes(layout, size, planned):
    with _Recording() as rec, plans.planned_for(planned) if planned else _nothing():
        for activation, has_residual, has_mask in _KINDS:
            for params, running_kind in (("both", "momentum"), ("bf16", "none"), ("no_weight", "cumulative")):
                x, w, b, param_dtype = _inputs(layout, size, params)
                running = _running(running_kind, param_dtype)
                residual = torch.randn_like(x) if has_residual else None
                kind = EpilogueKind(activation, 0.2, has_residual, has_mask)
                launch = launch_cache.train_launch(x, w, b, running, kind, residual)
                assert launch is not None
                cached_out = launch(x, w, b, 1e-3, running, residual)
                cached = rec.take()
                general_out = _activated_forward_general(x, w, b, running, (activation, has_residual, has_mask),
                                                         residual)
                general = rec.take()
                inputs = (x, w, b, residual, *(running or ())[:3])
                # An empty mask and, without an activation, the coefficients are fresh
                # placeholders on both routes, which no launch sees.
                kept = [i for i in range(len(general_out)) if i != 5 or has_mask]
                _assert_same_launches(cached, general, inputs, [cached_out[i] for i in kept],
                                      [general_out[i] for i in kept])
                assert len(cached_out) == 9
                if not has_mask:
                    assert cached_out[5].numel() == 0


@pytest.mark.parametrize("planned", [None, 132])
@pytest.mark.parametrize("size", ["tiny", "small", "large"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cached_activated_backward_passes_what_the_general_route_passes(layout, size, planned):
    with _Recording() as rec, plans.planned_for(planned) if planned else _nothing():
        for activation, has_residual, has_mask in [(1, True, True), (2, True, True), (2, False, False),
                                                   (3, False, False), (4, False, False)]:
            for params in ("both", "bf16", "no_weight"):
                x, w, _, param_dtype = _inputs(layout, size, params)
                dy = torch.randn_like(x)
                acc = accumulator_dtype(x.dtype)
                pivot, mean_s, rstd, act_scale, act_shift = (torch.randn(5, dtype=acc) for _ in range(5))
                view = channel_view(x)
                mask = (torch.randint(0, 256, (-(-view.rows // 8), 5), dtype=torch.uint8) if has_mask else None)
                launch = launch_cache.backward_launch(x, dy, w, EpilogueKind(activation, 0.2, has_residual, has_mask))
                assert launch is not None
                cached_out = launch(dy, x, w, pivot, mean_s, rstd, act_scale, act_shift, mask)
                cached = rec.take()
                dres = torch.empty_like(x) if has_residual else None
                epilogue = Epilogue(activation=activation, slope=0.2, residual=dres, mask=mask, act_scale=act_scale,
                                    act_shift=act_shift)
                general_out = dispatch.backward(view, dy, w, pivot, 1, mean_s, rstd, True, param_dtype, epilogue)
                general = rec.take()
                _assert_same_launches(cached, general, (x, dy, w, pivot, mean_s, rstd, act_scale, act_shift, mask),
                                      cached_out[:3] + ((cached_out[3],) if has_residual else ()),
                                      general_out + ((dres,) if has_residual else ()))
                assert (cached_out[3] is None) == (not has_residual)


@pytest.mark.parametrize("planned", [None, 132])
@pytest.mark.parametrize("size", ["tiny", "small", "large"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_cached_activated_eval_passes_what_the_general_route_passes(layout, size, planned):
    with _Recording() as rec, plans.planned_for(planned) if planned else _nothing():
        for activation, has_residual, has_mask in _KINDS + [(1, True, False)]:  # (no mask: inference)
            for params in ("both", "bf16", "no_bias"):
                x, w, b, param_dtype = _inputs(layout, size, params)
                rm, rv = torch.randn(5, dtype=param_dtype), torch.rand(5, dtype=param_dtype) + 0.5
                residual = torch.randn_like(x) if has_residual else None
                launch = launch_cache.eval_launch(x, w, b, EpilogueKind(activation, 0.2, has_residual, has_mask),
                                                  residual)
                assert launch is not None
                cached_out = launch(x, w, b, rm, rv, 1e-3, residual)
                cached = rec.take()
                view = channel_view(x)
                mask = (x.new_empty((-(-view.rows // 8), 5), dtype=torch.uint8) if has_mask else None)
                epilogue = Epilogue(activation=activation, slope=0.2, residual=residual, mask=mask)
                y = dispatch.forward_eval(view, w, b, rm, rv, 1e-3, epilogue)
                general = rec.take()
                _assert_same_launches(cached, general, (x, w, b, rm, rv, residual),
                                      cached_out[:2] if has_mask else cached_out[:1], (y, mask) if has_mask else (y,))
                assert cached_out[1].numel() == 0 or has_mask
