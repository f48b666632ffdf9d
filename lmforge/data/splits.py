"""Dedupe, sample and split a dataset; build the pretraining corpus from train splits only.

Everything here is seeded and order-independent where it matters, so re-ingesting the same source
with the same params gives byte-identical Parquet files: the test split's sha256 in the manifest is
the contract that the evaluate and promote stages rely on.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.artifacts import SPLITS
from lmforge.io import sha256_file, sha256_text
from lmforge.schema import DatasetSpec, SplitFractions


def dedupe(table: pd.DataFrame) -> pd.DataFrame:
    """Drop rows whose text already appeared: an exact duplicate across splits would leak."""
    return table.drop_duplicates(subset="text", keep="first").reset_index(drop=True)


def sample_rows(table: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    if max_rows is None or len(table) <= max_rows:
        return table
    return table.sample(n=max_rows, random_state=seed).sort_index().reset_index(drop=True)


def split_indices(strata: list[str] | None, n_rows: int, fractions: SplitFractions, seed: int) -> dict[str, np.ndarray]:
    """Seeded split of row indices; stratified when `strata` (one label per row) is given.

    Each stratum is shuffled and cut at round(n * test) and round(n * val), so every class keeps its
    share in each split. The rows of each split are then shuffled once more with the same seed.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for index in range(n_rows):
        groups.setdefault(strata[index] if strata is not None else "", []).append(index)
    chosen: dict[str, list[int]] = {split: [] for split in SPLITS}
    for key in sorted(groups):
        members = np.array(groups[key])
        rng.shuffle(members)
        n_test = round(len(members) * fractions.test)
        n_val = round(len(members) * fractions.val)
        chosen["test"].extend(members[:n_test].tolist())
        chosen["val"].extend(members[n_test : n_test + n_val].tolist())
        chosen["train"].extend(members[n_test + n_val :].tolist())
    return {split: rng.permutation(np.array(indices, dtype=np.int64)) for split, indices in chosen.items()}


def split_table(
    table: pd.DataFrame, spec: DatasetSpec, fractions: SplitFractions, seed: int
) -> dict[str, pd.DataFrame]:
    strata = table["label"].tolist() if spec.kind == "classification" else None
    indices = split_indices(strata, len(table), fractions, seed)
    return {split: table.iloc[rows].reset_index(drop=True) for split, rows in indices.items()}


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
