"""optimize: an Optuna study over a fine-tuning task's hyperparameters -> the candidate for promotion.

Writes reports/optimize/<task>/best_params.json and trials.json, the best trial's model to
models/candidates/<task>/, and that model scored on the frozen test split by the evaluate stage's
own code into reports/optimize/<task>/candidate/. Each trial is a nested MLflow run under the
study's run. With `optimize.n_trials.<task>: 0` the fine-tuned model is the candidate as it is.

This module holds the study's protocol; trials run in this process (`optimize.workers: 1`), or in N
workers on one study that flows/trials.py starts and the stage's command hands in (`TrialWorkers`):
local processes, or flow runs of lmforge-stage/<pool> on a work pool (`optimize.worker_pool`), the dispatch
routed stages use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna

from lmforge import tracking
from lmforge.artifacts import FinetuneReport, Manifest, OptimizeReport, TaskMeta, TrainingHistory
from lmforge.errors import LmforgeError
from lmforge.io import atomic_output_dir, fingerprint, sha256_file, write_json
from lmforge.params import Params
from lmforge.schema import EvaluateParams, FinetuneTask, OptimizeParams, Section
from lmforge.stage import Stage, dep, item_of, output, scratch
from lmforge.study import FINISHED, finished_trials, open_study, pruning_hook, storage_url, suggest

ACTIVE = (*FINISHED, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
TRIAL_MODEL_ARTIFACT = "model"  # where a remote worker logs a completed trial's model in the trial's run


@dataclass(frozen=True)
class OptimizePaths:
    dataset: Path = dep("data/raw/<dataset>: the task's splits and manifest")
    tokenized: Path = dep("data/processed/datasets/<dataset>: the dataset tokenized by preprocess")
    base: Path = dep("models/pretrained/<base>: the model trials start from")
    finetuned: Path = dep("models/finetuned/<task>: the candidate when no trial beats it")
    evaluated: Path = dep("reports/evaluate/<task>: its scores on the frozen test split")
    out: Path = output("reports/optimize/<task>: best_params.json, trials.json, candidate/ (the candidate's scores)")
    candidate: Path = output("models/candidates/<task>: the candidate model")
    work: Path = scratch("checkpoints/optimize/<task>: a folder per trial")
    report: Path = output("reports/optimize/<task>.json")


class OptimizeSection(Section):
    """What one optimize@<task> stage reads of params.yaml."""

    name: str
    seed: int  # finetune.seed
    task: FinetuneTask
    optimize: OptimizeParams
    evaluate: EvaluateParams

    @property
    def n_trials(self) -> int:
        return self.optimize.n_trials.get(self.name, 0)


def section(params: Params, item: str | None) -> OptimizeSection:
    task = item_of(params.finetune.tasks, item, "finetune.tasks")
    return OptimizeSection(name=str(item), seed=params.finetune.seed, task=task, optimize=params.optimize,
                           evaluate=params.evaluate)  # fmt: skip


def study_name(params: OptimizeSection, dataset_dir: Path) -> str:
    """Same task, search space and data -> same study, so a re-run continues it."""
    space = params.optimize.model_dump(
        exclude={"n_trials", "timeout_s", "storage", "heartbeat_s", "grace_s", "workers", "worker_pool"}
    )
    files = Manifest.of(dataset_dir).files
    return f"lmforge-{params.name}-{fingerprint(params.task.model_dump(), space, params.seed, files)}"


class SlotTaken(Exception):
    """Another worker started the last trial this study needed."""


def work_on_study(study: optuna.Study, params: OptimizeSection, paths: OptimizePaths,
                  log_models: bool = False) -> list[int]:  # fmt: skip
    """Run trials of the task's study until n_trials have finished, in this process; return the trials run here.

    Each trial is a nested MLflow run under the active run (the study's run). Any number of
    processes may do this at once against one storage: each trial first checks that it is within
    the first n_trials live trials, so the count is reached exactly. `log_models` also logs each
    completed trial's model to its run, for workers whose disk the stage cannot read.
    """
    task, n_trials = params.name, params.n_trials
    trained: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ranked = sorted(t.number for t in study.get_trials(deepcopy=False, states=ACTIVE))
        if ranked.index(trial.number) >= n_trials:
            study.stop()
            raise SlotTaken(f"trial {trial.number}: n_trials={n_trials} already taken by other workers")
        updates, dropout = suggest(trial, params.optimize, params.task)
        trial_dir = paths.work / f"trial-{trial.number:03d}"
        tags = {"stage": "optimize", "task": task, "optuna.study": study.study_name, "optuna.trial": str(trial.number)}
        with mlflow.start_run(run_name=f"trial {trial.number}", nested=True, tags=tags) as run:
            mlflow.log_params({f"trial.{key}": value for key, value in trial.params.items()})
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            trial.set_user_attr("model_dir", str(trial_dir / "model"))
            trial.set_user_attr("worker_pid", os.getpid())
            try:
                report = train_trial(params, paths, trial_dir, updates, dropout, on_eval=pruning_hook(trial))
            except optuna.TrialPruned:
                mlflow.set_tag("optuna.state", "pruned")
                raise
            except Exception:
                mlflow.set_tag("optuna.state", "failed")
                raise
            mlflow.set_tag("optuna.state", "complete")
            trial.set_user_attr("model_sha256", sha256_file(trial_dir / "model" / "model.safetensors"))
            if log_models:
                mlflow.log_artifacts(str(trial_dir / "model"), TRIAL_MODEL_ARTIFACT)
            trained.append(trial.number)
            return report.val_loss

    if finished_trials(study) < n_trials:
        study.optimize(
            objective,
            timeout=params.optimize.timeout_s,
            callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)],
            catch=(SlotTaken,),
        )
    return trained


def train_trial(params: OptimizeSection, paths: OptimizePaths, trial_dir: Path, updates: dict[str, Any],
                dropout: float | None, on_eval: Callable[[float], None] | None = None) -> FinetuneReport:  # fmt: skip
    """Fine-tune the task with a trial's updates into trial_dir/model, logging to the active MLflow run."""
    from lmforge.task_training import TaskFolders, train_task  # torch: only where trials train

    folders = TaskFolders(
        paths.dataset, paths.tokenized, paths.base, out=trial_dir / "model", checkpoints=trial_dir / "checkpoints"
    )
    return train_task(params.name, params.task.model_copy(update=updates), params.seed, folders, on_eval, dropout)


def worker_main(params: OptimizeSection, paths: OptimizePaths, study_run_id: str,
                log_models: bool = False) -> list[int]:  # fmt: skip
    """A trial worker: join the study and its MLflow run, and work until the study has n_trials."""
    tracking.setup()
    study = open_study(params.optimize, study_name(params, paths.dataset))
    with mlflow.start_run(run_id=study_run_id):
        return work_on_study(study, params, paths, log_models)


TrialWorkers = Callable[[OptimizeSection, OptimizePaths, str], None]
"""Starts the study's trial workers elsewhere than this process (given the study's MLflow run id, which
their trial runs nest under) and waits for them: spawned processes or Prefect flow runs (flows/trials.py)."""


def run_study(params: OptimizeSection, paths: OptimizePaths,
              trial_workers: TrialWorkers | None = None) -> tuple[optuna.Study, str]:  # fmt: skip
    """The study under its own MLflow run; return it and the run id. One worker trains the trials in this
    process; more (`optimize.workers`, `optimize.worker_pool`) are started by `trial_workers`."""
    settings = params.optimize
    with tracking.stage_run("optimize", {"task": params.name, **settings.model_dump(exclude={"storage"})},
                            item=params.name) as parent:  # fmt: skip
        name = study_name(params, paths.dataset)
        mlflow.set_tags({"optuna.study": name, "optuna.storage": storage_url(settings).split("://")[0]})
        study = open_study(settings, name)  # created once, before workers race to create it
        if settings.workers == 1 and not settings.worker_pool:
            work_on_study(study, params, paths)
        elif trial_workers is None:
            raise LmforgeError("optimize.workers: trial workers beyond this process are started by the optimize "
                               "stage's command (python -m stages.optimize)")  # fmt: skip
        else:
            trial_workers(params, paths, parent.info.run_id)
        log_study(study)
    return study, parent.info.run_id


def trial_model(trial: optuna.trial.FrozenTrial, work_dir: Path, retrain: Callable[[], Path] | None = None) -> Path:
    """The trial's model folder: where it was trained, or, for a worker elsewhere, from its MLflow run,
    or else trained again from the trial's params by `retrain` (without one: an error).

    A local folder counts only if its weights are the trial's own (by sha256): trial folders are
    named by number, so one here may hold another study's trial of the same number. The study lives
    in the repository's optuna.db, its trial folders in one checkout's checkpoints/: a `dvc exp run
    --temp` copy, or a checkout whose checkpoints were cleared, finds the study complete and the
    folders gone.
    """

    def holds_the_trial(folder: Path) -> bool:
        weights, expected = folder / "model.safetensors", trial.user_attrs.get("model_sha256")
        if not weights.is_file():
            return False
        return expected is None or sha256_file(weights) == expected  # None: a trial from before the hash

    trained_at = Path(trial.user_attrs["model_dir"])
    if holds_the_trial(trained_at):
        return trained_at
    target = work_dir / f"trial-{trial.number:03d}-from-mlflow"
    shutil.rmtree(target, ignore_errors=True)
    with contextlib.suppress(Exception):  # not logged (a local worker's trial): reported below
        mlflow.artifacts.download_artifacts(run_id=trial.user_attrs["mlflow_run_id"],
                                            artifact_path=TRIAL_MODEL_ARTIFACT, dst_path=str(target))  # fmt: skip
    if holds_the_trial(target / TRIAL_MODEL_ARTIFACT):
        return target / TRIAL_MODEL_ARTIFACT
    where = f"neither in {trained_at} nor in its MLflow run {trial.user_attrs['mlflow_run_id']}"
    if retrain is None:
        raise LmforgeError(f"optimize: the model of trial {trial.number} is {where} "
                           "(only flow-run workers log their models)")  # fmt: skip
    print(f"optimize: the model of trial {trial.number} is {where}: training it again from its params",
          file=sys.stderr)  # fmt: skip
    retrained = retrain()
    if not holds_the_trial(retrained):  # the same params and seed, another machine's arithmetic
        print(f"optimize: trial {trial.number} trained again differs from its first training (another CPU or "
              "GPU rounds differently); the candidate is scored as it is now", file=sys.stderr)  # fmt: skip
    return retrained


def retrain_trial(trial: optuna.trial.FrozenTrial, params: OptimizeSection, paths: OptimizePaths,
                  study_run_id: str) -> Path:  # fmt: skip
    """Train a finished trial again from its params (same seed: the same model on the same machine)
    into work/trial-NNN-retrained, as a nested run of the study's MLflow run; return its model folder."""
    updates, dropout = suggest(optuna.trial.FixedTrial(trial.params), params.optimize, params.task)
    trial_dir = paths.work / f"trial-{trial.number:03d}-retrained"
    tags = {"stage": "optimize", "task": params.name, "optuna.trial": str(trial.number), "optuna.retrained": "true"}
    with mlflow.start_run(run_id=study_run_id), mlflow.start_run(run_name=f"trial {trial.number} (trained again)",
                                                                 nested=True, tags=tags):  # fmt: skip
        train_trial(params, paths, trial_dir, updates, dropout)
    return trial_dir / "model"


def log_study(study: optuna.Study) -> None:
    """Best params and value, trial counts, and the optimization-history and importance plots."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    states = [trial.state.name.lower() for trial in study.trials]
    mlflow.log_metrics({f"trials_{state}": float(states.count(state)) for state in set(states)})
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    mlflow.log_params({f"best.{key}": value for key, value in study.best_params.items()})
    mlflow.log_metric("best_val_loss", study.best_value)
    mlflow.log_figure(plot_optimization_history(study).figure, "optimization_history.png")
    if len(complete) >= 2:
        mlflow.log_figure(plot_param_importances(study).figure, "param_importances.png")


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    return [
        {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
         "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
         "mlflow_run_id": t.user_attrs.get("mlflow_run_id")}
        for t in study.trials
    ]  # fmt: skip


def pass_on_finetuned(paths: OptimizePaths, report: OptimizeReport, trials: list[dict[str, Any]]) -> None:
    """The task's own fine-tuned model is the candidate, already scored and logged by the evaluate stage."""
    with atomic_output_dir(paths.candidate) as staging:
        shutil.copytree(paths.finetuned, staging, dirs_exist_ok=True)
    with atomic_output_dir(paths.out) as staging:
        shutil.copytree(paths.evaluated, staging / "candidate")
        report.write_into(staging / "best_params.json")
        write_json(staging / "trials.json", trials)


def run(section: OptimizeSection, paths: OptimizePaths, trial_workers: TrialWorkers | None = None) -> OptimizeReport:
    """Tune the task's hyperparameters; the best trial, or the fine-tuned model, is the candidate."""
    from lmforge.scoring import evaluate_model

    task, n_trials = section.name, section.n_trials
    if n_trials == 0:
        report = OptimizeReport(task=task, tuned=False, n_trials=0, best_params={})
        pass_on_finetuned(paths, report, [])
        return report

    study, run_id = run_study(section, paths, trial_workers)
    if not [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]:
        raise LmforgeError(f"optimize: study {study.study_name} has no completed trial (all pruned or failed)")
    best = study.best_trial
    finetuned_loss = TrainingHistory.read(paths.finetuned / "history.json").best_val_loss
    assert best.value is not None  # a complete trial has a value
    report = OptimizeReport(
        task=task, tuned=True, study=study.study_name, n_trials=n_trials, finished_trials=finished_trials(study),
        best_trial=best.number, best_val_loss=best.value, best_params=best.params, mlflow_run_id=run_id,
        trial_mlflow_run_id=best.user_attrs["mlflow_run_id"], finetuned_val_loss=finetuned_loss,
        candidate_source="trial" if best.value < finetuned_loss else "finetune",
    )  # fmt: skip
    if report.candidate_source == "finetune":
        # Trials train on a smaller budget; when none beats the task's own fine-tune on validation
        # loss, the fine-tuned model stays the candidate (already scored by the evaluate stage).
        pass_on_finetuned(paths, report, trials_table(study))
        return report
    with atomic_output_dir(paths.candidate) as staging:
        model = trial_model(best, paths.work, retrain=lambda: retrain_trial(best, section, paths, run_id))
        shutil.copytree(model, staging, dirs_exist_ok=True)
        meta = TaskMeta.read(staging / "lmforge_task.json")
        meta.model_copy(update={"optuna_study": study.study_name, "optuna_trial": best.number}).write_into(
            staging / "lmforge_task.json"
        )
    with atomic_output_dir(paths.out) as staging:
        evaluate_model(section.evaluate, task, paths.candidate, paths.dataset, staging / "candidate")
        report.write_into(staging / "best_params.json")
        write_json(staging / "trials.json", trials_table(study))
    return report


def summary(report: OptimizeReport, paths: OptimizePaths) -> str:
    if not report.tuned:
        return (f"optimize: {report.task}: not tuned (optimize.n_trials.{report.task} is 0); the fine-tuned model "
                "is the candidate")  # fmt: skip
    source = "best trial" if report.candidate_source == "trial" else "fine-tuned model"
    return (f"optimize: {report.task}: best trial {report.best_trial} of {report.finished_trials} "
            f"(val loss {report.best_val_loss:.4f}) {report.best_params}; the candidate is the {source} "
            f"(fine-tune val loss {report.finetuned_val_loss:.4f})")  # fmt: skip


STAGE = Stage("optimize", ("optimize", "finetune.seed", "finetune.tasks.{item}", "evaluate"), section, OptimizePaths,
              run, summary, lambda paths: paths.report, item="task")  # fmt: skip
