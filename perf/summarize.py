"""Results CSV -> markdown summary.  Used by sweep.py; also on its own, to regenerate the
summary of a committed CSV on any machine (no torch, no GPU):

    python perf/summarize.py perf/results/NVIDIA-H100-80GB-HBM3-2026-11-25.csv

The run notes (skipped providers, failures and their errors) come from the ``<stem>.notes``
file the sweep writes beside its CSV.  Several CSVs (say, a sweep split over two device
calls) are summarized together when given together; ``--merge-into X.csv`` first joins
them into one CSV (and ``X.notes``) and summarizes that.  The markdown goes beside the
(first) CSV unless ``--out`` says otherwise.

Reading the numbers: *speedup* is another provider's time over bntriton's (> 1: bntriton
is faster).  *pct_copy_bw* is the pass's floor bytes over its time, as a fraction of the
copy bandwidth measured in the same run.  *Noise* is the spread of bntriton timed twice
in the same run, |t1 - t2| / mean: speedups within it are not differences.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from schema import COLUMNS, COPY, PASSES, PROVIDERS, REFERENCE, SUITES, ms_value, ordered, read_rows  # noqa: E402

Key = Tuple[str, str, str, str]  # shape, layout, dtype, pass


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _speedup(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def _geomean(values: Sequence[float]) -> Optional[float]:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


class Table:
    """The measurements of one suite, indexed by case and pass, then provider."""

    def __init__(self, rows: List[Dict[str, str]]):
        self.times: Dict[Key, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
        self.pct: Dict[Key, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
        self.status: Dict[Key, Dict[str, str]] = defaultdict(dict)  # fail / error, when no time
        self.floor: Dict[Key, int] = {}
        for row in rows:
            key = (row["shape"], row["layout"], row["dtype"], row["pass"])
            self.floor[key] = int(row["bytes"])
            ms = ms_value(row)
            if ms is None:
                self.status[key][row["provider"]] = row["ms"]
                continue
            self.times[key][row["provider"]].append(ms)
            self.pct[key][row["provider"]].append(float(row["pct_copy_bw"]))

    def keys(self, pass_: str) -> List[Key]:
        return [k for k in self.floor if k[3] == pass_]

    def ms(self, key: Key, provider: str) -> Optional[float]:
        """Mean of the provider's times for this case (bntriton's two runs are averaged)."""
        times = self.times[key].get(provider)
        return statistics.fmean(times) if times else None

    def pct_copy(self, key: Key, provider: str) -> Optional[float]:
        values = self.pct[key].get(provider)
        return statistics.fmean(values) if values else None

    def cell(self, key: Key, provider: str) -> str:
        ms = self.ms(key, provider)
        return _ms(ms) if ms is not None else self.status[key].get(provider, "-")

    def noise(self, key: Key) -> Optional[float]:
        times = self.times[key].get(REFERENCE, [])
        if len(times) < 2:
            return None
        return (max(times) - min(times)) / statistics.fmean(times)

    def best_other(self, key: Key, others: Sequence[str]) -> Tuple[Optional[float], str]:
        timed = [(self.ms(key, p), p) for p in others if self.ms(key, p) is not None]
        return min(timed) if timed else (None, "")


def _overview(tables: Dict[str, Table], passes: List[str], providers: List[str]) -> List[str]:
    others = [p for p in providers if p != REFERENCE]
    header = (["suite", "pass", "cases"] + [f"{p} %copy (median)" for p in providers]
              + [f"speedup vs {p} (geomean)" for p in others]
              + ["min speedup vs best other (case)", "noise: median / max"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for suite, table in tables.items():
        for pass_ in passes:
            keys = table.keys(pass_)
            if not keys:
                continue
            cells = [suite, pass_, str(len(keys))]
            for p in providers:
                cells.append(_pct(_median([v for k in keys if (v := table.pct_copy(k, p)) is not None])))
            for p in others:
                ratios = [table.ms(k, p) / table.ms(k, REFERENCE) for k in keys
                          if table.ms(k, p) is not None and table.ms(k, REFERENCE) is not None]
                cells.append(_speedup(_geomean(ratios)))
            worst: Optional[Tuple[float, Key, str]] = None
            for k in keys:
                best, who = table.best_other(k, others)
                mine = table.ms(k, REFERENCE)
                if best is not None and mine is not None:
                    ratio = best / mine
                    if worst is None or ratio < worst[0]:
                        worst = (ratio, k, who)
            cells.append("-" if worst is None else
                         f"{_speedup(worst[0])} vs {worst[2]} ({worst[1][0]} {worst[1][1]} {worst[1][2]})")
            noise = [v for k in keys if (v := table.noise(k)) is not None]
            cells.append(f"{_pct(_median(noise))} / {_pct(max(noise))}" if noise else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _details(suite: str, table: Table, passes: List[str], providers: List[str]) -> List[str]:
    others = [p for p in providers if p != REFERENCE]
    header = (["shape", "layout", "dtype", "pass", "floor MB"] + [f"{p} ms" for p in providers]
              + [f"{REFERENCE} %copy", "speedup vs best other"])
    lines = [f"## {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pass_ in passes:
        for key in table.keys(pass_):
            best, who = table.best_other(key, others)
            mine = table.ms(key, REFERENCE)
            speedup = f"{_speedup(best / mine)} ({who})" if best is not None and mine is not None else "-"
            cells = [*key, f"{table.floor[key] / 1e6:.4g}"] + [table.cell(key, p) for p in providers]
            cells += [_pct(table.pct_copy(key, REFERENCE)), speedup]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def summarize(rows: List[Dict[str, str]], sources: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    copies = [r for r in rows if r["suite"] == COPY]
    data = [r for r in rows if r["suite"] != COPY]
    first = (rows or [{}])[0]
    devices = ordered((r["device"] for r in rows), ())
    out = [f"# Batch-norm sweep: {', '.join(devices) or 'no rows'}", ""]
    out.append(f"torch {first.get('torch', '?')}, triton {first.get('triton', '?')}"
               + (f"; from {', '.join(sources)}" if sources else "") + f"; {len(data)} timings.")
    out.append("")
    if any(d.startswith("cpu") for d in devices):
        out += ["> **CPU smoke run** through Triton's interpreter, timed with a wall clock: a test of",
                "> the tooling only. These numbers are not performance and must never be reported as such.", ""]
    if copies:
        bw = ", ".join(f"{float(r['gbps']):.0f} GB/s" for r in copies)
        out += [f"**Copy bandwidth** (device-to-device copy of {int(copies[0]['bytes']) // 2 / 2**20:.0f} MiB, "
                f"bytes read + written, at the start and end of the run): {bw}. "
                "`pct_copy_bw` is against the first.", ""]
    out += ["Speedup = other provider's time / bntriton's time (> 1: bntriton faster). "
            "%copy = floor bytes / time / copy bandwidth. Noise = bntriton timed twice in the run, "
            "|t1 - t2| / mean: differences inside it are not differences.", ""]

    suites = ordered((r["suite"] for r in data), SUITES)
    passes = ordered((r["pass"] for r in data), PASSES)
    providers = ordered((r["provider"] for r in data), PROVIDERS)
    tables = {s: Table([r for r in data if r["suite"] == s]) for s in suites}

    out += ["## Overview", ""] + _overview(tables, passes, providers) + [""]
    for suite, table in tables.items():
        out += _details(suite, table, passes, providers)

    # One line per case, pass and provider (bntriton's two rows of a case say the same).
    problems = list({(r["provider"], r["suite"], r["shape"], r["layout"], r["dtype"], r["pass"]): r
                     for r in data if ms_value(r) is None}.values())
    if problems:
        out += ["## Failures and errors", "",
                "`fail`: the provider disagreed with torch beyond the loose bound (no time taken); "
                "`error`: it raised. The run notes below give the messages.", ""]
        out += [f"- {r['provider']} {r['suite']} {r['shape']} {r['layout']} {r['dtype']} {r['pass']}: {r['ms']}"
                for r in problems] + [""]
    if notes:
        out += ["## Run notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out).rstrip() + "\n"


def read_notes(csv_paths: Sequence[Path]) -> List[str]:
    """The run notes the sweep left beside each CSV (``<stem>.notes``, one per line)."""
    notes: List[str] = []
    names = [Path(p).name for p in csv_paths]
    # Parts of one run often share a name (run1/sweep.csv, run2/sweep.csv): then the path labels them.
    labels = names if len(set(names)) == len(names) else [str(p) for p in csv_paths]
    for path, label in zip(csv_paths, labels):
        sidecar = Path(path).with_suffix(".notes")
        if sidecar.exists():
            prefix = f"{label}: " if len(csv_paths) > 1 else ""
            notes += [prefix + line for line in sidecar.read_text().splitlines() if line.strip()]
    return notes


def measured_cases(csv_paths: Sequence[Path]) -> set:
    """(suite, shape, layout, dtype) of every case these CSVs hold bntriton's last row of
    every pass for (a case whose timing a killed run cut off midway is not counted)."""
    rows = [r for r in read_rows(csv_paths) if r["suite"] != COPY]
    passes = {r["pass"] for r in rows}
    seen: Dict[tuple, List[str]] = defaultdict(list)
    for r in rows:
        if r["provider"] == REFERENCE:
            seen[(r["suite"], r["shape"], r["layout"], r["dtype"])].append(r["pass"])
    # bntriton is timed first and last per pass: two rows each when the case completed.
    return {case for case, got in seen.items() if all(got.count(p) == 2 for p in passes)}


def merge(csv_paths: Sequence[Path], into: Path) -> Path:
    """One CSV (and .notes) from several, e.g. a sweep split over two device calls."""
    rows = read_rows(csv_paths)
    with open(into, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    notes = read_notes(csv_paths)
    if notes:
        into.with_suffix(".notes").write_text("\n".join(notes) + "\n")
    return into


def write_summary(csv_paths: Sequence[Path], md_path: Path, notes: Sequence[str] = ()) -> Path:
    rows = read_rows(csv_paths)
    all_notes = read_notes(csv_paths) + list(notes)
    md_path.write_text(summarize(rows, [Path(p).name for p in csv_paths], all_notes))
    return md_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path, help="results CSV(s) written by sweep.py")
    parser.add_argument("--out", help="markdown path ('-' for stdout); default: the first CSV's name with .md")
    parser.add_argument("--note", action="append", default=[],
                        help="an extra line for the 'Run notes' section (the sweep's own come from <stem>.notes)")
    parser.add_argument("--merge-into", type=Path,
                        help="first write the CSVs (and their .notes) into this one CSV, then summarize it")
    args = parser.parse_args(argv)
    if args.merge_into:
        args.csv = [merge(args.csv, args.merge_into)]
    if args.out == "-":
        print(summarize(read_rows(args.csv), [p.name for p in args.csv], read_notes(args.csv) + args.note))
        return 0
    md = Path(args.out) if args.out else args.csv[0].with_suffix(".md")
    print(write_summary(args.csv, md, args.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
