"""Train a tokenizer on the pretraining corpus; pack the corpus into blocks; tokenize task datasets.

Everything streams: the corpus is read line by line, task splits batch by batch, and packed blocks
are appended to a flat file, so peak memory depends on `batch_size` and the vocabulary, not on
the size of the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import DataError
from lmforge.schema import TokenizerParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]
IGNORE_INDEX = -100  # label of continuation and special tokens: the loss skips them


def iter_lines(path: Path, batch_size: int) -> Iterator[list[str]]:
    """Non-empty lines of a text file, `batch_size` at a time."""
    batch: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                batch.append(line)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
    if batch:
        yield batch


def new_tokenizer(params: TokenizerParams, pinned: list[str] | None = None, vocab_size: int | None = None,
                  alphabet: list[str] | None = None) -> tuple[Tokenizer, trainers.Trainer]:  # fmt: skip
    """An untrained tokenizer of the chosen kind and the trainer that fills its vocabulary.

    `pinned` tokens get the first ids after the special tokens, and `alphabet` is WordPiece's exact
    character set (see train_tokenizer).
    """
    common: dict[str, Any] = {
        "vocab_size": params.vocab_size if vocab_size is None else vocab_size,
        "min_frequency": params.min_frequency,
        "special_tokens": SPECIAL_TOKENS + (pinned or []),
        "show_progress": False,
    }
    if params.kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        # handle_chinese_chars puts every CJK character in a word of its own, as BERT-Chinese does.
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=params.lowercase
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        # Chinese has thousands of characters: without a cap on the alphabet, the vocabulary would
        # outgrow vocab_size. Keep the most frequent characters and leave a fifth for word pieces.
        limit_alphabet = alphabet_limit(params)
        trainer: trainers.Trainer = trainers.WordPieceTrainer(
            limit_alphabet=len(alphabet) if alphabet else limit_alphabet, initial_alphabet=alphabet or [], **common
        )
    elif params.kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
    else:  # char
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if params.lowercase else [])
        tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
        )
        trainer = trainers.WordLevelTrainer(**common)
    return tokenizer, trainer


def alphabet_limit(params: TokenizerParams) -> int:
    return int(params.vocab_size * 0.8) - len(SPECIAL_TOKENS)


def wordpiece_alphabet(params: TokenizerParams, corpus: Path, batch_size: int) -> list[str]:
    """The `alphabet_limit` most frequent characters of the normalized corpus, ties broken by the character.

    The trainer's own cut sorts by count alone, unstably: with thousands of Chinese characters seen
    once or twice, which of the tied ones it kept changed from run to run.
    """
    from collections import Counter

    normalizer = new_tokenizer(params)[0].normalizer
    counts: Counter[str] = Counter()
    for batch in iter_lines(corpus, batch_size):
        counts.update("".join(normalizer.normalize_str(line) for line in batch))
    ranked = sorted((item for item in counts.items() if not item[0].isspace()), key=lambda item: (-item[1], item[0]))
    return [char for char, _ in ranked[: alphabet_limit(params)]]


def continuing_pieces(params: TokenizerParams, corpus: Path, batch_size: int, alphabet: list[str]) -> list[str]:
    """The one-character word pieces (`##x`) WordPiece training creates for this corpus, sorted.

    The trainer creates them while iterating a hash map, so their ids, and with them the tie-breaks
    between equally frequent merges, change from process to process (huggingface/tokenizers#1794):
    the same corpus gave vocabularies of 7,644, 7,645 and 7,648 tokens. Which pieces exist does not
    depend on that order, so a first pass with no merges (vocab_size 1: fast) finds them.
    """
    tokenizer, trainer = new_tokenizer(params, vocab_size=1, alphabet=alphabet)
    tokenizer.train_from_iterator((line for batch in iter_lines(corpus, batch_size) for line in batch), trainer=trainer)
    return sorted(token for token in tokenizer.get_vocab() if token.startswith("##") and len(token) == 3)


def train_tokenizer(params: TokenizerParams, corpus: Path, batch_size: int, max_length: int) -> Tokenizer:
    """Train on the corpus (streamed), then add [CLS] ... [SEP] framing and truncation.

    Deterministic: the same corpus and params give a byte-identical tokenizer. For WordPiece the
    alphabet is chosen here (wordpiece_alphabet), and the one-character pieces are pinned first, in
    sorted order, as extra special tokens (the trainer then finds them already numbered), and
    unpinned as special tokens afterwards: they stay in the vocabulary as ordinary pieces.
    """
    alphabet = wordpiece_alphabet(params, corpus, batch_size) if params.kind == "wordpiece" else None
    pinned = continuing_pieces(params, corpus, batch_size, alphabet) if alphabet is not None else []
    tokenizer, trainer = new_tokenizer(params, pinned, alphabet=alphabet)
    tokenizer.train_from_iterator((line for batch in iter_lines(corpus, batch_size) for line in batch), trainer=trainer)
    if pinned:
        data = json.loads(tokenizer.to_str())
        data["added_tokens"] = [added for added in data["added_tokens"] if added["content"] in SPECIAL_TOKENS]
        tokenizer = Tokenizer.from_str(json.dumps(data))
    cls_id, sep_id = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls_id), (SEP, sep_id)]
    )
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_length: int) -> None:
    """Save as a transformers `PreTrainedTokenizerFast` folder, loadable with AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        pad_token=PAD,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        bos_token=CLS,  # a decoder starts from [CLS] and stops at [SEP]: one vocabulary for both
        eos_token=SEP,
        model_max_length=max_length,
    )
    wrapped.save_pretrained(str(out_dir))


def special_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a special token every lmforge tokenizer has."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"the tokenizer has no {token} token")
    return found


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page cache of packed blocks whenever the vocabulary fits."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class PackStats:
    documents: int = 0
    tokens: int = 0  # real tokens written, [CLS]/[SEP] framing included, padding excluded
    blocks: int = 0
    padding: int = 0
    unknown: int = 0


@dataclass(frozen=True)
class BlockMarks:
    """The ids pack_corpus writes besides the text: each block's first token (None: a block starts anywhere in
    the text, as a GPT-2 tokenizer has no [CLS]), the one after each document, and the padding of the last
    block (None: a tokenizer without a pad token drops a partial last block instead)."""

    start: int | None
    separator: int
    pad: int | None
    unknown: int | None

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> BlockMarks:
        """lmforge's own tokenizers: `[CLS] doc [SEP] doc [SEP] ... [PAD]`."""
        cls_id, sep_id, pad_id, unk_id = (special_id(tokenizer, token) for token in (CLS, SEP, PAD, UNK))
        return cls(cls_id, sep_id, pad_id, unk_id)


def pack_corpus(tokenizer: Tokenizer, corpus: Path, out_path: Path, block_size: int, batch_size: int,
                marks: BlockMarks | None = None) -> dict[str, Any]:  # fmt: skip
    """Pack documents into fixed blocks `[CLS] doc [SEP] doc [SEP] ...`, appended to a flat file.

    Read it back with `np.memmap(out_path, dtype, mode="r").reshape(-1, block_size)`. Only the
    last block is padded, so the padding fraction is at most one block's worth.
    """
    marks = marks or BlockMarks.of(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    stats = PackStats()
    lead = [] if marks.start is None else [marks.start]
    body = block_size - len(lead)  # every block starts with [CLS], where the tokenizer has one
    pending: list[int] = []
    with open(out_path, "wb") as handle:

        def flush(complete_only: bool) -> None:
            nonlocal pending
            n_full = len(pending) // body
            if n_full:
                chunk = np.asarray(pending[: n_full * body], dtype=dtype).reshape(n_full, body)
                blocks = np.concatenate([np.full((n_full, len(lead)), lead, dtype=dtype), chunk], axis=1)
                blocks.tofile(handle)
                stats.blocks += n_full
                stats.tokens += n_full * block_size
                pending = pending[n_full * body :]
            if not complete_only and pending and marks.pad is not None:
                tail = [*lead, *pending] + [marks.pad] * (body - len(pending))
                np.asarray(tail, dtype=dtype).tofile(handle)
                stats.blocks += 1
                stats.tokens += len(lead) + len(pending)
                stats.padding += body - len(pending)
                pending = []

        for batch in iter_lines(corpus, batch_size):
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                pending.extend(encoding.ids)
                pending.append(marks.separator)
                stats.unknown += encoding.ids.count(marks.unknown) if marks.unknown is not None else 0
            stats.documents += len(batch)
            flush(complete_only=True)
        flush(complete_only=False)
    if stats.blocks == 0:
        short = f"is shorter than one block of {block_size} tokens" if stats.documents else "is empty"
        raise DataError(f"{corpus}: the pretraining corpus {short}")
    total = stats.blocks * block_size
    return {
        "file": out_path.name,
        "dtype": dtype.name,
        "block_size": block_size,
        "documents": stats.documents,
        "tokens": stats.tokens,
        "blocks": stats.blocks,
        "padding_fraction": round(stats.padding / total, 6),
        "unknown_fraction": round(stats.unknown / max(stats.tokens, 1), 6),
    }


def read_blocks(path: Path, dtype: str, block_size: int) -> np.ndarray:
    """The packed blocks as a read-only (n_blocks, block_size) memory map."""
    flat = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    return flat.reshape(-1, block_size)


# ---------------------------------------------------------------------------------------------
# task datasets
# ---------------------------------------------------------------------------------------------


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """One label per sub-word token: the word's label on its first piece, -100 elsewhere.

    Special tokens ([CLS], [SEP]) have no word and continuation pieces repeat the previous word;
    both get IGNORE_INDEX so the loss and the metrics see each word exactly once. (Tagging every
    character of a word instead, B-LOC then I-LOC, was measured: NER entity F1 0.557 against 0.597.)
    """
    return [word_labels[word] if start and word is not None else IGNORE_INDEX
            for word, start in zip(word_ids, word_starts(word_ids), strict=True)]  # fmt: skip


def word_starts(word_ids: list[int | None]) -> list[int]:
    """1 on the first piece of each word, 0 on continuation pieces and special tokens.

    Fed as token_type_ids to a token-classification model with two token types: it is the word
    segmentation the input came with (People's Daily's words are runs of CJK characters, which the
    tokenizer splits into one token each, so without it the model cannot tell where a word starts).
    """
    marks = []
    previous = None
    for word in word_ids:
        marks.append(0 if word is None or word == previous else 1)
        previous = word
    return marks


def window_overlap(max_length: int) -> int:
    """Tokens two consecutive windows of a long word sequence share (the tokenizer's stride)."""
    return max_length // 4


def window_word_starts(windows: list[list[int | None]], overlap: int) -> list[list[int]]:
    """word_starts for the consecutive windows of one word sequence (a tokenizer's overflowing encodings
    with stride `overlap`). A window after the first may begin inside a word: that piece is no start."""
    marks = []
    before: list[int] = []  # the previous window's words, one per piece
    for ids in windows:
        window_marks = word_starts(ids)
        pieces = [word for word in ids if word is not None]
        if pieces and len(before) > overlap and before[-overlap - 1] == pieces[0]:
            window_marks[ids.index(pieces[0])] = 0
        marks.append(window_marks)
        before = pieces
    return marks


def label_ids(values: list[str], index: dict[str, int], where: str) -> list[int]:
    try:
        return [index[value] for value in values]
    except KeyError as error:
        raise DataError(f"{where}: label {error.args[0]!r} is not in the label set {sorted(index)}") from None


def tokenize_split(
    tokenizer: Tokenizer, task: str, source: Path, out_path: Path, labels: list[str], batch_size: int
) -> dict[str, Any]:
    """Tokenize one split batch by batch into Parquet: input_ids + label, or input_ids + labels."""
    index = {label: position for position, label in enumerate(labels)}
    dtype = pa.uint16() if token_dtype(tokenizer.get_vocab_size()) == np.uint16 else pa.uint32()
    if task == "classification":
        schema = pa.schema([("input_ids", pa.list_(dtype)), ("label", pa.int32())])
    else:
        schema = pa.schema([("input_ids", pa.list_(dtype)), ("labels", pa.list_(pa.int32()))])
    rows = truncated = tokens = unknown = 0
    unk_id = tokenizer.token_to_id(UNK)
    with pq.ParquetWriter(out_path, schema, compression="zstd") as writer:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_size):
            if task == "classification":
                encodings = tokenizer.encode_batch(batch.column("text").to_pylist())
                targets = label_ids(batch.column("label").to_pylist(), index, str(source))
                columns = {"input_ids": [e.ids for e in encodings], "label": targets}
            else:
                words = batch.column("tokens").to_pylist()
                encodings = tokenizer.encode_batch(words, is_pretokenized=True)
                tags = [label_ids(sequence, index, str(source)) for sequence in batch.column("tags").to_pylist()]
                aligned = [align_labels(e.word_ids, t) for e, t in zip(encodings, tags, strict=True)]
                columns = {"input_ids": [e.ids for e in encodings], "labels": aligned}
            writer.write_table(pa.table(columns, schema=schema))
            rows += len(encodings)
            tokens += sum(len(e.ids) for e in encodings)
            truncated += sum(1 for e in encodings if e.overflowing)
            unknown += sum(e.ids.count(unk_id) for e in encodings) if unk_id is not None else 0
    return {"rows": rows, "tokens": tokens, "truncated_fraction": round(truncated / max(rows, 1), 4),
            "unknown_fraction": round(unknown / max(tokens, 1), 4)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# generation examples: (prompt, continuation) pairs
# ---------------------------------------------------------------------------------------------


def generation_pairs(texts: list[str], prompt_chars: int) -> list[tuple[str, str]]:
    return [(text[:prompt_chars], text[prompt_chars:]) for text in texts if len(text) > prompt_chars]


def example_pairs(rows: pd.DataFrame, prompt_chars: int) -> list[tuple[str, str]]:
    """A generation task's (prompt, continuation) examples: an instruction dataset's (prompt, response) rows,
    or any other dataset's texts split after their first prompt_chars characters."""
    if "response" in rows.columns:
        return [(str(prompt), str(response)) for prompt, response in zip(rows["text"], rows["response"], strict=True)
                if str(response)]  # fmt: skip
    return generation_pairs([str(text) for text in rows["text"]], prompt_chars)


def prompt_tails(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt cut to its last max_tokens tokens, at a token's first character: a reply answers the end of a
    conversation, and the window must leave room for the reply."""
    encoded = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    return [prompt if len(offsets) <= max_tokens else prompt[offsets[-max_tokens][0] :]
            for prompt, offsets in zip(prompts, encoded["offset_mapping"], strict=True)]  # fmt: skip


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_length: int,
                 **options: Any) -> Any:  # fmt: skip
    """`[CLS] prompt [SEP] continuation [SEP]`, as every generation model is trained and scored: a prompt keeps
    at most its last half-window of tokens, the continuation is cut at the window's end. token_type_ids mark the
    continuation (1)."""
    prompts = prompt_tails(tokenizer, [prompt for prompt, _ in pairs], max_length // 2)
    return tokenizer(prompts, [continuation for _, continuation in pairs], truncation="only_second",
                     max_length=max_length, return_token_type_ids=True, **options)  # fmt: skip
