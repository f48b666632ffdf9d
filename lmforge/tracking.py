"""MLflow: where runs go, how a stage run is tagged, and how stage runs group under a pipeline run.

Default store: a SQLite file in the repository (mlflow.db) with artifacts beside it (mlartifacts/);
`MLFLOW_TRACKING_URI` points everything at a real server instead. Every stage run is a child of one
pipeline run: the one named by `LMFORGE_PARENT_RUN_ID` (set by `lmforge run` and the Prefect flow),
or else the latest pipeline run for this git commit and params file (the `--params` the stage was
given), created when missing, so that the stages of one `dvc repro` sit together in the UI. A stage
run is named like its DVC stage and Prefect task: `finetune@sentiment`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lmforge.credentials import is_secret_key, masked
from lmforge.errors import TransientError

EXPERIMENT = "lmforge"
PARENT_ENV = "LMFORGE_PARENT_RUN_ID"
PARAMS_ENV = "LMFORGE_PARAMS_FILE"  # set by the stage command line (lmforge/stage.py) to its --params
FLOW_RUN_ENV = "LMFORGE_PREFECT_FLOW_RUN_ID"  # set by the Prefect flow: the flow run a stage runs in
# MLflow's INFO lines and download bars would bury a stage's one-line error on stderr.
logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def repo_root() -> Path:
    """The repository the embedded stores live in. A stage of `dvc exp run --temp` or `--queue` runs in
    a temporary copy that is thrown away; DVC names the real repository in DVC_ROOT (dvc.env)."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def dvc_experiment() -> str | None:
    """The DVC experiment this stage runs in (`dvc exp run` sets DVC_EXP_NAME), or None."""
    return os.environ.get("DVC_EXP_NAME") or None


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def setup(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store and experiment; return the experiment id. A tracking server that does not
    answer is transient (exit 75: the flow retries), in one line."""
    try:
        return find_or_create_experiment(experiment)
    except Exception as error:
        if not unreachable(error):
            raise
        raise TransientError(f"{masked(tracking_uri())}: the tracking server did not answer "
                             f"({' '.join(str(error).split())[:160]})") from None  # fmt: skip


def find_or_create_experiment(experiment: str) -> str:
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None  # a server decides where artifacts go (proxied object storage)
    if uri.startswith("sqlite:///"):  # embedded: artifacts beside the database file
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(experiment, artifact_location=location)
    except Exception:  # created meanwhile by a concurrent stage
        created = mlflow.get_experiment_by_name(experiment)
        if created is None:
            raise
        return created.experiment_id


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def dvc_lineage(stage: str, lock: Path = Path("dvc.lock"), dvc_file: Path = Path("dvc.yaml")) -> dict[str, str]:
    """md5 of each of the stage's deps as recorded in dvc.lock (upstream outs), by dep path.

    During `dvc repro` the running stage's own lock entry is not written yet, but its inputs are
    the outputs of stages that finished, and those are in dvc.lock.
    """
    if not lock.is_file() or not dvc_file.is_file():
        return {}
    stages = yaml.safe_load(dvc_file.read_text()).get("stages", {})
    base = stage.split("@")[0]
    deps = stages.get(base, {}).get("deps") or stages.get(base, {}).get("do", {}).get("deps", [])
    if any("${" in str(dep) for dep in deps):  # a foreach item's deps (data/raw/${item.dataset}): DVC resolves them
        deps = resolved_deps(stage, dvc_file.parent)
    recorded: dict[str, str] = {}
    for entry in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in entry.get("outs", []):
            recorded[out["path"]] = out.get("md5", "")
    return {f"dvc.{dep}": recorded[dep] for dep in deps if isinstance(dep, str) and dep in recorded}


def resolved_deps(stage: str, root: Path) -> list[str]:
    """The deps of dvc.yaml's stage `stage` (`finetune@sentiment`) with its templates filled in by DVC."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            found = [entry for entry in repo.index.stages if entry.name == stage]
            return [str(dep.def_path) for dep in found[0].deps] if found else []
    except Exception:  # not a DVC repository: no lineage, never a failed stage
        return []


def params_digest(section: Any) -> str:
    return hashlib.sha256(yaml.safe_dump(section, sort_keys=True).encode()).hexdigest()[:16]


def loggable_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten params for mlflow.log_params: a key that names a secret is left out, a value that looks
    like one is masked (`max_new_tokens` is a knob, `hf_token` a secret)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if is_secret_key(str(key)):
            continue
        if isinstance(value, dict):
            flat.update(loggable_params(value, f"{name}."))
        else:
            flat[name] = masked(str(value))[:500]
    return flat


def pipeline_key() -> str:
    """What makes stage runs one pipeline when no parent is named: the git commit and the params file."""
    params_file = Path(os.environ.get(PARAMS_ENV, "params.yaml"))
    key = hashlib.sha256((git_commit() + (params_file.read_text() if params_file.exists() else "")).encode())
    return key.hexdigest()[:16]


def pipeline_parent(experiment_id: str) -> str:
    """The pipeline run that stage runs nest under (see the module docstring)."""
    import mlflow

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key_hex = pipeline_key()
    found = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`lmforge.pipeline_key` = '{key_hex}' and tags.`lmforge.kind` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    run_id = create_pipeline_run(experiment_id, {"lmforge.pipeline_key": key_hex})
    mlflow.MlflowClient().set_terminated(run_id)
    return run_id


def create_pipeline_run(experiment_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A new pipeline run, the parent of one pipeline's stage runs, named for the git commit; its id.
    Whoever runs the stages (`lmforge run --engine dvc`, the Prefect flow) ends it."""
    import mlflow

    run = mlflow.MlflowClient().create_run(
        experiment_id or setup(),
        run_name=f"pipeline {git_commit()[:7]}",
        tags={"lmforge.kind": "pipeline", "git_commit": git_commit(), **(tags or {})},
    )
    return str(run.info.run_id)


@contextmanager
def stage_run(
    stage: str, params: dict[str, Any], item: str | None = None, system_metrics: bool = True
) -> Iterator[Any]:
    """A child run of the pipeline run named `stage@item`, tagged stage / item / git commit / dvc lineage."""
    import mlflow

    name = f"{stage}@{item}" if item else stage
    try:
        experiment = find_or_create_experiment(EXPERIMENT)  # unanswered: the line below names this run
        parent = pipeline_parent(experiment)
        tags = {"stage": stage, "git_commit": git_commit(), "params_digest": params_digest(params),
                **dvc_lineage(name), "lmforge.pipeline_key": pipeline_key()}  # fmt: skip
        if item:
            tags["item"] = item
            tags["task" if stage != "pretrain" else "model"] = item
        with mlflow.start_run(experiment_id=experiment, run_name=name, parent_run_id=parent, tags=tags,
                              log_system_metrics=system_metrics) as run:  # fmt: skip
            mlflow.log_params(loggable_params(params))
            yield run
    except Exception as error:
        if not unreachable(error):
            raise
        # A tracking server down or failing is transient: exit 75, the flow retries, checkpoints are kept.
        raise TransientError(f"{masked(tracking_uri())}: the tracking server did not answer {name}'s run "
                             f"({' '.join(str(error).split())[:160]})") from None  # fmt: skip


def log_metrics_async(metrics: dict[str, float], step: int) -> None:
    """Log a training step's metrics without waiting for the server: MLflow's async queue sends them (with its
    retries) while training goes on, so a tracking server that stops answering does not stop training; the
    run's end waits for the queue, and a server still down then is transient (stage_run: exit 75)."""
    import mlflow

    mlflow.log_metrics(metrics, step=step, synchronous=False)


def unreachable(error: BaseException) -> bool:
    """Whether an MLflow call failed because its server could not be reached or answered 5xx (not a bad request)."""
    import requests

    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
        return True
    text = str(error)
    return type(error).__name__ == "MlflowException" and bool(
        re.search(r"Max retries exceeded|Connection (refused|reset|aborted)|timed out|too many 5\d\d error"
                  r"|TEMPORARILY_UNAVAILABLE|status code 5\d\d|API request to .* failed", text)
    )  # fmt: skip
