"""Training a fine-tuning task: its examples tokenized for the base, its loss, the training loop, the model.

The finetune stage trains each task of finetune.tasks with `train_task`; the optimize stage trains
its trials with the same function. Task examples are token-id lists. When lmforge pretrained the
base they come straight from data/processed/datasets/<dataset> (same tokenizer); a Hugging Face base
brings its own tokenizer, so the raw splits are tokenized again with it, by the same code preprocess uses.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlflow
import pyarrow.parquet as pq
import torch
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmforge import distributed, tracking
from lmforge.artifacts import DatasetLabels, FinetuneReport, Manifest, TaskMeta
from lmforge.errors import Follower, LmforgeError
from lmforge.figures import curve_figure, log_figures
from lmforge.io import atomic_output_dir, files_sha256, fingerprint, write_json
from lmforge.losses import causal_lm_loss
from lmforge.models import (
    base_folder,
    build_task_model,
    count_parameters,
    pretrained_objective,
    resolved_pooling,
    trainable_parameters,
)
from lmforge.schema import RECIPE_LR, SKEWED_CLASSES, FinetuneTask
from lmforge.tokenization import IGNORE_INDEX, encode_pairs, example_pairs, tokenize_split
from lmforge.training import BatchFn, LossFn, model_loss, pick_device, train, with_learning_rate

# --- data and models ------------------------------------------------------------------------------


@dataclass
class TaskData:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    labels: list[str]  # class names or tags; empty for generation


def load_tokenizer(base: str, key: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as error:
        raise LmforgeError(f"{key}: cannot load a tokenizer from {base!r} (offline, or not a model?): "
                           f"{' '.join(str(error).split())[:160]}") from None  # fmt: skip
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers have none; padding needs one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_positions(base: str) -> int:
    """The longest sequence the base model's position embeddings hold (a tokenizer saved without its
    model_max_length would otherwise allow any length)."""
    config = json.loads((Path(base) / "config.json").read_text())  # base_folder checked it is there
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 4096)


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = pq.read_table(path).to_pylist()
    return rows[:limit] if limit else rows


def generation_rows(raw_split: Path, tokenizer: PreTrainedTokenizerBase, prompt_chars: int, max_length: int,
                    limit: int | None = None, prompt_loss: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """`[CLS] prompt [SEP] continuation [SEP]` (inference.encode_pairs): the loss covers the continuation, an
    instruction dataset's response (and the prompt's own tokens with prompt_loss: never [CLS] or the [SEP]
    between them, which the model is given)."""
    columns = [name for name in ("text", "response") if name in pq.read_schema(raw_split).names]
    pairs = example_pairs(pq.read_table(raw_split, columns=columns).to_pandas(), prompt_chars)
    encoded = encode_pairs(tokenizer, pairs[:limit] if limit else pairs, max_length)
    special = set(tokenizer.all_special_ids)
    rows = []
    for input_ids, types in zip(encoded["input_ids"], encoded["token_type_ids"], strict=True):
        labels = [token if kind == 1 or (prompt_loss and token not in special) else IGNORE_INDEX
                  for token, kind in zip(input_ids, types, strict=True)]  # fmt: skip
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


def load_task_data(task: FinetuneTask, name: str, base_is_ours: bool, tokenizer: PreTrainedTokenizerBase,
                   dataset_dir: Path, tokenized_dir: Path, work_dir: Path, max_length: int) -> TaskData:  # fmt: skip
    """Training and validation examples for the task, tokenized for this base model."""
    limits = {"train": task.training.max_train_samples, "val": task.training.max_eval_samples}
    if task.kind == "generation":
        return TaskData(
            **{split: generation_rows(dataset_dir / f"{split}.parquet", tokenizer, task.prompt_chars, max_length,
                                      limits[split], prompt_loss=task.prompt_loss and split == "train")
               for split in ("train", "val")},
            labels=[],
        )  # fmt: skip
    task_dir = tokenized_dir
    if not (task_dir / "labels.json").is_file():
        raise LmforgeError(f"finetune.tasks.{name}.dataset: {task_dir} holds no tokenized {task.dataset!r} data")
    meta = DatasetLabels.read(task_dir / "labels.json")
    if meta.kind != task.kind:
        raise LmforgeError(f"finetune.tasks.{name}.kind: {task.kind} needs a {task.kind} dataset; "
                           f"{task.dataset!r} is {meta.kind}")  # fmt: skip
    if not base_is_ours:  # another vocabulary: tokenize the raw splits with the base's own tokenizer
        backend = tokenizer.backend_tokenizer
        backend.enable_truncation(max_length=max_length)
        task_dir = work_dir / ("tokenized" if distributed.is_main() else f"tokenized.rank{distributed.rank()}")
        task_dir.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            tokenize_split(backend, meta.kind, dataset_dir / f"{split}.parquet",
                           task_dir / f"{split}.parquet", meta.labels, batch_size=1000)  # fmt: skip
    return TaskData(
        train=read_rows(task_dir / "train.parquet", limits["train"]),
        val=read_rows(task_dir / "val.parquet", limits["val"]),
        labels=meta.labels,
    )


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence; labels pad with -100, a class label stays a scalar."""
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention[i, : len(row["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if "token_type_ids" in rows[0]:
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            types[i, : len(row["token_type_ids"])] = torch.tensor(row["token_type_ids"])
        batch["token_type_ids"] = types
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)
    else:
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
        batch["labels"] = labels
    return batch


def batch_maker(rows: list[dict[str, Any]], pad_id: int) -> BatchFn:
    def make(indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return collate([rows[i] for i in indices.tolist()], pad_id)

    return make


def mean_loss(model: torch.nn.Module, rows: list[dict[str, Any]], pad_id: int, batch_size: int,
              loss_of: LossFn = model_loss) -> float:  # fmt: skip
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        total += float(loss_of(model, batch)) * len(chunk)
        count += len(chunk)
    return total / max(count, 1)


def marks_word_starts(task: FinetuneTask, model: PreTrainedModel) -> bool:
    """Token classification on a base with two token types gets each word's first piece marked."""
    return task.kind == "token_classification" and getattr(model.config, "type_vocab_size", 0) >= 2


def add_word_starts(rows: list[dict[str, Any]]) -> None:
    """token_type_ids from the labels: a word's first piece is exactly the piece that carries its tag."""
    for row in rows:
        row["token_type_ids"] = [int(label != IGNORE_INDEX) for label in row["labels"]]


def recipe_learning_rate(task: FinetuneTask, base_is_ours: bool) -> float:
    """The learning rate for a task that sets none (schema.RECIPE_LR says why they differ)."""
    if base_is_ours:
        return RECIPE_LR["ours"]
    return RECIPE_LR["lora" if task.method == "lora" else "full"]


def class_weights(task: FinetuneTask, labels: list[str], train: list[dict[str, Any]]) -> torch.Tensor | None:
    """Loss weights for a classification task whose classes are skewed, or None (plain cross-entropy).

    `balanced` is scikit-learn's: rows / (classes x rows of the class), so every class weighs as much
    in the loss as a balanced set would make it. Without it a small skewed set (21 intents, 600 rows)
    trained into a model that predicted the majority class for everything.
    """
    if task.kind != "classification" or task.class_weights == "none" or not train:
        return None
    counts = torch.bincount(torch.tensor([row["label"] for row in train]), minlength=len(labels)).float()
    present = counts[counts > 0]
    if task.class_weights == "auto" and present.max() < SKEWED_CLASSES * present.min():
        return None
    return counts.sum() / (len(present) * counts.clamp(min=1))


def weighted_loss(weights: torch.Tensor) -> LossFn:
    """Cross-entropy of the classification head with per-class weights (for training and validation)."""

    def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = model(**inputs).logits.float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"], weight=weights.to(logits.device))

    return loss_of


# --- training a task ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFolders:
    """Where a task's training reads and writes (the finetune stage's paths; a trial's own folders)."""

    dataset: Path  # data/raw/<dataset>: the splits and manifest
    tokenized: Path  # data/processed/datasets/<dataset>
    base: Path  # models/pretrained/<base>
    out: Path  # the trained model, HF format
    checkpoints: Path  # resumable checkpoints (and a Hugging Face base's own tokenization)


def train_task(name: str, task: FinetuneTask, seed: int, folders: TaskFolders,
               on_eval: Callable[[float], None] | None = None,
               dropout: float | None = None) -> FinetuneReport:  # fmt: skip
    """Fine-tune task `name` and write the model to folders.out, logging to the active MLflow run.

    `on_eval` sees every validation loss (the optimize stage prunes trials with it); `dropout`
    (a tuned hyperparameter) overrides the task's, which overrides the base model's.
    """
    dropout = task.dropout if dropout is None else dropout
    base = base_folder(folders.base, f"finetune.tasks.{name}.base")
    tokenizer = load_tokenizer(base, f"finetune.tasks.{name}.base")
    max_length = min(tokenizer.model_max_length, base_positions(base), 4096)
    base_is_ours = pretrained_objective(Path(base)) is not None
    data = load_task_data(task, name, base_is_ours, tokenizer, folders.dataset, folders.tokenized, folders.checkpoints,
                          max_length)  # fmt: skip
    model = build_task_model(task, name, base, data.labels, tokenizer, seed, dropout)
    word_start_types = marks_word_starts(task, model)
    if word_start_types:
        add_word_starts(data.train + data.val)
    manifest = Manifest.of(folders.dataset)
    training = with_learning_rate(task.training, recipe_learning_rate(task, base_is_ours))
    # the resolved rate and pooling travel with the model
    task = task.model_copy(update={"training": training, "pooling": resolved_pooling(model)})
    pad = tokenizer.pad_token_id
    resolved = {"task": name, **task.model_dump(), "base_resolved": base, "seed": seed, "dropout": dropout,
                "labels": data.labels, "max_length": max_length, "word_start_types": word_start_types}  # fmt: skip
    # The base's weights and tokenizer too: after new data re-trains the base (or its vocabulary), a
    # checkpoint fine-tuned from the old one must not be resumed.
    base_files = files_sha256(Path(base), "*.safetensors", "tokenizer.json") if Path(base).is_dir() else {}
    run_fingerprint = fingerprint(resolved, manifest.files, base_files)

    weights = class_weights(task, data.labels, data.train)
    loss_of = causal_lm_loss if task.kind == "generation" else model_loss if weights is None else weighted_loss(weights)
    if weights is not None:
        counts = Counter(row["label"] for row in data.train)
        shares = ", ".join(f"{label} {counts[i] / len(data.train):.1%}" for i, label in enumerate(data.labels))
        print(f"finetune {name}: classes skewed in train ({shares}): loss weighted by the inverse share "
              f"(finetune.tasks.{name}.class_weights: {task.class_weights})", file=sys.stderr)  # fmt: skip

    def validation_loss(m: torch.nn.Module) -> float:
        loss = mean_loss(m, data.val, pad, training.batch_size, loss_of)
        if on_eval is not None:
            on_eval(loss)
        return loss

    if distributed.is_main():  # the other ranks of a multi-device run have no MLflow run
        mlflow.log_params({"n_parameters": count_parameters(model), "trainable_parameters": trainable_parameters(model),
                           "class_weighted": weights is not None})  # fmt: skip
    result = train(
        model, len(data.train), batch_maker(data.train, pad), validation_loss,
        training, seed, folders.checkpoints, run_fingerprint,
        log=tracking.log_metrics_async,
        description=f"finetune {name} ({task.kind}, {task.method})", device=pick_device(), loss_of=loss_of,
        lengths=torch.tensor([len(row["input_ids"]) for row in data.train]),  # read_rows applied max_train_samples
    )  # fmt: skip
    if not distributed.is_main():
        raise Follower  # rank 0 records the run and writes the model
    if task.method == "lora":
        model = cast(Any, model).merge_and_unload()  # a plain model: evaluate and serving need no peft
    run = mlflow.active_run()
    report = FinetuneReport(
        val_loss=result.best_eval_loss,
        val_perplexity=math.exp(min(result.best_eval_loss, 50)) if task.kind == "generation" else None,
        steps=result.steps,
        train_examples=len(data.train),
        tokens_per_second=round(result.tokens_per_second),
        seconds=result.seconds,
        stopped_early=result.stopped_early,
        resumed_from_step=result.resumed_from_step,
        mlflow_run_id=run.info.run_id if run else None,
    )
    mlflow.log_metrics({k: float(v) for k, v in report.data().items() if isinstance(v, int | float)})
    if run is not None and result.history:
        log_figures({"training_curve": curve_figure(result.history, f"finetune@{name}: validation loss")})
    with atomic_output_dir(folders.out) as staging:
        model.cpu().save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        TaskMeta(
            **resolved, test_sha256=manifest.test_sha256, finetune_run_id=run.info.run_id if run else None
        ).write_into(staging / "lmforge_task.json")
        write_json(staging / "history.json", result.history)
    return report
