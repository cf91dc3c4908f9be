"""Training and evaluation: plain SGD on cross-entropy, and a deterministic setting for both.

Plain SGD (no momentum, no weight decay, no schedule) so that the learning rate is the only
knob the sweep turns.  A run stops early, marked diverged, as soon as its loss is not finite.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset


@contextlib.contextmanager
def deterministic(device: torch.device):
    """Same command, same numbers: deterministic algorithms, and on a CPU one thread (a
    matrix product's summation order may depend on how many threads share it).  Restores the
    previous settings on exit."""
    previous_alg = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; read when its handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_alg)
        torch.set_num_threads(previous_threads)


@dataclass
class RunResult:
    losses: list = field(default_factory=list)  # training loss at every step taken
    accuracy: float = float("nan")              # final test accuracy (eval mode); nan if diverged
    diverged: bool = False


def train(model: nn.Module, data: Dataset, lr: float, steps: int, batch: int, seed: int) -> RunResult:
    """``steps`` SGD steps on minibatches drawn (with a seeded generator, without replacement
    within an epoch) from ``data``; then the test accuracy in eval mode."""
    device = data.x_train.device
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    order, cursor = torch.randperm(n, generator=g), 0
    result = RunResult()
    for _ in range(steps):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=g), 0
        idx = order[cursor:cursor + batch].to(device)
        cursor += batch
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        value = float(loss.detach())  # a host sync per step: fine for a demo, and it stops a diverged run
        result.losses.append(value)
        if not math.isfinite(value):
            result.diverged = True
            return result
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    result.accuracy = accuracy(model, data.x_test, data.y_test)
    if result.accuracy != result.accuracy:  # finite loss, yet the weights blew up at the last step
        result.diverged = True
    return result


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_stats: bool = False,
             batch: int | None = None) -> float:
    """Test accuracy.  ``batch_stats=False``: eval mode (batch norm uses its running
    averages).  ``batch_stats=True``: train mode on a copy, so the batch norms use the
    statistics of each test batch of ``batch`` rows and the model's running averages stay
    as they are; nan if the outputs are not finite."""
    if batch_stats:
        model = copy.deepcopy(model).train()
    else:
        model.eval()
    batch = batch or x.shape[0]
    if batch_stats and (batch == 1 or x.shape[0] % batch == 1):
        raise ValueError(f"a test batch of one row has no batch statistics ({x.shape[0]} rows, batch {batch})")
    correct = 0
    for start in range(0, x.shape[0], batch):
        logits = model(x[start:start + batch])
        if not torch.isfinite(logits).all():
            return float("nan")
        correct += int((logits.argmax(dim=1) == y[start:start + batch]).sum())
    return correct / x.shape[0]
