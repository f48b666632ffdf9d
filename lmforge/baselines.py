"""The simple model every task model must beat, as a real model: trained here, saved without pickle.

- classification: TF-IDF over character 1-2-grams + logistic regression (scikit-learn), saved as its
  vocabulary (JSON) and its idf, coefficients and intercept (safetensors);
- token classification: the tag each word carried most often in train (JSON), "O" for unseen words.

A baseline folder holds `baseline.json` (what it is) beside those files; `load_baseline(folder)`
rebuilds it from them alone, so the registered baseline serves through the same pyfunc
(lmforge/serving.py) and the same `predict(pd.DataFrame({"text": [...]}))` contract as a task model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BASELINE_FILE = "baseline.json"
UNSEEN_TAG = "O"


def _vectorizer(vocabulary: dict[str, int] | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char", ngram_range=(1, 2), min_df=2, sublinear_tf=True, vocabulary=vocabulary)


@dataclass
class TfidfLogReg:
    """TF-IDF over character 1-2-grams + logistic regression."""

    labels: list[str]  # the task's label set: probability columns are in this order
    vocabulary: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray  # (1, features) for two classes, (classes, features) for more
    intercept: np.ndarray
    classes: np.ndarray  # indices into labels that train held (a class missing from train gets 0)

    name = "tfidf_char12_logreg"
    kind = "classification"

    @classmethod
    def fit(cls, texts: list[str], labels: list[str], label_set: list[str]) -> TfidfLogReg:
        from sklearn.linear_model import LogisticRegression

        index = {label: i for i, label in enumerate(label_set)}
        vectorizer = _vectorizer()
        features = vectorizer.fit_transform(texts)
        classifier = LogisticRegression(max_iter=2000, C=4.0)
        classifier.fit(features, [index[label] for label in labels])
        vocabulary = {str(gram): int(column) for gram, column in vectorizer.vocabulary_.items()}
        return cls(list(label_set), vocabulary, vectorizer.idf_, classifier.coef_, classifier.intercept_,
                   classifier.classes_)  # fmt: skip

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(texts, labels) class probabilities, exactly as the fitted scikit-learn pipeline gives them."""
        from sklearn.linear_model import LogisticRegression

        vectorizer = _vectorizer(self.vocabulary)
        vectorizer.idf_ = self.idf
        classifier = LogisticRegression()
        classifier.coef_, classifier.intercept_, classifier.classes_ = self.coef, self.intercept, self.classes
        found = classifier.predict_proba(vectorizer.transform(texts))
        probs = np.zeros((len(texts), len(self.labels)))
        probs[:, self.classes] = found
        return probs

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"idf": self.idf, "coef": self.coef, "intercept": self.intercept, "classes": self.classes},
                  str(folder / "weights.safetensors"))  # fmt: skip
        (folder / "vocabulary.json").write_text(json.dumps(self.vocabulary, ensure_ascii=False), encoding="utf-8")
        _describe(folder, self.kind, self.name, self.labels)

    @classmethod
    def load(cls, folder: Path) -> TfidfLogReg:
        from safetensors.numpy import load_file

        arrays = load_file(str(folder / "weights.safetensors"))
        vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
        return cls(_described(folder)["labels"], vocabulary, arrays["idf"], arrays["coef"], arrays["intercept"],
                   arrays["classes"])  # fmt: skip


@dataclass
class MajorityTag:
    """Each word gets the tag it carried most often in train; an unseen word gets "O"."""

    labels: list[str]
    tags: dict[str, str]

    name = "majority_tag_per_word"
    kind = "token_classification"

    @classmethod
    def fit(cls, sentences: list[list[str]], tags: list[list[str]], label_set: list[str]) -> MajorityTag:
        seen: dict[str, Counter[str]] = {}
        for words, word_tags in zip(sentences, tags, strict=True):
            for word, tag in zip(words, word_tags, strict=True):
                seen.setdefault(word, Counter())[tag] += 1
        return cls(list(label_set), {word: counts.most_common(1)[0][0] for word, counts in seen.items()})

    def predict(self, sentences: list[list[str]]) -> list[list[str]]:
        return [[self.tags.get(word, UNSEEN_TAG) for word in words] for words in sentences]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tags.json").write_text(json.dumps(self.tags, ensure_ascii=False), encoding="utf-8")
        _describe(folder, self.kind, self.name, self.labels)

    @classmethod
    def load(cls, folder: Path) -> MajorityTag:
        return cls(_described(folder)["labels"], json.loads((folder / "tags.json").read_text(encoding="utf-8")))


Baseline = TfidfLogReg | MajorityTag


def _describe(folder: Path, kind: str, name: str, labels: list[str]) -> None:
    (folder / BASELINE_FILE).write_text(json.dumps({"kind": kind, "name": name, "labels": labels}, indent=2))


def _described(folder: Path) -> dict[str, Any]:
    described: dict[str, Any] = json.loads((folder / BASELINE_FILE).read_text())
    return described


def is_baseline(folder: Path) -> bool:
    return (Path(folder) / BASELINE_FILE).is_file()


def load_baseline(folder: Path) -> Baseline:
    """The baseline saved in `folder`, from its JSON and safetensors files only."""
    kind = _described(folder)["kind"]
    return TfidfLogReg.load(folder) if kind == TfidfLogReg.kind else MajorityTag.load(folder)
