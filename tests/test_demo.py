"""``bntriton demo`` at a tiny size: the functions run, write their files, give the same
numbers twice, and the identity check (gamma = sqrt(var + eps), beta = mean) holds to its
bound.  The lecture's claims themselves are reported by the demo, not asserted here."""
import json

import pytest
import torch

import bntriton
from bntriton.demo import experiments, figures, preset, run
from bntriton.demo.data import teacher_task
from bntriton.demo.models import batch_norms, mlp
from bntriton.demo.training import accuracy, deterministic, train
from bntriton.verification.bounds import EPS, identity_units

TINY = preset("tiny")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    # The whole pipeline on the native CPU path: these tests are about the demo's plumbing;
    # the kernels' own numerics are pinned by the identity test below and the kernel tests.
    out = tmp_path_factory.mktemp("demo")
    with bntriton.cpu_backend("native"):
        numbers = run(TINY, str(out), "cpu", preset_name="tiny")
    return out, numbers


def test_demo_writes_report_json_and_figures(demo_dir):
    out, numbers = demo_dir
    text = (out / "report.md").read_text()
    for section in ("Learning-rate range", "Depth", "Normalize z or a", "gamma and beta", "Test time"):
        assert section in text
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(numbers))
    pngs = {"lr_sweep.png", "depth_curves.png", "sigmoid_histograms.png", "test_time.png"}
    if figures.available():
        assert pngs <= {p.name for p in out.iterdir()}
        assert all(f"]({name})" in text for name in pngs)
    else:
        assert "Figures were not drawn" in text


def test_demo_sweep_covers_the_grid(demo_dir):
    _, numbers = demo_dir
    cells = {(r["norm"], r["init"], r["depth"], r["lr"]) for r in numbers["sweep"]}
    assert cells == {(n, i, d, lr) for n in ("none", "before", "after") for i in TINY.inits
                     for d in TINY.depths for lr in TINY.lrs}


def test_report_says_when_figures_are_missing():
    # Rebuild the report from a fresh tiny sweep without matplotlib's figures: the markdown
    # must say so rather than link files that are not there.
    from bntriton.demo import report

    s = preset("tiny", lrs=(0.1,))
    with bntriton.cpu_backend("native"), deterministic(torch.device("cpu")):
        data = teacher_task(s.train_size, s.test_size, s.features, s.classes, s.seed)
        sweep = experiments.lr_sweep(data, s)
        ident = experiments.identity_check(s, torch.device("cpu"))
        sig = experiments.sigmoid_gamma_beta(data, s)
        tt = experiments.test_time(data, s)
    text = report.markdown(sweep, ident, sig, tt, header={}, figures={})
    assert "Figures were not drawn" in text and ".png" not in text


def test_same_command_same_numbers():
    # Deterministic: a batch-norm net trained twice from the same seeds gives the same losses
    # and accuracy, bit for bit (through the kernels, as the suite runs them).
    s = TINY
    cpu = torch.device("cpu")
    results = []
    for _ in range(2):
        with deterministic(cpu):
            data = teacher_task(s.train_size, s.test_size, s.features, s.classes, s.seed)
            model = mlp(s.features, s.width, 1, s.classes, norm="before", seed=3)
            r = train(model, data, 0.1, 2, s.batch, s.seed)
            results.append((r.losses, r.accuracy, [b.running_var.clone() for b in batch_norms(model)]))
    (l0, a0, v0), (l1, a1, v1) = results
    assert l0 == l1 and a0 == a1
    assert all(torch.equal(x, y) for x, y in zip(v0, v1))


@pytest.mark.parametrize("rows,channels", [(16, 8), (257, 5)])
def test_identity_gamma_sqrt_var_beta_mean(device, rows, channels):
    """gamma = sqrt(var + eps), beta = mean: max|y - x| within bounds.identity_units (the
    "y" bound plus 1.5 eps for rounding gamma and beta to fp32), relative to max|x|."""
    s = preset("tiny", identity_rows=rows, identity_channels=channels)
    check = experiments.identity_check(s, torch.device(device))
    assert check.bound_units == identity_units(torch.float32, rows)
    assert check.passed, (check.error_units, check.bound_units)
    assert check.max_abs <= check.bound_units * EPS[torch.float32] * check.max_x


def test_models_reject_unknown_choices():
    with pytest.raises(ValueError, match="norm"):
        mlp(4, 8, 2, 3, norm="middle")
    with pytest.raises(ValueError, match="init"):
        mlp(4, 8, 2, 3, init="zeros")
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


def test_batch_statistics_need_two_rows_per_test_batch():
    model = mlp(4, 8, 1, 3, norm="before")
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    for batch in (1, 2):  # 5 rows in batches of 2 leave a last batch of one row
        with pytest.raises(ValueError, match="one row"):
            accuracy(model, x, y, batch_stats=True, batch=batch)
