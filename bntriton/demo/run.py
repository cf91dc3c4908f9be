"""``bntriton demo``: run the five experiments, write the figures, the report and the JSON.

Usage: ``bntriton demo [--quick] [--device DEVICE] [--out DIR]`` (also ``python -m
bntriton.demo``).  Everything is seeded and runs with deterministic algorithms, so the same
command on the same machine gives the same numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch

from ..provenance import stamp
from . import experiments, figures, report
from .data import teacher_task
from .progress import Progress
from .settings import Settings, preset
from .training import deterministic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the small preset (minutes on a CPU); default: the full preset (3 depths, 4x the "
                        "steps: meant for a GPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="bntriton-demo", help="output directory (default: ./bntriton-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default 0)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")


def run(settings: Settings, out: str, device, *, progress: bool = False, preset_name: str = "custom") -> dict:
    """Run everything into ``out``; returns the JSON report (the numbers, no timings)."""
    from ..kernels.runtime import current_cpu_backend

    device = torch.device(device)
    os.makedirs(out, exist_ok=True)
    tick = Progress(experiments.runs_total(settings)) if progress else None
    load = _load()
    start = time.perf_counter()
    with deterministic(device):
        data = teacher_task(settings.train_size, settings.test_size, settings.features, settings.classes,
                            settings.seed).to(device)
        sweep = experiments.lr_sweep(data, settings, tick=tick)
        ident = experiments.identity_check(settings, device)
        sig = experiments.sigmoid_gamma_beta(data, settings, tick=tick)
        tt = experiments.test_time(data, settings, tick=tick)
    seconds = time.perf_counter() - start

    drawn = {}
    if figures.available():
        drawn = {"lr_sweep": figures.draw_lr_heatmaps(sweep, out),
                 "depth_curves": figures.draw_depth_curves(sweep, out),
                 "sigmoid": figures.draw_sigmoid_histograms(sig, out),
                 "test_time": figures.draw_test_time(tt, out)}
    else:
        print("matplotlib is not installed: writing the report without figures "
              "(pip install -e '.[demo]' for them)", file=sys.stderr)
    backend = "compiled Triton kernels" if device.type == "cuda" else f"CPU backend '{current_cpu_backend()}'"
    header = {
        "command": f"`bntriton demo{' --quick' if preset_name == 'quick' else ''}`"
                   + (f" (preset {preset_name})" if preset_name not in ("quick", "full") else ""),
        "device": f"{report.device_name(device)} ({backend}"
                  + ("; one compute thread)" if device.type == "cpu" else ")"),
        "versions": f"torch {torch.__version__}, triton {_triton_version()}, Python {sys.version.split()[0]}; "
                    + stamp(),
        "wall time": f"{seconds:.0f} s for the training runs" + (f" ({load} at the start)" if load else ""),
        "floor": f"predicting the most frequent class scores {100 * _majority(data.y_test):.1f}% on the test set",
    }
    numbers = report.to_json(sweep, ident, sig, tt)
    report.write_json(os.path.join(out, "results.json"), numbers)
    report.write_markdown(os.path.join(out, "report.md"),
                          report.markdown(sweep, ident, sig, tt, header=header, figures=drawn))
    for line in report.summary_lines(sweep, ident, sig, tt):
        print(line)
    print(f"{seconds:.0f} s; report written to {os.path.join(out, 'report.md')}")
    return numbers


def _majority(labels: torch.Tensor) -> float:
    return float(torch.bincount(labels.cpu()).max()) / labels.numel()


def _load() -> str:
    """The machine's load when the run started: wall times on a shared machine need it."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (OSError, AttributeError):
        return ""


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def command(args, parser: argparse.ArgumentParser) -> int:
    """Run the demo from parsed arguments (shared by ``bntriton demo`` and ``python -m bntriton.demo``)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        parser.error(f"--device {device}: {exc}")
    name = "quick" if args.quick else "full"
    show = sys.stderr.isatty() if args.progress is None else args.progress
    run(preset(name, seed=args.seed), args.out, device, progress=show, preset_name=name)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bntriton.demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return command(parser.parse_args(argv), parser)
