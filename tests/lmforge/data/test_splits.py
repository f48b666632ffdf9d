from __future__ import annotations

from collections import Counter

import numpy as np

from lmforge.data.splits import in_corpus_val, split_indices
from lmforge.schema import SplitFractions


def test_stratified_split_is_complete_disjoint_seeded_and_keeps_class_shares():
    strata = ["a"] * 700 + ["b"] * 300
    fractions = SplitFractions(val=0.1, test=0.2)
    first = split_indices(strata, len(strata), fractions, seed=7)
    everything = np.concatenate(list(first.values()))
    assert sorted(everything.tolist()) == list(range(1000))  # every row once
    test_classes = Counter(strata[i] for i in first["test"])
    assert test_classes == {"a": 140, "b": 60}
    again = split_indices(strata, len(strata), fractions, seed=7)
    assert all(np.array_equal(first[s], again[s]) for s in first)
    other = split_indices(strata, len(strata), fractions, seed=8)
    assert not np.array_equal(first["test"], other["test"])


def test_unstratified_split_sizes():
    parts = split_indices(None, 50, SplitFractions(val=0.1, test=0.1), seed=0)
    assert {split: len(rows) for split, rows in parts.items()} == {"train": 40, "val": 5, "test": 5}


def test_corpus_holdout_depends_on_the_text_only():
    texts = [f"document {i}" for i in range(2000)]
    held = [t for t in texts if in_corpus_val(t, 0.05)]
    assert 50 < len(held) < 150
    assert held == [t for t in reversed(texts) if in_corpus_val(t, 0.05)][::-1]
