"""The ``bntriton`` command line: one :class:`Command` per subcommand in :data:`COMMANDS`.

``bntriton verify``   check an implementation against the float64 oracle (exit 0 if no
                      case is wrong, 1 if any is, 2 for a usage error; ``--strict``: 1 if
                      any case is beyond bntriton's tight bounds)
``bntriton bounds``   print the error-bound tables (markdown), with units and a legend
``bntriton demo``     what batch norm buys, shown with bntriton's layers (figures + report)
``bntriton --version``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


class ProgressBar:
    """A one-line progress bar on stderr, redrawn in place (so only on a terminal: in a
    log file the carriage returns would pile up into one unreadable line)."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.failed = 0

    def __call__(self, done: int, total: int, result) -> None:
        if result is not None and result.wrong:
            self.failed += 1
        filled = self.width * done // max(total, 1)
        where = "" if result is None else f" {result.case.family}"
        fails = f" {self.failed} wrong" if self.failed else ""
        line = (f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
                f" {time.perf_counter() - self.start:5.1f}s{fails}{where}")
        self.stream.write(line.ljust(79)[:79])
        if done == total:
            self.stream.write("\r" + " " * 79 + "\r")  # leave the terminal clean for the table
        self.stream.flush()


@dataclass(frozen=True)
class Command:
    """One subcommand: ``configure(parser)`` adds its arguments, ``run(args, parser)``
    returns the exit status.  A new subcommand is one more entry in :data:`COMMANDS`."""

    name: str
    help: str  # one line, in ``bntriton --help``
    description: str  # a paragraph, in ``bntriton NAME --help``
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, description: str, configure: Callable):
    def register(run):
        COMMANDS[name] = Command(name, help, description, configure, run)
        return run

    return register


def _verify_arguments(v: argparse.ArgumentParser) -> None:
    from .verification.families import FAMILIES
    from .verification.peers import PEERS

    v.add_argument("--impl", default="bntriton", metavar="IMPL",
                   help=f"what to check: a built-in ({', '.join(PEERS)}; default bntriton), "
                   "MODULE:FUNCTION (a module on sys.path or in the current directory) or "
                   "path/to/file.py:FUNCTION, with F.batch_norm's signature")
    v.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    v.add_argument("--quick", action="store_true", help="the quick subset of every family (< 1 min on a CPU)")
    v.add_argument("--family", action="append", metavar="NAME",
                   help=f"run only this family (repeatable, or comma-separated); one of: {', '.join(FAMILIES)}")
    v.add_argument("--seed", type=int, default=0, help="seed of the families' data (default 0)")
    v.add_argument("--case", metavar="JSON",
                   help="rerun one case: a Case as JSON (the 'case' object of a --json report, or the whole entry)")
    v.add_argument("--strict", action="store_true",
                   help="exit 1 if any case is beyond bntriton's tight bounds (less precise), not only if one is "
                   "wrong; what bntriton's own tests ask of it")
    v.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also run torch eager on the same cases, for the report's torch column (default: on)")
    v.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    v.add_argument("-v", "--verbose", action="store_true", help="a row for every case, not only the failing ones")
    v.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    v.add_argument("--list-families", action="store_true", help="list the families and what each catches, then exit")
    v.add_argument("--list-impls", action="store_true",
                   help="list the built-in implementations and whether each can run on --device, then exit")


def _parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="bntriton",
        description="Batch normalization as Triton kernels with a PyTorch front end: the float64 harness "
        "that checks it or any other batch norm (verify, bounds), and a demo of what batch norm buys (demo).",
    )
    parser.add_argument("--version", action="version", version=f"bntriton {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        cmd.configure(sub.add_parser(cmd.name, help=cmd.help, description=cmd.description))
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


@command(
    "verify",
    help="check a batch-norm implementation against the float64 oracle",
    description="Run an implementation with F.batch_norm's signature against the float64 reference "
    "over case families (forward, backward, second order, running statistics); errors are in units of "
    "the stored dtype's eps. Each case is wrong (a semantic error, or an error beyond what any correct "
    "implementation in the dtype reaches), less precise (beyond bntriton's tight bounds only) or within "
    "bounds; torch eager runs the same cases beside it. Exit status 0 if no case is wrong (cases the "
    "implementation refuses with a clear error are listed as unsupported), 1 if any is (with --strict: "
    "if any is not within bounds), 2 for a usage error.",
    configure=_verify_arguments,
)
def _verify(args, parser) -> int:
    from .verification.families import FAMILIES
    from .verification import verify

    if args.list_impls:
        from .verification.peers import PEERS, available

        device = args.device or _default_device()
        width = max(map(len, PEERS))
        for name, why in available(device).items():
            print(f"{name.ljust(width)}  {PEERS[name].doc}" + (f"  [not here: {why}]" if why else ""))
        return 0
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
                        families=families, progress=ProgressBar() if show else None, cases=cases,
                        strict=args.strict, reference=args.reference)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        # Naming an implementation that cannot be loaded is a usage error, not a failure.
        parser.error(f"--impl {args.impl}: {exc}")
    print(report.render(verbose=args.verbose))
    if args.json:
        report.to_json(args.json)
        print(f"report written to {args.json}")
    return 0 if report.passed else 1


def _default_device() -> str:
    from .verification.report import default_device

    return default_device()


@command(
    "bounds",
    help="print the error-bound tables (markdown), with units and a legend",
    description="Print the two tiers of error bounds every check uses, as markdown tables with their "
    "units and a legend: bntriton's tight bounds (beyond them: less precise) and the bounds of a "
    "straightforward correct implementation (beyond them: wrong), per quantity and dtype for a few "
    "values-per-channel counts.",
    configure=lambda parser: None,
)
def _bounds(args, parser) -> int:
    from .verification.report import bounds_table

    print(bounds_table())
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo.run import add_arguments

    add_arguments(parser)


@command(
    "demo",
    help="the lecture's claims about batch norm, reproduced with bntriton's layers",
    description="Train MLPs with and without bntriton.BatchNorm1d on seeded synthetic data and write "
    "figures and a markdown report: learning-rate range, depth, z or a, gamma/beta, test time.",
    configure=_demo_arguments,
)
def _demo(args, parser) -> int:
    from .demo.run import command as run_demo

    return run_demo(args, parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
