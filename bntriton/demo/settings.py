"""The demo's sizes: one frozen record per preset, so every number in the report traces back
to a named configuration (``quick`` for a CPU in minutes, ``full`` for a GPU or a patient CPU,
``tiny`` for the test suite)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# Learning rates on a log grid with half-decade steps, 1e-3 .. 10 (3 significant digits):
# the band of rates that trains is then measured in units of 0.5 decades.
LR_GRID = tuple(float(f"{10.0 ** (k / 2):.3g}") for k in range(-6, 3))
LR_STEP_DECADES = 0.5


@dataclass(frozen=True)
class Settings:
    depths: tuple = (4, 8)              # hidden layers of the learning-rate sweep
    lrs: tuple = LR_GRID
    inits: tuple = ("he", "small")
    width: int = 64                     # units per hidden layer
    steps: int = 150                    # SGD steps per training run
    batch: int = 64
    train_size: int = 8192
    test_size: int = 1024
    features: int = 16
    classes: int = 10
    seed: int = 0
    trains_fraction: float = 0.9        # "trains": test accuracy >= this x the best at that depth
    sigmoid_depth: int = 4
    sigmoid_lr: float = 1.0
    test_time_depth: int = 4
    test_time_lr: float = 0.1
    identity_rows: int = 256            # the identity check's batch (fresh random data)
    identity_channels: int = 64

    def describe(self) -> dict:
        return asdict(self)


PRESETS = {
    "quick": Settings(),
    "full": Settings(depths=(4, 8, 12), steps=600, train_size=16384, test_size=2048),
    # The test suite's size: every code path, seconds on a CPU through the interpreter.
    "tiny": Settings(depths=(1,), lrs=(0.01, 1.0), inits=("he",), width=8, steps=2, batch=16,
                     train_size=64, test_size=32, features=4, classes=3, sigmoid_depth=1,
                     test_time_depth=1, identity_rows=16, identity_channels=8),
}


def preset(name: str, **overrides) -> Settings:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
