"""The five experiments.  Each returns plain numbers (and curves); figures.py draws them and
report.py writes them down.  Nothing here asserts a claim: the report says whether it held."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..nn.modules import BatchNorm1d
from ..verification.bounds import EPS, identity_units
from .data import Dataset
from .models import batch_norms, mlp
from .settings import LR_STEP_DECADES, Settings
from .training import RunResult, accuracy, train


def _model_seed(s: Settings, depth: int) -> int:
    # Nets of one depth share their Linear weights' random draws across norms and inits
    # (the inits differ only in scale): the comparisons are then about batch norm alone.
    return s.seed * 1000 + depth


# ------------------------------------------------------------------ 1-3: the learning-rate sweep


@dataclass
class Sweep:
    """Every (norm, init, depth, lr) run of the sweep."""

    settings: Settings
    runs: dict = field(default_factory=dict)  # (norm, init, depth, lr) -> RunResult

    @property
    def norms(self) -> list:
        return sorted({k[0] for k in self.runs}, key=("none", "before", "after").index)

    def accuracy_grid(self, norm: str, init: str) -> np.ndarray:
        """depth x lr; nan where the run diverged."""
        s = self.settings
        return np.array([[self.runs[norm, init, d, lr].accuracy for lr in s.lrs] for d in s.depths])

    def threshold(self, depth: int) -> float:
        """A run "trains" if its test accuracy reaches ``trains_fraction`` of the best any
        run of the same depth reached (any norm, init and learning rate)."""
        best = max((r.accuracy for (_, _, d, _), r in self.runs.items() if d == depth and not r.diverged),
                   default=float("nan"))
        return self.settings.trains_fraction * best

    def band(self, norm: str, init: str, depth: int) -> list:
        """The learning rates at which this net trains."""
        t = self.threshold(depth)
        return [lr for lr in self.settings.lrs
                if not self.runs[norm, init, depth, lr].diverged and self.runs[norm, init, depth, lr].accuracy >= t]

    def width_decades(self, norm: str, init: str, depth: int) -> float:
        """How many decades of the log grid train: grid points that train x the grid step."""
        return len(self.band(norm, init, depth)) * LR_STEP_DECADES

    def best(self, norm: str, init: str, depth: int) -> tuple:
        """(lr, accuracy) of the best run; the smaller lr on a tie."""
        cands = [(r.accuracy, -lr, lr) for (n, i, d, lr), r in self.runs.items()
                 if (n, i, d) == (norm, init, depth) and not r.diverged]
        if not cands:
            return (float("nan"), float("nan"))
        acc, _, lr = max(cands)
        return lr, acc


def lr_sweep(data: Dataset, s: Settings, norms=("none", "before", "after"), tick=None) -> Sweep:
    """Train every (norm, init, depth, lr) net of the grid."""
    sweep = Sweep(s)
    for norm in norms:
        for init in s.inits:
            for depth in s.depths:
                for lr in s.lrs:
                    model = mlp(s.features, s.width, depth, s.classes, norm=norm, init=init,
                                seed=_model_seed(s, depth))
                    sweep.runs[norm, init, depth, lr] = train(model, data, lr, s.steps, s.batch, s.seed)
                    if tick:
                        tick(f"{norm} {init} depth {depth} lr {lr:g}")
    return sweep


def depth_lr(sweep: Sweep, init: str) -> float:
    """The common learning rate of the depth comparison: the one at which the deepest net
    *without* batch norm did best (the plain net at its own best rate); if that net learned
    nothing anywhere (every rate gave the same accuracy, or diverged), the batch-norm net's
    best rate instead, since "best" would then only be a tie-break."""
    depth = max(sweep.settings.depths)
    plain = {r.accuracy for (n, i, d, _), r in sweep.runs.items()
             if (n, i, d) == ("none", init, depth) and not r.diverged}
    if len(plain) > 1:
        return sweep.best("none", init, depth)[0]
    return sweep.best("before", init, depth)[0]


# ------------------------------------------------------------------ 4: gamma and beta


@dataclass
class IdentityCheck:
    rows: int
    channels: int
    max_abs: float      # max |y - x|
    max_x: float        # max |x|
    error_units: float  # max |y - x| / max |x|, in units of fp32 eps
    bound_units: float  # bounds.identity_units(float32, rows)

    @property
    def passed(self) -> bool:
        return self.error_units <= self.bound_units


def identity_check(s: Settings, device: torch.device) -> IdentityCheck:
    """gamma = sqrt(var + eps), beta = mean (the batch's own statistics, computed in float64
    and rounded to fp32) make a training-mode batch norm the identity, up to rounding.

    Fresh random data with a per-channel offset and scale, never zeros."""
    g = torch.Generator().manual_seed(s.seed + 4)
    offset = 4.0 * torch.randn(s.identity_channels, generator=g, dtype=torch.float64)
    scale = torch.exp(torch.randn(s.identity_channels, generator=g, dtype=torch.float64))
    x = (torch.randn(s.identity_rows, s.identity_channels, generator=g, dtype=torch.float64) * scale
         + offset).to(torch.float32)
    x64 = x.to(torch.float64)
    bn = BatchNorm1d(s.identity_channels).to(device).train()
    mean, var = x64.mean(dim=0), x64.var(dim=0, unbiased=False)
    with torch.no_grad():
        bn.weight.copy_(torch.sqrt(var + bn.eps).to(torch.float32))
        bn.bias.copy_(mean.to(torch.float32))
        y = bn(x.to(device)).cpu().to(torch.float64)
    max_abs = float((y - x64).abs().max())
    max_x = float(x64.abs().max())
    return IdentityCheck(s.identity_rows, s.identity_channels, max_abs, max_x,
                         max_abs / max_x / EPS[torch.float32],
                         identity_units(torch.float32, s.identity_rows))


@dataclass
class SigmoidRun:
    affine: bool
    result: RunResult
    z: list              # per hidden layer: the batch-norm outputs (sigmoid inputs) on the test set
    gamma: list          # per hidden layer: learned gamma (None without affine)
    beta: list

    def saturated(self, layer: int, cut: float = 2.0) -> float:
        """Fraction of the layer's sigmoid inputs with |z| > cut: outside the near-linear
        middle of the sigmoid (its slope at 2 is 0.10, against 0.25 at 0)."""
        return float((np.abs(self.z[layer]) > cut).mean())


def sigmoid_gamma_beta(data: Dataset, s: Settings, tick=None) -> list:
    """A sigmoid net with batch norm before each sigmoid, trained with gamma/beta learned
    and with them fixed at 1/0: where do the sigmoid inputs end up?"""
    out = []
    for affine in (True, False):
        model = mlp(s.features, s.width, s.sigmoid_depth, s.classes, norm="before", activation="sigmoid",
                    init="he", affine=affine, seed=_model_seed(s, s.sigmoid_depth))
        result = train(model, data, s.sigmoid_lr, s.steps, s.batch, s.seed)
        bns = batch_norms(model)
        captured: list = [None] * len(bns)
        hooks = [bn.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.detach().cpu()))
                 for k, bn in enumerate(bns)]
        accuracy(model, data.x_test, data.y_test)
        for h in hooks:
            h.remove()
        out.append(SigmoidRun(
            affine, result, [c.numpy() for c in captured],
            [bn.weight.detach().cpu().numpy() if affine else None for bn in bns],
            [bn.bias.detach().cpu().numpy() if affine else None for bn in bns]))
        if tick:
            tick(f"sigmoid net, gamma/beta {'learned' if affine else 'fixed'}")
    return out


# ------------------------------------------------------------------ 5: test time


@dataclass
class TestTime:
    result: RunResult
    eval_accuracy: float                       # running averages
    batch_stat_accuracy: dict                  # test batch size -> accuracy with batch statistics


def test_time(data: Dataset, s: Settings, tick=None) -> TestTime:
    """One batch-norm net, evaluated with its running averages and with the statistics of
    test batches of decreasing size."""
    model = mlp(s.features, s.width, s.test_time_depth, s.classes, norm="before", init="he",
                seed=_model_seed(s, s.test_time_depth))
    result = train(model, data, s.test_time_lr, s.steps, s.batch, s.seed)
    n = data.x_test.shape[0]
    sizes = [b for b in (n, 64, 8, 2) if b <= n and n % b == 0]
    batch_acc = {b: accuracy(model, data.x_test, data.y_test, batch_stats=True, batch=b) for b in sizes}
    ev = accuracy(model, data.x_test, data.y_test)
    if tick:
        tick("test-time statistics")
    return TestTime(result, ev, batch_acc)


def runs_total(s: Settings, norms=("none", "before", "after")) -> int:
    """Training runs the whole demo makes (for the progress bar)."""
    return len(norms) * len(s.inits) * len(s.depths) * len(s.lrs) + 2 + 1
