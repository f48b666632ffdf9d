"""The MLflow Model Registry side of promotion: versions, aliases, evidence, the lock, rollback.

Aliases: `@champion` serves; `@previous` is the champion it replaced; `@challenger` is the latest
candidate that failed its gate. The registered model's tag `lmforge.champion_history` lists every
champion in order, so `lmforge rollback` can step back more than once.

Everything here fails closed: "no champion" is only ever the registry saying the model or alias does
not exist; any other failure to read it (a 5xx, a 403, a timeout) is a TransientError (exit 75) that
the flow retries, never a reason to promote. Evidence is read from the version's own source run, and
a model is loaded only if its MLmodel says it is lmforge's models-from-code pyfunc (no pickle).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lmforge import tracking
from lmforge.artifacts import EvaluateReport, VersionRef
from lmforge.errors import LmforgeError, TransientError
from lmforge.gate import Evidence
from lmforge.io import file_lock, sha256_file

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
MODEL_KIND_TAG, BASELINE_KIND, TRAINED_KIND = "lmforge.model_kind", "baseline", "trained"
HISTORY_TAG = "lmforge.champion_history"
LOCK_ENV = "LMFORGE_LOCK_URL"  # postgresql://... : an advisory lock shared by every machine


def model_name(prefix: str, task: str) -> str:
    return f"{prefix}-{task}"


def client() -> mlflow.MlflowClient:
    tracking.setup()
    return mlflow.MlflowClient()


def unavailable(what: str, error: Exception) -> TransientError:
    """The one-line error for a registry that did not answer what was asked."""
    code = getattr(error, "error_code", type(error).__name__)
    return TransientError(f"{tracking.tracking_uri()}: {what}: the registry answered {code}: "
                          f"{' '.join(str(error).split())[:160]}")  # fmt: skip


def alias_version(mlflow_client: mlflow.MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`; None only when the registry says the model or the alias does not exist."""
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise unavailable(f"reading {name}", error) from None
    except Exception as error:  # connection refused, timeouts, TLS: nothing known, nothing decided
        raise unavailable(f"reading {name}", error) from None
    version = model.aliases.get(alias)
    return None if version is None else model_version(mlflow_client, name, str(version))


def model_version(mlflow_client: mlflow.MlflowClient, name: str, version: str) -> ModelVersion:
    """A registered version; a missing one is the user's error (exit 2), any other failure transient."""
    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise LmforgeError(f"{name}: no version {version} in the registry") from None
        raise unavailable(f"reading {name} version {version}", error) from None
    except Exception as error:
        raise unavailable(f"reading {name} version {version}", error) from None


def chosen_version(mlflow_client: mlflow.MlflowClient, name: str, task: str, version: str | None) -> ModelVersion:
    """The version a command names (`--version N`), or the one holding @champion; a one-line error (exit 2)
    for no champion yet, a version that is not a number, or one that does not exist."""
    if version is None:
        champion = alias_version(mlflow_client, name, CHAMPION)
        if champion is None:
            raise LmforgeError(f"{name}: no version holds @champion yet (run `dvc repro promote@{task}`, "
                               f"or give --version)")  # fmt: skip
        return champion
    if not version.isdigit():
        raise LmforgeError(f"--version: {version!r} is not a version number (the default is the one holding @champion)")
    return model_version(mlflow_client, name, version)


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


def versions_tagged(mlflow_client: mlflow.MlflowClient, name: str, tag: str, value: str) -> list[ModelVersion]:
    """The versions of `name` whose tag `tag` is `value`; a registry that does not answer is transient."""
    try:
        return list(mlflow_client.search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'"))
    except Exception as error:
        raise unavailable(f"searching {name} for {tag}", error) from None


def evidence_of(mlflow_client: mlflow.MlflowClient, version: ModelVersion) -> Evidence:
    """metrics.json and per_example.json of the evaluate run that logged this very model.

    The evidence is bound to the model: the run that scored it must be the version's own source run
    (the registry's record, not a tag anyone can set).
    """
    where = f"{version.name} version {version.version}"
    tagged = version.tags.get("lmforge.eval_run_id")
    if not tagged:
        raise LmforgeError(f"{where} has no lmforge.eval_run_id tag: it was not registered by lmforge, so there "
                           "is no test-set evidence to compare with")  # fmt: skip
    if tagged != version.run_id:
        raise LmforgeError(f"{where}: its lmforge.eval_run_id {tagged} is not the run that logged the model "
                           f"({version.run_id}): the evidence is not this model's")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=tagged, artifact_path="eval", dst_path=folder))
        except Exception as error:  # a missing run, a 5xx, a timeout: no evidence, no decision
            raise unavailable(f"reading the evidence of {where} (evaluate run {tagged})", error) from None
        baseline = None
        if (local / "baseline" / "per_example.json").is_file():  # the task's baseline on the same examples
            baseline = Evidence.read(local / "baseline", is_baseline=True)
        return Evidence.read(local, baseline, is_baseline=version.tags.get(MODEL_KIND_TAG) == BASELINE_KIND)


def rescored_tag(test_sha256: str) -> str:
    """The version tag naming the promote run that scored the version on this test split."""
    return f"lmforge.rescored.{test_sha256[:16]}"


def score_tag(test_sha256: str) -> str:
    """The version tag a person reads in the UI: the version's figure on this test split."""
    return f"score.test_{test_sha256[:12]}"


def score_line(report: EvaluateReport) -> str:
    return (f"{report.primary_metric} {report.primary:.4f} [{report.primary_ci_low:.4f}, "
            f"{report.primary_ci_high:.4f}] on {report.test_examples} test examples")  # fmt: skip


def evidence_on(mlflow_client: mlflow.MlflowClient, version: ModelVersion, test_sha256: str) -> Evidence | None:
    """The version's evidence on this test split: its own evaluation, or a re-scoring recorded on it
    (lmforge/rescore.py); None when it was never scored there."""
    own = evidence_of(mlflow_client, version)
    if own.metrics.test_sha256 == test_sha256:
        return own
    return rescored_evidence(mlflow_client, version, test_sha256, own.is_baseline)


def rescored_evidence(mlflow_client: mlflow.MlflowClient, version: ModelVersion, test_sha256: str,
                      is_baseline: bool) -> Evidence | None:  # fmt: skip
    """The evidence of a re-scoring of the version on this test split, when one was recorded on it."""
    run_id = version.tags.get(rescored_tag(test_sha256))
    if not run_id:
        return None
    where = f"{version.name} version {version.version}"
    with tempfile.TemporaryDirectory() as folder:
        try:
            scored = mlflow_client.get_run(run_id).data.tags.get("lmforge.rescored_version")
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"rescored/{version.version}",
                                                             dst_path=folder))  # fmt: skip
        except Exception as error:
            if not_found(error):  # the run was deleted: score the version again
                return None
            raise unavailable(f"reading the re-scored evidence of {where} (promote run {run_id})", error) from None
        if scored != f"{version.name}/{version.version}":
            raise LmforgeError(f"{where}: its tag {rescored_tag(test_sha256)} names run {run_id}, which re-scored "
                               f"{scored or 'no version'}: the evidence is not this model's")  # fmt: skip
        return Evidence.read(local, is_baseline=is_baseline)


def record_rescore(mlflow_client: mlflow.MlflowClient, version: ModelVersion, evidence: Evidence, run_id: str) -> None:
    """Log a re-scoring to the active (promote) run `run_id` and point the version at it, with its figure."""
    name, number, sha = version.name, str(version.version), evidence.metrics.test_sha256
    mlflow.log_dict(evidence.metrics.data(), f"rescored/{number}/metrics.json")
    mlflow.log_dict(evidence.per_example.data(), f"rescored/{number}/per_example.json")
    mlflow.set_tag("lmforge.rescored_version", f"{name}/{number}")
    mlflow_client.set_model_version_tag(name, number, score_tag(sha), score_line(evidence.metrics))
    mlflow_client.set_model_version_tag(name, number, rescored_tag(sha), run_id)


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


def rollback(mlflow_client: mlflow.MlflowClient, name: str, force_reason: str | None = None) -> tuple[str, str]:
    """Give @champion back to the champion before the current one; return (from, to) versions.

    Under the promotion lock, like a promotion. Only a version whose gate decision was pass serves
    again; one set by hand (or that failed) needs `force_reason`, which is recorded on it.
    """
    with promotion_lock(name):
        current = alias_version(mlflow_client, name, CHAMPION)
        if current is None:
            raise LmforgeError(f"{name}: no @champion to roll back")
        history = champion_history(mlflow_client, name)
        while history and history[-1] == str(current.version):
            history.pop()
        if not history:
            raise LmforgeError(f"{name}: version {current.version} is the first champion; nothing to roll back to")
        target = history[-1]
        decision = model_version(mlflow_client, name, target).tags.get("gate.decision")
        if decision != "pass" and not force_reason:
            raise LmforgeError(f"{name}: version {target} never passed the gate (gate.decision: {decision or 'none'}, "
                               "set by hand?); roll back to it with --force --reason '...'")  # fmt: skip
        if decision != "pass":
            mlflow_client.set_model_version_tag(name, target, "lmforge.forced_champion_reason", str(force_reason))
        _step_back(mlflow_client, name, current, history)
        return str(current.version), target


def _step_back(mlflow_client: mlflow.MlflowClient, name: str, current: ModelVersion, history: list[str]) -> None:
    """Move @champion to the last of `history` (and @previous to the one before); record it."""
    target = history[-1]
    mlflow_client.set_registered_model_alias(name, CHAMPION, target)
    if len(history) > 1:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, history[-2])
    else:
        mlflow_client.delete_registered_model_alias(name, PREVIOUS)
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    mlflow_client.set_model_version_tag(name, str(current.version), "lmforge.rolled_back", "true")


SERVING_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader of a models-from-code pyfunc


def not_found(error: Exception) -> bool:
    """The store said the thing does not exist (as opposed to not answering). A tracking server's artifact
    proxy answers 404, which MLflow passes on only in its message."""
    if isinstance(error, FileNotFoundError) or getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
        return True
    message = str(error)
    return "RESOURCE_DOES_NOT_EXIST" in message or bool(re.search(r"\b404\b", message))


def lmforge_flavor(uri: str) -> tuple[bool, str]:
    """Is the model at `uri` lmforge's models-from-code pyfunc? Read from its MLmodel file alone.

    A pickled python_model (or any other flavor) is refused before anything of it is loaded:
    unpickling runs whatever code the pickle names. A store that does not answer is a TransientError.
    """
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel"))
    except Exception as error:
        if not_found(error):
            return False, f"{uri}: no MLmodel in its artifacts; not loaded"
        raise unavailable(f"downloading {uri}/MLmodel", error) from None
    try:
        mlmodel = yaml.safe_load(local.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        return False, f"{uri}: its MLmodel is not YAML ({type(error).__name__}); not loaded"
    pyfunc = (mlmodel.get("flavors") or {}).get("python_function") or {}
    code = Path(str(pyfunc.get("model_code_path", ""))).name
    if pyfunc.get("loader_module") != SERVING_LOADER or code != "serving.py" or "python_model" in pyfunc:
        flavors = ", ".join(mlmodel.get("flavors") or {}) or "none"
        return False, (f"{uri} is not lmforge's models-from-code pyfunc (flavors: {flavors}; loader "
                       f"{pyfunc.get('loader_module')}); refused before loading")  # fmt: skip
    if pyfunc.get("code"):  # code_paths: MLflow would import the model's own copies of modules first
        return False, f"{uri} brings code of its own (code_paths: {pyfunc['code']}); refused before loading"
    return True, f"{uri} is lmforge's models-from-code pyfunc"


def serving_code_is_ours(local: Path) -> str | None:
    """Why the downloaded model's serving.py is not lmforge's own, byte for byte (None when it is).

    MLflow executes that file to load the model: a version carrying any other file (edited, or logged
    by another lmforge release) is refused, never run. Log it again with `dvc repro evaluate`.
    """
    from lmforge.scoring import SERVING_CODE

    found = sorted(local.rglob("serving.py"))
    if len(found) != 1:
        return f"holds {len(found)} serving.py files, not one"
    if sha256_file(found[0]) != sha256_file(SERVING_CODE):
        return "its serving.py is not lmforge's (sha256 differs): not executed"
    return None


def fetch_checked(name: str, version: str) -> Path | str:
    """The registered version's files, downloaded once its MLmodel says it is lmforge's pyfunc and its
    serving.py is lmforge's own; or the reason (a str) it was refused. Nothing of it is executed here.
    A store that does not answer is a TransientError (exit 75)."""
    uri = f"models:/{name}/{version}"
    ours, why = lmforge_flavor(uri)
    if not ours:
        return why
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as error:
        if not_found(error):
            return f"{uri}: its artifacts are gone ({type(error).__name__}); not loaded"
        raise unavailable(f"downloading {uri}", error) from None
    foreign = serving_code_is_ours(local)
    if foreign is not None:
        return f"{uri} {foreign}; refused before loading"
    return local


def load_pyfunc(name: str, version: str) -> Any:
    """The registered version loaded as lmforge's pyfunc, or the reason (a str) it was refused or does not load.

    Fetching it is one step and loading it another: a store that does not answer while the model is
    downloaded is a TransientError (exit 75, retried, nothing decided); only a model that arrived
    and does not load (or is not lmforge's) is the gate's reason to fail it.
    """
    uri = f"models:/{name}/{version}"
    local = fetch_checked(name, version)
    if isinstance(local, str):
        return local
    try:
        return mlflow.pyfunc.load_model(str(local))
    except Exception as error:  # it arrived and does not load: the gate's reason, not a crash
        return f"{uri} does not load: {type(error).__name__}: {' '.join(str(error).split())[:120]}"


def smoke_check(model: Any, uri: str, text: str) -> tuple[bool, str]:
    """Does a loaded pyfunc (or the reason it is not one) answer one row on a raw text?"""
    import pandas as pd

    if isinstance(model, str):
        return False, model
    try:
        predictions = model.predict(pd.DataFrame({"text": [text]}))
    except Exception as error:
        return False, f"{uri} does not load and predict: {type(error).__name__}: {' '.join(str(error).split())[:120]}"
    if len(predictions) != 1:
        return False, f"{uri} answered {len(predictions)} rows for 1 input"
    return True, f"{uri} loads from the registry and predicts on a smoke input"


def smoke_load(name: str, version: str, text: str) -> tuple[bool, str]:
    """Is the registered artifact lmforge's pyfunc, and does it load from the registry and answer on a raw text?"""
    return smoke_check(load_pyfunc(name, version), f"models:/{name}/{version}", text)


def side_by_side_latency(candidate: Any, champion: Any, texts: list[str]) -> tuple[float, float] | str:
    """Median single-text latency in ms of two loaded pyfuncs (candidate, champion), on the same texts.

    The two are interleaved (and which goes first alternates), so a machine that slows down or speeds
    up meanwhile slows both alike; figures taken at different times on a noisy machine are not
    compared. Either given as the reason it did not load (a str): that reason is returned instead.
    """
    import statistics
    import time

    import pandas as pd

    for model in (candidate, champion):
        if isinstance(model, str):
            return model
    timings: list[list[float]] = [[], []]
    for index, text in enumerate(texts):
        frame = pd.DataFrame({"text": [text]})
        for which in (0, 1) if index % 2 else (1, 0):
            started = time.perf_counter()
            (candidate, champion)[which].predict(frame)
            timings[which].append((time.perf_counter() - started) * 1000)
    return statistics.median(timings[0]), statistics.median(timings[1])


PROMOTION_LOCK_TIMEOUT_S = 900.0  # a promotion re-scores the champion: minutes, never this long


@contextmanager
def promotion_lock(name: str, timeout_s: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[None]:
    """One promotion of a registered model at a time: check the champion and move it atomically.

    With LMFORGE_LOCK_URL (PostgreSQL) the lock is an advisory lock every machine shares; otherwise
    a file lock beside the tracking store, which serialises the processes of one machine. Waiting
    longer than `timeout_s` (another promotion stuck, a lock never released) is transient: exit 75.
    """
    waited_too_long = TransientError(f"another promotion of {name} has held its lock for over {timeout_s:.0f}s; "
                                     "nothing moved (try again)")  # fmt: skip
    url = os.environ.get(LOCK_ENV)
    if url:
        import psycopg2
        import psycopg2.errors

        key = f"lmforge-promote:{name}"
        try:
            connection = psycopg2.connect(url, connect_timeout=30)
        except psycopg2.OperationalError as error:
            reason = " ".join(str(error).split())[:160]
            raise TransientError(f"{LOCK_ENV}: cannot reach the promotion lock's database ({reason})") from None
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(timeout_s * 1000)}ms",))
                try:
                    cursor.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
                except psycopg2.errors.LockNotAvailable:
                    raise waited_too_long from None
            try:
                yield
            finally:
                # Unlock explicitly: a closed session frees its locks only once the server notices.
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
        finally:
            connection.close()
        return
    uri = tracking.tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else tracking.repo_root()
    with file_lock(folder / ".lmforge-locks" / f"{name}.lock", timeout_s, waited_too_long):
        yield


def describe(version: ModelVersion | None) -> VersionRef | None:
    if version is None:
        return None
    return VersionRef(version=str(version.version), decision=version.tags.get("gate.decision"), run_id=version.run_id)
