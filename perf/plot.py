"""Results CSV -> PNG: one panel per (suite, pass), one column per provider; the bar is the
median pct_copy_bw over the suite's cases and the dots are the cases themselves, so a
provider that is fast on average but slow on some shapes shows it.

    python perf/plot.py perf/results/NVIDIA-H100-80GB-HBM3-2026-11-25.csv [--out file.png]

matplotlib is optional (``pip install -e '.[perf]'``): without it this prints why and
exits 0, so the sweep never fails for want of a plot.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from schema import COPY, PASSES, PROVIDERS, SUITES, ms_value, ordered, read_rows  # noqa: E402


def plot(csv_paths: Sequence[Path], png_path: Path) -> Optional[Path]:
    """Write the PNG and return its path; None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: the GPU machine has no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed; skipping the PNG (pip install matplotlib)", file=sys.stderr)
        return None

    rows = [r for r in read_rows(csv_paths) if r["suite"] != COPY and ms_value(r) is not None]
    if not rows:
        print("plot: no timed rows; skipping the PNG", file=sys.stderr)
        return None
    suites = ordered((r["suite"] for r in rows), SUITES)
    passes = ordered((r["pass"] for r in rows), PASSES)
    providers = ordered((r["provider"] for r in rows), PROVIDERS)
    colors = {p: f"C{i}" for i, p in enumerate(providers)}

    fig, axes = plt.subplots(len(suites), len(passes), squeeze=False, sharey=True,
                             figsize=(4.2 * len(passes), 3.0 * len(suites)))
    for i, suite in enumerate(suites):
        for j, pass_ in enumerate(passes):
            ax = axes[i][j]
            for k, provider in enumerate(providers):
                # One value per case: a provider timed twice (bntriton) is averaged.
                per_case = {}
                for r in rows:
                    if (r["suite"], r["pass"], r["provider"]) == (suite, pass_, provider):
                        per_case.setdefault((r["shape"], r["layout"], r["dtype"]), []).append(float(r["pct_copy_bw"]))
                values = [statistics.fmean(v) for v in per_case.values()]
                if not values:
                    continue
                ax.bar(k, statistics.median(values), color=colors[provider], alpha=0.45, width=0.7)
                offsets = [(n - (len(values) - 1) / 2) * 0.5 / max(len(values), 1) for n in range(len(values))]
                ax.scatter([k + o for o in offsets], values, color=colors[provider], s=9, zorder=3)
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")  # the copy's bandwidth
            ax.set_xticks(range(len(providers)))
            ax.set_xticklabels(providers, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{suite} / {pass_}", fontsize=9)
            if j == 0:
                ax.set_ylabel("floor bytes / time / copy BW")
    device = rows[0]["device"]
    fig.suptitle(f"{device}: fraction of copy bandwidth (bar: median over cases, dots: cases)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path, help="results CSV(s) written by sweep.py")
    parser.add_argument("--out", type=Path, help="PNG path; default: the first CSV's name with .png")
    args = parser.parse_args(argv)
    written = plot(args.csv, args.out or args.csv[0].with_suffix(".png"))
    if written:
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
