"""The promotion gate: may a candidate take @champion? A pure function of the evidence.

Evidence is what the evaluate stage wrote for a model: metrics.json and per_example.json on the
frozen test split. Comparing per-example records of the candidate and the champion on the *same*
examples gives a paired bootstrap: resample the test examples, score both models on each resample,
and require the lower bound of the improvement to be above zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.artifacts import EvaluateReport, PerExample
from lmforge.metrics import f1_from_counts, macro_f1_statistic
from lmforge.schema import PromoteParams


@dataclass(frozen=True)
class Evidence:
    metrics: EvaluateReport
    per_example: PerExample
    baseline: Evidence | None = None  # the task's baseline, scored on the same examples by the same evaluate
    is_baseline: bool = False  # this is the baseline itself (registered as lmforge.model_kind=baseline)

    @classmethod
    def read(cls, folder: Path, baseline: Evidence | None = None, is_baseline: bool = False) -> Evidence:
        """The metrics.json and per_example.json an evaluation wrote into `folder`."""
        return cls(EvaluateReport.read(folder / "metrics.json"), PerExample.read(folder / "per_example.json"),
                   baseline, is_baseline)  # fmt: skip

    @property
    def primary(self) -> float:
        """The primary metric computed from the per-example records by this code, as the paired bootstrap
        computes it: a version scored when the metric was defined otherwise is shown as it is compared."""
        if self.examples == 0:
            return self.metrics.primary
        value = scorer(self)(np.arange(self.examples))
        return value if self.higher_is_better else -value

    @property
    def higher_is_better(self) -> bool:
        return self.metrics.higher_is_better

    @property
    def examples(self) -> int:
        """How many test examples the per-example records cover (generation skips too-short texts)."""
        return self.per_example.examples

    def same_examples(self, other: Evidence) -> bool:
        """Scored on the same test examples, so a paired bootstrap may compare the two."""
        return (self.metrics.test_sha256, self.examples, self.metrics.kind) == (
            other.metrics.test_sha256, other.examples, other.metrics.kind)  # fmt: skip


@dataclass
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    improvement: float | None = None
    improvement_lower_bound: float | None = None

    def check(self, name: str, ok: bool, reason: str) -> None:
        self.checks[name] = ok
        self.reasons.append(("ok: " if ok else "FAIL: ") + reason)
        self.passed = self.passed and ok


def scorer(evidence: Evidence) -> Callable[[np.ndarray], float]:
    """The primary metric on a resample of test-example indices, oriented so that higher is better."""
    kind, per_example = evidence.metrics.kind, evidence.per_example
    if kind == "classification":
        y_true, y_pred = np.asarray(per_example.y_true), np.asarray(per_example.y_pred)
        n_labels = len(evidence.metrics.per_class or {}) or int(max(y_true.max(), y_pred.max())) + 1
        return macro_f1_statistic(y_true, y_pred, n_labels)
    if kind == "token_classification":
        counts = np.asarray(per_example.entity_counts).reshape(-1, 3)
        return lambda idx: f1_from_counts(counts[idx])
    losses, tokens = np.asarray(per_example.loss), np.asarray(per_example.tokens)
    return lambda idx: -float(np.exp(losses[idx].sum() / max(tokens[idx].sum(), 1)))  # lower perplexity is better


def paired_bootstrap(candidate: Evidence, champion: Evidence, samples: int, confidence: float,
                     seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """Mean improvement (candidate - champion, oriented) and its lower confidence bound."""
    n = candidate.examples
    score_candidate, score_champion = scorer(candidate), scorer(champion)
    rng = np.random.default_rng(seed)
    deltas = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        deltas[i] = score_candidate(idx) - score_champion(idx)
    everything = np.arange(n)
    return score_candidate(everything) - score_champion(everything), float(np.quantile(deltas, 1 - confidence))


def oriented(evidence: Evidence) -> float:
    return evidence.primary if evidence.higher_is_better else -evidence.primary


def check_against_baseline(decision: Decision, candidate: Evidence, baseline: Evidence, params: PromoteParams) -> None:
    """Nothing significantly worse than the task's baseline serves: the baseline's paired lower bound of
    beating the candidate must not be above zero."""
    metric, name = candidate.metrics.primary_metric, candidate.metrics.baseline.name
    if not baseline.same_examples(candidate):
        decision.check("baseline", False, f"the baseline {name} was scored on other test examples")
        return
    delta, lower = paired_bootstrap(baseline, candidate, params.bootstrap_samples, params.confidence)
    worse = lower > 0
    decision.check(
        "baseline",
        not worse,
        f"{metric} {candidate.primary:.4f} vs baseline {name} {baseline.primary:.4f}: the baseline "
        f"leads by {delta:+.4f}, {params.confidence:.0%} lower bound {lower:+.4f} "
        + ("> 0: significantly worse than the baseline" if worse else "<= 0: not significantly worse"),
    )


def decide(candidate: Evidence, champion: Evidence | None, params: PromoteParams, floor: float | None,
           validation_passed: bool, frozen_test_sha256: str, loads: tuple[bool, str],
           latency: tuple[float, float] | str | None = None) -> Decision:  # fmt: skip
    """Every check of the gate, each with its reason; passed only if all pass.

    `latency` is (candidate, champion) median milliseconds timed side by side in the gate's process,
    or why they could not be timed; with a champion, no timing fails the latency check (fails closed).
    """
    metric = candidate.metrics.primary_metric
    decision = Decision(passed=True)
    decision.check("validation", validation_passed, "the data passed validation" if validation_passed
                   else "the data did not pass validation (reports/validation)")  # fmt: skip
    frozen = candidate.metrics.test_sha256 == frozen_test_sha256
    decision.check("frozen_test", frozen, "scored on the frozen test split" if frozen
                   else "scored on a test split other than the frozen one")  # fmt: skip
    if champion is None:
        if floor is None and candidate.is_baseline:
            decision.check("first_contender", True, "no champion yet: the task's baseline is the first contender")
        elif floor is None and candidate.baseline is None:
            decision.check("floor", False, "no champion yet, no baseline to beat and no floor (promote.floors)")
        elif floor is not None:
            ok = oriented(candidate) >= (floor if candidate.higher_is_better else -floor)
            relation = ">=" if candidate.higher_is_better else "<="
            value = f"first model: {metric} {candidate.primary:.4f}"
            decision.check(
                "floor", ok, f"{value} {relation} floor {floor}" if ok else f"{value} misses the floor {floor}"
            )
    else:
        same = champion.same_examples(candidate)
        decision.check("same_test", same, "champion and candidate scored on the same test examples" if same
                       else "the champion was scored on another split and could not be re-scored")  # fmt: skip
        if same:
            delta, lower = paired_bootstrap(candidate, champion, params.bootstrap_samples, params.confidence)
            decision.improvement, decision.improvement_lower_bound = delta, lower
            decision.check(
                "margin",
                delta > params.margin,
                f"{metric} {candidate.primary:.4f} vs champion {champion.primary:.4f}: "
                f"improvement {delta:+.4f} {'>' if delta > params.margin else '<='} margin {params.margin}",
            )
            decision.check("significance", lower > 0,
                           f"paired bootstrap ({params.bootstrap_samples} resamples): {params.confidence:.0%} lower "
                           f"bound of the improvement {lower:+.4f} {'>' if lower > 0 else '<='} 0")  # fmt: skip
        if champion.is_baseline and isinstance(latency, tuple):
            # A table lookup answers in microseconds: no trained model could ever replace it on latency.
            decision.check("latency", True, f"median latency {latency[0]:.1f} ms vs the baseline's {latency[1]:.1f} ms "
                           "(not a guard against a baseline champion)")  # fmt: skip
        elif isinstance(latency, tuple):
            ratio = latency[0] / max(latency[1], 1e-9)
            decision.check("latency", ratio <= params.max_latency_ratio,
                           f"median latency {latency[0]:.1f} ms vs champion {latency[1]:.1f} ms, timed side by side: "
                           f"ratio {ratio:.2f} (limit {params.max_latency_ratio})")  # fmt: skip
        else:
            decision.check("latency", False, f"latency not timed side by side: {latency or 'no timing'}")
        worst_candidate, worst_champion = candidate.metrics.worst_class_recall, champion.metrics.worst_class_recall
        if worst_candidate is not None and worst_champion is not None:
            drop = worst_champion - worst_candidate
            decision.check("worst_class_recall", drop <= params.max_recall_drop,
                           f"worst-class recall drop {drop:+.4f} (limit {params.max_recall_drop})")  # fmt: skip
    if candidate.baseline is not None:
        check_against_baseline(decision, candidate, candidate.baseline, params)
    ok, message = loads
    decision.check("loads", ok, message)
    return decision


def decide_compression(compressed: Evidence, original: Evidence, params: PromoteParams, sizes: tuple[int, int],
                       latency: tuple[float, float], loads: tuple[bool, str]) -> Decision:  # fmt: skip
    """Does a compressed copy serve instead of the model it came from? Only if it is not significantly worse
    on the same test examples, smaller on disk, within the latency ratio, and loads. `sizes` and `latency`
    are (original, compressed): bytes on disk, median milliseconds timed side by side."""
    metric = compressed.metrics.primary_metric
    decision = Decision(passed=True)
    same = compressed.same_examples(original)
    decision.check("same_test", same, "scored on the same test examples as the original" if same
                   else "scored on other test examples than the original")  # fmt: skip
    if same:
        delta, lower = paired_bootstrap(original, compressed, params.bootstrap_samples, params.confidence)
        decision.improvement, decision.improvement_lower_bound = -delta, -lower
        worse = lower > 0
        decision.check("not_worse", not worse,
                       f"{metric} {compressed.primary:.4f} vs the original's {original.primary:.4f}: the original "
                       f"leads by {delta:+.4f}, {params.confidence:.0%} lower bound {lower:+.4f} "
                       + ("> 0: significantly worse" if worse else "<= 0: not significantly worse"))  # fmt: skip
    decision.check("smaller", sizes[1] < sizes[0], f"size on disk {sizes[1] / 1e6:.2f} MB vs the original's "
                   f"{sizes[0] / 1e6:.2f} MB ({sizes[1] / max(sizes[0], 1):.2f}x)")  # fmt: skip
    ratio = latency[1] / max(latency[0], 1e-9)
    decision.check("latency", ratio <= params.max_latency_ratio,
                   f"median latency {latency[1]:.1f} ms vs the original's {latency[0]:.1f} ms, timed side by side: "
                   f"ratio {ratio:.2f} (limit {params.max_latency_ratio})")  # fmt: skip
    ok, message = loads
    decision.check("loads", ok, message)
    return decision
