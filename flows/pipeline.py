"""The DVC pipeline as a Prefect flow: one task per stage of dvc.yaml, each run through DVC.

The DAG is read from dvc.yaml (through DVC's own index), never restated here. Each task runs
`dvc repro --single-item <stage>`, so dvc.lock ends exactly as after `dvc repro`, and a stage DVC
finds unchanged is skipped in a second or two. Stages run one at a time, in dependency order: DVC
holds a lock on the repository while it reproduces a stage.

Retries: a stage that exits with lmforge's deterministic codes (2: bad params or input, 3: a
failed expectation) fails at once; any other failure (a killed worker, an unreachable tracking
server) is retried with exponential backoff. Timeouts and retries come from `orchestrate:` in
params.yaml; training stages carry the tag `gpu`, whose concurrency limit caps how many run at once.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.lost_workers import ensure_lost_worker_automation
from flows.stage_worker import (
    FORWARDED_ENV,
    GIT_REMOTE_ENV,
    SKIPPED,
    STAGE_FLOW,
    StageFailed,
    committed_head,
    dvc,
    logger,
)
from lmforge import tracking
from lmforge.artifacts import EvaluateReport, PromoteReport, label_shares
from lmforge.credentials import without_credentials
from lmforge.errors import LmforgeError, is_retried
from lmforge.params import Params, load_params
from lmforge.schema import OrchestrateParams
from lmforge.stage import RESTORE_ONLY_ENV, dvc_commands, dvc_stages, parse_command, report_files


def dag_stages(repo_root: Path = Path(".")) -> list[str]:
    """The stages of dvc.yaml, upstream first, as DVC itself orders them."""
    return list(dvc_commands(repo_root))


def stage_params(params_path: str, repo_root: Path = Path(".")) -> Params:
    """The params a flow runs with, which must be the file the stages of dvc.yaml read (their `--params`):
    with another, the run would report one file while its stages trained with the other."""
    read = {str(parse_command(address, command)[1].params) for address, command in dvc_commands(repo_root).items()}
    if {str((repo_root / params_path).resolve())} != {str((repo_root / path).resolve()) for path in read}:
        raise LmforgeError(f"params_path: {params_path}: the stages of dvc.yaml read {', '.join(sorted(read))}; "
                           "put these params there (`lmforge params use`, or copy the file)")  # fmt: skip
    return load_params(repo_root / params_path)


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a stage that failed transiently (is_retried), or whose machinery did: the Prefect API or
    a pipe that broke (OSError, HTTP errors) and a stage timeout (TimeoutError); never a bug in it."""
    import httpx

    try:
        state.result()
    except StageFailed as error:
        return is_retried(error.code)
    except (OSError, httpx.HTTPError):
        return True
    except Exception:
        return False
    return False


def run_stage(stage: str, env: dict[str, str], force: bool = False, pool: str | None = None,
              repo: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:  # fmt: skip
    """`dvc repro --single-item <stage>` here (ended, with everything it started, past `timeout_s`), or on
    `pool`'s worker; the stage's one-line error becomes the task's failure."""
    if pool is not None:
        return run_stage_on_pool(stage, env, force, pool, repo or str(Path.cwd()))
    started = time.perf_counter()
    result = dvc(stage, ["repro", "--single-item", *(["--force"] if force else []), stage], Path.cwd(), env,
                 timeout_s)  # fmt: skip
    seconds = round(time.perf_counter() - started, 1)
    status = "skipped (unchanged)" if SKIPPED in result.stdout else "ran"
    get_run_logger().info(f"{stage}: {status} in {seconds}s")
    return {"stage": stage, "status": status, "seconds": seconds}


def run_stage_on_pool(stage: str, env: dict[str, str], force: bool, pool: str, repo: str) -> dict[str, Any]:
    """`stage` as a flow run of lmforge-stage/<pool> on that pool's worker (flows/stage_worker.py), then
    restored in this workspace from DVC's run-cache, so dvc.lock ends as a local run would write it."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    started = time.perf_counter()
    here = Path.cwd()
    if force:  # the restore below finds the workspace matching dvc.lock and would keep the old outputs
        raise StageFailed(stage, 2, f"--force re-runs stages on this machine; it is routed to pool {pool!r} "
                                    "(orchestrate.pools): change an input, or run it without the pool")  # fmt: skip
    if SKIPPED in dvc(stage, ["repro", "--dry", "--single-item", stage], here, env).stdout:
        logger.info(f"{stage}: skipped (unchanged); not sent to pool {pool!r}")
        return {"stage": stage, "status": "skipped (unchanged)", "seconds": round(time.perf_counter() - started, 1)}
    commit = committed_head(stage)
    dvc(stage, ["push"], here, env)  # the upstream outputs, for the worker to pull
    lock = Path("dvc.lock").read_text() if Path("dvc.lock").is_file() else None
    parameters = {"stage": stage, "repo": repo, "commit": commit, "lock": lock, "force": force,
                  "env": {key: env[key] for key in FORWARDED_ENV if key in env}}  # fmt: skip
    deployment = f"{STAGE_FLOW}/{pool}"
    logger.info(f"{stage}: a flow run of {deployment} waits for a worker on pool {pool!r}")
    try:
        child = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=2)
    except ObjectNotFound:
        how = f"`prefect deploy --name {pool}` of prefect.yaml's lmforge-stage"
        raise StageFailed(
            stage, 2, f"orchestrate.pools: no deployment {deployment!r} on the Prefect API ({how})"
        ) from None
    state = child.state
    if state is None or not state.is_completed():
        raise StageFailed.from_message(stage, state.message if state is not None else "")
    dvc(stage, ["fetch", "--run-cache"], here, env)
    # Restored from the run-cache the worker pushed; should DVC miss it and run the command, the stage refuses.
    dvc(stage, ["repro", "--pull", "--single-item", stage], here, {**env, RESTORE_ONLY_ENV: "1"})
    seconds = round(time.perf_counter() - started, 1)
    logger.info(f"{stage}: ran on pool {pool!r} (flow run {child.id}), restored here in {seconds}s")
    return {"stage": stage, "status": f"ran on {pool}", "seconds": seconds}


def retry_options(settings: OrchestrateParams) -> dict[str, Any]:
    """How a stage's task retries: orchestrate.retries, with a doubling delay, when is_transient says so."""
    delays = [settings.retry_delay_s * 2**i for i in range(max(settings.retries, 1))]
    return {"retries": settings.retries, "retry_condition_fn": is_transient, "retry_delay_seconds": delays}


def stage_task(stage: str, settings: OrchestrateParams) -> Any:
    base = stage.split("@")[0]
    return task(
        name=stage,
        **retry_options(settings),
        # No timeout_seconds: Prefect cannot interrupt a task running in a thread; run_stage ends the
        # stage's process group itself at orchestrate.timeouts_s.
        # The gpu slot guards this machine's device; a stage routed to a pool uses its worker's.
        tags=["gpu"] if base in settings.gpu_stages and base not in settings.pools else [],
    )(run_stage)


def ensure_gpu_limit(limit: int) -> None:
    """The tag-based concurrency limit `gpu`: at most `limit` training stages at once, across flow runs.

    Prefect keeps a slot taken on a lease its task run renews, and the server's repossessor takes back a
    lease nobody renews. But leases live in the server's memory, and the slot count in its database: a flow
    run killed inside a training stage on a server that has restarted since (Prefect's ephemeral API, the
    default here, is a new server on every run) leaves a slot no lease accounts for, and with it every later
    training stage waits forever. So the count goes back to the leases the server holds.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=limit)
        holders = client.read_concurrency_limit_by_tag("gpu").active_slots
        taken = client.read_global_concurrency_limit_by_name("tag:gpu").active_slots
        if taken > len(holders):
            lost = taken - len(holders)
            logger().warning(f"concurrency limit gpu: {lost} slot(s) held by no lease (a flow run killed inside "
                             "a training stage): given back")  # fmt: skip
            client.update_global_concurrency_limit("tag:gpu", GlobalConcurrencyLimitUpdate(active_slots=len(holders)))


def summary_markdown(results: list[dict[str, Any]], experiment_id: str, parent_run_id: str) -> str:
    """Stages, metrics and promotion decisions, read from the reports where dvc.yaml puts them."""
    lines = ["# lmforge pipeline", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results]
    lines += [
        "",
        "## Metrics (frozen test split)",
        "",
        "| task | primary metric [95% CI]; baseline on the same examples |",
        "|---|---|",
    ]
    reports = [(stage.name, path) for stage, path in report_files().values() if path.is_file()]
    for m in (EvaluateReport.read(path) for name, path in reports if name == "evaluate"):
        lines.append(f"| {m.task} | {m.headline()} |")
    lines += ["", "## Promotion"]
    for report in (PromoteReport.read(path) for name, path in reports if name == "promote"):
        lines += promotion_markdown(report)
    run_link = mlflow_link(f"experiments/{experiment_id}/runs/{parent_run_id}", f"run {parent_run_id}")
    store = without_credentials(tracking.tracking_uri())
    lines += ["", f"MLflow pipeline run: {run_link} (`mlflow ui --backend-store-uri {store}` for a local store)"]
    return "\n".join(lines)


def promote_reports() -> list[PromoteReport]:
    """Every task's promote report where dvc.yaml puts it (those written so far)."""
    return [PromoteReport.read(path) for stage, path in report_files().values()
            if stage.name == "promote" and path.is_file()]  # fmt: skip


def promotion_markdown(report: PromoteReport) -> list[str]:
    """One task's gate: what changed in its data, the champion's figure on the old and the new test
    split, the candidate's, the decision and every reason, and any drift to look at."""
    name, version = report.registered_model, report.version
    version_link = mlflow_link(f"models/{name}/versions/{version}", f"models:/{name}/{version}")
    lines = ["", f"**{name} v{version}: {report.decision.upper()}** ({version_link})", ""]
    changes, counts = report.data_changes, report.label_counts or {}
    if changes is not None:
        lines += [
            "| split | labelled | new rows | removed | moved in | label shares before -> now |",
            "|---|---|---|---|---|---|",
        ]
        for split, change in changes.splits.items():
            before, now = (
                label_shares(changes.previous_label_counts.get(split, {})),
                label_shares(counts.get(split, {})),
            )
            shares = ", ".join(f"{label} {before.get(label, 0):.2f} -> {now.get(label, 0):.2f}"
                               for label in sorted(set(before) | set(now)))  # fmt: skip
            rows = sum(counts.get(split, {}).values())  # token classification: tags, not rows
            lines.append(f"| {split} | {rows} | +{change.new} | -{change.removed} | {change.moved_in} | {shares} |")
        lines.append("")
    metric, today = report.primary_metric or "primary", (report.test_sha256 or "")[:12]
    if report.champion_before_primary is not None:
        old = (report.champion_before_test_sha256 or "")[:12]
        rescored = ("" if report.champion_before_rescored is None
                    else f"; re-scored on today's ({today}): {report.champion_before_rescored:.4f}")  # fmt: skip
        evaluated = f"{report.champion_before_primary:.4f} on the split it was evaluated on ({old})"
        lines.append(f"- champion when the run started, v{report.champion_before}: {metric} {evaluated}{rescored}")
    if report.baseline_version is not None:
        lines.append(f"- baseline v{report.baseline_version}, re-trained on today's train split: "
                     f"{(report.baseline_decision or '-').upper()}")  # fmt: skip
        lines += [f"    - {reason}" for reason in report.baseline_reasons]
    if report.candidate_primary is not None:
        lines.append(f"- candidate v{version}: {metric} {report.candidate_primary:.4f} on today's test split ({today})")
    lines += [f"- {reason}" for reason in report.reasons]
    lines += [f"- **drift:** {line}" for line in report.drift]
    return lines


def mlflow_link(ui_path: str, otherwise: str) -> str:
    """A link into the MLflow UI when the tracking store is a server; the plain reference otherwise."""
    uri = without_credentials(tracking.tracking_uri())  # the reader signs in; the artifact holds no password
    return f"[{otherwise}]({uri.rstrip('/')}/#/{ui_path})" if uri.startswith("http") else f"`{otherwise}`"


@flow(name="lmforge-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", force_stages: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every stage of dvc.yaml in order under one MLflow pipeline run; publish a summary artifact."""
    import mlflow
    from prefect.runtime import flow_run

    params = stage_params(params_path)
    settings = params.orchestrate
    ensure_gpu_limit(settings.gpu_concurrency)
    if settings.pools or params.optimize.worker_pool:  # work on other machines: notice when one is lost
        ensure_lost_worker_automation(settings.lost_worker_s)
    experiment_id = tracking.setup()
    client = mlflow.MlflowClient()
    parent = tracking.create_pipeline_run(experiment_id, {"prefect.flow_run_id": str(flow_run.id)})
    env = {**os.environ, tracking.PARENT_ENV: parent, tracking.FLOW_RUN_ENV: str(flow_run.id),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           **({GIT_REMOTE_ENV: settings.git_remote} if settings.git_remote else {})}  # fmt: skip
    stages = dvc_stages()
    results: list[dict[str, Any]] = []
    try:
        run_dag(stages, settings, env, force_stages or [], results)
    finally:
        failed = len(results) < len(stages)
        client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
        create_markdown_artifact(summary_markdown(results, experiment_id, parent),
                                 key="lmforge-pipeline-summary", description="stages, metrics, promotion")  # fmt: skip
    return results


def run_dag(stages: dict[str, tuple[str, list[str]]], settings: OrchestrateParams, env: dict[str, str],
            force_stages: list[str], results: list[dict[str, Any]]) -> None:  # fmt: skip
    """Run the stages, appending each one's result (in DAG order).

    This machine's stages run one at a time in DAG order, as `dvc repro` runs them. A stage routed to a
    pool (`orchestrate.pools`) is submitted as soon as it is reached and starts when the stages it reads
    from are done, so routed stages run side by side, on their workers, while this machine goes on.
    """
    futures: dict[str, Any] = {}
    done: dict[str, dict[str, Any]] = {}
    try:
        for stage, (_, upstream) in stages.items():
            pool = settings.pools.get(stage.split("@")[0])
            work = stage_task(stage, settings)
            timeout_s = settings.timeouts_s.get(stage.split("@")[0])
            arguments = (stage, env, stage in force_stages, pool, settings.git_remote, timeout_s)
            waiting = [futures[name] for name in upstream if name in futures]  # one not run here counts as done
            if pool is not None:
                futures[stage] = work.submit(*arguments, wait_for=waiting)
                continue
            for future in waiting:  # the routed stages it reads from must be done (their failure is raised)
                future.result()
            done[stage] = work(*arguments)
        for stage, future in futures.items():
            done[stage] = future.result()
    finally:
        results.extend(done[name] for name in stages if name in done)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline [--force]` (what `lmforge run` starts): the flow on a temporary local
    Prefect server unless PREFECT_API_URL names one; prints each stage's status and seconds."""
    import argparse

    from flows.server import ephemeral_api_settings

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="re-run every stage, changed or not")
    args = parser.parse_args(argv)
    with ephemeral_api_settings():
        state = pipeline(force_stages=dag_stages() if args.force else [], return_state=True)
    if not state.is_completed():
        print(f"error: the pipeline flow failed: {state.message}", file=sys.stderr)
        return 1
    print(f"{'stage':<24} {'status':<20} {'seconds':>8}")
    for result in state.result():
        print(f"{result['stage']:<24} {result['status']:<20} {result['seconds']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
