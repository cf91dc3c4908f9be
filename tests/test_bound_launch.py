"""Bound launches (kernels/bound_launch.py): a cached launch's kernels called through
Triton's launcher with no key and no lookup once their variant is known.

Checked without a GPU, with stand-ins for the compiled variants: a bound launch hands the
launcher exactly what the direct launch would for the same call, on every cached launch
of every route; the first launch of a site binds it and later ones use the binding; and
whatever the guard is there for (an unaligned pointer, another device, another dtype or
int, a launch hook, direct launches off, a CPU tensor, an unknown Triton) takes the
direct path.  The GPU run of the suite launches through the bound path for real.
"""
import operator

import pytest
import torch

import bntriton
from bntriton.kernels import launch_cache
from bntriton.kernels import RunningStats, bound_launch, plans, runtime
from bntriton.kernels.bound_launch import BoundLaunch
from bntriton.kernels.runtime import DirectLaunches, DualKernel, launch_key

class _Compiled:
    """A compiled variant's stand-in: its launcher records what it is handed."""

    def __init__(self, calls: list):
        self.function, self.packed_metadata = object(), object()
        self.run = lambda *args: calls.append(args)


class _JIT:
    """``triton.jit(fn)``'s stand-in: ``[grid](*args, **meta)`` is Triton's own path,
    returning one compiled variant per key (as Triton's cache would)."""

    def __init__(self, runs: list):
        self.runs, self.slow, self.compiled = runs, 0, {}

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.slow += 1
            return self.compiled.setdefault((torch.cuda.current_device(), launch_key(args, meta)),
                                            _Compiled(self.runs))

        return run


class _Kernel:
    """A DualKernel on CUDA tensors: ``[grid](...)`` is the direct path."""

    def __init__(self, fn):
        self.fn, self.runs, self.unbound = fn, [], 0
        self.jit, self.direct = _JIT(self.runs), DirectLaunches(fn)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.unbound += 1
            return self.direct.launch(self.jit, grid, args, meta)

        return launch


def _kernel(a_ptr, out_ptr, n, scale, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = False):
    pass


class _Device:
    """The current CUDA device, as both launch paths read it."""

    index = 0


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors standing for CUDA ones, on a settable current device."""
    device = _Device()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device.index)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    monkeypatch.setattr(runtime, "_DIRECT_ENABLED", True)
    monkeypatch.setattr(bound_launch, "_on_cuda", operator.attrgetter("is_cpu"))
    monkeypatch.setattr(bound_launch, "_cuda_device", lambda: device.index)
    monkeypatch.setattr(bound_launch, "_raw_stream", lambda index: 1000 + index)
    return device


META = {"BLOCK": 16, "num_warps": 4}


def _site():
    kernel = _Kernel(_kernel)
    return kernel, BoundLaunch(kernel, (4, 2), META)


def test_first_launch_binds_and_later_launches_use_the_binding(fake_cuda):
    kernel, site = _site()
    x, out = torch.randn(32), torch.empty(32)
    site(x, out, 32, 0.5)
    assert kernel.unbound == 1 and kernel.jit.slow == 1 and site.bound is not None
    for _ in range(3):
        site(torch.randn(32), out, 32, 0.25)  # another tensor, another float: the same variant
    assert kernel.unbound == 1 and kernel.jit.slow == 1 and len(kernel.runs) == 3


def test_a_bound_launch_passes_what_the_direct_launch_passes(fake_cuda):
    kernel, site = _site()
    x, out = torch.randn(32), torch.empty(32)
    site(x, out, 32, 0.5)
    y = torch.randn(32)
    site(y, out, 32, 0.25)
    kernel.direct.launch(kernel.jit, (4, 2), (y, out, 32, 0.25), META)
    bound, direct = kernel.runs
    assert len(bound) == len(direct) == 9 + 4 + 2  # grid, stream, ..., the arguments, the tail
    assert all(a is b or (type(a) is type(b) and a == b) for a, b in zip(bound, direct)), (bound, direct)
    assert bound[:4] == (4, 2, 1, 1000) and bound[9] is y and bound[-2:] == (16, False)


def test_a_bound_launch_reads_the_current_stream(fake_cuda, monkeypatch):
    kernel, site = _site()
    x, out = torch.randn(32), torch.empty(32)
    site(x, out, 32, 0.5)
    monkeypatch.setattr(bound_launch, "_raw_stream", lambda index: 7)
    site(x, out, 32, 0.5)
    assert kernel.runs[-1][3] == 7


GUARDED = ["unaligned pointer", "another dtype", "another int", "a parameter for a tensor", "None for a pointer",
           "another device", "a launch hook", "direct launches off"]


def _guarded_call(case, x, out, device, monkeypatch, request):
    """The arguments of a call the bound variant must not take, after whatever else the
    case changes."""
    if case == "another device":
        device.index = 1
    elif case == "a launch hook":
        chain = runtime._knobs.runtime.launch_enter_hook
        if not hasattr(chain, "add"):
            pytest.skip("this Triton keeps launch hooks as plain callables: nothing is bound")
        hook = lambda *args: None  # noqa: E731
        chain.add(hook)
        request.addfinalizer(lambda: chain.remove(hook))
    elif case == "direct launches off":
        monkeypatch.setattr(runtime, "_DIRECT_ENABLED", False)
    return {
        "unaligned pointer": (x[1:], out, 32, 0.5),  # nothing else changed
        "another dtype": (x.double(), out, 32, 0.5),
        "another int": (x, out, 48, 0.5),
        "a parameter for a tensor": (torch.nn.Parameter(x), out, 32, 0.5),
        "None for a pointer": (x, None, 32, 0.5),
    }.get(case, (x, out, 32, 0.5))


@pytest.mark.parametrize("case", GUARDED)
def test_what_the_guard_is_for_takes_the_direct_path(fake_cuda, monkeypatch, request, case):
    kernel, site = _site()
    x, out = torch.randn(32), torch.empty(32)
    site(x, out, 32, 0.5)
    bound = site.bound
    site(*_guarded_call(case, x, out, fake_cuda, monkeypatch, request))
    assert kernel.unbound == 2 and kernel.runs == [], case  # Triton's path (the stand-in's) compiled anew
    if case in ("unaligned pointer", "a launch hook", "direct launches off"):
        assert site.bound is None  # Triton's own path launched: nothing to bind
    else:
        # The direct path launched the variant of its own key: the site is bound to it now.
        assert site.bound is not None and site.bound is not bound


def test_a_tensor_passed_twice_is_read_once_while_it_stays_one_tensor(fake_cuda):
    kernel, site = _site()
    x = torch.randn(32)
    site(x, x, 32, 0.5)  # bound with one tensor in both pointer positions
    site(x, x, 32, 0.5)
    assert kernel.unbound == 1 and len(site.bound.tensors((x, x, 32, 0.5))) == 1
    site(x, x.double(), 32, 0.5)  # the second position's dtype is read only while it is x
    assert kernel.unbound == 2 and len(kernel.runs) == 1
    site(x, x[1:], 32, 0.5)  # ... and its address
    assert kernel.unbound == 3 and len(kernel.runs) == 1


def test_a_site_bound_on_one_device_rebinds_on_another(fake_cuda):
    kernel, site = _site()
    x, out = torch.randn(32), torch.empty(32)
    site(x, out, 32, 0.5)
    fake_cuda.index = 1
    site(x, out, 32, 0.5)
    site(x, out, 32, 0.5)
    assert kernel.unbound == 2 and site.bound.device == 1
    assert kernel.runs[-1][3] == 1001  # device 1's stream
    fake_cuda.index = 0
    site(x, out, 32, 0.5)
    assert kernel.unbound == 3 and site.bound.device == 0


def test_cpu_tensors_and_unknown_tritons_never_bind(fake_cuda, monkeypatch):
    x, out = torch.randn(32), torch.empty(32)
    monkeypatch.setattr(bound_launch, "_on_cuda", operator.attrgetter("is_cuda"))  # the interpreter's tensors
    kernel, site = _site()
    site(x, out, 32, 0.5)
    site(x, out, 32, 0.5)
    assert site.bound is None and kernel.unbound == 2
    monkeypatch.setattr(bound_launch, "_on_cuda", operator.attrgetter("is_cpu"))
    monkeypatch.setattr(runtime, "launcher_convention_known", lambda: False)  # run calls its launcher otherwise
    kernel, site = _site()
    site(x, out, 32, 0.5)
    site(x, out, 32, 0.5)
    assert site.bound is None and kernel.unbound == 2 and kernel.jit.slow == 2


def test_both_tritons_call_their_launcher_as_direct_launches_do():
    assert runtime.launcher_convention_known()


# ------------------------------------------------------------------ the cached launches


def _route_through_direct_launches(monkeypatch, runs):
    """Every real kernel's ``[grid]`` the direct path with stand-in variants (fresh
    variant tables, restored afterwards)."""
    jits = {}

    def getitem(kernel, grid):
        jit = jits.setdefault(kernel, _JIT(runs))
        return lambda *args, **meta: kernel.direct.launch(jit, grid, args, meta)

    monkeypatch.setattr(DualKernel, "__getitem__", getitem)
    for module in (bntriton.kernels.normalize, bntriton.kernels.stats, bntriton.kernels.fused,
                   bntriton.kernels.backward):
        for value in vars(module).values():
            if isinstance(value, DualKernel):
                monkeypatch.setattr(value.direct, "variants", {})
    monkeypatch.setattr(launch_cache, "_LAUNCHES", {})


def _calls(size):
    """One call of each cached launch: (name, call) with fresh inputs on each call."""
    shape = (8, 5, 40, 40) if size == "large" else (3, 5, 4, 4)
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    running = RunningStats(torch.zeros(5), torch.ones(5), torch.zeros((), dtype=torch.long), 0.1)
    stats = (torch.randn(5), torch.randn(5), torch.rand(5))
    return {
        "train": lambda: launch_cache.train_launch(x, w, b, running)(x, w, b, 1e-3, running),
        "train, cumulative": lambda: launch_cache.train_launch(x, w, b, running._replace(momentum=None))(
            x, w, b, 1e-3, running._replace(momentum=None)),
        "backward": lambda: launch_cache.backward_launch(x, x, w)(torch.randn_like(x), x, w, *stats),
        "backward, NCHW": lambda: launch_cache.backward_launch(x.contiguous(), x.contiguous(), w)(
            torch.randn(shape), x.contiguous(), w, *stats),
        "eval": lambda: launch_cache.eval_launch(x, w, b)(x, w, b, running.mean, running.var, 1e-3),
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)
    return a is b or (type(a) is type(b) and a == b)


@pytest.mark.parametrize("size", ["small", "large"])
def test_cached_launches_bind_and_pass_what_direct_launches_pass(fake_cuda, monkeypatch, size):
    """Every cached launch (both training forwards, the backward's three routes, eval)
    under an H100's plans: the first call binds each of its launches, and a later call's
    launcher calls get, one for one, what the direct path hands the launcher for the
    same call (each call's fresh buffers alike in shape, strides and dtype)."""
    runs = []
    _route_through_direct_launches(monkeypatch, runs)
    with bntriton.cpu_backend("interpreter"), plans.planned_for(132):
        for name, call in _calls(size).items():
            call()  # binds
            sites = [s for launch in launch_cache._LAUNCHES.values() for s in _sites(launch)]
            assert sites and all(s.bound is not None for s in sites), name
            runs.clear()
            call()
            bound_runs = list(runs)
            runs.clear()
            monkeypatch.setattr(bound_launch, "bind", lambda *args: None)
            for s in sites:
                s.bound = None
            call()
            monkeypatch.setattr(bound_launch, "bind", _BIND)
            direct_runs = list(runs)
            runs.clear()
            assert len(bound_runs) == len(direct_runs) == len(sites), name
            for bound, direct in zip(bound_runs, direct_runs):
                assert len(bound) == len(direct), name
                assert all(_same(a, b) for a, b in zip(bound, direct)), name
            launch_cache._LAUNCHES.clear()


_BIND = bound_launch.bind


def _sites(launch):
    return [getattr(launch, name) for name in type(launch).__slots__
            if isinstance(getattr(launch, name, None), BoundLaunch)]


def test_the_routes_above_reach_every_cached_launch(fake_cuda, monkeypatch):
    _route_through_direct_launches(monkeypatch, [])
    kinds = set()
    with bntriton.cpu_backend("interpreter"), plans.planned_for(132):
        for size in ("small", "large"):
            for call in _calls(size).values():
                call()
                kinds |= {type(launch).__name__ for launch in launch_cache._LAUNCHES.values()}
                combine = [launch.combine for launch in launch_cache._LAUNCHES.values() if hasattr(launch, "combine")]
                kinds |= {f"combine={c}" for c in combine}
                launch_cache._LAUNCHES.clear()
    assert kinds == {"SplitTrainLaunch", "FusedTrainLaunch", "SplitBackwardLaunch", "FusedBackwardLaunch",
                     "EvalLaunch", "combine=True", "combine=False"}


def test_the_launch_timing_script_times_one_launch_four_ways(fake_cuda, monkeypatch):
    """perf/launch_host.py (GPU only): its direct, bound and launcher-alone ways hand the
    launcher the same call, and its bound way takes the bound path."""
    import importlib.util
    import types
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "perf_launch_host", Path(__file__).resolve().parents[1] / "perf" / "launch_host.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    runs = []
    _route_through_direct_launches(monkeypatch, runs)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=1000))
    x, w, b = torch.randn(3, 5, 4, 4), torch.rand(5) + 0.5, torch.randn(5)
    with bntriton.cpu_backend("interpreter"):
        (launch,) = script.recorded_launches(lambda: bntriton.batch_norm(x, torch.zeros(5), torch.ones(5), w, b))
        fns = script.ways(*launch)
        unbound = launch[0].direct.variants.copy()
        runs.clear()
        fns["direct"]()
        monkeypatch.setattr(DualKernel, "__getitem__", None)  # neither of these goes through DualKernel
        fns["bound"]()
        fns["launcher alone"]()
    assert len(runs) == 3 and launch[0].direct.variants == unbound
    assert all(all(_same(a, b) for a, b in zip(runs[0], other)) for other in runs[1:])
    assert runs[0][:4] == (*_grid3(launch[1]), 1000)


def _grid3(grid):
    return (*grid, *(1,) * (3 - len(grid)))
