"""The one training loop that pretrain and finetune share.

Linear on purpose: AdamW, warmup then decay, gradient accumulation, clipping, optional bf16
autocast, periodic validation with early stopping, and atomic checkpoints that make a killed run
resume to the same weights as an uninterrupted one (on CPU). Determinism comes from three sources of
randomness, all seeded and all checkpointed: the data order (a permutation per epoch from seed +
epoch), the batch generator (masking, sentence pairs) and the global torch RNG (dropout).
Under torchrun the same loop trains data-parallel (lmforge/distributed.py): every rank makes the
same batches, trains on its slice, and rank 0 alone evaluates, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm import tqdm

from lmforge import distributed, progress
from lmforge.allocator import keep_freed_memory
from lmforge.checkpoint import latest_checkpoint, load_checkpoint, os_errors_of_safetensors, save_checkpoint
from lmforge.io import writing
from lmforge.schema import TrainingParams

BatchFn = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[nn.Module], float]
LogFn = Callable[[dict[str, float], int], object]  # e.g. mlflow.log_metrics(metrics, step=step)


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    best_eval_loss: float
    final_eval_loss: float
    stopped_early: bool
    resumed_from_step: int | None
    tokens: int  # trained on in all, resumed runs included
    seconds: float  # of this process
    tokens_this_run: int  # trained on by this process: a resumed run's speed counts only these
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0


def pick_device() -> torch.device:
    """The GPU (this rank's, under torchrun) where there is one, else the CPU."""
    distributed.init_from_env()
    if torch.cuda.is_available():
        # TF32 for what autocast leaves in fp32 (the optimizer, fp32 runs): Ampere and later do those
        # matmuls on tensor cores at a 10-bit mantissa, the precision training needs.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return distributed.device()


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated, and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolved_precision(precision: str, device: torch.device) -> str:
    """`auto` made concrete for this device: bf16 where the hardware computes it natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_computes_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where supported (any CPU; CUDA GPUs with bf16), else a no-op (fp32)."""
    precision = resolved_precision(precision, device)
    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("warning: this GPU has no bf16; training in fp32", file=sys.stderr)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(model: nn.Module, params: TrainingParams) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases, norms or 1-d parameters)."""
    if params.learning_rate is None:
        raise ValueError("learning_rate: resolve the recipe's (with_learning_rate) before training")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every parameter in one pass (CPU and CUDA); torch's default on CPU is a
    # Python loop over the parameters, one small op after another.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=params.learning_rate, fused=fused or None)


def with_learning_rate(params: TrainingParams, recipe: float) -> TrainingParams:
    """The params with `learning_rate` set: the recipe's where params.yaml leaves it null."""
    return params if params.learning_rate is not None else params.model_copy(update={"learning_rate": recipe})


def make_scheduler(optimizer: torch.optim.Optimizer, params: TrainingParams, total_steps: int) -> Any:
    warmup = int(params.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if params.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


BUCKET_BATCHES = 50  # length bucketing sorts within windows of this many batches: order stays random


def micro_batches(n_examples: int, batch_size: int, seed: int, epoch: int,
                  lengths: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
    """The epoch's micro-batches of example indices: a permutation fixed by seed and epoch alone.

    With `lengths` (examples of different lengths, padded per batch) the batches are length-bucketed:
    the permutation is cut into windows of BUCKET_BATCHES batches, each window sorted by length and
    split, and the batches shuffled again. Every example is still seen once an epoch, and a batch
    holds examples of similar length, so less of it is padding.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n_examples, generator=generator)
    if lengths is None:
        return list(order.split(batch_size))
    batches: list[torch.Tensor] = []
    for window in order.split(batch_size * BUCKET_BATCHES):
        by_length = window[torch.argsort(lengths[window], stable=True)]
        batches.extend(by_length.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def planned_steps(n_examples: int, params: TrainingParams, description: str = "training") -> int:
    """Optimizer steps of the run: `epochs` passes, more on small data (up to min_steps), never over max_steps.

    A fixed number of passes starves small data: 600 rows in batches of 32 make 19 steps an epoch, too
    few for a new head to move off the majority class. Early stopping still ends a run that overfits.
    """
    per_epoch = (math.ceil(n_examples / params.batch_size)) // params.grad_accumulation
    if per_epoch == 0:
        raise ValueError(f"{description}: {n_examples} examples fill no optimizer step; lower batch_size")
    return min(params.max_steps, max(per_epoch * params.epochs, params.min_steps))


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss the model computes itself (transformers models do, given labels)."""
    loss: torch.Tensor = model(**batch).loss
    return loss


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def train(
    model: nn.Module,
    n_examples: int,
    make_batch: BatchFn,
    evaluate: EvalFn,
    params: TrainingParams,
    seed: int,
    checkpoint_dir: Path,
    run_fingerprint: str,
    log: LogFn,
    description: str,
    device: torch.device | None = None,
    loss_of: LossFn | None = None,
    lengths: torch.Tensor | None = None,
) -> TrainResult:
    """Train `model` in place; resume from the newest checkpoint of this run if there is one.

    The model ends with the weights that had the best validation loss. `loss_of(model, batch)`
    replaces `model(**batch).loss` where the objective has a cheaper way to the same number;
    `lengths` (tokens of each example) turns on length-bucketed batches (micro_batches).
    """
    loss_of = loss_of or model_loss
    device = device or pick_device()
    rank, is_main = distributed.rank(), distributed.is_main()
    if device.type == "cpu":
        keep_freed_memory()  # each step reuses the last one's memory instead of faulting it in again
    model.to(device)
    n_examples = min(n_examples, params.max_train_samples or n_examples)
    total_steps = planned_steps(n_examples, params, description)
    optimizer = make_optimizer(model, params)
    scheduler = make_scheduler(optimizer, params, total_steps)
    batch_generator = torch.Generator().manual_seed(seed)  # the same on every rank: the same batches
    torch.manual_seed(seed + rank)  # each rank's own dropout; rank 0 draws what a single process would
    state: dict[str, Any] = {
        "fingerprint": run_fingerprint, "step": 0, "epoch": 0, "micro": 0, "best": math.inf, "last_eval": math.inf,
        "bad_evals": 0, "stopped_early": False, "tokens": 0, "history": [],
    }  # fmt: skip
    resumed_from = None
    found = distributed.from_main(latest_checkpoint(checkpoint_dir, run_fingerprint) if is_main else None)
    if found is not None:
        state = load_checkpoint(found, model, optimizer, scheduler, batch_generator, rank)
        resumed_from = state["step"]
        if is_main:
            print(f"{description}: resuming from {found} (step {resumed_from} of {total_steps})", file=sys.stderr)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    best_path = checkpoint_dir / f"best-{run_fingerprint}.safetensors"
    parallel = distributed.data_parallel(model, loss_of) if distributed.world_size() > 1 else None

    started, tokens_at_start = time.perf_counter(), state["tokens"]
    window_loss: torch.Tensor | float = 0.0
    window_tokens, window_started = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=state["step"], desc=description, unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, disable=not is_main)  # fmt: skip
    with bar:
        while state["step"] < total_steps and not state["stopped_early"]:
            batches = micro_batches(n_examples, params.batch_size, seed, state["epoch"], lengths)
            usable = len(batches) // params.grad_accumulation * params.grad_accumulation
            while state["micro"] < usable and state["step"] < total_steps and not state["stopped_early"]:
                model.train()
                for micro in range(params.grad_accumulation):
                    batch = make_batch(batches[state["micro"]], batch_generator)
                    tokens = count_tokens(batch)  # on the host, before the copy: no wait for the device
                    batch, weight = distributed.shard(batch)
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    # Several ranks average their gradients once, on the step's last micro-batch.
                    last = micro == params.grad_accumulation - 1
                    with contextlib.nullcontext() if parallel is None or last else parallel.no_sync():
                        with autocast(params.precision, device):
                            loss = (parallel(batch) if parallel is not None else loss_of(model, batch)) * weight
                            loss = loss / params.grad_accumulation
                        loss.backward()
                    state["micro"] += 1
                    state["tokens"] += tokens
                    window_tokens += tokens
                    window_loss = window_loss + loss.detach()  # a device tensor: read only when logged
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                step = state["step"]
                bar.update(1)

                if step % params.log_every == 0 or step == total_steps:
                    steps_in_window = params.log_every if step % params.log_every == 0 else step % params.log_every
                    elapsed = max(time.perf_counter() - window_started, 1e-9)
                    metrics = {
                        "train_loss": distributed.mean_over_ranks(window_loss) / steps_in_window,
                        "learning_rate": scheduler.get_last_lr()[0],
                        "tokens_per_second": window_tokens / elapsed,
                    }
                    metrics["train_perplexity"] = math.exp(min(metrics["train_loss"], 50))
                    bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
                    if is_main:
                        log(metrics, step)
                        per_step = (time.perf_counter() - started) / max(step - (resumed_from or 0), 1)
                        progress.report(progress.Progress(description, step, total_steps, metrics["train_loss"],
                                                          metrics["tokens_per_second"],
                                                          per_step * (total_steps - step)))  # fmt: skip
                    window_loss, window_tokens, window_started = 0.0, 0, time.perf_counter()

                if step % params.eval_every == 0 or step == total_steps:
                    _record_eval(model, evaluate, state, params, best_path, log)

                if step % params.checkpoint_every == 0 or step == total_steps:
                    rank_rngs = distributed.gathered(torch.get_rng_state())
                    if is_main:
                        save_checkpoint(checkpoint_dir, step, model, optimizer, scheduler, batch_generator, state,
                                        params.keep_checkpoints, rank_rngs)  # fmt: skip
            if state["micro"] >= usable:
                state["epoch"] += 1
                state["micro"] = 0
    if is_main and best_path.is_file():
        load_model(model, str(best_path))
    return TrainResult(
        steps=state["step"],
        total_steps=total_steps,
        best_eval_loss=state["best"],
        final_eval_loss=state["last_eval"],
        stopped_early=state["stopped_early"],
        resumed_from_step=resumed_from,
        tokens=state["tokens"],
        seconds=round(time.perf_counter() - started, 2),
        tokens_this_run=state["tokens"] - tokens_at_start,
        history=state["history"],
    )


def _record_eval(
    model: nn.Module, evaluate: EvalFn, state: dict[str, Any], params: TrainingParams, best_path: Path, log: LogFn
) -> None:
    """Validation loss, best-weights file, and the early-stopping decision, all kept in `state`.

    Under torchrun rank 0 evaluates and the others take its loss, so every rank stops at the same step.
    """
    is_main = distributed.is_main()
    model.eval()
    with torch.no_grad():
        loss = distributed.from_main(float(evaluate(model)) if is_main else math.nan)
    state["last_eval"] = loss
    metrics = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50))}
    state["history"].append({"step": state["step"], **metrics})
    if is_main:
        log(metrics, state["step"])
    if loss < state["best"]:
        state["best"], state["bad_evals"] = loss, 0
        if is_main:
            staging = best_path.with_name(f"{best_path.name}.tmp-{os.getpid()}")
            with writing(best_path, staging), os_errors_of_safetensors():
                save_model(model, str(staging))
                staging.replace(best_path)
    else:
        state["bad_evals"] += 1
        if params.early_stopping_patience and state["bad_evals"] >= params.early_stopping_patience:
            state["stopped_early"] = True
