"""promote: register the task's candidate in the MLflow registry and run the gate on it.

Only a candidate that passes every check takes `@champion` (the replaced champion becomes
`@previous`); one that fails gets `@challenger` and `@champion` stays where it was. In a DVC
experiment (`dvc exp run`: a what-if) a candidate is gated and its decision recorded, but it gets
`@challenger` at most: `lmforge promote --task T --version N` serves it if you decide to. The decision and
each reason go to the model version (tags and description), to reports/promote/<task>.json, and
to an MLflow run. The check of the champion and the move of the alias happen under one lock, so two
promotions at once cannot leave `@champion` on a version that failed its gate.

After new data the candidate is scored on a new test split: the champion is then scored again on it
(lmforge/rescore.py), so the two are always compared on the same examples, and the task's baseline,
re-trained on today's train split, contends before the candidate on every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion

from lmforge import card, registry, rescore, tracking
from lmforge.artifacts import DatasetValidation, GateDecision, Manifest, ModelRef, OptimizeReport, PromoteReport
from lmforge.errors import DataError
from lmforge.gate import Evidence, decide
from lmforge.io import files_sha256, fingerprint
from lmforge.params import Params
from lmforge.schema import EvaluateParams, PromoteParams, Section
from lmforge.stage import Stage, dep, item_of, output


@dataclass(frozen=True)
class PromotePaths:
    optimized: Path = dep("reports/optimize/<task>: the candidate's scores (candidate/) and best_params.json")
    dataset: Path = dep("data/raw/<dataset>: the frozen test split and its manifest")
    validation: Path = dep("reports/validation/<dataset>.json: did the data pass validation")
    report: Path = output("reports/promote/<task>.json: the decision and every reason")
    metrics: Path = output("metrics/promote/<task>.json: passed, the serving version, the improvement (DVC metrics)")


class PromoteSection(Section):
    """What one promote@<task> stage reads of params.yaml."""

    name: str
    dataset: str  # finetune.tasks.<task>.dataset
    prompt_chars: int  # finetune.tasks.<task>.prompt_chars: the prompts a re-scored champion continues
    promote: PromoteParams
    evaluate: EvaluateParams  # a champion re-scored on a new test split is scored as evaluate scored the candidate


def section(params: Params, item: str | None) -> PromoteSection:
    task = item_of(params.finetune.tasks, item, "finetune.tasks")
    return PromoteSection(name=str(item), dataset=task.dataset, prompt_chars=task.prompt_chars,
                          promote=params.promote, evaluate=params.evaluate)  # fmt: skip


def lineage_tags(params: PromoteSection, paths: PromotePaths) -> dict[str, str]:
    """Where the candidate came from: commit, dvc.lock hashes, dataset digest, Optuna trial, Prefect run."""
    task = params.name
    manifest = Manifest.of(paths.dataset)
    best_path = paths.optimized / "best_params.json"
    best = OptimizeReport.read(best_path) if best_path.is_file() else None
    tags = {
        "git_commit": tracking.git_commit(),
        "task": task,
        "dataset": params.dataset,
        "dataset.test_sha256": manifest.test_sha256,
        "dataset.source_sha256": manifest.source.sha256,
        **tracking.dvc_lineage(f"promote@{task}"),
        **tracking.dvc_lineage(f"finetune@{task}"),
    }
    if best is not None and best.tuned:
        tags.update({"optuna.study": str(best.study), "optuna.trial": str(best.best_trial)})
    if os.environ.get(tracking.FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = os.environ[tracking.FLOW_RUN_ENV]
    return tags


def log_test_dataset(test: pd.DataFrame, dataset_dir: Path, dataset: str) -> str:
    """The frozen test split as an MLflow dataset input of this run; returns its digest."""
    frame = test[["text"] + [c for c in ("label",) if c in test.columns]]
    from mlflow.data.pandas_dataset import from_pandas

    data = from_pandas(frame, name=f"{dataset}-test", source=str(dataset_dir / "test.parquet"))
    mlflow.log_input(data, context="test")
    return data.digest


def validation_passed(report_path: Path, manifest: Manifest) -> bool:
    if not report_path.is_file():
        return False
    report = DatasetValidation.read(report_path)
    return report.success and report.covers(manifest)


@dataclass(frozen=True)
class Comparison:
    """The champion the gate compares with, on the candidate's test examples."""

    version: ModelVersion | None
    evidence: Evidence | None  # on the candidate's split (re-scored there when it was evaluated on another)
    evaluated: Evidence | None  # its own evaluation, on the split it was evaluated on
    served: Any  # its loaded pyfunc (or why it did not load), for the side-by-side latency

    def rescored_primary(self) -> float | None:
        """Its figure re-scored on the candidate's split; None when it was evaluated there."""
        return None if self.evidence is None or self.evidence is self.evaluated else self.evidence.primary

    def note(self) -> list[str]:
        """What a person needs to read the figures: on which split the champion was scored."""
        if self.evidence is None or self.evaluated is None or self.evidence is self.evaluated:
            return []
        now, before = self.evidence.metrics, self.evaluated.metrics
        return [f"note: the champion (version {self.version.version if self.version else '-'}) re-scored on this "
                f"test split: {now.primary_metric} {now.primary:.4f}; {before.primary:.4f} on the split it was "
                f"evaluated on ({before.test_sha256[:12]})"]  # fmt: skip


def champion_on(client: mlflow.MlflowClient, name: str, candidate: Evidence, params: PromoteSection,
                dataset_dir: Path, labels: list[str], test: pd.DataFrame, run_id: str) -> Comparison:  # fmt: skip
    """The champion's evidence on the candidate's test examples: its own, a re-scoring recorded earlier,
    or a re-scoring now (after checking it never trained on those rows), recorded on its version."""
    version = registry.alias_version(client, name, registry.CHAMPION)
    if version is None:
        return Comparison(None, None, None, None)
    evaluated = registry.evidence_of(client, version)
    served = registry.load_pyfunc(name, str(version.version))
    split = candidate.metrics.test_sha256
    if evaluated.metrics.test_sha256 == split:
        return Comparison(version, evaluated, evaluated, served)
    evidence = registry.rescored_evidence(client, version, split, evaluated.is_baseline)
    if evidence is not None and not evidence.same_examples(candidate):
        evidence = None  # re-scored on another part of this split (evaluate.max_test_samples changed): again
    if evidence is None and not isinstance(served, str):
        rescore.check_no_leak(version, dataset_dir)
        evidence = rescore.rescore(served, version, candidate, test, labels, params.prompt_chars, params.evaluate)
        registry.record_rescore(client, version, evidence, run_id)
    return Comparison(version, evidence or evaluated, evaluated, served)


def gate_version(params: PromoteSection, version: str, dataset_dir: Path, validation: Path) -> PromoteReport:
    """Run the gate on an already registered version; move the aliases; record the decision."""
    task = params.name
    name = registry.model_name(params.promote.model_prefix, task)
    client = registry.client()
    manifest = Manifest.of(dataset_dir)
    test = pd.read_parquet(dataset_dir / "test.parquet")
    texts = test["text"].astype(str).tolist()
    with registry.promotion_lock(name), tracking.stage_run("promote", {"task": task, **params.promote.model_dump()},
                                                            item=task, system_metrics=False) as run:  # fmt: skip
        mv = registry.model_version(client, name, str(version))
        version = str(mv.version)
        candidate = registry.evidence_of(client, mv)
        serving_version = registry.alias_version(client, name, registry.CHAMPION)
        if serving_version is not None and str(serving_version.version) == version:
            # Re-running promote on the model that already serves changes nothing.
            return PromoteReport(
                task=task, registered_model=name, version=version, decision="unchanged",
                reasons=[f"version {version} already holds @champion"], checks={}, champion_before=version,
                champion_after=registry.describe(serving_version), mlflow_run_id=run.info.run_id,
            )  # fmt: skip
        # Loaded before anything is recorded: a store that does not answer is exit 75 with no decision.
        served = registry.load_pyfunc(name, version)  # loaded once: the smoke check and the latency timing
        loads = registry.smoke_check(served, f"models:/{name}/{version}", texts[0])
        champion = champion_on(client, name, candidate, params, dataset_dir, manifest.label_set(), test,
                               run.info.run_id)  # fmt: skip
        digest = log_test_dataset(test, dataset_dir, params.dataset)
        latency = None
        if champion.version is not None and loads[0]:
            latency = registry.side_by_side_latency(served, champion.served, texts[: params.promote.latency_samples])
        decision = decide(
            candidate, champion.evidence, params.promote, params.promote.floors.get(task),
            validation_passed(validation, manifest), manifest.test_sha256, loads, latency,
        )  # fmt: skip
        verdict: GateDecision = "pass" if decision.passed else "fail"
        experiment = tracking.dvc_experiment()
        reasons = decision.reasons + champion.note() + (
            [f"held: DVC experiment {experiment!r} is a what-if, so @champion does not move "
             f"(to serve it: lmforge promote --task {task} --version {version})"] if experiment else [])  # fmt: skip
        drift = manifest.drift(params.promote.max_label_share_change)
        report = PromoteReport(
            task=task, registered_model=name, version=version, decision=verdict,
            reasons=reasons, checks=decision.checks,
            champion_before=str(champion.version.version) if champion.version else None,
            champion_after=None,  # below, once the aliases have moved
            improvement=decision.improvement, improvement_lower_bound=decision.improvement_lower_bound,
            candidate_primary=candidate.primary, primary_metric=candidate.metrics.primary_metric,
            champion_primary=(champion.evidence.primary if champion.evidence is not None
                              and champion.evidence.same_examples(candidate) else None),
            mlflow_run_id=run.info.run_id,
            test_sha256=manifest.test_sha256,
            champion_before_primary=champion.evaluated.primary if champion.evaluated else None,
            champion_before_test_sha256=champion.evaluated.metrics.test_sha256 if champion.evaluated else None,
            champion_before_rescored=champion.rescored_primary(),
            data_changes=manifest.changes, label_counts=manifest.labels.counts, drift=drift,
        )  # fmt: skip
        model_card = card.render_or_plain(report.model_copy(update={"reasons": reasons + [f"drift: {line}" for line
                                          in drift]}), candidate.metrics, manifest, mv.tags)  # fmt: skip
        # The decision goes on the version before any alias moves: a crash in between leaves a
        # recorded decision and the old aliases, and a re-run gates again and finishes the move.
        client.set_model_version_tag(name, version, "gate.decision", verdict)
        client.set_model_version_tag(name, version, "gate.reasons", "; ".join(reasons)[:4900])
        client.set_model_version_tag(name, version, "dataset.test_digest", digest)
        client.set_model_version_tag(name, version, "gate.run_id", run.info.run_id)  # its README.md: the model card
        client.set_model_version_tag(name, version, registry.score_tag(manifest.test_sha256),
                                     registry.score_line(candidate.metrics))  # fmt: skip
        if experiment:
            client.set_model_version_tag(name, version, "dvc.experiment", experiment)
        client.update_model_version(name, version, description=card.as_description(model_card, run.info.run_id))
        if decision.passed and not experiment:
            registry.crown(client, name, version)
        elif not candidate.is_baseline:  # @challenger is the trained candidate a person may want to compare
            client.set_registered_model_alias(name, registry.CHALLENGER, version)
        report = report.model_copy(
            update={"champion_after": registry.describe(registry.alias_version(client, name, registry.CHAMPION))}
        )
        mlflow.set_tags({"gate.decision": verdict, "registered_model": name, "model_version": version})
        mlflow.log_dict(report.data(), "promotion.json")
        mlflow.log_text(model_card, "README.md")  # the model card, as the version's description says it
    return report


def run(section: PromoteSection, paths: PromotePaths) -> PromoteReport:
    """Register the task's candidate (reports/optimize/<task>/candidate) and gate it."""
    model = ModelRef.read(paths.optimized / "candidate" / "model.json")
    if Manifest.of(paths.dataset).dataset != section.dataset:
        raise DataError(f"{paths.dataset}: is not dataset {section.dataset!r} (finetune.tasks.{section.name}.dataset)")
    name = registry.model_name(section.promote.model_prefix, section.name)
    client = registry.client()
    lineage = lineage_tags(section, paths)
    # Two promotions at once register each model once (a look-up, then a registration: under the lock).
    # The baseline, re-trained on today's train split, contends first on every run: a champion that new
    # data shows significantly worse than it gives way to it, and the candidate must then beat that.
    with registry.promotion_lock(name):
        mv = registry.register(client, name, model.model_uri, model.run_id,
                               {**lineage, registry.MODEL_KIND_TAG: registry.TRAINED_KIND})  # fmt: skip
        baseline = register_baseline(client, name, paths.optimized / "candidate" / "baseline", lineage)
    first = gate_version(section, baseline, paths.dataset, paths.validation) if baseline else None
    report = gate_version(section, str(mv.version), paths.dataset, paths.validation)
    if first is None:
        return report
    # The run's report speaks of the champion that served when it started: the one the baseline faced.
    started = report if first.decision == "unchanged" else first
    return report.model_copy(update={
        "baseline_version": baseline, "baseline_decision": first.decision, "baseline_reasons": first.reasons,
        "champion_before": started.champion_before, "champion_before_primary": started.champion_before_primary,
        "champion_before_test_sha256": started.champion_before_test_sha256,
        "champion_before_rescored": started.champion_before_rescored,
    })  # fmt: skip


def register_baseline(client: mlflow.MlflowClient, name: str, folder: Path, lineage: dict[str, str]) -> str | None:
    """Register the task's baseline (evaluate's reports/evaluate/<task>/baseline) once per distinct model."""
    if not (folder / "model.json").is_file():
        return None  # scored before evaluate wrote baselines: re-run evaluate to register one
    ref = ModelRef.read(folder / "model.json")
    digest = fingerprint(files_sha256(folder / "model", "*"))  # the same baseline trained again: same version
    found = registry.versions_tagged(client, name, "lmforge.baseline_sha256", digest)
    if found:
        return str(found[0].version)
    tags = {**lineage, registry.MODEL_KIND_TAG: registry.BASELINE_KIND, "lmforge.baseline_sha256": digest}
    return str(registry.register(client, name, ref.model_uri, ref.run_id, tags).version)


def summary(report: PromoteReport, paths: PromotePaths) -> str:
    champion = report.champion_after.version if report.champion_after else "-"
    lines = [f"promote: {report.registered_model} version {report.version}: gate {report.decision.upper()}; "
             f"@champion is version {champion}"]  # fmt: skip
    if report.baseline_version:
        lines.append(f"  baseline: version {report.baseline_version} ({report.baseline_decision})")
    return "\n".join(lines + [f"  {reason}" for reason in report.reasons])


# The whole task: a key a task leaves to its default (prompt_chars) is not in params.yaml for DVC to read.
STAGE = Stage("promote", ("promote", "evaluate", "finetune.tasks.{item}"), section, PromotePaths, run, summary,
              lambda paths: paths.report, item="task")  # fmt: skip
