"""evaluate: models/finetuned/<task> + the frozen test split -> reports/evaluate/<task>/ + an MLflow model.

The scoring is lmforge/scoring.py (`evaluate_model`): metrics with intervals beside the baseline's,
per-example evidence for the gate, plots, and both models logged to MLflow; the stage's few figures
go to metrics/evaluate/<task>.json (DVC metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.artifacts import EvaluateReport
from lmforge.params import Params
from lmforge.schema import EvaluateParams, Section
from lmforge.scoring import evaluate_model
from lmforge.stage import Stage, dep, item_of, output


@dataclass(frozen=True)
class EvaluatePaths:
    model: Path = dep("models/finetuned/<task> (or a candidate): the model to score")
    dataset: Path = dep("data/raw/<dataset>: the frozen test split, and train for the baseline")
    out: Path = output("reports/evaluate/<task>: metrics, per-example records, plots, the MLflow model")
    metrics: Path = output("metrics/evaluate/<task>.json: the figures to compare (DVC metrics)")


def run(section: EvaluateSection, paths: EvaluatePaths) -> EvaluateReport:
    """Score one task's fine-tuned model on its frozen test split; log it to MLflow as a pyfunc."""
    return evaluate_model(section.evaluate, section.name, paths.model, paths.dataset, paths.out)


def summary(report: EvaluateReport, paths: EvaluatePaths) -> str:
    return (f"evaluate: {report.task}: {report.headline()}; latency p50 {report.latency_ms_p50:.1f} ms, "
            f"p95 {report.latency_ms_p95:.1f} ms")  # fmt: skip


class EvaluateSection(Section):
    """What one evaluate@<task> stage reads of params.yaml."""

    name: str
    evaluate: EvaluateParams


def section(params: Params, item: str | None) -> EvaluateSection:
    item_of(params.finetune.tasks, item, "finetune.tasks")
    return EvaluateSection(name=str(item), evaluate=params.evaluate)


STAGE = Stage("evaluate", ("evaluate",), section, EvaluatePaths, run, summary,
              lambda paths: paths.out / "metrics.json", item="task", write_report=False)  # fmt: skip
