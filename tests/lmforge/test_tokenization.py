from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmforge.schema import TokenizerParams
from lmforge.tokenization import (
    CLS,
    IGNORE_INDEX,
    PAD,
    SEP,
    align_labels,
    pack_corpus,
    read_blocks,
    save_hf_tokenizer,
    train_tokenizer,
    window_word_starts,
)
from tests.conftest import SmokeRun


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    lines = [f"迈向充满希望的新世纪 number {i} of the corpus" for i in range(300)]
    lines += ["质量还不错，内容只适合消遣", "Tokenizers learn from text"] * 50
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_align_labels_marks_special_and_continuation_tokens():
    # [CLS] w0 w0 w1 w2 w2 w2 [SEP]
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert align_labels(word_ids, [5, 6, 7]) == [
        IGNORE_INDEX,
        5,
        IGNORE_INDEX,
        6,
        7,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
    ]


def test_a_window_that_begins_inside_a_word_does_not_mark_that_piece_as_a_start():
    # Two windows sharing 2 pieces, the last two of w2's three: the second window begins inside w2.
    windows = [[None, 0, 1, 1, 2, 2, 2, None], [None, 2, 2, 3, 4, None]]
    assert window_word_starts(windows, overlap=2) == [[0, 1, 1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]]
    # The same windows, the second beginning at w2's first piece: a start.
    assert window_word_starts([[None, 0, 1, 2, 3, None], [None, 2, 3, 4, None]], overlap=2)[1] == [0, 1, 1, 1, 0]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "char"])
def test_each_kind_trains_saves_and_reloads_as_a_transformers_tokenizer(kind: str, corpus: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer = train_tokenizer(TokenizerParams(kind=kind, vocab_size=300, min_frequency=1), corpus, 64, 32)
    save_hf_tokenizer(tokenizer, tmp_path / "tok", 32)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "迈向新世纪 number 7"
    assert loaded(text)["input_ids"] == tokenizer.encode(text).ids
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.cls_token_id and ids[-1] == loaded.sep_token_id
    assert loaded.pad_token == PAD and loaded.mask_token == "[MASK]"
    assert len(loaded("字" * 100, truncation=True)["input_ids"]) == 32  # model_max_length travels with it


TRAIN_AND_DIGEST = """
import hashlib, sys
from pathlib import Path
from lmforge.schema import TokenizerParams
from lmforge.tokenization import train_tokenizer
params = TokenizerParams(kind=sys.argv[1], vocab_size=300, min_frequency=1)
print(hashlib.sha256(train_tokenizer(params, Path(sys.argv[2]), 64, 32).to_str().encode()).hexdigest())
"""


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "char"])
def test_training_gives_a_byte_identical_tokenizer_in_every_process(kind: str, tmp_path: Path):
    """Hash maps are seeded per process, so each run is its own process. Many equally frequent pairs
    here: unpinned, WordPiece gave five different tokenizers in five processes (tokenizers#1794); and
    more characters seen once than the alphabet holds, so the alphabet's cut falls among ties."""
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    syllables = ["ka", "to", "mi", "ra", "ne", "su", "lo", "pe", "di", "ba"]
    lines = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(8))
             for _ in range(400)]  # fmt: skip
    lines.append("".join(chr(0x4E00 + i) for i in range(400)))  # 400 CJK characters, once each
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    digests = {subprocess.run([sys.executable, "-c", TRAIN_AND_DIGEST, kind, str(tmp_path / "train.txt")],
                              capture_output=True, text=True, check=True).stdout for _ in range(4)}  # fmt: skip
    assert len(digests) == 1


def test_pack_corpus_blocks_start_with_cls_and_only_the_last_is_padded(corpus: Path, tmp_path: Path):
    tokenizer = train_tokenizer(TokenizerParams(kind="char", vocab_size=300, min_frequency=1), corpus, 64, 512)
    meta = pack_corpus(tokenizer, corpus, tmp_path / "train.bin", block_size=16, batch_size=7)
    blocks = read_blocks(tmp_path / "train.bin", meta["dtype"], 16)
    assert blocks.shape == (meta["blocks"], 16) and blocks.dtype == np.uint16
    assert (blocks[:, 0] == tokenizer.token_to_id(CLS)).all()
    pad = tokenizer.token_to_id(PAD)
    assert not (blocks[:-1] == pad).any()
    lines = corpus.read_text(encoding="utf-8").splitlines()
    expected_tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(lines, add_special_tokens=False))
    n_cls = meta["blocks"]
    assert meta["tokens"] == expected_tokens + n_cls
    assert int((blocks == tokenizer.token_to_id(SEP)).sum()) == len(lines)
    assert meta["padding_fraction"] == pytest.approx(int((blocks == pad).sum()) / blocks.size, abs=1e-6)


def test_smoke_task_datasets_align_one_label_per_word(smoke_run: SmokeRun):
    processed = smoke_run.processed / "datasets" / "people_daily"
    tokenized = pq.read_table(processed / "test.parquet").to_pylist()
    raw = pq.read_table(smoke_run.raw / "people_daily" / "test.parquet").to_pylist()
    max_length = smoke_run.params.preprocess.max_length
    for row, source in zip(tokenized, raw, strict=True):
        assert len(row["input_ids"]) == len(row["labels"]) <= max_length
        assert row["labels"][0] == IGNORE_INDEX and row["labels"][-1] == IGNORE_INDEX
        if len(row["input_ids"]) < max_length:  # not truncated: every word labelled exactly once
            assert sum(label != IGNORE_INDEX for label in row["labels"]) == len(source["tokens"])
    sentiment = pq.read_table(smoke_run.processed / "datasets" / "sentiment" / "train.parquet")
    assert set(sentiment.column("label").to_pylist()) == {0, 1}
