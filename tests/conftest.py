"""Shared test settings: the device under test, the CPU backend under test, hypothesis
profiles.

Kernels run compiled on a GPU when one is present.  CPU tensors have two backends, and
users reach both: the native CPU path (the default) and the kernels in Triton's
interpreter.  So every front-end test (modules, functional, autograd, compile, export,
fused layers, verification, demo) runs once on each: the autouse fixture
``cpu_backend_under_test`` is parametrized ``[native]`` / ``[interpreter]`` and sets the
backend (also in the environment, for subprocesses such as the distributed tests).  The
modules in :data:`KERNEL_MODULES` run once: those that test the kernels themselves on the
interpreter, the rest (documents, import graph, traced kernels) need no backend choice;
a front-end test that is kernel-only by design carries
``@pytest.mark.interpreter_only("why, in one line")``.  On a CUDA host the front-end tests
run once, on the native path for their CPU tensors (the interpreter's CPU pass is the
CPU machines' job).  ``BNTRITON_CPU_BACKEND`` set by the caller narrows every test to
that backend.

``BNTRITON_HYPOTHESIS_EXAMPLES`` scales the number of generated cases (CI keeps it small:
the interpreter costs milliseconds per program instance).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The kernels' own tests: they check the interpreter's (or the GPU's) kernels against the
# float64 oracle, plan by plan; the native path has its own module comparing the two.
KERNEL_MODULES = {
    "test_kernels", "test_numerics", "test_traffic", "test_hopper_compile", "test_direct_launch",
    "test_bound_launch",
    "test_native_cpu", "test_reference", "test_perf_tooling", "test_pivot_rule",
    "test_inductor_kernels",  # fake CUDA tensors: no CPU backend involved
    "test_docs",  # the documents' examples, as a user runs them: the default backend
    "test_generated_docs", "test_host_frames", "test_import_graph", "test_backend_contract",
}
_CHOSEN = os.environ.get("BNTRITON_CPU_BACKEND")
if _CHOSEN:
    FRONT_END_BACKENDS = [_CHOSEN]
elif DEVICE == "cuda":
    FRONT_END_BACKENDS = ["native"]
else:
    FRONT_END_BACKENDS = ["native", "interpreter"]
# Before anything imports bntriton: the kernel modules' default (subprocesses inherit it).
os.environ.setdefault("BNTRITON_CPU_BACKEND", "interpreter")

settings.register_profile(
    "bntriton",
    deadline=None,
    max_examples=int(os.environ.get("BNTRITON_HYPOTHESIS_EXAMPLES", "100")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    # CI draws the same examples on every run (a red CI must be reproducible);
    # BNTRITON_HYPOTHESIS_EXPLORE=1 draws fresh ones.
    derandomize=not os.environ.get("BNTRITON_HYPOTHESIS_EXPLORE"),
)
settings.load_profile("bntriton")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter_only(reason): a front-end test that checks the kernels themselves "
        "(their launches, plans or bits); runs on the interpreter backend only")


def _backends_for(metafunc) -> list:
    module = metafunc.module.__name__.rpartition(".")[2]
    if module in KERNEL_MODULES:
        return []
    marker = metafunc.definition.get_closest_marker("interpreter_only")
    if marker is not None:
        if not (marker.args and marker.args[0]):
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: interpreter_only needs its reason")
        return [b for b in FRONT_END_BACKENDS if b == "interpreter"] or ["interpreter"]
    return FRONT_END_BACKENDS


def pytest_generate_tests(metafunc):
    backends = _backends_for(metafunc)
    if backends and "cpu_backend_under_test" in metafunc.fixturenames:
        metafunc.parametrize("cpu_backend_under_test", backends, indirect=True)


@pytest.fixture(autouse=True)
def cpu_backend_under_test(request, monkeypatch):
    """The CPU backend this test runs on (None for the kernel modules: the environment's)."""
    name = getattr(request, "param", None)
    if name is None:
        yield None
        return
    import bntriton

    monkeypatch.setenv("BNTRITON_CPU_BACKEND", name)
    with bntriton.cpu_backend(name):
        yield name


@pytest.fixture
def device():
    return DEVICE
