"""Optuna trial workers as Prefect flow runs on a work pool: the optimize stage's fan-out beyond one machine.

With `optimize.worker_deployment` set, the optimize stage does not start local worker processes:
it creates `optimize.workers` runs of that deployment (declared in prefect.yaml as
`lmforge-trial-worker`, entrypoint `trial_worker` below) and waits for them. Whatever worker serves
the pool (a process worker on another machine, a Docker or Kubernetes worker with GPUs) runs each one
in its own checkout: it joins the one Optuna study (`LMFORGE_OPTUNA_STORAGE`, e.g. PostgreSQL) and the
study's MLflow run, and trains trials until the study has n_trials. Each completed trial's model is
logged to its MLflow run, so the stage fetches the best one from there when the worker's disk is not
its own. The stage sends its params section and its (relative) paths; the training is lmforge/optimize.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

TRIAL_WORKER = "lmforge-trial-worker/lmforge-trial-worker"


@flow(name="lmforge-trial-worker", log_prints=True)
def trial_worker(section: dict[str, Any], paths: dict[str, str], study_run_id: str) -> int:
    """Train trials of the task's study until it has n_trials finished ones; return how many this run trained."""
    from lmforge.optimize import OptimizePaths, OptimizeSection, worker_main

    params = OptimizeSection.model_validate(section)
    trained = worker_main(params, OptimizePaths(**{name: Path(value) for name, value in paths.items()}),
                          study_run_id, log_models=True)  # fmt: skip
    print(f"trial worker for {params.name}: trained trials {trained}")
    return len(trained)
