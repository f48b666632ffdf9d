"""The simple model every task model must beat, as a real model: trained here, saved without pickle.

- classification: TF-IDF over character 1-2-grams + logistic regression (scikit-learn), saved as its
  vocabulary (JSON) and its idf, coefficients and intercept (safetensors);
- token classification: the tag each word carried most often in train (JSON), "O" for unseen words;
- generation: an interpolated n-gram language model over the task model's own tokenizer tokens
  (absolute discounting down to an add-one unigram), so its perplexity is taken on exactly the
  continuation tokens the task model is scored on; saved as count arrays (safetensors) and the tokenizer (JSON).

A baseline folder holds `baseline.json` (what it is) beside those files; `load_baseline(folder)`
rebuilds it from them alone, so the registered baseline serves through the same pyfunc
(lmforge/serving.py) and the same `predict(pd.DataFrame({"text": [...]}))` contract as a task model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BASELINE_FILE = "baseline.json"
UNSEEN_TAG = "O"


def _vectorizer(vocabulary: dict[str, int] | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char", ngram_range=(1, 2), min_df=2, sublinear_tf=True, vocabulary=vocabulary)


@dataclass
class TfidfLogReg:
    """TF-IDF over character 1-2-grams + logistic regression."""

    labels: list[str]  # the task's label set: probability columns are in this order
    vocabulary: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray  # (1, features) for two classes, (classes, features) for more
    intercept: np.ndarray
    classes: np.ndarray  # indices into labels that train held (a class missing from train gets 0)

    name = "tfidf_char12_logreg"
    kind = "classification"

    @classmethod
    def fit(cls, texts: list[str], labels: list[str], label_set: list[str]) -> TfidfLogReg:
        from sklearn.linear_model import LogisticRegression

        index = {label: i for i, label in enumerate(label_set)}
        vectorizer = _vectorizer()
        features = vectorizer.fit_transform(texts)
        classifier = LogisticRegression(max_iter=2000, C=4.0)
        classifier.fit(features, [index[label] for label in labels])
        vocabulary = {str(gram): int(column) for gram, column in vectorizer.vocabulary_.items()}
        return cls(list(label_set), vocabulary, vectorizer.idf_, classifier.coef_, classifier.intercept_,
                   classifier.classes_)  # fmt: skip

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(texts, labels) class probabilities, exactly as the fitted scikit-learn pipeline gives them."""
        from sklearn.linear_model import LogisticRegression

        vectorizer = _vectorizer(self.vocabulary)
        vectorizer.idf_ = self.idf
        classifier = LogisticRegression()
        classifier.coef_, classifier.intercept_, classifier.classes_ = self.coef, self.intercept, self.classes
        found = classifier.predict_proba(vectorizer.transform(texts))
        probs = np.zeros((len(texts), len(self.labels)))
        probs[:, self.classes] = found
        return probs

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"idf": self.idf, "coef": self.coef, "intercept": self.intercept, "classes": self.classes},
                  str(folder / "weights.safetensors"))  # fmt: skip
        (folder / "vocabulary.json").write_text(json.dumps(self.vocabulary, ensure_ascii=False), encoding="utf-8")
        _describe(folder, self.kind, self.name, self.labels)

    @classmethod
    def load(cls, folder: Path) -> TfidfLogReg:
        from safetensors.numpy import load_file

        arrays = load_file(str(folder / "weights.safetensors"))
        vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
        return cls(_described(folder)["labels"], vocabulary, arrays["idf"], arrays["coef"], arrays["intercept"],
                   arrays["classes"])  # fmt: skip


@dataclass
class MajorityTag:
    """Each word gets the tag it carried most often in train; an unseen word gets "O"."""

    labels: list[str]
    tags: dict[str, str]

    name = "majority_tag_per_word"
    kind = "token_classification"

    @classmethod
    def fit(cls, sentences: list[list[str]], tags: list[list[str]], label_set: list[str]) -> MajorityTag:
        seen: dict[str, Counter[str]] = {}
        for words, word_tags in zip(sentences, tags, strict=True):
            for word, tag in zip(words, word_tags, strict=True):
                seen.setdefault(word, Counter())[tag] += 1
        return cls(list(label_set), {word: counts.most_common(1)[0][0] for word, counts in seen.items()})

    def predict(self, sentences: list[list[str]]) -> list[list[str]]:
        return [[self.tags.get(word, UNSEEN_TAG) for word in words] for words in sentences]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tags.json").write_text(json.dumps(self.tags, ensure_ascii=False), encoding="utf-8")
        _describe(folder, self.kind, self.name, self.labels)

    @classmethod
    def load(cls, folder: Path) -> MajorityTag:
        return cls(_described(folder)["labels"], json.loads((folder / "tags.json").read_text(encoding="utf-8")))


NGRAM_ORDER = 3
DISCOUNT = 0.75  # the usual absolute discount (Ney, Essen & Kneser 1994)


def _keys(windows: np.ndarray, vocab_size: int) -> np.ndarray:
    """One int64 per row of token ids: the ids as the digits of a base-vocab_size number."""
    keys = np.zeros(len(windows), dtype=np.int64)
    for column in range(windows.shape[1]):
        keys = keys * vocab_size + windows[:, column]
    return keys


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each query sits in sorted_keys, and whether it is there."""
    at = np.minimum(np.searchsorted(sorted_keys, queries), max(len(sorted_keys) - 1, 0))
    found = sorted_keys[at] == queries if len(sorted_keys) else np.zeros(len(queries), dtype=bool)
    return found, at


@dataclass
class NgramLM:
    """Interpolated absolute-discounting n-gram LM over token ids (exact, vectorized with sorted key arrays).

    P_1(w) = (c(w) + 1) / (N + V); for a context h of k-1 tokens seen in train,
    P_k(w | h) = max(c(h w) - D, 0) / c(h) + D * types(h) / c(h) * P_{k-1}(w | h without its first token),
    and P_k = P_{k-1} for an unseen h. Every token gets some probability, so every perplexity is finite.
    """

    tokenizer: Any  # the task model's tokenizer: the same tokens, the same continuation targets
    max_length: int
    unigram: np.ndarray  # (vocab,) counts
    grams: list[tuple[np.ndarray, np.ndarray]]  # orders 2..n: (sorted keys, counts)

    name = f"ngram{NGRAM_ORDER}_absolute_discounting"
    kind = "generation"
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vocab_size = len(self.unigram)
        self.order = len(self.grams) + 1
        self.contexts = []  # per order: sorted context keys, c(h), types(h)
        for keys, counts in self.grams:
            context, starts, types = np.unique(keys // self.vocab_size, return_index=True, return_counts=True)
            totals = np.add.reduceat(counts, starts) if len(counts) else counts
            self.contexts.append((context, totals.astype(np.float64), types.astype(np.float64)))

    @classmethod
    def fit(cls, sequences: list[list[int]], tokenizer: Any, max_length: int, order: int = NGRAM_ORDER) -> NgramLM:
        vocab_size = len(tokenizer)
        if float(vocab_size) ** order >= 2**63:
            raise ValueError(f"a vocabulary of {vocab_size} tokens is too large for a {order}-gram baseline")
        ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences else np.zeros(0, int)
        which = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
        grams = []
        for k in range(2, order + 1):
            starts = np.flatnonzero(which[: len(ids) - k + 1] == which[k - 1 :])  # windows inside one sequence
            windows = np.stack([ids[starts + i] for i in range(k)], axis=1)
            keys, counts = np.unique(_keys(windows, vocab_size), return_counts=True)
            grams.append((keys, counts.astype(np.int64)))
        return cls(tokenizer, max_length, np.bincount(ids, minlength=vocab_size).astype(np.int64), grams)

    def _mix(self, history: np.ndarray, candidates: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """P(candidates[i] | history[rows[i]]): history is (contexts, n-1) token ids, -1 where there are fewer."""
        probs = (self.unigram[candidates] + 1.0) / (self.unigram.sum() + self.vocab_size)
        for k, ((keys, counts), (context, totals, types)) in enumerate(
            zip(self.grams, self.contexts, strict=True), start=2
        ):
            if not len(context):
                continue
            h = history[:, history.shape[1] - (k - 1) :]
            h_keys = _keys(np.maximum(h, 0), self.vocab_size)
            seen, at = _lookup(context, h_keys)
            seen &= (h >= 0).all(axis=1)  # a history that starts before the text is not that context
            row_seen, row_at = seen[rows], at[rows]
            gram_found, gram_at = _lookup(keys, h_keys[rows] * self.vocab_size + candidates)
            c_hw = np.where(gram_found, counts[gram_at], 0)
            c_h, t_h = totals[row_at], types[row_at]
            mixed = np.maximum(c_hw - DISCOUNT, 0) / c_h + DISCOUNT * t_h / c_h * probs
            probs = np.where(row_seen, mixed, probs)
        return probs

    def _histories(self, ids: list[int], positions: np.ndarray) -> np.ndarray:
        """The n-1 tokens before each position (-1 before the start)."""
        padded = np.concatenate([np.full(self.order - 1, -1), np.asarray(ids, dtype=np.int64)])
        return np.stack([padded[positions + i] for i in range(self.order - 1)], axis=1)

    def next_token_probabilities(self, ids: list[int]) -> np.ndarray:
        """P(w | the last n-1 of ids) for every token w of the vocabulary."""
        history = self._histories(ids, np.asarray([len(ids)]))
        return self._mix(history, np.arange(self.vocab_size), np.zeros(self.vocab_size, dtype=np.int64))

    def continuation_losses(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """Per example: summed negative log-likelihood of the continuation tokens, and how many there were
        (the same encoding as lmforge.inference.continuation_losses, so the same tokens)."""
        from lmforge.tokenization import encode_pairs

        encoded = encode_pairs(self.tokenizer, pairs, self.max_length)
        losses, counts = np.zeros(len(pairs)), np.zeros(len(pairs), dtype=np.int64)
        for i, (ids, types) in enumerate(zip(encoded["input_ids"], encoded["token_type_ids"], strict=True)):
            positions = np.flatnonzero(np.asarray(types) == 1)
            positions = positions[positions > 0]
            history = self._histories(ids, positions)
            probs = self._mix(history, np.asarray(ids, dtype=np.int64)[positions], np.arange(len(positions)))
            losses[i], counts[i] = -np.log(probs).sum(), len(positions)
        return losses, counts

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuation until [SEP]: the most probable next token over the whole vocabulary."""
        from lmforge.inference import CJK_GAP, prompt_sides

        stop = self.tokenizer.sep_token_id if self.tokenizer.sep_token_id is not None else self.tokenizer.eos_token_id
        outputs = []
        for prompt in prompts:
            room = self.max_length - max_new_tokens
            with prompt_sides(self.tokenizer):  # a long prompt is continued from its end
                ids = list(self.tokenizer(prompt, truncation=True, max_length=room)["input_ids"])
            generated: list[int] = []
            for _ in range(max_new_tokens):
                token = int(self.next_token_probabilities(ids + generated).argmax())
                if token == stop:
                    break
                generated.append(token)
            outputs.append(CJK_GAP.sub("", str(self.tokenizer.decode(generated, skip_special_tokens=True))))
        return outputs

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"unigram": self.unigram}
        for k, (keys, counts) in enumerate(self.grams, start=2):
            arrays.update({f"keys_{k}": keys, f"counts_{k}": counts})
        save_file(arrays, str(folder / "ngrams.safetensors"))
        self.tokenizer.save_pretrained(str(folder))
        _describe(folder, self.kind, self.name, [], max_length=self.max_length)

    @classmethod
    def load(cls, folder: Path) -> NgramLM:
        from safetensors.numpy import load_file
        from transformers import AutoTokenizer

        arrays = load_file(str(folder / "ngrams.safetensors"))
        order = 1 + sum(1 for key in arrays if key.startswith("keys_"))
        grams = [(arrays[f"keys_{k}"], arrays[f"counts_{k}"]) for k in range(2, order + 1)]
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(tokenizer, int(_described(folder)["max_length"]), arrays["unigram"], grams)


Baseline = TfidfLogReg | MajorityTag | NgramLM


def _describe(folder: Path, kind: str, name: str, labels: list[str], **more: Any) -> None:
    described = {"kind": kind, "name": name, "labels": labels, **more}
    (folder / BASELINE_FILE).write_text(json.dumps(described, indent=2))


def _described(folder: Path) -> dict[str, Any]:
    described: dict[str, Any] = json.loads((folder / BASELINE_FILE).read_text())
    return described


def is_baseline(folder: Path) -> bool:
    return (Path(folder) / BASELINE_FILE).is_file()


def load_baseline(folder: Path) -> Baseline:
    """The baseline saved in `folder`, from its JSON and safetensors files only."""
    kind = _described(folder)["kind"]
    by_kind: dict[str, Any] = {cls.kind: cls for cls in (TfidfLogReg, MajorityTag, NgramLM)}
    loaded: Baseline = by_kind[kind].load(folder)
    return loaded
