"""What the pruner saves: the same Optuna study of a fine-tuning task with and without pruning.

Runs the smoke profile's stages into a temporary folder, on more of the sentiment reviews than smoke
takes (--rows, validation loss on --eval-samples of them), then the optimize stage of --task twice,
same seed, same number of trials and steps per trial: once with `optimize.pruner` percentile (the
default; --pruner median or hyperband), once with none. Counts the training steps every trial ran (its
evaluations x eval_every) and the steps until the study's best value was first reached. Prints a
table and writes bench/results/hpo_pruning_<task>_<pruner>.json.

The task is continuation by default: its validation loss falls from the first step, so the curves
the pruner compares carry signal. Smoke sentiment trials sit at chance (validation loss 0.69) for
all of their 60 steps, with the smoke set's 32 validation reviews or 400: pruning them prunes noise.

    python -m bench.hpo_pruning [--task continuation] [--trials 24] [--max-steps 60] [--eval-every 10] [--seed 1234]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from bench.machine import describe
from lmforge.params import deep_merge, params_to_dict, parse_params, profile_params
from lmforge.stage import dvc_commands, parse_command, roles

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def run_stage(address: str, params: Any, root: Path, commands: dict[str, str], outputs: str = "") -> Any:
    """A stage's core, in this process, on dvc.yaml's layout moved under `root` (its outputs and scratch
    folders under root/outputs, so two studies never share trial checkpoints)."""
    stage, _, paths = parse_command(address, commands[address])
    moved = {name: REPO if role == "base" else root / (outputs if role in ("out", "scratch") else "") /
             getattr(paths, name) for name, role in roles(type(paths)).items()}  # fmt: skip
    paths = dataclasses.replace(paths, **moved)
    report = stage.run(stage.section(params, address.partition("@")[2] or None), paths)
    stage.write(report, paths)
    return report


def study_steps(storage: str, eval_every: int) -> dict[str, Any]:
    """Steps each trial trained (evaluations x eval_every), and the steps spent until the best value."""
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials = sorted(study.trials, key=lambda trial: trial.number)
    steps = [len(trial.intermediate_values) * eval_every for trial in trials]
    best = study.best_trial
    return {
        "trials": len(trials),
        "pruned": sum(1 for trial in trials if trial.state == optuna.trial.TrialState.PRUNED),
        "steps": sum(steps),
        "steps_to_best": sum(steps[: best.number + 1]),
        "best_value": best.value,
        "best_trial": best.number,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--pruner", default="percentile", help="optimize.pruner to set against none")
    parser.add_argument("--seed", type=int, default=1234, help="the TPE sampler's seed (optimize.seed)")
    parser.add_argument("--task", default="continuation", help="the finetune task to tune")
    parser.add_argument("--rows", type=int, default=4000, help="sentiment reviews ingested (all split from these)")
    parser.add_argument("--eval-samples", type=int, default=400, help="validation examples each trial is scored on")
    args = parser.parse_args()
    commands = dvc_commands(REPO)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        smoke = deep_merge(params_to_dict(profile_params("smoke")), {
            "ingest": {"datasets": {"sentiment": {"max_rows": args.rows}}},
            "finetune": {"tasks": {args.task: {"training": {"max_train_samples": None,
                                                            "max_eval_samples": args.eval_samples}}}},
        })  # fmt: skip
        data_params = parse_params(smoke)
        base = data_params.finetune.tasks[args.task].base
        for address in ("ingest", "validate", "preprocess", f"pretrain@{base}", f"finetune@{args.task}"):
            run_stage(address, data_params, root, commands)
        for pruner in (args.pruner, "none"):
            storage = f"sqlite:///{root / f'optuna-{pruner}.db'}"
            params = parse_params(deep_merge(smoke, {"optimize": {
                "pruner": pruner, "storage": storage, "seed": args.seed, "n_trials": {args.task: args.trials},
                "max_steps": args.max_steps, "eval_every": args.eval_every}}))  # fmt: skip
            started = time.perf_counter()
            run_stage(f"optimize@{args.task}", params, root, commands, outputs=pruner)
            rows.append({"pruner": pruner, "seconds": round(time.perf_counter() - started, 1),
                         **study_steps(storage, args.eval_every)})  # fmt: skip
    pruned, plain = rows
    saved = 1 - pruned["steps"] / plain["steps"]
    print(f"{'pruner':<10} {'trials':>6} {'pruned':>6} {'steps':>6} {'to best':>8} "
          f"{'best val loss':>14} {'seconds':>8}")  # fmt: skip
    for row in rows:
        print(f"{row['pruner']:<10} {row['trials']:>6} {row['pruned']:>6} {row['steps']:>6} {row['steps_to_best']:>8} "
              f"{row['best_value']:>14.4f} {row['seconds']:>8}")  # fmt: skip
    print(f"the pruner saved {saved:.0%} of the trial steps; best value {pruned['best_value']:.4f} against "
          f"{plain['best_value']:.4f} without it")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"hpo_pruning_{args.task}_{args.pruner}.json").write_text(json.dumps(
        {"machine": describe(), "task": args.task, "seed": args.seed, "sentiment_rows": args.rows,
         "eval_samples": args.eval_samples, "trials": args.trials, "max_steps": args.max_steps,
         "eval_every": args.eval_every, "rows": rows, "steps_saved": saved}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
