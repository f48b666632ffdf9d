from __future__ import annotations

import pandas as pd

from lmforge.data.splits import in_corpus_val, rows_table, sample_rows, split_table
from lmforge.schema import SplitFractions

FRACTIONS = SplitFractions(val=0.1, test=0.2)


def reviews(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"review number {i}" for i in range(start, start + n)],
                         "label": ["pos" if i % 3 else "neg" for i in range(start, start + n)]})  # fmt: skip


def side_of(splits: dict[str, pd.DataFrame]) -> dict[str, str]:
    return {text: split for split, frame in splits.items() for text in frame["text"]}


def test_split_is_complete_disjoint_seeded_and_keeps_class_shares_in_expectation():
    table = reviews(3000)
    first = split_table(table, FRACTIONS, seed=7)
    assert sorted(side_of(first)) == sorted(table["text"])  # every row once
    assert 0.17 < len(first["test"]) / 3000 < 0.23 and 0.07 < len(first["val"]) / 3000 < 0.13
    share = (first["test"]["label"] == "neg").mean()
    assert abs(share - (table["label"] == "neg").mean()) < 0.05  # the hash knows no labels
    again = split_table(table, FRACTIONS, seed=7)
    assert all(first[split].equals(again[split]) for split in first)
    other = split_table(table, FRACTIONS, seed=8)
    assert not first["test"]["text"].equals(other["test"]["text"])


def test_appending_rows_never_moves_a_row_and_removing_rows_only_removes_them():
    old = reviews(1200)
    before = side_of(split_table(old, FRACTIONS, seed=1234))
    grown = pd.concat([old, reviews(400, start=1200)], ignore_index=True)
    after = side_of(split_table(grown, FRACTIONS, seed=1234))
    assert {text: after[text] for text in before} == before
    shrunk = side_of(split_table(old.iloc[::2], FRACTIONS, seed=1234))
    assert shrunk == {text: before[text] for text in old["text"].iloc[::2]}
    # The source order does not matter either.
    assert side_of(split_table(grown.iloc[::-1], FRACTIONS, seed=1234)) == after


def test_the_sample_depends_on_the_texts_not_their_order():
    table = reviews(500)
    kept = set(sample_rows(table, 100, seed=3)["text"])
    assert len(kept) == 100 and kept == set(sample_rows(table.iloc[::-1], 100, seed=3)["text"])
    # A sample is not a split's worth of low split hashes: its rows fall into every split.
    assert len(set(side_of(split_table(sample_rows(table, 100, seed=3), FRACTIONS, seed=3)).values())) == 3


def test_rows_table_names_every_row_once_with_its_split():
    splits = split_table(reviews(300), FRACTIONS, seed=1)
    rows = rows_table(splits)
    assert len(rows) == 300 and rows["row_id"].is_unique
    assert rows["split"].value_counts().to_dict() == {split: len(frame) for split, frame in splits.items()}


def test_corpus_holdout_depends_on_the_text_only():
    texts = [f"document {i}" for i in range(2000)]
    held = [t for t in texts if in_corpus_val(t, 0.05)]
    assert 50 < len(held) < 150
    assert held == [t for t in reversed(texts) if in_corpus_val(t, 0.05)][::-1]
