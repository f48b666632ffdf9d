"""The MLflow Model Registry side of promotion, on a real MLflow store (the session's SQLite one)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pytest

from lmforge import registry, tracking
from lmforge.artifacts import BaselineScores, EvaluateReport, PerExample, VersionRef
from lmforge.errors import LmforgeError

# smoke_load imports this module as a pyfunc flavor: see _load_pyfunc below.
FAKE_MLMODEL = f"flavors:\n  python_function:\n    loader_module: {__name__}\n"


class _RowsPerInput:
    """A stand-in pyfunc model: answers `rows` predictions per input row."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def predict(self, frame: Any, params: Any = None) -> list[str]:
        return ["label"] * (len(frame) * self.rows)


def _load_pyfunc(path: str) -> _RowsPerInput:
    """The pyfunc loader MLflow calls for FAKE_MLMODEL: `data` (if any) holds the rows per input."""
    return _RowsPerInput(int(Path(path).read_text()) if os.path.isfile(path) else 1)


@pytest.fixture(scope="module")
def client() -> mlflow.MlflowClient:
    return registry.client()


def _model_run(mlmodel: str, extra: dict[str, str] | None = None) -> str:
    """A finished run holding an `x/MLmodel` (so `runs:/<id>/x` registers); return its id."""
    with mlflow.start_run(experiment_id=tracking.setup()) as run:
        mlflow.log_text(mlmodel, "x/MLmodel")
        for name, text in (extra or {}).items():
            mlflow.log_text(text, f"x/{name}")
    return run.info.run_id


@pytest.fixture(scope="module")
def model_uri() -> str:
    return f"runs:/{_model_run(FAKE_MLMODEL)}/x"


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def _versions(client: mlflow.MlflowClient, name: str, model_uri: str, count: int) -> list[str]:
    """Register `count` versions of a fresh model, each for its own (made-up) evaluation run, as gated and passed
    (rollback returns only to a version that passed its gate)."""
    return [str(registry.register(client, name, model_uri, f"eval-{i}", {"gate.decision": "pass"}).version)
            for i in range(count)]  # fmt: skip


def _alias(client: mlflow.MlflowClient, name: str, alias: str) -> str | None:
    found = registry.alias_version(client, name, alias)
    return None if found is None else str(found.version)


def _history_tag(client: mlflow.MlflowClient, name: str) -> str | None:
    return client.get_registered_model(name).tags.get(registry.HISTORY_TAG)


def test_model_name_joins_prefix_and_task():
    assert registry.model_name("lmforge", "sentiment") == "lmforge-sentiment"


def test_registering_the_same_evaluation_twice_returns_the_same_version(client, model_uri):
    name = _name()
    first = registry.register(client, name, model_uri, "eval-a", {"gate.decision": "pending"})
    again = registry.register(client, name, model_uri, "eval-a", {"gate.decision": "pending"})
    other = registry.register(client, name, model_uri, "eval-b", {})
    assert (str(first.version), str(again.version), str(other.version)) == ("1", "1", "2")
    assert first.tags == {"gate.decision": "pending", "lmforge.eval_run_id": "eval-a"}
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_crown_moves_champion_keeps_previous_and_appends_history(client, model_uri):
    name = _name()
    _versions(client, name, model_uri, 3)

    registry.crown(client, name, "1")
    assert (_alias(client, name, "champion"), _alias(client, name, "previous")) == ("1", None)
    assert _history_tag(client, name) == "1"

    registry.crown(client, name, "2")
    assert (_alias(client, name, "champion"), _alias(client, name, "previous")) == ("2", "1")
    assert registry.champion_history(client, name) == ["1", "2"]

    registry.crown(client, name, "3")
    assert (_alias(client, name, "champion"), _alias(client, name, "previous")) == ("3", "2")
    assert registry.champion_history(client, name) == ["1", "2", "3"]

    registry.crown(client, name, "3")  # crowning the champion again does not make it its own @previous
    assert (_alias(client, name, "champion"), _alias(client, name, "previous")) == ("3", "2")


def test_a_champion_set_by_hand_joins_the_history_on_the_next_crown(client, model_uri):
    name = _name()
    _versions(client, name, model_uri, 2)
    client.set_registered_model_alias(name, "champion", "1")  # as in the MLflow UI: no history tag
    assert registry.champion_history(client, name) == []

    registry.crown(client, name, "2")
    assert registry.champion_history(client, name) == ["1", "2"]
    assert _alias(client, name, "previous") == "1"
    assert registry.rollback(client, name) == ("2", "1")
    assert _alias(client, name, "champion") == "1"


def test_rollback_steps_back_through_every_champion_then_refuses(client, model_uri):
    name = _name()
    _versions(client, name, model_uri, 3)
    for version in ("1", "2", "3"):
        registry.crown(client, name, version)

    assert registry.rollback(client, name) == ("3", "2")
    assert (_alias(client, name, "champion"), _alias(client, name, "previous")) == ("2", "1")
    assert _history_tag(client, name) == "1,2"
    assert client.get_model_version(name, "3").tags.get("lmforge.rolled_back") == "true"

    assert registry.rollback(client, name) == ("2", "1")
    assert (_alias(client, name, "champion"), _alias(client, name, "previous")) == ("1", None)
    assert _history_tag(client, name) == "1"

    with pytest.raises(LmforgeError, match="nothing to roll back to") as caught:
        registry.rollback(client, name)
    assert name in str(caught.value)
    assert _alias(client, name, "champion") == "1"  # refused: nothing moved


def test_rollback_after_crowning_the_champion_twice_goes_to_the_one_before(client, model_uri):
    name = _name()
    _versions(client, name, model_uri, 2)
    for version in ("1", "2", "2"):
        registry.crown(client, name, version)
    assert registry.rollback(client, name) == ("2", "1")


def test_rollback_without_a_champion_refuses_naming_the_model(client, model_uri):
    name = _name()
    _versions(client, name, model_uri, 1)
    with pytest.raises(LmforgeError, match="no @champion") as caught:
        registry.rollback(client, name)
    assert name in str(caught.value)


def test_alias_version_is_none_for_a_missing_alias_or_model(client, model_uri):
    name = _name()
    _versions(client, name, model_uri, 2)
    client.set_registered_model_alias(name, "challenger", "2")
    assert _alias(client, name, "challenger") == "2"
    assert registry.alias_version(client, name, "champion") is None
    assert registry.alias_version(client, _name(), "champion") is None


def test_describe_gives_the_version_its_gate_decision_and_run(client, model_uri):
    name = _name()
    registry.register(client, name, model_uri, "eval-a", {"gate.decision": "pass"})
    registry.register(client, name, model_uri, "eval-b", {})
    run_id = model_uri.split("/")[1]
    assert registry.describe(None) is None
    assert registry.describe(client.get_model_version(name, "1")) == VersionRef(
        version="1", decision="pass", run_id=run_id
    )
    assert registry.describe(client.get_model_version(name, "2")) == VersionRef(
        version="2", decision=None, run_id=run_id
    )


def _eval_report() -> EvaluateReport:
    return EvaluateReport(
        task="sentiment", kind="classification", test_examples=4, test_sha256="abc", primary_metric="macro_f1",
        primary=0.75, primary_ci_low=0.5, primary_ci_high=1.0, higher_is_better=True,
        baseline=BaselineScores(name="majority", macro_f1=0.4), latency_ms_p50=1.0, latency_ms_p95=2.0,
        throughput_per_s=100.0, accuracy=0.75,
    )  # fmt: skip


def test_evidence_is_what_the_evaluation_run_logged(client, model_uri, tmp_path: Path):
    report, per_example = _eval_report(), PerExample(y_true=[0, 1, 1, 0], y_pred=[0, 1, 0, 0])
    with mlflow.start_run(experiment_id=tracking.setup()) as run:  # the evaluate run logs the model and evidence
        mlflow.log_text(FAKE_MLMODEL, "x/MLmodel")
        mlflow.log_text(json.dumps(report.data()), "eval/metrics.json")
        mlflow.log_text(json.dumps(per_example.data()), "eval/per_example.json")
    name = _name()
    version = registry.register(client, name, f"runs:/{run.info.run_id}/x", run.info.run_id, {})
    evidence = registry.evidence_of(client, version)
    assert evidence.metrics == report
    assert evidence.metrics.score("accuracy") == 0.75
    assert evidence.per_example.y_pred == [0, 1, 0, 0]
    # A version whose tag names another run's evidence is refused: evidence is bound to the model.
    other = registry.register(client, name, model_uri, run.info.run_id + "-copy", {})
    client.set_model_version_tag(name, str(other.version), "lmforge.eval_run_id", run.info.run_id)
    with pytest.raises(LmforgeError, match="is not the run that logged the model"):
        registry.evidence_of(client, client.get_model_version(name, str(other.version)))


def test_evidence_of_a_version_lmforge_did_not_register_is_an_error_naming_it(client, model_uri):
    name = _name()
    version = mlflow.register_model(model_uri, name)  # no lmforge.eval_run_id tag
    with pytest.raises(LmforgeError, match=r"no lmforge\.eval_run_id tag") as caught:
        registry.evidence_of(client, client.get_model_version(name, version.version))
    assert f"{name} version 1" in str(caught.value)


def test_smoke_load_refuses_anything_but_lmforges_models_from_code_pyfunc_before_loading(client, model_uri):
    """The stand-in models here name a loader module of their own: loading them would run it."""
    name = _name()
    custom = registry.register(client, name, model_uri, "eval-a", {}).version
    no_flavor_run = _model_run("flavors: {}\n")
    no_flavor = registry.register(client, name, f"runs:/{no_flavor_run}/x", "eval-c", {}).version
    for version in (custom, no_flavor):
        ok, reason = registry.smoke_load(name, str(version), "很好")
        assert not ok and "is not lmforge's models-from-code pyfunc" in reason and "refused before loading" in reason
        assert "\n" not in reason


@pytest.fixture
def file_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(registry.LOCK_ENV, raising=False)


@pytest.mark.usefixtures("file_lock")
def test_promotion_lock_is_a_file_beside_the_tracking_store(mlflow_store: str):
    name = _name()
    with registry.promotion_lock(name):
        pass
    store_folder = Path(mlflow_store.removeprefix("sqlite:///")).parent
    assert (store_folder / ".lmforge-locks" / f"{name}.lock").exists()


@pytest.mark.usefixtures("file_lock")
def test_promotion_lock_serialises_two_promotions_of_one_model():
    name, order = _name(), []
    first_in, second_trying, second_in, release = (threading.Event() for _ in range(4))

    def first() -> None:
        with registry.promotion_lock(name):
            order.append("first in")
            first_in.set()
            release.wait(10)
            order.append("first out")

    def second() -> None:
        first_in.wait(10)
        second_trying.set()
        with registry.promotion_lock(name):
            order.append("second in")
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert second_trying.wait(10)
    assert not second_in.wait(0.5)  # the second waits while the first holds the lock
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["first in", "first out", "second in"]


@pytest.mark.usefixtures("file_lock")
def test_promotion_locks_of_different_models_do_not_wait_for_each_other():
    held, release, other_in = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with registry.promotion_lock(_name()):
            held.set()
            release.wait(10)

    def other() -> None:
        with registry.promotion_lock(_name()):
            other_in.set()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        thread = threading.Thread(target=other)
        thread.start()
        assert other_in.wait(10)
        thread.join(10)
    finally:
        release.set()
        holder.join(10)


def test_a_version_whose_serving_code_is_not_lmforges_is_refused_and_never_run(client, tmp_path: Path):
    """The models-from-code loader executes the model's serving.py: one edited by whoever logged the version
    (here it writes a file when imported) is refused before MLflow would run it; so is a version that brings
    code_paths (MLflow would import its copies of lmforge's modules first)."""
    from lmforge.scoring import SERVING_CODE

    marker = tmp_path / "ran"
    edited = tmp_path / "serving.py"
    edited.write_text(SERVING_CODE.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    (tmp_path / "model_dir").mkdir()
    name = _name()
    versions = []
    for code, extra in ((edited, {}), (SERVING_CODE, {"code_paths": [str(SERVING_CODE.parent)]})):
        with mlflow.start_run(experiment_id=tracking.setup()) as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=str(code),
                                           artifacts={"model_dir": str(tmp_path / "model_dir")}, **extra)  # fmt: skip
        versions.append(registry.register(client, name, info.model_uri, run.info.run_id, {}).version)
    marker.unlink(missing_ok=True)  # logging ran it here, as whoever logged it would have
    edited_reason, code_paths_reason = (registry.load_pyfunc(name, str(version)) for version in versions)
    assert isinstance(edited_reason, str) and "serving.py is not lmforge's" in edited_reason
    assert isinstance(code_paths_reason, str) and "brings code of its own" in code_paths_reason
    assert not marker.exists()  # never executed by the gate
