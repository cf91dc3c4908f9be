"""The demo's markdown report and its JSON twin: the numbers, and whether each claim held.

The verdicts are computed from the numbers with the rule stated next to them; nothing is
tuned until a claim holds.
"""
from __future__ import annotations

import json
import platform

import torch

from .experiments import IdentityCheck, Sweep, TestTime, depth_lr
from .figures import NORM_TITLES
from .settings import LR_STEP_DECADES


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pct(v: float) -> str:
    return "diverged" if v != v else f"{100 * v:.1f}%"


def _band(lrs: list, grid: tuple) -> str:
    """``lo .. hi``; a ``<=`` / ``>=`` where the band reaches the grid's end (it may go on)."""
    if not lrs:
        return "none"
    lo = f"<= {min(lrs):g}" if min(lrs) == min(grid) else f"{min(lrs):g}"
    hi = f">= {max(lrs):g}" if max(lrs) == max(grid) else f"{max(lrs):g}"
    return f"{lo} .. {hi}"


def widths(sweep: Sweep) -> dict:
    """(init, depth) -> {norm: width in decades}."""
    s = sweep.settings
    return {(init, d): {n: sweep.width_decades(n, init, d) for n in sweep.norms} for init in s.inits for d in s.depths}


def summary_lines(sweep: Sweep, ident: IdentityCheck, sig: list, tt: TestTime) -> list:
    """The few lines the command prints: the band widths and the headline numbers."""
    lines = ["learning-rate band that trains (decades of the grid; none / BN on z / BN on a):"]
    for (init, d), w in widths(sweep).items():
        lines.append(f"  init {init:5s} depth {d:2d}: " + " / ".join(f"{w[n]:.1f}" for n in sweep.norms))
    lines.append(f"identity (gamma = sqrt(var + eps), beta = mean): max|y - x| = {ident.max_abs:.3g} "
                 f"= {ident.error_units:.2f} eps x max|x| (bound {ident.bound_units:.2f}): "
                 f"{'within' if ident.passed else 'OUTSIDE'} the bound")
    lines.append("test time: eval mode " + _pct(tt.eval_accuracy) + "; batch statistics "
                 + ", ".join(f"batch {b}: {_pct(a)}" for b, a in tt.batch_stat_accuracy.items()))
    lines += [v.replace("**", "") for v in verdicts(sweep, ident, sig, tt)]
    return lines


def to_json(sweep: Sweep, ident: IdentityCheck, sig: list, tt: TestTime) -> dict:
    """Every number of the report (no timings), for checking that a rerun gives the same."""
    s = sweep.settings

    def nan_none(v):
        return None if v != v else v

    return {
        "settings": s.describe(),
        "sweep": [{"norm": n, "init": i, "depth": d, "lr": lr, "accuracy": nan_none(r.accuracy),
                   "diverged": r.diverged, "final_loss": nan_none(r.losses[-1]) if r.losses else None}
                  for (n, i, d, lr), r in sweep.runs.items()],
        "widths_decades": [{"init": i, "depth": d, **w} for (i, d), w in widths(sweep).items()],
        "identity": {"max_abs": ident.max_abs, "error_units": ident.error_units, "bound_units": ident.bound_units},
        "sigmoid": [{"affine": r.affine, "accuracy": nan_none(r.result.accuracy),
                     "saturated": [r.saturated(k) for k in range(len(r.z))]} for r in sig],
        "test_time": {"eval": nan_none(tt.eval_accuracy),
                      "batch_stats": {str(b): nan_none(a) for b, a in tt.batch_stat_accuracy.items()}},
    }


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _total_width(sweep: Sweep, norm: str) -> float:
    s = sweep.settings
    return sum(sweep.width_decades(norm, i, d) for i in s.inits for d in s.depths)


def saturating_layers(sig: list) -> list:
    """Layers (0-based) where learned gamma/beta at least doubled the fraction of sigmoid
    inputs outside the linear middle, against gamma = 1, beta = 0."""
    learned, fixed = sig
    return [k for k in range(len(learned.z)) if learned.saturated(k) >= 2 * max(fixed.saturated(k), 1e-12)]


def verdicts(sweep: Sweep, ident: IdentityCheck, sig: list, tt: TestTime) -> list:
    """One line per claim, each computed from the numbers by the rule it states."""
    s = sweep.settings
    cells = [(i, d) for i in s.inits for d in s.depths]
    wider = sum(sweep.width_decades("before", i, d) > sweep.width_decades("none", i, d) for i, d in cells)
    deep = max(s.depths)
    gains = {i: sweep.best("before", i, deep)[1] - sweep.best("none", i, deep)[1] for i in s.inits}
    lines = [
        f"**Learning-rate range** — {'holds' if wider == len(cells) else 'does not hold everywhere'}: the band "
        f"of rates that trains is wider with batch norm on z in {wider} of {len(cells)} (init, depth) cells "
        f"({_total_width(sweep, 'before'):.1f} against {_total_width(sweep, 'none'):.1f} decades in total).",
        f"**Depth** — {'holds' if all(g > 0 for g in gains.values()) else 'does not hold everywhere'}: at "
        f"{deep} hidden layers the best accuracy with batch norm minus without is "
        + ", ".join(f"{100 * g:+.1f} points ({i} init)" for i, g in gains.items()) + ".",
    ]
    if "after" in sweep.norms:
        z_w, a_w = _total_width(sweep, "before"), _total_width(sweep, "after")
        lines.append(f"**z or a** — normalizing z: {z_w:.1f} decades, normalizing a: {a_w:.1f} decades in "
                     f"total; " + ("the same." if z_w == a_w else f"normalizing {'z' if z_w > a_w else 'a'} "
                                   f"trains over the wider band here."))
    moved = saturating_layers(sig)
    lines += [
        f"**gamma, beta** — the identity {'holds' if ident.passed else '**fails**'}: max|y - x| = "
        f"{ident.error_units:.2f} fp32 eps x max|x| (bound {ident.bound_units:.2f}); learned gamma/beta moved "
        f"the sigmoid inputs out of the linear middle (at least twice the fraction) in {len(moved)} of "
        f"{len(sig[0].z)} layers.",
    ]
    small = min(tt.batch_stat_accuracy)
    lines.append(f"**Test time** — running averages: {_pct(tt.eval_accuracy)}; batch statistics of {small} "
                 f"samples: {_pct(tt.batch_stat_accuracy[small])}"
                 + (" (the running averages are needed)." if tt.eval_accuracy > tt.batch_stat_accuracy[small]
                    else " (no loss from small test batches here)."))
    return lines


def markdown(sweep: Sweep, ident: IdentityCheck, sig: list, tt: TestTime, *, header: dict,
             figures: dict) -> str:
    s = sweep.settings
    out = ["# What batch norm buys: the lecture's claims, run with bntriton's layers", ""]
    out += [f"- **{k}**: {v}" for k, v in header.items()]
    out += [f"- **data**: {s.classes} classes labelled by a random tanh teacher network on {s.features} Gaussian "
            f"features; {s.train_size} training and {s.test_size} test samples, generated from seed {s.seed}",
            f"- **training**: plain SGD (no momentum), batch {s.batch}, {s.steps} steps, cross-entropy; MLPs of "
            f"width {s.width}; every batch norm is `bntriton.BatchNorm1d`",
            "- **initializations**: `he` = N(0, 2/fan_in) (variance-preserving for ReLU), `small` = N(0, 0.01^2)",
            ""]
    if not figures:
        out += ["*Figures were not drawn: matplotlib is not installed (`pip install -e '.[demo]'`).*", ""]
    out += ["## The claims at a glance", ""] + [f"{k}. {v}" for k, v in
                                                enumerate(verdicts(sweep, ident, sig, tt), 1)] + [""]

    # 1
    out += ["## 1. Learning-rate range", "",
            f"ReLU MLPs of {', '.join(map(str, s.depths))} hidden layers, trained at each learning rate of a "
            f"half-decade grid ({', '.join(f'{lr:g}' for lr in s.lrs)}) with each initialization. A run "
            f"*trains* if its final test accuracy reaches {s.trains_fraction:g} x the best accuracy any run of "
            f"the same depth reached; the band's width is the number of grid rates that train x "
            f"{LR_STEP_DECADES} decades (a band that reaches an end of the grid may extend beyond it, '<=' / '>=').", ""]
    if "lr_sweep" in figures:
        out += [f"![learning-rate sweep]({figures['lr_sweep']})", ""]
    head = "| init | depth | threshold | " + " | ".join(f"{NORM_TITLES[n]}: band (width)" for n in sweep.norms) + " |"
    out += [head, "|" + "---|" * (3 + len(sweep.norms))]
    held, total = 0, 0
    for init in s.inits:
        for d in s.depths:
            cells = [f"{_band(sweep.band(n, init, d), s.lrs)} ({sweep.width_decades(n, init, d):.1f})" for n in sweep.norms]
            out.append(f"| {init} | {d} | {_pct(sweep.threshold(d))} | " + " | ".join(cells) + " |")
            total += 1
            held += sweep.width_decades("before", init, d) > sweep.width_decades("none", init, d)
    out += ["", f"**Claim (a wider band of learning rates trains with batch norm):** the band with batch norm "
            f"on z is wider than without in {held} of {total} (init, depth) cells"
            + (" — the claim holds on this data." if held == total else
               " — the claim does **not** hold everywhere on this data (see the table)."), ""]

    # 2
    depth = max(s.depths)
    out += ["## 2. Depth", "",
            f"Loss curves of the deepest net ({depth} hidden layers) with and without batch norm at a common "
            f"learning rate: the rate at which the net without batch norm did best (its own best case), or, "
            f"where it learned nothing at any rate, the batch-norm net's best rate.", ""]
    if "depth_curves" in figures:
        out += [f"![depth]({figures['depth_curves']})", ""]
    out += ["| init | lr | " + " | ".join(f"{NORM_TITLES[n]}: final loss, test accuracy" for n in ("none", "before"))
            + " |", "|---|---|---|---|"]
    for init in s.inits:
        lr = depth_lr(sweep, init)
        cells = []
        for n in ("none", "before"):
            r = sweep.runs[n, init, depth, lr]
            cells.append(f"{r.losses[-1]:.3f}, {_pct(r.accuracy)}" if not r.diverged else "diverged")
        out.append(f"| {init} | {lr:g} | " + " | ".join(cells) + " |")
    out += ["", "Best test accuracy over the learning-rate grid, by depth (from the sweep):", "",
            "| init | " + " | ".join(f"{d} layers: none / BN on z" for d in s.depths) + " |",
            "|" + "---|" * (1 + len(s.depths))]
    for init in s.inits:
        out.append(f"| {init} | " + " | ".join(
            f"{_pct(sweep.best('none', init, d)[1])} / {_pct(sweep.best('before', init, d)[1])}" for d in s.depths)
            + " |")
    out.append("")

    # 3
    if "after" in sweep.norms:
        out += ["## 3. Normalize z or a?", "",
                "The same sweep with batch norm after the activation (normalizing a) instead of before it "
                "(normalizing z), summed over depths and initializations:", ""]
        parts = []
        for n in sweep.norms:
            total_w = sum(sweep.width_decades(n, i, d) for i in s.inits for d in s.depths)
            best = max((sweep.best(n, i, d)[1] for i in s.inits for d in s.depths), default=float("nan"))
            parts.append(f"{NORM_TITLES[n]}: {total_w:.1f} decades, best {_pct(best)}")
        out += ["**" + "; ".join(parts) + ".**", ""]
        z_w = sum(sweep.width_decades("before", i, d) for i in s.inits for d in s.depths)
        a_w = sum(sweep.width_decades("after", i, d) for i in s.inits for d in s.depths)
        which = ("the same total width" if z_w == a_w else
                 f"a wider total band when normalizing {'z' if z_w > a_w else 'a'}")
        n_w = sum(sweep.width_decades("none", i, d) for i in s.inits for d in s.depths) \
            if "none" in sweep.norms else float("nan")
        wider = [name for name, w in (("z", z_w), ("a", a_w)) if w > n_w]
        vs_none = {2: "Both placements train", 1: f"Only normalizing {''.join(wider)} trains",
                   0: "Neither placement trains"}[len(wider)]
        out += [f"{vs_none} over a wider total band than no batch norm; the sweep gives {which}. "
                f"(Normalizing z is the usual default, not a claim that it always trains better.)", ""]

    # 4
    out += ["## 4. gamma and beta", "",
            f"With gamma = sqrt(var + eps) and beta = mean (the batch's own statistics, exact and rounded to "
            f"fp32), a training-mode `bntriton.BatchNorm1d` is the identity: on {ident.rows} x {ident.channels} "
            f"random values with per-channel offsets and scales, max|y - x| = {ident.max_abs:.3g}, that is "
            f"{ident.error_units:.2f} fp32 eps x max|x| (bound `bounds.identity_units`: "
            f"{ident.bound_units:.2f}; {'within' if ident.passed else '**outside**'} it).", "",
            f"A sigmoid net ({s.sigmoid_depth} hidden layers, batch norm before each sigmoid, lr {s.sigmoid_lr:g}) "
            f"trained with gamma/beta learned and with them fixed at 1/0. The table gives the fraction of the "
            f"sigmoid inputs on the test set with |z~| > 2, outside the sigmoid's near-linear middle.", ""]
    if "sigmoid" in figures:
        out += [f"![sigmoid inputs]({figures['sigmoid']})", ""]
    out += ["| gamma, beta | test accuracy | " + " | ".join(f"layer {k + 1}: \\|z~\\| > 2" for k in range(len(sig[0].z)))
            + " | mean gamma per layer |", "|" + "---|" * (3 + len(sig[0].z))]
    for r in sig:
        gam = "–" if r.gamma[0] is None else ", ".join(f"{g.mean():.2f}" for g in r.gamma)
        out.append(f"| {'learned' if r.affine else 'fixed 1, 0'} | {_pct(r.result.accuracy)} | "
                   + " | ".join(f"{100 * r.saturated(k):.1f}%" for k in range(len(r.z))) + f" | {gam} |")
    moved = saturating_layers(sig)
    out += ["", f"Learned gamma/beta at least doubled the fraction of sigmoid inputs outside the linear middle "
            f"in {len(moved)} of {len(sig[0].z)} layers"
            + (f" (layer {', '.join(str(k + 1) for k in moved)})" if moved else "")
            + ": with gamma = 1, beta = 0 the inputs stay where the normalization puts them, mostly inside "
              f"|z~| < 2; with gamma/beta learned, {len(moved)} of {len(sig[0].z)} layers used that freedom "
              f"to move them out of the sigmoid's linear regime in {s.steps} steps on this data.", ""]

    # 5
    out += ["## 5. Test time", "",
            f"One batch-norm net ({s.test_time_depth} hidden layers, lr {s.test_time_lr:g}), evaluated with its "
            f"running averages (eval mode) and in training mode with the statistics of each test batch.", ""]
    if "test_time" in figures:
        out += [f"![test time]({figures['test_time']})", ""]
    out += ["| statistics | test accuracy |", "|---|---|", f"| running averages (eval mode) | {_pct(tt.eval_accuracy)} |"]
    out += [f"| batch statistics, test batches of {b} | {_pct(a)} |" for b, a in tt.batch_stat_accuracy.items()]
    small = min(tt.batch_stat_accuracy)
    drop = tt.eval_accuracy - tt.batch_stat_accuracy[small]
    out += ["", f"Batch statistics of {small} samples cost {100 * drop:.1f} points of accuracy against the "
            f"running averages, and they make a sample's prediction depend on the other samples in its batch: "
            f"what the running averages are for.", ""]

    out += ["## How far these numbers go", "",
            f"- Short training: {s.steps} steps of plain SGD on one synthetic task, one seed. The accuracies are "
            f"those of brief training, not converged results; another `--seed` moves individual cells.",
            f"- \"Trains\" is a relative rule ({s.trains_fraction:g} x the best run of the same depth), counted on a "
            f"half-decade grid: band widths come in steps of {LR_STEP_DECADES} decades and their edges are known "
            f"only to the grid's resolution.",
            "- A net that learned nothing predicts one class everywhere: read the heatmap against the floor "
            "given at the top.",
            "- The verdicts above are computed from these numbers by the rules stated with them. The task's "
            "size and the learning-rate grid were chosen so that the task is learnable well above the floor and "
            "the grid reaches divergence, not for the verdicts.", ""]
    return "\n".join(out)


def write_markdown(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
