"""Model builders from params, where a fine-tuning task starts, and reloading a pretrained model (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, GPT2LMHeadModel, PreTrainedModel

from lmforge.errors import LmforgeError
from lmforge.models import (
    BertForMeanPooledClassification,
    BertForWordTagging,
    LSTMForCausalLM,
    MeanPooledBertConfig,
    WordPooledBertConfig,
    base_folder,
    build_pretrain_model,
    count_parameters,
    load_pretrained,
    word_means,
)
from lmforge.schema import ModelArchitecture

VOCAB, PAD, CLS, SEP = 50, 0, 2, 3
ARCHITECTURES = {
    "bert-mlm": (ModelArchitecture(architecture="bert", objective="mlm", layers=1, heads=2, hidden_size=16,
                                   ffn_size=32, max_length=16), BertForMaskedLM),
    "bert-mlm_nsp": (ModelArchitecture(architecture="bert", objective="mlm_nsp", layers=1, heads=2, hidden_size=16,
                                       ffn_size=32, max_length=16), BertForPreTraining),
    "gpt-causal": (ModelArchitecture(architecture="gpt", objective="causal", layers=1, heads=2, hidden_size=16,
                                     ffn_size=32, max_length=16), GPT2LMHeadModel),
    "lstm-causal": (ModelArchitecture(architecture="lstm", objective="causal", layers=1, hidden_size=16,
                                      max_length=16), LSTMForCausalLM),
}  # fmt: skip


def build(name: str, seed: int = 0) -> PreTrainedModel:
    return build_pretrain_model(ARCHITECTURES[name][0], VOCAB, PAD, CLS, SEP, seed)


def logits_of(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return output.prediction_logits if isinstance(model, BertForPreTraining) else output.logits


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


# --- build_pretrain_model -------------------------------------------------------------------------


def test_the_cases_here_cover_every_architecture_and_objective() -> None:
    fields = ModelArchitecture.model_fields
    covered = {(arch.architecture, arch.objective) for arch, _ in ARCHITECTURES.values()}
    assert {architecture for architecture, _ in covered} == set(get_args(fields["architecture"].annotation))
    assert {objective for _, objective in covered} == set(get_args(fields["objective"].annotation))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_gives_its_model_with_vocabulary_logits(name: str) -> None:
    model = build(name)
    assert type(model) is ARCHITECTURES[name][1]
    assert model.config.vocab_size == VOCAB and model.config.pad_token_id == PAD
    assert logits_of(model, batch()).shape == (2, 8, VOCAB)


def test_bert_with_nsp_also_predicts_the_next_sentence() -> None:
    model = build("bert-mlm_nsp").eval()
    with torch.no_grad():
        output = model(input_ids=batch(), token_type_ids=torch.zeros(2, 8, dtype=torch.long))
    assert output.seq_relationship_logits.shape == (2, 2)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_size_in_params_is_the_size_built(name: str) -> None:
    arch = ARCHITECTURES[name][0]
    bigger = arch.model_copy(update={"layers": 2, "hidden_size": 32})
    small, large = build(name), build_pretrain_model(bigger, VOCAB, PAD, CLS, SEP, 0)
    assert small.get_input_embeddings().weight.shape == (VOCAB, 16)
    assert large.get_input_embeddings().weight.shape == (VOCAB, 32)
    assert count_parameters(large) > count_parameters(small)


def test_transformer_layers_and_heads_follow_params() -> None:
    bert = build_pretrain_model(ARCHITECTURES["bert-mlm"][0].model_copy(update={"layers": 3, "heads": 4}),
                                VOCAB, PAD, CLS, SEP, 0)  # fmt: skip
    assert len(bert.bert.encoder.layer) == 3 and bert.config.num_attention_heads == 4
    assert bert.config.intermediate_size == 32 and bert.config.max_position_embeddings == 16
    gpt = build_pretrain_model(ARCHITECTURES["gpt-causal"][0].model_copy(update={"layers": 3, "heads": 4}),
                               VOCAB, PAD, CLS, SEP, 0)  # fmt: skip
    assert len(gpt.transformer.h) == 3 and gpt.config.n_head == 4
    assert gpt.config.n_inner == 32 and gpt.config.n_positions == 16
    assert (gpt.config.bos_token_id, gpt.config.eos_token_id) == (CLS, SEP)


def test_lstm_layers_follow_params_and_its_head_is_tied_to_the_embedding() -> None:
    arch = ARCHITECTURES["lstm-causal"][0].model_copy(update={"layers": 2})
    model = build_pretrain_model(arch, VOCAB, PAD, CLS, SEP, 0)
    assert model.lstm.num_layers == 2
    assert model.head.weight is model.embed.weight


def test_lstm_loss_predicts_the_next_token() -> None:
    model = build("lstm-causal").eval()
    input_ids = batch()
    labels = input_ids.clone()
    labels[0, 5:] = -100  # ignored positions
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels)
    expected = nn.functional.cross_entropy(
        output.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(output.loss, expected)
    unshifted = nn.functional.cross_entropy(output.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert not torch.allclose(output.loss, unshifted)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_seed_decides_the_initial_weights(name: str) -> None:
    torch.manual_seed(123)  # whatever the global state was, the builder seeds it
    first = build(name, seed=7)
    torch.rand(1000)
    assert same_weights(first, build(name, seed=7))
    assert not same_weights(first, build(name, seed=8))


# --- base_folder ----------------------------------------------------------------------------------


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_base_folder_is_the_pretrained_models_folder(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "pretrained" / "encoder")
    assert base_folder(folder, "k") == str(folder)


@pytest.mark.parametrize("config_json", [False, True])
def test_base_folder_without_a_model_names_the_key(config_json: bool, tmp_path: Path) -> None:
    if config_json:  # another model is there, not this one
        model_folder(tmp_path / "decoder")
    else:  # the folder is there, but the pretrain stage never finished writing it
        (tmp_path / "encoder").mkdir()
    with pytest.raises(LmforgeError, match=r"^finetune\.tasks\.ner\.base: ") as raised:
        base_folder(tmp_path / "encoder", "finetune.tasks.ner.base")
    assert str(tmp_path / "encoder") in str(raised.value) and "pretrain" in str(raised.value)


# --- load_pretrained ------------------------------------------------------------------------------


def save(model: PreTrainedModel, folder: Path, objective: str) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "lmforge_params.json").write_text(json.dumps({"objective": objective, "seed": 0}))
    return folder


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_load_pretrained_round_trips_the_weights_from_safetensors(name: str, tmp_path: Path) -> None:
    arch, model_class = ARCHITECTURES[name]
    model = build(name, seed=3)
    folder = save(model, tmp_path / "model", arch.objective)
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    reloaded = load_pretrained(folder)
    assert type(reloaded) is model_class
    assert same_weights(model, reloaded)
    assert torch.equal(logits_of(model, batch()), logits_of(reloaded, batch()))


def test_load_pretrained_picks_the_head_from_the_objective(tmp_path: Path) -> None:
    """The same BERT weights load with the head the objective names, not whatever the config says."""
    folder = save(build("bert-mlm_nsp"), tmp_path / "model", "mlm")
    assert type(load_pretrained(folder)) is BertForMaskedLM


def test_load_pretrained_refuses_pickled_weights(tmp_path: Path) -> None:
    model = build("gpt-causal")
    folder = tmp_path / "model"
    folder.mkdir()
    model.config.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "lmforge_params.json").write_text(json.dumps({"objective": "causal"}))
    with pytest.raises(OSError, match="safetensors"):
        load_pretrained(folder)


# --- the mean-pooled classifier -------------------------------------------------------------------


def mean_pooled_from(folder: Path, pool_max: bool = False) -> BertForMeanPooledClassification:
    config = MeanPooledBertConfig.of(BertConfig.from_pretrained(str(folder)), id2label={0: "a", 1: "b", 2: "c"},
                                     pool_max=pool_max)  # fmt: skip
    return BertForMeanPooledClassification.from_pretrained(str(folder), config=config, use_safetensors=True).eval()


def test_the_mean_pooled_classifier_starts_from_the_pretrained_encoder(tmp_path: Path) -> None:
    encoder = build("bert-mlm", seed=3)
    classifier = mean_pooled_from(save(encoder, tmp_path / "encoder", "mlm"))
    mine, pretrained = classifier.bert.state_dict(), encoder.bert.state_dict()
    assert mine.keys() == pretrained.keys() and all(torch.equal(mine[key], pretrained[key]) for key in mine)


@pytest.mark.parametrize("pool_max", [False, True])
def test_the_mean_pooled_classifier_reads_only_the_texts_own_tokens(tmp_path: Path, pool_max: bool) -> None:
    """A text scores the same alone as padded beside a longer one: padding is outside the mean and the max."""
    classifier = mean_pooled_from(save(build("bert-mlm", seed=3), tmp_path / "encoder", "mlm"), pool_max)
    short, long = batch()[0, :5], batch()[1]
    padded = torch.stack([torch.cat([short, torch.full((3,), PAD)]), long])
    mask = torch.stack([torch.cat([torch.ones(5), torch.zeros(3)]), torch.ones(8)]).long()
    with torch.no_grad():
        alone = classifier(input_ids=short[None], attention_mask=torch.ones(1, 5, dtype=torch.long)).logits
        together = classifier(input_ids=padded, attention_mask=mask).logits
    assert torch.allclose(alone[0], together[0], atol=1e-5)


def test_with_pool_max_the_classifier_reads_the_mean_and_the_max_of_the_states(tmp_path: Path) -> None:
    classifier = mean_pooled_from(save(build("bert-mlm", seed=3), tmp_path / "encoder", "mlm"), pool_max=True)
    ids, mask = batch(), torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        hidden = classifier.bert(ids, attention_mask=mask).last_hidden_state
        real = [hidden[0, :5], hidden[1]]
        features = torch.stack([torch.cat([states.mean(dim=0), states.amax(dim=0)]) for states in real])
        assert torch.allclose(classifier(input_ids=ids, attention_mask=mask).logits, classifier.classifier(features),
                              atol=1e-5)  # fmt: skip
    assert classifier.classifier.in_features == 2 * classifier.config.hidden_size


@pytest.mark.parametrize("pool_max", [False, True])
def test_a_saved_mean_pooled_classifier_loads_through_the_auto_class(tmp_path: Path, pool_max: bool) -> None:
    """Serving loads it as any classifier (AutoModelForSequenceClassification, safetensors), no remote code."""
    from transformers import AutoModelForSequenceClassification

    classifier = mean_pooled_from(save(build("bert-mlm", seed=3), tmp_path / "encoder", "mlm"), pool_max)
    classifier.save_pretrained(str(tmp_path / "task"), safe_serialization=True)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "task"), use_safetensors=True)
    assert type(reloaded) is BertForMeanPooledClassification and same_weights(classifier, reloaded)
    assert reloaded.config.pool_max is pool_max
    assert torch.equal(logits_of(classifier, batch()), logits_of(reloaded.eval(), batch()))


# --- the word-pooled tagger -----------------------------------------------------------------------


def test_word_means_average_each_words_pieces_and_leave_cls_sep_and_padding_out() -> None:
    # [CLS] w1a w1b w2 w3a w3b w3c [SEP] pad: starts mark w1a, w2, w3a
    hidden = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1).repeat(1, 1, 2)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    starts = torch.tensor([[0, 1, 0, 1, 1, 0, 0, 0, 0]])
    means = word_means(hidden, mask, starts)[0, :, 0].tolist()
    assert means == [0.0, 1.5, 1.5, 3.0, 5.0, 5.0, 5.0, 0.0, 0.0]


def test_a_words_tag_depends_on_all_its_pieces_and_not_on_padding(tmp_path: Path) -> None:
    folder = save(build("bert-mlm", seed=3), tmp_path / "encoder", "mlm")
    config = WordPooledBertConfig.of(BertConfig.from_pretrained(str(folder)), id2label={0: "O", 1: "B-PER"})
    tagger = BertForWordTagging.from_pretrained(str(folder), config=config, use_safetensors=True).eval()
    with torch.no_grad():  # the marks then change no hidden state: only which pieces make a word
        embeddings = tagger.bert.embeddings.token_type_embeddings.weight
        embeddings[1] = embeddings[0]
    ids = torch.tensor([[CLS, 10, 11, 12, SEP]])
    one_word, two_words = torch.tensor([[0, 1, 0, 0, 0]]), torch.tensor([[0, 1, 0, 1, 0]])
    with torch.no_grad():
        as_one = tagger(input_ids=ids, token_type_ids=one_word).logits
        as_two = tagger(input_ids=ids, token_type_ids=two_words).logits
        padded = tagger(input_ids=torch.cat([ids, torch.tensor([[PAD, PAD]])], dim=1),
                        attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0]]),
                        token_type_ids=torch.tensor([[0, 1, 0, 0, 0, 0, 0]])).logits  # fmt: skip
    assert not torch.allclose(as_one[0, 1], as_two[0, 1])  # the word [10 11 12] against [10 11] + [12]
    assert torch.allclose(as_one[0, :5], padded[0, :5], atol=1e-5)
    from transformers import AutoModelForTokenClassification

    tagger.save_pretrained(str(tmp_path / "task"), safe_serialization=True)
    reloaded = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "task"), use_safetensors=True).eval()
    assert type(reloaded) is BertForWordTagging and same_weights(tagger, reloaded)
