"""The MLflow Model Registry side of promotion: versions, aliases, evidence, the lock, rollback.

Aliases: `@champion` serves; `@previous` is the champion it replaced; `@challenger` is the latest
candidate that failed its gate. The registered model's tag `lmforge.champion_history` lists every
champion in order, so `lmforge rollback` can step back more than once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lmforge import tracking
from lmforge.artifacts import EvalReport, PerExample, VersionRef
from lmforge.errors import LmforgeError
from lmforge.gate import Evidence

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
HISTORY_TAG = "lmforge.champion_history"
LOCK_ENV = "LMFORGE_LOCK_URL"  # postgresql://... : an advisory lock shared by every machine


def model_name(prefix: str, task: str) -> str:
    return f"{prefix}-{task}"


def client() -> mlflow.MlflowClient:
    tracking.setup()
    return mlflow.MlflowClient()


def alias_version(mlflow_client: mlflow.MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register(mlflow_client: mlflow.MlflowClient, name: str, model_uri: str, eval_run_id: str,
             tags: dict[str, str]) -> ModelVersion:  # fmt: skip
    """Register the candidate, or return the version that already holds this very evaluation."""
    with contextlib.suppress(MlflowException):  # it exists already
        mlflow_client.create_registered_model(name, description=f"lmforge task model ({name})")
    existing = mlflow_client.search_model_versions(f"name = '{name}' and tags.`lmforge.eval_run_id` = '{eval_run_id}'")
    if existing:
        return existing[0]
    version = mlflow.register_model(model_uri, name, tags={**tags, "lmforge.eval_run_id": eval_run_id})
    return mlflow_client.get_model_version(name, version.version)


def evidence_of(mlflow_client: mlflow.MlflowClient, version: ModelVersion) -> Evidence:
    """metrics.json and per_example.json that the evaluate run logged for this version."""
    run_id = version.tags.get("lmforge.eval_run_id")
    if not run_id:
        raise LmforgeError(
            f"{version.name} version {version.version} has no lmforge.eval_run_id tag: "
            "it was not registered by lmforge, so there is no test-set evidence to compare with"
        )
    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval", dst_path=folder))
        return Evidence(EvalReport.read(local / "metrics.json"), PerExample.read(local / "per_example.json"))


def champion_history(mlflow_client: mlflow.MlflowClient, name: str) -> list[str]:
    tag = mlflow_client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [version for version in tag.split(",") if version]


def crown(mlflow_client: mlflow.MlflowClient, name: str, version: str) -> None:
    """Move @champion to `version`; the one it replaces becomes @previous; record the history."""
    current = alias_version(mlflow_client, name, CHAMPION)
    version = str(version)
    if current is not None and str(current.version) != version:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, str(current.version))
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    history = champion_history(mlflow_client, name)
    if current is not None and (not history or history[-1] != str(current.version)):
        history.append(str(current.version))  # a champion set by hand in the UI joins the history too
    history.append(version)
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))


def rollback(mlflow_client: mlflow.MlflowClient, name: str) -> tuple[str, str]:
    """Give @champion back to the champion before the current one; return (from, to) versions."""
    current = alias_version(mlflow_client, name, CHAMPION)
    if current is None:
        raise LmforgeError(f"{name}: no @champion to roll back")
    history = champion_history(mlflow_client, name)
    while history and history[-1] == str(current.version):
        history.pop()
    if not history:
        raise LmforgeError(f"{name}: version {current.version} is the first champion; nothing to roll back to")
    target = history[-1]
    mlflow_client.set_registered_model_alias(name, CHAMPION, target)
    if len(history) > 1:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, history[-2])
    else:
        mlflow_client.delete_registered_model_alias(name, PREVIOUS)
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    mlflow_client.set_model_version_tag(name, str(current.version), "lmforge.rolled_back", "true")
    return str(current.version), target


def smoke_load(name: str, version: str, text: str) -> tuple[bool, str]:
    """Does the registered artifact load from the registry and answer on a raw text?"""
    import pandas as pd

    uri = f"models:/{name}/{version}"
    try:
        predictions = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": [text]}))
    except Exception as error:  # any failure here is the gate's reason, not a crash
        return False, f"{uri} does not load and predict: {type(error).__name__}: {' '.join(str(error).split())[:120]}"
    if len(predictions) != 1:
        return False, f"{uri} answered {len(predictions)} rows for 1 input"
    return True, f"{uri} loads from the registry and predicts on a smoke input"


@contextmanager
def promotion_lock(name: str) -> Iterator[None]:
    """One promotion of a registered model at a time: check the champion and move it atomically.

    With LMFORGE_LOCK_URL (PostgreSQL) the lock is an advisory lock every machine shares; otherwise
    a file lock beside the tracking store, which serialises the processes of one machine.
    """
    url = os.environ.get(LOCK_ENV)
    if url:
        import psycopg2

        key = f"lmforge-promote:{name}"
        connection = psycopg2.connect(url)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
            try:
                yield
            finally:
                # Unlock explicitly: a closed session frees its locks only once the server notices.
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
        finally:
            connection.close()
        return
    from filelock import FileLock

    uri = tracking.tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path(".")
    lock_dir = folder / ".lmforge-locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{name}.lock")):
        yield


def describe(version: ModelVersion | None) -> VersionRef | None:
    if version is None:
        return None
    return VersionRef(version=str(version.version), decision=version.tags.get("gate.decision"), run_id=version.run_id)
