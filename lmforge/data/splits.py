"""Dedupe, sample and split a dataset; build the pretraining corpus from train splits only.

A row's split depends on the row alone: a seeded hash of its text (`split_draws`, `split_for`). So re-ingesting the
same source with the same params gives byte-identical Parquet files, appending rows to a source never
moves an existing row between train, val and test, and removing rows only removes them. The test
split's sha256 in the manifest is the contract that the evaluate and promote stages rely on, and
rows.parquet (each row's id and split) is what the gate checks a champion's training rows against.

Memory does not grow with the source: ingest spreads the rows over partition files by their split
hash (`Partitions`), so rows with the same text share a partition and the partitions in order are
the rows in split order; each partition is deduplicated, sampled and written on its own
(`ParquetRows`), and rows.parquet is built the same way, partitioned by row id.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.artifacts import SPLITS
from lmforge.io import sha256_file, sha256_text
from lmforge.schema import SplitFractions

# The rule `split_for` follows, recorded in every manifest: a different rule means rows may have moved.
SPLIT_RULE = "sha256(split:<seed>:<text>) < test | < test + val | train"
PARTITION_BYTES = 8 << 20  # about this much of the source per partition file
MAX_PARTITIONS = 512  # open files at once; a source beyond 4 GB makes each partition larger
ROW_GROUP_ROWS = 32_768  # rows a Parquet output holds in memory before it writes them


def row_id(text: str) -> str:
    """A row's identity across ingests: the first 64 bits of its text's sha256 (texts are deduplicated)."""
    return sha256_text(text)[:16]


def unit_hash(purpose: str, seed: int, text: str) -> float:
    """A number in [0, 1) drawn from the text alone, independent across purposes and seeds."""
    return int(sha256_text(f"{purpose}:{seed}:{text}")[:13], 16) / float(1 << 52)


def split_for(draw: float, fractions: SplitFractions) -> str:
    return "test" if draw < fractions.test else "val" if draw < fractions.test + fractions.val else "train"


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


class ParquetRows:
    """A Parquet file written a frame at a time, in row groups of ROW_GROUP_ROWS whatever the frames' sizes:
    the file depends on its rows alone (a table that fits one group is written as `pq.write_table` would)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: list[pd.DataFrame] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None

    def write(self, frame: pd.DataFrame) -> None:
        if self.schema is None and len(frame) == 0:
            self.schema = pa.Table.from_pandas(frame, preserve_index=False).schema  # an empty split keeps its columns
            return
        self.pending.append(frame)
        self.buffered += len(frame)
        while self.buffered >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        frame = pd.concat(self.pending, ignore_index=True) if len(self.pending) > 1 else self.pending[0]
        head, rest = frame.iloc[:rows], frame.iloc[rows:]
        # One chunk per column: Parquet's pages follow Arrow's chunks, and they must follow the rows alone.
        table = pa.Table.from_pandas(head.reset_index(drop=True), preserve_index=False).combine_chunks()
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd", write_statistics=False)
        self.writer.write_table(table.cast(self.writer.schema))  # at most ROW_GROUP_ROWS: one row group
        self.pending = [rest] if len(rest) else []
        self.buffered = len(rest)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)
        if self.writer is None:  # no rows at all: an empty table with the columns seen (if any)
            schema = self.schema if self.schema is not None else pa.schema([])
            pq.write_table(schema.empty_table(), self.path, compression="zstd", write_statistics=False)
        else:
            self.writer.close()

    def __enter__(self) -> ParquetRows:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self.writer is not None:
            self.writer.close()


class Partitions:
    """Rows spread over `count` Arrow files by a key in [0, 1): file i holds the keys in [i/count, (i+1)/count),
    so rows with the same key share a file and the files in order hold the keys in order. Rows keep the order
    they were added in within a file."""

    def __init__(self, folder: Path, count: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.count = folder, count
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.schema: pa.Schema | None = None

    def add(self, frame: pd.DataFrame, keys: np.ndarray) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.schema is None:
            self.schema = table.schema
        table = table.cast(self.schema)
        slots = np.minimum((keys * self.count).astype(np.int64), self.count - 1)
        for slot in np.unique(slots):
            if slot not in self.writers:
                self.writers[slot] = pa.ipc.new_stream(str(self.folder / f"{slot:05d}.arrow"), self.schema)
            self.writers[slot].write_table(table.filter(pa.array(slots == slot)))

    def close(self) -> None:
        """Every row was added: finish the files."""
        for writer in self.writers.values():
            writer.close()

    def __iter__(self) -> Iterator[pd.DataFrame]:
        """Each partition's rows, in key-range order (after `close`; as often as needed)."""
        for slot in sorted(self.writers):
            with pa.ipc.open_stream(str(self.folder / f"{slot:05d}.arrow")) as reader:
                yield reader.read_all().to_pandas()


def partition_count(size_bytes: int) -> int:
    """How many partitions a source of this size gets: one per PARTITION_BYTES, at most MAX_PARTITIONS."""
    return max(1, min(MAX_PARTITIONS, math.ceil(size_bytes / PARTITION_BYTES)))


def split_draws(texts: Iterable[Any], seed: int) -> np.ndarray:
    return np.fromiter((unit_hash("split", seed, str(text)) for text in texts), dtype=np.float64)


def sample_draws(texts: Iterable[Any], seed: int) -> np.ndarray:
    return np.fromiter((unit_hash("sample", seed, str(text)) for text in texts), dtype=np.float64)


def row_id_keys(row_ids: Iterable[str]) -> np.ndarray:
    """A row id's place in [0, 1), in row-id order: partitions of these keys are row-id ranges."""
    return np.fromiter((int(row[:8], 16) / float(1 << 32) for row in row_ids), dtype=np.float64)


def by_prefix(frames: Iterable[pd.DataFrame]) -> Iterator[tuple[str, pd.DataFrame]]:
    """Rows sorted by row_id (rows.parquet), grouped by the id's first two hex digits, in order: 1/256 of the
    rows at a time."""
    held: list[pd.DataFrame] = []
    current: str | None = None
    for frame in frames:
        prefixes = frame["row_id"].str[:2]
        for prefix in prefixes.unique():
            part = frame[prefixes == prefix]
            if prefix != current and held:
                assert current is not None
                yield current, pd.concat(held, ignore_index=True)
                held = []
            current = prefix
            held.append(part)
    if held:
        assert current is not None
        yield current, pd.concat(held, ignore_index=True)


def in_corpus_val(text: str, fraction: float) -> bool:
    """Hash-based holdout: a text's side depends only on the text, not on row order or seed."""
    return int(sha256_text(text)[:8], 16) / 0xFFFFFFFF < fraction


def write_corpus(train_texts: Iterable[tuple[str, str]], out_dir: Path, val_fraction: float) -> dict[str, Any]:
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
