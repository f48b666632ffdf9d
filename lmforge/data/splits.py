"""Dedupe, sample and split a dataset; build the pretraining corpus from train splits only.

A row's split depends on the row alone: a seeded hash of its text (`split_of`). So re-ingesting the
same source with the same params gives byte-identical Parquet files, appending rows to a source never
moves an existing row between train, val and test, and removing rows only removes them. The test
split's sha256 in the manifest is the contract that the evaluate and promote stages rely on, and
rows.parquet (each row's id and split) is what the gate checks a champion's training rows against.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.artifacts import SPLITS
from lmforge.io import sha256_file, sha256_text
from lmforge.schema import SplitFractions

# The rule `split_of` follows, recorded in every manifest: a different rule means rows may have moved.
SPLIT_RULE = "sha256(split:<seed>:<text>) < test | < test + val | train"


def row_id(text: str) -> str:
    """A row's identity across ingests: the first 64 bits of its text's sha256 (texts are deduplicated)."""
    return sha256_text(text)[:16]


def unit_hash(purpose: str, seed: int, text: str) -> float:
    """A number in [0, 1) drawn from the text alone, independent across purposes and seeds."""
    return int(sha256_text(f"{purpose}:{seed}:{text}")[:13], 16) / float(1 << 52)


def dedupe(table: pd.DataFrame) -> pd.DataFrame:
    """Drop rows whose text already appeared: an exact duplicate across splits would leak."""
    return table.drop_duplicates(subset="text", keep="first").reset_index(drop=True)


def sample_rows(table: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    """The `max_rows` rows with the smallest sample hash, in source order: which rows are kept depends on
    the texts, not on where they sit in the source."""
    if max_rows is None or len(table) <= max_rows:
        return table
    draws = table["text"].map(lambda text: unit_hash("sample", seed, str(text)))
    return table.loc[draws.nsmallest(max_rows).index.sort_values()].reset_index(drop=True)


def split_for(draw: float, fractions: SplitFractions) -> str:
    return "test" if draw < fractions.test else "val" if draw < fractions.test + fractions.val else "train"


def split_of(text: str, fractions: SplitFractions, seed: int) -> str:
    """test, val or train, from the text's split hash alone."""
    return split_for(unit_hash("split", seed, text), fractions)


def split_table(table: pd.DataFrame, fractions: SplitFractions, seed: int) -> dict[str, pd.DataFrame]:
    """Each row to the split its text hashes to; within a split, rows in split-hash order (a seeded shuffle
    that new rows join in place). Every class keeps its share in expectation: the hash knows no labels."""
    draws = table["text"].map(lambda text: unit_hash("split", seed, str(text)))
    ordered = table.assign(_draw=draws).sort_values("_draw", kind="stable")
    side = ordered["_draw"].map(lambda draw: split_for(draw, fractions))
    return {split: ordered[side == split].drop(columns="_draw").reset_index(drop=True) for split in SPLITS}


def rows_table(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """rows.parquet: every row's id and split, ordered by id."""
    frame = pd.DataFrame({"row_id": [row_id(str(text)) for split in SPLITS for text in splits[split]["text"]],
                          "split": [split for split in SPLITS for _ in range(len(splits[split]))]})  # fmt: skip
    return frame.sort_values("row_id", kind="stable").reset_index(drop=True)


def label_counts(table: pd.DataFrame, kind: str) -> dict[str, int]:
    """Class counts (classification) or tag counts (token classification); empty for a corpus."""
    if kind == "classification":
        counts = Counter(table["label"])
    elif kind == "token_classification":
        counts = Counter(tag for tags in table["tags"] for tag in tags)
    else:
        return {}
    return dict(sorted(counts.items()))


def write_parquet(table: pd.DataFrame, path: Path) -> str:
    """Write deterministically (no index, fixed compression) and return the file's sha256."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(arrow, path, compression="zstd", write_statistics=False)
    return sha256_file(path)


def in_corpus_val(text: str, fraction: float) -> bool:
    """Hash-based holdout: a text's side depends only on the text, not on row order or seed."""
    return int(sha256_text(text)[:8], 16) / 0xFFFFFFFF < fraction


def write_corpus(train_texts: list[tuple[str, str]], out_dir: Path, val_fraction: float) -> dict[str, Any]:
    """Write corpus/{train,val}.txt (one document a line) from (dataset, text) pairs of train splits."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Counter[str]] = {"train": Counter(), "val": Counter()}
    chars = {"train": 0, "val": 0}
    with (
        open(out_dir / "train.txt", "w", encoding="utf-8") as train,
        open(out_dir / "val.txt", "w", encoding="utf-8") as val,
    ):
        for dataset, text in train_texts:
            line = " ".join(text.split())  # one document per line: fold newlines and runs of space
            if not line:
                continue
            side = "val" if in_corpus_val(line, val_fraction) else "train"
            (val if side == "val" else train).write(line + "\n")
            counts[side][dataset] += 1
            chars[side] += len(line)
    return {
        "documents": {side: dict(sorted(counter.items())) for side, counter in counts.items()},
        "characters": chars,
        "val_fraction": val_fraction,
        "files": {name: sha256_file(out_dir / name) for name in ("train.txt", "val.txt")},
    }
