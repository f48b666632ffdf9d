from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmforge.losses import causal_lm_loss, linear_cross_entropy

PAD = 0


def tiny_decoder() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


def ragged_batch() -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, each row's first three tokens unscored (a prompt)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 300, (5, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate([20, 17, 9, 14, 4]):
        input_ids[row, length:] = PAD
        attention_mask[row, length:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model: GPT2LMHeadModel, loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_causal_lm_loss_is_the_models_own_loss_and_gradients():
    model, batch = tiny_decoder(), ragged_batch()
    own, own_grads = loss_and_grads(model, model(**batch).loss)
    ours, our_grads = loss_and_grads(model, causal_lm_loss(model, batch))
    assert ours == pytest.approx(own, abs=1e-5)
    for name, grad in own_grads.items():
        assert torch.allclose(our_grads[name], grad, atol=1e-6), name


def test_causal_lm_loss_matches_under_bf16_autocast():
    """bf16 rounds the two paths differently: the same loss and gradients to bf16's precision."""
    model, batch = tiny_decoder(), ragged_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own, own_grads = loss_and_grads(model, model(**batch).loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, our_grads = loss_and_grads(model, causal_lm_loss(model, batch))
    assert ours == pytest.approx(own, rel=1e-2)
    for name, grad in own_grads.items():
        assert (our_grads[name] - grad).norm() <= 0.02 * grad.norm() + 1e-6, name
        assert our_grads[name].dtype == torch.float32


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_linear_cross_entropy_is_cross_entropy_in_any_chunks(chunk_rows):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 8, generator=generator, requires_grad=True)
    weight = torch.randn(30, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 30, (50,), generator=generator)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    expected_grads = torch.autograd.grad(3.0 * expected, (hidden, weight))  # a scaled loss scales its gradients
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(3.0 * loss, (hidden, weight))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_validation_without_gradients_gives_the_same_loss():
    model, batch = tiny_decoder(), ragged_batch()
    with torch.no_grad():
        assert causal_lm_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), abs=1e-5)
