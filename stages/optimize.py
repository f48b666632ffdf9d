"""optimize: an Optuna study over a fine-tuning task's hyperparameters -> the candidate for promotion.

Writes reports/optimize/<task>/best_params.json and trials.json, the best trial's model to
models/candidates/<task>/, and that model scored on the frozen test split by the evaluate stage's
own code into reports/optimize/<task>/candidate/. Each trial is a nested MLflow run under the
study's run. With `optimize.n_trials.<task>: 0` the fine-tuned model is the candidate as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna

from lmforge import tracking
from lmforge.errors import LmforgeError, run_main
from lmforge.io import atomic_output_dir, fingerprint, read_json, sha256_file, write_json, write_json_atomic
from lmforge.optimization import FINISHED, finished_trials, open_study, pruning_hook, storage_url, suggest
from lmforge.params import Params, load_params

ACTIVE = (*FINISHED, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
STUDY_RUN_ENV = "LMFORGE_STUDY_RUN_ID"
TRIAL_MODEL_ARTIFACT = "model"  # where a remote worker logs a completed trial's model in the trial's run


class SlotTaken(Exception):
    """Another worker started the last trial this study needed."""


def study_name(params: Params, task: str, raw: Path) -> str:
    """Same task, search space and data -> same study, so a re-run continues it."""
    spec = params.finetune.tasks[task]
    space = params.optimize.model_dump(
        exclude={"n_trials", "timeout_s", "storage", "heartbeat_s", "grace_s", "workers", "worker_deployment"}
    )
    files = read_json(raw / spec.dataset / "manifest.json")["files"]
    return f"lmforge-{task}-{fingerprint(spec.model_dump(), space, params.finetune.seed, files)}"


@dataclass(frozen=True)
class TrialPaths:
    """Where trials read their inputs and write their models; what a worker process needs to know."""

    params: Path
    raw: Path
    processed: Path
    pretrained: Path
    work: Path


def work_on_study(study: optuna.Study, params: Params, task: str, paths: TrialPaths, n_trials: int,
                  log_models: bool = False) -> list[int]:  # fmt: skip
    """Run trials of the task's study until n_trials have finished, in this process; return the trials run here.

    Each trial is a nested MLflow run under the active run (the study's run). Any number of
    processes may do this at once against one storage: each trial first checks that it is within
    the first n_trials live trials, so the count is reached exactly. `log_models` also logs each
    completed trial's model to its run, for workers whose disk the stage cannot read.
    """
    from stages.finetune import train_task  # torch and transformers: only where trials train

    spec = params.finetune.tasks[task]
    trained: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ranked = sorted(t.number for t in study.get_trials(deepcopy=False, states=ACTIVE))
        if ranked.index(trial.number) >= n_trials:
            study.stop()
            raise SlotTaken(f"trial {trial.number}: n_trials={n_trials} already taken by other workers")
        updates, dropout = suggest(trial, params.optimize, spec)
        trial_dir = paths.work / f"trial-{trial.number:03d}"
        tags = {"stage": "optimize", "task": task, "optuna.study": study.study_name, "optuna.trial": str(trial.number)}
        with mlflow.start_run(run_name=f"trial {trial.number}", nested=True, tags=tags) as run:
            mlflow.log_params({f"trial.{key}": value for key, value in trial.params.items()})
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            trial.set_user_attr("model_dir", str(trial_dir / "model"))
            trial.set_user_attr("worker_pid", os.getpid())
            try:
                metrics = train_task(spec.model_copy(update=updates), task, params.finetune.seed, paths.raw,
                                     paths.processed, paths.pretrained, trial_dir / "model", trial_dir / "checkpoints",
                                     on_eval=pruning_hook(trial), dropout=dropout)  # fmt: skip
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
            return metrics["val_loss"]

    if finished_trials(study) < n_trials:
        study.optimize(
            objective,
            timeout=params.optimize.timeout_s,
            callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)],
            catch=(SlotTaken,),
        )
    return trained


def run_worker_processes(count: int, task: str, paths: TrialPaths, study_run_id: str) -> None:
    """`count` local processes working on the same study (their trial runs nest under the study's run)."""
    command = [sys.executable, "-m", "stages.optimize", "--worker", "--task", task, "--params", str(paths.params),
               "--raw", str(paths.raw), "--processed", str(paths.processed), "--pretrained", str(paths.pretrained),
               "--work", str(paths.work)]  # fmt: skip
    env = {**os.environ, STUDY_RUN_ENV: study_run_id}
    workers = [subprocess.Popen(command, env=env) for _ in range(count)]
    codes = [worker.wait() for worker in workers]
    if any(codes):
        raise LmforgeError(f"optimize: {sum(1 for c in codes if c)} trial worker(s) failed (exit codes {codes})")


def run_worker_flow_runs(deployment: str, count: int, task: str, paths: TrialPaths, study_run_id: str) -> None:
    """`count` runs of the trial-worker deployment on its Prefect work pool (flows/trials.py)."""
    from flows.trials import run_trial_workers

    print(f"optimize: {count} runs of {deployment} wait for a worker on its pool (`prefect worker start --pool ...`)")
    parameters = {"task": task, "study_run_id": study_run_id, "params_path": str(paths.params),
                  "raw": str(paths.raw), "processed": str(paths.processed), "pretrained": str(paths.pretrained),
                  "work": str(paths.work)}  # fmt: skip
    states = run_trial_workers(deployment, count, parameters)
    failed = {run: state for run, state in states.items() if state != "COMPLETED"}
    if failed:
        raise LmforgeError(f"optimize: {len(failed)} trial worker flow run(s) of {deployment} failed: {failed}")


def run_study(params: Params, task: str, paths: TrialPaths, n_trials: int) -> tuple[optuna.Study, str]:
    """The study under its own MLflow run, with `optimize.workers` processes; return it and the run id."""
    with tracking.stage_run("optimize", {"task": task, **params.optimize.model_dump(exclude={"storage"})},
                            task=task) as parent:  # fmt: skip
        name = study_name(params, task, paths.raw)
        mlflow.set_tags({"optuna.study": name, "optuna.storage": storage_url(params.optimize).split("://")[0]})
        study = open_study(params.optimize, name)  # created once, before workers race to create it
        workers, deployment = params.optimize.workers, params.optimize.worker_deployment
        if deployment:
            run_worker_flow_runs(deployment, workers, task, paths, parent.info.run_id)
        elif workers == 1:
            work_on_study(study, params, task, paths, n_trials)
        else:  # N worker processes that start together, so the trials spread over all of them
            run_worker_processes(workers, task, paths, parent.info.run_id)
        log_study(study)
    return study, parent.info.run_id


def worker_main(params: Params, task: str, paths: TrialPaths, log_models: bool = False) -> list[int]:
    """A trial worker: join the study run named by the environment and work until n_trials are done."""
    tracking.setup()
    study = open_study(params.optimize, study_name(params, task, paths.raw))
    with mlflow.start_run(run_id=os.environ[STUDY_RUN_ENV]):
        return work_on_study(study, params, task, paths, params.optimize.n_trials.get(task, 0), log_models)


def trial_model(trial: optuna.trial.FrozenTrial, work_dir: Path) -> Path:
    """The trial's model folder: where it was trained, or, for a worker elsewhere, from its MLflow run.

    A local folder counts only if its weights are the trial's own (by sha256): trial folders are
    named by number, so one here may hold another study's trial of the same number.
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
    if not holds_the_trial(target / TRIAL_MODEL_ARTIFACT):
        run_id = trial.user_attrs["mlflow_run_id"]
        raise LmforgeError(f"optimize: the model of trial {trial.number} is neither in {trained_at} nor in its "
                           f"MLflow run {run_id} (only flow-run workers log their models)")  # fmt: skip
    return target / TRIAL_MODEL_ARTIFACT


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


def run(params: Params, task: str, raw: Path, processed: Path, pretrained: Path, finetuned: Path, evaluated: Path,
        out_dir: Path, candidate_dir: Path, work_dir: Path,
        params_path: Path = Path("params.yaml")) -> dict[str, Any]:  # fmt: skip
    if task not in params.finetune.tasks:
        raise LmforgeError(f"finetune.tasks: no task named {task!r} (have: {', '.join(params.finetune.tasks)})")
    n_trials = params.optimize.n_trials.get(task, 0)
    if n_trials == 0:
        summary = {"task": task, "tuned": False, "n_trials": 0, "best_params": {}}
        with atomic_output_dir(candidate_dir) as staging:
            shutil.copytree(finetuned, staging, dirs_exist_ok=True)
        with atomic_output_dir(out_dir) as staging:
            shutil.copytree(evaluated, staging / "candidate")  # the same model, already scored and logged
            write_json(staging / "best_params.json", summary)
            write_json(staging / "trials.json", [])
        return summary

    paths = TrialPaths(params_path, raw, processed, pretrained, work_dir)
    study, run_id = run_study(params, task, paths, n_trials)
    if not [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]:
        raise LmforgeError(f"optimize: study {study.study_name} has no completed trial (all pruned or failed)")
    best = study.best_trial
    finetuned_loss = min(point["val_loss"] for point in read_json(finetuned / "history.json"))
    summary = {
        "task": task, "tuned": True, "study": study.study_name, "n_trials": n_trials,
        "finished_trials": finished_trials(study), "best_trial": best.number, "best_val_loss": best.value,
        "best_params": best.params, "mlflow_run_id": run_id, "trial_mlflow_run_id": best.user_attrs["mlflow_run_id"],
        "finetuned_val_loss": finetuned_loss,
        "candidate_source": "trial" if best.value < finetuned_loss else "finetune",
    }  # fmt: skip
    if summary["candidate_source"] == "finetune":
        # Trials train on a smaller budget; when none beats the task's own fine-tune on validation
        # loss, the fine-tuned model stays the candidate (already scored by the evaluate stage).
        with atomic_output_dir(candidate_dir) as staging:
            shutil.copytree(finetuned, staging, dirs_exist_ok=True)
        with atomic_output_dir(out_dir) as staging:
            shutil.copytree(evaluated, staging / "candidate")
            write_json(staging / "best_params.json", summary)
            write_json(staging / "trials.json", trials_table(study))
        return summary
    with atomic_output_dir(candidate_dir) as staging:
        shutil.copytree(trial_model(best, work_dir), staging, dirs_exist_ok=True)
        meta = read_json(staging / "lmforge_task.json")
        write_json(staging / "lmforge_task.json", {**meta, "optuna_study": study.study_name,
                                                   "optuna_trial": best.number})  # fmt: skip
    from stages import evaluate

    with atomic_output_dir(out_dir) as staging:
        evaluate.run(params.evaluate, task, candidate_dir, raw, staging / "candidate")
        write_json(staging / "best_params.json", summary)
        write_json(staging / "trials.json", trials_table(study))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--task", required=True)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--finetuned", type=Path, help="default: models/finetuned/<task>")
    parser.add_argument("--evaluated", type=Path, help="default: reports/eval/<task>")
    parser.add_argument("--out", type=Path, help="default: reports/optimize/<task>")
    parser.add_argument("--candidate", type=Path, help="default: models/candidates/<task>")
    parser.add_argument("--work", type=Path, help="default: checkpoints/optimize/<task>")
    parser.add_argument("--metrics", type=Path, help="default: reports/optimize/<task>.json")
    parser.add_argument("--worker", action="store_true", help="only run trials (spawned by optimize.workers > 1)")
    args = parser.parse_args()
    params = load_params(args.params)
    task = args.task
    if args.worker:
        paths = TrialPaths(args.params, args.raw, args.processed, args.pretrained,
                           args.work or Path("checkpoints/optimize") / task)  # fmt: skip
        worker_main(params, task, paths)
        return
    summary = run(
        params, task, args.raw, args.processed, args.pretrained,
        args.finetuned or Path("models/finetuned") / task, args.evaluated or Path("reports/eval") / task,
        args.out or Path("reports/optimize") / task, args.candidate or Path("models/candidates") / task,
        args.work or Path("checkpoints/optimize") / task, args.params,
    )  # fmt: skip
    write_json_atomic(args.metrics or Path("reports/optimize") / f"{task}.json", summary)
    if summary["tuned"]:
        print(f"optimize: {task}: best trial {summary['best_trial']} of {summary['finished_trials']} "
              f"(val loss {summary['best_val_loss']:.4f}) {summary['best_params']}; the candidate is the "
              f"{'best trial' if summary['candidate_source'] == 'trial' else 'fine-tuned model'} "
              f"(fine-tune val loss {summary['finetuned_val_loss']:.4f})")  # fmt: skip
    else:
        print(f"optimize: {task}: not tuned (optimize.n_trials.{task} is 0); the fine-tuned model is the candidate")


if __name__ == "__main__":
    run_main(main)
