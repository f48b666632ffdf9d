"""Pretraining throughput and MFU of the `gpu` profile's encoder, on a machine with a CUDA device.

Builds the encoder `lmforge params use gpu` describes (6 layers, 512 wide, vocabulary 21,128,
batch 64 x 256), trains it with lmforge's own loop (MLM logits at masked positions, bf16 autocast,
TF32 matmuls, fused AdamW) on synthetic blocks, and sets the achieved FLOP/s (6 x parameters touched
per token, attention scores counted) against the bf16 matmul peak measured in the same run and, if
given, the device's nominal peak (H100 SXM dense bf16: 989 TFLOP/s). Writes bench/results/gpu_profile.json.

    python -m bench.gpu_profile [--steps 50] [--nominal-tflops 989]

On a CPU it runs too (slowly; use --steps 2) so the script itself is checked where no device is.
The whole pipeline on the device: `lmforge params use gpu && lmforge run`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import describe
from lmforge.models import build_pretrain_model
from lmforge.params import profile_params
from lmforge.pretrain import SpecialIds, batch_maker, masked_lm_loss
from lmforge.training import pick_device, train

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak(device: torch.device, size: int, repeats: int = 20) -> float:
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def flops_per_token(model: torch.nn.Module, vocab: int, layers: int, width: int, length: int, masked: float) -> float:
    """Forward + backward: 6 x the parameters a token touches (the vocabulary projection only at the
    masked share), plus attention's scores and weighted sum (12 x layers x width x length)."""
    embeddings = sum(p.numel() for name, p in model.named_parameters() if "embeddings" in name)
    body = sum(p.numel() for p in model.parameters()) - embeddings
    return 6 * (body + vocab * width * masked) + 12 * layers * width * length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--nominal-tflops", type=float, default=None, help="the device's dense bf16 peak")
    args = parser.parse_args()
    params = profile_params("gpu")
    arch, training = params.pretrain.models["encoder"], params.pretrain.training
    vocab, length = params.preprocess.tokenizer.vocab_size, params.preprocess.block_size
    device = pick_device()
    ids = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=vocab)
    blocks = np.random.default_rng(0).integers(5, vocab, size=(training.batch_size * (args.steps + 1), length))
    model = build_pretrain_model(arch, vocab, ids.pad, ids.cls, ids.sep, seed=0)
    loop = training.model_copy(update={"max_steps": args.steps, "eval_every": 10**6, "checkpoint_every": 10**6,
                                       "log_every": 10**6, "warmup_ratio": 0.0, "min_steps": 0})  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        result = train(model, len(blocks), batch_maker("mlm", blocks, ids, params.pretrain.mlm_probability),
                       lambda m: 0.0, loop, 0, Path(folder), "bench", log=lambda metrics, step: None,
                       description="gpu profile encoder", device=device, loss_of=masked_lm_loss)  # fmt: skip
    tokens_per_s = result.tokens_per_second
    achieved = tokens_per_s * flops_per_token(model, vocab, arch.layers, arch.hidden_size, length,
                                              params.pretrain.mlm_probability)  # fmt: skip
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 1024)
    row = {"device": device.type, "precision": loop.precision, "steps": args.steps, "tokens_per_s": tokens_per_s,
           "achieved_flops": achieved, "bf16_matmul_peak_flops": peak, "mfu_of_measured_peak": achieved / peak,
           "mfu_of_nominal_peak": achieved / (args.nominal_tflops * 1e12) if args.nominal_tflops else None}  # fmt: skip
    print(f"{device.type}: {tokens_per_s:,.0f} tokens/s, {achieved / 1e12:.2f} TFLOP/s achieved; "
          f"bf16 matmul peak {peak / 1e12:.2f} TFLOP/s: MFU {achieved / peak:.1%}"
          + (f", {row['mfu_of_nominal_peak']:.1%} of the nominal {args.nominal_tflops:g}" if args.nominal_tflops
             else ""))  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_profile.json").write_text(json.dumps({"machine": describe(), **row}, indent=2) + "\n")


if __name__ == "__main__":
    main()
