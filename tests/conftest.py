"""Shared test settings: the device under test and hypothesis profiles.

Kernels run compiled on a GPU when one is present and in Triton's interpreter on CPU
otherwise, so the same suite checks both: the suite sets ``BNTRITON_CPU_BACKEND`` to
``interpreter`` (unless the caller chose a backend), so a CPU test exercises the kernels;
tests of the native CPU path ask for it with ``bntriton.cpu_backend("native")``.  ``BNTRITON_HYPOTHESIS_EXAMPLES`` scales the
number of generated cases (CI keeps it small: the interpreter costs milliseconds per
program instance).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Before anything imports bntriton; subprocesses (the distributed tests) inherit it.
os.environ.setdefault("BNTRITON_CPU_BACKEND", "interpreter")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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


@pytest.fixture
def device():
    return DEVICE
