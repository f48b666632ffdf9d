"""Optuna pieces of the optimize stage: the study, its storage, and a trial's fine-tuning params.

The study lives in an RDB storage (SQLite here by default, PostgreSQL for many workers) with a
heartbeat: a trial whose process died stops beating, is marked FAIL the next time any worker asks
for a trial, and is retried once with the same params. Stopping is by count of finished trials
(complete + pruned), so several workers on one storage reach n_trials exactly, and a re-run only
runs what is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from lmforge import tracking
from lmforge.errors import LmforgeError, TransientError
from lmforge.schema import FinetuneTask, OptimizeParams

STORAGE_ENV = "LMFORGE_OPTUNA_STORAGE"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_url(params: OptimizeParams) -> str:
    url = os.environ.get(STORAGE_ENV) or params.storage or f"sqlite:///{tracking.repo_root() / 'optuna.db'}"
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the driver installed here is psycopg2.
    return "postgresql+psycopg2://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def open_study(params: OptimizeParams, study_name: str) -> optuna.Study:
    """Create the study, or load it to continue where it stopped."""
    url = storage_url(params)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(
            url,
            # SQLite: concurrent workers wait for the write lock instead of failing at once.
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
            heartbeat_interval=params.heartbeat_s,
            grace_period=params.grace_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
        )
    except Exception as error:  # SQLAlchemy raises per driver; the user needs which storage and why
        scheme = url.split("://")[0]
        reason = " ".join(str(error).split("\n")[0].split())[:160]
        message = f"optimize.storage: cannot open the {scheme} study storage ({reason})"
        # A database that does not answer (down, unreachable, refusing connections) may answer later:
        # transient. A URL it cannot use (unknown scheme, no driver, a bad path) is the user's to fix.
        refused = re.search(r"does not exist|authentication failed|no password|permission denied", str(error), re.I)
        unreachable = sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError | TimeoutError
        if isinstance(error, unreachable) and not refused:
            raise TransientError(message) from None
        raise LmforgeError(message) from None
    pruners = {
        # A trial goes on while its best loss so far is in the best third (percentile) or half (median)
        # of the other trials' at the same evaluation. The best third prunes more steps than the median
        # at the same best loss (bench/hpo_pruning.py; docs/performance.md).
        "percentile": optuna.pruners.PercentilePruner(100 / 3, n_startup_trials=2, n_warmup_steps=1),
        "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "hyperband": optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(params.max_steps // params.eval_every, 1)
        ),
        "none": optuna.pruners.NopPruner(),
    }
    return optuna.create_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=params.seed, n_startup_trials=3),
        pruner=pruners[params.pruner],
        direction="minimize",
        load_if_exists=True,
    )


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def suggest(trial: optuna.Trial | optuna.trial.FixedTrial, params: OptimizeParams,
            task: FinetuneTask) -> tuple[dict[str, Any], float | None]:  # fmt: skip
    """Sample the search space (a FixedTrial replays a finished trial's values); return the task's
    training/LoRA updates and the dropout (or None)."""
    space = params.search_space
    training: dict[str, Any] = {"max_steps": params.max_steps, "eval_every": params.eval_every,
                                "checkpoint_every": params.eval_every, "early_stopping_patience": 0}  # fmt: skip
    for name in ("learning_rate", "warmup_ratio", "weight_decay"):
        bounds = getattr(space, name)
        if bounds is not None:
            training[name] = trial.suggest_float(name, bounds.low, bounds.high, log=bounds.log)
    if space.batch_size:
        training["batch_size"] = trial.suggest_categorical("batch_size", space.batch_size)
    if space.epochs is not None:
        training["epochs"] = trial.suggest_int("epochs", space.epochs.low, space.epochs.high)
    updates: dict[str, Any] = {"training": task.training.model_copy(update=training)}
    if task.method == "lora":
        lora: dict[str, Any] = {}
        if space.lora_r:
            lora["r"] = trial.suggest_categorical("lora_r", space.lora_r)
        if space.lora_alpha:
            lora["alpha"] = trial.suggest_categorical("lora_alpha", space.lora_alpha)
        updates["lora"] = task.lora.model_copy(update=lora)
    dropout = trial.suggest_float("dropout", space.dropout.low, space.dropout.high) if space.dropout else None
    return updates, dropout


def pruning_hook(trial: optuna.Trial) -> Any:
    """Report each validation loss to the pruner; raise TrialPruned when it says stop."""
    reports = {"count": 0}

    def on_eval(loss: float) -> None:
        reports["count"] += 1
        trial.report(loss, step=reports["count"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at evaluation {reports['count']} (val loss {loss:.4f})")

    return on_eval
