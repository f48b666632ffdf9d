from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from flows.trials import start_trial_workers
from lmforge import optimize
from lmforge.artifacts import OptimizeReport
from lmforge.params import Params, deep_merge, params_to_dict, parse_params
from lmforge.study import FINISHED, open_study
from tests.conftest import REPO, SmokeRun, paths_for, run_in


def tuning(run: SmokeRun, tmp_path: Path, n_trials: int, **optimize_params) -> Params:
    space = {"learning_rate": {"low": 1e-6, "high": 3e-2, "log": True}}
    overrides = {"n_trials": {"sentiment": n_trials}, "max_steps": 12, "eval_every": 3, "heartbeat_s": 1,
                 "grace_s": 3, "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "search_space": space,
                 **optimize_params}  # fmt: skip
    return parse_params(deep_merge(params_to_dict(run.params), {"optimize": overrides}))


def run_optimize(params: Params, run: SmokeRun, tmp_path: Path,
                 trial_workers: optimize.TrialWorkers | None = None) -> OptimizeReport:  # fmt: skip
    """optimize@sentiment on the smoke run's models, writing under tmp_path; `trial_workers` as the stage's
    command hands them in (flows/trials.py)."""
    paths = dataclasses.replace(paths_for("optimize@sentiment", run.root), out=tmp_path / "out",
                                candidate=tmp_path / "candidate", work=tmp_path / "work",
                                report=tmp_path / "out.json")  # fmt: skip
    report = optimize.run(optimize.STAGE.section(params, "sentiment"), paths, trial_workers)
    optimize.STAGE.write(report, paths)
    return report


def test_workers_beyond_this_process_need_the_stages_command(smoke_evaluated: SmokeRun, tmp_path: Path):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match=r"^optimize.workers: trial workers beyond this process are started by"):
        run_optimize(tuning(smoke_evaluated, tmp_path, n_trials=2, workers=2), smoke_evaluated, tmp_path)


def test_study_prunes_resumes_and_yields_a_scored_candidate(smoke_evaluated: SmokeRun, tmp_path: Path):
    params = tuning(smoke_evaluated, tmp_path, n_trials=8)
    summary = run_optimize(params, smoke_evaluated, tmp_path)
    assert summary.tuned and summary.finished_trials == 8
    trials = json.loads((tmp_path / "out/trials.json").read_text())
    states = [trial["state"] for trial in trials]
    assert "pruned" in states, states  # the median pruner stopped a trial that trailed the others
    pruned = next(trial for trial in trials if trial["state"] == "pruned")
    assert len(pruned["intermediate"]) < 12 // 3  # it stopped before its last evaluation
    best = json.loads((tmp_path / "out/best_params.json").read_text())
    assert set(best["best_params"]) >= {"learning_rate", "batch_size", "dropout"}
    metrics = json.loads((tmp_path / "out/candidate/metrics.json").read_text())
    assert metrics["test_sha256"] == json.loads((smoke_evaluated.raw / "sentiment/manifest.json").read_text())[
        "test_sha256"]  # fmt: skip

    # The candidate is the best trial only if it beats the task's own fine-tune on validation loss:
    # the same (complete) study against a fine-tune made to look unbeatable, then hopeless.
    for finetuned_loss, source in ((0.0, "finetune"), (1e9, "trial")):
        finetuned = tmp_path / f"finetuned-{source}"
        shutil.copytree(smoke_evaluated.root / "models/finetuned/sentiment", finetuned)
        history = json.loads((finetuned / "history.json").read_text())
        flattened = [{**point, "val_loss": finetuned_loss} for point in history]
        (finetuned / "history.json").write_text(json.dumps(flattened))
        report = run_in("optimize@sentiment", params, smoke_evaluated.root, finetuned=finetuned,
                        out=tmp_path / f"out-{source}", candidate=tmp_path / f"candidate-{source}",
                        work=tmp_path / "work", report=tmp_path / f"{source}.json")  # fmt: skip
        assert report.candidate_source == source and report.best_trial == summary.best_trial
        meta = json.loads((tmp_path / f"candidate-{source}/lmforge_task.json").read_text())
        weights = (tmp_path / f"candidate-{source}/model.safetensors").read_bytes()
        if source == "trial":
            assert meta["optuna_trial"] == summary.best_trial
            assert weights == (tmp_path / f"work/trial-{summary.best_trial:03d}/model/model.safetensors").read_bytes()
        else:
            assert meta["optuna_trial"] is None and weights == (finetuned / "model.safetensors").read_bytes()

    # The study is complete but the trial folders are gone (a `dvc exp run --temp` copy, cleared
    # checkpoints): the best trial is trained again from its params, to the same weights.
    trained_first = (tmp_path / f"work/trial-{summary.best_trial:03d}/model/model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "work")
    report = run_in("optimize@sentiment", params, smoke_evaluated.root, finetuned=tmp_path / "finetuned-trial",
                    out=tmp_path / "out-again", candidate=tmp_path / "candidate-again", work=tmp_path / "work",
                    report=tmp_path / "again.json")  # fmt: skip
    assert report.candidate_source == "trial" and report.best_trial == summary.best_trial
    assert (tmp_path / "candidate-again/model.safetensors").read_bytes() == trained_first
    assert len(json.loads((tmp_path / "out-again/trials.json").read_text())) == len(trials)  # no new trial

    again = run_optimize(params, smoke_evaluated, tmp_path)  # the same study, already complete: no new trial
    assert len(json.loads((tmp_path / "out/trials.json").read_text())) == len(trials)
    assert again.best_trial == summary.best_trial
    more = run_optimize(tuning(smoke_evaluated, tmp_path, n_trials=9), smoke_evaluated, tmp_path)
    assert more.study == summary.study and more.finished_trials == 9


def test_a_killed_trial_is_failed_and_retried_never_left_running(smoke_evaluated: SmokeRun, tmp_path: Path):
    params = tuning(smoke_evaluated, tmp_path, n_trials=2, pruner="none",
                    search_space={"learning_rate": {"low": 1e-3, "high": 2e-3, "log": True}})  # fmt: skip
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(params), allow_unicode=True, sort_keys=False))
    run = smoke_evaluated
    root = run.root
    command = [sys.executable, "-m", "stages.optimize", "--params", str(params_file), "--task", "sentiment",
               "--dataset", str(run.raw / "sentiment"), "--tokenized", str(run.processed / "datasets/sentiment"),
               "--base", str(root / "models/pretrained/encoder"),
               "--finetuned", str(root / "models/finetuned/sentiment"),
               "--evaluated", str(root / "reports/evaluate/sentiment"),
               "--out", str(tmp_path / "out"), "--candidate", str(tmp_path / "candidate"),
               "--work", str(tmp_path / "work"), "--report", str(tmp_path / "m.json")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "work").glob("trial-000/checkpoints/step-*")):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    study_name = optimize.study_name(optimize.section(params, "sentiment"), run.raw / "sentiment")
    assert [t.state for t in open_study(params.optimize, study_name).trials] == [optuna.trial.TrialState.RUNNING]
    time.sleep(params.optimize.grace_s + 1)  # the dead trial's heartbeat goes stale

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-1500:]
    trials = open_study(params.optimize, study_name).trials
    states = [t.state for t in trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states
    assert sum(state in FINISHED for state in states) == 2
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == trials[0].number]
    assert retried and retried[0].params == trials[0].params  # the same params, tried again


@pytest.mark.parametrize("n_trials", [0])
def test_an_untuned_task_passes_its_fine_tuned_model_on(smoke_evaluated: SmokeRun, tmp_path: Path, n_trials: int):
    summary = run_optimize(tuning(smoke_evaluated, tmp_path, n_trials=n_trials), smoke_evaluated, tmp_path)
    assert summary == OptimizeReport(task="sentiment", tuned=False, n_trials=0, best_params={})
    source = smoke_evaluated.root / "reports/evaluate/sentiment"
    assert (tmp_path / "out/candidate/model.json").read_text() == (source / "model.json").read_text()


def test_two_workers_share_one_postgresql_study_and_reach_n_trials_exactly(
    smoke_evaluated: SmokeRun, tmp_path: Path, postgres_url: str
):
    params = tuning(smoke_evaluated, tmp_path, n_trials=4, workers=2, pruner="none", storage=postgres_url,
                    max_steps=40, eval_every=20)  # trials long enough for both workers to take some  # fmt: skip
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(params), allow_unicode=True, sort_keys=False))
    run = smoke_evaluated
    summary = run_optimize(params, run, tmp_path, start_trial_workers)
    trials = open_study(params.optimize, summary.study).trials
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 4 and len({t.number for t in finished}) == 4
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len({t.user_attrs["worker_pid"] for t in finished}) == 2  # both processes ran trials
