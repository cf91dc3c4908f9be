"""Which code a generated document describes.

Generated documents (the demo's report, the conformance page) record a digest of the
package's source they came from; tests/test_generated_docs.py compares it with the
digest of the code checked out, so that a change to the code without a regenerated
document fails CI instead of leaving the document quietly stale.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def source_digest() -> str:
    """The first 12 hex digits of a SHA-256 over every ``.py`` file of the package: its
    path and its code as Python parses it, without comments and docstrings (editing
    those changes no result, and needs no regenerated document)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(b"\0")
        digest.update(_code_of(path.read_text()).encode())
    return digest.hexdigest()[:12]


def _code_of(source: str) -> str:
    """``source``'s syntax tree with every docstring dropped, as text."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def stamp() -> str:
    """The phrase a generated document carries: ``bntriton source digest `<digest>```."""
    return f"bntriton source digest `{source_digest()}`"
