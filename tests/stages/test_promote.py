from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge import promote, registry
from lmforge.artifacts import PromoteReport
from lmforge.params import Params, deep_merge, params_to_dict, parse_params
from lmforge.promote import PromotePaths
from tests.conftest import REPO, SmokeRun, run_in


@pytest.fixture(scope="module")
def candidates(smoke_evaluated: SmokeRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real sentiment candidates: the smoke model, and one fine-tuned with another seed and more steps."""
    root = tmp_path_factory.mktemp("candidates")
    params = parse_params(deep_merge(params_to_dict(smoke_evaluated.params), {
        "finetune": {"seed": 7, "tasks": {"sentiment": {"training": {"max_steps": 20, "learning_rate": 0.003}}}},
    }))  # fmt: skip
    run_in("finetune@sentiment", params, smoke_evaluated.root, out=root / "model_b", checkpoints=root / "ck",
           report=root / "model_b.json", metrics=root / "model_b.figures.json")  # fmt: skip
    run_in(
        "evaluate@sentiment",
        params,
        smoke_evaluated.root,
        model=root / "model_b",
        out=root / "b" / "candidate",
        metrics=root / "b.figures.json",
    )
    # As the optimize stage leaves them: reports/optimize/<task>/candidate holds the candidate's scores.
    (root / "a").mkdir()
    (root / "a" / "candidate").symlink_to(smoke_evaluated.root / "reports/evaluate/sentiment")
    return {"a": root / "a", "b": root / "b"}


def gate(params: Params, run: SmokeRun, optimized: Path) -> PromoteReport:
    """promote@sentiment of the candidate in `optimized` (reports/optimize/<task>-like)."""
    return promote.run(promote.section(params, "sentiment"), PromotePaths(
        optimized, run.raw / "sentiment", run.validation / "sentiment.json", optimized / "report.json",
        optimized / "figures.json"))  # fmt: skip


def settings(smoke_run: SmokeRun, prefix: str, **promote_params) -> Params:
    return parse_params(deep_merge(params_to_dict(smoke_run.params), {"promote": {"model_prefix": prefix,
                                                                                  **promote_params}}))  # fmt: skip


def version_of(report: dict | PromoteReport) -> str:
    return str(report["version"] if isinstance(report, dict) else report.version)


def test_the_baseline_contends_first_and_a_worse_trained_model_never_serves(smoke_evaluated: SmokeRun, candidates):
    import mlflow
    import pandas as pd

    run = smoke_evaluated
    strict = settings(run, "floor", floors={"sentiment": 1.01})
    failed = gate(strict, run, candidates["a"])
    assert failed.decision == "fail" and failed.champion_after is None
    assert failed.baseline_decision == "fail"  # the baseline missed the floor too: nothing serves
    assert any("misses the floor 1.01" in reason for reason in failed.reasons)
    client = registry.client()
    assert str(registry.alias_version(client, "floor-sentiment", "challenger").version) == version_of(failed)
    baseline = client.get_model_version("floor-sentiment", str(failed.baseline_version))
    assert baseline.tags["lmforge.model_kind"] == "baseline"

    report = gate(settings(run, "floor", floors={"sentiment": 0.0}), run, candidates["a"])
    assert report.baseline_version == failed.baseline_version  # the same baseline is registered once
    assert report.baseline_decision == "pass" and version_of(report) == version_of(failed)
    champion = registry.alias_version(client, "floor-sentiment", "champion")
    assert str(champion.version) == report.baseline_version and champion.tags["gate.decision"] == "pass"
    # The smoke model (10 steps) loses to TF-IDF + logistic regression: it never takes @champion.
    assert report.decision == "fail" and report.champion_before is None  # nothing served when the run started
    assert any(reason.startswith("FAIL: macro_f1 ") and " vs champion " in reason for reason in report.reasons)
    assert any("significantly worse than the baseline" in reason for reason in report.reasons)
    # The champion was evaluated on this very split: nothing re-scored, nothing said to be.
    assert report.champion_before_rescored is None and not any("re-scored" in r for r in report.reasons)
    assert champion.tags["dataset.test_sha256"] == json.loads((run.raw / "sentiment/manifest.json").read_text())[
        "test_sha256"]  # fmt: skip
    assert len(champion.tags["git_commit"]) >= 7
    served = mlflow.pyfunc.load_model("models:/floor-sentiment@champion").predict(pd.DataFrame({"text": ["质量很好"]}))
    assert set(served["label"]) <= {"neg", "pos"}  # the baseline answers the same contract as a task model
    again = gate(settings(run, "floor", floors={"sentiment": 0.0}), run, candidates["a"])
    assert again.baseline_decision == "unchanged" and again.decision == "fail"  # the serving baseline contends on
    assert str(registry.alias_version(client, "floor-sentiment", "champion").version) == report.baseline_version


def registered(client, name: str, candidate: Path) -> str:
    """Register a candidate's evaluated model without gating it."""
    model = json.loads((candidate / "candidate" / "model.json").read_text())
    return str(registry.register(client, name, model["model_uri"], model["run_id"], {}).version)


def champion_by_hand(client, name: str, candidate: Path) -> str:
    """Register a candidate without gating it and make it champion, as a user would in the MLflow UI."""
    version = registered(client, name, candidate)
    client.set_registered_model_alias(name, "champion", version)
    return version


def test_candidate_is_compared_with_a_champion_set_by_hand(smoke_evaluated: SmokeRun, candidates):
    run = smoke_evaluated
    params = settings(run, "hand", floors={"sentiment": 0.0})
    first = gate(params, run, candidates["a"])
    client = registry.client()
    version_b = champion_by_hand(client, "hand-sentiment", candidates["b"])
    report = promote.gate_version(promote.section(params, "sentiment"), version_of(first), run.raw / "sentiment",
                                  run.validation / "sentiment.json")  # fmt: skip
    assert report.champion_before == version_b
    assert any("vs champion" in reason for reason in report.reasons)
    after = registry.alias_version(client, "hand-sentiment", "champion")
    assert (str(after.version) == version_of(first)) == (report.decision == "pass")


def test_rollback_returns_champion_to_the_one_before(smoke_evaluated: SmokeRun, candidates):
    run = smoke_evaluated
    params = settings(run, "roll", floors={"sentiment": 0.0})
    first = gate(params, run, candidates["a"])
    client = registry.client()
    version_b = champion_by_hand(client, "roll-sentiment", candidates["b"])
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "rollback", "--task", "sentiment", "--params",
                             str(write_params(params, run.root / "roll.yaml"))], cwd=REPO, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-800:]
    assert f"moved from version {version_b} back to version {first.baseline_version}" in result.stdout
    assert str(registry.alias_version(client, "roll-sentiment", "champion").version) == first.baseline_version
    again = subprocess.run([sys.executable, "-m", "lmforge.cli", "rollback", "--task", "sentiment", "--params",
                            str(run.root / "roll.yaml")], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 2 and "is the first champion; nothing to roll back to" in again.stderr


def write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params_to_dict(params), allow_unicode=True, sort_keys=False))
    return path


def test_two_promotions_at_once_never_crown_a_failed_version(smoke_evaluated: SmokeRun, candidates, tmp_path: Path):
    run = smoke_evaluated
    params_file = write_params(settings(run, "race", floors={"sentiment": 0.0}), tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = {
        label: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.promote",
                "--params",
                str(params_file),
                "--task",
                "sentiment",
                "--optimized",
                str(candidates[label]),
                "--dataset",
                str(run.raw / "sentiment"),
                "--validation",
                str(run.validation / "sentiment.json"),
                "--report",
                str(tmp_path / f"{label}.json"),
                "--metrics",
                str(tmp_path / f"{label}.figures.json"),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label in ("a", "b")
    }
    for label, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{label}: {stderr[-800:]}"
    reports = {label: json.loads((tmp_path / f"{label}.json").read_text()) for label in processes}
    champion = registry.alias_version(registry.client(), "race-sentiment", "champion")
    assert champion is not None and champion.tags["gate.decision"] == "pass"
    # Both registered the same baseline once (its version is shared, not raced into two copies) ...
    assert len({report["baseline_version"] for report in reports.values()}) == 1
    # ... one of them crowned it (no champion yet); the other found it serving.
    assert sorted(report["baseline_decision"] for report in reports.values()) == ["pass", "unchanged"]
    passed = [version_of(report) for report in reports.values() if report["decision"] == "pass"]
    assert str(champion.version) in {*passed, *(report["baseline_version"] for report in reports.values())}


# --- the gate fails closed ---------------------------------------------------------------------------


def test_a_registry_error_while_reading_the_champion_fails_closed(smoke_evaluated: SmokeRun, candidates):
    """The store answering an internal error is not "no champion yet": the stage fails, nothing moves."""
    import sqlite3

    from lmforge.errors import TransientError

    run = smoke_evaluated
    params = settings(run, "closed", floors={"sentiment": 0.0})
    first = gate(params, run, candidates["a"])
    client = registry.client()
    second = registered(client, "closed-sentiment", candidates["b"])
    store = sqlite3.connect(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    store.execute("ALTER TABLE registered_model_tags RENAME TO tags_away")  # the server's SQL now fails
    store.commit()
    try:
        with pytest.raises(TransientError) as failed:
            promote.gate_version(promote.section(params, "sentiment"), second, run.raw / "sentiment",
                                 run.validation / "sentiment.json")  # fmt: skip
    finally:
        store.execute("ALTER TABLE tags_away RENAME TO registered_model_tags")
        store.commit()
        store.close()
    assert failed.value.exit_code == 75 and "the registry answered" in str(failed.value)
    assert str(registry.alias_version(client, "closed-sentiment", "champion").version) == first.baseline_version
    assert "gate.decision" not in client.get_model_version("closed-sentiment", second).tags


def test_a_crash_between_the_decision_and_the_alias_move_is_finished_by_a_rerun(
    smoke_evaluated: SmokeRun, candidates, monkeypatch: pytest.MonkeyPatch
):
    run = smoke_evaluated
    params = settings(run, "crash", floors={"sentiment": 0.0})

    def killed(*args: object) -> None:
        raise SystemExit(137)

    monkeypatch.setattr(registry, "crown", killed)
    with pytest.raises(SystemExit):
        gate(params, run, candidates["a"])  # the baseline passes its gate and dies before @champion moves
    monkeypatch.undo()
    client = registry.client()
    (baseline,) = registry.versions_tagged(client, "crash-sentiment", "lmforge.model_kind", "baseline")
    assert baseline.tags["gate.decision"] == "pass"  # the decision was written first
    assert registry.alias_version(client, "crash-sentiment", "champion") is None  # the crash came before the move

    again = gate(params, run, candidates["a"])
    assert again.baseline_version == str(baseline.version) and again.baseline_decision == "pass"
    assert str(registry.alias_version(client, "crash-sentiment", "champion").version) == str(baseline.version)


def test_rollback_to_a_version_that_never_passed_needs_force_and_a_reason(smoke_evaluated: SmokeRun, candidates):
    run = smoke_evaluated
    params_file = write_params(settings(run, "force"), run.root / "force.yaml")
    client = registry.client()
    by_hand = registered(client, "force-sentiment", candidates["b"])
    registry.crown(client, "force-sentiment", by_hand)  # set as champion without a gate decision
    gated = registered(client, "force-sentiment", candidates["a"])
    client.set_model_version_tag("force-sentiment", gated, "gate.decision", "pass")
    registry.crown(client, "force-sentiment", gated)

    def rollback(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lmforge.cli", "rollback", "--task", "sentiment", "--params",
                               str(params_file), *extra], cwd=REPO, capture_output=True, text=True)  # fmt: skip

    refused = rollback()
    assert refused.returncode == 2 and f"version {by_hand} never passed the gate" in refused.stderr
    assert str(registry.alias_version(client, "force-sentiment", "champion").version) == gated
    assert rollback("--force").returncode == 2  # a reason is required
    forced = rollback("--force", "--reason", "incident 42: the new model mislabels refunds")
    assert forced.returncode == 0, forced.stderr[-800:]
    assert str(registry.alias_version(client, "force-sentiment", "champion").version) == by_hand
    tags = client.get_model_version("force-sentiment", by_hand).tags
    assert tags["lmforge.forced_champion_reason"] == "incident 42: the new model mislabels refunds"


class Pickled:
    """A python_model whose unpickling leaves a trace: what a pickled pyfunc can do when loaded."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.sentinel,))


def test_a_pickled_pyfunc_is_refused_before_it_is_loaded(smoke_evaluated: SmokeRun, candidates, tmp_path: Path):
    """Registered by hand from the very run that holds valid evidence: only its flavor gives it away."""
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Model(PythonModel):
        def __init__(self, payload: Pickled) -> None:
            self.payload = payload

        def predict(self, context, model_input, params=None):  # pragma: no cover - never loaded
            return model_input

    run = smoke_evaluated
    eval_run = json.loads((candidates["a"] / "candidate/model.json").read_text())["run_id"]
    sentinel = tmp_path / "unpickled"
    with mlflow.start_run(run_id=eval_run):
        info = mlflow.pyfunc.log_model(name="pickled", python_model=Model(Pickled(sentinel)))
    sentinel.unlink(missing_ok=True)  # logging may have round-tripped it; from here on nothing may unpickle it
    client = registry.client()
    version = str(registry.register(client, "pickle-sentiment", info.model_uri, eval_run, {}).version)
    report = promote.gate_version(promote.section(settings(run, "pickle", floors={"sentiment": 0.0}), "sentiment"),
                                  version, run.raw / "sentiment", run.validation / "sentiment.json")  # fmt: skip
    assert report.decision == "fail" and report.checks["loads"] is False
    assert any("not lmforge's models-from-code pyfunc" in reason for reason in report.reasons)
    assert registry.alias_version(client, "pickle-sentiment", "champion") is None
    assert not sentinel.exists()


def test_a_model_that_cannot_be_fetched_is_transient_and_decides_nothing(
    smoke_evaluated: SmokeRun, candidates, monkeypatch: pytest.MonkeyPatch
):
    """A connection error while the gate downloads the candidate is exit 75 with no decision; a re-run decides."""
    import mlflow
    import requests

    from lmforge.errors import TransientError

    run = smoke_evaluated
    params = settings(run, "fetch", floors={"sentiment": 0.0})
    client = registry.client()
    version = registered(client, "fetch-sentiment", candidates["b"])
    download = mlflow.artifacts.download_artifacts

    def unreachable(*args, artifact_uri: str | None = None, **kwargs):
        if artifact_uri == f"models:/fetch-sentiment/{version}":
            raise requests.exceptions.ConnectionError("Connection refused")
        return download(*args, artifact_uri=artifact_uri, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", unreachable)
    section = promote.section(params, "sentiment")
    with pytest.raises(TransientError) as failed:
        promote.gate_version(section, version, run.raw / "sentiment", run.validation / "sentiment.json")
    assert failed.value.exit_code == 75 and "Connection refused" in str(failed.value)
    assert "gate.decision" not in client.get_model_version("fetch-sentiment", version).tags
    monkeypatch.undo()
    decided = promote.gate_version(section, version, run.raw / "sentiment", run.validation / "sentiment.json")
    assert decided.decision in ("pass", "fail") and decided.checks["loads"]
    assert client.get_model_version("fetch-sentiment", version).tags["gate.decision"] == decided.decision


def test_a_champion_that_trained_on_todays_test_rows_is_refused_in_one_line(
    smoke_evaluated: SmokeRun, candidates, tmp_path: Path
):
    """Another split seed puts rows the champion trained on into the test split: it is not re-scored there."""
    from lmforge import ingest, rescore
    from lmforge.errors import DataError
    from lmforge.ingest import IngestPaths

    run = smoke_evaluated
    client = registry.client()
    champion = client.get_model_version("leak-sentiment", champion_by_hand(client, "leak-sentiment", candidates["a"]))
    rescore.check_no_leak(champion, run.raw / "sentiment")  # the split it trained with: nothing leaks
    reseeded = parse_params(deep_merge(params_to_dict(run.params), {"ingest": {"seed": 99}}))
    ingest.run(reseeded.ingest, IngestPaths(REPO, tmp_path / "raw", tmp_path / "ingest.json"))
    with pytest.raises(DataError) as refused:
        rescore.check_no_leak(champion, tmp_path / "raw" / "sentiment")
    message = str(refused.value)
    assert "test rows were training rows of the champion (leak-sentiment version" in message
    assert "\n" not in message and "ingest.seed" in message


def test_promote_with_the_tracking_server_down_is_transient_and_moves_nothing(smoke_evaluated: SmokeRun,
                                                                             candidates, tmp_path: Path):  # fmt: skip
    from tests.flows.conftest import free_port

    run = smoke_evaluated
    params = settings(run, "down", floors={"sentiment": 0.0})
    first = gate(params, run, candidates["a"])  # a champion, in the store the server would serve
    params_file = write_params(params, tmp_path / "params.yaml")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "stages.promote", "--params", str(params_file), "--task", "sentiment",
         "--optimized", str(candidates["b"]), "--dataset", str(run.raw / "sentiment"),
         "--validation", str(run.validation / "sentiment.json"), "--report", str(tmp_path / "report.json"),
         "--metrics", str(tmp_path / "figures.json")],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": down,
             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},  # MLflow's own retries would only make it slower
    )  # fmt: skip
    assert result.returncode == 75, result.stderr[-1500:]  # transient: the flow retries it
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and down in lines[0], result.stderr[-1500:]
    assert not (tmp_path / "report.json").exists()
    assert (
        str(registry.alias_version(registry.client(), "down-sentiment", "champion").version) == first.baseline_version
    )
