"""A training stage routed to a Prefect work pool: a real process worker, a real DVC remote (a folder).

The worker runs the stage in a fresh checkout of the flow's commit, its inputs pulled from the DVC
remote and its outputs and run-cache pushed there; the flow then restores the stage from the
run-cache in its own workspace, where dvc.lock ends as a local `dvc repro` of the commit writes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import clone_working_tree, sh

pytestmark = pytest.mark.slow

STAGE = "pretrain@decoder"


def lock_entry(repo: Path, stage: str) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]


def test_a_stage_routed_to_a_pool_runs_on_its_worker_and_is_restored_from_the_run_cache(
    tmp_path: Path, harness, monkeypatch: pytest.MonkeyPatch
):
    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import run_stage

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
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "local"], cwd=clone,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    @flow
    def parent(force: bool = False) -> dict:
        stage_env = {**os.environ, "PATH": env["PATH"]}
        return run_stage(STAGE, stage_env, force, pool="local", repo=str(clone))

    monkeypatch.chdir(clone)
    try:
        state = parent(return_state=True)
        assert state.is_completed(), state.message
        first = state.result()
        again = parent()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        print((tmp_path / "worker.log").read_text()[-6000:])
    assert first["status"] == "ran on local" and again["status"] == "skipped (unchanged)"
    assert sh("dvc", "status", STAGE, cwd=clone).stdout.strip().endswith("up to date.")
    assert (clone / "models/pretrained/decoder/model.safetensors").is_file()

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        children = [run for run in client.read_flow_runs() if run.parameters.get("stage") == STAGE]
    assert [run.state_type.value for run in children] == ["COMPLETED"]  # one dispatch; the unchanged one skipped
    assert children[0].parameters["commit"] == sh("git", "rev-parse", "HEAD", cwd=clone).stdout.strip()

    # The same commit reproduced locally trains the same weights from the same inputs: the worker's result is
    # a local run's (its report and metrics differ in their timings only).
    local = tmp_path / "local"
    sh("git", "clone", "-q", str(clone), str(local), cwd=tmp_path)
    sh("cp", str(clone / "dvc.lock"), str(local / "dvc.lock"), cwd=tmp_path)
    sh("dvc", "pull", "-q", "preprocess", cwd=local)
    sh("dvc", "repro", "--force", "--single-item", STAGE, cwd=local)
    here, there = lock_entry(clone, STAGE), lock_entry(local, STAGE)
    assert here["deps"] == there["deps"] and here["params"] == there["params"]
    model = [out for out in here["outs"] if out["path"] == "models/pretrained/decoder"]
    assert model and model == [out for out in there["outs"] if out["path"] == "models/pretrained/decoder"]
