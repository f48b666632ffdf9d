"""Optuna trial workers as Prefect flow runs on a work pool: the optimize stage's fan-out beyond one machine.

With `optimize.worker_deployment` set, the optimize stage does not start local worker processes:
it creates `optimize.workers` runs of that deployment (declared in prefect.yaml as
`lmforge-trial-worker`, entrypoint `trial_worker` below) and waits for them. Whatever worker serves
the pool (a process worker on another machine, a Docker or Kubernetes worker with GPUs) runs each one
in its own checkout: it joins the one Optuna study (`LMFORGE_OPTUNA_STORAGE`, e.g. PostgreSQL) and the
study's MLflow run, and trains trials until the study has n_trials. Each completed trial's model is
logged to its MLflow run, so the stage fetches the best one from there when the worker's disk is not
its own. The training itself stays in stages/optimize.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from lmforge.errors import LmforgeError

TRIAL_WORKER = "lmforge-trial-worker/lmforge-trial-worker"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@flow(name="lmforge-trial-worker", log_prints=True)
def trial_worker(task: str, study_run_id: str, params_path: str = "params.yaml", raw: str = "data/raw",
                 processed: str = "data/processed", pretrained: str = "models/pretrained",
                 work: str | None = None) -> int:  # fmt: skip
    """Train trials of the task's study until it has n_trials finished ones; return how many this run trained."""
    import os

    from lmforge.params import load_params
    from stages.optimize import STUDY_RUN_ENV, TrialPaths, worker_main

    os.environ[STUDY_RUN_ENV] = study_run_id
    paths = TrialPaths(Path(params_path), Path(raw), Path(processed), Path(pretrained),
                       Path(work) if work else Path("checkpoints/optimize") / task)  # fmt: skip
    trained = worker_main(load_params(params_path), task, paths, log_models=True)
    print(f"trial worker for {task}: trained trials {trained}")
    return len(trained)


def run_trial_workers(deployment: str, count: int, parameters: dict[str, Any], poll_s: float = 2.0) -> dict[str, str]:
    """Create `count` runs of the trial-worker deployment, wait for all; return flow-run id -> final state.

    No deadline of its own: the flow's per-stage timeout (orchestrate.timeouts_s.optimize) bounds it.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    try:
        runs = [run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False) for _ in range(count)]
    except ObjectNotFound:
        api_url = PREFECT_API_URL.value() or "(none: set PREFECT_API_URL)"
        raise LmforgeError(f"optimize.worker_deployment: no deployment {deployment!r} on the Prefect API at "
                           f"{api_url}; `prefect deploy` it first") from None  # fmt: skip
    states: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while True:
            for run in runs:
                state = client.read_flow_run(run.id).state
                if state is not None and state.type.value in FINAL_STATES:
                    states[str(run.id)] = state.type.value
            if len(states) == len(runs):
                return states
            time.sleep(poll_s)
