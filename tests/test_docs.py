"""Every Python block in README.md and docs/ runs as pasted.

Each block is a complete program (imports, a model, an input) and runs in a fresh
interpreter in an empty folder, on the default CPU backend (what a user gets).  A block
that needs more says so in its first line:

* ``# needs a CUDA GPU``: run where one is present, skipped elsewhere;
* ``# needs a process group``: run under ``torch.distributed.run`` with two CPU processes
  (gloo).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for path in DOCUMENTS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text[:match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{line}")


def _run(command, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "BNTRITON_CPU_BACKEND"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("code", list(_blocks()))
def test_python_block_runs_as_pasted(code, tmp_path):
    first = code.splitlines()[0] if code.strip() else ""
    script = tmp_path / "block.py"
    script.write_text(code)
    if first.startswith("# needs a CUDA GPU") and not torch.cuda.is_available():
        pytest.skip("the block needs a CUDA GPU")
    if first.startswith("# needs a process group"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(script)]
    else:
        command = [sys.executable, str(script)]
    result = _run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


def test_every_document_block_is_found():
    """The pattern sees the blocks (a test that finds none would pass vacuously)."""
    assert len(list(_blocks())) >= 7


def test_api_page_lists_every_public_name_once():
    import bntriton

    page = (ROOT / "docs" / "api.md").read_text()
    listed = re.findall(r"^- (`[^:]*?`(?:, `[^:]*?`)*):", page, re.M)
    names = [name.strip("`") for line in listed for name in line.split(", ") if not name.startswith("`bntriton ")]
    assert sorted(names) == sorted(bntriton.__all__)


def test_relative_links_point_to_files():
    broken = []
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert broken == []
