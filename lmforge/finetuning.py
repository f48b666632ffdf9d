"""Fine-tuning data and models: sequence classification, token classification, generation.

Task examples are token-id lists. When the base model is one of ours (`pretrained:<name>`) they come
straight from data/processed/tasks (same tokenizer); any other base brings its own tokenizer, so the
raw splits are tokenized again with it, by the same code preprocess uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import lmforge.models  # noqa: F401  registers the LSTM with the Auto classes
from lmforge.errors import LmforgeError
from lmforge.params import FinetuneTask
from lmforge.tokenization import IGNORE_INDEX, tokenize_split
from lmforge.training import BatchFn

ENCODER_ONLY = {"bert", "roberta", "albert", "distilbert", "electra", "ernie"}
LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "roberta": ["query", "value"]}


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


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = pq.read_table(path).to_pylist()
    return rows[:limit] if limit else rows


def generation_rows(raw_split: Path, tokenizer: PreTrainedTokenizerBase, prompt_chars: int, max_length: int,
                    limit: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """`[CLS] prompt [SEP] continuation [SEP]`: the loss covers the continuation only."""
    texts = [text for text in pq.read_table(raw_split, columns=["text"]).column("text").to_pylist()
             if len(text) > prompt_chars]  # fmt: skip
    texts = texts[:limit] if limit else texts
    encoded = tokenizer([t[:prompt_chars] for t in texts], [t[prompt_chars:] for t in texts], truncation="only_second",
                        max_length=max_length, return_token_type_ids=True)  # fmt: skip
    rows = []
    for input_ids, types in zip(encoded["input_ids"], encoded["token_type_ids"], strict=True):
        labels = [token if kind == 1 else IGNORE_INDEX for token, kind in zip(input_ids, types, strict=True)]
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


def load_task_data(task: FinetuneTask, name: str, base_is_ours: bool, tokenizer: PreTrainedTokenizerBase,
                   raw: Path, processed: Path, work_dir: Path, max_length: int) -> TaskData:  # fmt: skip
    """Training and validation examples for the task, tokenized for this base model."""
    limits = {"train": task.training.max_train_samples, "val": task.training.max_eval_samples}
    if task.kind == "generation":
        return TaskData(
            **{split: generation_rows(raw / task.dataset / f"{split}.parquet", tokenizer, task.prompt_chars,
                                      max_length, limits[split]) for split in ("train", "val")},
            labels=[],
        )  # fmt: skip
    task_dir = processed / "tasks" / task.dataset
    if not (task_dir / "labels.json").is_file():
        raise LmforgeError(f"finetune.tasks.{name}.dataset: {task_dir} holds no tokenized {task.dataset!r} data")
    meta = json.loads((task_dir / "labels.json").read_text())
    expected = {"classification": "classification", "token_classification": "token_classification"}[task.kind]
    if meta["task"] != expected:
        raise LmforgeError(f"finetune.tasks.{name}.kind: {task.kind} needs a {expected} dataset; "
                           f"{task.dataset!r} is {meta['task']}")  # fmt: skip
    if not base_is_ours:  # another vocabulary: tokenize the raw splits with the base's own tokenizer
        backend = tokenizer.backend_tokenizer
        backend.enable_truncation(max_length=max_length)
        task_dir = work_dir / "tokenized"
        task_dir.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            tokenize_split(backend, meta["task"], raw / task.dataset / f"{split}.parquet",
                           task_dir / f"{split}.parquet", meta["labels"], batch_size=1000)  # fmt: skip
    return TaskData(
        train=read_rows(task_dir / "train.parquet", limits["train"]),
        val=read_rows(task_dir / "val.parquet", limits["val"]),
        labels=meta["labels"],
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


def mean_loss(model: torch.nn.Module, rows: list[dict[str, Any]], pad_id: int, batch_size: int) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        total += float(model(**batch).loss) * len(chunk)
        count += len(chunk)
    return total / max(count, 1)


DROPOUT_KEYS = {  # where each architecture keeps its dropout probabilities
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "lmforge_lstm": ("dropout",),
}


def build_task_model(task: FinetuneTask, name: str, base: str, labels: list[str],
                     tokenizer: PreTrainedTokenizerBase, seed: int,
                     dropout: float | None = None) -> PreTrainedModel:  # fmt: skip
    """The base model with the task's head (new heads seeded), LoRA-wrapped when asked."""
    key = f"finetune.tasks.{name}.base"
    try:
        config = AutoConfig.from_pretrained(base)
    except OSError as error:
        raise LmforgeError(f"{key}: cannot load model {base!r} (offline, or not a model?): "
                           f"{' '.join(str(error).split())[:160]}") from None  # fmt: skip
    if task.kind == "generation" and config.model_type in ENCODER_ONLY:
        raise LmforgeError(f"{key}: generation needs a decoder (gpt, lstm); {base} is a {config.model_type} encoder")
    if task.kind != "generation" and config.model_type == "lmforge_lstm":
        raise LmforgeError(f"{key}: the LSTM baseline is a language model only; use a bert or gpt base for {task.kind}")
    torch.manual_seed(seed)
    options: dict[str, Any] = {"use_safetensors": True}
    if dropout is not None:
        options.update({key: dropout for key in DROPOUT_KEYS.get(config.model_type, ())})
    if task.kind == "generation":
        model = AutoModelForCausalLM.from_pretrained(base, **options)
    else:
        auto = AutoModelForSequenceClassification if task.kind == "classification" else AutoModelForTokenClassification
        model = auto.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, **options,
        )  # fmt: skip
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if task.method == "lora":
        model = wrap_lora(model, task, name)
    return model


def wrap_lora(model: PreTrainedModel, task: FinetuneTask, name: str) -> PreTrainedModel:
    from peft import LoraConfig, TaskType, get_peft_model

    targets = task.lora.target_modules or LORA_TARGETS.get(model.config.model_type)
    if not targets:
        raise LmforgeError(f"finetune.tasks.{name}.lora.target_modules: set it for a {model.config.model_type} model")
    task_type = {"classification": TaskType.SEQ_CLS, "token_classification": TaskType.TOKEN_CLS,
                 "generation": TaskType.CAUSAL_LM}[task.kind]  # fmt: skip
    config = LoraConfig(task_type=task_type, r=task.lora.r, lora_alpha=task.lora.alpha,
                        lora_dropout=task.lora.dropout, target_modules=targets)  # fmt: skip
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
