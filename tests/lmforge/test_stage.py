"""The stage contract: its command line, and the paths dvc.yaml gives each stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.stage import dvc_paths, item_of, parse_command, report_files, stage_of
from tests.conftest import REPO


def test_every_path_is_a_required_option(capsys: pytest.CaptureFixture[str]):
    parser = stage_of("promote").parser()
    complete = ["--params", "p.yaml", "--task", "t", "--optimized", "o", "--dataset", "d", "--validation", "v.json",
                "--report", "r.json", "--metrics", "m.json"]  # fmt: skip
    args = parser.parse_args(complete)
    assert stage_of("promote").paths_from(args).validation == Path("v.json")
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(complete[:-2])  # no --metrics: no default path to fall back on
    assert exited.value.code == 2 and "--metrics" in capsys.readouterr().err


def test_a_foreach_item_that_is_not_declared_names_the_key_and_the_choices():
    with pytest.raises(LmforgeError, match=r"^finetune.tasks: no task named 'nope' \(have: a, b\)$"):
        item_of({"a": 1, "b": 2}, "nope", "finetune.tasks")
    assert item_of({"a": 1}, "a", "pretrain.models") == 1


def test_a_command_of_another_stage_module_is_refused():
    with pytest.raises(LmforgeError, match=r"cmd must start with `python -m stages\.ingest`"):
        parse_command("ingest", "python -m stages.validate --params params.yaml")


def test_paths_come_from_dvc_yaml_with_foreach_items_resolved():
    paths = dvc_paths("promote@ner", REPO)
    assert paths.dataset == Path("data/raw/people_daily")  # finetune.tasks.ner.dataset, resolved by DVC
    assert paths.validation == Path("reports/validation/people_daily.json")
    with pytest.raises(LmforgeError, match=r"dvc\.yaml: no stage 'promote@nope'"):
        dvc_paths("promote@nope", REPO)


def test_each_stage_report_is_where_status_and_the_flow_summary_read_it():
    reports = report_files(REPO)
    assert list(reports)[:3] == ["ingest", "validate", "preprocess"]  # in DAG order
    assert reports["evaluate@sentiment"][1] == REPO / "reports/evaluate/sentiment/metrics.json"
    assert reports["promote@sentiment"][1] == REPO / "reports/promote/sentiment.json"
    assert {stage.name for stage, _ in reports.values()} == {"ingest", "validate", "preprocess", "pretrain",
                                                             "finetune", "evaluate", "optimize", "promote"}  # fmt: skip
