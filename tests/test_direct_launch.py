"""The direct CUDA launch path (kernels/runtime.py, DirectLaunches).

Compiled launches skip ``JITFunction.run`` once a variant is known.  What can go wrong is
checked here without a GPU: the key must separate everything Triton specializes on, the
arguments must reach the launcher in Triton's order (keywords and defaults included),
and anything unusual (an unaligned pointer, a launch hook) must take Triton's own path.
The GPU run of the suite launches every kernel through this path for real.
"""
import inspect

import pytest
import torch

import bntriton
from bntriton.kernels import forced_plan, runtime
from bntriton.kernels.runtime import DirectLaunches, DualKernel, launch_key


def _recorded_launches():
    """(kernel, grid, args, meta) of every launch a few interpreted calls make: training
    forward and backward on both paths and layouts, eval, and a fused epilogue."""
    seen = []
    original = DualKernel.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)

        def record(*args, **meta):
            seen.append((self, grid, args, dict(meta)))
            return launch(*args, **meta)

        return record

    DualKernel.__getitem__ = getitem
    try:
        with bntriton.cpu_backend("interpreter"):
            for shape, channels_last in (((4, 3, 5, 5), False), ((2, 3, 4, 4), True), ((600, 3), False)):
                x = torch.randn(shape)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                x.requires_grad_()
                for path in ("fused", "split"):
                    with forced_plan(path=path):
                        m = bntriton.BatchNorm2d(3) if x.dim() == 4 else bntriton.BatchNorm1d(3)
                        m(x).sum().backward()
                        m.eval()
                        m(x)
                        bntriton.batch_norm(x.detach(), None, None, training=True, activation="relu")
    finally:
        DualKernel.__getitem__ = original
    return seen


@pytest.fixture(scope="module")
def launches():
    return _recorded_launches()


def test_arguments_reach_the_launcher_in_tritons_order(launches):
    # JITFunction.run hands the launcher bound_args.values(): every parameter in
    # signature order, keywords by name, defaults filled in.
    kernels = set()
    for kernel, _, args, meta in launches:
        kernels.add(kernel.fn.__name__)
        constexprs = {k: v for k, v in meta.items() if k != "num_warps"}
        bound = inspect.signature(kernel.fn).bind(*args, **constexprs)
        bound.apply_defaults()
        got = args + kernel.direct.bound_tail(args, meta)
        assert len(got) == len(bound.arguments)
        assert all(a is b for a, b in zip(got, bound.arguments.values())), kernel.fn.__name__
    assert len(kernels) >= 5, kernels  # the recording reached the kernel families


def test_every_real_launch_has_a_key(launches):
    for kernel, _, args, meta in launches:
        key = launch_key(args, meta)
        assert key is not None
        hash(key)


def _args(x, n=20, scale=1.5):
    return (x, x, n, scale, None, True)


def test_key_separates_what_triton_specializes():
    x = torch.randn(64)
    base = launch_key(_args(x), {"BLOCK": 16, "num_warps": 4})
    # Float values and tensor addresses (aligned) are not specialized on.
    assert launch_key(_args(torch.randn(64), scale=7.0), {"BLOCK": 16, "num_warps": 4}) == base
    # dtypes, argument types, ints, constexprs and options are.
    assert launch_key(_args(x.double()), {"BLOCK": 16, "num_warps": 4}) != base
    assert launch_key(_args(torch.nn.Parameter(x)), {"BLOCK": 16, "num_warps": 4}) != base
    assert launch_key(_args(x), {"BLOCK": 32, "num_warps": 4}) != base
    assert launch_key(_args(x), {"BLOCK": 16, "num_warps": 8}) != base
    assert launch_key((x, x, 20, 1.5, x, True), {"BLOCK": 16, "num_warps": 4}) != base  # None -> a pointer
    # Every class of integer Triton tells apart (1; i32, i64, u64; divisible by 16 or not)
    # gets keys of its own: ints are keyed by value.
    ints = (1, 16, 20, 2**31 + 16, 2**31 + 1, 2**63, 2**63 + 1)
    assert len({launch_key(_args(x, n), {}) for n in ints}) == len(ints)
    # An unaligned pointer (a view at an odd offset) has no key: Triton's path decides.
    assert launch_key(_args(x[1:]), {}) is None
    assert launch_key((x, x[4:]), {}) is not None  # 16 bytes in: aligned
    # A tensor subclass takes Triton's path too.

    class Sub(torch.Tensor):
        pass

    assert launch_key((x.as_subclass(Sub), 3), {}) is None


class _FakeCompiled:
    def __init__(self):
        self.function, self.packed_metadata, self.calls = object(), object(), []

    def run(self, *args):
        self.calls.append(args)


class _FakeJIT:
    """Stands in for ``triton.jit(fn)``: ``[grid](*args, **meta)`` is Triton's own path."""

    def __init__(self):
        self.slow_calls, self.compiled = [], {}

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.slow_calls.append((grid, args, meta))
            return self.compiled.setdefault(launch_key(args, meta), _FakeCompiled())

        return run


def _kernel(a_ptr, out_ptr, n, scale, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = False):
    pass


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    monkeypatch.setattr(runtime, "_DIRECT_ENABLED", True)


def test_known_variants_launch_directly(fake_cuda):
    jit, direct = _FakeJIT(), DirectLaunches(_kernel)
    x, out = torch.randn(32), torch.empty(32)
    first = direct.launch(jit, (4, 2), (x, out, 32, 0.5), {"BLOCK": 16, "num_warps": 4})
    assert len(jit.slow_calls) == 1 and not first.calls
    y = torch.randn(32)  # another input, another float: the same variant
    second = direct.launch(jit, (4, 2), (y, out, 32, 0.25), {"BLOCK": 16, "num_warps": 4})
    assert second is first and len(jit.slow_calls) == 1
    (call,) = first.calls
    assert call[:4] == (4, 2, 1, 1234)
    assert call[4] is first.function and call[5] is first.packed_metadata
    assert call[6:9] == (None, None, None)  # no launch metadata, no hooks
    assert call[9] is y and call[10] is out
    assert call[11:] == (32, 0.25, 16, False)  # the default FLAG filled in
    # A new variant (another constexpr value, another size) goes through Triton once,
    # then directly.
    for meta, n in (({"BLOCK": 16, "FLAG": True, "num_warps": 4}, 32), ({"BLOCK": 16, "num_warps": 4}, 48)):
        slow = len(jit.slow_calls)
        direct.launch(jit, (4,), (x, out, n, 0.25), meta)
        direct.launch(jit, (4,), (x, out, n, 0.25), meta)
        assert len(jit.slow_calls) == slow + 1


def test_unaligned_pointers_and_hooks_take_tritons_path(fake_cuda, monkeypatch):
    jit, direct = _FakeJIT(), DirectLaunches(_kernel)
    x, out = torch.randn(32), torch.empty(32)
    meta = {"BLOCK": 16}
    direct.launch(jit, (1,), (x, out, 32, 0.5), meta)
    direct.launch(jit, (1,), (x[1:], out, 31, 0.5), meta)
    direct.launch(jit, (1,), (x[1:], out, 31, 0.5), meta)
    assert len(jit.slow_calls) == 3
    monkeypatch.setattr(runtime, "_hooks_registered", lambda: True)
    direct.launch(jit, (1,), (x, out, 32, 0.5), meta)
    assert len(jit.slow_calls) == 4


def test_hook_detection_follows_triton_knobs():
    from triton import knobs

    assert not runtime._hooks_registered()
    hook = lambda *args: None  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert runtime._hooks_registered()
        finally:
            chain.remove(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
        try:
            assert runtime._hooks_registered()
        finally:
            knobs.runtime.launch_enter_hook = None
    assert not runtime._hooks_registered()


def _recording():
    """A context in which launches are recorded as (kernel, grid, args, meta), not run."""
    import contextlib

    @contextlib.contextmanager
    def recording():
        seen = []
        original = DualKernel.__getitem__
        DualKernel.__getitem__ = lambda self, grid: (lambda *args, **meta: seen.append((self, grid, args, meta)))
        try:
            with bntriton.cpu_backend("interpreter"):
                yield seen
        finally:
            DualKernel.__getitem__ = original

    return recording()


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
@pytest.mark.parametrize("params", ["both", "no_weight", "no_bias", "fp32_params"])
def test_cached_eval_launch_passes_what_the_general_route_passes(layout, params):
    """launch_cache.eval_launch caches an eval launch per input geometry and writes its
    arguments out itself: the same kernel, grid, arguments (the output aside) and
    constexprs as the general route (view, plan, normalize._launch_affine)."""
    from bntriton import dispatch
    from bntriton.kernels import launch_cache
    from bntriton.kernels import channel_view

    dtype = torch.float16 if params == "fp32_params" else torch.float32
    x = torch.randn((6, 5) if layout == "2d" else (3, 5, 4, 4)).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b, rm, rv = torch.rand(5) + 0.5, torch.randn(5), torch.randn(5), torch.rand(5) + 0.5
    if params != "fp32_params":
        w, b, rm, rv = (t.to(dtype) for t in (w, b, rm, rv))
    w = None if params == "no_weight" else w
    b = None if params == "no_bias" else b
    with _recording() as seen:
        launch = launch_cache.eval_launch(x, w, b)
        assert launch is not None
        launch(x, w, b, rm, rv, 1e-3)
        dispatch.forward_eval(channel_view(x), w, b, rm, rv, 1e-3)
    (kernel_a, grid_a, args_a, meta_a), (kernel_b, grid_b, args_b, meta_b) = seen
    assert kernel_a is kernel_b and grid_a == grid_b and meta_a == meta_b
    assert len(args_a) == len(args_b)
    for i, (a, b_) in enumerate(zip(args_a, args_b)):
        if i == 2:  # each route's own output
            assert a.shape == b_.shape and a.stride() == b_.stride() and a.dtype == b_.dtype
        elif isinstance(a, torch.Tensor):
            assert a is b_, i
        else:
            assert type(a) is type(b_) and a == b_, (i, a, b_)


def test_cached_eval_launch_is_per_geometry_and_steps_aside_for_plan_hooks():
    from bntriton.kernels import launch_cache
    from bntriton.kernels import plans

    x = torch.randn(3, 5, 4, 4)
    w = b = torch.ones(5)
    with bntriton.cpu_backend("interpreter"):
        nchw = launch_cache.eval_launch(x, w, b)
        assert launch_cache.eval_launch(x.clone(), w, b) is nchw  # same geometry, same launch
        assert launch_cache.eval_launch(x.to(memory_format=torch.channels_last), w, b) is not nchw
        assert launch_cache.eval_launch(x.double(), w.double(), b.double()) is not nchw
        assert launch_cache.eval_launch(x, None, b) is not nchw
        assert launch_cache.eval_launch(x[:, :, :, :3], w, b) is None  # read through a copy
        assert launch_cache.eval_launch(x[:0], w, b) is None  # no rows
        with forced_plan(block_rows=16):
            assert launch_cache.eval_launch(x, w, b) is None
        with plans.planned_for(132):  # plans for another GPU: launches of their own
            h100 = launch_cache.eval_launch(x, w, b)
            assert h100 not in (None, nchw)
            with plans.planned_for(108):
                assert launch_cache.eval_launch(x, w, b) not in (None, h100)
    with bntriton.cpu_backend("native"):
        assert launch_cache.eval_launch(x, w, b) is None  # the native CPU path decides itself


def test_non_dense_eval_input_is_copied_once():
    """An input the kernels read through a copy (a slice) takes the general route, and the
    cached-launch lookup before it must not make a copy of its own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("clone", "copy_", "_to_copy"):
                CountCopies.copies += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 5, 4, 6)[:, :, :, :4]
    rm, rv = torch.zeros(5), torch.ones(5)
    with _recording() as seen, CountCopies():
        bntriton.batch_norm(x, rm, rv, training=False)
    assert len(seen) == 1 and CountCopies.copies == 1
