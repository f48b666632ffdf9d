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
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from lmforge import tracking
from lmforge.artifacts import EvaluateReport, PromoteReport, label_shares
from lmforge.errors import LmforgeError
from lmforge.params import Params, load_params
from lmforge.schema import OrchestrateParams
from lmforge.stage import dvc_commands, parse_command, report_files

DETERMINISTIC_EXIT_CODES = {2, 3}  # lmforge: bad params/input (2), a broken expectation (3)
SKIPPED = "didn't change, skipping"


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, message: str) -> None:
        super().__init__(f"stage {stage} failed (exit {code}): {message}")
        self.stage, self.code = stage, code


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
    """Retry unless the stage said the failure is the user's to fix (exit 2 or 3)."""
    try:
        state.result()
    except StageFailed as error:
        return error.code not in DETERMINISTIC_EXIT_CODES
    except Exception:
        return True
    return False


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def run_stage(stage: str, env: dict[str, str], force: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`; the stage's one-line error becomes the task's failure."""
    logger = get_run_logger()
    started = time.perf_counter()
    command = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        logger.error(result.stderr[-3000:])
        code = _stage_exit_code(result)
        raise StageFailed(stage, code, last_error_line(result.stderr))
    status = "skipped (unchanged)" if SKIPPED in result.stdout else "ran"
    logger.info(f"{stage}: {status} in {seconds}s")
    return {"stage": stage, "status": status, "seconds": seconds}


def _stage_exit_code(result: subprocess.CompletedProcess) -> int:
    """DVC exits 255 when a stage command fails; the stage's own code is in its message
    (`ERROR: failed to reproduce 'validate': failed to run: ..., exited with 3`)."""
    found = re.findall(r"exited with (-?\d+)", result.stderr)
    return int(found[-1]) if found else result.returncode


def stage_task(stage: str, settings: OrchestrateParams) -> Any:
    base = stage.split("@")[0]
    return task(
        name=stage,
        retries=settings.retries,
        retry_delay_seconds=[settings.retry_delay_s * 2**i for i in range(max(settings.retries, 1))],
        retry_condition_fn=is_transient,
        timeout_seconds=settings.timeouts_s.get(base),
        tags=["gpu"] if base in settings.gpu_stages else [],
    )(run_stage)


def ensure_gpu_limit(limit: int) -> None:
    """The tag-based concurrency limit `gpu`: at most `limit` training stages at once, across flow runs."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=limit)


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
    for report in promote_reports():
        lines += promotion_markdown(report)
    run_link = mlflow_link(f"experiments/{experiment_id}/runs/{parent_run_id}", f"run {parent_run_id}")
    lines += ["", f"MLflow pipeline run: {run_link} (`mlflow ui --backend-store-uri {tracking.tracking_uri()}` "
              "for a local store)"]  # fmt: skip
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
    uri = tracking.tracking_uri()
    return f"[{otherwise}]({uri.rstrip('/')}/#/{ui_path})" if uri.startswith("http") else f"`{otherwise}`"


@flow(name="lmforge-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", force_stages: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every stage of dvc.yaml in order under one MLflow pipeline run; publish a summary artifact."""
    import mlflow
    from prefect.runtime import flow_run

    settings = stage_params(params_path).orchestrate
    ensure_gpu_limit(settings.gpu_concurrency)
    experiment_id = tracking.setup()
    client = mlflow.MlflowClient()
    parent = tracking.create_pipeline_run(experiment_id, {"prefect.flow_run_id": str(flow_run.id)})
    env = {**os.environ, tracking.PARENT_ENV: parent, tracking.FLOW_RUN_ENV: str(flow_run.id),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    results: list[dict[str, Any]] = []
    stages = dag_stages()
    try:
        for stage in stages:
            results.append(stage_task(stage, settings)(stage, env, stage in (force_stages or [])))
    finally:
        failed = len(results) < len(stages)
        client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
        create_markdown_artifact(summary_markdown(results, experiment_id, parent),
                                 key="lmforge-pipeline-summary", description="stages, metrics, promotion")  # fmt: skip
    return results


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
