"""Shared test settings: the device under test and hypothesis profiles.

Kernels run compiled on a GPU when one is present and in Triton's interpreter on CPU
otherwise, so the same suite checks both.  ``BNTRITON_HYPOTHESIS_EXAMPLES`` scales the
number of generated cases (CI keeps it small: the interpreter costs milliseconds per
program instance).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

settings.register_profile(
    "bntriton",
    deadline=None,
    max_examples=int(os.environ.get("BNTRITON_HYPOTHESIS_EXAMPLES", "100")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("bntriton")


@pytest.fixture
def device():
    return DEVICE
