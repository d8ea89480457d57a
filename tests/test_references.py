"""Every file the code's docstrings and comments, or the docs, name is in the repository.

A reader following "see handlers.py" or "docs/design.md" must find it; a
reference to a file that moved or never was here (a design document outside
the repository) fails this test.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A path-like word ending in a file name with one of these suffixes.
REFERENCE = re.compile(r"(?<![\w/.{*-])[\w.-]*[\w/.-]*\w\.(?:py|md|toml)\b")


def tracked() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / name for name in listed if (REPO / name).is_file()]


FILES = tracked()
NAMES = {path.name for path in FILES}


def prose_of(path: Path) -> str:
    """The docstrings and comments of a Python file; all of a Markdown file."""
    text = path.read_text(errors="replace")
    if path.suffix != ".py":
        return text
    parts = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node)
            if docstring:
                parts.append(docstring)
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            parts.append(token.string)
    return "\n".join(parts)


def missing_references(path: Path) -> list[str]:
    missing = []
    for reference in REFERENCE.findall(prose_of(path)):
        if reference.startswith("/") or "://" in reference:
            continue  # a path on the machine, not in the repository
        # Relative to the repository, the naming file, or the package (docs say
        # "service/daemon.py").
        candidates = [REPO / reference, path.parent / reference, REPO / "fusestore" / reference]
        if any(c.exists() and c.resolve().is_relative_to(REPO) for c in candidates):
            continue
        if "/" not in reference and reference in NAMES:
            continue  # a module named by its file name, as its package's siblings do
        missing.append(reference)
    return missing


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if p.suffix in (".py", ".md") and ".hypothesis" not in p.parts],
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_every_file_named_exists(path: Path) -> None:
    assert missing_references(path) == []
