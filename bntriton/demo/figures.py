"""The demo's PNG figures (matplotlib, an optional extra: ``pip install 'bntriton[demo]'``).

:func:`available` says whether matplotlib imports; each ``draw_*`` writes one file and
returns its name.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from .experiments import Sweep, depth_lr

NORM_TITLES = {"none": "no batch norm", "before": "batch norm on z (before activation)",
               "after": "batch norm on a (after activation)"}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str, name: str) -> str:
    # Fixed metadata: the same run writes the same bytes.
    fig.savefig(os.path.join(out, name), dpi=110, metadata={"Software": None})
    _plt().close(fig)
    return name


def draw_lr_heatmaps(sweep: Sweep, out: str) -> str:
    plt = _plt()
    s = sweep.settings
    norms, inits = sweep.norms, list(s.inits)
    fig, axes = plt.subplots(len(inits), len(norms), squeeze=False, layout="constrained",
                             figsize=(3.9 * len(norms), len(inits) * (0.45 * len(s.depths) + 2.0)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d62728")  # diverged runs in red
    for i, init in enumerate(inits):
        for j, norm in enumerate(norms):
            ax = axes[i][j]
            grid = sweep.accuracy_grid(norm, init)
            ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
            for (r, c), v in np.ndenumerate(grid):
                ax.text(c, r, "div" if v != v else f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v != v or v < 0.6 else "black")
            ax.set_xticks(range(len(s.lrs)), [f"{lr:g}" for lr in s.lrs], rotation=60, fontsize=7)
            ax.set_yticks(range(len(s.depths)), [str(d) for d in s.depths], fontsize=8)
            ax.set_title(f"{NORM_TITLES[norm]}\ninit {init}", fontsize=8)
            if j == 0:
                ax.set_ylabel("hidden layers")
            if i == len(inits) - 1:
                ax.set_xlabel("learning rate (SGD)")
    fig.suptitle("Final test accuracy (%) over the learning-rate sweep; red: diverged", fontsize=9)
    return _save(fig, out, "lr_sweep.png")


def _smooth(values, window: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def draw_depth_curves(sweep: Sweep, out: str) -> str:
    plt = _plt()
    s = sweep.settings
    depth = max(s.depths)
    fig, axes = plt.subplots(1, len(s.inits), squeeze=False, figsize=(4.6 * len(s.inits), 3.4),
                             layout="constrained")
    for ax, init in zip(axes[0], s.inits):
        lr = depth_lr(sweep, init)
        for norm in ("none", "before"):
            run = sweep.runs.get((norm, init, depth, lr))
            if run is None:
                continue
            label = NORM_TITLES[norm] + (" (diverged)" if run.diverged else "")
            ax.plot(_smooth(run.losses), label=label)
        ax.set_title(f"{depth} hidden layers, init {init}, lr {lr:g}", fontsize=9)
        ax.set_xlabel("SGD step")
        ax.set_ylabel("training loss (10-step mean)")
        ax.legend(fontsize=7)
    return _save(fig, out, "depth_curves.png")


def draw_sigmoid_histograms(runs: list, out: str) -> str:
    plt = _plt()
    layers = len(runs[0].z)
    fig, axes = plt.subplots(1, layers, squeeze=False, figsize=(3.0 * layers, 3.0), sharey=True,
                             layout="constrained")
    bins = np.linspace(-8, 8, 81)
    for k, ax in enumerate(axes[0]):
        for run in runs:
            label = "gamma, beta learned" if run.affine else "gamma = 1, beta = 0"
            ax.hist(np.clip(run.z[k].ravel(), -8, 8), bins=bins, density=True, alpha=0.55, label=label)
        ax.axvspan(-2, 2, color="grey", alpha=0.12, lw=0)
        ax.set_title(f"hidden layer {k + 1}", fontsize=9)
        ax.set_xlabel("sigmoid input z~")
    axes[0][0].set_ylabel("density (test set)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Sigmoid inputs after batch norm; shaded: |z~| < 2, the sigmoid's near-linear middle",
                 fontsize=9)
    return _save(fig, out, "sigmoid_histograms.png")


def draw_test_time(tt, out: str) -> str:
    plt = _plt()
    labels = ["eval mode\n(running averages)"] + [f"batch stats\nbatch {b}" for b in tt.batch_stat_accuracy]
    values = [tt.eval_accuracy] + list(tt.batch_stat_accuracy.values())
    fig, ax = plt.subplots(figsize=(1.3 * len(values) + 1, 3.2), layout="constrained")
    ax.bar(range(len(values)), [100 * (v if v == v else 0) for v in values],
           color=["#2ca02c"] + ["#1f77b4"] * (len(values) - 1))
    for i, v in enumerate(values):
        ax.text(i, 100 * (v if v == v else 0) + 1, "nan" if v != v else f"{100 * v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Test-time statistics", fontsize=9)
    return _save(fig, out, "test_time.png")
