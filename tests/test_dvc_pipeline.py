"""The whole pipeline as a real DVC pipeline, in a temporary clone of this working tree, on the smoke profile."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import clone_working_tree, sh, tree_digest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke profile cut to one model and one task: every kind of stage, half the stages.

    The whole smoke DAG (two models, three tasks) runs in tests/flows/test_pipeline_flow.py, each
    stage through `dvc repro --single-item`; here plain `dvc repro` runs the cut one.
    """
    clone = clone_working_tree(tmp_path_factory.mktemp("clone"))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["pretrain"]["models"] = {"encoder": params["pretrain"]["models"]["encoder"]}
    for section, key in (("finetune", "tasks"), ("optimize", "n_trials"), ("promote", "floors")):
        params[section][key] = {"sentiment": params[section][key]["sentiment"]}
    params["promote"]["model_prefix"] = f"dvc-{uuid.uuid4().hex[:8]}"  # this module's own registered models
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "one model, one task", cwd=clone)
    return clone


STAGES = ("ingest", "validate", "preprocess", "pretrain@encoder", "finetune@sentiment", "evaluate@sentiment",
          "optimize@sentiment", "promote@sentiment")  # fmt: skip


def ran(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def test_repro_runs_then_skips_then_reruns_only_what_a_param_touches(clone: Path):
    first = sh("dvc", "repro", cwd=clone)
    assert ran(first.stdout) == list(STAGES)
    assert (clone / "data/processed/tokenizer/tokenizer.json").is_file()
    assert (clone / "reports/validation/data_docs/sentiment/index.html").is_file()
    assert (clone / "models/finetuned/sentiment/model.safetensors").is_file()
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=clone).stdout)
    figures = metrics[""]["data"]
    compared = [stage for stage in STAGES[3:] if not stage.startswith("optimize")]
    assert set(figures) == {f"metrics/{stage.replace('@', '/')}.json" for stage in compared}
    evaluated = figures["metrics/evaluate/sentiment.json"]["data"]
    assert set(evaluated) == {"primary", "ci_low", "ci_high", "baseline", "accuracy", "p95_ms"}
    columns = {key for entry in figures.values() for key in entry["data"]}
    assert len(columns) <= 13  # one column per figure in `dvc metrics show`, the same names for every task
    assert sh("git", "status", "--porcelain", "--", "reports", cwd=clone).stdout == ""  # reports: outputs only
    changed = sh("git", "status", "--porcelain", "--untracked-files=all", cwd=clone).stdout
    assert " metrics/evaluate/sentiment.json\n" in changed  # metrics: for git to keep, beside dvc.lock
    assert (clone / "mlflow.db").is_file() is False  # the tests' MLflow store is the session's, not the clone's
    promotion = json.loads((clone / "reports/promote/sentiment.json").read_text())
    # The task's baseline contends first and takes @champion; the 10-step smoke model loses to it.
    assert promotion["baseline_decision"] == "pass"
    assert promotion["champion_after"]["version"] == promotion["baseline_version"] != promotion["version"]
    assert promotion["decision"] == "fail" and any("baseline" in reason for reason in promotion["reasons"])
    assert json.loads((clone / "reports/optimize/sentiment/best_params.json").read_text())["tuned"] is True

    started = time.perf_counter()
    second = sh("dvc", "repro", cwd=clone)
    print(f"no-op dvc repro took {time.perf_counter() - started:.2f}s")
    assert ran(second.stdout) == []
    assert "Data and pipelines are up to date" in second.stdout

    losses = clone / "lmforge/losses.py"  # code the training stages import, through training or finetune
    original = losses.read_text()
    losses.write_text(original + "\n# an edit\n")
    changed_stages = [stage for stage in STAGES if f"\n{stage}:" in "\n" + sh("dvc", "status", cwd=clone).stdout]
    assert changed_stages == ["pretrain@encoder", "finetune@sentiment", "optimize@sentiment"]
    losses.write_text(original)

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["promote"]["max_latency_ratio"] = 2.0
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    third = sh("dvc", "repro", cwd=clone)
    assert ran(third.stdout) == ["promote@sentiment"]
    assert "promote.max_latency_ratio" in sh("dvc", "params", "diff", cwd=clone).stdout
    assert sh("dvc", "status", cwd=clone).stdout.strip().endswith("Data and pipelines are up to date.")

    # A new dataset kept out of the pretraining corpus re-runs the data stages, and nothing it does not feed.
    # (Declared after the others: the corpus follows the order of ingest.datasets, which DVC does not see.)
    rows = [{"text": f"{word} order number {n}", "label": word} for n in range(40) for word in ("refund", "delivery")]
    pd.DataFrame(rows).to_csv(clone / "data/external/extra.csv", index=False)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    source = {"kind": "local", "path": "data/external/extra.csv"}
    params["ingest"]["datasets"]["extra"] = {"kind": "classification", "in_corpus": False, "source": source}
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    fourth = sh("dvc", "repro", "preprocess", cwd=clone)  # the data stages, upstream first
    assert ran(fourth.stdout) == ["ingest", "validate", "preprocess"]
    assert (clone / "data/processed/datasets/extra/labels.json").is_file()
    status = sh("dvc", "status", cwd=clone).stdout
    assert status.strip().endswith("Data and pipelines are up to date."), status
    del params["ingest"]["datasets"]["extra"]  # the next tests run on the cut smoke pipeline alone
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    (clone / "data/external/extra.csv").unlink()


def exp_metrics(shown: list[dict], path: str) -> dict[str, dict]:
    """`dvc exp show --json`: each row's (workspace, the baseline commit, each experiment) figures in `path`."""
    found = {}
    for entry in shown:
        rows = [entry] + [rev for exp in entry.get("experiments") or [] for rev in exp["revs"]]
        for row in rows:
            metrics = (row.get("data") or {}).get("metrics") or {}
            for key in {row["rev"], row.get("name") or row["rev"]}:  # a commit's row: its sha and its branch
                found[key] = metrics.get(path, {}).get("data", {})
    return found


def test_experiments_compare_in_dvc_and_never_move_the_champion(clone: Path):
    """The DVC user's loop: commit a run, try what-ifs with `dvc exp run -S`, compare, keep what serves."""
    from lmforge import registry

    sh("dvc", "repro", cwd=clone)
    sh("git", "add", "-A", cwd=clone)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the committed run", cwd=clone)
    served = json.loads((clone / "reports/promote/sentiment.json").read_text())["champion_after"]["version"]
    name = f"{yaml.safe_load((clone / 'params.yaml').read_text())['promote']['model_prefix']}-sentiment"

    sh("dvc", "exp", "run", "-n", "faster", "-S", "finetune.tasks.sentiment.training.learning_rate=0.01", cwd=clone)
    assert str(registry.alias_version(registry.client(), name, "champion").version) == served

    # --temp runs in a throw-away copy: with no MLFLOW_TRACKING_URI the runs must land in the repository's
    # own store. A fresh model prefix has no champion, so without the experiment rule the baseline would take it.
    fresh = f"exp-{uuid.uuid4().hex[:8]}"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    sh("dvc", "exp", "run", "--temp", "-n", "fresh", "-S", f"promote.model_prefix={fresh}", cwd=clone, env=env)
    assert (clone / "mlflow.db").is_file(), "the experiment's runs went to its temporary copy"
    os.environ["MLFLOW_TRACKING_URI"], before = f"sqlite:///{clone / 'mlflow.db'}", os.environ["MLFLOW_TRACKING_URI"]
    try:
        client = registry.client()
        assert registry.alias_version(client, f"{fresh}-sentiment", "champion") is None
        (baseline,) = registry.versions_tagged(client, f"{fresh}-sentiment", registry.MODEL_KIND_TAG, "baseline")
        assert baseline.tags["gate.decision"] == "pass" and baseline.tags["dvc.experiment"] == "fresh"
        assert "held: DVC experiment 'fresh'" in baseline.description
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = before
        registry.client()

    table = json.loads(sh("dvc", "exp", "show", "--json", cwd=clone).stdout)
    shown = exp_metrics(table, "metrics/evaluate/sentiment.json")
    head = sh("git", "rev-parse", "HEAD", cwd=clone).stdout.strip()
    for row in (head, "faster", "fresh"):
        assert isinstance(shown[row]["primary"], float), (row, shown)
    trained = exp_metrics(table, "metrics/finetune/sentiment.json")
    assert trained["faster"]["val_loss"] != trained[head]["val_loss"]  # another learning rate, another model
    sh("dvc", "exp", "apply", "faster", cwd=clone)
    diff = json.loads(sh("dvc", "metrics", "diff", "--all", "--json", cwd=clone).stdout)
    assert "primary" in diff["metrics/evaluate/sentiment.json"]


def test_the_same_commit_and_params_give_the_same_tokenizer_tokens_models_and_figures(clone: Path):
    """Run again from scratch, the tokenizer, the packed tokens and the weights are byte-identical and the
    figures are the same numbers, latency aside: comparisons and gate decisions are not coin tosses."""
    import hashlib

    sh("dvc", "repro", cwd=clone)
    files = ("data/processed/tokenizer/tokenizer.json", "data/processed/pretrain/train.bin",
             "models/pretrained/encoder/model.safetensors", "models/finetuned/sentiment/model.safetensors")  # fmt: skip

    def digests() -> dict[str, str]:
        return {name: hashlib.sha256((clone / name).read_bytes()).hexdigest() for name in files}

    def figures() -> dict[str, float]:
        found = json.loads((clone / "metrics/evaluate/sentiment.json").read_text())
        return {key: value for key, value in found.items() if key != "p95_ms"}

    def processed() -> str:  # what DVC recorded for data/processed: no timings in it, so the same hash
        (out,) = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["preprocess"]["outs"][:1]
        return str(out["md5"])

    before, figures_before, processed_before = digests(), figures(), processed()
    for stage in ("preprocess", "pretrain@encoder", "finetune@sentiment", "evaluate@sentiment"):
        sh("dvc", "repro", "--force", "--single-item", stage, cwd=clone)
    assert digests() == before
    assert figures() == figures_before
    assert processed() == processed_before


def test_a_stage_that_fails_under_dvc_repro_leaves_its_previous_outputs(clone: Path):
    """DVC deletes a stage's outputs before it runs it; the failed stage puts them back from DVC's cache."""
    sh("dvc", "repro", "--single-item", "ingest", cwd=clone)  # recorded in dvc.lock (skipped if it is)
    before = tree_digest(clone / "data/raw")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["ingest"]["datasets"]["sentiment"]["source"] = {"kind": "local", "path": "data/external/gone.csv"}
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    result = sh("dvc", "repro", "--single-item", "ingest", cwd=clone, check=False)
    assert result.returncode != 0 and "exited with 2" in result.stderr  # the user's input, not retried
    assert "gone.csv" in result.stderr
    assert tree_digest(clone / "data/raw") == before
    assert [path.name for path in (clone / "data").iterdir() if path.name.startswith(".raw.")] == []
    sh("git", "checkout", "params.yaml", cwd=clone)  # the source fixed
    assert "up to date" in sh("dvc", "status", "ingest", cwd=clone).stdout


def test_a_broken_expectation_stops_the_pipeline_before_preprocess(clone: Path):
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["validate"]["max_chars"] = 5  # every review is longer than this
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    result = sh("dvc", "repro", cwd=clone, check=False)
    assert result.returncode != 0
    assert "expect_column_value_lengths_to_be_between(text)" in result.stderr
    assert "Running stage 'preprocess'" not in result.stdout
