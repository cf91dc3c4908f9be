"""Which code a generated document describes.

Generated documents (the demo's report, the conformance page) record a digest of the
package's source they came from; tests/test_generated_docs.py compares it with the
digest of the code checked out, so that a change to the code without a regenerated
document fails CI instead of leaving the document quietly stale.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def source_digest() -> str:
    """The first 12 hex digits of a SHA-256 over every ``.py`` file of the package (paths
    and contents, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def stamp() -> str:
    """The phrase a generated document carries: ``bntriton source digest `<digest>```."""
    return f"bntriton source digest `{source_digest()}`"
