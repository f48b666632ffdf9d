"""finetune: a base model + a task dataset -> models/finetuned/<task>/ (HF format, safetensors).

The base is `pretrained:<name>` (models/pretrained/<name>), a local HF model folder, or a hub id.
Full fine-tuning or LoRA (merged into the weights at the end, so the output is a plain model).
Same checkpoints and resume as pretrain.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch

from lmforge import tracking
from lmforge.errors import LmforgeError, run_main
from lmforge.finetuning import (
    batch_maker,
    build_task_model,
    load_task_data,
    load_tokenizer,
    mean_loss,
    trainable_parameters,
)
from lmforge.io import atomic_output_dir, files_sha256, fingerprint, read_json, write_json, write_json_atomic
from lmforge.models import count_parameters, resolve_base
from lmforge.params import FinetuneParams, FinetuneTask, load_params
from lmforge.training import pick_device, train


def train_task(
    task: FinetuneTask, name: str, seed: int, raw: Path, processed: Path, pretrained: Path, out_dir: Path,
    checkpoints: Path, on_eval: Callable[[float], None] | None = None, dropout: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune `task` and write the model to out_dir, logging to the active MLflow run.

    `on_eval` sees every validation loss (the optimize stage prunes trials with it); `dropout`
    overrides the base model's dropout (a tuned hyperparameter).
    """
    base = resolve_base(task.base, pretrained, f"finetune.tasks.{name}.base")
    tokenizer = load_tokenizer(base, f"finetune.tasks.{name}.base")
    max_length = min(tokenizer.model_max_length, 4096)
    base_is_ours = task.base.startswith("pretrained:")
    data = load_task_data(task, name, base_is_ours, tokenizer, raw, processed, checkpoints, max_length)
    model = build_task_model(task, name, base, data.labels, tokenizer, seed, dropout)
    manifest = read_json(raw / task.dataset / "manifest.json")
    training = task.training
    pad = tokenizer.pad_token_id
    resolved = {"task": name, **task.model_dump(), "base_resolved": base, "seed": seed, "dropout": dropout,
                "labels": data.labels, "max_length": max_length}  # fmt: skip
    # The base's weights and tokenizer too: after new data re-trains the base (or its vocabulary), a
    # checkpoint fine-tuned from the old one must not be resumed.
    base_files = files_sha256(Path(base), "*.safetensors", "tokenizer.json") if Path(base).is_dir() else {}
    run_id = fingerprint(resolved, manifest["files"], base_files)

    def validation_loss(m: torch.nn.Module) -> float:
        loss = mean_loss(m, data.val, pad, training.batch_size)
        if on_eval is not None:
            on_eval(loss)
        return loss

    mlflow.log_params({"n_parameters": count_parameters(model), "trainable_parameters": trainable_parameters(model)})
    result = train(
        model, len(data.train), batch_maker(data.train, pad), validation_loss,
        training, seed, checkpoints, run_id,
        log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
        description=f"finetune {name} ({task.kind}, {task.method})", device=pick_device(),
    )  # fmt: skip
    if task.method == "lora":
        model = model.merge_and_unload()  # a plain model: evaluate and serving need no peft
    metrics = {
        "val_loss": result.best_eval_loss,
        "steps": result.steps,
        "train_examples": len(data.train),
        "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9)),
        "seconds": result.seconds,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from_step,
    }
    if task.kind == "generation":
        metrics["val_perplexity"] = math.exp(min(result.best_eval_loss, 50))
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
    run = mlflow.active_run()
    with atomic_output_dir(out_dir) as staging:
        model.to("cpu").save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        write_json(staging / "lmforge_task.json", {
            **resolved, "kind": task.kind, "dataset": task.dataset, "test_sha256": manifest["test_sha256"],
            "finetune_run_id": run.info.run_id if run else None,
        })  # fmt: skip
        write_json(staging / "history.json", result.history)
    return metrics


def run(params: FinetuneParams, name: str, raw: Path, processed: Path, pretrained: Path, out_dir: Path,
        checkpoints: Path) -> dict[str, Any]:  # fmt: skip
    """The finetune stage: one task, in its own MLflow stage run."""
    if name not in params.tasks:
        raise LmforgeError(f"finetune.tasks: no task named {name!r} (have: {', '.join(params.tasks)})")
    task = params.tasks[name]
    # Fail on a bad base before an MLflow run opens, so the error stays one line on stderr.
    load_tokenizer(resolve_base(task.base, pretrained, f"finetune.tasks.{name}.base"), f"finetune.tasks.{name}.base")
    with tracking.stage_run("finetune", {"task": name, **task.model_dump(), "seed": params.seed}, task=name) as run:
        metrics = train_task(task, name, params.seed, raw, processed, pretrained, out_dir, checkpoints)
        metrics["mlflow_run_id"] = run.info.run_id
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--task", required=True, help="a key of finetune.tasks")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--out", type=Path, help="default: models/finetuned/<task>")
    parser.add_argument("--checkpoints", type=Path, help="default: checkpoints/finetune/<task>")
    parser.add_argument("--metrics", type=Path, help="default: reports/finetune/<task>.json")
    args = parser.parse_args()
    params = load_params(args.params)
    out = args.out or Path("models/finetuned") / args.task
    metrics = run(params.finetune, args.task, args.raw, args.processed, args.pretrained, out,
                  args.checkpoints or Path("checkpoints/finetune") / args.task)  # fmt: skip
    write_json_atomic(args.metrics or Path("reports/finetune") / f"{args.task}.json", metrics)
    print(
        f"finetune: {args.task}: val loss {metrics['val_loss']:.3f} after {metrics['steps']} steps "
        f"({metrics['tokens_per_second']} tokens/s); wrote {out}"
    )


if __name__ == "__main__":
    run_main(main)
