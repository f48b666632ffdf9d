"""finetune: a base model + a task dataset -> models/finetuned/<task>/ (HF format, safetensors).

Sequence classification, token classification or generation. The base is a model of pretrain.models
(models/pretrained/<name>): one lmforge pretrained, or a Hugging Face model the pretrain stage copied
there. Full fine-tuning or LoRA (merged into the weights at the end, so the output is a plain model).
Same checkpoints and resume as pretrain. The training is lmforge/task_training.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge import distributed, tracking
from lmforge.artifacts import FinetuneReport
from lmforge.models import base_folder
from lmforge.params import Params
from lmforge.schema import FinetuneTask, Section
from lmforge.stage import Stage, dep, item_of, output, scratch
from lmforge.task_training import TaskFolders, load_tokenizer, train_task
from lmforge.training import pick_device


@dataclass(frozen=True)
class FinetunePaths:
    dataset: Path = dep("data/raw/<dataset>: the task's splits and manifest")
    tokenized: Path = dep("data/processed/datasets/<dataset>: the dataset tokenized by preprocess")
    base: Path = dep("models/pretrained/<base>: the model to start from")
    out: Path = output("models/finetuned/<task>: the model in HF format")
    checkpoints: Path = scratch("checkpoints/finetune/<task>: resumable checkpoints")
    report: Path = output("reports/finetune/<task>.json")
    metrics: Path = output("metrics/finetune/<task>.json: the figures to compare (DVC metrics)")


def run(section: FinetuneSection, paths: FinetunePaths) -> FinetuneReport:
    """Fine-tune one task of finetune.tasks from its base, in its own MLflow stage run."""
    task, name = section.task, section.name
    # Fail on a bad base before an MLflow run opens, so the error stays one line on stderr.
    key = f"finetune.tasks.{name}.base"
    load_tokenizer(base_folder(paths.base, key), key)
    folders = TaskFolders(paths.dataset, paths.tokenized, paths.base, paths.out, paths.checkpoints)
    pick_device()  # under torchrun: join the process group, so each rank knows whether it is rank 0
    if not distributed.is_main():
        return train_task(name, task, section.seed, folders)  # trains, then ends with errors.Follower
    with tracking.stage_run("finetune", {"task": name, **task.model_dump(), "seed": section.seed}, item=name):
        return train_task(name, task, section.seed, folders)


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
              lambda paths: paths.report, item="task",
              relaunch=lambda section, argv: distributed.relaunch(
                  section.task.training.devices, f"finetune.tasks.{section.name}.training.devices",
                  "stages.finetune", argv))  # fmt: skip
