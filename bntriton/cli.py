"""The ``bntriton`` command line.

``bntriton verify``   check an implementation against the float64 oracle (exit 0 only if
                      every case passes, 1 if any fails, 2 for a usage error)
``bntriton bounds``   print the error-bound table (markdown)
``bntriton demo``     what batch norm buys, shown with bntriton's layers (figures + report)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence


class ProgressBar:
    """A one-line progress bar on stderr, redrawn in place (so only on a terminal: in a
    log file the carriage returns would pile up into one unreadable line)."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.failed = 0

    def __call__(self, done: int, total: int, result) -> None:
        if result is not None and not result.passed:
            self.failed += 1
        filled = self.width * done // max(total, 1)
        where = "" if result is None else f" {result.case.family}"
        fails = f" {self.failed} failed" if self.failed else ""
        line = (f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
                f" {time.perf_counter() - self.start:5.1f}s{fails}{where}")
        self.stream.write(line.ljust(79)[:79])
        if done == total:
            self.stream.write("\r" + " " * 79 + "\r")  # leave the terminal clean for the table
        self.stream.flush()


def _parser() -> argparse.ArgumentParser:
    from .verification.families import FAMILIES

    parser = argparse.ArgumentParser(prog="bntriton", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser(
        "verify",
        help="check a batch-norm implementation against the float64 oracle",
        description="Run an implementation with F.batch_norm's signature against the float64 reference "
        "over case families; errors are in units of the stored dtype's eps. Exit status 0 only if "
        "every case passes.",
    )
    v.add_argument("--impl", default="bntriton",
                   help="'bntriton' (default), 'torch' (torch.nn.functional.batch_norm) or MODULE:FUNCTION")
    v.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    v.add_argument("--quick", action="store_true", help="the quick subset of every family (< 1 min on a CPU)")
    v.add_argument("--family", action="append", metavar="NAME",
                   help=f"run only this family (repeatable, or comma-separated); one of: {', '.join(FAMILIES)}")
    v.add_argument("--seed", type=int, default=0, help="seed of the families' data (default 0)")
    v.add_argument("--case", metavar="JSON",
                   help="rerun one case: a Case as JSON (the 'case' object of a --json report, or the whole entry)")
    v.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    v.add_argument("-v", "--verbose", action="store_true", help="a row for every case, not only the failing ones")
    v.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    v.add_argument("--list-families", action="store_true", help="list the families and what each catches, then exit")

    sub.add_parser("bounds", help="print the error-bound table (markdown)")

    from .demo.run import add_arguments as add_demo_arguments

    add_demo_arguments(sub.add_parser(
        "demo", help="the lecture's claims about batch norm, reproduced with bntriton's layers",
        description="Train MLPs with and without bntriton.BatchNorm1d on seeded synthetic data and write "
        "figures and a markdown report: learning-rate range, depth, z or a, gamma/beta, test time."))
    return parser


def _families(arg: Optional[list]) -> Optional[list]:
    if not arg:
        return None
    return [name.strip() for item in arg for name in item.split(",") if name.strip()]


def _case(text: str):
    from .verification.strategies import Case

    d = json.loads(text)
    if "case" in d and isinstance(d["case"], dict):  # a whole report entry
        d = d["case"]
    return Case.from_description(d)


def _verify(args, parser) -> int:
    from .verification.families import FAMILIES
    from .verification import verify

    if args.list_families:
        width = max(map(len, FAMILIES))
        for name, fam in FAMILIES.items():
            print(f"{name.ljust(width)}  {fam.doc}")
        return 0
    families = _families(args.family)
    unknown = [f for f in families or [] if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    if args.device is not None:
        import torch

        try:  # a device this machine lacks is a usage error, not 79 failed cases
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as exc:
            parser.error(f"--device {args.device}: {exc}")
    cases = None
    if args.case:
        try:
            cases = [_case(args.case)]
        except (ValueError, TypeError) as exc:
            parser.error(f"--case: {exc}")
    show = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        report = verify(args.impl, device=args.device, quick=args.quick, seed=args.seed,
                        families=families, progress=ProgressBar() if show else None, cases=cases)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        # Naming an implementation that cannot be loaded is a usage error, not a failure.
        parser.error(f"--impl {args.impl}: {exc}")
    print(report.render(verbose=args.verbose))
    if args.json:
        report.to_json(args.json)
        print(f"report written to {args.json}")
    return 0 if report.passed else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args, parser)
    if args.command == "bounds":
        from .verification.report import bounds_table

        print(bounds_table())
        return 0
    if args.command == "demo":
        from .demo.run import command

        return command(args, parser)
    parser.error(f"unknown command {args.command}")  # argparse exits; unreachable otherwise
    return 2


if __name__ == "__main__":
    sys.exit(main())
