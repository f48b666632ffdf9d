"""The optimize stage's trial workers beyond its own process: local processes, or flow runs on a work pool.

With `optimize.worker_pool` set, the optimize stage does not start local worker processes: it sends
`optimize.workers` flow runs of `lmforge-stage/<pool>`, the deployment routed stages use
(flows/stage_worker.py), and waits for them. Like a routed stage, each works in a fresh checkout of
this commit with the stage's inputs pulled from the DVC remote (the stage pushes them first); it joins
the one Optuna study (`LMFORGE_OPTUNA_STORAGE`, e.g. PostgreSQL) and the study's MLflow run, and trains
trials until the study has n_trials. Each completed trial's model is logged to its MLflow run, so the
stage fetches the best one from there. The training is lmforge/optimize.py.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from lmforge.errors import LmforgeError, TransientError, ValidationFailed, is_retried, run_main
from lmforge.optimize import OptimizePaths, OptimizeSection, worker_main
from lmforge.processes import die_with_parent

FINAL_FLOW_RUN_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def start_trial_workers(section: OptimizeSection, paths: OptimizePaths, study_run_id: str) -> None:
    """The optimize stage's trial workers beyond its own process (lmforge.optimize.TrialWorkers): flow runs
    of lmforge-stage/<optimize.worker_pool> on that pool, or else `optimize.workers` local processes."""
    settings = section.optimize
    if settings.worker_pool:
        run_worker_flow_runs(settings.worker_pool, settings.workers, section, paths, study_run_id)
    else:  # N processes that start together, so the trials spread over all of them
        run_worker_processes(settings.workers, section, paths, study_run_id)


def run_worker_processes(count: int, section: OptimizeSection, paths: OptimizePaths, study_run_id: str) -> None:
    """`count` local processes working on the same study (their trial runs nest under the study's run)."""
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch or MLflow state
    workers = [spawn.Process(target=trial_process, args=(section, paths, study_run_id)) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failed = [worker.exitcode for worker in workers if worker.exitcode]
    if failed:
        raise workers_failed(failed, f"{len(failed)} of {count} trial worker process(es)")


def trial_process(section: OptimizeSection, paths: OptimizePaths, study_run_id: str) -> None:
    """A local trial worker process: its one-line error and exit code as a stage's (exit 2, 75, ...). It ends
    with the stage that started it, however that ends (killed too): no trial trains on unseen."""
    stage = multiprocessing.parent_process()
    die_with_parent(signal.SIGTERM, stage.pid if stage is not None else None)
    run_main(lambda: worker_main(section, paths, study_run_id))


def workers_failed(codes: list[int], what: str) -> Exception:
    """The optimize stage's failure when trial workers failed, by the exit-code contract: the user's input
    (2, 3) first; killed or transient (a signal, 75) alone is transient and retried; anything else a bug."""
    message = f"optimize: {what} failed (exit codes {codes})"
    if any(code in (LmforgeError.exit_code, ValidationFailed.exit_code) for code in codes):
        return LmforgeError(message)
    if all(is_retried(code) for code in codes):
        return TransientError(message)
    return RuntimeError(message)


def run_trial_flow_runs(deployment: str, runs_parameters: list[dict[str, Any]],
                        poll_s: float = 2.0) -> dict[str, str]:  # fmt: skip
    """Create a run of the deployment per parameter set, wait for all; return flow-run id -> final state.

    No deadline of its own: the flow's per-stage timeout (orchestrate.timeouts_s.optimize) bounds it.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    states: dict[str, str] = {}
    run_ids: list[Any] = []  # filled as the runs are made: an end meanwhile cancels those already made
    with get_client(sync_client=True) as client, cancelled_when_ended(client, run_ids, states):
        runs: list[Any] = []
        try:
            for parameters in runs_parameters:
                runs.append(run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False))
                run_ids.append(runs[-1].id)
        except ObjectNotFound:
            api_url = PREFECT_API_URL.value() or "(none: set PREFECT_API_URL)"
            pool = deployment.split("/", 1)[1]
            how = f"`prefect deploy --name {pool}` of prefect.yaml's lmforge-stage"
            raise LmforgeError(f"optimize.worker_pool: no deployment {deployment!r} on the Prefect API at {api_url}; "
                               f"{how} first") from None  # fmt: skip
        while True:
            for flow_run in runs:
                state = client.read_flow_run(flow_run.id).state
                if state is not None and state.type.value in FINAL_FLOW_RUN_STATES:
                    states[str(flow_run.id)] = state.type.value
            if len(states) == len(runs):
                return states
            time.sleep(poll_s)


@contextmanager
def cancelled_when_ended(client: Any, run_ids: list[Any], states: dict[str, str]) -> Iterator[None]:
    """While the stage waits on its trial flow runs: if it is ended (a timeout or a cancelled flow run sends
    SIGTERM; Ctrl-C), the runs not yet final are cancelled, so that no worker trains for a stage that is gone."""
    from prefect.states import Cancelled, Cancelling

    def ended(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, ended)
    try:
        yield
    except BaseException:
        why = "the optimize stage that started it ended"
        for run_id in run_ids:
            if str(run_id) not in states:  # a running one is cancelled by its worker, a waiting one at once
                running = client.read_flow_run(run_id).state.type.value == "RUNNING"
                client.set_flow_run_state(run_id, Cancelling(message=why) if running else Cancelled(message=why),
                                          force=True)  # fmt: skip
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_worker_flow_runs(pool: str, count: int, section: OptimizeSection, paths: OptimizePaths,
                         study_run_id: str) -> None:  # fmt: skip
    """`count` trial workers as flow runs of lmforge-stage/<pool> (flows/stage_worker.py), on that pool's worker.

    As for a routed stage: this commit, checked out there, and the stage's inputs, pushed to the DVC remote
    here and pulled there; the section and (relative) paths say what to train.
    """
    from flows.stage_worker import FORWARDED_ENV, GIT_REMOTE_ENV, STAGE_FLOW, committed_head, dvc, upstream_stages

    stage, here = f"optimize@{section.name}", Path.cwd()
    commit = committed_head(stage, "optimize.worker_pool")
    dvc(stage, ["push", *upstream_stages(stage, here)], here, dict(os.environ))  # for the workers to pull
    deployment = f"{STAGE_FLOW}/{pool}"
    print(f"optimize: {count} trial workers, flow runs of {deployment}, wait for a worker on pool {pool!r}")
    fields = {field.name: str(getattr(paths, field.name)) for field in dataclasses.fields(paths)}
    common = {"stage": stage, "repo": os.environ.get(GIT_REMOTE_ENV) or str(here), "commit": commit,
              "lock": (here / "dvc.lock").read_text() if (here / "dvc.lock").is_file() else None,
              "env": {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}}  # fmt: skip
    trials = {"section": section.model_dump(mode="json"), "paths": fields, "study_run_id": study_run_id}
    states = run_trial_flow_runs(deployment, [{**common, "trials": {**trials, "worker": worker}}
                                              for worker in range(count)])  # fmt: skip
    failed = {run: state for run, state in states.items() if state != "COMPLETED"}
    message = f"optimize: {len(failed)} trial worker flow run(s) of {deployment} failed: {failed}"
    if failed and set(failed.values()) == {"CRASHED"}:  # the worker or its machine was lost: try again
        raise TransientError(message)
    if failed:
        raise LmforgeError(message)
