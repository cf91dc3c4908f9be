"""The host path's length, pinned: bntriton's own Python frames per call on the CUDA
route (planned as an H100, launches stubbed at Triton's launcher, bound launches
running their guard; perf/frames.py), beside torch's nn.BatchNorm2d.  A frame is host
time on every call of every layer, so a change that adds frames to the hot path fails
here and has to update the pin on purpose.

The goal is torch's count plus one frame per launch (a bound launch's own, the launch
site's guard: kernels/bound_launch.py); the pins say where the path stands.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[1] / "perf"

# call kind: (bntriton's own frames at most, launches)
PINNED = {
    "training forward": (13, 2),
    "training backward": (9, 2),
    "eval forward": (12, 1),
    "eval forward, no_grad": (11, 1),
}


def _frames_module():
    spec = importlib.util.spec_from_file_location("perf_frames", PERF / "frames.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# The same for BatchNormAct2d(relu), beside torch's BatchNorm2d + ReLU.
FUSED_PINNED = {
    "training forward": (17, 2),
    "training backward": (11, 2),
    "eval forward": (18, 1),
    "eval forward, no_grad": (13, 1),
}


@pytest.mark.parametrize("fused", [False, True], ids=["BatchNorm2d", "BatchNormAct2d"])
def test_frames_per_call_stay_within_their_pins(fused):
    pins = FUSED_PINNED if fused else PINNED
    rows = {name: (ours, theirs) for name, ours, theirs in _frames_module().measure(fused=fused)}
    assert set(rows) == set(pins)
    for name, (most, launches) in pins.items():
        ours, theirs = rows[name]
        own, _, launched = ours
        assert launched == launches, (name, launched)
        assert own <= most, f"{name}: {own} of bntriton's frames per call, pinned at {most} (torch's: {theirs[1]})"
        assert theirs[1] > 0, name  # the counter sees torch's frames too
