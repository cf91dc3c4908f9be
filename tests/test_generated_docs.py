"""The generated documents describe the code checked out: each records the digest of
the package's source it was generated from (bntriton/provenance.py), and a code change
without a regenerated document fails here, with the command that regenerates it."""
from __future__ import annotations

from pathlib import Path

import pytest

from bntriton.provenance import stamp

ROOT = Path(__file__).resolve().parents[1]

GENERATED = {
    "docs/demo/report.md": "python -m bntriton demo --quick --out docs/demo",
    "docs/conformance.md": "python docs/make_conformance.py",
}


@pytest.mark.parametrize("document", GENERATED)
def test_generated_document_describes_this_code(document):
    text = (ROOT / document).read_text()
    assert stamp() in text, f"{document} is stale: regenerate it with `{GENERATED[document]}`"


def test_the_digest_ignores_comments_and_docstrings_but_not_code():
    from bntriton.provenance import _code_of

    base = _code_of('"""Module."""\ndef f(x):\n    """Doc."""\n    return x + 1  # add one\n')
    assert base == _code_of('"""Other words."""\ndef f(x):\n    return x + 1\n')
    assert base != _code_of('"""Module."""\ndef f(x):\n    """Doc."""\n    return x + 2\n')
