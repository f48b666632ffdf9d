"""Real Prefect flow runs (a temporary local Prefect server) of the pipeline, in a clone, on the smoke profile."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import clone_working_tree, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clone_working_tree(tmp_path_factory.mktemp("flow-clone"))


def task_runs(state) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return {run.name.rsplit("-", 1)[0]: run for run in runs}


def edit_params(clone: Path, change) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    change(params)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))


def test_flow_runs_the_dag_then_skips_it(clone: Path, harness, monkeypatch: pytest.MonkeyPatch):
    from flows.pipeline import dag_stages, pipeline

    monkeypatch.chdir(clone)
    stages = dag_stages()
    assert stages[:3] == ["ingest", "validate", "preprocess"] and stages[-1].startswith("promote@")
    first = pipeline()
    assert [r["stage"] for r in first] == stages and {r["status"] for r in first} == {"ran"}
    assert sh("dvc", "status", cwd=clone).stdout.strip().endswith("Data and pipelines are up to date.")
    second = pipeline()
    assert {r["status"] for r in second} == {"skipped (unchanged)"}

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()[0]
    assert "## Metrics (frozen test split)" in str(artifact.data) and "## Promotion" in str(artifact.data)


def test_retrain_runs_only_when_a_source_moved(clone: Path, harness, monkeypatch: pytest.MonkeyPatch):
    from flows.retrain import retrain

    monkeypatch.chdir(clone)
    lock_before = (clone / "dvc.lock").read_text()
    started = time.perf_counter()
    assert retrain() == {"retrained": False, "changed": []}
    assert time.perf_counter() - started < 60
    assert (clone / "dvc.lock").read_text() == lock_before
    raw_data_md5_before = raw_data_md5(clone)

    # As if the bundled reviews had changed since the last ingest: the manifest's source hash moved.
    manifest = clone / "data/raw/sentiment/manifest.json"
    manifest.write_text(manifest.read_text().replace('"sha256": "', '"sha256": "0', 1))
    result = retrain()
    assert result["retrained"] and result["changed"] == ["sentiment"]
    statuses = {entry["stage"]: entry["status"] for entry in result["stages"]}
    assert statuses["ingest"] == "ran"  # forced: DVC alone cannot see a file inside a package change
    # The re-ingested splits are byte-identical, so everything downstream, the gate included, is unchanged.
    assert {status for stage, status in statuses.items() if stage != "ingest"} == {"skipped (unchanged)"}
    assert retrain() == {"retrained": False, "changed": []}
    assert raw_data_md5(clone) == raw_data_md5_before  # reports/ingest.json (timings) is all that changed


def raw_data_md5(clone: Path) -> str:
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"]["ingest"]["outs"] if out["path"] == "data/raw")


def kill_once(clone: Path, marker: Path) -> threading.Thread:
    """Kill the pretrain@encoder process (a 'killed worker') once it has written a checkpoint."""

    def watch() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            if list(marker.glob("step-*")):
                for process in psutil.process_iter(["cmdline", "cwd"]):
                    command = " ".join(process.info["cmdline"] or [])
                    if (
                        "stages.pretrain" in command
                        and "--model encoder" in command
                        and process.info["cwd"] == str(clone)
                    ):
                        process.kill()
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_stage_is_retried_and_resumes(clone: Path, harness, monkeypatch: pytest.MonkeyPatch):
    from flows.pipeline import pipeline

    monkeypatch.chdir(clone)
    edit_params(clone, lambda p: p["pretrain"]["training"].update(max_steps=14, checkpoint_every=3))
    watcher = kill_once(clone, clone / "checkpoints/pretrain/encoder")
    state = pipeline(return_state=True)
    watcher.join(timeout=1)
    assert state.is_completed(), state.message
    runs = task_runs(state)
    assert runs["pretrain@encoder"].run_count == 2  # failed once (killed), retried, completed
    assert runs["ingest"].run_count == 1


def test_a_validation_failure_fails_the_run_without_retry(clone: Path, harness, monkeypatch: pytest.MonkeyPatch):
    from flows.pipeline import pipeline

    monkeypatch.chdir(clone)
    before = {path.name: path.stat().st_mtime for path in (clone / "reports/promotion").glob("*.json")}
    edit_params(clone, lambda p: p["validate"].update(max_chars=5))
    state = pipeline(return_state=True)
    assert state.is_failed()
    assert "expect_column_value_lengths_to_be_between(text)" in state.message or any(
        "expect_column_value_lengths_to_be_between" in str(r.state.message) for r in task_runs(state).values()
    )
    runs = task_runs(state)
    assert runs["validate"].run_count == 1  # deterministic: not retried
    assert "preprocess" not in runs and not any(name.startswith("promote@") for name in runs)
    assert {path.name: path.stat().st_mtime for path in (clone / "reports/promotion").glob("*.json")} == before
