"""lmforge/ is the library: it imports nothing from the folders above it (flows/ composes stages,
stages/ only parses paths), so the library can be read, tested and installed on its own."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO


def imports_from_above(package: Path) -> list[str]:
    """`file: module` for every import of flows or stages in the package, anywhere in a file."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.relative_to(package.parent)}: {name}" for name in names
                      if name.split(".")[0] in ("flows", "stages")]  # fmt: skip
    return found


def test_lmforge_imports_nothing_from_flows_or_stages():
    assert imports_from_above(REPO / "lmforge") == []


def test_the_check_finds_an_import_from_flows_inside_a_function(tmp_path: Path):
    (tmp_path / "lmforge").mkdir()
    (tmp_path / "lmforge" / "cli.py").write_text("def run():\n    from flows.pipeline import pipeline\n")
    assert imports_from_above(tmp_path / "lmforge") == ["lmforge/cli.py: flows.pipeline"]
