"""The `lmforge` command: `params` run as a user runs it (a subprocess); `status`, `rollback` and `compare`
in-process through typer's runner (they import every stage once, which a subprocess would pay each time)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from lmforge import registry, tracking
from lmforge.artifacts import BaselineScores, EvaluateReport, PerExample, PromoteReport, ValidateReport, VersionRef
from lmforge.cli import app

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {"ingest", "validate", "preprocess", "pretrain", "finetune", "evaluate", "optimize", "promote",
            "orchestrate"}  # fmt: skip


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


# --- params ----------------------------------------------------------------------------------------


def test_params_check_accepts_the_committed_params_yaml(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = lmforge("params", "check", cwd=tmp_path)  # --params defaults to ./params.yaml
    assert (result.returncode, result.stdout, result.stderr) == (0, "params.yaml: ok\n", "")


def test_params_check_names_an_unknown_key_on_one_stderr_line(tmp_path: Path):
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    data["preprocess"]["tokenizer"]["vocab_sise"] = 500
    write_yaml(tmp_path / "typo.yaml", data)
    result = lmforge("params", "check", "--params", "typo.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["error: typo.yaml: preprocess.tokenizer.vocab_sise: unknown key"]


def test_params_check_of_a_missing_file_says_so(tmp_path: Path):
    result = lmforge("params", "check", "-p", "nowhere.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: nowhere.yaml: file not found\n")


def test_params_use_writes_a_profile_that_check_accepts_and_that_differs_by_profile(tmp_path: Path):
    (tmp_path / "conf").mkdir()
    used = lmforge("params", "use", "smoke", "--params", "conf/smoke.yaml", cwd=tmp_path)
    assert (used.returncode, used.stdout) == (0, "conf/smoke.yaml: now the smoke profile\n")
    assert lmforge("params", "use", "default", "--params", "default.yaml", cwd=tmp_path).returncode == 0

    checked = lmforge("params", "check", "--params", "conf/smoke.yaml", cwd=tmp_path)
    assert (checked.returncode, checked.stdout) == (0, "conf/smoke.yaml: ok\n")  # the file as it was named
    smoke_text = (tmp_path / "conf/smoke.yaml").read_text(encoding="utf-8")
    assert smoke_text.startswith("# lmforge params, profile: smoke.")
    smoke, default = yaml.safe_load(smoke_text), yaml.safe_load((tmp_path / "default.yaml").read_text())
    # profiles/smoke.yaml shrinks the tokenizer and the blocks; the schema's defaults are 8000 and 128.
    assert (smoke["preprocess"]["tokenizer"]["vocab_size"], smoke["preprocess"]["block_size"]) == (1000, 64)
    assert (default["preprocess"]["tokenizer"]["vocab_size"], default["preprocess"]["block_size"]) == (8000, 128)
    assert smoke["ingest"] != default["ingest"]
    # The committed params.yaml is the default profile as `params use default` writes it.
    assert (tmp_path / "default.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()


def test_params_use_keeps_the_users_datasets_tasks_edits_and_removals(tmp_path: Path):
    assert lmforge("params", "use", "default", cwd=tmp_path).returncode == 0
    data = yaml.safe_load((tmp_path / "params.yaml").read_text())
    data["ingest"]["datasets"]["intents"] = {
        "kind": "classification",
        "source": {
            "kind": "local",
            "path": "data/external/intents.csv",
            "text_column": "utterance",
            "label_column": "intent",
        },
    }
    data["finetune"]["tasks"]["intent"] = {**data["finetune"]["tasks"]["sentiment"], "dataset": "intents"}
    for section, key in (("finetune", "tasks"), ("optimize", "n_trials"), ("promote", "floors")):
        del data[section][key]["continuation"]
    data["evaluate"]["bootstrap_samples"] = 777
    write_yaml(tmp_path / "params.yaml", data)

    used = lmforge("params", "use", "smoke", cwd=tmp_path)
    assert used.returncode == 0, used.stderr
    assert used.stdout == (
        "params.yaml: now the smoke profile; kept yours: ingest.datasets.intents, finetune.tasks.intent, "
        "evaluate.bootstrap_samples, finetune.tasks.continuation (removed), optimize.n_trials.continuation (removed), "
        "promote.floors.continuation (removed)\n"
    )
    smoke = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert smoke["ingest"]["datasets"]["intents"]["source"]["path"] == "data/external/intents.csv"
    assert set(smoke["finetune"]["tasks"]) == {"sentiment", "ner", "intent"}
    assert smoke["evaluate"]["bootstrap_samples"] == 777  # the user's value over the profile's 100
    assert smoke["evaluate"]["max_test_samples"] == 60  # the profile's own values apply
    assert smoke["preprocess"]["tokenizer"]["vocab_size"] == 1000

    back = lmforge("params", "use", "default", cwd=tmp_path)  # and back: the smoke values go, the user's stay
    default = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert back.returncode == 0 and default["preprocess"]["tokenizer"]["vocab_size"] == 8000
    assert "intents" in default["ingest"]["datasets"] and "continuation" not in default["finetune"]["tasks"]


def test_params_use_of_an_unknown_profile_writes_nothing(tmp_path: Path):
    result = lmforge("params", "use", "tiny", "--params", "tiny.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: unknown profile 'tiny'; choose one of default, smoke, gpu, service\n"
    assert not (tmp_path / "tiny.yaml").exists()


def test_params_show_prints_every_section_with_defaults_filled_in(tmp_path: Path):
    write_yaml(tmp_path / "params.yaml", {"preprocess": {"block_size": 32}})  # one key set, the rest defaults
    result = lmforge("params", "show", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert set(shown) == SECTIONS  # `validate`, the YAML name, not the attribute's `validate_`
    assert shown["preprocess"]["block_size"] == 32
    assert shown["preprocess"]["tokenizer"]["vocab_size"] == 8000
    assert shown["promote"]["model_prefix"] == "lmforge"
    assert set(shown["finetune"]["tasks"]) == {"sentiment", "ner", "continuation"}


def test_params_show_of_a_bad_file_fails_with_one_line(tmp_path: Path):
    write_yaml(tmp_path / "params.yaml", {"ingest": {"split": {"val": 0.7}}})
    result = lmforge("params", "show", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "error: params.yaml: ingest.split.val: Input should be less than 0.5\n"


# --- status ----------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DVC project with this repository's dvc.yaml and params.yaml and no results (DVC without git)."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")  # what `dvc init --no-scm` writes
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def eval_report(task: str, primary: float, test_sha256: str = "sha-test") -> EvaluateReport:
    return EvaluateReport(
        task=task, kind="classification", test_examples=4, test_sha256=test_sha256, primary_metric="macro_f1",
        primary=primary, primary_ci_low=primary - 0.25, primary_ci_high=min(primary + 0.25, 1.0),
        higher_is_better=True, baseline=BaselineScores(name="majority", macro_f1=0.4), latency_ms_p50=1.0,
        latency_ms_p95=2.5, throughput_per_s=100.0,
    )  # fmt: skip


def test_status_without_results_says_there_are_none_yet(project: Path):
    result = invoke("status")
    assert result.exit_code == 1
    assert result.stdout == "no results yet: run `make run` (or `dvc repro`)\n"


def test_status_outside_a_repository_and_on_a_broken_report_is_one_line(project: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    ValidateReport(datasets={}).write(project / "reports/validate.json")
    (project / "reports/promote").mkdir(parents=True)
    (project / "reports/promote/sentiment.json").write_text("{}")
    broken = invoke("status")
    assert broken.exit_code == 2 and "reports/promote/sentiment.json: task: Field required" in broken.stderr
    below = project / "data"
    below.mkdir()
    monkeypatch.chdir(below)  # dvc.yaml's paths are relative to the root, not to here
    result = invoke("status")
    assert result.exit_code == 2 and "run lmforge in the repository root" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_without_a_validate_report_has_no_results_yet(project: Path):
    eval_report("sentiment", 0.75).write(project / "reports/evaluate/sentiment/metrics.json")
    result = invoke("status")
    assert (result.exit_code, result.stdout) == (1, "no results yet: run `make run` (or `dvc repro`)\n")


def test_status_reads_each_report_where_dvc_yaml_puts_it(project: Path):
    ValidateReport.model_validate({"datasets": {
        "sentiment": {"success": True, "evaluated": 12, "failed": 0},
        "people_daily": {"success": False, "evaluated": 9, "failed": 2},
    }}).write(project / "reports/validate.json")  # fmt: skip
    eval_report("sentiment", 0.75).write(project / "reports/evaluate/sentiment/metrics.json")
    PromoteReport(
        task="sentiment", registered_model="lmforge-sentiment", version="3", decision="pass", reasons=["ok: beats 0.6"],
        checks={"floor": True}, champion_before=None, champion_after=VersionRef(version="3", decision="pass",
        run_id=None), mlflow_run_id="r",
    ).write(project / "reports/promote/sentiment.json")  # fmt: skip

    result = invoke("status")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:5] == [  # validate.json is written key-sorted
        "validate    people_daily: FAILED (9 expectations)",
        "validate    sentiment: passed (12 expectations)",
        "evaluate    sentiment: macro_f1 0.7500 [0.5000, 1.0000]; baseline majority 0.4000 on 4 test examples; "
        "p95 latency 2.5 ms",
        "promote     lmforge-sentiment v3: gate PASS; @champion is v3",
        "              ok: beats 0.6",
    ]
    assert lines[5] == "results (where dvc.yaml puts them):"


# --- rollback and compare, against the session's MLflow store -------------------------------------


@pytest.fixture
def prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A params.yaml (in the working folder) whose registered models are this test's own."""
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    write_yaml(tmp_path / "params.yaml", {"promote": {"model_prefix": prefix}})
    monkeypatch.chdir(tmp_path)
    return prefix


def register_evaluated(name: str, report: EvaluateReport, y_pred: list[int], kind: str = registry.TRAINED_KIND) -> str:
    """A version of `name` registered with an evaluation run's evidence (y_true is 0, 1, 0, 1)."""
    with mlflow.start_run(experiment_id=tracking.setup()) as run:
        mlflow.log_text("flavors: {}\n", "model/MLmodel")
        mlflow.log_text(json.dumps(report.data()), "eval/metrics.json")
        mlflow.log_text(json.dumps(PerExample(y_true=[0, 1, 0, 1], y_pred=y_pred).data()), "eval/per_example.json")
    client = registry.client()
    tags = {registry.MODEL_KIND_TAG: kind}
    version = registry.register(client, name, f"runs:/{run.info.run_id}/model", run.info.run_id, tags)
    return str(version.version)


def test_rollback_moves_champion_back_then_refuses_with_one_line(prefix: str):
    name, client = f"{prefix}-sentiment", registry.client()
    for predictions in ([0, 0, 0, 0], [0, 1, 0, 0]):
        version = register_evaluated(name, eval_report("sentiment", 0.5), predictions)
        client.set_model_version_tag(name, version, "gate.decision", "pass")  # rollback returns only to a pass
        registry.crown(client, name, version)

    result = invoke("rollback", "--task", "sentiment")
    assert (result.exit_code, result.stdout) == (0, f"{name}: @champion moved from version 2 back to version 1\n")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    result = CliRunner().invoke(app, ["rollback", "-t", "sentiment"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {name}: version 1 is the first champion; nothing to roll back to\n"


def test_compare_shows_champion_and_candidate_and_the_paired_improvement(prefix: str):
    name, client = f"{prefix}-sentiment", registry.client()
    # y_true 0 1 0 1. Champion says 0 0 0 0: F1 of class 0 is 2/3, of class 1 is 0, macro 1/3. Candidate: all right.
    champion = register_evaluated(name, eval_report("sentiment", 0.3333), [0, 0, 0, 0])
    candidate = register_evaluated(name, eval_report("sentiment", 1.0), [0, 1, 0, 1])
    registry.crown(client, name, champion)
    client.set_registered_model_alias(name, "challenger", candidate)

    result = invoke("compare", "--task", "sentiment")
    assert result.exit_code == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header == "on test split sha-test (the candidate's)"
    assert lines[:2] == [
        " champion  version   1  macro_f1 0.3333 [0.0833, 0.5833]  p95 2.5 ms  gate -  trained",
        "candidate  version   2  macro_f1 1.0000 [0.7500, 1.0000]  p95 2.5 ms  gate -  trained",
    ]
    assert lines[2].startswith("candidate vs champion: improvement +0.6667, 95% lower bound ")
    assert len(lines) == 3  # no baseline registered: no baseline row


def test_compare_shows_the_registered_baseline_with_its_interval_and_paired_improvements(prefix: str):
    name, client = f"{prefix}-sentiment", registry.client()
    # y_true 0 1 0 1. The baseline gets 3 of 4 (macro-F1 0.7333) and serves; the challenger says 0 0 0 0.
    baseline = register_evaluated(name, eval_report("sentiment", 0.7333), [0, 1, 0, 0], registry.BASELINE_KIND)
    challenger = register_evaluated(name, eval_report("sentiment", 0.3333), [0, 0, 0, 0])
    registry.crown(client, name, baseline)
    client.set_registered_model_alias(name, "challenger", challenger)

    result = invoke("compare", "--task", "sentiment")
    assert result.exit_code == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header == "on test split sha-test (the candidate's)"
    assert lines[:3] == [
        " champion  version   1  macro_f1 0.7333 [0.4833, 0.9833]  p95 2.5 ms  gate -  baseline",
        "candidate  version   2  macro_f1 0.3333 [0.0833, 0.5833]  p95 2.5 ms  gate -  trained",
        " baseline  version   1  macro_f1 0.7333 [0.4833, 0.9833]  p95 2.5 ms  gate -  baseline",
    ]
    assert lines[3].startswith("candidate vs champion: improvement -0.4000, 95% lower bound ")
    assert len(lines) == 4  # the baseline is the champion: no comparison with itself


def test_compare_leaves_out_the_improvement_when_the_test_sets_differ(prefix: str):
    name, client = f"{prefix}-sentiment", registry.client()
    registry.crown(client, name, register_evaluated(name, eval_report("sentiment", 0.5, "old-split"), [0, 0, 0, 0]))
    other = register_evaluated(name, eval_report("sentiment", 1.0, "new-split"), [0, 1, 0, 1])
    result = invoke("compare", "--task", "sentiment", "--candidate", other)
    assert result.exit_code == 0, result.stderr
    header, champion, candidate = result.stdout.splitlines()
    assert header == "on test split new-split (the candidate's)"
    # Never re-scored on the candidate's split: its figure is shown, and said not to be comparable.
    assert champion.split()[0] == "champion" and champion.endswith("(on test split old-split: not comparable)")
    assert candidate.split()[0] == "candidate" and "not comparable" not in candidate


def test_compare_with_nothing_registered_fails_naming_the_model(prefix: str):
    result = CliRunner().invoke(app, ["compare", "--task", "ner"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {prefix}-ner: no @champion and no candidate to compare\n"


def test_compare_shows_the_champion_re_scored_on_the_candidates_split(prefix: str):
    from lmforge.gate import Evidence

    name, client = f"{prefix}-sentiment", registry.client()
    champion = register_evaluated(name, eval_report("sentiment", 0.5, "old-split"), [0, 0, 0, 0])
    registry.crown(client, name, champion)
    other = register_evaluated(name, eval_report("sentiment", 1.0, "new-split"), [0, 1, 0, 1])
    # What the gate records after re-scoring the champion on the new split (y_true 0 1 0 1, it says 0 1 0 0).
    rescored = Evidence(
        eval_report("sentiment", 0.7333, "new-split"), PerExample(y_true=[0, 1, 0, 1], y_pred=[0, 1, 0, 0])
    )
    with mlflow.start_run(experiment_id=tracking.setup()) as run:
        registry.record_rescore(client, client.get_model_version(name, champion), rescored, run.info.run_id)
    assert client.get_model_version(name, champion).tags["score.test_new-split"].startswith("macro_f1 0.7333 [")
    result = invoke("compare", "--task", "sentiment", "--candidate", other)
    assert result.exit_code == 0, result.stderr
    header, champion_line, candidate_line, improvement = result.stdout.splitlines()
    assert header == "on test split new-split (the candidate's)" and candidate_line.startswith("candidate")
    assert champion_line.startswith(" champion  version   1  macro_f1 0.7333") and "comparable" not in champion_line
    assert improvement.startswith("candidate vs champion: improvement +0.2667")
