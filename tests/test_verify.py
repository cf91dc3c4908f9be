"""The verification harness as a product: ``bntriton.verify`` / ``bntriton verify``.

The harness is only worth something if it passes a correct implementation and fails
wrong ones, naming what is wrong.  So besides bntriton itself, it is run here on a
plain-torch batch norm computed in float64 (correct: it must pass every family) and on
copies of it with one planted bug each (each must fail, in the family aimed at that bug).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bntriton
from bntriton.cli import main
from bntriton.verification.families import FAMILIES, family_cases
from bntriton.testing import Case
from bntriton.verification import Report, check_case, verify

from conftest import DEVICE

ALL_FAMILIES = set(FAMILIES)

# ------------------------------------------------------------------ a plain-torch batch norm


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x: torch.Tensor) -> list:
    return [0] + list(range(2, x.dim()))


class _Normalize(torch.autograd.Function):
    """y = ((x - centre) - mean_d) * rstd * weight + bias in float64, rounded once into the
    input's dtype and memory format; the backward from the textbook formulas, recomputed
    from x with differentiable float64 operations, so that it can be differentiated
    again (second order)."""

    @staticmethod
    def forward(ctx, x, weight, bias, centre, mean_d, rstd, training, eps, bug):
        nd = x.dim()
        x_hat = ((x.double() - _per_channel(centre, nd)) - _per_channel(mean_d, nd)) * _per_channel(rstd, nd)
        y = x_hat
        if weight is not None:
            y = y * _per_channel(weight.double(), nd)
        if bias is not None and bug != "ignore_bias":
            y = y + _per_channel(bias.double(), nd)
        ctx.save_for_backward(x, weight, centre, rstd)
        ctx.training, ctx.eps, ctx.bug = training, eps, bug
        ctx.has_bias = bias is not None
        if bug == "fp32_output" and x.dtype in (torch.float16, torch.bfloat16):
            return y.float()
        out = torch.empty_like(x).copy_(y)  # empty_like keeps x's strides (dense layouts)
        return out.contiguous() if bug == "contiguous_output" else out

    @staticmethod
    def backward(ctx, dy):
        x, weight, centre, rstd = ctx.saved_tensors
        if ctx.bug == "detached_backward":  # computes the right numbers, off the graph
            x, weight = x.detach(), None if weight is None else weight.detach()
        nd, dims = dy.dim(), _reduce_dims(dy)
        x64 = x.double()
        if ctx.training:  # statistics again, from x (centre: a constant shift)
            d = x64 - _per_channel(centre, nd)
            centred = d - d.mean(dims, keepdim=True)
            rstd = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + ctx.eps)
        else:
            centred, rstd = x64 - _per_channel(centre, nd), _per_channel(rstd, nd)
        x_hat = centred * rstd
        dy64 = dy.double()
        gamma = torch.ones_like(rstd) if weight is None else _per_channel(weight.double(), nd)
        g_rstd = gamma * rstd
        dbias = dy64.sum(dims)
        dweight = (dy64 * x_hat).sum(dims)
        if ctx.training:
            count = dy.numel() // dy.shape[1]
            mean_dy = 0.0 if ctx.bug == "dx_without_mean_dy" else _per_channel(dbias / count, nd)
            dx = g_rstd * (dy64 - mean_dy - x_hat * _per_channel(dweight / count, nd))
        else:
            dx = g_rstd * dy64
        dx = torch.empty_like(x, requires_grad=False).copy_(dx)  # in the input's layout, as the output
        # Bugs that touch dweight alone (dx above used the right one).
        if ctx.bug == "dweight_scaled":
            dweight = dweight * (1 + 1e-3)
        elif ctx.bug == "dweight_without_mean":  # sum(dy * x) * rstd: drops -mean * sum(dy) * rstd
            dweight = (dy64 * x64 * rstd).sum(dims)
        dw = None if weight is None else dweight.to(weight.dtype)
        db = dbias.to(weight.dtype if weight is not None else dy.dtype) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None, None, None


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5, *, bug=None):
    """``F.batch_norm`` in float64 (statistics shifted by one sample per channel, as the
    oracle, so that fp64 inputs far from zero are exact too), with an optional bug."""
    x = input.detach()
    nd, dims = x.dim(), _reduce_dims(x)
    if bug == "dense_param_read" and weight is not None:  # as if every tensor were contiguous
        weight = torch.as_strided(weight, weight.shape, (1,))
    if training:
        if bug == "nan_scrubbed":
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if bug == "naive_variance_input_dtype":  # E[x^2] - E[x]^2 in the input's dtype
            mean_in = x.mean(dims)
            var = ((x * x).mean(dims) - mean_in * mean_in).double()
            centre, mean_d = mean_in.double(), torch.zeros_like(var)
        elif bug == "naive_variance":  # E[x^2] - E[x]^2 in fp32: cancels when |mean| >> std
            x32 = x.float()
            mean32 = x32.mean(dims)
            var = ((x32 * x32).mean(dims) - mean32 * mean32).double()
            centre, mean_d = mean32.double(), torch.zeros_like(var)
        else:
            flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
            centre = flat[:, 0]
            d = flat - centre[:, None]
            mean_d = d.mean(1)
            var = ((d - mean_d[:, None]) ** 2).mean(1)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            unbiased = var if bug == "biased_running_var" else var * count / (count - 1)
            old, new = (1 - momentum, momentum) if bug != "momentum_flipped" else (momentum, 1 - momentum)
            new_mean = old * running_mean.double() + new * (centre + mean_d)
            new_var = old * running_var.double() + new * unbiased
            if bug == "running_stats_copy":  # updates a contiguous copy: a view is left as it was
                running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
            if bug == "dense_param_write":  # writes C consecutive elements from the view's start
                running_mean = torch.as_strided(running_mean, running_mean.shape, (1,))
                running_var = torch.as_strided(running_var, running_var.shape, (1,))
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    else:
        centre, var = running_mean.double(), running_var.double()
        mean_d = torch.zeros_like(var)
    eps = 0.0 if bug == "no_eps" else eps
    rstd = 1.0 / torch.sqrt(var + eps)
    if bug == "folded_affine":
        # y = x * scale + shift in fp32 (scale = gamma * rstd, shift = beta - mean * scale):
        # one multiply-add, but a constant channel no longer gives exactly beta.
        gamma = torch.ones_like(rstd) if weight is None else weight.double()
        beta = torch.zeros_like(rstd) if bias is None else bias.double()
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        scale = (gamma * rstd).to(acc)
        shift = (beta - (centre + mean_d) * gamma * rstd).to(acc)
        y = x.to(acc) * _per_channel(scale, nd) + _per_channel(shift, nd)
        # Forward values from the folded form, gradients from the correct backward.
        exact = _Normalize.apply(input, weight, bias, centre, mean_d, rstd, training, eps, None)
        return exact + (torch.empty_like(input).copy_(y) - exact).detach()
    return _Normalize.apply(input, weight, bias, centre, mean_d, rstd, training, eps, bug)


def bn_float64(*args):
    return _batch_norm(*args)


def _with_bug(bug):
    def impl(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, bug=bug)

    impl.__name__ = impl.__qualname__ = f"bn_{bug}"
    return impl


# For the CLI tests: importable as test_verify:bn_biased_running_var.
bn_biased_running_var = _with_bug("biased_running_var")

# bug -> (families that must fail, families that must pass)
PLANTED = {
    "naive_variance": ({"large_offset"}, {"eval", "affine_off", "channels_last", "bf16"}),
    "biased_running_var": ({"running_stats"}, {"eval"}),
    "momentum_flipped": ({"running_stats"}, {"eval"}),
    "no_eps": ({"tiny_variance", "constant_channel"}, set()),  # eps matters to every var ~ 1
    "ignore_bias": ({"bf16", "eval", "large_offset"}, {"affine_off"}),
    "dx_without_mean_dy": ({"two_per_channel", "running_stats"}, {"eval"}),  # eval's dx has no such term
    "fp32_output": ({"fp16_overflow", "bf16"}, set()),
    "contiguous_output": ({"channels_last"}, {"non_contiguous", "two_per_channel"}),
    "folded_affine": ({"constant_channel"}, set()),
    "nan_scrubbed": ({"nan_inf"}, ALL_FAMILIES - {"nan_inf"}),
    "detached_backward": ({"second_order"}, ALL_FAMILIES - {"second_order"}),
    "running_stats_copy": ({"strided_params"}, ALL_FAMILIES - {"strided_params"}),
    "dense_param_write": ({"strided_params"}, ALL_FAMILIES - {"strided_params"}),
    "dense_param_read": ({"strided_params"}, ALL_FAMILIES - {"strided_params"}),
}


# ----------------------------------------------------------------------------------- tests


def test_bntriton_passes_the_quick_families():
    report = verify(bntriton.batch_norm, device=DEVICE, quick=True, strict=True)
    assert report.passed and not report.unsupported, report.render()
    assert set(report.families()) == ALL_FAMILIES
    assert len(report.results) >= 60


def test_a_correct_float64_implementation_passes_every_quick_family():
    # Also what keeps the planted-bug tests honest: each bug is the only change.
    report = verify(bn_float64, device=DEVICE, quick=True, strict=True)
    assert report.passed, report.render()


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_fails_in_its_family(bug):
    # Strict: each bug is caught by bntriton's tight bounds in the family aimed at it
    # (tests/test_verify_verdicts.py: which of them are wrong, not only less precise).
    must_fail, must_pass = PLANTED[bug]
    report = verify(_with_bug(bug), device=DEVICE, quick=True, strict=True, reference=False)
    failed = set(report.failed_families())
    assert not report.passed
    assert must_fail <= failed, f"{bug}: expected {must_fail} to fail, failed: {failed}\n{report.render()}"
    assert not (must_pass & failed), f"{bug}: expected {must_pass} to pass, failed: {failed}"


def test_naive_variance_is_caught_at_large_offsets_in_fp32():
    report = verify(_with_bug("naive_variance"), device=DEVICE, quick=True, families=["large_offset"])
    fp32 = [r for r in report.failures if r.case.dtype == torch.float32 and r.case.offset >= 1e4]
    assert fp32 and all(r.errors.get("y", float("inf")) > r.bounds.get("y", 0) or r.problems for r in fp32)


def test_channels_last_output_must_keep_its_strides():
    report = verify(_with_bug("contiguous_output"), device=DEVICE, quick=True, families=["channels_last"])
    messages = [m for r in report.failures for m in r.failures()]
    assert any("strides" in m for m in messages), messages


def test_nan_containment_names_the_channels():
    report = verify(_with_bug("nan_scrubbed"), device=DEVICE, quick=True, families=["nan_inf"])
    messages = [m for r in report.failures for m in r.failures()]
    assert any("in channels [0]" in m for m in messages), messages


def test_report_contents_and_json(tmp_path):
    report = verify(bn_biased_running_var, device=DEVICE, quick=True, families=["running_stats", "eval"])
    assert isinstance(report, Report) and not report.passed
    assert report.failed_families() == ["running_stats"]
    path = tmp_path / "report.json"
    text = report.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert data["passed"] is False and data["seed"] == 0 and data["quick"] is True
    assert data["families"]["eval"]["failed"] == 0 and data["families"]["running_stats"]["failed"] > 0
    entry = next(c for c in data["cases"] if c["verdict"] == "wrong")
    for key in ("shape", "layout", "dtype", "param_dtype", "training", "momentum", "steps", "seed", "family"):
        assert key in entry["case"]
    assert entry["errors"]["running_var"] > entry["bounds"]["running_var"]
    assert "--case" in entry["rerun"]
    # The case in the report is enough to rerun it alone, with the same outcome.
    case = Case.from_description(entry["case"])
    again = check_case(bn_biased_running_var, case, DEVICE)
    assert not again.passed
    assert again.errors["running_var"] == pytest.approx(entry["errors"]["running_var"])


def test_families_are_reproducible_and_seeded():
    for name in FAMILIES:
        first, second = family_cases(name, 3, quick=True), family_cases(name, 3, quick=True)
        assert first == second and first, name
        assert all(c.family == name for c in first)
    named = family_cases("large_offset", 3, quick=True)
    assert len({c.seed for c in named}) == len(named)
    assert [c.seed for c in family_cases("large_offset", 4, quick=True)] != [c.seed for c in named]
    assert family_cases("random", 3, quick=True) != family_cases("random", 4, quick=True)
    assert len(family_cases("random", 0, quick=False)) > len(family_cases("random", 0, quick=True))


def test_case_description_round_trips():
    case = Case((3, 4, 5), torch.bfloat16, "reversed", None, momentum=None, steps=2, data="nan", seed=7)
    assert Case.from_description(json.loads(json.dumps(case.describe()))) == case
    with pytest.raises(ValueError):
        Case.from_description({"shape": [2, 3], "dtpye": "float32"})


def test_unknown_family_and_impl_are_rejected():
    with pytest.raises(ValueError):
        verify(bn_float64, families=["no_such_family"])
    with pytest.raises(ValueError):
        verify("not an implementation")


def test_progress_is_reported_for_every_case():
    seen = []
    report = verify(bn_float64, device=DEVICE, quick=True, families=["eval"],
                    progress=lambda done, total, result: seen.append((done, total)))
    assert seen[0] == (0, len(report.results)) and seen[-1] == (len(report.results),) * 2


# ------------------------------------------------------------------------------------- CLI


def test_cli_fails_a_planted_bug_and_names_the_family(tmp_path, capsys):
    path = tmp_path / "r.json"
    code = main(["verify", "--quick", "--impl", "test_verify:bn_biased_running_var",
                 "--family", "running_stats,eval", "--json", str(path), "--progress"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED" in out and "failing families: running_stats" in out
    assert "running_var" in out and "bntriton verify --impl test_verify:bn_biased_running_var --case" in out
    assert "[" in err and "/" in err  # the progress bar, on stderr only
    report = json.loads(path.read_text())
    assert report["passed"] is False and set(report["families"]) == {"running_stats", "eval"}

    # Rerun one failing case alone from its JSON: still fails; the correct version passes.
    entry = next(c for c in report["cases"] if c["verdict"] == "wrong")
    assert main(["verify", "--impl", "test_verify:bn_biased_running_var", "--case", json.dumps(entry)]) == 1
    assert main(["verify", "--impl", "test_verify:bn_float64", "--case", json.dumps(entry["case"])]) == 0


def test_cli_passes_and_lists(capsys):
    assert main(["verify", "--quick", "--impl", "test_verify:bn_float64", "--family", "eval", "--family", "bf16"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["verify", "--list-families"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in FAMILIES)
    assert main(["bounds"]) == 0
    assert "| running_var |" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["verify", "--family", "no_such_family"],
    ["verify", "--impl", "no_such_module_xyz:fn"],
    ["verify", "--case", "{\"shape\": [2, 3], \"colour\": 1}"],
    ["verify", "--device", "no_such_device"],
])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_console_entry_point_exit_status(tmp_path):
    # The real process: `python -m bntriton` (what the console script runs), bntriton on a
    # family it passes on every device (torch itself fails half-precision cases on CUDA),
    # then a planted bug that must fail.
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))

    def run(impl, family, report):
        return subprocess.run(
            [sys.executable, "-m", "bntriton", "verify", "--quick", "--impl", impl, "--family", family,
             "--json", str(tmp_path / report)],
            capture_output=True, text=True, env=env, timeout=120,
        )

    done = run("bntriton", "eval", "pass.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "pass.json").read_text())["impl"] == "bntriton.batch_norm"
    done = run("test_verify:bn_biased_running_var", "running_stats", "fail.json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads((tmp_path / "fail.json").read_text())["passed"] is False


def test_random_family_runs_without_hypothesis(monkeypatch):
    # hypothesis is a test extra: `bntriton verify` draws its random cases without it.
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    report = verify(bn_float64, device=DEVICE, quick=True, families=["random", "eval"], reference=False)
    assert report.passed and not report.skipped
    assert report.families()["random"].cases == 24
