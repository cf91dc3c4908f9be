"""The harness's three verdicts: wrong, less precise, within bounds.

A verdict is only useful if a correct implementation is never called wrong and a wrong
one always is somewhere.  Correct: torch eager and a textbook fp32 two-pass batch norm
with sequential sums (the worst-case summation the loose tier is derived from,
bounds.LOOSE_BOUNDS), never wrong on any family; bntriton within its tight bounds
everywhere.  Wrong: the planted bugs of tests/test_verify.py that a user would make.
"""
from __future__ import annotations

import torch

from conftest import DEVICE


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _sequential_sum(t: torch.Tensor) -> torch.Tensor:
    """Per channel, the values summed one after another (a cumulative sum's last entry):
    recursive summation, whose error grows with n, not log n."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).cumsum(1)[:, -1]


def bn_two_pass(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """The textbook batch norm in the accumulator's dtype (fp32; fp64 for fp64): the mean,
    then the variance of x - mean, both by sequential sums, no shift; gradients by
    autograd through those operations."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(acc)
    nd = x.dim()
    if training:
        count = x.numel() // x.shape[1]
        mean = _sequential_sum(x) / count
        centred = x - _per_channel(mean, nd)
        var = _sequential_sum(centred * centred) / count
        if running_mean is not None:
            with torch.no_grad():
                new_mean = (1 - momentum) * running_mean.to(acc) + momentum * mean
                new_var = (1 - momentum) * running_var.to(acc) + momentum * var * count / (count - 1)
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
        centred = x - _per_channel(mean, nd)
    y = centred * _per_channel(torch.rsqrt(var + eps), nd)
    if weight is not None:
        y = y * _per_channel(weight.to(acc), nd)
    if bias is not None:
        y = y + _per_channel(bias.to(acc), nd)
    return y.to(input.dtype)


# ------------------------------------------------------------------ correct implementations

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import bntriton  # noqa: E402
from bntriton.cli import main  # noqa: E402
from bntriton.verification import verify  # noqa: E402
from bntriton.verification.families import FAMILIES, family_cases  # noqa: E402

from test_verify import _with_bug  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("impl", ["torch", bn_two_pass], ids=["torch", "two_pass_fp32"])
def test_a_correct_implementation_is_never_wrong(impl):
    report = verify(impl, device=DEVICE, quick=True, reference=False)
    assert set(report.families()) == set(FAMILIES)
    assert not report.wrong, report.render()
    assert report.passed
    # ...and the tiers differ: both miss bntriton's tight bounds somewhere.
    assert report.less_precise
    assert not verify(impl, device=DEVICE, quick=True, reference=False, strict=True).passed


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU paths (a GPU runs the kernels compiled: tests/test_verify.py)")
@pytest.mark.parametrize("backend", ["native", "interpreter"])
def test_bntriton_is_within_its_bounds_on_every_case(backend):
    # Every case of every family: 354 cases, ~15 s on the native path, ~25 s in the interpreter.
    with bntriton.cpu_backend(backend):
        report = verify(device=DEVICE, quick=False, strict=True, reference=False)
    assert report.environment["cpu_backend"] == backend
    assert report.passed and len(report.within_bounds) == len(report.results) > 300, report.render()


# ------------------------------------------------------------------ planted bugs

# bug -> families where it must be wrong (the quick set, not strict)
WRONG_IN = {
    "biased_running_var": {"running_stats"},
    "naive_variance_input_dtype": {"large_offset", "fp16_overflow"},
    "running_stats_copy": {"strided_params"},
    "detached_backward": {"second_order"},  # a first-order-only backward, silent when differentiated
    "dx_without_mean_dy": {"two_per_channel", "running_stats"},
    "dweight_scaled": {"running_stats", "two_per_channel"},  # dweight * (1 + 1e-3)
    "dweight_without_mean": {"large_offset", "typical"},  # sum(dy * x) * rstd
}
# The outputs each bug touches, in the report's names: a dweight bug also reaches the
# second-order gradients, which differentiate <v, dx> + <u, dweight>.
_DWEIGHT = ("dgamma:", "d2x:", "d2gamma:", "d2dy:")
TOUCHES = {"biased_running_var": ("run_var:",), "dweight_scaled": _DWEIGHT, "dweight_without_mean": _DWEIGHT}


@pytest.mark.parametrize("bug", sorted(WRONG_IN))
def test_planted_bug_is_wrong(bug):
    report = verify(_with_bug(bug), device=DEVICE, quick=True, reference=False)
    assert not report.passed
    wrong = {r.case.family for r in report.wrong}
    assert WRONG_IN[bug] <= wrong, (bug, wrong)
    if bug in TOUCHES:
        reasons = [m for r in report.wrong for m in r.failures() if "beyond any correct" in m]
        assert reasons and all(m.startswith(TOUCHES[bug]) for m in reasons), reasons
        assert any(m.startswith(TOUCHES[bug][0]) for m in reasons)


def test_wrong_cases_come_first_with_the_check_and_a_rerun_command(capsys):
    code = main(["verify", "--quick", "--impl", "test_verify:bn_biased_running_var",
                 "--family", "running_stats,large_offset"])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("- "))
    assert lines[first - 2].startswith("WRONG: ") and lines[first - 1].startswith("Wrong outputs: run_var in ")
    assert "run_var " in lines[first] and " eps > " in lines[first]
    assert lines[first].endswith(("[torch: within bounds]", "[torch: less precise]")), lines[first]
    assert lines[first + 1].strip().startswith("bntriton verify --impl test_verify:bn_biased_running_var --case '")
    assert first < next(i for i, line in enumerate(lines) if line.startswith("family"))
    assert "torch here: within" in out
    assert lines[-1].startswith("FAILED: ") and " within bounds | torch on this machine: 0 wrong, " in lines[-1]
    # The rerun command reruns that case: wrong again.
    command = lines[first + 1].strip()
    case_json = command.split("--case ", 1)[1].strip("'")
    assert main(["verify", "--impl", "test_verify:bn_biased_running_var", "--case", case_json]) == 1
    assert "WRONG: 1 case(s)" in capsys.readouterr().out


def test_less_precise_exits_0_and_strict_exits_1(capsys):
    argv = ["verify", "--quick", "--impl", "torch", "--family", "large_offset"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PASSED: 0 wrong, " in out and "less precise: " in out
    assert main(argv + ["--strict"]) == 1
    assert "FAILED: 0 wrong, " in capsys.readouterr().out


def test_the_api_summary_reads_like_the_command_line():
    report = verify("torch", device=DEVICE, quick=True, families=["eval", "large_offset"], strict=True)
    n, within = len(report.results), len(report.within_bounds)
    assert report.summary().startswith(f"FAILED: 0 wrong, {n - within} less precise, {within}/{n} within bounds")
    assert report.summary() in str(report) and report.summary() in repr(report)
    # torch as the implementation is its own reference: run once, not twice.
    assert report.reference.results == report.results


# ------------------------------------------------------------------ the same cases on every route


def test_random_cases_do_not_depend_on_hypothesis_or_loaded_modules(monkeypatch):
    cases = family_cases("random", 5, quick=True)
    assert len(cases) == 24 and len({c.seed for c in cases}) == 24
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    assert family_cases("random", 5, quick=True) == cases


def test_the_command_line_and_the_api_check_the_same_cases(tmp_path):
    api = verify("torch", device=DEVICE, quick=True, families=["random", "eval"], seed=2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    path = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "bntriton", "verify", "--quick", "--impl", "torch", "--family", "random,eval",
         "--seed", "2", "--json", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    cli = json.loads(path.read_text())
    assert [c["case"] for c in cli["cases"]] == [r.case.describe() for r in api.results]
    assert [c["verdict"] for c in cli["cases"]] == [r.verdict for r in api.results]
    assert cli["summary"].split(" (")[0] == api.summary().split(" (")[0]


def test_bounds_prints_units_and_a_legend(capsys):
    assert main(["bounds"]) == 0
    out = capsys.readouterr().out
    for words in ("divided by eps", "WITHIN BOUNDS", "LESS PRECISE", "WRONG", "--strict",
                  "| quantity | R | T | S |", "| running_var |"):
        assert words in out, words
