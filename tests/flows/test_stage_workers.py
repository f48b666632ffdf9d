"""A training stage routed to a Prefect work pool: real process workers, a real DVC remote (a folder).

The worker runs the stage in a fresh checkout of the flow's commit, its inputs pulled from the DVC
remote and its outputs and run-cache pushed there; the flow then restores the stage from the
run-cache in its own workspace, where dvc.lock ends as a local `dvc repro` of the commit writes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.server import wait_until_healthy
from tests.conftest import clone_working_tree, sh
from tests.flows.conftest import free_port
from tests.flows.test_trial_workers import default_signals

pytestmark = pytest.mark.slow

STAGE = "pretrain@decoder"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (the worker and its flow-run processes), SIGKILL if it lingers."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def kill_after_a_checkpoint(checkpoints: Path, timeout_s: float = 300) -> None:
    """SIGKILL the decoder's pretraining (the stage's own process, under dvc on the worker) once it has
    written a checkpoint."""
    deadline = time.monotonic() + timeout_s
    # A complete checkpoint: `step-N.tmp-<pid>` is one being written, which a kill leaves half done.
    while not [path for path in checkpoints.glob("step-*") if ".tmp" not in path.name] and time.monotonic() < deadline:
        time.sleep(0.05)
    subprocess.run(["pkill", "-KILL", "-f", "stages.pretrain --params params.yaml --model decoder"], check=True)


def lock_entry(repo: Path, stage: str) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]


def test_a_stage_routed_to_a_pool_runs_on_its_worker_and_is_restored_from_the_run_cache(
    tmp_path: Path, harness, monkeypatch: pytest.MonkeyPatch
):
    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    clone = clone_working_tree(tmp_path / "parent")
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=clone)
    sh("git", "add", "-A", cwd=clone)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a DVC remote", cwd=clone)
    sh("dvc", "repro", "preprocess", cwd=clone)  # the upstream stages, here

    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_WORKER_QUERY_SECONDS="2", LMFORGE_HOME=str(clone),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    sh(sys.executable, "-m", "prefect", "work-pool", "create", "local", "--type", "process", cwd=clone, env=env)
    sh(sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "local", cwd=clone, env=env)
    # Stages on several workers log at once: a tracking server, as workers on other machines need anyway.
    tracking_uri = f"http://127.0.0.1:{free_port()}"
    with (tmp_path / "mlflow.log").open("wb") as log:
        tracking = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                     f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
                                     (tmp_path / "artifacts").as_uri(), "--port", tracking_uri.rsplit(":", 1)[1],
                                     "--workers", "1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=default_signals)  # fmt: skip
    workers = {}  # two workers on the pool, a flow run at a time each, each with a folder of its own for stages
    for name in ("a", "b"):
        with (tmp_path / f"worker-{name}.log").open("wb") as log:
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "local", "--name", f"worker-{name}",
                 "--limit", "1"], cwd=clone, env={**env, "LMFORGE_STAGE_WORKDIR": str(tmp_path / f"stages-{name}")},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=default_signals,
            )  # fmt: skip
    wait_until_healthy(tracking_uri, tracking, tmp_path / "mlflow.log", timeout_s=120)

    from flows.pipeline import run_dag
    from lmforge.params import load_params
    from lmforge.stage import dvc_stages

    settings = load_params(clone / "params.yaml").orchestrate.model_copy(
        update={"pools": {"pretrain": "local"}, "retry_delay_s": 1.0}
    )
    stages = {name: entry for name, entry in dvc_stages(clone).items() if name.startswith("pretrain@")}

    @flow
    def parent() -> list[dict]:
        results: list[dict] = []
        run_dag(stages, settings, {**os.environ, "PATH": env["PATH"], "MLFLOW_TRACKING_URI": tracking_uri}, [],
                results)  # fmt: skip
        return results

    monkeypatch.chdir(clone)
    try:
        state = parent(return_state=True)
        assert state.is_completed(), state.message
        first = state.result()
        again = parent()
        assert [result["status"] for result in first] == ["ran on local"] * 2
        assert [result["status"] for result in again] == ["skipped (unchanged)"] * 2  # nothing sent the second time
        assert sh("dvc", "status", *stages, cwd=clone).stdout.strip().endswith("up to date.")
        assert (clone / "models/pretrained/decoder/model.safetensors").is_file()

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            children = [run for run in client.read_flow_runs() if run.parameters.get("stage") in stages]
        assert sorted(run.parameters["stage"] for run in children) == sorted(stages)  # one dispatch each
        assert {run.state_type.value for run in children} == {"COMPLETED"}
        assert {run.parameters["commit"] for run in children} == {
            sh("git", "rev-parse", "HEAD", cwd=clone).stdout.strip()
        }
        # The two pretrainings ran side by side, one on each worker: their spans, from the runs' own timestamps,
        # overlap, and each worker's log names the one flow run it took.
        (a, b) = children
        assert a.start_time < b.end_time and b.start_time < a.end_time
        logs = {name: (tmp_path / f"worker-{name}.log").read_text() for name in workers}
        taken = {name: {str(run.id) for run in children  # both workers may try a run: one wins, one aborts
                        if f"submitting flow run '{run.id}'" in log and f"Aborted submission of flow run '{run.id}'"
                        not in log} for name, log in logs.items()}  # fmt: skip
        assert sorted(map(len, taken.values())) == [1, 1] and taken["a"] != taken["b"], taken

        # The same commit reproduced locally trains the same weights from the same inputs: the worker's result is
        # a local run's (its report and metrics differ in their timings only).
        local = tmp_path / "local"
        sh("git", "clone", "-q", str(clone), str(local), cwd=tmp_path)
        sh("cp", str(clone / "dvc.lock"), str(local / "dvc.lock"), cwd=tmp_path)
        sh("dvc", "pull", "-q", "ingest", "preprocess", cwd=local)
        sh("dvc", "repro", "--force", "--single-item", STAGE, cwd=local)
        here, there = lock_entry(clone, STAGE), lock_entry(local, STAGE)
        assert here["deps"] == there["deps"] and here["params"] == there["params"]
        model = [out for out in here["outs"] if out["path"] == "models/pretrained/decoder"]
        assert model and model == [out for out in there["outs"] if out["path"] == "models/pretrained/decoder"]

        # A stage killed mid-training on the worker: the flow sends it again, and the retry resumes from the
        # checkpoints the killed attempt left in its folder on the worker; the folder goes once it is done.
        edit = yaml.safe_load((clone / "params.yaml").read_text())
        edit["pretrain"]["models"]["decoder"]["max_steps"] = 600
        edit["pretrain"]["training"]["early_stopping_patience"] = 0
        (clone / "params.yaml").write_text(yaml.safe_dump(edit, allow_unicode=True, sort_keys=False))
        sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "a longer pretraining", cwd=clone)
        head = sh("git", "rev-parse", "HEAD", cwd=clone).stdout.strip()
        stages = {STAGE: stages[STAGE]}
        spare = workers.pop("b")  # the retry must find the killed attempt's checkpoints: one worker, one folder
        os.killpg(spare.pid, signal.SIGKILL)  # idle: nothing of its own to end gracefully
        spare.wait(timeout=30)
        folder = tmp_path / "stages-a" / f"pretrain-decoder-{head[:12]}"
        killed = threading.Thread(
            target=kill_after_a_checkpoint, args=(folder / "checkout/checkpoints/pretrain/decoder",)
        )
        killed.start()
        state = parent(return_state=True)
        killed.join()
        assert state.is_completed(), state.message
        with get_client(sync_client=True) as client:
            attempts = sorted((run for run in client.read_flow_runs()
                               if run.parameters.get("stage") == STAGE and run.parameters["commit"] == head),
                              key=lambda run: run.start_time)  # fmt: skip
        assert [run.state_type.value for run in attempts] == ["FAILED", "COMPLETED"]
        report = json.loads((clone / "reports/pretrain/decoder.json").read_text())
        assert 5 <= report["resumed_from_step"] < report["steps"], report  # it went on from a checkpoint
        assert "its process was killed by SIGKILL" in attempts[0].state.message
        assert not folder.exists()

        # A stage that fails on the worker with exit 2 (bad params, committed) fails the flow at once with
        # the stage's own line: its child flow run is not retried.
        edit = yaml.safe_load((clone / "params.yaml").read_text())
        edit["pretrain"]["models"]["decoder"]["max_steps"] = 0
        (clone / "params.yaml").write_text(yaml.safe_dump(edit, allow_unicode=True, sort_keys=False))
        sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "a bad max_steps", cwd=clone)
        failed = parent(return_state=True)
        assert failed.is_failed() and "(exit 2): error: " in str(failed.message), failed.message
        assert "pretrain.models.decoder.max_steps" in str(failed.message)
        head = sh("git", "rev-parse", "HEAD", cwd=clone).stdout.strip()
        with get_client(sync_client=True) as client:
            bad = [run for run in client.read_flow_runs()
                   if run.parameters.get("stage") == STAGE and run.parameters["commit"] == head]  # fmt: skip
        assert [run.state_type.value for run in bad] == ["FAILED"]
    finally:
        for process in (*workers.values(), tracking):
            stop(process)
        for name in ("a", "b"):
            print((tmp_path / f"worker-{name}.log").read_text()[-3000:])
