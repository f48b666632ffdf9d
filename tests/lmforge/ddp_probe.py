"""Run by tests/lmforge/test_distributed.py under torchrun (or alone): trains a tiny model with
lmforge's training loop and writes, for every micro-batch this rank trained on, the rows it saw and a
digest of the weights it saw them with, then the final weights."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from lmforge import distributed
from lmforge.schema import TrainingParams
from lmforge.training import pick_device, train


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(out: Path) -> None:
    device = pick_device()
    torch.manual_seed(0)
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    seen: list[dict[str, object]] = []

    def loss_of(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append({"rows": batch["row"].tolist(), "weights": weights_digest(model)})
        return nn.functional.cross_entropy(module(batch["input_ids"]), batch["y"])

    params = TrainingParams(max_steps=12, epochs=2, min_steps=0, batch_size=10, learning_rate=0.05, eval_every=4,
                            checkpoint_every=6, log_every=3, precision="fp32", early_stopping_patience=0)  # fmt: skip
    result = train(
        model, len(x), lambda rows, generator: {"input_ids": x[rows], "y": y[rows], "row": rows},
        lambda m: float(nn.functional.cross_entropy(m(x[:32]), y[:32])),
        params, seed=3, checkpoint_dir=out / "checkpoints", run_fingerprint="probe", log=lambda metrics, step: None,
        description="probe", device=device, loss_of=loss_of,
    )  # fmt: skip
    rank = distributed.rank()
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "steps": result.steps}))
    if distributed.is_main():
        save_model(model, str(out / "model.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
