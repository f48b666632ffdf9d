"""Language-model losses that skip the work the models' own forwards do and then throw away.

In lmforge's small models the vocabulary projection is most of a step: a decoder 128 wide with
8,000 tokens spends more on its logits (and on the softmax over them) than on its two layers. The
models' own forwards project every position, upcast all the logits to fp32, take their
log-softmax, and in backward write a zero-filled tensor of the same size before the softmax's own
gradient: four passes over a tensor of positions x vocabulary that does not fit in cache.

`causal_lm_loss` gives `GPT2LMHeadModel(**batch).loss` (the same number, up to float rounding)
while projecting only the positions that have a label, and `linear_cross_entropy` takes the
softmax, its gradient and backward's two matmuls one cache-sized chunk of rows at a time, in the
forward pass (the loss is the last operation, so its gradient is known there): nothing of the size
positions x vocabulary outlives a chunk, so memory stays flat as batches and vocabularies grow.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GPT2LMHeadModel

from lmforge.tokenization import IGNORE_INDEX

CHUNK_ROWS = 256  # 256 rows x 8,000 tokens of fp32 logits: 8 MB, within a server CPU's L3


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `tensor` runs in: autocast's where it is on, else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over rows of cross_entropy(hidden @ weight.T, targets), the logits never held whole."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype, chunk_rows: int) -> torch.Tensor:  # fmt: skip
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n = targets.numel()
            wants_grad = hidden.requires_grad or weight.requires_grad
            grad_hidden = torch.empty_like(h) if wants_grad else None
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if wants_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, n, chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = (h[rows] @ w.T).float()
                picked = targets[rows]
                target_logits = logits.gather(1, picked[:, None]).squeeze(1)
                row_max = logits.amax(dim=-1, keepdim=True)
                exps = logits.sub_(row_max).exp_()  # in place: one exp per logit, the chunk still in cache
                row_sum = exps.sum(dim=-1)
                total += (row_max.squeeze(1) + row_sum.log() - target_logits).sum()
                if grad_hidden is not None and grad_weight is not None:
                    # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n, then both matmuls of the
                    # backward pass on this chunk: nothing of the size rows x vocabulary outlives it
                    scaled = exps.mul_((1.0 / n) / row_sum[:, None])
                    scaled[torch.arange(picked.numel(), device=h.device), picked] -= 1.0 / n
                    grad_chunk = scaled.to(dtype)
                    grad_hidden[rows] = grad_chunk @ w
                    grad_weight += (grad_chunk.T @ h[rows]).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden.to(hidden_dtype) * grad_loss, grad_weight.to(weight_dtype) * grad_loss, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:  # fmt: skip
    """`cross_entropy(hidden @ weight.T, targets)` (mean over rows), in autocast's dtype where it is on.

    hidden (rows, width), weight (vocabulary, width), targets (rows,), none of them ignored.
    """
    if targets.numel() == 0:  # cross_entropy's mean over no rows
        return (hidden.sum() * 0.0 + weight.sum() * 0.0) / 0.0
    loss: torch.Tensor = _LinearCrossEntropy.apply(hidden, weight, targets, _compute_dtype(hidden), chunk_rows)
    return loss


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`model(**batch).loss` of a GPT-2 causal LM (token t + 1 predicted from tokens up to t), with
    vocabulary logits only at positions that have a label. Any other model computes its own."""
    if not isinstance(model, GPT2LMHeadModel):
        loss: torch.Tensor = model(**batch).loss
        return loss
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    hidden = model.transformer(**inputs).last_hidden_state
    next_tokens = labels[:, 1:]
    scored = next_tokens != IGNORE_INDEX
    return linear_cross_entropy(hidden[:, :-1][scored], model.lm_head.weight, next_tokens[scored])
