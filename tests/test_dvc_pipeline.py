"""The data stages as a real DVC pipeline, in a temporary clone of this working tree, on the smoke profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tracked and untracked-but-not-ignored files of this working tree, committed in a fresh git repo."""
    root = tmp_path_factory.mktemp("clone")
    listed = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh(sys.executable, "-m", "lmforge.cli", "params", "use", "smoke", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone", cwd=root)
    return root


STAGES = (
    "ingest", "validate", "preprocess", "pretrain@encoder", "pretrain@decoder",
    "finetune@sentiment", "finetune@ner", "finetune@continuation",
    "evaluate@sentiment", "evaluate@ner", "evaluate@continuation",
    "optimize@sentiment", "optimize@ner", "optimize@continuation",
    "promote@sentiment", "promote@ner", "promote@continuation",
)  # fmt: skip


def ran(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def test_repro_runs_then_skips_then_reruns_only_what_a_param_touches(clone: Path):
    first = sh("dvc", "repro", cwd=clone)
    assert ran(first.stdout) == list(STAGES)
    assert (clone / "data/processed/tokenizer/tokenizer.json").is_file()
    assert (clone / "reports/validation/data_docs/sentiment/index.html").is_file()
    assert (clone / "models/finetuned/sentiment/model.safetensors").is_file()
    metrics = sh("dvc", "metrics", "show", "--json", cwd=clone).stdout
    assert "reports/eval/sentiment/metrics.json" in metrics and "macro_f1" in metrics
    assert (clone / "mlflow.db").is_file() is False  # the tests' MLflow store is the session's, not the clone's
    promotion = json.loads((clone / "reports/promotion/sentiment.json").read_text())
    assert promotion["decision"] in {"pass", "fail"} and promotion["reasons"]
    assert json.loads((clone / "reports/optimize/sentiment/best_params.json").read_text())["tuned"] is True

    started = time.perf_counter()
    second = sh("dvc", "repro", cwd=clone)
    print(f"no-op dvc repro took {time.perf_counter() - started:.2f}s")
    assert ran(second.stdout) == []
    assert "Data and pipelines are up to date" in second.stdout

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["promote"]["max_latency_ratio"] = 2.0
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    third = sh("dvc", "repro", cwd=clone)
    assert ran(third.stdout) == ["promote@sentiment", "promote@ner", "promote@continuation"]
    assert "promote.max_latency_ratio" in sh("dvc", "params", "diff", cwd=clone).stdout
    assert sh("dvc", "status", cwd=clone).stdout.strip().endswith("Data and pipelines are up to date.")


def test_a_broken_expectation_stops_the_pipeline_before_preprocess(clone: Path):
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["validate"]["max_chars"] = 5  # every review is longer than this
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    result = sh("dvc", "repro", cwd=clone, check=False)
    assert result.returncode != 0
    assert "expect_column_value_lengths_to_be_between(text)" in result.stderr
    assert "Running stage 'preprocess'" not in result.stdout
