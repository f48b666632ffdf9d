"""Metrics against independent references: sklearn, seqeval, and values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import seqeval.metrics
from sklearn.metrics import f1_score

from lmforge.metrics import (
    bootstrap_ci,
    char_bleu,
    char_rouge_l,
    classification_scores,
    entity_counts,
    f1_from_counts,
    macro_f1,
    macro_f1_statistic,
    token_scores,
)

# --- classification -------------------------------------------------------------------------------


def sklearn_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> float:
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))  # over the labels that occur


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_agrees_with_sklearn_incl_a_label_never_predicted(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_labels = 4
    y_true = rng.integers(0, n_labels, 60)
    y_pred = rng.integers(0, n_labels - 1, 60)  # label 3 is in the truth but never predicted
    assert 3 in y_true and 3 not in y_pred
    assert macro_f1(y_true, y_pred, n_labels) == pytest.approx(sklearn_macro_f1(y_true, y_pred, n_labels))


def test_macro_f1_leaves_out_a_label_absent_from_both() -> None:
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 2])
    # by hand: f1(0) = 2/3, f1(1) = 4/5, f1(2) = 1; label 3 is neither seen nor predicted: no score
    assert macro_f1(y_true, y_pred, 4) == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert (
        macro_f1(y_true, y_pred, 4) == macro_f1(y_true, y_pred, 3) == pytest.approx(sklearn_macro_f1(y_true, y_pred, 4))
    )
    assert macro_f1(np.array([0, 0]), np.array([1, 1]), 3) == 0.0  # a label predicted but absent still counts


def test_the_interval_of_a_many_class_macro_f1_holds_its_point() -> None:
    from lmforge.metrics import bootstrap_ci

    # 40 classes, most with one or two test examples, a model right 80% of the time: a resample misses about
    # a third of the rare classes, which must not drag its score below the whole split's.
    rng = np.random.default_rng(3)
    y_true = np.concatenate([np.repeat(np.arange(5), 20), np.repeat(np.arange(5, 40), 2)])
    y_pred = np.where(rng.random(len(y_true)) < 0.8, y_true, rng.integers(0, 40, len(y_true)))
    low, high = bootstrap_ci(macro_f1_statistic(y_true, y_pred, 40), len(y_true), 500, 0.95)
    assert low <= macro_f1(y_true, y_pred, 40) <= high


def test_macro_f1_statistic_scores_the_resampled_examples() -> None:
    rng = np.random.default_rng(7)
    y_true, y_pred = rng.integers(0, 3, 80), rng.integers(0, 3, 80)
    statistic = macro_f1_statistic(y_true, y_pred, 3)
    for _ in range(5):
        idx = rng.integers(0, 80, 80)
        assert statistic(idx) == pytest.approx(sklearn_macro_f1(y_true[idx], y_pred[idx], 3))
    assert statistic(np.arange(80)) == pytest.approx(sklearn_macro_f1(y_true, y_pred, 3))


def test_classification_scores_on_a_hand_worked_example() -> None:
    labels = ["neg", "neu", "pos"]
    y_true = np.array([0, 0, 1, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.3, 0.4, 0.3], [0.5, 0.2, 0.3]])
    # predictions: 0, 1, 1, 1, 0
    scores = classification_scores(y_true, probs, labels)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert scores["per_class"]["neg"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert scores["per_class"]["neu"]["precision"] == pytest.approx(2 / 3)
    assert scores["per_class"]["pos"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert scores["worst_class_recall"] == 0.0
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert 0.0 <= scores["roc_auc"] <= 1.0


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_classification_scores_binary_roc_auc_and_one_class_split() -> None:
    y_true = np.array([0, 0, 1, 1])
    # (negative, positive) pairs ranked right: (0.1, 0.4) (0.1, 0.9) (0.6, 0.9); wrong: (0.6, 0.4)
    p1 = np.array([0.1, 0.6, 0.4, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    assert classification_scores(y_true, probs, ["a", "b"])["roc_auc"] == pytest.approx(3 / 4)
    one_class = classification_scores(np.array([1, 1]), probs[:2], ["a", "b"])
    assert math.isnan(one_class["roc_auc"])


# --- bootstrap ------------------------------------------------------------------------------------


def mean_statistic(values: np.ndarray):
    return lambda idx: float(values[idx].mean())


def test_bootstrap_ci_brackets_the_point_estimate_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(1)
    small, large = ((rng.random(n) < 0.7).astype(float) for n in (40, 4000))
    widths = []
    for values in (small, large):
        low, high = bootstrap_ci(mean_statistic(values), len(values), samples=400, confidence=0.95, seed=3)
        assert low < values.mean() < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 4  # width ~ 1/sqrt(n): sqrt(100) = 10 times narrower in theory


def test_bootstrap_ci_of_a_mean_matches_the_normal_approximation() -> None:
    """The percentile interval of a mean of n coin flips is about p +- z * sqrt(p(1 - p) / n)."""
    values = (np.random.default_rng(4).random(1000) < 0.3).astype(float)
    p, n = values.mean(), len(values)
    for confidence, z in ((0.95, 1.959964), (0.8, 1.281552)):
        low, high = bootstrap_ci(mean_statistic(values), n, samples=2000, confidence=confidence, seed=5)
        assert high - low == pytest.approx(2 * z * math.sqrt(p * (1 - p) / n), rel=0.06)
        assert (low + high) / 2 == pytest.approx(p, abs=0.005)


def test_bootstrap_ci_is_wider_at_higher_confidence_and_reproducible() -> None:
    values = (np.random.default_rng(2).random(200) < 0.5).astype(float)
    narrow = bootstrap_ci(mean_statistic(values), 200, samples=500, confidence=0.5, seed=0)
    wide = bootstrap_ci(mean_statistic(values), 200, samples=500, confidence=0.99, seed=0)
    assert wide[0] < narrow[0] <= narrow[1] < wide[1]
    assert bootstrap_ci(mean_statistic(values), 200, samples=500, confidence=0.5, seed=0) == narrow


def test_bootstrap_ci_resamples_indices_of_range_n_with_replacement() -> None:
    seen: list[np.ndarray] = []

    def statistic(idx: np.ndarray) -> float:
        seen.append(idx)
        return 0.0

    assert bootstrap_ci(statistic, 30, samples=20, confidence=0.9) == (0.0, 0.0)
    assert len(seen) == 20
    assert all(len(idx) == 30 and idx.min() >= 0 and idx.max() < 30 for idx in seen)
    assert any(len(set(idx.tolist())) < 30 for idx in seen)  # with replacement: duplicates occur


def test_bootstrap_ci_of_a_constant_statistic_is_a_point() -> None:
    values = np.full(50, 0.25)
    assert bootstrap_ci(mean_statistic(values), 50, samples=50, confidence=0.95) == pytest.approx((0.25, 0.25))


# --- token classification --------------------------------------------------------------------------

TRUE_TAGS = [
    ["B-PER", "I-PER", "O", "B-LOC", "O"],
    ["O", "B-ORG", "I-ORG", "I-ORG", "O", "B-LOC"],
    ["O", "O", "O"],
    ["B-LOC", "I-LOC", "B-LOC", "O"],
]
PRED_TAGS = [
    ["B-PER", "I-PER", "O", "B-ORG", "O"],  # PER right, LOC typed as ORG
    ["O", "B-ORG", "I-ORG", "O", "O", "B-LOC"],  # ORG span too short, LOC right
    ["O", "B-PER", "O"],  # spurious PER
    ["B-LOC", "I-LOC", "I-LOC", "O"],  # two LOCs merged into one
]


def test_entity_counts_by_hand() -> None:
    counts = entity_counts(TRUE_TAGS, PRED_TAGS)
    assert counts.tolist() == [[1, 2, 2], [1, 2, 2], [0, 1, 0], [0, 1, 2]]


def test_entity_f1_agrees_with_seqeval() -> None:
    assert f1_from_counts(entity_counts(TRUE_TAGS, PRED_TAGS)) == pytest.approx(
        seqeval.metrics.f1_score(TRUE_TAGS, PRED_TAGS)
    )
    assert f1_from_counts(entity_counts(TRUE_TAGS, PRED_TAGS)) == pytest.approx(2 * 2 / (6 + 6))


@pytest.mark.parametrize("seed", range(3))
def test_entity_f1_agrees_with_seqeval_on_random_sequences(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tags = np.array(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    true = [tags[rng.integers(0, 5, int(rng.integers(1, 12)))].tolist() for _ in range(25)]
    pred = [[tag if rng.random() < 0.7 else str(tags[rng.integers(0, 5)]) for tag in sentence] for sentence in true]
    assert f1_from_counts(entity_counts(true, pred)) == pytest.approx(seqeval.metrics.f1_score(true, pred))


def test_f1_from_counts_resamples_sentences_and_handles_no_entities() -> None:
    counts = entity_counts(TRUE_TAGS, PRED_TAGS)
    # sentences 0 and 0 again and 3: tp 1+1+0, predicted 2+2+1, true 2+2+2
    assert f1_from_counts(counts[[0, 0, 3]]) == pytest.approx(2 * 2 / (5 + 6))
    assert f1_from_counts(entity_counts([["O", "O"]], [["O", "O"]])) == 0.0
    assert entity_counts([], []).shape == (0, 3)


def test_token_scores_by_hand() -> None:
    scores = token_scores(TRUE_TAGS, PRED_TAGS)
    # tokens: 18 in all; wrong: B-LOC->B-ORG, I-ORG->O, O->B-PER, B-LOC->I-LOC
    assert scores["token_accuracy"] == pytest.approx(14 / 18)
    assert scores["entity_f1"] == pytest.approx(4 / 12)
    assert set(scores["per_type"]) == {"PER", "LOC", "ORG"}
    # LOC: 4 true (s0, s1, s3 x2), 2 predicted (s1, merged s3), 1 right
    assert scores["per_type"]["LOC"]["recall"] == pytest.approx(1 / 4)
    assert scores["per_type"]["LOC"]["support"] == 4
    assert scores["worst_class_recall"] == pytest.approx(0.0)  # ORG: the one true span was cut short


# --- generation -----------------------------------------------------------------------------------


def test_char_bleu_of_identical_strings_is_one() -> None:
    assert char_bleu(["今天天气很好", "abcdefg"], ["今天天气很好", "abcdefg"]) == pytest.approx(1.0)


def test_char_bleu_of_disjoint_strings_is_zero() -> None:
    assert char_bleu(["abcdef"], ["uvwxyz"]) == 0.0
    assert char_bleu(["abcdef"], [""]) == 0.0


def test_char_bleu_by_hand() -> None:
    # 1..4-gram precisions of "abcdx" against "abcde": 4/5, 3/4, 2/3, 1/2; equal lengths: no penalty
    assert char_bleu(["abcde"], ["abcdx"]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4))


def test_char_bleu_brevity_penalty() -> None:
    # all precisions 1, hypothesis half the reference: exp(1 - 8/4)
    assert char_bleu(["abcdefgh"], ["abcd"]) == pytest.approx(math.exp(-1))
    # a longer hypothesis is not penalised for length: only its (clipped) precision drops, to 4/8
    assert char_bleu(["abcd"], ["abcdabcd"], max_n=1) == pytest.approx(0.5)


def test_char_bleu_clips_repeated_ngrams() -> None:
    # "a" occurs once in the reference: only one of the four "a"s counts
    assert char_bleu(["abcd"], ["aaaa"], max_n=1) == pytest.approx(1 / 4)


def test_char_bleu_is_a_corpus_score_not_a_mean() -> None:
    # pooled unigram counts: (2 + 1) / (2 + 3); a mean of per-sentence scores would differ
    refs, hyps = ["ab", "cde"], ["ab", "cxy"]
    assert char_bleu(refs, hyps, max_n=1) == pytest.approx(3 / 5)


def test_char_rouge_l_against_a_hand_computed_lcs() -> None:
    # the textbook pair: LCS("ABCBDAB", "BDCABA") has length 4 (e.g. "BCBA")
    precision, recall = 4 / 6, 4 / 7
    assert char_rouge_l("ABCBDAB", "BDCABA") == pytest.approx(2 * precision * recall / (precision + recall))
    assert char_rouge_l("我爱北京天安门", "我爱天安门") == pytest.approx(2 * 1 * (5 / 7) / (1 + 5 / 7))


def test_char_rouge_l_edge_cases() -> None:
    assert char_rouge_l("abc", "abc") == pytest.approx(1.0)
    assert char_rouge_l("abc", "xyz") == 0.0
    assert char_rouge_l("", "abc") == 0.0
    assert char_rouge_l("abc", "") == 0.0
