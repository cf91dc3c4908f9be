"""Host time of one kernel launch on a GPU, four ways: Triton's ``JITFunction.run``,
bntriton's direct launch (``DualKernel`` -> ``DirectLaunches``: a key and a lookup per
call), a bound launch (``kernels/bound_launch.py``: a guard, then the launcher), and the
launcher alone (``CompiledKernel.run`` called with everything prepared: the floor the
other three stand on).  A fifth column times torch's static launcher (Inductor's
``_StaticCudaLauncher``, which takes the arguments without Triton's per-pointer
``data_ptr()`` and driver query) on the same compiled kernel, with everything prepared:
what a bound launch could cost on that launcher.  It is timed only after a launch through
it left every tensor argument with the same bytes as one through Triton's launcher.

The launches are real ones, recorded from three calls on a tiny CUDA tensor: the eval
forward's epilogue, the training forward and the running-statistics update (the "bare
launch" of perf/host_profile.py and perf/NOTES.md section 11); the table gives each
one's positional arguments.  Each way launches the same kernel with the same arguments;
the time is that of the launching loop only (kernels queue up asynchronously; a round of
200 launches stays well under CUDA's queue depth, and the device is synchronized between
rounds), best of 20 rounds with the four ways interleaved.

    python perf/launch_host.py [--rounds 20] [--calls 200]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

import bntriton  # noqa: E402
from bntriton.kernels import launch_cache  # noqa: E402
from bntriton.kernels import runtime, stats  # noqa: E402
from bntriton.kernels.bound_launch import BoundLaunch  # noqa: E402


def recorded_launches(call) -> list:
    """``(kernel, grid, args, meta)`` of every launch ``call`` makes, its cached launches
    built afresh so that each launch goes through ``DualKernel``."""
    seen = []
    original = runtime.DualKernel.__getitem__

    def getitem(kernel, grid):
        launch = original(kernel, grid)

        def record(*args, **meta):
            seen.append((kernel, grid, args, dict(meta)))
            return launch(*args, **meta)

        return record

    launch_cache._LAUNCHES.clear()
    runtime.DualKernel.__getitem__ = getitem
    try:
        call()
    finally:
        runtime.DualKernel.__getitem__ = original
    launch_cache._LAUNCHES.clear()
    return seen


def ways(kernel, grid, args, meta) -> dict:
    """The four ways of making this launch, each a no-argument callable."""
    jit = kernel.compiled
    site = BoundLaunch(kernel, grid, meta)
    site(*args)  # compiles if needed, then binds
    site(*args)
    bound = site.bound
    if bound is None:
        raise SystemExit("the launch did not bind (BNTRITON_DIRECT_LAUNCH=0, a launch hook, or an unknown Triton)")
    launcher, tail = bound.launcher, bound.tail
    head = (*bound.grid, torch.cuda.current_stream().cuda_stream, bound.function, bound.metadata, None, None, None)
    return {
        "JITFunction.run": lambda: jit[grid](*args, **meta),
        "direct": lambda: kernel[grid](*args, **meta),
        "bound": lambda: site(*args),
        "launcher alone": lambda: launcher(*head, *args, *tail),
        STATIC: bound,
    }


STATIC = "torch's static launcher alone"


def static_launch(bound, args):
    """A launch of the bound variant through torch's static launcher, everything but the
    stream prepared, or the reason there is none."""
    try:
        try:
            from torch._inductor.runtime.static_triton_launcher import StaticallyLaunchedCudaKernel
        except ImportError:
            from torch._inductor.runtime.static_cuda_launcher import StaticallyLaunchedCudaKernel
        compiled = bound.compiled
        compiled._cubin_path = None  # Inductor's attribute: the cubin is written below instead
        static = StaticallyLaunchedCudaKernel(compiled)
        cubin = Path(tempfile.gettempdir()) / "bntriton-launch-host" / f"{compiled.hash}.cubin"
        static.reload_cubin_from_raw(str(cubin))
        static.load_kernel(bound.device)
        # The launcher takes the arguments that are not constexprs (Triton's own or the
        # specializations it made constants), in signature order.
        names = compiled.src.fn.arg_names
        signature = {names.index(k) if isinstance(k, str) else k: v for k, v in compiled.src.signature.items()}
        passed = [i for i in sorted(signature) if signature[i] != "constexpr" and i not in static.full_constexprs]
        values = (*args, *bound.tail)
        prepared = tuple(values[i] for i in passed)
        if len(prepared) != len(static.arg_tys):
            return f"n/a ({len(prepared)} arguments for {len(static.arg_tys)} types)"
    except Exception as error:  # a torch or Triton without it: the column says why
        return f"n/a ({type(error).__name__}: {error})"[:80]
    grid = bound.grid
    return lambda: static.run(*grid, torch.cuda.current_stream().cuda_stream, *prepared)


def same_effect(first, second, args) -> bool:
    """Whether launching ``second`` leaves every tensor argument with the bytes launching
    ``first`` does, from the same starting state."""
    tensors = list({id(a): a for a in args if isinstance(a, torch.Tensor)}.values())
    start = [t.clone() for t in tensors]
    first()
    torch.cuda.synchronize()
    want = [t.cpu().numpy().tobytes() for t in tensors]
    for t, s in zip(tensors, start):
        t.copy_(s)
    second()
    torch.cuda.synchronize()
    return all(t.cpu().numpy().tobytes() == w for t, w in zip(tensors, want))


def loop_us(fn, calls: int) -> float:
    """Host time per launch of one loop of ``calls`` launches, after the queue drained."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_host.py times CUDA launches: no CUDA device here", file=sys.stderr)
        return 2
    dev = "cuda"
    x = torch.randn(8, 64, 4, 4, device=dev)
    w, b = torch.rand(64, device=dev) + 0.5, torch.randn(64, device=dev)
    rm, rv = torch.zeros(64, device=dev), torch.ones(64, device=dev)
    mean, var = torch.randn(64, device=dev), torch.rand(64, device=dev)
    calls = {
        "eval forward (epilogue)": lambda: bntriton.batch_norm(x, rm.clone(), rv.clone(), w, b, False, 0.1, 1e-5),
        "training forward": lambda: bntriton.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5),
        "running-stats update": lambda: stats.update_running_stats(rm.clone(), rv.clone(), None, mean, var, 0.1),
    }
    props = torch.cuda.get_device_properties(0)
    import triton

    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}")
    names = ["JITFunction.run", "direct", "bound", "launcher alone"]
    print(f"\nHost time per launch, µs (best of {args.rounds} rounds of {args.calls} launches)\n")
    print("| launch | arguments | " + " | ".join([*names, STATIC]) + " |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    for label, call in calls.items():
        for kernel, grid, launch_args, meta in recorded_launches(call):
            fns = ways(kernel, grid, launch_args, meta)
            static = static_launch(fns.pop(STATIC), launch_args)
            if callable(static):
                if same_effect(fns["launcher alone"], static, launch_args):
                    fns[STATIC] = static
                else:
                    static = "n/a (its launch wrote other bytes)"
            timed = [*names, STATIC] if STATIC in fns else names
            best = dict.fromkeys(timed, float("inf"))
            for _ in range(args.rounds):
                for name in timed:
                    best[name] = min(best[name], loop_us(fns[name], args.calls))
            row = " | ".join(f"{best[name]:.2f}" for name in names)
            extra = f"{best[STATIC]:.2f}" if STATIC in best else static
            print(f"| {label}: {kernel.fn.__name__} | {len(launch_args)} | {row} | {extra} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
