"""Predictions from a fine-tuned task model; shared by the evaluate stage and the MLflow pyfunc.

A task model folder (models/finetuned/<task>) holds the weights (safetensors), the tokenizer and
lmforge_task.json, which says what kind of task it is and what its labels are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import lmforge.models  # noqa: F401  registers the LSTM with the Auto classes
from lmforge.artifacts import TaskMeta
from lmforge.tokenization import encode_pairs, window_overlap, window_word_starts

AUTO_BY_KIND = {
    "classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "generation": AutoModelForCausalLM,
}
# A CJK character is a word of its own; other words are runs of letters/digits, or one symbol.
WORD = re.compile(r"[\u3000-\u9fff\uf900-\ufaff\uff00-\uffef]|[^\s\u3000-\u9fff\uf900-\ufaff\uff00-\uffef]+")
# WordPiece decoding puts a space between CJK characters; Chinese is written without them.
CJK_GAP = re.compile(r"(?<=[\u3000-\u9fff\uf900-\ufaff\uff00-\uffef]) (?=[\u3000-\u9fff\uf900-\ufaff\uff00-\uffef])")


@dataclass
class TaskModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    meta: TaskMeta

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    @property
    def max_length(self) -> int:
        return self.meta.max_length


def load_task_model(folder: Path) -> TaskModel:
    """Load weights from safetensors (or an ONNX graph) only, never a pickle, and put the model in eval mode."""
    from lmforge.int8 import is_int8, load_int8
    from lmforge.onnx_export import OnnxLogits, is_onnx

    meta = TaskMeta.read(Path(folder) / "lmforge_task.json")
    if is_int8(folder):  # lmforge compress: int8 linear layers, from safetensors too
        model = cast(PreTrainedModel, load_int8(Path(folder), AUTO_BY_KIND[meta.kind]))
    elif is_onnx(folder):  # lmforge compress --to onnx: a graph ONNX Runtime runs, called as the model is
        model = cast(PreTrainedModel, OnnxLogits(Path(folder)))
    else:
        model = AUTO_BY_KIND[meta.kind].from_pretrained(str(folder), use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model.eval()
    return TaskModel(model, tokenizer, meta)


def split_words(text: str) -> list[str]:
    """Words of raw text for token classification: CJK characters one by one, other runs whole."""
    return WORD.findall(text)


@torch.no_grad()
def class_probabilities(tm: TaskModel, texts: list[str], batch_size: int = 64) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = tm.tokenizer(texts[start : start + batch_size], truncation=True, max_length=tm.max_length,
                               padding=True, return_tensors="pt")  # fmt: skip
        encoded.pop("token_type_ids", None)
        out.append(torch.softmax(tm.model(**encoded).logits.float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(tm.labels)))


def bio_transitions(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Which tags may open a sentence, and which may follow which, under BIO: `I-X` only continues
    an entity of type X (after `B-X` or `I-X`). Tags without a BIO prefix (POS tags) are unconstrained."""

    def continues(tag: str) -> str | None:
        return tag[2:] if tag.startswith("I-") else None

    def entity_type(tag: str) -> str | None:
        return tag[2:] if tag[:2] in ("B-", "I-") else None

    may_start = np.array([continues(tag) is None for tag in labels])
    may_follow = np.array([[continues(now) is None or continues(now) == entity_type(before) for now in labels]
                           for before in labels])  # fmt: skip
    return may_start, may_follow


def best_tag_path(log_probs: np.ndarray, may_start: np.ndarray, may_follow: np.ndarray) -> list[int]:
    """Viterbi: the tag sequence of the highest total log-probability among the allowed ones.

    Per-word argmax can tag `O I-PER`, which seqeval reads as an entity with the wrong span; the
    allowed path costs nothing when the argmax is already valid.
    """
    if len(log_probs) == 0:
        return []
    forbidden = np.float32(-1e9)
    best = np.where(may_start, log_probs[0], forbidden)
    step = np.where(may_follow, np.float32(0), forbidden)  # [before, now]
    back = np.zeros(log_probs.shape, dtype=np.int64)
    for position in range(1, len(log_probs)):
        totals = best[:, None] + step
        back[position] = totals.argmax(axis=0)
        best = totals.max(axis=0) + log_probs[position]
    path = [int(best.argmax())]
    for position in range(len(log_probs) - 1, 0, -1):
        path.append(int(back[position, path[-1]]))
    return path[::-1]


@torch.no_grad()
def word_tags(tm: TaskModel, sentences: list[list[str]], batch_size: int = 64) -> list[list[str]]:
    """One predicted tag per word, from the model's distribution on the word's first sub-token,
    decoded per sentence as the best path the BIO scheme allows (best_tag_path).

    A sentence longer than the model's positions is read in windows that overlap by a quarter of
    them (15% of People's Daily's test entities lie past the first 128 tokens: truncating scored them
    all as missed). A word takes its distribution from the window where its first piece has the most
    context on its nearer side. A word with no piece (nothing the tokenizer keeps) is tagged O.
    """
    labels = tm.labels
    unseen = np.array([0.0 if tag == "O" else -1e9 for tag in labels], dtype=np.float32)
    scores = [np.tile(unseen, (len(words), 1)) for words in sentences]
    overlap = window_overlap(tm.max_length)
    for start in range(0, len(sentences), batch_size):
        encoded = tm.tokenizer(sentences[start : start + batch_size], is_split_into_words=True, truncation=True,
                               max_length=tm.max_length, stride=overlap, return_overflowing_tokens=True,
                               padding=True, return_tensors="pt")  # fmt: skip
        owners = [start + int(i) for i in encoded.pop("overflow_to_sample_mapping")]
        word_ids = [encoded.word_ids(window) for window in range(len(owners))]
        starts: list[list[int]] = []  # each window's word-start marks
        for _, windows in groupby(zip(owners, word_ids, strict=True), key=itemgetter(0)):  # a sentence's run
            starts += window_word_starts([ids for _, ids in windows], overlap)
        encoded.pop("token_type_ids", None)
        if tm.meta.word_start_types:  # the segmentation the model was trained with (finetune.add_word_starts)
            encoded["token_type_ids"] = torch.tensor(starts)
        log_probs = torch.log_softmax(tm.model(**encoded).logits.float(), dim=-1).numpy()
        context: dict[tuple[int, int], int] = {}  # (sentence, word) -> context of the scores it has now
        for window, (sentence, ids) in enumerate(zip(owners, word_ids, strict=True)):
            pieces = [position for position, word in enumerate(ids) if word is not None]
            for position in (position for position in pieces if starts[window][position]):
                word = cast(int, ids[position])
                margin = min(position - pieces[0], pieces[-1] - position)
                if margin > context.get((sentence, word), -1):
                    context[sentence, word] = margin
                    scores[sentence][word] = log_probs[window, position]
    may_start, may_follow = bio_transitions(labels)
    return [[labels[i] for i in best_tag_path(s, may_start, may_follow)] for s in scores]


def continuation_reference(tokenizer: PreTrainedTokenizerBase, continuation: str, max_new_tokens: int) -> str:
    """What a generation of max_new_tokens tokens is held to: the true continuation's first max_new_tokens
    tokens, decoded as the generation is (so BLEU's brevity penalty means stopping early, nothing else)."""
    ids = tokenizer(continuation, add_special_tokens=False)["input_ids"][:max_new_tokens]
    return CJK_GAP.sub("", str(tokenizer.decode(ids, skip_special_tokens=True)))


@torch.no_grad()
def continuation_losses(
    tm: TaskModel, pairs: list[tuple[str, str]], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: summed cross-entropy of the continuation tokens, and how many there were."""
    losses, counts = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = encode_pairs(tm.tokenizer, chunk, tm.max_length, padding=True, return_tensors="pt")
        target = (encoded["token_type_ids"] == 1) & (encoded["attention_mask"] == 1)
        logits = tm.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        next_ids = encoded["input_ids"][:, 1:]
        token_loss = -log_probs.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
        mask = target[:, 1:]
        losses.append((token_loss * mask).sum(-1).numpy())
        counts.append(mask.sum(-1).numpy())
    return np.concatenate(losses), np.concatenate(counts)


def _stop_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id)


def _decoded(tokenizer: PreTrainedTokenizerBase, generated: list[int]) -> str:
    return CJK_GAP.sub("", str(tokenizer.decode(generated, skip_special_tokens=True)))


@torch.no_grad()
@contextmanager
def prompt_sides(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """While prompts are encoded: padded and truncated on the left, so a prompt longer than the model's
    window is continued from its end, where the text goes on, not from its start."""
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides


def generate(tm: TaskModel, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuation of each prompt until [SEP], at most max_new_tokens tokens.

    Transformers decoders go through `model.generate`: batches of left-padded prompts and a KV cache
    (each new token attends to cached keys instead of re-running the whole sequence). The LSTM, which
    has no generate, keeps the plain loop. Both give the same tokens (tests/lmforge/test_inference.py).
    """
    if not isinstance(tm.model, GenerationMixin):
        return [generate_one_by_one(tm, prompt, max_new_tokens) for prompt in prompts]
    tokenizer, stop, decoder = tm.tokenizer, _stop_id(tm.tokenizer), cast(Any, tm.model)
    outputs = []
    with prompt_sides(tokenizer):
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start : start + batch_size], truncation=True, padding=True,
                                max_length=tm.max_length - max_new_tokens, return_tensors="pt")  # fmt: skip
            produced = decoder.generate(
                input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
            )[:, encoded["input_ids"].shape[1] :]  # fmt: skip
            for row in produced.tolist():
                outputs.append(_decoded(tokenizer, row[: row.index(stop)] if stop in row else row))
    return outputs


@torch.no_grad()
def generate_one_by_one(tm: TaskModel, prompt: str, max_new_tokens: int) -> str:
    """The plain greedy loop, one prompt at a time, the whole sequence re-run for each token."""
    tokenizer, stop = tm.tokenizer, _stop_id(tm.tokenizer)
    with prompt_sides(tokenizer):
        ids = tokenizer(prompt, truncation=True, max_length=tm.max_length - max_new_tokens)["input_ids"]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(tm.model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax())
        if token == stop:
            break
        generated.append(token)
    return _decoded(tokenizer, generated)
