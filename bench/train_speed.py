"""Training tokens/s of the default encoder, every variant side by side in one run (ratios, not absolutes).

Rows: a bare PyTorch loop (`model(**batch).loss`, AdamW, the reference; again with the fused AdamW
kernel), transformers' Trainer (fused AdamW by default), lmforge's loop
(lmforge.training.train) with the model's own loss, and lmforge's loop with MLM logits only at the
masked positions (lmforge.pretrain.masked_lm_loss), each in fp32 and bf16 autocast. The matmul peak of
each dtype is measured in the same run, and each row's achieved FLOP/s is set against it. Synthetic
blocks of the default shape (batch 32 x 128, vocabulary 8,000), the default encoder (hidden 128,
2 layers, ffn 512). Median of --repeats runs of --steps steps each, after one warm-up step. Every row
runs with lmforge's allocator settings (lmforge.allocator; bench/allocator.py sets them against
glibc's defaults), which lmforge's loop would otherwise switch on for the rows after it.

    python -m bench.train_speed [--steps 30] [--repeats 3]

Prints a table and writes bench/results/train_speed.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.machine import describe
from lmforge.allocator import keep_freed_memory
from lmforge.models import build_pretrain_model
from lmforge.pretrain import SpecialIds, batch_maker, masked_lm_loss
from lmforge.schema import ModelArchitecture, TrainingParams
from lmforge.training import autocast, model_loss, train

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, BLOCK, BATCH = 8000, 128, 32
IDS = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=VOCAB)


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square matmul in this dtype: the ceiling the training rows are set against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def flops_per_token(model: torch.nn.Module, masked_fraction: float | None) -> float:
    """6 x parameters touched per token (forward + backward); the vocabulary projection is paid only at
    masked positions when `masked_fraction` is given. Attention scores are left out (small at 128)."""
    embeddings = sum(p.numel() for name, p in model.named_parameters() if "embeddings" in name)
    body = sum(p.numel() for p in model.parameters()) - embeddings
    projection = VOCAB * model.config.hidden_size
    return 6 * (body + projection * (masked_fraction if masked_fraction is not None else 1.0))


def new_model() -> torch.nn.Module:
    arch = ModelArchitecture(architecture="bert", objective="mlm")
    return build_pretrain_model(arch, VOCAB, IDS.pad, IDS.cls, IDS.sep, seed=0)


def blocks(n: int) -> np.ndarray:
    found = np.random.default_rng(0).integers(5, VOCAB, size=(n, BLOCK))
    found[:, 0] = IDS.cls
    return found


def bare_loop(steps: int, precision: str, fused: bool = False) -> float:
    """The reference: no checkpoints, no validation, no logging; torch's AdamW as a user writes it
    (its default on CPU updates parameter by parameter), or the fused kernel. Returns tokens/s."""
    model, data = new_model(), blocks(BATCH * (steps + 1))
    make_batch = batch_maker("mlm", data, IDS, 0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused or None)
    generator = torch.Generator().manual_seed(0)
    model.train()
    started, tokens = 0.0, 0
    for step in range(steps + 1):
        if step == 1:  # the first step warms up allocators and kernels
            started = time.perf_counter()
        batch = make_batch(torch.arange(step * BATCH, (step + 1) * BATCH), generator)
        with autocast(precision, torch.device("cpu")):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum()) if step else 0
    return tokens / (time.perf_counter() - started)


def lmforge_loop(steps: int, precision: str, loss_of: Callable) -> float:
    """lmforge.training.train as the pretrain stage runs it (one checkpoint and one validation at the end)."""
    model, data = new_model(), blocks(BATCH * (steps + 1))
    make_batch = batch_maker("mlm", data, IDS, 0.15)
    params = TrainingParams(max_steps=steps + 1, batch_size=BATCH, eval_every=10**6, checkpoint_every=10**6,
                            log_every=10**6, precision=precision, warmup_ratio=0.0, learning_rate=1e-3)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        result = train(model, len(data), make_batch, lambda m: 0.0, params, 0, Path(folder), "bench",
                       log=lambda metrics, step: None, description="bench", loss_of=loss_of)  # fmt: skip
    return result.tokens_per_second


def hf_trainer(steps: int, precision: str) -> float:
    """transformers' Trainer on the same model, masked batches, batch size and dtype. Returns tokens/s."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data = new_model(), blocks(BATCH * (steps + 1))
    make_batch = batch_maker("mlm", data, IDS, 0.15)
    generator = torch.Generator().manual_seed(0)
    masked = [make_batch(torch.arange(i * BATCH, (i + 1) * BATCH), generator) for i in range(steps + 1)]
    examples = [{key: value[row] for key, value in batch.items()} for batch in masked for row in range(BATCH)]
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
            if getattr(state, "global_step", 0) == 1:  # after the warm-up step, as the other rows
                clock["start"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as folder:
        arguments = TrainingArguments(
            output_dir=folder, per_device_train_batch_size=BATCH, max_steps=steps + 1, learning_rate=1e-3,
            weight_decay=0.01, max_grad_norm=1.0, bf16=precision == "bf16", use_cpu=True, report_to=[],
            save_strategy="no", logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        Trainer(model=model, args=arguments, train_dataset=examples, callbacks=[Clock()]).train()
    return steps * BATCH * BLOCK / (time.perf_counter() - clock["start"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    keep_freed_memory()  # per process: on for every row, not only for those after lmforge's loop
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    variants = {
        "bare loop": lambda precision: bare_loop(args.steps, precision),
        "bare loop, fused AdamW": lambda precision: bare_loop(args.steps, precision, fused=True),
        "HF Trainer": lambda precision: hf_trainer(args.steps, precision),
        "lmforge loop": lambda precision: lmforge_loop(args.steps, precision, model_loss),
        "lmforge loop, MLM logits at masked positions": lambda precision: lmforge_loop(args.steps, precision,
                                                                                       masked_lm_loss),
    }  # fmt: skip
    rows = []
    for precision in ("fp32", "bf16"):
        timings: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved, so a slow moment of the machine hits every variant
            for name, run in variants.items():
                timings[name].append(run(precision))
        for name, values in timings.items():
            sparse = "masked" in name
            achieved = statistics.median(values) * flops_per_token(new_model(), 0.15 if sparse else None)
            rows.append(
                {
                    "variant": name,
                    "precision": precision,
                    "tokens_per_s": statistics.median(values),
                    "runs": values,
                    "achieved_flops": achieved,
                    "of_matmul_peak": achieved / peaks[precision],
                }
            )
    reference = next(row["tokens_per_s"] for row in rows if (row["variant"], row["precision"]) == ("bare loop", "fp32"))
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'variant':<46} {'dtype':<5} {'tokens/s':>9} {'x bare fp32':>11} {'of peak':>8}")
    for row in rows:
        print(f"{row['variant']:<46} {row['precision']:<5} {row['tokens_per_s']:>9.0f} "
              f"{row['tokens_per_s'] / reference:>10.2f}x {row['of_matmul_peak']:>8.1%}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    machine = describe()
    (RESULTS / "train_speed.json").write_text(json.dumps(
        {"machine": machine, "steps": args.steps, "repeats": args.repeats, "matmul_peak_flops": peaks, "rows": rows},
        indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
