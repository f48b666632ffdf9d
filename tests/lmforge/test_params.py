from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.errors import ParamsError
from lmforge.params import Params, deep_merge, params_to_dict, parse_params, profile_params, render_params_yaml

REPO = Path(__file__).resolve().parents[2]


def defaults() -> dict:
    return params_to_dict(Params())


def test_committed_params_yaml_is_the_default_profile():
    # params.yaml is rendered from the schema; a hand edit that drifted from it would show here.
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert parse_params(committed) == Params()


def test_rendered_yaml_round_trips_and_carries_help_text():
    text = render_params_yaml(profile_params("smoke"), "smoke")
    assert parse_params(yaml.safe_load(text)) == profile_params("smoke")
    assert "# seed of the row sample and of the train/val/test split" in text


def test_profiles_differ_only_where_they_say():
    smoke, default = params_to_dict(profile_params("smoke")), defaults()
    assert smoke["ingest"]["datasets"]["sentiment"]["max_rows"] == 600
    assert smoke["ingest"]["seed"] == default["ingest"]["seed"]
    assert profile_params("gpu").preprocess.block_size > Params().preprocess.block_size
    with pytest.raises(ParamsError, match="unknown profile 'fast'"):
        profile_params("fast")


def test_deep_merge_keeps_siblings_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    merged = deep_merge(base, {"a": {"b": 5}, "d": [2]})
    assert merged == {"a": {"b": 5, "c": 2}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_check_fails_on_unknown_key_with_one_line(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(deep_merge(defaults(), {"preprocess": {"block_sise": 64}})))
    result = lmforge("params", "check", "--params", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {bad}: preprocess.block_sise: unknown key"]


def test_cli_use_writes_a_valid_profile_and_check_accepts_it(tmp_path: Path):
    target = tmp_path / "params.yaml"
    assert lmforge("params", "use", "smoke", "--params", str(target), cwd=tmp_path).returncode == 0
    assert lmforge("params", "check", "--params", str(target), cwd=tmp_path).returncode == 0
    assert parse_params(yaml.safe_load(target.read_text())) == profile_params("smoke")


def test_cli_check_names_a_missing_file(tmp_path: Path):
    result = lmforge("params", "check", "--params", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.yaml: file not found" in result.stderr


@pytest.mark.parametrize(
    ("change", "key"),
    [({"ingest": {"datasets": {"mine": {"kind": "classification", "source": {
        "kind": "local", "path": "/home/me/reviews.csv"}}}}}, "ingest.datasets.mine.source.path"),
     ({"ingest": {"datasets": {"mine": {"kind": "classification", "source": {
        "kind": "local", "path": "data/../../reviews.csv"}}}}}, "ingest.datasets.mine.source.path"),
     ({"pretrain": {"models": {"mine": {"architecture": "hf", "source": "../models/bert"}}}},
      "pretrain.models.mine.source"),
     ({"promote": {"model_prefix": "a'b; rm"}}, "promote.model_prefix")],
)  # fmt: skip
def test_paths_outside_the_repository_and_unsafe_names_are_refused_naming_the_key(change: dict, key: str):
    """DVC sees only what is inside the repository, and names go into registry names, filters and paths."""
    with pytest.raises(ParamsError, match=re.escape(key)):
        parse_params(change)
