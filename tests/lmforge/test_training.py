from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from lmforge.schema import TrainingParams
from lmforge.training import TrainResult, make_scheduler, micro_batches, planned_steps, train


class Recording(BertForMaskedLM):
    """A real BERT that notes whether autocast was on during its forward passes."""

    seen_autocast: list[bool]

    def forward(self, **batch):
        self.seen_autocast.append(torch.is_autocast_enabled("cpu"))
        return super().forward(**batch)


def tiny_model() -> Recording:
    torch.manual_seed(0)
    model = Recording(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16))  # fmt: skip
    model.seen_autocast = []
    return model


def batches(indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids = (indices[:, None] * 7 + torch.arange(12)[None, :]) % 45 + 5
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


def run(precision: str, tmp_path: Path) -> tuple[Recording, float]:
    model = tiny_model()
    params = TrainingParams(max_steps=4, batch_size=4, eval_every=2, checkpoint_every=2, log_every=2,
                            precision=precision, learning_rate=5e-4)  # fmt: skip
    evaluate = lambda m: float(m(**batches(torch.arange(8), torch.Generator())).loss)  # noqa: E731
    result = train(model, 32, batches, evaluate, params, 0, tmp_path / precision, precision, lambda *_: None,
                   precision, torch.device("cpu"))  # fmt: skip
    return model, result.best_eval_loss


def test_bf16_switch_turns_autocast_on_and_still_learns(tmp_path: Path):
    fp32_model, fp32_loss = run("fp32", tmp_path)
    bf16_model, bf16_loss = run("bf16", tmp_path)
    assert not any(fp32_model.seen_autocast)
    assert sum(bf16_model.seen_autocast) == 4  # each of the 4 training forwards ran under bf16 autocast
    assert math.isfinite(bf16_loss) and abs(bf16_loss - fp32_loss) < 0.5


def test_warmup_then_linear_decay_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = make_scheduler(optimizer, TrainingParams(warmup_ratio=0.2), total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[1] < rates[2] and max(rates) == rates[2]
    assert rates[-1] < rates[5] < rates[2] and scheduler.get_last_lr()[0] == 0.0


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch: pytest.MonkeyPatch):
    from lmforge import training

    cpu = torch.device("cpu")
    assert training.resolved_precision("fp32", cpu) == "fp32" and training.resolved_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: True)
    assert training.resolved_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: False)  # AVX2 only: bf16 would be emulated, slower
    assert training.resolved_precision("auto", cpu) == "fp32"
    assert not torch.is_autocast_enabled("cpu")
    with training.autocast("auto", cpu):
        assert not torch.is_autocast_enabled("cpu")


def padding(batches: list[torch.Tensor], lengths: torch.Tensor) -> int:
    return sum(int(lengths[batch].max() * len(batch) - lengths[batch].sum()) for batch in batches)


def test_length_bucketing_sees_every_example_once_and_pads_less():
    lengths = torch.randint(5, 200, (3000,), generator=torch.Generator().manual_seed(0))
    plain = micro_batches(3000, 32, seed=1, epoch=0)
    bucketed = micro_batches(3000, 32, seed=1, epoch=0, lengths=lengths)
    assert sorted(torch.cat(bucketed).tolist()) == list(range(3000))
    assert padding(bucketed, lengths) < 0.2 * padding(plain, lengths)
    assert [b.tolist() for b in bucketed] == [b.tolist() for b in micro_batches(3000, 32, 1, 0, lengths)]
    assert [b.tolist() for b in bucketed] != [b.tolist() for b in micro_batches(3000, 32, 1, 1, lengths)]


def test_small_data_gets_min_steps_and_large_data_stops_at_max_steps():
    params = TrainingParams(max_steps=300, epochs=2, batch_size=32, min_steps=200)
    assert planned_steps(600, params) == 200  # 19 steps an epoch: 38 would starve the new head
    assert planned_steps(100_000, params) == 300
    assert planned_steps(600, params.model_copy(update={"min_steps": 0})) == 38
    assert planned_steps(600, params.model_copy(update={"max_steps": 50})) == 50


def test_a_resumed_run_measures_its_speed_on_the_tokens_it_trained(tmp_path: Path):
    params = TrainingParams(max_steps=4, batch_size=4, eval_every=2, checkpoint_every=2, log_every=2,
                            precision="fp32", learning_rate=5e-4)  # fmt: skip
    evaluate = lambda m: float(m(**batches(torch.arange(8), torch.Generator())).loss)  # noqa: E731

    def train_to_the_end() -> TrainResult:
        return train(tiny_model(), 32, batches, evaluate, params, 0, tmp_path, "same-run", lambda *_: None,
                     "t", torch.device("cpu"))  # fmt: skip

    first = train_to_the_end()
    assert first.tokens == first.tokens_this_run == 4 * 4 * 12 and first.tokens_per_second > 0
    again = train_to_the_end()  # resumes from the last checkpoint: nothing left to train
    assert again.resumed_from_step == 4 and again.tokens == first.tokens
    assert again.tokens_this_run == 0 and again.tokens_per_second == 0.0  # not tokens / ~0 s
