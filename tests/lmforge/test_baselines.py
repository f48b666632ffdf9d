"""Baselines are real models: trained, saved without pickle, rebuilt from their files alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmforge.baselines import MajorityTag, NgramLM, TfidfLogReg, is_baseline, load_baseline
from lmforge.tokenization import generation_pairs

POSITIVE = ["很好很好", "好吃好吃", "真好真好", "好好好", "非常好好"]
NEGATIVE = ["很差很差", "难吃很差", "真差真差", "差差差", "非常差差"]


def test_tfidf_logreg_separates_a_separable_toy_set_and_reloads_to_the_same_probabilities(tmp_path: Path):
    model = TfidfLogReg.fit(POSITIVE + NEGATIVE, ["pos"] * 5 + ["neg"] * 5, ["neg", "pos"])
    probs = model.probabilities(["好好", "差差", "真好", "真差"])
    assert probs.shape == (4, 2) and np.allclose(probs.sum(axis=1), 1.0)
    assert probs.argmax(axis=1).tolist() == [1, 0, 1, 0]  # columns follow the declared label order
    model.save(tmp_path / "b")
    assert sorted(path.name for path in (tmp_path / "b").iterdir()) == [
        "baseline.json", "vocabulary.json", "weights.safetensors"]  # no pickle  # fmt: skip
    assert is_baseline(tmp_path / "b")
    again = load_baseline(tmp_path / "b")
    assert isinstance(again, TfidfLogReg)
    assert np.array_equal(again.probabilities(["好好", "差差"]), model.probabilities(["好好", "差差"]))


def test_tfidf_logreg_agrees_with_the_scikit_learn_pipeline_it_was_fitted_as():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts = [f"{'好' * (i % 3 + 1)}{'差' * (i % 4)}评价{i % 5}" for i in range(40)]
    labels = [["a", "b", "c"][i % 3] for i in range(40)]
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    reference = LogisticRegression(max_iter=2000, C=4.0).fit(vectorizer.fit_transform(texts), labels)
    test = ["好好差评价1", "差差差", "好评价4"]
    expected = reference.predict_proba(vectorizer.transform(test))
    assert np.allclose(TfidfLogReg.fit(texts, labels, ["a", "b", "c"]).probabilities(test), expected)


def test_a_label_missing_from_train_gets_probability_zero():
    model = TfidfLogReg.fit(POSITIVE + NEGATIVE, ["pos"] * 5 + ["neg"] * 5, ["neg", "neutral", "pos"])
    probs = model.probabilities(["好好"])
    assert probs.shape == (1, 3) and probs[0, 1] == 0.0 and np.isclose(probs.sum(), 1.0)


def test_majority_tag_picks_the_most_frequent_tag_and_o_for_unseen_words(tmp_path: Path):
    train_words = [["张三", "去", "北京"], ["北京", "大学"], ["北京", "烤鸭"]]
    train_tags = [["B-PER", "O", "B-LOC"], ["B-ORG", "I-ORG"], ["B-LOC", "O"]]
    model = MajorityTag.fit(train_words, train_tags, ["O", "B-PER", "B-LOC", "B-ORG", "I-ORG"])
    expected = [["B-PER", "O", "B-LOC"], ["I-ORG", "O"], []]
    assert model.predict([["张三", "在", "北京"], ["大学", "上海"], []]) == expected
    model.save(tmp_path / "tags")
    assert json.loads((tmp_path / "tags/baseline.json").read_text())["kind"] == "token_classification"
    assert load_baseline(tmp_path / "tags").predict([["北京", "上海"]]) == [["B-LOC", "O"]]


# --- the generation baseline: an n-gram LM over the task model's own tokens ---------------------

CORPUS = ["今天天气很好", "今天天气不好", "明天天气很好", "今天很好", "我们今天去北京"] * 4


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from lmforge.schema import TokenizerParams
    from lmforge.tokenization import save_hf_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("ngram-tokenizer")
    (root / "corpus.txt").write_text("\n".join([*CORPUS, "坏的去"]), encoding="utf-8")
    tokenizer = train_tokenizer(TokenizerParams(kind="char", vocab_size=64, min_frequency=1), root / "corpus.txt",
                                batch_size=10, max_length=32)  # fmt: skip
    save_hf_tokenizer(tokenizer, root / "tokenizer", 32)
    return AutoTokenizer.from_pretrained(str(root / "tokenizer"))


def fit_ngram(tokenizer: Any, prompt_chars: int = 2) -> NgramLM:
    pairs = generation_pairs(CORPUS, prompt_chars)
    encoded = tokenizer([p for p, _ in pairs], [c for _, c in pairs], truncation="only_second", max_length=32)
    return NgramLM.fit(encoded["input_ids"], tokenizer, 32)


def test_ngram_next_token_probabilities_are_a_distribution_for_seen_unseen_and_short_histories(char_tokenizer):
    model = fit_ngram(char_tokenizer)
    seen = char_tokenizer("今天", "天")["input_ids"][:-1]  # [CLS] 今 天 [SEP] 天
    unseen = char_tokenizer("坏的", "去")["input_ids"][:-1]  # characters that never follow each other in train
    for ids in (seen, unseen, seen[:1], []):
        probs = model.next_token_probabilities(ids)
        assert probs.shape == (len(char_tokenizer),) and (probs > 0).all()
        assert np.isclose(probs.sum(), 1.0)
    after_tian_tian = model.next_token_probabilities(seen)
    assert char_tokenizer.convert_ids_to_tokens(int(after_tian_tian.argmax())) == "气"  # 天天 -> 气, four of four


def test_ngram_fits_its_corpus_and_reloads_from_safetensors_and_json_to_the_same_losses(char_tokenizer,
                                                                                      tmp_path: Path):  # fmt: skip
    model = fit_ngram(char_tokenizer)
    seen_losses, seen_counts = model.continuation_losses([("今天", "天气很好")])
    reversed_losses, reversed_counts = model.continuation_losses([("今天", "好很气天")])
    assert seen_counts.tolist() == reversed_counts.tolist() == [5]  # four characters and the closing [SEP]
    assert seen_losses[0] < reversed_losses[0] / 2
    assert model.generate(["明天"], 8) == ["天气很好"]  # greedy, stops at [SEP]
    # A prompt longer than the model's window (32) is continued from its end, where the text goes on.
    assert model.generate(["坏" * 60 + "我们"], 8) == model.generate(["我们"], 8) != model.generate(["坏" * 60], 8)
    model.save(tmp_path / "ngram")
    assert not [path.name for path in (tmp_path / "ngram").iterdir() if path.suffix not in (".json", ".safetensors",
                                                                                          ".txt")]  # fmt: skip
    again = load_baseline(tmp_path / "ngram")
    assert isinstance(again, NgramLM) and again.order == model.order == 3
    assert np.array_equal(again.continuation_losses([("今天", "天气很好")])[0], seen_losses)


def test_ngram_scores_exactly_the_continuation_tokens_a_task_model_is_scored_on(char_tokenizer, tmp_path: Path):
    """Perplexities are comparable only over the same tokens: same pairs, same truncation, same targets."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.artifacts import TaskMeta
    from lmforge.inference import continuation_losses, load_task_model
    from lmforge.schema import LoraParams, TrainingParams

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(char_tokenizer), n_positions=32, n_embd=8, n_layer=1, n_head=2)
                    ).save_pretrained(str(tmp_path))  # fmt: skip
    char_tokenizer.save_pretrained(str(tmp_path))
    TaskMeta(
        task="t", dataset="d", kind="generation", base="decoder", method="full", lora=LoraParams(),
        prompt_chars=2, training=TrainingParams(), base_resolved="models/pretrained/decoder", seed=0, dropout=None,
        labels=[], max_length=32, test_sha256="0" * 64, finetune_run_id=None,
    ).write(tmp_path / "lmforge_task.json")  # fmt: skip
    pairs = generation_pairs(["今天天气很好", "我们去", "明天天气很好" * 8], 2)  # the last one is truncated
    _, model_counts = continuation_losses(load_task_model(tmp_path), pairs)
    _, ngram_counts = fit_ngram(char_tokenizer).continuation_losses(pairs)
    assert ngram_counts.tolist() == model_counts.tolist()
    assert model_counts.tolist()[-1] == 32 - 4  # [CLS] 明天 [SEP] before the continuation fills the rest
