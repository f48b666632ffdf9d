"""finetune: a base model + a task dataset -> models/finetuned/<task>/ (HF format, safetensors).

Sequence classification, token classification or generation. The base is a model of pretrain.models
(models/pretrained/<name>): one lmforge pretrained, or a Hugging Face model the pretrain stage copied
there. Full fine-tuning or LoRA (merged into the weights at the end, so the output is a plain model).
Same checkpoints and resume as pretrain.

Task examples are token-id lists. When lmforge pretrained the base they come straight from
data/processed/datasets/<dataset> (same tokenizer); a Hugging Face base brings its own tokenizer, so
the raw splits are tokenized again with it, by the same code preprocess uses.
"""

from __future__ import annotations

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
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmforge import tracking
from lmforge.artifacts import DatasetLabels, FinetuneReport, Manifest, TaskMeta
from lmforge.errors import LmforgeError
from lmforge.io import atomic_output_dir, files_sha256, fingerprint, write_json
from lmforge.losses import causal_lm_loss
from lmforge.models import (
    BertForMeanPooledClassification,
    BertForWordTagging,
    MeanPooledBertConfig,
    WordPooledBertConfig,
    base_folder,
    count_parameters,
    pretrained_objective,
)
from lmforge.params import Params
from lmforge.schema import RECIPE_LR, SKEWED_CLASSES, FinetuneTask, Section
from lmforge.stage import Stage, dep, item_of, output, scratch
from lmforge.tokenization import IGNORE_INDEX, tokenize_split
from lmforge.training import BatchFn, LossFn, model_loss, pick_device, train, with_learning_rate


@dataclass(frozen=True)
class FinetunePaths:
    dataset: Path = dep("data/raw/<dataset>: the task's splits and manifest")
    tokenized: Path = dep("data/processed/datasets/<dataset>: the dataset tokenized by preprocess")
    base: Path = dep("models/pretrained/<base>: the model to start from")
    out: Path = output("models/finetuned/<task>: the model in HF format")
    checkpoints: Path = scratch("checkpoints/finetune/<task>: resumable checkpoints")
    report: Path = output("reports/finetune/<task>.json")
    metrics: Path = output("metrics/finetune/<task>.json: the figures to compare (DVC metrics)")


# --- data and models ------------------------------------------------------------------------------


MEAN_BERT = MeanPooledBertConfig.model_type
WORDS_BERT = WordPooledBertConfig.model_type
ENCODER_ONLY = {"bert", MEAN_BERT, WORDS_BERT, "roberta", "albert", "distilbert", "electra", "ernie"}
MEAN_POOLED = {"bert", MEAN_BERT, WORDS_BERT}  # model types a mean-pooled classifier or tagger can start from
LORA_TARGETS = {"bert": ["query", "value"], MEAN_BERT: ["query", "value"], WORDS_BERT: ["query", "value"],
                "gpt2": ["c_attn"], "roberta": ["query", "value"]}  # fmt: skip


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
                    limit: int | None = None, prompt_loss: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """`[CLS] prompt [SEP] continuation [SEP]`: the loss covers the continuation (and the prompt's own
    tokens with prompt_loss: never [CLS] or the [SEP] between them, which the model is given)."""
    texts = [text for text in pq.read_table(raw_split, columns=["text"]).column("text").to_pylist()
             if len(text) > prompt_chars]  # fmt: skip
    texts = texts[:limit] if limit else texts
    encoded = tokenizer([t[:prompt_chars] for t in texts], [t[prompt_chars:] for t in texts], truncation="only_second",
                        max_length=max_length, return_token_type_ids=True)  # fmt: skip
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
        task_dir = work_dir / "tokenized"
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


DROPOUT_KEYS = {  # where each architecture keeps its dropout probabilities
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    MEAN_BERT: ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    WORDS_BERT: ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "lmforge_lstm": ("dropout",),
}


def task_pooling(task: FinetuneTask, name: str, base: str, model_type: str) -> str:
    """`cls`, `mean` or `mean_max` for a classification or token classification task
    (FinetuneTask.pooling says what each reads and when auto picks which)."""
    key = f"finetune.tasks.{name}.pooling"
    if task.pooling in ("mean", "mean_max") and model_type not in MEAN_POOLED:
        raise LmforgeError(f"{key}: {task.pooling} needs a bert base; {base} is a {model_type} model")
    if task.pooling == "mean_max" and task.kind == "token_classification":
        raise LmforgeError(f"{key}: mean_max pools a whole text (classification); a tagger reads cls or mean")
    if task.pooling != "auto":
        return task.pooling
    ours = model_type in (MEAN_BERT, WORDS_BERT)  # fine-tuned by lmforge: its encoder is lmforge's
    objective = pretrained_objective(Path(base)) if model_type == "bert" else None
    if task.kind == "token_classification":  # any encoder lmforge pretrained: one token per CJK character
        return "mean" if ours or objective is not None else "cls"
    # mlm_nsp trains [CLS] through next-sentence prediction; plain mlm leaves it untrained. Any base
    # lmforge did not pretrain (a hub BERT, say) has its [CLS] trained by its own pretraining.
    return "mean_max" if ours or objective == "mlm" else "cls"


def resolved_pooling(model: PreTrainedModel) -> str:
    """What the built model's head reads, as task_pooling names it (`cls` for any other head)."""
    if model.config.model_type == WORDS_BERT:
        return "mean"
    if model.config.model_type == MEAN_BERT:
        return "mean_max" if model.config.pool_max else "mean"
    return "cls"


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
    model: PreTrainedModel
    if task.kind == "generation":
        model = AutoModelForCausalLM.from_pretrained(base, **options)
    elif (pooling := task_pooling(task, name, base, config.model_type)) in ("mean", "mean_max"):
        head, head_config = ((BertForWordTagging, WordPooledBertConfig) if task.kind == "token_classification"
                             else (BertForMeanPooledClassification, MeanPooledBertConfig))  # fmt: skip
        dropouts = {key: value for key, value in options.items() if key != "use_safetensors"}
        pooled_config = head_config.of(
            config, id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
            pool_max=pooling == "mean_max", **dropouts,
        )  # fmt: skip
        model = head.from_pretrained(base, config=pooled_config, use_safetensors=True)
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
    # A PeftModel wraps the model and forwards to it; training and saving treat it as the model.
    return cast(PreTrainedModel, get_peft_model(model, config))


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- the stage ------------------------------------------------------------------------------------


def train_task(params: FinetuneSection, paths: FinetunePaths, on_eval: Callable[[float], None] | None = None,
               dropout: float | None = None) -> FinetuneReport:  # fmt: skip
    """Fine-tune the task and write the model to paths.out, logging to the active MLflow run.

    `on_eval` sees every validation loss (the optimize stage prunes trials with it); `dropout`
    (a tuned hyperparameter) overrides the task's, which overrides the base model's.
    """
    task, name, seed = params.task, params.name, params.seed
    dropout = task.dropout if dropout is None else dropout
    base = base_folder(paths.base, f"finetune.tasks.{name}.base")
    tokenizer = load_tokenizer(base, f"finetune.tasks.{name}.base")
    max_length = min(tokenizer.model_max_length, 4096)
    base_is_ours = pretrained_objective(Path(base)) is not None
    data = load_task_data(task, name, base_is_ours, tokenizer, paths.dataset, paths.tokenized, paths.checkpoints,
                          max_length)  # fmt: skip
    model = build_task_model(task, name, base, data.labels, tokenizer, seed, dropout)
    word_start_types = marks_word_starts(task, model)
    if word_start_types:
        add_word_starts(data.train + data.val)
    manifest = Manifest.of(paths.dataset)
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

    mlflow.log_params({"n_parameters": count_parameters(model), "trainable_parameters": trainable_parameters(model),
                       "class_weighted": weights is not None})  # fmt: skip
    result = train(
        model, len(data.train), batch_maker(data.train, pad), validation_loss,
        training, seed, paths.checkpoints, run_fingerprint,
        log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
        description=f"finetune {name} ({task.kind}, {task.method})", device=pick_device(), loss_of=loss_of,
        lengths=torch.tensor([len(row["input_ids"]) for row in data.train]),  # read_rows applied max_train_samples
    )  # fmt: skip
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
    with atomic_output_dir(paths.out) as staging:
        model.cpu().save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        TaskMeta(
            **resolved, test_sha256=manifest.test_sha256, finetune_run_id=run.info.run_id if run else None
        ).write_into(staging / "lmforge_task.json")
        write_json(staging / "history.json", result.history)
    return report


def run(section: FinetuneSection, paths: FinetunePaths) -> FinetuneReport:
    """Fine-tune one task of finetune.tasks from its base, in its own MLflow stage run."""
    task, name = section.task, section.name
    # Fail on a bad base before an MLflow run opens, so the error stays one line on stderr.
    key = f"finetune.tasks.{name}.base"
    load_tokenizer(base_folder(paths.base, key), key)
    with tracking.stage_run("finetune", {"task": name, **task.model_dump(), "seed": section.seed}, item=name):
        return train_task(section, paths)


def summary(report: FinetuneReport, paths: FinetunePaths) -> str:
    return (f"finetune: val loss {report.val_loss:.3f} after {report.steps} steps ({report.tokens_per_second} "
            f"tokens/s); wrote {paths.out}")  # fmt: skip


class FinetuneSection(Section):
    """What one finetune@<task> stage reads of params.yaml."""

    name: str
    seed: int
    task: FinetuneTask


def section(params: Params, item: str | None) -> FinetuneSection:
    task = item_of(params.finetune.tasks, item, "finetune.tasks")
    return FinetuneSection(name=str(item), seed=params.finetune.seed, task=task)


STAGE = Stage("finetune", ("finetune.seed", "finetune.tasks.{item}"), section, FinetunePaths, run, summary,
              lambda paths: paths.report, item="task")  # fmt: skip
