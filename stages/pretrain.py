"""pretrain: data/processed -> models/pretrained/<model>/ (HF format, safetensors) + checkpoints/.

Builds the model named by --model from `pretrain.models.<model>` (a BERT encoder with masked LM or
masked LM + next-sentence prediction, a GPT decoder or an LSTM with causal LM) and trains it on the
packed blocks. Killed and started again, it resumes from its last complete checkpoint.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import mlflow

from lmforge import tracking
from lmforge.errors import LmforgeError, run_main
from lmforge.io import atomic_output_dir, files_sha256, fingerprint, read_json, write_json, write_json_atomic
from lmforge.models import build_pretrain_model, count_parameters
from lmforge.params import PretrainParams, load_params
from lmforge.pretraining import SpecialIds, batch_maker, validation_loss
from lmforge.tokenization import read_blocks
from lmforge.training import pick_device, train


def special_ids(tokenizer: Any) -> SpecialIds:
    return SpecialIds(
        pad=tokenizer.pad_token_id, unk=tokenizer.unk_token_id, cls=tokenizer.cls_token_id,
        sep=tokenizer.sep_token_id, mask=tokenizer.mask_token_id, vocab_size=len(tokenizer),
    )  # fmt: skip


def run(params: PretrainParams, name: str, processed: Path, out_dir: Path, checkpoints: Path) -> dict[str, Any]:
    """Pretrain model `name`; write it to out_dir; return its metrics."""
    from transformers import AutoTokenizer

    if name not in params.models:
        raise LmforgeError(f"pretrain.models: no model named {name!r} (have: {', '.join(params.models)})")
    arch = params.models[name]
    meta = read_json(processed / "pretrain" / "meta.json")
    block_size = meta["train"]["block_size"]
    if arch.max_length < block_size:
        raise LmforgeError(
            f"pretrain.models.{name}.max_length ({arch.max_length}) is shorter than the packed blocks "
            f"(preprocess.block_size = {block_size})"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(processed / "tokenizer"))
    ids = special_ids(tokenizer)
    train_blocks = read_blocks(processed / "pretrain" / meta["train"]["file"], meta["train"]["dtype"], block_size)
    val_blocks = read_blocks(processed / "pretrain" / meta["val"]["file"], meta["val"]["dtype"], block_size)
    training = params.training
    n_val = min(len(val_blocks), training.max_eval_samples or len(val_blocks))

    model = build_pretrain_model(arch, len(tokenizer), ids.pad, ids.cls, ids.sep, params.seed)
    make_batch = batch_maker(arch.objective, train_blocks, ids, params.mlm_probability)
    make_val_batch = batch_maker(arch.objective, val_blocks, ids, params.mlm_probability)
    # The token files and tokenizer themselves, not only their counts: a checkpoint trained on other
    # tokens (a retrained tokenizer, new data of the same size) is never resumed.
    inputs = files_sha256(processed / "pretrain", "*.bin") | files_sha256(processed / "tokenizer", "tokenizer.json")
    run_id = fingerprint(arch.model_dump(), training.model_dump(), params.seed, params.mlm_probability, meta, inputs)
    resolved = {
        "model": name,
        **arch.model_dump(),
        "training": training.model_dump(),
        "seed": params.seed,
        "mlm_probability": params.mlm_probability,
        "vocab_size": len(tokenizer),
        "block_size": block_size,
    }
    device = pick_device()

    with tracking.stage_run("pretrain", resolved, task=name) as mlflow_run:
        mlflow.log_param("n_parameters", count_parameters(model))
        result = train(
            model, len(train_blocks), make_batch,
            lambda m: validation_loss(m, make_val_batch, n_val, training.batch_size, params.seed),
            training, params.seed, checkpoints, run_id,
            log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
            description=f"pretrain {name} ({arch.architecture}, {arch.objective})", device=device,
        )  # fmt: skip
        metrics = {
            "val_loss": result.best_eval_loss,
            "val_perplexity": math.exp(min(result.best_eval_loss, 50)),
            "steps": result.steps,
            "tokens": result.tokens,
            "seconds": result.seconds,
            "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9)),
            "n_parameters": count_parameters(model),
            "stopped_early": result.stopped_early,
            "resumed_from_step": result.resumed_from_step,
        }
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v is not None})
        with atomic_output_dir(out_dir) as staging:
            model.to("cpu").save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
            write_json(staging / "lmforge_params.json", resolved)  # the resolved config travels with the model
            write_json(staging / "history.json", result.history)
        metrics["mlflow_run_id"] = mlflow_run.info.run_id
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", required=True, help="a key of pretrain.models")
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--out", type=Path, help="default: models/pretrained/<model>")
    parser.add_argument("--checkpoints", type=Path, help="default: checkpoints/pretrain/<model>")
    parser.add_argument("--metrics", type=Path, help="default: reports/pretrain/<model>.json")
    args = parser.parse_args()
    params = load_params(args.params)
    out = args.out or Path("models/pretrained") / args.model
    metrics = run(params.pretrain, args.model, args.processed, out,
                  args.checkpoints or Path("checkpoints/pretrain") / args.model)  # fmt: skip
    write_json_atomic(args.metrics or Path("reports/pretrain") / f"{args.model}.json", metrics)
    print(
        f"pretrain: {args.model}: val loss {metrics['val_loss']:.3f} (perplexity {metrics['val_perplexity']:.1f}) "
        f"after {metrics['steps']} steps, {metrics['tokens_per_second']} tokens/s; wrote {out}"
    )


if __name__ == "__main__":
    run_main(main)
