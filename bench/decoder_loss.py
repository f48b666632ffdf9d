"""Training tokens/s of the default decoder, before and after its two changes, side by side in one run.

The decoder (GPT-2, hidden 128, 2 layers, vocabulary 8,000) pays the vocabulary projection and a
softmax over 8,000 tokens at every position. Rows, each in lmforge's loop (lmforge.training.train,
lmforge's allocator settings on, as in the stages): the model's own loss with dropout 0.1 (the
decoder before), the model's own loss without dropout (its default now), and
lmforge.losses.causal_lm_loss without dropout (the logits of labelled positions only, their softmax
and its gradient a cache-sized chunk of rows at a time: what pretrain and finetune use now). Two
shapes: pretraining's packed blocks (8 x 128) and continuation fine-tuning's batches (16 reviews of
ragged length, padded to the longest; a quarter of each review's tokens unscored). Median of
--repeats interleaved runs of --steps steps each, after one warm-up step.

    python -m bench.decoder_loss [--steps 30] [--repeats 3]

Prints a table and writes bench/results/decoder_loss.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench.machine import describe
from lmforge.allocator import keep_freed_memory
from lmforge.losses import causal_lm_loss
from lmforge.models import build_pretrain_model
from lmforge.schema import ModelArchitecture, TrainingParams
from lmforge.tokenization import IGNORE_INDEX
from lmforge.training import BatchFn, LossFn, model_loss, train

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, PAD = 8000, 0
SHAPES = {"pretraining, 8 x 128 blocks": (8, 128, 128), "fine-tuning, 16 ragged reviews": (16, 12, 128)}


def new_decoder(dropout: float) -> torch.nn.Module:
    arch = ModelArchitecture(architecture="gpt", objective="causal", dropout=dropout)
    return build_pretrain_model(arch, VOCAB, PAD, 2, 3, seed=0)


def batches(shape: tuple[int, int, int]) -> BatchFn:
    """Rows of random tokens, lengths between shape's bounds (all full length for blocks)."""
    rows, shortest, longest = shape

    def make(indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = torch.randint(shortest, longest + 1, (rows,), generator=generator)
        width = int(lengths.max())
        input_ids = torch.randint(5, VOCAB, (rows, width), generator=generator)
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if shortest < longest:  # a prompt: its tokens unscored
            labels[:, : shortest // 4 + 1] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return make


def loop(steps: int, precision: str, shape: tuple[int, int, int], dropout: float, loss_of: LossFn) -> float:
    """lmforge.training.train as the stages run it. Returns tokens/s (padding not counted)."""
    rows = shape[0]
    params = TrainingParams(max_steps=steps + 1, batch_size=rows, eval_every=10**6, checkpoint_every=10**6,
                            log_every=10**6, precision=precision, warmup_ratio=0.0, learning_rate=1e-3)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        result = train(new_decoder(dropout), rows * (steps + 1), batches(shape), lambda m: 0.0, params, 0,
                       Path(folder), "bench", log=lambda metrics, step: None, description="bench",
                       loss_of=loss_of)  # fmt: skip
    return result.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()  # per process: on for every row, as in the stages
    variants: dict[str, tuple[float, LossFn]] = {
        "model's loss, dropout 0.1 (before)": (0.1, model_loss),
        "model's loss, no dropout": (0.0, model_loss),
        "causal_lm_loss, no dropout (now)": (0.0, causal_lm_loss),
    }
    rows = []
    for shape_name, shape in SHAPES.items():
        for precision in ("fp32", "bf16"):
            timings: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeats):  # interleaved, so a slow moment of the machine hits every variant
                for name, (dropout, loss_of) in variants.items():
                    timings[name].append(loop(args.steps, precision, shape, dropout, loss_of))
            before = statistics.median(timings["model's loss, dropout 0.1 (before)"])
            for name, values in timings.items():
                rows.append({"shape": shape_name, "variant": name, "precision": precision,
                             "tokens_per_s": statistics.median(values), "runs": values,
                             "x_before": statistics.median(values) / before})  # fmt: skip
    print(f"{'shape':<32} {'variant':<36} {'dtype':<5} {'tokens/s':>9} {'x before':>9}")
    for row in rows:
        print(f"{row['shape']:<32} {row['variant']:<36} {row['precision']:<5} {row['tokens_per_s']:>9.0f} "
              f"{row['x_before']:>8.2f}x")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decoder_loss.json").write_text(json.dumps(
        {"machine": describe(), "steps": args.steps, "repeats": args.repeats, "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
