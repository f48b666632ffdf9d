"""The files stages pass to each other, as typed models: written and read through the same class.

A stage never reads another stage's JSON by key: it reads `Manifest.read(path)`, `EvaluateReport.read(path)`
and so on, so a renamed or missing field fails at once, naming the file, instead of as a KeyError
three stages later. Each model writes exactly the JSON it reads (indented, key-sorted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from lmforge.errors import DataError
from lmforge.io import write_json, write_json_atomic
from lmforge.schema import DatasetKind, LoraParams, TrainingParams

ModelT = TypeVar("ModelT", bound=BaseModel)


def read_model(model: type[ModelT], path: Path) -> ModelT:
    """Read and check a JSON file as `model`; a missing or malformed one is a one-line DataError naming it."""
    try:
        return model.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (run the stage that writes it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise DataError(f"{path}: {where}: {first['msg']} (written by another lmforge version?)") from None


class Artifact(BaseModel):
    """A JSON file one stage writes and another reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def read(cls, path: Path) -> Self:
        """Read and check the file; a missing or malformed one is a one-line DataError naming it."""
        return read_model(cls, path)

    def data(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def figures(self) -> dict[str, float]:
        """The few numbers a person compares across runs: the stage's DVC metrics file (metrics/...)."""
        raise NotImplementedError(f"{type(self).__name__} has no figures")

    def write(self, path: Path) -> None:
        """Write through a temporary file and a rename."""
        write_json_atomic(path, self.data())

    def write_into(self, path: Path) -> None:
        """Write into a folder that is itself being built atomically."""
        write_json(path, self.data())


def training_figures(report: PretrainReport | FinetuneReport) -> dict[str, float]:
    """What a training run is compared by: where it ended, how fast, how long."""
    ended = {} if report.val_loss is None else {"val_loss": report.val_loss}
    return {**ended, "tokens_per_s": float(report.tokens_per_second), "seconds": report.seconds}


SPLITS = ("train", "val", "test")  # every dataset's splits, as ingest writes them

SECONDARY_METRIC = {  # kind -> (its column in the DVC metrics files, the metric)
    "classification": ("accuracy", "accuracy"),
    "token_classification": ("accuracy", "token_accuracy"),
    "generation": ("bleu", "bleu_char"),
}


# --- ingest ---------------------------------------------------------------------------------------


class SourceInfo(Artifact):
    kind: str
    description: str
    sha256: str  # of the source itself: flows/retrain.py compares it to see new data


class LabelInfo(Artifact):
    declared: list[str] | None
    counts: dict[str, dict[str, int]]  # split -> label -> rows


class SplitChange(Artifact):
    """One split's rows against the previous manifest's."""

    new: int  # rows whose text no split of the previous manifest held
    removed: int  # rows of this split in the previous manifest that are gone from every split
    moved_in: int  # rows that sat in another split before: 0 unless the split rule, seed or fractions changed


class DataChanges(Artifact):
    """What changed since the previous manifest of the dataset (the one dvc.lock recorded, or the one in
    the workspace), so a retraining report can say what is new."""

    previous_source_sha256: str
    splits: dict[str, SplitChange]
    previous_label_counts: dict[str, dict[str, int]]  # split -> label -> rows, before


class Manifest(Artifact):
    """data/raw/<dataset>/manifest.json: what ingest wrote, and the frozen test split's sha256."""

    dataset: str
    kind: DatasetKind  # ingest.datasets.<dataset>.kind
    source: SourceInfo
    seed: int
    split_rule: str  # how a row's split was drawn from its text (lmforge.data.splits.SPLIT_RULE)
    split_fractions: dict[str, float]
    rows: dict[str, int]
    labels: LabelInfo
    files: dict[str, str]  # file name -> sha256 (rows.parquet: every row's id and split)
    test_sha256: str
    changes: DataChanges | None  # since the previous manifest; None on the first ingest

    @classmethod
    def of(cls, dataset_dir: Path) -> Manifest:
        return cls.read(Path(dataset_dir) / "manifest.json")

    def label_set(self) -> list[str]:
        """The declared labels (or tags), or train's own when none were declared."""
        if self.labels.declared is not None:
            return list(self.labels.declared)
        return sorted(self.labels.counts["train"])

    def drift(self, max_share_change: float) -> list[str]:
        """What a person should look at since the previous ingest: a label whose share of a split moved by
        more than `max_share_change`, a label never seen before, a label that is gone."""
        if self.changes is None:
            return []
        before_counts, now_counts = self.changes.previous_label_counts, self.labels.counts
        seen_before = {label for counts in before_counts.values() for label in counts}
        seen_now = {label for counts in now_counts.values() for label in counts}
        found = [f"{self.dataset}: label {label!r} is new ({now_counts.get('train', {}).get(label, 0)} train rows)"
                 for label in sorted(seen_now - seen_before)]  # fmt: skip
        found += [f"{self.dataset}: label {label!r} is gone" for label in sorted(seen_before - seen_now)]
        for split in SPLITS:
            before, now = label_shares(before_counts.get(split, {})), label_shares(now_counts.get(split, {}))
            for label in sorted(set(before) & set(now)):
                moved = now[label] - before[label]
                if abs(moved) > max_share_change:
                    found.append(f"{self.dataset} {split}: share of {label!r} {before[label]:.3f} -> {now[label]:.3f} "
                                 f"({moved:+.3f}, limit {max_share_change})")  # fmt: skip
        return found


def label_shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: count / total for label, count in counts.items()} if total else {}


class CorpusManifest(Artifact):
    """data/raw/corpus/manifest.json: the pretraining corpus, train splits only."""

    documents: dict[str, dict[str, int]]  # side -> dataset -> documents
    characters: dict[str, int]
    val_fraction: float
    files: dict[str, str]


class IngestedDataset(Artifact):
    rows: dict[str, int]
    seconds: float


class IngestReport(Artifact):
    """reports/ingest.json."""

    datasets: dict[str, IngestedDataset]
    corpus: dict[str, dict[str, int]]


# --- validate -------------------------------------------------------------------------------------


class ExpectationResult(Artifact):
    """One Great Expectations expectation's result, in the terms a failure message needs."""

    suite: str
    expectation: str
    column: str
    success: bool
    unexpected_count: int
    element_count: int
    examples: list[Any]
    explanation: str | None = None  # the failure in the data's own terms, where the generic line says too little

    def describe(self) -> str:
        if self.explanation:
            return f"{self.expectation}({self.column}) in suite {self.suite}: {self.explanation}"
        examples = ", ".join(repr(example)[:60] for example in self.examples)
        return (
            f"{self.expectation}({self.column}) in suite {self.suite} failed on "
            f"{self.unexpected_count} of {self.element_count} rows, e.g. [{examples}]"
        )


class DatasetValidation(Artifact):
    """reports/validation/<dataset>.json: every expectation's result for one dataset."""

    dataset: str
    success: bool
    on_failure: str
    test_sha256: str  # the split it validated: preprocess and promote check it is still the frozen one
    evaluated: int
    failed: int
    expectations: list[ExpectationResult]

    def covers(self, manifest: Manifest) -> bool:
        return self.test_sha256 == manifest.test_sha256


class ValidationSummary(Artifact):
    success: bool
    evaluated: int
    failed: int


class ValidateReport(Artifact):
    """reports/validate.json: per dataset, whether it passed."""

    datasets: dict[str, ValidationSummary]


# --- preprocess -----------------------------------------------------------------------------------


class DatasetLabels(Artifact):
    """data/processed/datasets/<dataset>/labels.json: the label set the dataset was tokenized with."""

    kind: DatasetKind
    labels: list[str]
    test_sha256: str


class TokenizerInfo(Artifact):
    kind: str
    vocab_size: int


class PackedBlocks(Artifact):
    """One side (train or val) of the packed pretraining corpus: data/processed/pretrain/<file>."""

    file: str
    dtype: str
    block_size: int
    documents: int
    tokens: int
    blocks: int
    padding_fraction: float
    unknown_fraction: float


class PackedCorpus(Artifact):
    """data/processed/pretrain/meta.json: where the packed blocks are and what they hold."""

    train: PackedBlocks
    val: PackedBlocks


class TokenizedSplit(Artifact):
    rows: int
    tokens: int
    truncated_fraction: float
    unknown_fraction: float


class PreprocessReport(Artifact):
    """reports/preprocess.json."""

    tokenizer: TokenizerInfo
    pretrain: PackedCorpus
    datasets: dict[str, dict[str, TokenizedSplit]]  # dataset -> split -> rows, tokens
    seconds_tokenizer: float
    seconds_pack: float
    seconds: float
    peak_rss_mb: float


# --- pretrain and finetune ------------------------------------------------------------------------


class PretrainReport(Artifact):
    """reports/pretrain/<model>.json. A Hugging Face model copied in (architecture hf) trained no steps:
    no validation loss."""

    val_loss: float | None
    val_perplexity: float | None
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: int
    n_parameters: int
    stopped_early: bool
    resumed_from_step: int | None
    mlflow_run_id: str

    def figures(self) -> dict[str, float]:
        return training_figures(self)


class EvalPoint(Artifact):
    """One validation-loss evaluation during training."""

    step: int
    val_loss: float
    val_perplexity: float


class TrainingHistory(RootModel[list[EvalPoint]]):
    """history.json beside a trained model: every validation loss, by step (evaluate plots it as curve.json)."""

    model_config = ConfigDict(frozen=True)

    @classmethod
    def read(cls, path: Path) -> TrainingHistory:
        return read_model(cls, path)

    @property
    def best_val_loss(self) -> float:
        if not self.root:
            raise DataError("the training history holds no validation loss")
        return min(point.val_loss for point in self.root)

    def data(self) -> list[dict[str, Any]]:
        return self.model_dump(mode="json")


class FinetuneReport(Artifact):
    """reports/finetune/<task>.json."""

    val_loss: float
    val_perplexity: float | None = None  # generation only
    steps: int
    train_examples: int
    tokens_per_second: int
    seconds: float
    stopped_early: bool
    resumed_from_step: int | None
    mlflow_run_id: str | None = None

    def figures(self) -> dict[str, float]:
        return training_figures(self)


class TaskMeta(Artifact):
    """models/finetuned/<task>/lmforge_task.json: the resolved config that travels with a task model."""

    task: str
    dataset: str
    kind: str
    base: str
    method: str
    lora: LoraParams
    prompt_chars: int
    prompt_loss: bool = False
    class_weights: str = "none"
    pooling: str = "cls"  # (token) classification: what the classifier reads (cls, mean or mean_max)
    training: TrainingParams
    base_resolved: str
    seed: int
    dropout: float | None
    labels: list[str]
    max_length: int
    word_start_types: bool = False  # token classification: token_type_ids mark each word's first piece
    test_sha256: str  # the frozen split when it was fine-tuned: evaluate refuses another
    finetune_run_id: str | None
    optuna_study: str | None = None
    optuna_trial: int | None = None


# --- evaluate -------------------------------------------------------------------------------------


class BaselineScores(Artifact):
    """A simple model scored on the same test split (its primary metric under the same name)."""

    model_config = ConfigDict(extra="allow", frozen=True)  # the baseline's metric names depend on the kind

    name: str
    ci_low: float | None = None
    ci_high: float | None = None

    def value(self, metric: str) -> float | None:
        found = (self.model_extra or {}).get(metric)
        return None if found is None else float(found)


class EvaluateReport(Artifact):
    """reports/evaluate/<task>/metrics.json: the task's metrics on the frozen test split.

    The common fields are typed; the kind's own scores (accuracy, per_class, entity_f1, bleu_char,
    ...) ride along as extra fields under their metric names.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    task: str
    kind: str
    test_examples: int
    test_sha256: str
    primary_metric: str
    primary: float
    primary_ci_low: float
    primary_ci_high: float
    higher_is_better: bool
    baseline: BaselineScores
    latency_ms_p50: float
    latency_ms_p95: float
    throughput_per_s: float
    worst_class_recall: float | None = None
    per_class: dict[str, dict[str, Any]] | None = None

    def score(self, metric: str) -> float | None:
        """A numeric metric by name, typed or extra."""
        typed = metric in type(self).model_fields
        value = getattr(self, metric) if typed else (self.model_extra or {}).get(metric)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def figures(self) -> dict[str, float]:
        """The primary metric (macro-F1, entity F1 or perplexity: the task says which) with its interval,
        the baseline's on the same split, the kind's key secondary metric, p95 latency. The names are the
        same for every task, so `dvc metrics show` has one column each."""
        figures = {"primary": self.primary, "ci_low": self.primary_ci_low, "ci_high": self.primary_ci_high}
        base = self.baseline.value(self.primary_metric)
        if base is not None:
            figures["baseline"] = base
        column, metric = SECONDARY_METRIC[self.kind]
        value = self.score(metric)
        if value is not None:
            figures[column] = value
        return {**figures, "p95_ms": self.latency_ms_p95}

    def headline(self) -> str:
        """`macro_f1 0.8280 [0.8100, 0.8460]; baseline tfidf_logreg 0.8530`: the primary metric with its
        interval, beside the baseline's on the same split."""
        base = self.baseline.value(self.primary_metric)
        baseline = f"; baseline {self.baseline.name} {base:.4f}" if base is not None else ""
        interval = f"[{self.primary_ci_low:.4f}, {self.primary_ci_high:.4f}]"
        return f"{self.primary_metric} {self.primary:.4f} {interval}{baseline}"

    def numbers(self) -> dict[str, float]:
        """Every numeric metric (bools and nested tables left out): what goes to MLflow."""
        return {key: float(value) for key, value in self.data().items()
                if isinstance(value, int | float) and not isinstance(value, bool)}  # fmt: skip


class PerExample(Artifact):
    """reports/evaluate/<task>/per_example.json: what the gate's paired bootstrap resamples, by kind."""

    y_true: list[int] | None = None  # classification
    y_pred: list[int] | None = None
    entity_counts: list[list[int]] | None = None  # token classification: (true, predicted, correct) per sentence
    loss: list[float] | None = None  # generation: summed loss and token count per example
    tokens: list[int] | None = None

    @property
    def examples(self) -> int:
        present = [values for values in (self.y_true, self.entity_counts, self.loss) if values is not None]
        return len(present[0]) if present else 0


class ModelRef(Artifact):
    """reports/evaluate/<task>/model.json: where the evaluated model was logged in MLflow."""

    model_uri: str
    run_id: str  # the evaluate@<task> MLflow run: its artifacts hold the evidence
    finetune_run_id: str | None


# --- optimize -------------------------------------------------------------------------------------


class OptimizeReport(Artifact):
    """reports/optimize/<task>.json and reports/optimize/<task>/best_params.json."""

    task: str
    tuned: bool
    n_trials: int
    best_params: dict[str, Any]
    study: str | None = None
    finished_trials: int | None = None
    best_trial: int | None = None
    best_val_loss: float | None = None
    mlflow_run_id: str | None = None
    trial_mlflow_run_id: str | None = None
    finetuned_val_loss: float | None = None
    candidate_source: Literal["trial", "finetune"] | None = None


# --- promote --------------------------------------------------------------------------------------


# pass: the candidate moved @champion (or would have, in a DVC experiment); fail: it did not; unchanged: it
# already held @champion.
GateDecision = Literal["pass", "fail", "unchanged"]


class VersionRef(Artifact):
    version: str
    decision: str | None  # the version's gate.decision tag, as the registry holds it
    run_id: str | None


class PromoteReport(Artifact):
    """reports/promote/<task>.json: the gate's decision and every reason."""

    task: str
    registered_model: str
    version: str
    decision: GateDecision
    reasons: list[str]
    checks: dict[str, bool]
    champion_before: str | None
    champion_after: VersionRef | None
    improvement: float | None = None
    improvement_lower_bound: float | None = None
    candidate_primary: float | None = None
    primary_metric: str | None = None
    champion_primary: float | None = None
    mlflow_run_id: str
    test_sha256: str | None = None  # the test split every figure above is on (the candidate's)
    # The champion when the run started (before the baseline contended): its figure on the split it was
    # evaluated on, that split, and its figure re-scored on today's (None: it was the same split).
    champion_before_primary: float | None = None
    champion_before_test_sha256: str | None = None
    champion_before_rescored: float | None = None
    data_changes: DataChanges | None = None  # the dataset since the previous ingest
    label_counts: dict[str, dict[str, int]] | None = None  # split -> label -> rows, now
    drift: list[str] = []  # what a person should look at (promote.max_label_share_change)
    baseline_version: str | None = None  # the task's baseline, re-trained on today's train split, a contender
    baseline_decision: GateDecision | None = None  # its gate against the champion, before the candidate's
    baseline_reasons: list[str] = []

    def figures(self) -> dict[str, float]:
        """Did the candidate pass, which version serves, by how much the candidate beat the champion."""
        figures = {"passed": float(self.decision == "pass")}
        if self.champion_after is not None and self.champion_after.version.isdigit():
            figures["serving"] = float(self.champion_after.version)
        if self.improvement is not None:
            figures["improvement"] = self.improvement
        return figures
