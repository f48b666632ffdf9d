"""Task metrics, bootstrap confidence intervals, and the baselines reported beside every model.

Each scorer returns its metrics and a per-example record, so that a confidence interval (and later
the promotion gate's paired bootstrap) resamples the very same test examples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float], n: int, samples: int, confidence: float, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)` over `samples` resamples of range(n) with replacement."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(samples)])
    tail = (1.0 - confidence) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def classification_scores(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    # Imported here: scikit-learn takes most of a second, and the gate (promote) needs only the helpers below.
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_pred = probs.argmax(axis=1)
    everything = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=everything, zero_division=0)
    scores: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),  # the labels that occur
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "worst_class_recall": float(recall[support > 0].min()),  # of the classes the test split holds
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=everything).tolist(),
    }
    try:
        if len(labels) == 2:
            scores["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
        else:
            scores["roc_auc"] = float(roc_auc_score(y_true, probs, multi_class="ovr", labels=everything))
    except ValueError:  # one class only in this test split
        scores["roc_auc"] = float("nan")
    return scores


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> float:
    """Macro-F1 over the labels that occur, as truth or prediction: sklearn's f1_score(average="macro"), but
    fast enough to call a thousand times. A label neither in the examples nor predicted says nothing of the
    model; counted as 0 it would pull the score down by how many labels a test split (or a bootstrap
    resample of it) happens to miss, which puts a many-class task's score above its own interval."""
    confusion = np.bincount(y_true * n_labels + y_pred, minlength=n_labels * n_labels).reshape(n_labels, n_labels)
    tp = np.diag(confusion).astype(float)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)
    occurring = denominator > 0
    return float(np.mean(2 * tp[occurring] / denominator[occurring])) if occurring.any() else 0.0


def macro_f1_statistic(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> Callable[[np.ndarray], float]:
    return lambda idx: macro_f1(y_true[idx], y_pred[idx], n_labels)


# --- token classification --------------------------------------------------------------------------


def entity_counts(true_tags: list[list[str]], pred_tags: list[list[str]]) -> np.ndarray:
    """Per sentence: (true positives, predicted entities, true entities), exact span and type match."""
    from seqeval.metrics.sequence_labeling import get_entities

    rows = []
    for true, pred in zip(true_tags, pred_tags, strict=True):
        true_set, pred_set = set(get_entities(true)), set(get_entities(pred))
        rows.append((len(true_set & pred_set), len(pred_set), len(true_set)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def f1_from_counts(counts: np.ndarray) -> float:
    tp, predicted, actual = counts.sum(axis=0)
    return float(2 * tp / (predicted + actual)) if predicted + actual else 0.0


def token_scores(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, Any]:
    from seqeval.metrics import classification_report

    flat_true = [tag for tags in true_tags for tag in tags]
    flat_pred = [tag for tags in pred_tags for tag in tags]
    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    per_type = {
        name: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
               "support": int(v["support"])}
        for name, v in report.items() if not name.endswith(" avg")
    }  # fmt: skip
    return {
        "token_accuracy": float(np.mean(np.array(flat_true) == np.array(flat_pred))) if flat_true else 0.0,
        "entity_f1": f1_from_counts(entity_counts(true_tags, pred_tags)),
        "per_type": per_type,
        "worst_class_recall": min((v["recall"] for v in per_type.values()), default=0.0),
    }


# --- generation -----------------------------------------------------------------------------------


def _ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def char_bleu(references: list[str], hypotheses: list[str], max_n: int = 4) -> float:
    """Corpus BLEU on characters (the usual choice for Chinese), with the brevity penalty."""
    matches, totals = [0] * max_n, [0] * max_n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_len, hyp_len = ref_len + len(ref), hyp_len + len(hyp)
        for n in range(1, max_n + 1):
            hyp_grams, ref_grams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or min(totals) == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def char_rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1 on characters: the longest common subsequence against both lengths."""
    if not reference or not hypothesis:
        return 0.0
    previous = [0] * (len(hypothesis) + 1)
    for a in reference:
        current = [0]
        for j, b in enumerate(hypothesis, start=1):
            current.append(previous[j - 1] + 1 if a == b else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hypothesis), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)
