from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lmforge import scoring
from lmforge.errors import LmforgeError
from tests.conftest import SmokeRun


@pytest.fixture(scope="module")
def evaluated(smoke_evaluated: SmokeRun) -> SmokeRun:
    return smoke_evaluated


@pytest.mark.parametrize(("task", "primary"), [("sentiment", "macro_f1"), ("ner", "entity_f1"),
                                               ("continuation", "perplexity")])  # fmt: skip
def test_metrics_with_interval_baseline_latency_and_plots(evaluated: SmokeRun, task: str, primary: str):
    out = evaluated.root / "reports/evaluate" / task
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["primary_metric"] == primary
    assert metrics["primary_ci_low"] <= metrics["primary"] <= metrics["primary_ci_high"]
    dataset = evaluated.params.finetune.tasks[task].dataset
    test_rows = json.loads((evaluated.raw / dataset / "manifest.json").read_text())["rows"]["test"]
    assert metrics["test_examples"] == min(evaluated.params.evaluate.max_test_samples, test_rows)
    assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p95"]
    assert metrics["throughput_per_s"] > 0
    curve = json.loads((out / "curve.json").read_text())
    assert [point["step"] for point in curve] == [5, 10]
    per_example = json.loads((out / "per_example.json").read_text())
    records = {name: values for name, values in per_example.items() if values is not None}
    if task == "continuation":  # texts no longer than the prompt have no continuation to score
        assert 0 < len(records["loss"]) == len(records["tokens"]) <= metrics["test_examples"]
    else:
        assert records and all(len(values) == metrics["test_examples"] for values in records.values())
    if task == "sentiment":
        assert {"accuracy", "roc_auc", "per_class", "worst_class_recall"} <= metrics.keys()
        assert metrics["baseline"]["name"] == "tfidf_char12_logreg" and 0.5 < metrics["baseline"]["accuracy"] <= 1
        confusion = json.loads((out / "confusion.json").read_text())
        assert len(confusion) == metrics["test_examples"]
        assert metrics["accuracy"] == pytest.approx(
            sum(r["actual"] == r["predicted"] for r in confusion) / len(confusion)
        )
    if task == "continuation":
        assert metrics["primary"] > 1 and 0 <= metrics["bleu_char"] <= 1 and 0 <= metrics["rouge_l_char"] <= 1


@pytest.mark.parametrize(("task", "pictures"), [
    ("sentiment", ["confusion_matrix", "precision_recall", "roc", "training_curve"]),
    ("ner", ["confusion_matrix", "training_curve"]),
    ("continuation", ["training_curve"]),
])  # fmt: skip
def test_the_evaluate_run_shows_its_pictures_in_mlflow(evaluated: SmokeRun, task: str, pictures: list[str]):
    import mlflow
    from PIL import Image

    model = json.loads((evaluated.root / "reports/evaluate" / task / "model.json").read_text())
    run_id = model["run_id"]
    logged = mlflow.MlflowClient().list_artifacts(run_id, "plots")
    assert sorted(Path(item.path).name for item in logged) == [f"{name}.png" for name in pictures]
    trained = mlflow.MlflowClient().list_artifacts(model["finetune_run_id"], "plots")  # the training run has its own
    assert [Path(item.path).name for item in trained] == ["training_curve.png"]
    for item in logged:
        with Image.open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=item.path)) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300


def test_the_confusion_picture_counts_each_pair_once():
    from lmforge.figures import confusion_figure

    pairs = [{"actual": "pos", "predicted": "pos"}] * 3 + [{"actual": "pos", "predicted": "neg"}]
    figure = confusion_figure(pairs, ["neg", "pos", "unused"], "t")
    counts = figure.axes[0].images[0].get_array()
    assert counts.tolist() == [[0, 0], [1, 3]]  # rows actual, columns predicted; a label never seen is left out


def test_many_classes_get_one_micro_averaged_curve_not_one_each():
    import numpy as np

    from lmforge.figures import roc_and_pr_figures

    rng = np.random.default_rng(0)
    y_true = np.arange(240) % 12
    probabilities = rng.dirichlet(np.ones(12), 240)
    roc, pr = roc_and_pr_figures(y_true, probabilities, [f"c{k}" for k in range(12)], "t")
    assert len(roc.axes[0].lines) == 2 and len(pr.axes[0].lines) == 1  # ROC: the curve and the diagonal
    assert "12 classes, micro-average" in roc.axes[0].get_legend().get_texts()[0].get_text()
    few, _ = roc_and_pr_figures(y_true % 3, probabilities[:, :3], ["a", "b", "c"], "t")
    assert len(few.axes[0].lines) == 4  # one per class, and the diagonal


def test_pyfunc_model_predicts_on_raw_text(evaluated: SmokeRun):
    import mlflow

    texts = pd.DataFrame({"text": ["质量很好，非常满意", "太差了，不推荐"]})
    for task, column in (("sentiment", "label"), ("ner", "tags"), ("continuation", "continuation")):
        uri = json.loads((evaluated.root / "reports/evaluate" / task / "model.json").read_text())["model_uri"]
        predictions = mlflow.pyfunc.load_model(uri).predict(texts)
        assert len(predictions) == 2 and column in predictions.columns
        if task == "sentiment":
            assert set(predictions["label"]) <= {"neg", "pos"} and predictions["score"].between(0.5, 1).all()
        if task == "ner":
            assert [len(tags) for tags in predictions["tags"]] == [len(words) for words in predictions["words"]]
        # The baseline is a model too: logged, and serving the same contract.
        baseline = evaluated.root / "reports/evaluate" / task / "baseline"
        baseline_uri = json.loads((baseline / "model.json").read_text())["model_uri"]
        answer = mlflow.pyfunc.load_model(baseline_uri).predict(texts)
        assert list(answer.columns) == list(predictions.columns) and len(answer) == 2
        assert not list(baseline.rglob("*.pkl")) and not list(baseline.rglob("*.bin"))
    served = mlflow.pyfunc.load_model(baseline_uri)  # generation's: a request may set how far to continue
    assert served.metadata.get_params_schema().to_dict() == [
        {"name": "max_new_tokens", "type": "long", "default": 24, "shape": None}]  # fmt: skip
    shorter = served.predict(texts, params={"max_new_tokens": 1})["continuation"]
    assert all(len(text) <= len(longer) for text, longer in zip(shorter, answer["continuation"], strict=True))


def test_a_tagger_takes_the_words_of_a_segmented_sentence(evaluated: SmokeRun):
    """As the test split has them: tags come one per given word, and raw text still works."""
    import mlflow

    words = [["江", "泽民", "在", "北京市"], ["人民日报", "报道"]]
    for uri_of in (Path("reports/evaluate/ner"), Path("reports/evaluate/ner/baseline")):
        uri = json.loads((evaluated.root / uri_of / "model.json").read_text())["model_uri"]
        served = mlflow.pyfunc.load_model(uri)
        answer = served.predict(pd.DataFrame({"words": words}))
        assert [list(sentence) for sentence in answer["words"]] == words
        assert [len(tags) for tags in answer["tags"]] == [4, 2]
        assert [list(w) for w in served.predict(pd.DataFrame({"text": ["江泽民"]}))["words"]] == [["江", "泽", "民"]]


def test_the_ngram_baseline_is_scored_on_the_same_continuation_tokens(evaluated: SmokeRun):
    """Perplexities compare only over the same tokens: the gate's paired bootstrap needs them equal."""
    out = evaluated.root / "reports/evaluate/continuation"
    model, baseline = (json.loads((folder / "per_example.json").read_text()) for folder in (out, out / "baseline"))
    assert baseline["tokens"] == model["tokens"] and len(baseline["loss"]) == len(model["loss"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"]["name"] == "ngram3_absolute_discounting"
    assert metrics["baseline"]["perplexity"] == json.loads((out / "baseline/metrics.json").read_text())["primary"]


def test_a_test_split_that_changed_since_it_was_frozen_is_refused(evaluated: SmokeRun, tmp_path: Path):
    raw = tmp_path / "raw"
    shutil.copytree(evaluated.raw / "sentiment", raw / "sentiment")
    test = pd.read_parquet(raw / "sentiment/test.parquet")
    test.iloc[1:].to_parquet(raw / "sentiment/test.parquet", index=False)
    with pytest.raises(LmforgeError, match="does not match the sha256 frozen in its manifest"):
        scoring.evaluate_model(evaluated.params.evaluate, "sentiment", evaluated.root / "models/finetuned/sentiment",
                                raw / "sentiment", tmp_path / "eval")  # fmt: skip
    assert not (tmp_path / "eval").exists()
