"""Every kernel compiles for Hopper (sm_90), here on a CPU machine.

The interpreter runs a kernel's logic, not its compilation: a loop-carried value that
changes type, a constexpr branch the code generator rejects, or a dtype mix the compiler
refuses only fails once compiled.  Triton's ahead-of-time path compiles to PTX and a
cubin with no GPU present, so CI catches those before any GPU run does.
"""
import pytest
import triton
import triton.language as tl

from bntriton.kernels import backward, fused, normalize, stats, sync
from bntriton.kernels.runtime import DualKernel

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a Triton without the AOT entry points
    GPUTarget = ASTSource = None

KERNELS = {
    f"{mod.__name__.rsplit('.', 1)[-1]}.{name}": obj
    for mod in (stats, normalize, backward, fused, sync)
    for name, obj in vars(mod).items()
    if isinstance(obj, DualKernel)
}

# (input dtype, parameter dtype, accumulator, every flag, 64-bit offsets, tile, warps)
VARIANTS = {
    "bf16-flags-on": ("bf16", "fp32", tl.float32, True, False, (256, 16), 8),
    "fp64-flags-off-int64": ("fp64", "fp64", tl.float64, False, True, (64, 64), 4),
    "fp16-largest-fused-tile": ("fp16", "fp16", tl.float32, True, False, (4096, 2), 16),
    "fp32-one-channel-tile": ("fp32", "fp32", tl.float32, True, False, (4096, 1), 8),  # NCHW, long runs
}

INPUT_POINTERS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "out_ptr", "pivot_ptr", "res_ptr"}
PARAM_POINTERS = {"weight_ptr", "bias_ptr", "dweight_ptr", "dbias_ptr", "running_mean_ptr",
                  "running_var_ptr", "var_ptr"}
FLOATS = {"eps_hi", "eps_lo", "momentum_hi", "momentum_lo", "slope_hi", "slope_lo"}
EPILOGUE = {"ACTIVATION", "HAS_RESIDUAL", "MASK", "INVERT"}  # activations.py's switches


def _signature(kernel: DualKernel, variant):
    x_dtype, param_dtype, acc, flag, int64, (block_r, block_c), _ = variant
    acc_name = "fp64" if acc == tl.float64 else "fp32"
    signature, constexprs = {}, {}
    for p in kernel.compiled.params:
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
            # The epilogue's switches stay off here (test_epilogue_variants_compile_for_sm90).
            constexprs[name] = {"BLOCK_R": block_r, "BLOCK_C": block_c, "ACC": acc, "INT64": int64,
                                "SPLITS": 8}.get(name, 0 if name in EPILOGUE else flag)
        elif name == "num_batches_ptr":
            signature[name] = "*i64"
        elif name == "counters_ptr":
            signature[name] = "*i32"
        elif name == "mask_ptr":
            signature[name] = "*u8"
        elif name.endswith("_ptr"):
            dtype = x_dtype if name in INPUT_POINTERS else param_dtype if name in PARAM_POINTERS else acc_name
            signature[name] = "*" + dtype
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if int64 else "i32"
    return signature, constexprs


@pytest.mark.skipif(ASTSource is None, reason="this Triton has no ahead-of-time compile API")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_compiles_for_sm90(name, variant):
    kernel = KERNELS[name]
    signature, constexprs = _signature(kernel, VARIANTS[variant])
    source = ASTSource(fn=kernel.compiled, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": VARIANTS[variant][-1]}
    )
    assert compiled.asm["cubin"]


# The fused epilogue's switches (activation code, residual, 1-bit mask, in-place inversion):
# each activation and each switch in at least one kernel, forward and backward.
EPILOGUE_VARIANTS = [
    ("normalize._channel_affine_kernel", dict(HAS_DY=False, ACTIVATION=1, HAS_RESIDUAL=True, MASK=True)),
    ("normalize._channel_affine_kernel", dict(HAS_DY=True, ACTIVATION=4, HAS_RESIDUAL=True)),
    # The two-launch backward's epilogue: its own coefficients from the splits' sums.
    ("normalize._channel_affine_kernel", dict(HAS_DY=True, EVAL=False, GRAD_SUMS=True, ACTIVATION=1, MASK=True)),
    ("normalize._channel_affine_kernel", dict(HAS_DY=True, EVAL=False, GRAD_SUMS=True, BATCH_STATS=False)),
    ("fused._fused_forward_kernel", dict(ACTIVATION=2, HAS_RESIDUAL=True, MASK=True)),
    ("fused._fused_backward_kernel", dict(ACTIVATION=3, HAS_RESIDUAL=True)),
    ("fused._fused_backward_kernel", dict(ACTIVATION=1, MASK=True, HAS_RESIDUAL=True)),
    ("backward._grad_partial_kernel", dict(ACTIVATION=2, INVERT=True)),
]


@pytest.mark.skipif(ASTSource is None, reason="this Triton has no ahead-of-time compile API")
@pytest.mark.parametrize("name,switches", EPILOGUE_VARIANTS, ids=lambda v: str(v).replace(" ", ""))
def test_epilogue_variants_compile_for_sm90(name, switches):
    kernel = KERNELS[name]
    signature, constexprs = _signature(kernel, VARIANTS["bf16-flags-on"])
    constexprs.update(switches)
    source = ASTSource(fn=kernel.compiled, signature=signature, constexprs=constexprs)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]


# The two dense layouts as the JIT specializes them: the unit stride becomes a constant
# and aligned pointers and sizes are known to be multiples of 16.
DENSE_LAYOUTS = {
    "nchw": ({"stride_s": 1}, {"SPLIT_ROWS": True}, (1024, 4)),
    "nhwc": ({"stride_c": 1}, {"SPLIT_ROWS": False}, (64, 64)),
    "nchw-one-channel": ({"stride_s": 1}, {"SPLIT_ROWS": True}, (4096, 1)),  # long runs (plans.plan_for)
}
STREAMING = ["stats._partial_lanes_kernel", "stats._partial_centred_kernel", "normalize._channel_affine_kernel",
             "backward._grad_partial_kernel", "fused._fused_forward_kernel",
             "fused._fused_backward_kernel"]
WRITES_TILE = {"normalize._channel_affine_kernel", "fused._fused_forward_kernel",
               "fused._fused_backward_kernel"}


@pytest.mark.skipif(ASTSource is None, reason="this Triton has no ahead-of-time compile API")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("layout", list(DENSE_LAYOUTS))
@pytest.mark.parametrize("name", STREAMING)
def test_tile_loads_and_stores_are_16_byte_vectors(name, layout, dtype):
    """Memory-bound kernels need 16-byte accesses along the contiguous axis (GUIDE §2);
    the PTX says whether the compiler could prove them for either dense layout."""
    kernel = KERNELS[name]
    ones, flags, tile = DENSE_LAYOUTS[layout]
    signature, constexprs = _signature(kernel, (dtype, "fp32", tl.float32, True, False, tile, 8))
    constexprs.update({k: v for k, v in flags.items() if k in constexprs})
    for arg, value in ones.items():
        signature[arg], constexprs[arg] = "constexpr", value
    names = [p.name for p in kernel.compiled.params]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n] not in ("constexpr", "fp32")}
    source = ASTSource(fn=kernel.compiled, signature=signature, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    assert "ld.global.v4" in ptx
    if name in WRITES_TILE:
        assert "st.global.v4" in ptx


@pytest.mark.skipif(ASTSource is None, reason="this Triton has no ahead-of-time compile API")
def test_interpreted_runs_leave_gpu_compilation_intact(tmp_path, monkeypatch):
    """Interpreting kernels (CPU tensors) patches triton.language while they run; every
    patch must be undone, or compiling for a GPU later in the same process breaks (the GPU
    machine runs CPU and CUDA tests in one process).  A fresh cache forces a real compile."""
    import torch

    import bntriton
    from bntriton.kernels import forced_plan

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for path in ({"path": "fused"}, {"block_rows": 16, "block_channels": 2, "num_splits": 2}):
        x = torch.randn(8, 4, 3, requires_grad=True)
        with forced_plan(**path):
            bntriton.batch_norm(x, torch.zeros(4), torch.ones(4), training=True).sum().backward()
    for name in sorted(KERNELS):
        kernel = KERNELS[name]
        signature, constexprs = _signature(kernel, VARIANTS["bf16-flags-on"])
        source = ASTSource(fn=kernel.compiled, signature=signature, constexprs=constexprs)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
    assert any(tmp_path.iterdir())  # the compiles really ran into the fresh cache


# Kernels whose last program per channel block merges the splits (kernels/counters.py),
# with the switches that turn the merge on.
ARRIVAL_COUNTERS = {
    "stats._partial_lanes_kernel": {},
    "stats._partial_centred_kernel": {},
    "backward._grad_partial_kernel": {"COMBINE": True, "RUNNING": False},
    "fused._fused_forward_kernel": {"HAS_RUNNING": True, "HAS_COUNTER": True, "CUMULATIVE": True},
}


def _instructions(ptx: str) -> list:
    """The PTX's instructions, one per entry, without comments, debug locations and labels."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if line and not line.startswith((".loc", "$L")) and not line.endswith(":"):
            out.append(line)
    return out


@pytest.mark.skipif(ASTSource is None, reason="this Triton has no ahead-of-time compile API")
@pytest.mark.parametrize("name", sorted(ARRIVAL_COUNTERS))
def test_arrival_counter_orders_the_programs_stores(name):
    """The last-program merge is only correct if every thread's partial results are stored
    before the counter is bumped, and the merge's loads come after the bump: a CTA barrier,
    then one thread's atomic add with acquire-release semantics at GPU scope, then its
    result handed to every thread through shared memory and a second barrier."""
    kernel = KERNELS[name]
    signature, constexprs = _signature(kernel, VARIANTS["bf16-flags-on"])
    constexprs.update(ARRIVAL_COUNTERS[name])
    source = ASTSource(fn=kernel.compiled, signature=signature, constexprs=constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    code = _instructions(ptx)
    atomics = [i for i, line in enumerate(code) if "atom." in line]
    assert atomics, "no atomic in the kernel"
    for i in atomics:
        assert "atom.global.gpu.acq_rel.add" in code[i], code[i]
        # Going back from the atomic, a barrier comes before any global store ...
        before = next(line for line in reversed(code[:i]) if line.startswith("bar.sync") or "st.global" in line)
        assert before.startswith("bar.sync"), code[max(0, i - 8):i + 1]
        # ... and going on, the result goes through shared memory and a barrier before any
        # global load.
        after = code[i + 1:]
        barrier = next(j for j, line in enumerate(after) if line.startswith("bar.sync") or "ld.global" in line)
        assert after[barrier].startswith("bar.sync"), after[:barrier + 1]
        assert any("st.shared" in line for line in after[:barrier]), after[:barrier + 1]
