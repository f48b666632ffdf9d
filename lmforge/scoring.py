"""Scoring a task model on its frozen test split, beside the task's baseline, with the evidence the gate reads.

`evaluate_model` writes metrics.json (the task's metrics, a bootstrap interval for its primary metric,
latency and throughput, and the baseline's on the same split), per_example.json (what the promotion
gate's paired bootstrap resamples), plots (confusion.json, curve.json), baseline/ (the baseline model
and its evidence) and model.json (where the logged pyfunc model is), and logs both models to MLflow,
where `mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": [...]}))` serves them on raw text.
The evaluate stage scores each fine-tuned model with it; the optimize stage scores its candidate.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmforge import tracking
from lmforge.artifacts import EvaluateReport, Manifest, ModelRef, PerExample, TrainingHistory
from lmforge.baselines import Baseline, MajorityTag, NgramLM, TfidfLogReg
from lmforge.errors import LmforgeError
from lmforge.figures import evaluation_figures, log_figures
from lmforge.inference import (
    TaskModel,
    class_probabilities,
    continuation_losses,
    continuation_reference,
    generate,
    load_task_model,
    word_tags,
)
from lmforge.io import atomic_output_dir, sha256_file, write_json
from lmforge.metrics import (
    bootstrap_ci,
    char_bleu,
    char_rouge_l,
    classification_scores,
    entity_counts,
    f1_from_counts,
    macro_f1_statistic,
    token_scores,
)
from lmforge.schema import EvaluateParams
from lmforge.tokenization import encode_pairs, example_pairs

SERVING_CODE = Path(__file__).resolve().parent / "serving.py"


@dataclass(frozen=True)
class Evaluation:
    """What scoring one model gives: the metrics, and the records behind them."""

    metrics: dict[str, Any]  # the kind's metrics, under the names EvaluateReport and MLflow use
    per_example: PerExample  # what the gate's paired bootstrap resamples
    confusion: list[dict[str, str]]  # (actual, predicted) pairs: the DVC confusion plot
    samples: list[dict[str, str]] | None = None  # generation: prompts, references, generations
    probabilities: np.ndarray | None = None  # classification: each text's class probabilities (ROC, PR curves)


def frozen_test_split(dataset_dir: Path, tm: TaskModel) -> pd.DataFrame:
    """The test split, after checking it is the very one the manifest froze and the model was tuned against."""
    manifest = Manifest.of(dataset_dir)
    if manifest.dataset != tm.meta.dataset:
        raise LmforgeError(f"{dataset_dir}: holds dataset {manifest.dataset!r}; the model was fine-tuned on "
                           f"{tm.meta.dataset!r}")  # fmt: skip
    path = dataset_dir / "test.parquet"
    if sha256_file(path) != manifest.test_sha256:
        raise LmforgeError(f"{path}: does not match the sha256 frozen in its manifest; re-run ingest")
    if tm.meta.test_sha256 != manifest.test_sha256:
        raise LmforgeError(f"{path}: the model was fine-tuned when another test split was frozen; re-run finetune")
    return pd.read_parquet(path)


def latency_ms(predict_one: Any, examples: list[Any], samples: int) -> tuple[float, float]:
    timings = []
    for example in examples[:samples]:
        started = time.perf_counter()
        predict_one([example])
        timings.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(timings, 50)), float(np.percentile(timings, 95))


def interval(params: EvaluateParams, statistic: Any, n: int) -> tuple[float, float]:
    return bootstrap_ci(statistic, n, params.bootstrap_samples, params.confidence)


def score_classification(probabilities: Callable[[list[str]], np.ndarray], labels: list[str], test: pd.DataFrame,
                         params: EvaluateParams) -> Evaluation:  # fmt: skip
    """A classifier (the model, or its baseline) on the test split: scores, an interval, latency."""
    index = {label: i for i, label in enumerate(labels)}
    texts, y_true = test["text"].tolist(), test["label"].map(index).to_numpy()
    started = time.perf_counter()
    probs = probabilities(texts)
    seconds = time.perf_counter() - started
    y_pred = probs.argmax(axis=1)
    scores = classification_scores(y_true, probs, labels)
    low, high = interval(params, macro_f1_statistic(y_true, y_pred, len(labels)), len(texts))
    p50, p95 = latency_ms(probabilities, texts, params.latency_samples)
    confusion = [{"actual": labels[a], "predicted": labels[p]} for a, p in zip(y_true, y_pred, strict=True)]
    scores.pop("confusion_matrix")
    metrics = {
        "primary_metric": "macro_f1", "primary": scores["macro_f1"], "primary_ci_low": low, "primary_ci_high": high,
        "higher_is_better": True, **scores, "baseline": {"name": "none"},
        "latency_ms_p50": p50, "latency_ms_p95": p95, "throughput_per_s": len(texts) / seconds,
    }  # fmt: skip
    per_example = PerExample(y_true=y_true.tolist(), y_pred=y_pred.tolist())
    return Evaluation(metrics, per_example, confusion, probabilities=probs)


def score_tokens(tagger: Callable[[list[list[str]]], list[list[str]]], test: pd.DataFrame,
                 params: EvaluateParams) -> Evaluation:  # fmt: skip
    """A tagger (the model, or its baseline) on the test split: entity F1 with an interval, latency."""
    sentences = [list(words) for words in test["tokens"]]
    true_tags = [list(tags) for tags in test["tags"]]
    started = time.perf_counter()
    pred_tags = tagger(sentences)
    seconds = time.perf_counter() - started
    scores = token_scores(true_tags, pred_tags)
    counts = entity_counts(true_tags, pred_tags)
    low, high = interval(params, lambda idx: f1_from_counts(counts[idx]), len(sentences))
    p50, p95 = latency_ms(tagger, sentences, params.latency_samples)
    confusion = [
        {"actual": t, "predicted": p}
        for trues, preds in zip(true_tags, pred_tags, strict=True)
        for t, p in zip(trues, preds, strict=True) if t != "O" or p != "O"
    ]  # fmt: skip
    metrics = {
        "primary_metric": "entity_f1", "primary": scores["entity_f1"], "primary_ci_low": low, "primary_ci_high": high,
        "higher_is_better": True, **scores, "baseline": {"name": "none"},
        "latency_ms_p50": p50, "latency_ms_p95": p95, "throughput_per_s": len(sentences) / seconds,
    }  # fmt: skip
    return Evaluation(metrics, PerExample(entity_counts=counts.tolist()), confusion)


def fit_baseline(tm: TaskModel, train: pd.DataFrame) -> Baseline:
    """The task's baseline, trained on the same train split (generation: over the model's own tokens)."""
    if tm.kind == "classification":
        return TfidfLogReg.fit(train["text"].tolist(), train["label"].tolist(), tm.labels)
    if tm.kind == "token_classification":
        return MajorityTag.fit([list(w) for w in train["tokens"]], [list(t) for t in train["tags"]], tm.labels)
    encoded = encode_pairs(tm.tokenizer, example_pairs(train, tm.meta.prompt_chars), tm.max_length)
    return NgramLM.fit(encoded["input_ids"], tm.tokenizer, tm.max_length)


def with_baseline(model: Evaluation, baseline: Evaluation, name: str) -> Evaluation:
    """The model's metrics with the baseline's figures beside them (same split, same metric names)."""
    metric = baseline.metrics["primary_metric"]
    figures = {key: baseline.metrics[key] for key in (metric, "accuracy") if key in baseline.metrics}
    summary = {"name": name, **figures, "ci_low": baseline.metrics["primary_ci_low"],
               "ci_high": baseline.metrics["primary_ci_high"]}  # fmt: skip
    return dataclasses.replace(model, metrics={**model.metrics, "baseline": summary})


Losses = Callable[[list[tuple[str, str]]], tuple[np.ndarray, np.ndarray]]
Generate = Callable[[list[str], int], list[str]]


def score_generation(losses_of: Losses, generate_from: Generate, tokenizer: Any, test: pd.DataFrame,
                     prompt_chars: int, params: EvaluateParams) -> Evaluation:  # fmt: skip
    """A language model (the model, or its n-gram baseline) on the test continuations: perplexity, BLEU, latency."""
    import sacrebleu

    pairs = example_pairs(test, prompt_chars)
    started = time.perf_counter()
    losses, counts = losses_of(pairs)
    seconds = time.perf_counter() - started
    perplexity = float(np.exp(losses.sum() / counts.sum()))
    low, high = interval(params, lambda idx: float(np.exp(losses[idx].sum() / counts[idx].sum())), len(pairs))
    sample = pairs[: params.generated_samples]  # greedy decoding is the slow part
    hypotheses = generate_from([prompt for prompt, _ in sample], params.max_new_tokens)
    references = [continuation_reference(tokenizer, continuation, params.max_new_tokens) for _, continuation in sample]
    rouge = [char_rouge_l(ref, hyp) for ref, hyp in zip(references, hypotheses, strict=True)]
    p50, p95 = latency_ms(lambda batch: generate_from(batch, params.max_new_tokens), [p for p, _ in sample],
                          params.latency_samples)  # fmt: skip
    metrics = {
        "primary_metric": "perplexity", "primary": perplexity, "primary_ci_low": low, "primary_ci_high": high,
        "higher_is_better": False, "perplexity": perplexity,
        "bleu_char": char_bleu(references, hypotheses), "rouge_l_char": float(np.mean(rouge)),
        "sacrebleu_zh": sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score / 100,
        "generated_examples": len(sample),
        "baseline": {"name": "none"},
        "latency_ms_p50": p50, "latency_ms_p95": p95, "throughput_per_s": len(pairs) / seconds,
    }  # fmt: skip
    samples = [{"prompt": p, "reference": r, "generated": h}
               for (p, _), r, h in list(zip(sample, references, hypotheses, strict=True))[:20]]  # fmt: skip
    return Evaluation(metrics, PerExample(loss=losses.tolist(), tokens=counts.tolist()), [], samples)


def log_pyfunc(model_dir: Path, served_model: TaskModel | Baseline, example: str) -> str:
    """Log a task model or a baseline as an MLflow pyfunc (code + artifacts, no pickle); return its URI."""
    import mlflow
    from mlflow.models import infer_signature

    from lmforge.serving import MAX_NEW_TOKENS, LmforgeTextModel

    served = LmforgeTextModel()
    served.task_model = served_model
    input_example = pd.DataFrame({"text": [example]})
    # A generation request may set how far to continue: the signature declares it, or MLflow drops it.
    request_params = {"max_new_tokens": MAX_NEW_TOKENS} if served_model.kind == "generation" else None
    signature = infer_signature(input_example, served.predict(None, input_example), params=request_params)
    if served_model.kind == "token_classification":  # raw text, or the words of a segmented sentence
        from mlflow.types.schema import Array, ColSpec, DataType, Schema

        signature.inputs = Schema([ColSpec(DataType.string, "text", required=False),
                                   ColSpec(Array(DataType.string), "words", required=False)])  # fmt: skip
    # Public versions only: "torch==2.13.0+cpu" exists on no index but PyTorch's CPU one, while
    # "torch==2.13.0" matches the CPU build there and the CUDA build on PyPI (PEP 440 local versions).
    requirements = [f"{name}=={metadata.version(name).split('+')[0]}" for name in
                    ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy",
                     "scikit-learn")]  # fmt: skip
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(SERVING_CODE),
        artifacts={"model_dir": str(model_dir)},
        # No code_paths: MLflow would put a copy of lmforge first on sys.path of whoever loads the model,
        # and the gate refuses a version that brings code of its own (registry.lmforge_flavor).
        signature=signature,
        input_example=input_example,
        pip_requirements=requirements,
    )
    return info.model_uri


def log_evidence(folder: Path) -> None:
    """The evaluation's files as the run's `eval/` artifacts: what the gate reads back. The baseline's
    model/ stays out: its pyfunc already holds it, and the gate should not download weights for evidence."""
    import mlflow

    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and "model" not in relative.parts[:-1]:
            mlflow.log_artifact(str(path), artifact_path=str(Path("eval") / relative.parent))


def log_rows(dataset_dir: Path) -> None:
    """The dataset's rows.parquet (each row's id and split) as eval/rows.parquet: what the model trained on,
    which the gate checks before re-scoring it on a later test split (lmforge/rescore.py)."""
    import mlflow

    mlflow.log_artifact(str(dataset_dir / "rows.parquet"), artifact_path="eval")


@dataclass(frozen=True)
class ScoredBaseline:
    """The task's baseline and its scores on the same test examples as the model."""

    model: Baseline
    report: EvaluateReport
    evaluation: Evaluation


@dataclass(frozen=True)
class Scores:
    """A task model and its baseline, scored on the same frozen test examples."""

    report: EvaluateReport
    evaluation: Evaluation
    task_model: TaskModel
    test: pd.DataFrame
    baseline: ScoredBaseline


def in_label_order(probabilities: Callable[[list[str]], np.ndarray], own: list[str],
                   order: list[str]) -> Callable[[list[str]], np.ndarray]:  # fmt: skip
    """A classifier's probabilities with its columns moved into another label order; a label it never
    learned gets probability 0 (a champion re-scored on data with a new label)."""
    if own == order:
        return probabilities
    columns = [own.index(label) if label in own else None for label in order]

    def reordered(texts: list[str]) -> np.ndarray:
        probs = probabilities(texts)
        return np.stack([probs[:, c] if c is not None else np.zeros(len(probs)) for c in columns], axis=1)

    return reordered


def score_served(model: TaskModel | Baseline, test: pd.DataFrame, params: EvaluateParams, prompt_chars: int,
                 labels: list[str] | None = None) -> Evaluation:  # fmt: skip
    """One model, a task model or a baseline, on test examples, by its kind.

    `labels` is the label order of the classification records (default: the model's own); a champion
    re-scored on a candidate's split is scored in the candidate's order, so both records index alike.
    """
    if isinstance(model, TfidfLogReg):
        return score_classification(in_label_order(model.probabilities, model.labels, labels or model.labels),
                                    labels or model.labels, test, params)  # fmt: skip
    if isinstance(model, MajorityTag):
        return score_tokens(model.predict, test, params)
    if isinstance(model, NgramLM):
        return score_generation(model.continuation_losses, model.generate, model.tokenizer, test, prompt_chars, params)
    tm = model
    if tm.kind == "classification":
        probabilities = in_label_order(lambda texts: class_probabilities(tm, texts, params.batch_size), tm.labels,
                                       labels or tm.labels)  # fmt: skip
        return score_classification(probabilities, labels or tm.labels, test, params)
    if tm.kind == "token_classification":
        return score_tokens(lambda sentences: word_tags(tm, sentences, params.batch_size), test, params)
    return score_generation(lambda pairs: continuation_losses(tm, pairs), lambda prompts, n: generate(tm, prompts, n),
                            tm.tokenizer, test, prompt_chars, params)  # fmt: skip


def score(params: EvaluateParams, task: str, model_dir: Path, dataset_dir: Path) -> Scores:
    """Score the model and its baseline on the frozen test split; nothing is written."""
    if not (model_dir / "lmforge_task.json").is_file():
        raise LmforgeError(f"{model_dir}: no fine-tuned model for task {task!r} (run the finetune stage)")
    tm = load_task_model(model_dir)
    test = frozen_test_split(dataset_dir, tm)
    if params.max_test_samples:
        test = test.head(params.max_test_samples)
    train = pd.read_parquet(dataset_dir / "train.parquet")
    baseline = fit_baseline(tm, train)
    result = score_served(tm, test, params, tm.meta.prompt_chars)
    base = score_served(baseline, test, params, tm.meta.prompt_chars, labels=tm.labels)

    def report_of(evaluation: Evaluation) -> EvaluateReport:
        return EvaluateReport.model_validate({"task": task, "kind": tm.kind, "test_examples": len(test),
                                          "test_sha256": tm.meta.test_sha256, **evaluation.metrics})  # fmt: skip

    result = with_baseline(result, base, baseline.name)
    return Scores(report_of(result), result, tm, test, ScoredBaseline(baseline, report_of(base), base))


def evaluate_model(
    params: EvaluateParams, task: str, model_dir: Path, dataset_dir: Path, out_dir: Path
) -> EvaluateReport:
    """Score a task model and its baseline; log each to MLflow as a pyfunc with its evidence; write out_dir.

    out_dir/baseline/ holds the baseline (model/, its metrics and per-example records, model.json):
    promote registers it as the task's first contender. Also used by optimize for a tuned candidate.
    """
    import mlflow

    scores = score(params, task, model_dir, dataset_dir)
    report, result, tm, test = scores.report, scores.evaluation, scores.task_model, scores.test
    history = TrainingHistory.read(model_dir / "history.json")
    example = str(test["text"].iloc[0])
    with atomic_output_dir(out_dir) as staging:
        folder = staging / "baseline"
        baseline = scores.baseline
        baseline.model.save(folder / "model")
        baseline.report.write_into(folder / "metrics.json")
        baseline.evaluation.per_example.write_into(folder / "per_example.json")
        if baseline.evaluation.samples:
            write_json(folder / "samples.json", baseline.evaluation.samples)
        with tracking.stage_run("evaluate", {"evaluate": params.model_dump(), "task": task,
                                             "model_kind": "baseline"}, item=task) as baseline_run:  # fmt: skip
            mlflow.set_tags({"mlflow.runName": f"evaluate@{task} (baseline)", "lmforge.model_kind": "baseline"})
            mlflow.log_metrics(baseline.report.numbers())
            baseline_uri = log_pyfunc(folder / "model", baseline.model, example)
            log_evidence(folder)
            log_rows(dataset_dir)
        ModelRef(model_uri=baseline_uri, run_id=baseline_run.info.run_id,
                 finetune_run_id=None).write_into(folder / "model.json")  # fmt: skip
        with tracking.stage_run("evaluate", {"evaluate": params.model_dump(), "task": task}, item=task) as mlflow_run:
            numeric = report.numbers()
            numeric.update({f"baseline_{k}": float(v) for k, v in report.baseline.data().items()
                            if isinstance(v, float)})  # fmt: skip
            mlflow.log_metrics(numeric)
            model_uri = log_pyfunc(model_dir, tm, example)
            report.write_into(staging / "metrics.json")
            result.per_example.write_into(staging / "per_example.json")
            write_json(staging / "confusion.json", result.confusion)
            write_json(staging / "curve.json", history.data())
            if result.samples:
                write_json(staging / "samples.json", result.samples)
            ModelRef(model_uri=model_uri, run_id=mlflow_run.info.run_id,
                     finetune_run_id=tm.meta.finetune_run_id).write_into(staging / "model.json")  # fmt: skip
            log_evidence(staging)
            log_rows(dataset_dir)
            log_figures(evaluation_figures(task, result.confusion, tm.labels, result.per_example.y_true,
                                           result.probabilities, history.data()))  # fmt: skip
    return report
