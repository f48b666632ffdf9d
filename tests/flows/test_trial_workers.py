"""Optuna trial workers as flow runs on a Prefect work pool, the way they run beyond one machine.

Everything is real and nothing shares a Python process, as in infra/compose.yaml: a Prefect server
(`prefect server start`) and an MLflow server (`mlflow server`, artifacts proxied) on PostgreSQL, the
`local` process work pool, `prefect deploy` of prefect.yaml's lmforge-stage/local (the deployment routed
stages use), a `prefect worker`, a DVC remote (a folder), the Optuna study on PostgreSQL, and the
optimize stage (`optimize.workers: 2`, `optimize.worker_pool: local`) in a git checkout of its own.
Each trial worker checks out the stage's commit and pulls its inputs from the DVC remote.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from lmforge.params import params_to_dict
from lmforge.study import FINISHED, open_study
from tests.conftest import REPO, SmokeRun, clone_working_tree, sh
from tests.flows.conftest import api, env_of_a_new_prefect_home, free_port
from tests.stages.test_optimize import tuning

pytestmark = pytest.mark.slow


def default_signals() -> None:
    """A server or worker as a person starts it: a test run started in the background (`make test &`)
    hands its children SIGINT ignored, and Prefect's worker then cannot shut itself down on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as output:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                preexec_fn=default_signals)  # fmt: skip


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


UPSTREAM_OUTPUTS = ("data", "models", "reports", "metrics")  # what the smoke run wrote, dvc-committed below


def test_trial_workers_run_as_flow_runs_on_a_work_pool(smoke_evaluated: SmokeRun, tmp_path: Path,
                                                      postgres_databases, monkeypatch) -> None:  # fmt: skip
    from flows.server import wait_until_healthy
    from flows.stage_worker import upstream_stages
    from lmforge.stage import dvc_commands

    prefect_db, mlflow_db, optuna_db = postgres_databases(), postgres_databases(), postgres_databases()
    params = tuning(smoke_evaluated, tmp_path, n_trials=4, workers=2, pruner="none", storage=None,
                    max_steps=40, eval_every=20, worker_pool="local")  # fmt: skip
    # The stage's checkout: this commit with the tuning params and a DVC remote, and the smoke run's outputs
    # committed to DVC as its upstream stages' (the stage pushes them; each trial worker pulls them).
    stage_home = clone_working_tree(tmp_path / "stage")
    (stage_home / "params.yaml").write_text(yaml.safe_dump(params_to_dict(params), allow_unicode=True,
                                                           sort_keys=False))  # fmt: skip
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=stage_home)
    sh("git", "add", "-A", cwd=stage_home)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tuning on a pool", cwd=stage_home)
    for relative in UPSTREAM_OUTPUTS:
        shutil.copytree(smoke_evaluated.root / relative, stage_home / relative, symlinks=True, dirs_exist_ok=True)
    stage = "optimize@sentiment"
    sh("dvc", "commit", "-f", "-q", "--with-deps", *upstream_stages(stage, stage_home), cwd=stage_home)

    port, mlflow_port = free_port(), free_port()
    python = [sys.executable, "-m"]
    env = env_of_a_new_prefect_home(
        tmp_path / "prefect", PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_API_DATABASE_CONNECTION_URL=prefect_db.replace("postgresql://", "postgresql+asyncpg://"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
        LMFORGE_OPTUNA_STORAGE=optuna_db, LMFORGE_HOME=str(stage_home),
        LMFORGE_STAGE_WORKDIR=str(tmp_path / "workers"), MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )  # fmt: skip
    server = start([*python, "prefect", "server", "start", "--port", str(port)], tmp_path, env, tmp_path / "server.log")
    tracking = start([*python, "mlflow", "server", "--backend-store-uri", mlflow_db, "--port", str(mlflow_port),
                      "--artifacts-destination", (tmp_path / "artifacts").as_uri()], tmp_path, env,
                     tmp_path / "mlflow.log")  # fmt: skip
    worker = None
    try:
        wait_until_healthy(env["PREFECT_API_URL"], server, tmp_path / "server.log", timeout_s=180)
        wait_until_healthy(env["MLFLOW_TRACKING_URI"], tracking, tmp_path / "mlflow.log", timeout_s=180)
        run([*python, "prefect", "work-pool", "create", "local", "--type", "process"], stage_home, env)
        run([*python, "prefect", "--no-prompt", "deploy", "--name", "local"], stage_home, env)
        worker = start([*python, "prefect", "worker", "start", "--pool", "local"], stage_home, env,
                       tmp_path / "worker.log")  # fmt: skip

        command = shlex.split(dvc_commands(REPO)[stage])  # the stage exactly as dvc.yaml runs it
        result = subprocess.run([sys.executable, *command[1:]], cwd=stage_home, env=env, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs = api(port, "POST", "/flow_runs/filter", {"flows": {"name": {"any_": ["lmforge-stage"]}}})
        assert sorted(run["state_type"] for run in runs) == ["COMPLETED", "COMPLETED"]
        assert sorted(run["parameters"]["trials"]["worker"] for run in runs) == [0, 1]
        commit = sh("git", "rev-parse", "HEAD", cwd=stage_home).stdout.strip()
        assert {run["parameters"]["commit"] for run in runs} == {commit}  # the stage's commit, checked out there
        assert not list((tmp_path / "workers").glob("optimize@sentiment.trials-*"))  # done: their checkouts went

        study_name = yaml.safe_load((stage_home / "reports/optimize/sentiment/best_params.json").read_text())["study"]
        trials = open_study(params.optimize.model_copy(update={"storage": optuna_db}), study_name).trials
        finished = [t for t in trials if t.state in FINISHED]
        assert len(finished) == 4 and len({t.number for t in finished}) == 4
        assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        assert len({t.user_attrs["worker_pid"] for t in finished}) == 2  # both flow runs trained trials

        # The workers' checkouts are gone: the best trial's model came from its MLflow run, byte for byte.
        best = min((t for t in finished if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
        candidate = stage_home / "models/candidates/sentiment/model.safetensors"
        assert hashlib.sha256(candidate.read_bytes()).hexdigest() == best.user_attrs["model_sha256"]
        assert not Path(best.user_attrs["model_dir"]).is_relative_to(stage_home)
    finally:
        for process in filter(None, (worker, server, tracking)):
            process.terminate()
            process.wait(timeout=60)


STAGE_WAITING_ON_TRIALS = """
import sys
from flows.trials import run_trial_flow_runs
run_trial_flow_runs(sys.argv[1], [{"stage": "optimize@none", "repo": ".", "commit": "none"}] * 2, poll_s=0.2)
"""


def test_trial_flow_runs_are_cancelled_when_the_stage_waiting_on_them_is_ended(tmp_path: Path, harness):
    """A timeout or a cancelled pipeline run sends the optimize stage SIGTERM: the trial flow runs it started
    are cancelled with it, not left for a worker to train for a stage that is gone."""
    import time
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    name = f"idle-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:  # a pool no worker serves: its runs wait until cancelled
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        flow_id = client.create_flow_from_name("lmforge-stage")
        deployment = client.create_deployment(flow_id=flow_id, name=name, work_pool_name=name,
                                              entrypoint="flows/stage_worker.py:stage_worker")  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    stage = subprocess.Popen([sys.executable, "-c", STAGE_WAITING_ON_TRIALS, f"lmforge-stage/{name}"],
                             cwd=REPO, env=env)  # fmt: skip

    def runs() -> list:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])))

    deadline = time.monotonic() + 120
    while len(runs()) < 2:
        assert stage.poll() is None and time.monotonic() < deadline, "the stage never created its trial runs"
        time.sleep(0.2)
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(run.state.type.value for run in runs()) == ["CANCELLED", "CANCELLED"]


STAGE_WITH_LOCAL_WORKERS = """
import multiprocessing, time
from tests.flows.trial_sleeper import sleeping_trial_process
worker = multiprocessing.get_context("spawn").Process(target=sleeping_trial_process)
worker.start()
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_local_trial_workers_end_with_the_stage_even_when_it_is_killed(tmp_path: Path):
    import psutil

    stage = subprocess.Popen([sys.executable, "-c", STAGE_WITH_LOCAL_WORKERS], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert stage.stdout is not None
    worker = psutil.Process(int(stage.stdout.readline()))
    stage.kill()  # SIGKILL: the stage runs no code of its own on the way out
    stage.wait()
    gone, _ = psutil.wait_procs([worker], timeout=20)
    assert gone, "the trial worker outlived its stage"
