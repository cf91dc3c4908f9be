"""The results CSV's schema and the names it uses: shared by the sweep (writer), the
summary and the plot (readers).  Kept free of torch so that the readers run anywhere."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Iterable, List

COLUMNS = ("device", "torch", "triton", "suite", "shape", "layout", "dtype",
           "pass", "provider", "ms", "bytes", "gbps", "pct_copy_bw")

SUITES = ("resnet50", "mlp", "video3d", "small_batch")
PASSES = ("fwd_train", "bwd_train", "fwd_eval")
PROVIDERS = ("bntriton", "torch", "torch_compile", "flag_gems")
REFERENCE = "bntriton"  # the provider every speedup is computed for

# The copy that measures bandwidth is stored as rows of its own: suite and pass "copy".
COPY = "copy"

# ``ms`` holds a number, or one of these words when no time was taken.
FAILED = "fail"    # the correctness check disagreed with torch beyond the bound
ERROR = "error"    # the provider raised (unsupported input, out of memory, ...)


def read_rows(paths: Iterable[Path]) -> List[Dict[str, str]]:
    rows: List[Dict[str, str]] = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ValueError(f"{path}: columns {reader.fieldnames} are not {list(COLUMNS)}")
            rows.extend(reader)
    return rows


def ms_value(row: Dict[str, str]):
    """The row's time as a float, or None for a failure or error row."""
    try:
        return float(row["ms"])
    except ValueError:
        return None


def ordered(values: Iterable[str], order: Iterable[str]) -> List[str]:
    """The distinct ``values``: those named in ``order`` first, in that order, then the rest sorted."""
    present = set(values)
    known = [v for v in order if v in present]
    return known + sorted(present - set(known))
