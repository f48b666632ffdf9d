"""The README and the documentation site: short first page, no dead links, every page reachable,
the params reference complete, and no page speaking of how the project was made rather than what it does."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

from lmforge.params import Params, params_to_dict
from tests.conftest import REPO

DOCS = REPO / "docs"
HOOK = DOCS / "hooks" / "params_reference.py"
README_MAX_LINES = 200
# Phrases of a lab notebook, not of documentation: the docs say what is, measured where and when.
DEVELOPMENT_PHRASES = [
    r"\bsessions?\b",
    r"\b(?:earlier|previous|old|first|former) defaults?\b",
    r"\bthe default now\b",
    r"\bnow the default\b",
    r"\bthe one before\b",
    r"\bbefore that\b",
    r"\bwe (?:tried|measured|found|changed)\b",
    r"\bthis machine's\b",
]


def pages() -> list[Path]:
    return sorted(path for path in DOCS.rglob("*.md") if "hooks" not in path.relative_to(DOCS).parts)


def load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("params_reference_hook", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as MkDocs loads a hook
    spec.loader.exec_module(module)
    return module


def leaf_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys += leaf_keys(value, f"{dotted}.") if isinstance(value, dict) and value else [dotted]
    return keys


def documents(pattern: str, key: str) -> bool:
    """Does a documented key pattern (`finetune.tasks.<task>.training.max_steps`) cover `key`? An empty
    mapping (`orchestrate.pools: {}`) is covered by the row of its entries (`orchestrate.pools.<stage>`)."""
    wanted, given = pattern.split("."), key.split(".")
    if len(wanted) == len(given) + 1 and re.fullmatch(r"<\w+>", wanted[-1]):
        wanted = wanted[:-1]
    return len(wanted) == len(given) and all(
        w == g or re.fullmatch(r"<\w+>", w) for w, g in zip(wanted, given, strict=True)
    )


def nav_files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [file for value in nav.values() for file in nav_files(value)]
    return [file for item in nav for file in nav_files(item)]


def test_the_readme_is_a_first_page_of_at_most_200_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_links_only_to_files_in_the_repository():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, flags=re.MULTILINE)
    assert targets, "the README links into docs/"
    for target in targets:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE), f"{target}: links outside"
        path = (REPO / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(REPO), f"{target}: outside the repository"
        assert path.exists(), f"{target}: no such file in the repository"


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = nav_files(config["nav"])
    on_disk = [str(path.relative_to(DOCS)) for path in pages()]
    assert sorted(listed) == sorted(set(listed)), "a page is listed twice"
    assert set(on_disk) - set(listed) == set(), "pages missing from mkdocs.yml's nav"
    assert set(listed) - set(on_disk) == set(), "nav entries without a page"
    assert str(HOOK.relative_to(REPO)) in config["hooks"]


def test_the_params_reference_names_every_key_of_params_yaml():
    hook = load_hook()
    reference = hook.render()
    documented = hook.documented_keys(reference)
    missing = [
        key for key in leaf_keys(params_to_dict(Params())) if not any(documents(pattern, key) for pattern in documented)
    ]
    assert not missing, f"keys of params.yaml the reference does not document: {missing}"
    assert "finetune.tasks.<task>.training.max_steps" in documented
    assert "ingest.datasets.<dataset>.source.kind" in documented


def test_the_params_page_is_filled_in_from_the_schema_and_the_profiles():
    hook = load_hook()
    source = (DOCS / "params.md").read_text(encoding="utf-8")
    assert hook.MARKER in source
    page = SimpleNamespace(file=SimpleNamespace(src_uri="params.md"))
    config = {"config_file_path": str(REPO / "mkdocs.yml")}
    built = hook.on_page_markdown(source, page, config, None)
    assert hook.MARKER not in built and "<!-- profile:" not in built
    assert "| `promote.margin` |" in built
    for profile in ("smoke", "gpu"):
        assert (REPO / "profiles" / f"{profile}.yaml").read_text(encoding="utf-8").strip() in built
    with pytest.raises(ValueError, match="marker"):
        hook.on_page_markdown(source.replace(hook.MARKER, ""), page, config, None)


@pytest.mark.parametrize("path", [REPO / "README.md", *pages()], ids=lambda path: str(path.relative_to(REPO)))
def test_no_page_speaks_of_how_the_project_was_developed(path: Path):
    text = path.read_text(encoding="utf-8")
    if path == DOCS / "params.md":
        text += load_hook().render()  # the generated part too
    found = [match.group(0) for phrase in DEVELOPMENT_PHRASES for match in re.finditer(phrase, text, re.IGNORECASE)]
    assert not found, f"{path.relative_to(REPO)}: {found}"
