from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.tracking import dvc_lineage, loggable_params
from tests.conftest import SmokeRun


def test_params_that_look_like_credentials_are_never_logged():
    flat = loggable_params(
        {"training": {"learning_rate": 0.1}, "hub_token": "abc", "db": {"password": "x", "host": "h"}}
    )
    assert flat == {"training.learning_rate": "0.1", "db.host": "h"}


def test_lineage_tags_are_the_dvc_lock_hashes_of_the_stage_inputs(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "preprocess": {"cmd": "x", "deps": ["data/raw"], "outs": ["data/processed"]},
        "pretrain": {"foreach": {"encoder": {}}, "do": {"cmd": "y", "deps": ["stages/pretrain.py", "data/processed"]}},
    }}))  # fmt: skip
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "preprocess": {"outs": [{"path": "data/processed", "md5": "abc123.dir"}]},
    }}))  # fmt: skip
    lineage = dvc_lineage("pretrain@encoder", tmp_path / "dvc.lock", tmp_path / "dvc.yaml")
    assert lineage == {"dvc.data/processed": "abc123.dir"}


def test_stage_runs_nest_under_one_pipeline_run_with_their_tags(smoke_models: SmokeRun):
    import mlflow

    from lmforge.tracking import pipeline_key

    runs = mlflow.search_runs(experiment_names=["lmforge"], output_format="list", max_results=1000)
    # Only the runs of this commit and params.yaml: other tests run clones (other commits) and stages
    # with params files of their own, which are other pipelines.
    stages = [run for run in runs if run.data.tags.get("stage") in {"pretrain", "finetune"}
              and run.data.tags.get("lmforge.pipeline_key") == pipeline_key()]  # fmt: skip
    assert {run.data.tags["stage"] for run in stages} == {"pretrain", "finetune"}
    parents = {run.data.tags["mlflow.parentRunId"] for run in stages}
    assert len(parents) == 1
    parent = mlflow.get_run(parents.pop())
    assert parent.data.tags["lmforge.kind"] == "pipeline"
    # (a test that fails a fine-tuning on purpose leaves a FAILED run of it in this pipeline)
    finetune = next(run for run in stages if run.data.tags.get("task") == "sentiment" and run.info.status == "FINISHED")
    assert finetune.info.run_name == "finetune@sentiment"  # named like its DVC stage and Prefect task
    assert len(finetune.data.tags["git_commit"]) >= 7
    assert "train_loss" in finetune.data.metrics and "val_loss" in finetune.data.metrics
    assert float(finetune.data.params["training.learning_rate"]) > 0
    history = mlflow.MlflowClient().get_metric_history(finetune.info.run_id, "train_loss")
    # Every log_every (5) steps to the run's last; other tests fine-tune sentiment in this pipeline too.
    assert [point.step for point in history] == list(range(5, int(finetune.data.metrics["steps"]) + 1, 5))
    assert len(history) >= 2


def test_postgresql_advisory_lock_serialises_promotions(postgres_url: str, monkeypatch):
    import psycopg2

    from lmforge import registry

    monkeypatch.setenv(registry.LOCK_ENV, postgres_url)
    other = psycopg2.connect(postgres_url)
    other.autocommit = True

    def free() -> bool:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s))", ("lmforge-promote:m-task",))
            got = cursor.fetchone()[0]
            if got:
                cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", ("lmforge-promote:m-task",))
            return got

    with registry.promotion_lock("m-task"):
        assert not free()  # another session (another machine) must wait
    assert free()
    other.close()


def test_lineage_of_a_foreach_item_resolves_its_templated_deps(tmp_path: Path):
    from tests.conftest import sh

    sh("git", "init", "-q", cwd=tmp_path)
    sh("dvc", "init", "-q", cwd=tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tasks": {"sentiment": {"dataset": "reviews"}}}))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"finetune": {
        "foreach": "${tasks}", "do": {"cmd": "y", "deps": ["data/raw/${item.dataset}"], "outs": ["out/${key}"]},
    }}}))  # fmt: skip
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "ingest": {"cmd": "x", "outs": [{"path": "data/raw/reviews", "md5": "def456.dir", "hash": "md5"}]},
    }}))  # fmt: skip
    lineage = dvc_lineage("finetune@sentiment", tmp_path / "dvc.lock", tmp_path / "dvc.yaml")
    assert lineage == {"dvc.data/raw/reviews": "def456.dir"}


def test_a_promotion_lock_held_too_long_is_transient_not_a_hang(postgres_url: str, monkeypatch, tmp_path: Path):
    """Another promotion stuck with the lock (PostgreSQL's advisory lock, or the file lock): after the timeout
    the stage gives up with exit 75 and moves nothing, instead of waiting forever."""
    import threading
    import time

    import psycopg2

    from lmforge import registry
    from lmforge.errors import TransientError

    monkeypatch.setenv(registry.LOCK_ENV, postgres_url)
    other = psycopg2.connect(postgres_url)
    other.autocommit = True
    with other.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(hashtext(%s))", ("lmforge-promote:stuck-task",))
    started = time.monotonic()
    with pytest.raises(TransientError, match="held its lock for over 1s"), registry.promotion_lock("stuck-task", 1.0):
        pass
    assert time.monotonic() - started < 10
    other.close()

    monkeypatch.delenv(registry.LOCK_ENV)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with registry.promotion_lock("stuck-task"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    with pytest.raises(TransientError), registry.promotion_lock("stuck-task", 0.5):
        pass
    release.set()
    holder.join(10)
