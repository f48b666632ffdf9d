"""Baselines are real models: trained, saved without pickle, rebuilt from their files alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lmforge.baselines import MajorityTag, TfidfLogReg, is_baseline, load_baseline

POSITIVE = ["很好很好", "好吃好吃", "真好真好", "好好好", "非常好好"]
NEGATIVE = ["很差很差", "难吃很差", "真差真差", "差差差", "非常差差"]


def test_tfidf_logreg_separates_a_separable_toy_set_and_reloads_to_the_same_probabilities(tmp_path: Path):
    model = TfidfLogReg.fit(POSITIVE + NEGATIVE, ["pos"] * 5 + ["neg"] * 5, ["neg", "pos"])
    probs = model.probabilities(["好好", "差差", "真好", "真差"])
    assert probs.shape == (4, 2) and np.allclose(probs.sum(axis=1), 1.0)
    assert probs.argmax(axis=1).tolist() == [1, 0, 1, 0]  # columns follow the declared label order
    model.save(tmp_path / "b")
    assert sorted(path.name for path in (tmp_path / "b").iterdir()) == [
        "baseline.json", "vocabulary.json", "weights.safetensors"]  # no pickle  # fmt: skip
    assert is_baseline(tmp_path / "b")
    again = load_baseline(tmp_path / "b")
    assert isinstance(again, TfidfLogReg)
    assert np.array_equal(again.probabilities(["好好", "差差"]), model.probabilities(["好好", "差差"]))


def test_tfidf_logreg_agrees_with_the_scikit_learn_pipeline_it_was_fitted_as():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts = [f"{'好' * (i % 3 + 1)}{'差' * (i % 4)}评价{i % 5}" for i in range(40)]
    labels = [["a", "b", "c"][i % 3] for i in range(40)]
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    reference = LogisticRegression(max_iter=2000, C=4.0).fit(vectorizer.fit_transform(texts), labels)
    test = ["好好差评价1", "差差差", "好评价4"]
    expected = reference.predict_proba(vectorizer.transform(test))
    assert np.allclose(TfidfLogReg.fit(texts, labels, ["a", "b", "c"]).probabilities(test), expected)


def test_a_label_missing_from_train_gets_probability_zero():
    model = TfidfLogReg.fit(POSITIVE + NEGATIVE, ["pos"] * 5 + ["neg"] * 5, ["neg", "neutral", "pos"])
    probs = model.probabilities(["好好"])
    assert probs.shape == (1, 3) and probs[0, 1] == 0.0 and np.isclose(probs.sum(), 1.0)


def test_majority_tag_picks_the_most_frequent_tag_and_o_for_unseen_words(tmp_path: Path):
    train_words = [["张三", "去", "北京"], ["北京", "大学"], ["北京", "烤鸭"]]
    train_tags = [["B-PER", "O", "B-LOC"], ["B-ORG", "I-ORG"], ["B-LOC", "O"]]
    model = MajorityTag.fit(train_words, train_tags, ["O", "B-PER", "B-LOC", "B-ORG", "I-ORG"])
    expected = [["B-PER", "O", "B-LOC"], ["I-ORG", "O"], []]
    assert model.predict([["张三", "在", "北京"], ["大学", "上海"], []]) == expected
    model.save(tmp_path / "tags")
    assert json.loads((tmp_path / "tags/baseline.json").read_text())["kind"] == "token_classification"
    assert load_baseline(tmp_path / "tags").predict([["北京", "上海"]]) == [["B-LOC", "O"]]


def test_the_pyfunc_serves_a_baseline_like_a_task_model(tmp_path: Path):
    """lmforge/serving.py loads a baseline folder and answers the same predict contract."""
    from types import SimpleNamespace

    from lmforge.serving import LmforgeTextModel

    TfidfLogReg.fit(POSITIVE + NEGATIVE, ["pos"] * 5 + ["neg"] * 5, ["neg", "pos"]).save(tmp_path / "m")
    served = LmforgeTextModel()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(tmp_path / "m")}))
    answer = served.predict(None, pd.DataFrame({"text": ["真好真好", "真差真差"]}))
    assert answer["label"].tolist() == ["pos", "neg"] and answer["score"].between(0.5, 1).all()
