"""pretrain: data/processed -> models/pretrained/<model>/ (HF format, safetensors) + checkpoints/.

Builds one model of `pretrain.models` (a BERT encoder with masked LM or masked LM + next-sentence
prediction, a GPT decoder or an LSTM with causal LM) and trains it on the packed blocks. Killed and
started again, it resumes from its last complete checkpoint. The batches of each objective are made
below; every random choice draws from the generator passed in, so the loop can checkpoint it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from lmforge import distributed, tracking
from lmforge.artifacts import PackedCorpus, PretrainReport
from lmforge.errors import Follower, LmforgeError, TransientError
from lmforge.figures import curve_figure, log_figures
from lmforge.io import atomic_output_dir, files_sha256, fingerprint, write_json
from lmforge.losses import causal_lm_loss
from lmforge.models import PRETRAIN_PARAMS, build_pretrain_model, count_parameters
from lmforge.params import Params
from lmforge.schema import RECIPE_LR, HFModel, ModelArchitecture, Section, TrainingParams
from lmforge.stage import Stage, dep, item_of, output, scratch
from lmforge.tokenization import BlockMarks, pack_corpus, read_blocks
from lmforge.training import BatchFn, LogFn, LossFn, TrainResult, model_loss, pick_device, train, with_learning_rate


@dataclass(frozen=True)
class PretrainPaths:
    blocks: Path = dep("data/processed/pretrain: packed token blocks")
    corpus: Path = dep(
        "data/raw/corpus: the corpus text, packed with a Hugging Face model's own tokenizer to train it further"
    )
    tokenizer: Path = dep("data/processed/tokenizer: the tokenizer trained on the corpus")
    out: Path = output("models/pretrained/<model>: the model in HF format")
    checkpoints: Path = scratch("checkpoints/pretrain/<model>: resumable checkpoints")
    report: Path = output("reports/pretrain/<model>.json")
    metrics: Path = output("metrics/pretrain/<model>.json: the figures to compare (DVC metrics)")


# --- batches of each objective --------------------------------------------------------------------


class SpecialIds:
    def __init__(self, pad: int, unk: int, cls: int, sep: int, mask: int, vocab_size: int) -> None:
        self.pad, self.unk, self.cls, self.sep, self.mask, self.vocab_size = pad, unk, cls, sep, mask, vocab_size

    @property
    def never_masked(self) -> list[int]:
        return [self.pad, self.cls, self.sep]


def mask_tokens(
    input_ids: torch.Tensor, ids: SpecialIds, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's dynamic masking: choose `probability` of the ordinary tokens; of those 80% -> [MASK],
    10% -> a random token, 10% kept. Labels are -100 everywhere else."""
    labels = input_ids.clone()
    maskable = ~torch.isin(input_ids, torch.tensor(ids.never_masked))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    labels[~chosen] = -100
    inputs = input_ids.clone()
    to_mask = chosen & (torch.rand(input_ids.shape, generator=generator) < 0.8)
    inputs[to_mask] = ids.mask
    to_random = chosen & ~to_mask & (torch.rand(input_ids.shape, generator=generator) < 0.5)
    inputs[to_random] = torch.randint(ids.vocab_size, input_ids.shape, generator=generator)[to_random]
    return inputs, labels


def _blocks(blocks: np.ndarray, indices: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(blocks[indices.numpy()], dtype=np.int64))


def mlm_batches(blocks: np.ndarray, ids: SpecialIds, probability: float) -> BatchFn:
    def make(indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        input_ids = _blocks(blocks, indices)
        inputs, labels = mask_tokens(input_ids, ids, probability, generator)
        return {"input_ids": inputs, "attention_mask": (input_ids != ids.pad).long(), "labels": labels}

    return make


def nsp_pairs(
    input_ids: torch.Tensor, all_blocks: np.ndarray, ids: SpecialIds, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[CLS] A [SEP] B [SEP]` from each block: B continues A (label 0) or, half the time, is the
    second half of a random other block (label 1). Returns input_ids, token_type_ids, labels."""
    batch, length = input_ids.shape
    a_len = (length - 3) // 2
    b_len = length - 3 - a_len
    body = input_ids[:, 1:]  # drop the block's own [CLS]
    first, second = body[:, :a_len], body[:, a_len : a_len + b_len]
    is_random = torch.rand(batch, generator=generator) < 0.5
    others = torch.randint(len(all_blocks), (batch,), generator=generator)
    other_halves = torch.from_numpy(np.asarray(all_blocks[others.numpy()], dtype=np.int64))[
        :, 1 + a_len : 1 + a_len + b_len
    ]
    second = torch.where(is_random[:, None], other_halves, second)
    cls = torch.full((batch, 1), ids.cls)
    sep = torch.full((batch, 1), ids.sep)
    pairs = torch.cat([cls, first, sep, second, sep], dim=1)
    token_types = torch.cat(
        [torch.zeros(batch, a_len + 2, dtype=torch.long), torch.ones(batch, b_len + 1, dtype=torch.long)], dim=1
    )
    return pairs, token_types, is_random.long()


def mlm_nsp_batches(blocks: np.ndarray, ids: SpecialIds, probability: float) -> BatchFn:
    def make(indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pairs, token_types, next_sentence = nsp_pairs(_blocks(blocks, indices), blocks, ids, generator)
        inputs, labels = mask_tokens(pairs, ids, probability, generator)
        return {
            "input_ids": inputs,
            "token_type_ids": token_types,
            "attention_mask": (pairs != ids.pad).long(),
            "labels": labels,
            "next_sentence_label": next_sentence,
        }

    return make


def causal_batches(blocks: np.ndarray, ids: SpecialIds) -> BatchFn:
    def make(indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        input_ids = _blocks(blocks, indices)
        labels = input_ids.masked_fill(input_ids == ids.pad, -100)
        return {"input_ids": input_ids, "attention_mask": (input_ids != ids.pad).long(), "labels": labels}

    return make


def batch_maker(objective: str, blocks: np.ndarray, ids: SpecialIds, probability: float) -> BatchFn:
    if objective == "mlm":
        return mlm_batches(blocks, ids, probability)
    if objective == "mlm_nsp":
        return mlm_nsp_batches(blocks, ids, probability)
    return causal_batches(blocks, ids)


def masked_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BertForMaskedLM's (and BertForPreTraining's) loss, with vocabulary logits only where a token is masked.

    The model's own forward projects every position onto the vocabulary and then ignores the 85%
    that are not masked; in a small encoder that projection is most of the compute (as the Cramming
    paper notes). Same number as `model(**batch).loss`, up to float rounding (tests/stages/test_pretrain.py).
    """
    labels = batch["labels"]
    encoder: Any = model.bert
    heads: Any = model.cls  # BertOnlyMLMHead, or BertPreTrainingHeads (predictions + seq_relationship)
    encoded = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch.get("token_type_ids"))  # fmt: skip
    picked = labels != -100
    logits = (heads.predictions if hasattr(heads, "seq_relationship") else heads)(encoded.last_hidden_state[picked])
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[picked])
    if "next_sentence_label" in batch:  # BertForPreTraining: the next-sentence loss, summed as it sums them
        relation = heads.seq_relationship(encoded.pooler_output)
        loss = loss + torch.nn.functional.cross_entropy(relation.float(), batch["next_sentence_label"])
    return loss


def loss_for(objective: str) -> LossFn:
    return masked_lm_loss if objective in ("mlm", "mlm_nsp") else causal_lm_loss


def validation_loss(model: torch.nn.Module, make_batch: BatchFn, n_blocks: int, batch_size: int, seed: int,
                    loss_of: LossFn = model_loss) -> float:  # fmt: skip
    """Mean loss over the validation blocks, with masks drawn from a fresh generator each time so
    every evaluation scores the same masked positions (and the training RNGs are left untouched)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n_blocks, batch_size):
        indices = torch.arange(start, min(start + batch_size, n_blocks))
        batch = {k: v.to(device) for k, v in make_batch(indices, generator).items()}
        total += float(loss_of(model, batch)) * len(indices)
        count += len(indices)
    return total / max(count, 1)


# --- the stage ------------------------------------------------------------------------------------


def special_ids(tokenizer: Any) -> SpecialIds:
    return SpecialIds(
        pad=tokenizer.pad_token_id, unk=tokenizer.unk_token_id, cls=tokenizer.cls_token_id,
        sep=tokenizer.sep_token_id, mask=tokenizer.mask_token_id, vocab_size=len(tokenizer),
    )  # fmt: skip


HF_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")  # config, weights, tokenizer: never a pickle
HF_SOURCE = "lmforge_source.json"  # where a copied Hugging Face model came from, beside it


def hf_model_folder(model: HFModel, key: str) -> Path:
    """The Hugging Face model's files: its local folder, or the hub's download of them (the files in HF_FILES)."""
    local = Path(model.source)
    if local.exists():
        if not (local / "config.json").is_file():
            raise LmforgeError(f"{key}.source: {local} is not a Hugging Face model folder (no config.json)")
        return local
    if model.source.startswith((".", "/")) or model.source.count("/") > 1:
        raise LmforgeError(f"{key}.source: local model folder {model.source} does not exist")
    if not model.revision:  # a hub branch moves: the same params would copy other weights next time
        raise LmforgeError(f"{key}.revision: pin the hub revision of {model.source!r} (its commit sha on the hub)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(model.source, revision=model.revision, allow_patterns=list(HF_FILES)))
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise LmforgeError(f"{key}.source: no hub model {model.source!r} at revision {model.revision or 'main'} "
                           f"({type(error).__name__})") from None  # fmt: skip
    except Exception as error:  # offline or the hub down: another try may work
        raise TransientError(f"{key}.source: cannot download {model.source!r} from the Hugging Face hub "
                             f"({' '.join(str(error).split())[:160]})") from None  # fmt: skip


def checked_hf_folder(model: HFModel, key: str) -> tuple[Path, dict[str, Any], int]:
    """The Hugging Face model's folder, its config and its parameter count, once it is known to hold
    safetensors weights and to ask for no code of its own."""
    from safetensors import safe_open

    folder = hf_model_folder(model, key)
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map"):  # the model's own Python, which trust_remote_code would run: never
        raise LmforgeError(f"{key}.source: {folder} asks for code of its own (auto_map in config.json); lmforge "
                           "runs only the transformers architectures it ships with")  # fmt: skip
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise LmforgeError(f"{key}.source: {folder} holds no safetensors weights (lmforge never loads a pickled "
                           "model file)")  # fmt: skip
    n_parameters = 0
    for file in weights:
        with safe_open(str(file), "pt") as tensors:
            n_parameters += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())  # noqa: SIM118
    return folder, config, n_parameters


def copy_hf_files(folder: Path, staging: Path) -> None:
    """Its config, weights and tokenizer. lmforge's own records (a model lmforge pretrained elsewhere) stay
    behind: its tokenizer is not this pipeline's, so fine-tuning treats it like any Hugging Face model."""
    files = {file for pattern in HF_FILES for file in folder.glob(pattern) if file.is_file()}
    for file in sorted(file for file in files if not file.name.startswith("lmforge_")):
        shutil.copyfile(file, staging / file.name)


def copy_hf_model(params: PretrainSection, model: HFModel, paths: PretrainPaths) -> PretrainReport:
    """Copy a Hugging Face model's config, safetensors weights and tokenizer into paths.out (no training)."""
    key = f"pretrain.models.{params.name}"
    started = time.perf_counter()
    folder, _, n_parameters = checked_hf_folder(model, key)
    with tracking.stage_run("pretrain", {"model": params.name, **model.model_dump()}, item=params.name) as run:
        with atomic_output_dir(paths.out) as staging:
            copy_hf_files(folder, staging)
            write_json(staging / HF_SOURCE, {"source": model.source, "revision": model.revision,
                                             "files": files_sha256(staging, "*")})  # fmt: skip
        report = PretrainReport(
            val_loss=None, val_perplexity=None, steps=0, tokens=0, seconds=round(time.perf_counter() - started, 2),
            tokens_per_second=0, n_parameters=n_parameters, stopped_early=False, resumed_from_step=None,
            mlflow_run_id=run.info.run_id,
        )  # fmt: skip
        mlflow.log_param("n_parameters", n_parameters)
    return report


def hf_objective(config: dict[str, Any], key: str) -> str:
    """mlm or causal, from the architectures config.json names: what the model was pretrained to do."""
    names = [str(name) for name in config.get("architectures") or []]
    if any(name.endswith(("ForMaskedLM", "ForPreTraining")) for name in names):
        return "mlm"
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in names):
        return "causal"
    raise LmforgeError(f"{key}.continue_pretraining: config.json's architectures ({', '.join(names) or 'none'}) "
                       "name neither a masked LM nor a causal LM head to train further")  # fmt: skip


def hf_special_ids(tokenizer: Any) -> tuple[SpecialIds, BlockMarks]:
    """The ids a Hugging Face tokenizer gives the batches and the packing. A GPT-2-style tokenizer has no [CLS],
    [SEP] or padding: documents end with its end-of-text token and a partial last block is dropped; its "pad" is
    an id no block holds (the vocabulary size), so every position is attended to and learned."""
    vocab_size = len(tokenizer)
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if separator is None:
        raise LmforgeError("its tokenizer has neither a separator nor an end-of-text token to end documents with")
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else None
    pad = tokenizer.pad_token_id
    ids = SpecialIds(pad=vocab_size if pad is None else pad, unk=tokenizer.unk_token_id,
                     cls=vocab_size if start is None else start, sep=separator,
                     mask=tokenizer.mask_token_id, vocab_size=vocab_size)  # fmt: skip
    return ids, BlockMarks(start, separator, pad, tokenizer.unk_token_id)


def continue_hf_model(section: PretrainSection, model: HFModel, paths: PretrainPaths) -> PretrainReport:
    """Train a Hugging Face model further on the pretraining corpus (domain adaptation) with its own tokenizer,
    by the objective it was pretrained with, then write it (and its tokenizer) as the stage's model.

    Its tokenizer is its own, not this pipeline's: the corpus text (data/raw/corpus) is packed with it into
    blocks beside the checkpoints, and fine-tuning treats the result like any Hugging Face model."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    key = f"pretrain.models.{section.name}"
    folder, config, n_parameters = checked_hf_folder(model, key)
    objective = hf_objective(config, key)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # trust_remote_code stays off
    try:
        ids, marks = hf_special_ids(tokenizer)
    except LmforgeError as error:
        raise LmforgeError(f"{key}.source: {error}") from None
    if objective == "mlm" and ids.mask is None:
        raise LmforgeError(f"{key}.source: a masked LM's tokenizer needs a mask token; {folder}'s has none")
    positions = int(config.get("max_position_embeddings") or config.get("n_positions") or model.block_size)
    if model.block_size > positions:
        raise LmforgeError(f"{key}.block_size ({model.block_size}) is longer than the model's {positions} positions")
    blocks_dir = paths.checkpoints / "blocks"
    blocks_dir.mkdir(parents=True, exist_ok=True)
    packed = {side: pack_corpus(tokenizer.backend_tokenizer, paths.corpus / f"{side}.txt", blocks_dir / f"{side}.bin",
                                model.block_size, batch_size=1000, marks=marks)
              for side in ("train", "val")}  # fmt: skip
    train_blocks, val_blocks = (read_blocks(blocks_dir / f"{side}.bin", packed[side]["dtype"], model.block_size)
                                for side in ("train", "val"))  # fmt: skip
    own = ("max_steps", "epochs", "batch_size")
    budget = {name: getattr(model, name) for name in own if getattr(model, name) is not None}
    training = section.training.model_copy(update={**budget, "learning_rate": model.learning_rate})
    n_val = min(len(val_blocks), training.max_eval_samples or len(val_blocks))
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    net = auto.from_pretrained(str(folder), use_safetensors=True)
    make_batch = batch_maker(objective, train_blocks, ids, section.mlm_probability)
    make_val_batch = batch_maker(objective, val_blocks, ids, section.mlm_probability)
    inputs = files_sha256(blocks_dir, "*.bin") | files_sha256(folder, "*.safetensors")
    run_fingerprint = fingerprint(model.model_dump(), training.model_dump(), section.seed, section.mlm_probability,
                                  inputs)  # fmt: skip
    resolved = {"model": section.name, **model.model_dump(), "objective": objective, "training": training.model_dump(),
                "seed": section.seed, "vocab_size": len(tokenizer)}  # fmt: skip
    with tracking.stage_run("pretrain", resolved, item=section.name) as mlflow_run:
        mlflow.log_param("n_parameters", n_parameters)
        before = validation_loss(net, make_val_batch, n_val, training.batch_size, section.seed)
        result = train(
            net, len(train_blocks), make_batch,
            lambda m: validation_loss(m, make_val_batch, n_val, training.batch_size, section.seed),
            training, section.seed, paths.checkpoints, run_fingerprint, log=tracking.log_metrics_async,
            description=f"pretrain {section.name} (continued, {objective})", device=pick_device(),
        )  # fmt: skip
        report = PretrainReport(
            val_loss=result.best_eval_loss, val_perplexity=math.exp(min(result.best_eval_loss, 50)),
            steps=result.steps, tokens=result.tokens, seconds=result.seconds,
            tokens_per_second=round(result.tokens_per_second), n_parameters=n_parameters,
            stopped_early=result.stopped_early, resumed_from_step=result.resumed_from_step,
            mlflow_run_id=mlflow_run.info.run_id,
        )  # fmt: skip
        mlflow.log_metrics({"val_loss_before": before, **{k: float(v) for k, v in report.data().items()
                            if isinstance(v, int | float) and not isinstance(v, bool)}})  # fmt: skip
        if result.history:
            log_figures({"training_curve": curve_figure(result.history, f"pretrain@{section.name}: validation loss")})
        with atomic_output_dir(paths.out) as staging:
            copy_hf_files(folder, staging)  # its tokenizer and config, as they were; the weights are replaced
            for file in staging.glob("*.safetensors"):
                file.unlink()
            net.cpu().save_pretrained(str(staging), safe_serialization=True)
            write_json(staging / "history.json", result.history)
            write_json(staging / HF_SOURCE, {"source": model.source, "revision": model.revision,
                                             "continued": {"objective": objective, "steps": result.steps,
                                                           "val_loss_before": before,
                                                           "val_loss_after": result.best_eval_loss},
                                             "files": files_sha256(staging, "*")})  # fmt: skip
    return report


def run(section: PretrainSection, paths: PretrainPaths) -> PretrainReport:
    """Pretrain one model of pretrain.models on the packed blocks and write it in HF format (safetensors);
    a Hugging Face model (architecture hf) is copied in as it is."""
    from transformers import AutoTokenizer

    name, arch = section.name, section.model
    if isinstance(arch, HFModel):
        return (
            continue_hf_model(section, arch, paths)
            if arch.continue_pretraining
            else copy_hf_model(section, arch, paths)
        )
    meta = PackedCorpus.read(paths.blocks / "meta.json")
    block_size = meta.train.block_size
    if arch.max_length < block_size:
        raise LmforgeError(
            f"pretrain.models.{name}.max_length ({arch.max_length}) is shorter than the packed blocks "
            f"(preprocess.block_size = {block_size})"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    ids = special_ids(tokenizer)
    train_blocks = read_blocks(paths.blocks / meta.train.file, meta.train.dtype, block_size)
    val_blocks = read_blocks(paths.blocks / meta.val.file, meta.val.dtype, block_size)
    own = ("max_steps", "epochs", "batch_size")  # the model's own budget, where it sets one
    budget = {key: getattr(arch, key) for key in own if getattr(arch, key) is not None}
    training = with_learning_rate(section.training, RECIPE_LR["pretrain"]).model_copy(update=budget)
    n_val = min(len(val_blocks), training.max_eval_samples or len(val_blocks))

    model = build_pretrain_model(arch, len(tokenizer), ids.pad, ids.cls, ids.sep, section.seed)
    make_batch = batch_maker(arch.objective, train_blocks, ids, section.mlm_probability)
    make_val_batch = batch_maker(arch.objective, val_blocks, ids, section.mlm_probability)
    # The token files and tokenizer themselves, not only their counts: a checkpoint trained on other
    # tokens (a retrained tokenizer, new data of the same size) is never resumed.
    inputs = files_sha256(paths.blocks, "*.bin") | files_sha256(paths.tokenizer, "tokenizer.json")
    run_fingerprint = fingerprint(arch.model_dump(), training.model_dump(), section.seed, section.mlm_probability,
                                  meta.data(), inputs)  # fmt: skip
    resolved = {
        "model": name,
        **arch.model_dump(),
        "training": training.model_dump(),
        "seed": section.seed,
        "mlm_probability": section.mlm_probability,
        "vocab_size": len(tokenizer),
        "block_size": block_size,
    }
    device = pick_device()  # under torchrun: this rank's, after joining the process group
    loss_of = loss_for(arch.objective)

    def train_model(log: LogFn) -> TrainResult:
        return train(
            model, len(train_blocks), make_batch,
            lambda m: validation_loss(m, make_val_batch, n_val, training.batch_size, section.seed, loss_of),
            training, section.seed, paths.checkpoints, run_fingerprint, log=log,
            description=f"pretrain {name} ({arch.architecture}, {arch.objective})", device=device, loss_of=loss_of,
        )  # fmt: skip

    if not distributed.is_main():  # another rank of a multi-device run: it trains; rank 0 records and writes
        train_model(log=lambda metrics, step: None)
        raise Follower
    with tracking.stage_run("pretrain", resolved, item=name) as mlflow_run:
        mlflow.log_param("n_parameters", count_parameters(model))
        result = train_model(log=tracking.log_metrics_async)
        report = PretrainReport(
            val_loss=result.best_eval_loss,
            val_perplexity=math.exp(min(result.best_eval_loss, 50)),
            steps=result.steps,
            tokens=result.tokens,
            seconds=result.seconds,
            tokens_per_second=round(result.tokens_per_second),
            n_parameters=count_parameters(model),
            stopped_early=result.stopped_early,
            resumed_from_step=result.resumed_from_step,
            mlflow_run_id=mlflow_run.info.run_id,
        )
        mlflow.log_metrics({k: float(v) for k, v in report.data().items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})  # fmt: skip
        if result.history:
            log_figures({"training_curve": curve_figure(result.history, f"pretrain@{name}: validation loss")})
        with atomic_output_dir(paths.out) as staging:
            model.cpu().save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
            write_json(staging / PRETRAIN_PARAMS, resolved)  # the resolved config travels with the model
            write_json(staging / "history.json", result.history)
    return report


def summary(report: PretrainReport, paths: PretrainPaths) -> str:
    if report.val_loss is None or report.val_perplexity is None:
        return f"pretrain: copied a model of {report.n_parameters:,} parameters (no training) to {paths.out}"
    return (f"pretrain: val loss {report.val_loss:.3f} (perplexity {report.val_perplexity:.1f}) after {report.steps} "
            f"steps, {report.tokens_per_second} tokens/s; wrote {paths.out}")  # fmt: skip


class PretrainSection(Section):
    """What one pretrain@<model> stage reads of params.yaml."""

    name: str
    seed: int
    mlm_probability: float
    training: TrainingParams
    model: ModelArchitecture | HFModel


def section(params: Params, item: str | None) -> PretrainSection:
    model = item_of(params.pretrain.models, item, "pretrain.models")
    return PretrainSection(name=str(item), seed=params.pretrain.seed, mlm_probability=params.pretrain.mlm_probability,
                           training=params.pretrain.training, model=model)  # fmt: skip


STAGE = Stage("pretrain", ("pretrain.seed", "pretrain.mlm_probability", "pretrain.training", "pretrain.models.{item}"),
              section, PretrainPaths, run, summary, lambda paths: paths.report, item="model",
              relaunch=lambda section, argv: distributed.relaunch(
                  1 if isinstance(section.model, HFModel) else section.training.devices,  # a copy trains nothing
                  "pretrain.training.devices", "stages.pretrain", argv))  # fmt: skip
