"""The demo's data, generated from a seed (nothing is downloaded).

A 10-class problem labelled by a random "teacher" network: Gaussian inputs, classes the
argmax of a random two-layer tanh network's outputs.  The classes are separated by curved
boundaries (a linear model gets far from 100%), yet an MLP can learn them, and the data are
the same bits on every machine: they are drawn on the CPU in float64 from a seeded
generator, then converted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def to(self, device) -> "Dataset":
        return Dataset(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def teacher_task(train_size: int, test_size: int, features: int, classes: int, seed: int,
                 hidden: int = 32) -> Dataset:
    """Inputs ~ N(0, I); label = argmax of a random tanh network (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(features, hidden, generator=g, dtype=torch.float64) / features ** 0.5
    w2 = torch.randn(hidden, classes, generator=g, dtype=torch.float64) / hidden ** 0.5
    x = torch.randn(train_size + test_size, features, generator=g, dtype=torch.float64)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    x = x.to(torch.float32)
    return Dataset(x[:train_size], y[:train_size], x[train_size:], y[train_size:])
