"""The whole pipeline as a real DVC pipeline, in a temporary clone of this working tree, on the smoke profile."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import clone_working_tree, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke profile cut to one model and one task: every kind of stage, half the stages.

    The whole smoke DAG (two models, three tasks) runs in tests/flows/test_pipeline_flow.py, each
    stage through `dvc repro --single-item`; here plain `dvc repro` runs the cut one.
    """
    clone = clone_working_tree(tmp_path_factory.mktemp("clone"))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["pretrain"]["models"] = {"encoder": params["pretrain"]["models"]["encoder"]}
    for section, key in (("finetune", "tasks"), ("optimize", "n_trials"), ("promote", "floors")):
        params[section][key] = {"sentiment": params[section][key]["sentiment"]}
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "one model, one task", cwd=clone)
    return clone


STAGES = ("ingest", "validate", "preprocess", "pretrain@encoder", "finetune@sentiment", "evaluate@sentiment",
          "optimize@sentiment", "promote@sentiment")  # fmt: skip


def ran(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def test_repro_runs_then_skips_then_reruns_only_what_a_param_touches(clone: Path):
    first = sh("dvc", "repro", cwd=clone)
    assert ran(first.stdout) == list(STAGES)
    assert (clone / "data/processed/tokenizer/tokenizer.json").is_file()
    assert (clone / "reports/validation/data_docs/sentiment/index.html").is_file()
    assert (clone / "models/finetuned/sentiment/model.safetensors").is_file()
    metrics = sh("dvc", "metrics", "show", "--json", cwd=clone).stdout
    assert "reports/evaluate/sentiment/metrics.json" in metrics and "macro_f1" in metrics
    assert (clone / "mlflow.db").is_file() is False  # the tests' MLflow store is the session's, not the clone's
    promotion = json.loads((clone / "reports/promote/sentiment.json").read_text())
    # The task's baseline contends first and takes @champion; the 10-step smoke model loses to it.
    assert promotion["baseline_decision"] == "pass"
    assert promotion["champion_after"]["version"] == promotion["baseline_version"] != promotion["version"]
    assert promotion["decision"] == "fail" and any("baseline" in reason for reason in promotion["reasons"])
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
    assert ran(third.stdout) == ["promote@sentiment"]
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
