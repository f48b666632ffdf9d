"""Predictions from a task model folder: word splitting, prompts, and tiny real models saved and reloaded."""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)

from lmforge.artifacts import TaskMeta
from lmforge.inference import (
    CJK_GAP,
    TaskModel,
    best_tag_path,
    bio_transitions,
    class_probabilities,
    continuation_losses,
    continuation_reference,
    generate,
    generate_one_by_one,
    load_task_model,
    split_words,
    word_tags,
)
from lmforge.schema import LoraParams, TokenizerParams, TrainingParams
from lmforge.tokenization import generation_pairs, save_hf_tokenizer, train_tokenizer, word_starts

MAX_LENGTH = 16  # the models' position embeddings too: anything longer must be truncated away
CORPUS = "你好世界\n今天天气很好\n中文\nabc def\n"


# --- pure functions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("我爱Python和NLP", ["我", "爱", "Python", "和", "NLP"]),
        ("2024年 GPT4 发布", ["2024", "年", "GPT4", "发", "布"]),
        ("你好，world。", ["你", "好", "，", "world", "。"]),  # full-width punctuation is a word of its own
        ("  deep\tlearning\n模型 ", ["deep", "learning", "模", "型"]),
        ("", []),
    ],
)
def test_split_words_gives_each_cjk_character_and_keeps_latin_runs_whole(text: str, words: list[str]):
    assert split_words(text) == words


def test_generation_pairs_split_at_prompt_chars_and_skip_texts_too_short_to_continue():
    texts = ["一二三四五", "一二三", "abcd", "", "甲乙"]
    assert generation_pairs(texts, 3) == [("一二三", "四五"), ("abc", "d")]
    assert generation_pairs(texts, 1) == [("一", "二三四五"), ("一", "二三"), ("a", "bcd"), ("甲", "乙")]


@pytest.mark.parametrize(
    ("decoded", "written"),
    [
        ("中 文 模 型", "中文模型"),
        ("我 用 GPT 写 code", "我用 GPT 写 code"),  # a space next to a Latin word stays
        ("好 ， 很 好", "好，很好"),  # full-width punctuation counts as CJK
        ("a b c", "a b c"),
    ],
)
def test_cjk_gap_removes_only_spaces_between_two_cjk_characters(decoded: str, written: str):
    assert CJK_GAP.sub("", decoded) == written


# --- tiny real models, saved as a task model folder and loaded back ------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A character tokenizer trained offline on a few lines, saved as a transformers tokenizer."""
    root = tmp_path_factory.mktemp("tokenizer")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    tokenizer = train_tokenizer(TokenizerParams(kind="char", vocab_size=64, min_frequency=1), root / "corpus.txt",
                                batch_size=10, max_length=MAX_LENGTH)  # fmt: skip
    save_hf_tokenizer(tokenizer, root / "tokenizer", MAX_LENGTH)
    return root / "tokenizer"


def vocab(tokenizer_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir)).get_vocab()


def save_task_model(folder: Path, model: PreTrainedModel, tokenizer_dir: Path, kind: str, labels: list[str],
                    word_start_types: bool = False) -> Path:  # fmt: skip
    """A models/finetuned/<task> folder as finetune writes it: safetensors, tokenizer, lmforge_task.json."""
    from transformers import AutoTokenizer

    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    TaskMeta(
        task="t", dataset="d", kind=kind, base="encoder", method="full", lora=LoraParams(), prompt_chars=3,
        training=TrainingParams(), base_resolved="models/pretrained/encoder", seed=0, dropout=None, labels=labels,
        max_length=MAX_LENGTH, word_start_types=word_start_types, test_sha256="0" * 64, finetune_run_id=None,
    ).write(folder / "lmforge_task.json")  # fmt: skip
    return folder


def bert_config(tokenizer_dir: Path, num_labels: int) -> BertConfig:
    return BertConfig(vocab_size=len(vocab(tokenizer_dir)), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=MAX_LENGTH, num_labels=num_labels)  # fmt: skip


LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, PreTrainedModel]:
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(tokenizer_dir, len(LABELS)))
    folder = save_task_model(tmp_path_factory.mktemp("classifier"), model, tokenizer_dir, "classification", LABELS)
    return folder, model.eval()


def test_a_task_model_folder_loads_back_with_its_meta_in_eval_mode(classifier):
    folder, saved = classifier
    tm = load_task_model(folder)
    assert isinstance(tm.model, BertForSequenceClassification)
    assert (tm.kind, tm.labels, tm.max_length) == ("classification", LABELS, MAX_LENGTH)
    assert not tm.model.training  # dropout off: predictions are deterministic
    ids = torch.tensor([[2, 5, 6, 3]])
    with torch.no_grad():
        assert torch.equal(tm.model(input_ids=ids).logits, saved(input_ids=ids).logits)  # the saved weights


def test_weights_are_read_from_safetensors_only(classifier, tmp_path: Path):
    folder, saved = classifier
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "lmforge_task.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    torch.save(saved.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: never loaded
    with pytest.raises(OSError, match=r"model\.safetensors"):
        load_task_model(tmp_path)


def test_class_probabilities_are_one_row_per_text_summing_to_one(classifier):
    tm = load_task_model(classifier[0])
    texts = ["今天天气很好", "abc", "好" * 40]  # the last is longer than the model's positions: truncated
    probabilities = class_probabilities(tm, texts)
    assert probabilities.shape == (3, len(LABELS))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert (probabilities > 0).all()
    # Padding in a batch changes nothing: one text at a time gives the same rows.
    assert np.allclose(class_probabilities(tm, texts, batch_size=1), probabilities, atol=1e-5)
    assert np.allclose(class_probabilities(tm, texts, batch_size=2), probabilities, atol=1e-5)


def test_class_probabilities_match_the_softmax_of_the_logits_of_one_text(classifier):
    tm = load_task_model(classifier[0])
    ids = tm.tokenizer("今天")["input_ids"]
    assert len(ids) == 4  # [CLS] 今 天 [SEP]
    with torch.no_grad():
        logits = tm.model(input_ids=torch.tensor([ids])).logits[0].tolist()
    exp = [math.exp(value) for value in logits]
    expected = [value / sum(exp) for value in exp]
    assert np.allclose(class_probabilities(tm, ["今天"])[0], expected, atol=1e-6)


def test_class_probabilities_of_no_texts_is_an_empty_table(classifier):
    assert class_probabilities(load_task_model(classifier[0]), []).shape == (0, len(LABELS))


# No "O", and no BIO prefixes, so nothing constrains the decoding: each word's tag is its argmax.
TAGS = ["LOC", "PER"]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> TaskModel:
    torch.manual_seed(0)
    model = BertForTokenClassification(bert_config(tokenizer_dir, len(TAGS)))
    folder = save_task_model(tmp_path_factory.mktemp("tagger"), model, tokenizer_dir, "token_classification", TAGS)
    return load_task_model(folder)


def test_word_tags_give_one_tag_per_word_and_read_a_long_sentence_in_overlapping_windows(tagger: TaskModel):
    long = list("今天天气很好" * 3)  # 18 words; 16 positions hold [CLS] + 14 characters + [SEP]
    sentences = [["今", "天"], ["abc", "def", "好"], long, []]
    tags = word_tags(tagger, sentences)
    assert [len(sentence) for sentence in tags] == [2, 3, 18, 0]
    assert all(tag in TAGS for tag in tags[0] + tags[1] + tags[2])  # none left "O" by the truncation
    # The second window overlaps the first by a quarter of the positions (4): it reads words 10-17,
    # exactly as the sentence of those words alone, and is the only one to see words 14-17.
    assert tags[2][14:] == word_tags(tagger, [long[10:]])[0][4:]
    assert word_tags(tagger, sentences, batch_size=1) == tags  # batching and padding change nothing


def test_a_multi_token_word_takes_the_tag_of_its_first_token(tagger: TaskModel):
    # A word of several character tokens whose first and last tokens the model tags differently.
    def token_tags(word: str) -> list[str]:
        encoded = tagger.tokenizer([[word]], is_split_into_words=True, return_tensors="pt")
        assert encoded.word_ids(0) == [None] + [0] * len(word) + [None]
        with torch.no_grad():
            best = tagger.model(input_ids=encoded["input_ids"]).logits[0, 1:-1].argmax(-1)
        return [TAGS[int(index)] for index in best]

    candidates = ["abc", "def", "cab", "fed", "abcdef", "fedcba", "今天天气", "你好世界", "很好中文"]
    word = next((word for word in candidates if token_tags(word)[0] != token_tags(word)[-1]), None)
    assert word is not None, "no candidate word has tokens tagged differently by this model"
    assert word_tags(tagger, [[word]]) == [[token_tags(word)[0]]]


def test_a_tagger_trained_with_word_starts_sees_the_words_segmentation(tokenizer_dir: Path, tmp_path: Path):
    torch.manual_seed(0)
    model = BertForTokenClassification(bert_config(tokenizer_dir, len(TAGS)))
    with torch.no_grad():  # token type 1 (a word's first piece) weighs as much as the token itself
        model.bert.embeddings.token_type_embeddings.weight[1].normal_(std=5.0)
    tm = load_task_model(save_task_model(tmp_path, model, tokenizer_dir, "token_classification", TAGS, True))
    sentences = [["今天", "天气", "很好"], ["今", "天天", "气很好"], ["abc", "def"]]

    def first_piece_tags(token_types: bool) -> list[list[str]]:
        encoded = tm.tokenizer(sentences, is_split_into_words=True, padding=True, return_tensors="pt")
        types = torch.tensor([word_starts(encoded.word_ids(i)) for i in range(len(sentences))])
        assert types[0].tolist()[:8] == [0, 1, 0, 1, 0, 1, 0, 0]  # [CLS] 今 天 天 气 很 好 [SEP]
        with torch.no_grad():
            best = tm.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                            token_type_ids=types if token_types else None).logits.argmax(-1)  # fmt: skip
        return [[TAGS[int(best[i, encoded.word_ids(i).index(w)])] for w in range(len(words))]
                for i, words in enumerate(sentences)]  # fmt: skip

    assert first_piece_tags(token_types=True) != first_piece_tags(token_types=False)  # the marks matter here
    assert word_tags(tm, sentences) == first_piece_tags(token_types=True)
    assert word_tags(tm, sentences, batch_size=1) == first_piece_tags(token_types=True)


BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def is_valid_bio(tags: list[str]) -> bool:
    before = "O"
    for tag in tags:
        if tag.startswith("I-") and before[2:] != tag[2:]:
            return False
        before = tag
    return True


def test_bio_decoding_opens_the_entity_an_argmax_would_only_continue():
    probabilities = np.array([
        [0.9, 0.02, 0.04, 0.02, 0.02],  # O
        [0.2, 0.3, 0.5, 0.0, 0.0],  # argmax I-PER after O: seqeval would read a PER of the wrong span
        [0.05, 0.0, 0.9, 0.0, 0.05],  # I-PER
    ]) + 1e-6  # fmt: skip
    path = best_tag_path(np.log(probabilities), *bio_transitions(BIO))
    assert [BIO[i] for i in path] == ["O", "B-PER", "I-PER"]


@pytest.mark.parametrize("seed", range(20))
def test_bio_decoding_is_the_best_valid_path_and_the_argmax_when_that_is_valid(seed: int):
    rng = np.random.default_rng(seed)
    log_probs = np.log(rng.dirichlet(np.full(len(BIO), 0.3), size=4)).astype(np.float32)
    valid = [p for p in itertools.product(range(len(BIO)), repeat=4) if is_valid_bio([BIO[i] for i in p])]
    best = max(valid, key=lambda p: sum(log_probs[i, tag] for i, tag in enumerate(p)))
    assert best_tag_path(log_probs, *bio_transitions(BIO)) == list(best)
    argmax = [int(i) for i in log_probs.argmax(axis=1)]
    if is_valid_bio([BIO[i] for i in argmax]):
        assert list(best) == argmax


def test_tags_without_bio_prefixes_decode_as_their_argmax():
    log_probs = np.log(np.random.default_rng(0).dirichlet(np.ones(3), size=6))
    assert best_tag_path(log_probs, *bio_transitions(["n", "v", "I"])) == list(log_probs.argmax(axis=1))


def test_word_tags_of_a_bio_tagger_are_valid_where_its_argmax_is_not(tokenizer_dir: Path, tmp_path: Path):
    torch.manual_seed(0)
    model = BertForTokenClassification(bert_config(tokenizer_dir, len(BIO)))
    with torch.no_grad():  # favour the I- tags, so an untrained tagger's argmax continues entities it never opened
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0]))
    tm = load_task_model(save_task_model(tmp_path, model, tokenizer_dir, "token_classification", BIO))
    sentences = [list("今天天气很好"), ["abc", "def", "好"], list("你好世界中文")]
    encoded = tm.tokenizer(sentences, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        best = tm.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.argmax(-1)
    argmax = [[BIO[int(best[i, encoded.word_ids(i).index(w)])] for w in range(len(words))]
              for i, words in enumerate(sentences)]  # fmt: skip
    assert not all(is_valid_bio(tags) for tags in argmax)
    tags = word_tags(tm, sentences)
    assert [len(t) for t in tags] == [len(s) for s in sentences]
    assert all(is_valid_bio(t) for t in tags)


@pytest.fixture(scope="module")
def constant_generator(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """A GPT-2 whose logits are the same at every position: HIDDEN for one token, 0 for the rest.

    With the final layer norm's weight 0 and bias 1 every hidden state is all ones, so the head's row
    for the favoured token scores HIDDEN and every other row (all zeros) scores 0.
    """
    ids = vocab(tokenizer_dir)

    @functools.cache
    def build(favoured: str) -> TaskModel:
        config = GPT2Config(
            vocab_size=len(ids), n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=MAX_LENGTH,
            bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"], tie_word_embeddings=False,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
        with torch.no_grad():
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.fill_(1.0)
            model.lm_head.weight.zero_()
            model.lm_head.weight[ids[favoured]] = 1.0
        folder = tmp_path_factory.mktemp("generator")
        return load_task_model(save_task_model(folder, model, tokenizer_dir, "generation", []))

    return build, len(ids)


HIDDEN = 8


def test_generate_continues_greedily_for_max_new_tokens_without_gaps_between_chinese(constant_generator):
    build, _ = constant_generator
    assert generate(build("中"), ["你好", "abc"], max_new_tokens=3) == ["中中中", "中中中"]
    assert generate(build("a"), ["你好"], max_new_tokens=2) == ["a a"]  # Latin keeps WordPiece-style spaces
    # A prompt longer than the model's positions is cut to leave room for the new tokens.
    assert generate(build("中"), ["好" * 40], max_new_tokens=4) == ["中中中中"]


def test_generate_stops_at_sep(constant_generator):
    build, _ = constant_generator
    assert generate(build("[SEP]"), ["你好"], max_new_tokens=5) == [""]


def test_continuation_losses_sum_over_the_continuation_tokens_only(constant_generator):
    build, vocab_size = constant_generator
    tm = build("中")
    # Every position: log p(中) = HIDDEN - log(e^HIDDEN + V - 1); any other token: -log(e^HIDDEN + V - 1).
    log_total = math.log(math.exp(HIDDEN) + vocab_size - 1)
    favoured, other = log_total - HIDDEN, log_total
    # [CLS] 你 好 [SEP] | 中 中 [SEP]      and      [CLS] 你 [SEP] | 中 好 天 气 [SEP]  (padded batch)
    losses, counts = continuation_losses(tm, [("你好", "中中"), ("你", "中好天气")])
    assert counts.tolist() == [3, 5]
    assert np.allclose(losses, [2 * favoured + other, favoured + 4 * other], atol=1e-4)
    one_at_a_time = continuation_losses(tm, [("你好", "中中"), ("你", "中好天气")], batch_size=1)
    assert np.allclose(one_at_a_time[0], losses, atol=1e-4)


def test_a_generation_that_matches_the_continuation_scores_bleu_one(tokenizer_dir: Path):
    """The reference is the continuation's first max_new_tokens tokens: a perfect generation is not penalized."""
    from transformers import AutoTokenizer

    from lmforge.metrics import char_bleu

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    reference = continuation_reference(tokenizer, "今天天气很好，你好世界", 6)
    assert reference == "今天天气很好"
    assert char_bleu([reference], ["今天天气很好"]) == pytest.approx(1.0)
    assert char_bleu([reference], ["今天天气"]) < 1.0  # stopping early is what the brevity penalty costs


def test_batched_kv_cached_generation_gives_the_plain_loops_tokens(tokenizer_dir: Path, tmp_path: Path):
    """Left padding, the attention mask and the cache change nothing: prompts of different lengths in one
    batch continue exactly as each alone does in the loop that re-runs the whole sequence per token."""
    torch.manual_seed(3)
    ids = vocab(tokenizer_dir)  # large random weights: a model that says something, and something different each time
    config = GPT2Config(vocab_size=len(ids), n_positions=MAX_LENGTH, n_embd=16, n_layer=2, n_head=2,
                        initializer_range=0.5, bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"])  # fmt: skip
    tm = load_task_model(save_task_model(tmp_path, GPT2LMHeadModel(config), tokenizer_dir, "generation", []))
    prompts = ["你好", "今天天气很好", "中", "abc def", "你好世界今天"]
    expected = [generate_one_by_one(tm, prompt, 6) for prompt in prompts]
    assert any(len(text) > 1 for text in expected)  # a random model: it says something before any [SEP]
    assert generate(tm, prompts, 6, batch_size=3) == expected


# --- instruction data: (prompt, response) pairs ----------------------------------------------------


def test_example_pairs_take_an_instruction_datasets_responses_and_split_other_texts():
    import pandas as pd

    from lmforge.tokenization import example_pairs

    replies = pd.DataFrame({"text": ["你好", "天气"], "response": ["你好啊", ""]})
    assert example_pairs(replies, 1) == [("你好", "你好啊")]  # an empty response teaches nothing
    assert example_pairs(pd.DataFrame({"text": ["一二三四"]}), 1) == [("一", "二三四")]


def test_a_long_prompt_keeps_its_end_and_the_response_its_start(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    from lmforge.tokenization import encode_pairs, prompt_tails

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert prompt_tails(tokenizer, ["今天天气很好", "你好"], 3) == ["气很好", "你好"]
    encoded = encode_pairs(tokenizer, [("今天天气很好今天天气很好", "你好世界你好世界你好世界")], MAX_LENGTH)
    ids, types = encoded["input_ids"][0], encoded["token_type_ids"][0]
    assert len(ids) == MAX_LENGTH
    prompt = [token for token, kind in zip(ids, types, strict=True) if kind == 0]
    response = [token for token, kind in zip(ids, types, strict=True) if kind == 1]
    text = tokenizer.convert_ids_to_tokens
    assert text(prompt) == ["[CLS]", *"今天天气很好今天天气很好"[-MAX_LENGTH // 2 :], "[SEP]"]
    assert text(response)[:-1] == list("你好世界你好世界你好世界")[: MAX_LENGTH - 10 - 1]  # room left, then [SEP]
