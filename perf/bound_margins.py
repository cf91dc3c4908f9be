"""How close each verified quantity comes to its bound: the data behind the bound table.

Runs ``verify``'s families (every case, or ``--quick``) and prints, per quantity and stored
dtype, the largest error in units of the bound's two parts:

* ``rounding``: the error itself (eps of the stored dtype), for fp16 / bf16 where the final
  rounding dominates;
* ``growth``: ``(error - rounding) / (log2(count) * eps_acc / eps_stored)``, the
  coefficient of the log2(count) term the error implies, for fp32 / fp64.

    PYTHONPATH=$PWD python perf/bound_margins.py [--quick] [--family NAME ...] [--seeds 3]
"""
from __future__ import annotations

import argparse
import math

import torch

import bntriton
from bntriton.verification.bounds import BOUNDS, EPS, accumulator
from bntriton.verification.harness import verify


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--family", action="append")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    worst: dict = {}
    failed = []
    with bntriton.cpu_backend("interpreter"):
        for seed in range(args.seeds):
            report = verify(device=args.device, quick=args.quick, seed=seed, families=args.family,
                            reference=False)
            for result in report.results:
                if not result.passed:
                    failed.append(result)
                case = result.case
                for q, err in result.errors.items():
                    stored = case.param_dtype if q in ("dweight", "dbias") else case.dtype
                    if q.startswith("running"):
                        stored = case.param_dtype or accumulator(case.dtype)
                    if not math.isfinite(err):
                        continue
                    b = BOUNDS[q]
                    depth = math.log2(max(case.count, 2)) * EPS[accumulator(stored)] / EPS[stored]
                    growth = max(err - b.rounding, 0.0) / depth
                    key = (q, str(stored).replace("torch.", ""))
                    w = worst.setdefault(key, dict(err=0.0, growth=0.0, ratio=0.0, case=None))
                    w["err"] = max(w["err"], err)
                    w["growth"] = max(w["growth"], growth)
                    ratio = err / result.bounds[q]
                    if ratio > w["ratio"]:
                        w["ratio"], w["case"] = ratio, case
    print("| quantity | stored | worst error (eps) | implied growth | worst error / bound | family |")
    print("|---|---|---|---|---|---|")
    for (q, stored), w in sorted(worst.items()):
        fam = w["case"].family if w["case"] else "-"
        print(f"| {q} | {stored} | {w['err']:.3g} | {w['growth']:.3g} | {w['ratio']:.2f} | {fam} |")
    for r in failed:
        print("FAILED", r.case, r.failures())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
