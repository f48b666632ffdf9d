"""The Optuna pieces of the optimize stage: storage URL, study opening, the search space, the pruning hook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial, TrialState

from lmforge.errors import LmforgeError
from lmforge.schema import FinetuneTask, FloatRange, IntRange, LoraParams, OptimizeParams, SearchSpace, TrainingParams
from lmforge.study import STORAGE_ENV, finished_trials, open_study, pruning_hook, storage_url, suggest

NULL_SPACE = SearchSpace(learning_rate=None, batch_size=None, warmup_ratio=None, weight_decay=None, dropout=None,
                         epochs=None, lora_r=None, lora_alpha=None)  # fmt: skip


pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),  # heartbeat_interval
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize"),  # ask/tell
]


@pytest.fixture(autouse=True)
def _no_storage_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORAGE_ENV, raising=False)


def task(method: str = "full") -> FinetuneTask:
    training = TrainingParams(learning_rate=0.123, batch_size=7, epochs=5, grad_accumulation=3, schedule="cosine",
                              max_steps=999, eval_every=11, checkpoint_every=13, early_stopping_patience=4)  # fmt: skip
    return FinetuneTask(dataset="sentiment", kind="classification", base="encoder", method=method,
                        lora=LoraParams(r=2, alpha=3, dropout=0.25), training=training)  # fmt: skip


def sqlite_params(path: Path, **changes: Any) -> OptimizeParams:
    return OptimizeParams(storage=f"sqlite:///{path}", **changes)


# --- storage_url ----------------------------------------------------------------------------------


def test_storage_url_environment_overrides_params(monkeypatch: pytest.MonkeyPatch) -> None:
    params = OptimizeParams(storage="sqlite:///from-params.db")
    assert storage_url(params) == "sqlite:///from-params.db"
    monkeypatch.setenv(STORAGE_ENV, "sqlite:///from-env.db")
    assert storage_url(params) == "sqlite:///from-env.db"


def test_storage_url_ignores_an_empty_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STORAGE_ENV, "")
    assert storage_url(OptimizeParams(storage="sqlite:///from-params.db")) == "sqlite:///from-params.db"


def test_storage_url_defaults_to_optuna_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage_url(OptimizeParams()) == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"


@pytest.mark.parametrize("source", ["env", "params"])
def test_storage_url_rewrites_postgresql_to_psycopg2(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://user:secret@db.example:5432/optuna"
    if source == "env":
        monkeypatch.setenv(STORAGE_ENV, url)
        params = OptimizeParams(storage="sqlite:///ignored.db")
    else:
        params = OptimizeParams(storage=url)
    assert storage_url(params) == "postgresql+psycopg2://user:secret@db.example:5432/optuna"


def test_storage_url_leaves_an_explicit_driver_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STORAGE_ENV, "postgresql+psycopg2://h/db")
    assert storage_url(OptimizeParams()) == "postgresql+psycopg2://h/db"


# --- open_study -----------------------------------------------------------------------------------


def test_open_study_creates_then_reopens_the_same_study(tmp_path: Path) -> None:
    params = sqlite_params(tmp_path / "deep" / "er" / "optuna.db")  # the folder does not exist yet
    first = open_study(params, "sentiment")
    assert first.direction == optuna.study.StudyDirection.MINIMIZE
    trial = first.ask()
    first.tell(trial, 0.5)

    again = open_study(params, "sentiment")
    assert [t.value for t in again.trials] == [0.5]
    assert again.best_value == 0.5
    assert open_study(params, "other").trials == []  # another study in the same storage is separate


def test_open_study_honours_the_environment_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_db, params_db = tmp_path / "env.db", tmp_path / "params.db"
    monkeypatch.setenv(STORAGE_ENV, f"sqlite:///{env_db}")
    open_study(sqlite_params(params_db), "s")
    assert env_db.is_file() and not params_db.exists()


def test_open_study_on_an_unusable_storage_is_an_lmforge_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STORAGE_ENV, "nosuchdb://host/db")
    with pytest.raises(LmforgeError, match=r"optimize\.storage: .*nosuchdb") as raised:
        open_study(OptimizeParams(), "s")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("storage", "code"),
    [("nosuchdb://host/db", 2),  # a URL no driver takes: the user's to fix
     ("postgresql://lmforge@127.0.0.1:1/optuna", 75),  # nothing listens there (yet): transient, retried
     ("postgresql://postgres@127.0.0.1:5432/no_such_database", 2)],  # the server answers: no such database
)  # fmt: skip
def test_a_storage_that_does_not_answer_is_transient_and_a_wrong_one_is_the_users(
    storage: str, code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STORAGE_ENV, storage)
    with pytest.raises(LmforgeError) as raised:
        open_study(OptimizeParams(), "s")
    assert raised.value.exit_code == code, raised.value


@pytest.mark.parametrize(
    ("pruner", "expected"),
    [("percentile", optuna.pruners.PercentilePruner), ("median", optuna.pruners.MedianPruner),
     ("hyperband", optuna.pruners.HyperbandPruner),
     ("none", optuna.pruners.NopPruner)],
)  # fmt: skip
def test_open_study_uses_the_configured_pruner(pruner: str, expected: type, tmp_path: Path) -> None:
    study = open_study(sqlite_params(tmp_path / "optuna.db", pruner=pruner), "s")
    assert type(study.pruner) is expected
    assert isinstance(study.sampler, optuna.samplers.TPESampler)


def test_open_study_seeds_the_sampler(tmp_path: Path) -> None:
    def first_value(name: str, seed: int) -> float:
        study = open_study(sqlite_params(tmp_path / f"{name}.db", seed=seed), "s")
        return study.ask().suggest_float("x", 0.0, 1.0)

    assert first_value("a", 5) == first_value("b", 5)
    assert first_value("c", 5) != first_value("d", 6)


def test_finished_trials_counts_complete_and_pruned_only(tmp_path: Path) -> None:
    study = open_study(sqlite_params(tmp_path / "optuna.db"), "s")
    study.tell(study.ask(), 1.0)
    study.tell(study.ask(), state=TrialState.PRUNED)
    study.tell(study.ask(), state=TrialState.FAIL)
    study.ask()  # still running
    assert finished_trials(study) == 2


# --- suggest --------------------------------------------------------------------------------------


def test_suggest_fills_the_training_budget_and_the_sampled_values() -> None:
    params = OptimizeParams(max_steps=40, eval_every=8)
    trial = FixedTrial({"learning_rate": 1e-3, "batch_size": 32, "warmup_ratio": 0.05, "weight_decay": 0.02,
                        "dropout": 0.15})  # fmt: skip
    updates, dropout = suggest(trial, params, task("full"))
    training = updates["training"]
    assert (training.max_steps, training.eval_every, training.checkpoint_every) == (40, 8, 8)
    assert training.early_stopping_patience == 0
    assert (training.learning_rate, training.batch_size, training.warmup_ratio, training.weight_decay) == (
        1e-3, 32, 0.05, 0.02)  # fmt: skip
    assert dropout == 0.15
    # what the search space does not touch stays the task's own
    assert (training.epochs, training.grad_accumulation, training.schedule) == (5, 3, "cosine")
    assert set(updates) == {"training"}  # no LoRA for a full fine-tune


def test_suggest_samples_lora_only_when_the_task_uses_lora() -> None:
    values = {"learning_rate": 1e-3, "batch_size": 16, "warmup_ratio": 0.1, "weight_decay": 0.0, "dropout": 0.1}
    full = FixedTrial(dict(values))
    suggest(full, OptimizeParams(), task("full"))
    assert "lora_r" not in full.params and "lora_alpha" not in full.params

    lora = FixedTrial({**values, "lora_r": 16, "lora_alpha": 32})
    updates, _ = suggest(lora, OptimizeParams(), task("lora"))
    assert (updates["lora"].r, updates["lora"].alpha) == (16, 32)
    assert updates["lora"].dropout == 0.25  # the task's own


def test_suggest_with_every_entry_null_suggests_nothing() -> None:
    trial = FixedTrial({})  # suggesting any name it was not given raises
    updates, dropout = suggest(trial, OptimizeParams(search_space=NULL_SPACE), task("lora"))
    assert trial.params == {}
    assert dropout is None
    assert (updates["training"].learning_rate, updates["training"].batch_size) == (0.123, 7)
    assert updates["training"].max_steps == OptimizeParams().max_steps  # the budget is set even so
    assert (updates["lora"].r, updates["lora"].alpha) == (2, 3)


def test_suggest_only_suggests_the_entries_that_are_not_null() -> None:
    space = NULL_SPACE.model_copy(update={"weight_decay": FloatRange(low=0.0, high=0.3),
                                          "epochs": IntRange(low=2, high=4), "lora_alpha": [4, 8]})  # fmt: skip
    trial = FixedTrial({"weight_decay": 0.2, "epochs": 3, "lora_alpha": 8})
    updates, dropout = suggest(trial, OptimizeParams(search_space=space), task("lora"))
    assert set(trial.params) == {"weight_decay", "epochs", "lora_alpha"}
    assert (updates["training"].weight_decay, updates["training"].epochs) == (0.2, 3)
    assert (updates["lora"].r, updates["lora"].alpha) == (2, 8)
    assert dropout is None


def test_suggest_samples_within_the_declared_ranges() -> None:
    space = SearchSpace(learning_rate=FloatRange(low=1e-4, high=1e-2, log=True), batch_size=[8, 64],
                        warmup_ratio=FloatRange(low=0.05, high=0.15), weight_decay=FloatRange(low=0.0, high=0.1),
                        dropout=FloatRange(low=0.1, high=0.2), epochs=IntRange(low=2, high=3), lora_r=[4, 32],
                        lora_alpha=[16])  # fmt: skip
    params = OptimizeParams(search_space=space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(25):
        trial = study.ask()
        updates, dropout = suggest(trial, params, task("lora"))
        training, lora = updates["training"], updates["lora"]
        assert 1e-4 <= training.learning_rate <= 1e-2 and 0.05 <= training.warmup_ratio <= 0.15
        assert 0.0 <= training.weight_decay <= 0.1 and dropout is not None and 0.1 <= dropout <= 0.2
        assert training.batch_size in (8, 64) and training.epochs in (2, 3)
        assert lora.r in (4, 32) and lora.alpha == 16
        study.tell(trial, 1.0)
    distributions = study.trials[0].distributions
    assert distributions["learning_rate"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert distributions["warmup_ratio"] == FloatDistribution(0.05, 0.15)
    assert distributions["dropout"] == FloatDistribution(0.1, 0.2)
    assert distributions["epochs"] == IntDistribution(2, 3)
    assert distributions["batch_size"] == CategoricalDistribution([8, 64])
    assert distributions["lora_r"] == CategoricalDistribution([4, 32])


# --- pruning_hook ---------------------------------------------------------------------------------


def test_pruning_hook_reports_each_loss_and_raises_when_the_pruner_says_so() -> None:
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    on_eval = pruning_hook(trial)
    on_eval(0.9)
    on_eval(0.7)
    with pytest.raises(optuna.TrialPruned, match="evaluation 3"):
        on_eval(1.5)
    assert study.trials[0].intermediate_values == {1: 0.9, 2: 0.7, 3: 1.5}


def test_pruning_hook_never_raises_without_a_pruner(tmp_path: Path) -> None:
    study = open_study(sqlite_params(tmp_path / "optuna.db", pruner="none"), "s")
    for _ in range(3):
        trial = study.ask()
        on_eval = pruning_hook(trial)
        for loss in (1.0, 1.0, 1.0):
            on_eval(loss)
        study.tell(trial, 1.0)
    trial = study.ask()
    on_eval = pruning_hook(trial)
    for loss in (100.0, 100.0, 100.0):
        on_eval(loss)  # far worse than every finished trial, and still not pruned


def test_pruning_hook_with_the_median_pruner_stops_a_trial_worse_than_the_finished_ones(tmp_path: Path) -> None:
    study = open_study(sqlite_params(tmp_path / "optuna.db", pruner="median"), "s")
    for _ in range(2):
        trial = study.ask()
        on_eval = pruning_hook(trial)
        on_eval(1.0)
        on_eval(1.0)
        study.tell(trial, 1.0)
    better = study.ask()
    on_eval = pruning_hook(better)
    on_eval(0.5)
    on_eval(0.9)  # worse than before, but its best so far beats the median: goes on
    study.tell(better, 0.5)
    worse = study.ask()
    with pytest.raises(optuna.TrialPruned, match="evaluation 1"):
        pruning_hook(worse)(5.0)


@pytest.mark.parametrize(("pruner", "pruned"), [("percentile", True), ("median", False)])
def test_the_percentile_pruner_keeps_the_best_third_and_the_median_pruner_the_best_half(
    pruner: str, pruned: bool, tmp_path: Path
) -> None:
    study = open_study(sqlite_params(tmp_path / "optuna.db", pruner=pruner), "s")
    for loss in (1.0, 2.0, 3.0):  # the finished trials' losses at evaluation 1: a third at 1.67, half at 2.0
        trial = study.ask()
        trial.report(loss, step=1)
        study.tell(trial, loss)
    on_eval = pruning_hook(study.ask())
    if pruned:
        with pytest.raises(optuna.TrialPruned):
            on_eval(1.8)
    else:
        on_eval(1.8)
