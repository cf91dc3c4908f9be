"""The benchmark tooling (perf/sweep.py, summarize.py, plot.py) end to end, on the CPU smoke
path: tiny shapes through Triton's interpreter, timed with a wall clock.  What is tested is
the tooling (schema, bookkeeping, summary, plot), never the numbers, which mean nothing
on a CPU.
"""
import csv
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PERF = REPO / "perf"

# Spelled out here rather than imported from perf/schema.py: the test pins the published
# format (GUIDE section 4), so a change to the schema must change this line too.
COLUMNS = ["device", "torch", "triton", "suite", "shape", "layout", "dtype",
           "pass", "provider", "ms", "bytes", "gbps", "pct_copy_bw"]
SUITES = ["resnet50", "mlp", "video3d", "small_batch"]
PASSES = ["fwd_train", "bwd_train", "fwd_eval"]


def _perf_module(name):
    """Import perf/<name>.py (perf/ is scripts, not a package) without touching sys.path."""
    spec = importlib.util.spec_from_file_location(f"perf_{name}", PERF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke sweep shared by the tests below.  torch_compile runs with the aot_eager
    backend (Inductor would build C++ per shape on a CPU), so its provider code is
    exercised without the compile cost; flag_gems is absent here and must be skipped."""
    out = tmp_path_factory.mktemp("perf")
    proc = _run(PERF / "sweep.py", "--device", "cpu", "--smoke", "--out", out, "--stem", "smoke",
                "--providers", "bntriton,torch,torch_compile,flag_gems", "--compile-backend", "aot_eager")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_smoke_sweep_writes_csv_with_exact_columns_and_sane_values(smoke):
    out, _ = smoke
    header, rows = _rows(out / "smoke.csv")
    assert header == COLUMNS
    assert rows
    copy_gbps = []
    for row in rows:
        assert row["device"] == "cpu"
        ms, nbytes, gbps, pct = float(row["ms"]), int(row["bytes"]), float(row["gbps"]), float(row["pct_copy_bw"])
        assert ms > 0 and nbytes > 0 and gbps > 0
        assert 0 <= pct < math.inf
        assert math.isclose(gbps, nbytes / (ms * 1e-3) / 1e9, rel_tol=1e-3)
        copy_gbps.append(gbps / pct)
    # pct_copy_bw is gbps over the copy bandwidth measured at the start: one constant.
    assert math.isclose(min(copy_gbps), max(copy_gbps), rel_tol=2e-3)
    assert math.isclose(copy_gbps[0], float(rows[0]["gbps"]), rel_tol=2e-3)


def test_smoke_sweep_measures_every_suite_pass_and_provider_with_bntriton_twice(smoke):
    out, _ = smoke
    _, rows = _rows(out / "smoke.csv")
    copies = [r for r in rows if r["suite"] == "copy"]
    assert len(copies) == 2  # start and end of the run
    data = [r for r in rows if r["suite"] != "copy"]
    assert sorted({r["suite"] for r in data}) == sorted(SUITES)
    assert {r["pass"] for r in data} == set(PASSES)
    assert {r["provider"] for r in data} == {"bntriton", "torch", "torch_compile"}
    per_key = {}
    for r in data:
        key = (r["suite"], r["shape"], r["layout"], r["dtype"], r["pass"])
        per_key.setdefault(key, []).append(r["provider"])
    for providers in per_key.values():
        assert sorted(providers) == ["bntriton", "bntriton", "torch", "torch_compile"]


def test_floor_bytes_follow_the_formula(smoke):
    out, _ = smoke
    _, rows = _rows(out / "smoke.csv")
    factor = {"fwd_train": 2, "bwd_train": 3, "fwd_eval": 2}  # tiny tensors all fit in L2
    size = {"fp32": 4, "bf16": 2}
    for r in rows:
        if r["suite"] == "copy":
            continue
        numel = math.prod(int(d) for d in r["shape"].split("x"))
        assert int(r["bytes"]) == factor[r["pass"]] * numel * size[r["dtype"]]


def test_floor_bytes_switch_when_the_reread_misses_l2():
    measure = _perf_module("measure")
    l2 = 50 * 2**20
    assert measure.floor_bytes("fwd_train", l2, l2) == 2 * l2
    assert measure.floor_bytes("fwd_train", l2 + 1, l2) == 3 * (l2 + 1)
    # backward re-reads x and dy: both must fit
    assert measure.floor_bytes("bwd_train", l2 // 2, l2) == 3 * (l2 // 2)
    assert measure.floor_bytes("bwd_train", l2 // 2 + 1, l2) == 5 * (l2 // 2 + 1)
    assert measure.floor_bytes("fwd_eval", 10 * l2, l2) == 20 * l2


def test_summary_has_every_suite_and_regenerates_from_the_csv_alone(smoke, tmp_path):
    out, proc = smoke
    written = (out / "smoke.md").read_text()
    for suite in SUITES:
        assert f"## {suite}" in written
        assert f"| {suite} | fwd_train |" in written  # a row of the overview table
    assert "CPU smoke run" in written  # never mistaken for performance
    assert "flag_gems skipped" in written  # the optional provider's absence is stated
    assert "## Overview" in proc.stdout  # the short table printed last

    # The committed files (CSV + .notes) are enough to rebuild the summary exactly.
    regenerated = tmp_path / "again.md"
    result = _run(PERF / "summarize.py", out / "smoke.csv", "--out", regenerated)
    assert result.returncode == 0, result.stderr
    assert regenerated.read_text() == written


def test_summarize_merges_a_sweep_split_in_two(smoke, tmp_path):
    out, _ = smoke
    header, rows = _rows(out / "smoke.csv")
    notes = (out / "smoke.notes").read_text()
    for part, suites in (("a", {"copy", "resnet50", "mlp"}), ("b", {"video3d", "small_batch"})):
        with open(tmp_path / f"{part}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(r for r in rows if r["suite"] in suites)
        (tmp_path / f"{part}.notes").write_text(notes)
    merged = tmp_path / "merged.csv"
    result = _run(PERF / "summarize.py", tmp_path / "a.csv", tmp_path / "b.csv", "--merge-into", merged)
    assert result.returncode == 0, result.stderr
    assert _rows(merged) == (header, [r for r in rows if r["suite"] in {"copy", "resnet50", "mlp"}]
                             + [r for r in rows if r["suite"] in {"video3d", "small_batch"}])
    summary = merged.with_suffix(".md").read_text()
    for suite in SUITES:
        assert f"## {suite}" in summary
    assert "a.csv: " in summary and "b.csv: " in summary  # each part's notes, labelled
    # Parts that share a file name (one folder per run) are labelled by their paths.
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        for suffix in (".csv", ".notes"):
            (tmp_path / part / f"sweep{suffix}").write_bytes((tmp_path / f"{part}{suffix}").read_bytes())
    same_name = [tmp_path / "a" / "sweep.csv", tmp_path / "b" / "sweep.csv"]
    result = _run(PERF / "summarize.py", *same_name, "--merge-into", tmp_path / "merged2.csv")
    assert result.returncode == 0, result.stderr
    notes = (tmp_path / "merged2.notes").read_text()
    assert f"{same_name[0]}: " in notes and f"{same_name[1]}: " in notes


def test_full_sweep_order_starts_with_the_quick_cases_then_takes_the_suites_in_turn(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))  # suites.py imports its sibling schema.py
    suites = importlib.import_module("suites")
    order = suites.sweep_order(SUITES, "full")
    full = [c for s in SUITES for c in suites.full_cases(s)]
    quick = [c for s in SUITES for c in suites.quick_cases(s)]
    assert sorted(order, key=str) == sorted(full, key=str) and len(set(order)) == len(order)
    assert order[:len(quick)] == quick
    # After the quick ones, each suite's next case in turn while every suite has one left.
    assert [c.suite for c in order[len(quick):len(quick) + 8]] == SUITES * 2
    assert suites.sweep_order(SUITES, "quick") == quick


def test_a_sweep_resumed_with_skip_measured_runs_only_what_is_missing(smoke, tmp_path):
    out, _ = smoke
    header, rows = _rows(out / "smoke.csv")
    part = tmp_path / "part.csv"
    with open(part, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        # mlp complete; small_batch cut off after its first pass's rows.
        cut = [r for r in rows if r["suite"] == "small_batch"][:3]
        writer.writerows([r for r in rows if r["suite"] in {"copy", "mlp"}] + cut)
    proc = _run(PERF / "sweep.py", "--device", "cpu", "--smoke", "--out", tmp_path, "--stem", "rest",
                "--suites", "mlp,small_batch", "--providers", "bntriton,torch", "--skip-measured", part)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, rest = _rows(tmp_path / "rest.csv")
    assert {r["suite"] for r in rest} == {"copy", "small_batch"}
    assert "1 cases left" in (tmp_path / "rest.notes").read_text()


def test_plot_writes_a_png_when_matplotlib_is_installed(smoke, tmp_path):
    out, _ = smoke
    if importlib.util.find_spec("matplotlib") is None:
        assert not (out / "smoke.png").exists()
        pytest.skip("matplotlib is optional (extra 'perf') and not installed")
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "again.png"
    result = _run(PERF / "plot.py", out / "smoke.csv", "--out", png)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _nudged_sweep(provider_class: str, tmp_path):
    """A smoke sweep of the mlp suite with one provider's training output nudged by 1%:
    far outside the check's bound."""
    driver = (
        "import sys; sys.path.insert(0, sys.argv[1]); import providers, sweep\n"
        f"forward = providers.{provider_class}.forward\n"
        f"providers.{provider_class}.forward = lambda self, x, *a: forward(self, x, *a) * (1.01 if a[-1] else 1)\n"
        "sys.exit(sweep.main(['--device', 'cpu', '--smoke', '--suites', 'mlp', '--out', sys.argv[2]]))\n"
    )
    return _run("-c", driver, PERF, tmp_path)


def test_a_provider_that_disagrees_with_torch_is_recorded_as_a_failure_not_timed(tmp_path):
    # bntriton's training output nudged by 1%: far outside the check's bound.
    result = _nudged_sweep("BnTriton", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # bntriton failed
    (csv_path,) = tmp_path.glob("*.csv")
    _, rows = _rows(csv_path)
    mine = {r["pass"]: r for r in rows if r["provider"] == "bntriton"}
    assert mine["fwd_train"]["ms"] == mine["bwd_train"]["ms"] == "fail"
    assert mine["fwd_train"]["gbps"] == mine["fwd_train"]["pct_copy_bw"] == ""
    assert float(mine["fwd_eval"]["ms"]) > 0  # eval was not nudged: still timed
    summary = csv_path.with_suffix(".md").read_text()
    assert "## Failures and errors" in summary
    assert "fail: bntriton mlp 32x16 contiguous fp32 fwd_train: y error" in summary


def test_check_compares_every_provider_with_float64_torch_on_the_same_inputs(tmp_path):
    # torch eager itself is checked (it passes on CPU); dweight summed in bf16, as torch's
    # CUDA backward does for bf16 input, is far outside the bound of the float64 reference.
    driver = (
        "import sys, dataclasses, torch; sys.path.insert(0, sys.argv[1]); import check, providers, suites\n"
        "case = suites.Case('t', (16, 8, 6, 6), 'channels_last', torch.bfloat16)\n"
        "inp = check.make_inputs(case, torch.device('cpu'))\n"
        "ref = check.reference(inp)\n"
        "assert ref.y_train.dtype == ref.dx.dtype == ref.dweight.dtype == torch.float64\n"
        "out = check.run_once(providers.Torch(), inp)\n"
        "assert check.compare(out, ref, inp, case) == {}, check.compare(out, ref, inp, case)\n"
        "low = dataclasses.replace(out, dweight=out.dweight.to(torch.bfloat16).float())\n"
        "failures = check.compare(low, ref, inp, case)\n"
        "assert list(failures) == ['bwd_train'] and failures['bwd_train'][0].startswith('dweight error'), failures\n"
    )
    result = _run("-c", driver, PERF, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_sweep_without_smoke_is_refused():
    result = _run(PERF / "sweep.py", "--device", "cpu", "--suites", "mlp", timeout=120)
    assert result.returncode == 2
    assert "--smoke" in result.stderr


@pytest.mark.parametrize("fused", [False, True])
def test_host_overhead_script_runs(fused):
    """perf/host_overhead.py stubs the launches process-wide, so it runs in a subprocess."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "perf" / "host_overhead.py"), "--calls", "20", "--rounds", "3",
         *(["--fused"] if fused else [])],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr
    label = "BatchNormAct2d relu" if fused else "BatchNorm2d"
    rows = [line[len(label):].split() for line in out.stdout.splitlines() if line.startswith(label + " ")]
    assert len(rows) == 4  # training forward, forward + backward, eval, eval no_grad: ours, torch's, ratio
    for row in rows:
        ours, theirs, ratio = map(float, row[-3:])
        assert ours > 0 and theirs > 0 and ratio > 0
    assert ("nn.ReLU" in out.stdout) == fused


def test_backward_host_script_times_every_call():
    proc = _run(PERF / "backward_host.py", "--calls", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| cpu")]
    assert len(rows) == 9  # the two trivial graphs, then per implementation forward and backwards
    assert all(float(row[-1]) > 0 for row in rows)


def test_an_inaccurate_baseline_is_timed_and_said_so(tmp_path):
    # torch eager is the baseline every speedup is taken against: outside the float64
    # bound (as its CUDA half-precision dweight is), it is still timed, and the notes say so.
    result = _nudged_sweep("Torch", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr  # bntriton passed
    (csv_path,) = tmp_path.glob("*.csv")
    _, rows = _rows(csv_path)
    theirs = {r["pass"]: r for r in rows if r["provider"] == "torch" and r["suite"] == "mlp"}
    assert float(theirs["fwd_train"]["ms"]) > 0
    notes = csv_path.with_suffix(".notes").read_text()
    assert "inaccurate, timed as the baseline: torch mlp 32x16 contiguous fp32 fwd_train: y error" in notes


def test_cpu_benchmark_writes_its_table_and_checks_the_far_eval_against_float64(tmp_path):
    """perf/cpu.py (the native CPU path against torch), quick: the CSV in the schema, a
    row per pass and provider, and the markdown table with a verdict on every targeted
    pass and, on the far eval pass (where torch's fold may leave the y bound), both
    providers' errors against float64 instead: the run stops if bntriton's leaves it."""
    out = tmp_path / "cpu"
    proc = _run(PERF / "cpu.py", "--quick", "--out", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    cpu = _perf_module("cpu")
    timed = [r for r in rows if r["pass"] != "copy"]
    assert {(r["pass"], r["provider"]) for r in timed} == {
        (p, provider) for p in cpu.PASSES for provider in ("torch", "bntriton")}
    table = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| 32x64")]
    assert len(table) == 2 * len(cpu.PASSES)
    for line in table:
        cells = [cell.strip() for cell in line.split("|")]
        pass_name, verdict = cells[5], cells[9]
        if pass_name in cpu.TARGETS:
            assert verdict.startswith(f"<= {cpu.TARGETS[pass_name]}: ")
        elif pass_name in cpu.ACCURACY_ROWS:
            assert verdict.startswith("errors: torch ") and "y bound" in verdict
        else:
            assert verdict == ""


def test_plan_ab_smoke_prints_both_experiments():
    """perf/plan_ab.py's tooling through the interpreter: each experiment's table, one row
    per pass, both variants timed (the times themselves mean nothing on a CPU)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "perf" / "plan_ab.py"), "--device", "cpu", "--smoke", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr
    assert "## nchw-tiles" in out.stdout and "## backward-sums" in out.stdout
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 2x4x16x16")]
    assert [r[2].strip() for r in rows] == ["fwd_train", "bwd_train", "fwd_eval", "bwd_train"]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    refused = subprocess.run([sys.executable, str(root / "perf" / "plan_ab.py"), "--device", "cpu"],
                             capture_output=True, text=True, timeout=120, cwd=root,
                             env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert refused.returncode == 2 and "--smoke" in refused.stderr  # CPU timings would be meaningless


def test_resnet50_step_runs_every_provider_compiled_or_not(tmp_path):
    """perf/resnet50_step.py's providers on a tiny network (CPU, native path): each gives
    a time, none an error row.  Compiled ones take aot_eager here (Inductor's C++ builds
    cost minutes on two cores); the GPU runs use Inductor."""
    import os

    providers = "bntriton,bntriton_compile,fused_compile"
    out = tmp_path / "step.csv"
    env = {**os.environ, "BNTRITON_CPU_BACKEND": "native"}
    proc = subprocess.run(
        [sys.executable, str(PERF / "resnet50_step.py"), "--device", "cpu", "--smoke", "--dtype", "float32",
         "--layout", "nchw", "--providers", providers, "--compile-backend", "aot_eager", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    _, rows = _rows(out)
    assert sorted({r["provider"] for r in rows}) == sorted(providers.split(","))
    for row in rows:
        assert float(row["ms"]) > 0, (row, proc.stderr)


def test_compiled_cnn_cpu_times_every_provider():
    """perf/compiled_cnn_cpu.py end to end (aot_eager and one round: the tooling only)."""
    result = _run(PERF / "compiled_cnn_cpu.py", "--batch", "4", "--size", "8", "--rounds", "1",
                  "--compile-backend", "aot_eager")
    assert result.returncode == 0, result.stderr
    for provider in ("torch", "bntriton", "torch_compile", "bntriton_compile"):
        assert re.search(rf"^  {provider} +[0-9.]+ ms$", result.stdout, re.M), result.stdout
    assert "bntriton_compile / torch_compile:" in result.stdout
