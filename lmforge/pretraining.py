"""Pretraining batches from packed blocks: masked LM, masked LM + next-sentence pairs, causal LM.

Every random choice draws from the generator passed in, so the training loop can checkpoint it.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.training import BatchFn


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


def validation_loss(model: torch.nn.Module, make_batch: BatchFn, n_blocks: int, batch_size: int, seed: int) -> float:
    """Mean loss over the validation blocks, with masks drawn from a fresh generator each time so
    every evaluation scores the same masked positions (and the training RNGs are left untouched)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n_blocks, batch_size):
        indices = torch.arange(start, min(start + batch_size, n_blocks))
        batch = {k: v.to(device) for k, v in make_batch(indices, generator).items()}
        total += float(model(**batch).loss) * len(indices)
        count += len(indices)
    return total / max(count, 1)
