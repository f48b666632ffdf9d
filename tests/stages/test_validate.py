from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lmforge import preprocess, validate
from lmforge.errors import DataError, ValidationFailed
from lmforge.schema import ValidateParams
from lmforge.validate import ValidatePaths
from tests.conftest import SmokeRun, run_stage, tree_digest


def test_smoke_data_passes_every_expectation_and_writes_data_docs(smoke_run: SmokeRun):
    for dataset in ("sentiment", "people_daily"):
        report = json.loads((smoke_run.validation / f"{dataset}.json").read_text())
        assert report["success"] and report["failed"] == 0
        assert report["evaluated"] >= 5
        assert (smoke_run.validation / "data_docs" / dataset / "index.html").is_file()
    kinds = {
        e["expectation"] for e in json.loads((smoke_run.validation / "people_daily.json").read_text())["expectations"]
    }
    assert {"expect_column_pair_values_to_be_equal", "expect_column_values_to_be_unique"} <= kinds


@pytest.fixture
def raw_copy(smoke_run: SmokeRun, tmp_path: Path) -> Path:
    """A private copy of the smoke run's data/raw, holding the sentiment dataset only, to break."""
    raw = tmp_path / "raw"
    shutil.copytree(smoke_run.raw / "sentiment", raw / "sentiment")
    return raw


def rewrite(raw: Path, dataset: str, split: str, change) -> None:
    path = raw / dataset / f"{split}.parquet"
    frame = change(pd.read_parquet(path))
    frame.to_parquet(path, index=False)


def test_label_outside_declared_set_fails_naming_expectation_and_value(raw_copy: Path, tmp_path: Path):
    rewrite(raw_copy, "sentiment", "val", lambda f: f.assign(label=f["label"].where(f.index > 1, "neutral")))
    with pytest.raises(ValidationFailed) as caught:
        validate.run(ValidateParams(), ValidatePaths(raw_copy, tmp_path / "validation", tmp_path / "validate.json"))
    message = str(caught.value)
    assert "dataset 'sentiment'" in message
    assert "expect_column_values_to_be_in_set(label)" in message and "'neutral'" in message
    assert "2 of" in message
    report = json.loads((tmp_path / "validation" / "sentiment.json").read_text())
    assert not report["success"]
    # and preprocess refuses to build on data that failed validation
    with pytest.raises(DataError, match="failed validation"):
        preprocess.validated_manifest(raw_copy, tmp_path / "validation", "sentiment")


def test_leakage_between_splits_is_caught(raw_copy: Path, tmp_path: Path):
    leaked = pd.read_parquet(raw_copy / "sentiment" / "test.parquet")["text"].iloc[0]
    rewrite(raw_copy, "sentiment", "train", lambda f: f.assign(text=f["text"].where(f.index > 0, leaked)))
    with pytest.raises(ValidationFailed, match=r"expect_column_values_to_be_unique\(text\) in suite sentiment.leakage"):
        validate.run(ValidateParams(), ValidatePaths(raw_copy, tmp_path / "validation", tmp_path / "validate.json"))


def test_batches_and_partitions_find_what_one_batch_finds(raw_copy: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """Validation reads a dataset a batch at a time: the same counts and verdicts as reading it whole."""
    leaked = pd.read_parquet(raw_copy / "sentiment" / "test.parquet")["text"].iloc[0]
    rewrite(raw_copy, "sentiment", "train", lambda f: f.assign(text=f["text"].where(f.index > 0, leaked)))
    rewrite(raw_copy, "sentiment", "val", lambda f: f.assign(label=f["label"].where(f.index % 50 != 7, "neutral")))

    def outcomes(out: str) -> list[dict]:
        params = ValidateParams(on_failure="warn")
        validate.run(params, ValidatePaths(raw_copy, tmp_path / out, tmp_path / f"{out}.json"))
        return json.loads((tmp_path / out / "sentiment.json").read_text())["expectations"]

    whole = outcomes("whole")
    monkeypatch.setattr(validate, "BATCH_ROWS", 37)
    monkeypatch.setattr(validate, "partition_count", lambda size: 5)
    batched = outcomes("batched")
    assert [(o["success"], o["unexpected_count"], o["element_count"]) for o in batched] == [
        (o["success"], o["unexpected_count"], o["element_count"]) for o in whole
    ]
    failed = {o["suite"].split(".")[-1] + "/" + o["column"]: o for o in batched if not o["success"]}
    assert set(failed) == {"rows/label", "leakage/text"}
    assert set(failed["leakage/text"]["examples"]) == {leaked} and failed["rows/label"]["examples"][0] == "neutral"
    assert not (tmp_path / "batched" / ".scratch").exists()


def test_empty_text_and_class_imbalance_are_caught(raw_copy: Path, tmp_path: Path):
    rewrite(raw_copy, "sentiment", "test", lambda f: f.assign(text=f["text"].where(f.index > 0, "")))
    rewrite(raw_copy, "sentiment", "train", lambda f: f.assign(label="pos"))
    with pytest.raises(ValidationFailed):
        validate.run(ValidateParams(), ValidatePaths(raw_copy, tmp_path / "validation", tmp_path / "validate.json"))
    report = json.loads((tmp_path / "validation" / "sentiment.json").read_text())
    failed = {(e["suite"], e["expectation"]) for e in report["expectations"] if not e["success"]}
    assert ("sentiment.rows", "expect_column_value_lengths_to_be_between") in failed
    assert ("sentiment.balance", "expect_column_values_to_be_between") in failed
    assert ("sentiment.balance", "expect_column_distinct_values_to_contain_set") in failed


def test_a_class_balance_failure_names_the_classes_their_shares_and_the_keys(raw_copy: Path, tmp_path: Path):
    def skew(frame: pd.DataFrame) -> pd.DataFrame:  # about 2% "neg", the rest "pos"
        return frame.assign(label=["neg" if i % 50 == 0 else "pos" for i in range(len(frame))])

    rewrite(raw_copy, "sentiment", "train", skew)
    with pytest.raises(ValidationFailed) as caught:
        validate.run(ValidateParams(), ValidatePaths(raw_copy, tmp_path / "validation", tmp_path / "validate.json"))
    message = str(caught.value)
    assert "expect_column_values_to_be_between(train_fraction) in suite sentiment.balance: 2 of 2 classes" in message
    assert re.search(r"'neg' 2\.\d%, 'pos' 97\.\d%", message)  # the smallest share first
    assert "validate.min_class_fraction 0.05" in message and "validate.max_class_fraction 0.95" in message
    assert len(message.splitlines()) == 1


def test_tags_and_lengths_of_token_sequences(smoke_run: SmokeRun, tmp_path: Path):
    raw = tmp_path / "raw"
    shutil.copytree(smoke_run.raw / "people_daily", raw / "people_daily")

    def corrupt(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame.at[0, "tags"] = [*frame.at[0, "tags"][:-1], "B-MISC"]
        frame.at[1, "tags"] = list(frame.at[1, "tags"])[:-1]
        return frame

    rewrite(raw, "people_daily", "val", corrupt)
    with pytest.raises(ValidationFailed):
        validate.run(ValidateParams(), ValidatePaths(raw, tmp_path / "validation", tmp_path / "validate.json"))
    report = json.loads((tmp_path / "validation" / "people_daily.json").read_text())
    failed = {e["expectation"]: e for e in report["expectations"] if not e["success"]}
    assert failed["expect_column_values_to_be_in_set"]["examples"] == ["B-MISC"]
    assert failed["expect_column_pair_values_to_be_equal"]["unexpected_count"] == 1


def test_warn_mode_reports_and_goes_on(raw_copy: Path, tmp_path: Path):
    rewrite(raw_copy, "sentiment", "val", lambda f: f.assign(label=f["label"].where(f.index > 0, "neutral")))
    paths = ValidatePaths(raw_copy, tmp_path / "v", tmp_path / "validate.json")
    reports = validate.run(ValidateParams(on_failure="warn"), paths)
    assert not reports.datasets["sentiment"].success
    assert json.loads((tmp_path / "validate.json").read_text())["datasets"]["sentiment"]["failed"] == 1


def test_stage_exit_code_and_one_line_on_failure(raw_copy: Path, tmp_path: Path):
    rewrite(raw_copy, "sentiment", "val", lambda f: f.assign(label=f["label"].where(f.index > 0, "neutral")))
    before = tree_digest(raw_copy)
    params = tmp_path / "params.yaml"
    params.write_text("validate: {on_failure: fail}\n")
    result = run_stage(
        "validate",
        "--params",
        params,
        "--raw",
        raw_copy,
        "--out",
        tmp_path / "v",
        "--report",
        tmp_path / "validate.json",
    )
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "expect_column_values_to_be_in_set(label)" in lines[0] and "neutral" in lines[0]
    assert tree_digest(raw_copy) == before  # validate reads the data and never rewrites it
