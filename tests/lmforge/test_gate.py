"""The gate as a pure function, on per-example records whose truth is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from lmforge.artifacts import EvaluateReport, PerExample
from lmforge.gate import Evidence, decide, paired_bootstrap
from lmforge.schema import PromoteParams

N = 400
Y_TRUE = np.arange(N) % 2
LOADS = (True, "loads")


def evidence(metrics: dict, per_example: dict) -> Evidence:
    """Evidence as the evaluate stage writes it; the fields the gate does not read are placeholders."""
    filler = {"task": "t", "primary_ci_low": 0.0, "primary_ci_high": 1.0, "baseline": {"name": "none"},
              "latency_ms_p50": 1.0, "latency_ms_p95": 5.0, "throughput_per_s": 1.0}  # fmt: skip
    return Evidence(EvaluateReport.model_validate({**filler, **metrics}), PerExample.model_validate(per_example))


def records(item: Evidence) -> dict:
    return {name: values for name, values in item.per_example.data().items() if values is not None}


def classifier(correct_fraction: float, seed: int, sha: str = "frozen", latency: float = 5.0) -> Evidence:
    rng = np.random.default_rng(seed)
    correct = rng.random(N) < correct_fraction
    y_pred = np.where(correct, Y_TRUE, 1 - Y_TRUE)
    recall = [float(np.mean(y_pred[c == Y_TRUE] == c)) for c in (0, 1)]
    metrics = {"kind": "classification", "primary_metric": "macro_f1", "higher_is_better": True,
               "primary": float(f1_score(Y_TRUE, y_pred, average="macro")), "test_examples": N, "test_sha256": sha,
               "latency_ms_p95": latency, "worst_class_recall": min(recall)}  # fmt: skip
    return evidence(metrics, {"y_true": Y_TRUE.tolist(), "y_pred": y_pred.tolist()})


def gate(candidate: Evidence, champion: Evidence | None, floor: float | None = 0.6,
         latency: tuple[float, float] | str | None = (5.0, 5.0), **settings) -> object:  # fmt: skip
    return decide(candidate, champion, PromoteParams(**settings), floor, True, "frozen", LOADS, latency)


def test_a_clearly_better_candidate_passes():
    decision = gate(classifier(0.9, 1), classifier(0.7, 2))
    assert decision.passed, decision.reasons
    assert decision.improvement > 0.15 and decision.improvement_lower_bound > 0.1


def test_a_worse_candidate_fails_margin_and_significance():
    decision = gate(classifier(0.7, 1), classifier(0.9, 2))
    assert not decision.passed
    assert decision.checks["margin"] is False and decision.checks["significance"] is False


def test_an_improvement_within_noise_fails_significance_but_not_margin():
    champion = classifier(0.8, 3)
    nudged = list(champion.per_example.y_pred)
    # Fix four mistakes and make three new ones: a little better overall, but well within noise.
    for i in [i for i in range(N) if nudged[i] != Y_TRUE[i]][:4]:
        nudged[i] = int(Y_TRUE[i])
    for i in [i for i in range(N) if nudged[i] == Y_TRUE[i]][-3:]:
        nudged[i] = int(1 - Y_TRUE[i])
    primary = float(f1_score(Y_TRUE, nudged, average="macro"))
    candidate = evidence({**champion.metrics.data(), "primary": primary}, {"y_true": Y_TRUE.tolist(), "y_pred": nudged})
    decision = gate(candidate, champion)
    assert decision.checks["margin"] is True and decision.checks["significance"] is False
    assert not decision.passed
    assert not gate(candidate, champion, margin=0.05).checks["margin"]


def test_first_model_must_clear_the_floor():
    assert not gate(classifier(0.55, 4), None, floor=0.6).passed
    assert gate(classifier(0.7, 4), None, floor=0.6).passed
    assert not gate(classifier(0.9, 4), None, floor=None).passed  # no champion and no floor: no promotion


def test_guards_latency_test_split_validation_and_loading():
    champion = classifier(0.7, 2)
    # latency timed side by side in the gate: (candidate, champion) median ms, or why it could not be timed
    assert gate(classifier(0.9, 1), champion, latency=(7.4, 5.0)).checks["latency"] is True  # 1.48 <= 1.5
    assert gate(classifier(0.9, 1), champion, latency=(7.6, 5.0)).checks["latency"] is False
    assert gate(classifier(0.9, 1), champion, latency="the champion is not lmforge's pyfunc").checks["latency"] is False
    assert gate(classifier(0.9, 1), champion, latency=None).checks["latency"] is False  # no timing, no pass
    assert gate(classifier(0.9, 1, sha="other"), champion).checks["frozen_test"] is False
    assert (
        decide(classifier(0.9, 1), champion, PromoteParams(), None, False, "frozen", LOADS).checks["validation"]
        is False
    )
    assert not decide(classifier(0.9, 1), champion, PromoteParams(), None, True, "frozen", (False, "no")).passed
    other_split = evidence({**champion.metrics.data(), "test_sha256": "older"}, records(champion))
    assert gate(classifier(0.9, 1), other_split).checks["same_test"] is False


def test_lower_perplexity_is_the_better_direction():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 20, N)

    def lm(mean_loss: float) -> Evidence:
        losses = tokens * (mean_loss + rng.normal(0, 0.05, N))
        ppl = float(np.exp(losses.sum() / tokens.sum()))
        metrics = {"kind": "generation", "primary_metric": "perplexity", "primary": ppl, "higher_is_better": False,
                   "test_examples": N, "test_sha256": "frozen", "latency_ms_p95": 5.0}  # fmt: skip
        return evidence(metrics, {"loss": losses.tolist(), "tokens": tokens.tolist()})

    better, worse = lm(3.0), lm(3.5)
    assert gate(better, worse, floor=100.0).passed
    assert not gate(worse, better, floor=100.0).passed
    assert gate(better, None, floor=100.0).passed and not gate(worse, None, floor=25.0).passed
    delta, lower = paired_bootstrap(better, worse, 200, 0.95)
    assert delta > 0 and lower > 0


def test_fast_macro_f1_agrees_with_sklearn():
    from lmforge.metrics import macro_f1

    rng = np.random.default_rng(5)
    for n_labels in (2, 3, 7):
        y_true, y_pred = rng.integers(0, n_labels, 300), rng.integers(0, n_labels - 1, 300)
        expected = f1_score(y_true, y_pred, labels=list(range(n_labels)), average="macro", zero_division=0)
        assert macro_f1(y_true, y_pred, n_labels) == pytest.approx(expected)


def test_records_of_different_test_examples_are_not_compared():
    champion = classifier(0.7, 2)
    shorter = evidence(champion.metrics.data(), {k: v[:-3] for k, v in records(champion).items()})
    decision = gate(classifier(0.9, 1), shorter)
    assert decision.checks["same_test"] is False and not decision.passed


def with_baseline(candidate: Evidence, baseline: Evidence) -> Evidence:
    return Evidence(candidate.metrics, candidate.per_example, baseline=baseline)


def test_nothing_significantly_worse_than_the_baseline_passes_even_against_a_weaker_champion():
    baseline, weak_champion = classifier(0.85, 5), classifier(0.6, 6)
    worse = with_baseline(classifier(0.7, 1), baseline)  # beats the champion clearly, loses to the baseline clearly
    decision = gate(worse, weak_champion)
    assert decision.checks["significance"] is True and decision.checks["baseline"] is False
    assert not decision.passed and any("significantly worse than the baseline" in r for r in decision.reasons)
    better = with_baseline(classifier(0.95, 2), baseline)
    assert gate(better, weak_champion).checks["baseline"] is True


def test_the_baseline_is_the_first_contender_without_a_floor():
    first = Evidence(classifier(0.8, 1).metrics, classifier(0.8, 1).per_example, is_baseline=True)
    assert gate(first, None, floor=None).passed
    trained = with_baseline(classifier(0.95, 2), classifier(0.8, 3))
    decision = gate(trained, None, floor=None)  # no champion (the baseline failed its floor): the baseline check
    assert decision.passed and "floor" not in decision.checks and decision.checks["baseline"] is True
    assert not gate(classifier(0.95, 2), None, floor=None).passed  # no champion, no baseline, no floor


def test_latency_is_no_guard_against_a_baseline_champion_but_still_timed():
    champion = classifier(0.7, 2)
    baseline_champion = Evidence(champion.metrics, champion.per_example, is_baseline=True)
    assert gate(classifier(0.9, 1), baseline_champion, latency=(7.6, 0.5)).checks["latency"] is True
    assert gate(classifier(0.9, 1), champion, latency=(7.6, 0.5)).checks["latency"] is False
    assert gate(classifier(0.9, 1), baseline_champion, latency=None).checks["latency"] is False  # still fails closed


def test_a_champion_scored_under_another_definition_is_shown_as_it_is_compared():
    """A version evaluated when its metric was defined otherwise (its stored figure is stale) is shown with the
    figure the paired bootstrap compares, computed from its per-example records by this code."""
    candidate, champion = classifier(0.9, 1), classifier(0.7, 2)
    stale = Evidence(champion.metrics.model_copy(update={"primary": 0.123}), champion.per_example)
    reasons = " ".join(gate(candidate, stale).reasons)
    assert f"vs champion {champion.metrics.primary:.4f}" in reasons and "0.1230" not in reasons
    assert stale.primary == pytest.approx(champion.metrics.primary)


def test_a_compressed_copy_serves_only_if_not_significantly_worse_and_smaller():
    from lmforge.gate import decide_compression

    original = classifier(0.85, 1)
    same = Evidence(original.metrics, original.per_example)
    params = PromoteParams()
    passed = decide_compression(same, original, params, (100, 60), (5.0, 6.0), LOADS)
    assert passed.passed, passed.reasons
    assert not decide_compression(classifier(0.6, 2), original, params, (100, 60), (5.0, 5.0), LOADS).passed
    bigger = decide_compression(same, original, params, (100, 120), (5.0, 5.0), LOADS)
    assert not bigger.passed and bigger.checks == {**bigger.checks, "smaller": False}
    slower = decide_compression(same, original, params, (100, 60), (5.0, 50.0), LOADS)
    assert not slower.passed and slower.checks["latency"] is False
