"""Dedupe, sample and split, as ingest writes them: a source streamed a chunk at a time through partition files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lmforge.data.sources import SourceStream
from lmforge.data.splits import PARTITION_BYTES, in_corpus_val
from lmforge.ingest import SplitCounts, write_dataset
from lmforge.schema import DatasetSpec, IngestParams, LocalSource, SplitFractions

FRACTIONS = SplitFractions(val=0.1, test=0.2)
SPLITS = ("train", "val", "test")


def reviews(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"review number {i}" for i in range(start, start + n)],
                         "label": ["pos" if i % 3 else "neg" for i in range(start, start + n)]})  # fmt: skip


def split(table: pd.DataFrame, folder: Path, seed: int = 7, max_rows: int | None = None, partitions: int = 1,
          chunk_rows: int = 97, dedupe: bool = True) -> tuple[dict[str, pd.DataFrame], SplitCounts]:  # fmt: skip
    """`table` through ingest's writer, streamed in chunks of `chunk_rows` over `partitions` partition files."""
    chunks = (table.iloc[start : start + chunk_rows] for start in range(0, len(table), chunk_rows))
    stream = SourceStream(chunks, "test rows", partitions * PARTITION_BYTES, lambda: "")
    spec = DatasetSpec(kind="classification", source=LocalSource(path="unused.csv"), max_rows=max_rows)
    params = IngestParams(datasets={"reviews": spec}, seed=seed, split=FRACTIONS, dedupe=dedupe)
    folder.mkdir(parents=True)
    counts = write_dataset(stream, spec, params, folder)
    assert sorted(path.name for path in folder.iterdir()) == ["rows.parquet", "test.parquet", "train.parquet",
                                                                "val.parquet"]  # no partition file left # fmt: skip
    return {side: pd.read_parquet(folder / f"{side}.parquet") for side in SPLITS}, counts


def side_of(splits: dict[str, pd.DataFrame]) -> dict[str, str]:
    return {text: side for side, frame in splits.items() for text in frame["text"]}


def test_split_is_complete_disjoint_seeded_and_keeps_class_shares_in_expectation(tmp_path: Path):
    table = reviews(3000)
    first, counts = split(table, tmp_path / "a")
    assert sorted(side_of(first)) == sorted(table["text"])  # every row once
    assert counts.source == counts.unique == counts.kept == 3000
    assert 0.17 < len(first["test"]) / 3000 < 0.23 and 0.07 < len(first["val"]) / 3000 < 0.13
    share = (first["test"]["label"] == "neg").mean()
    assert abs(share - (table["label"] == "neg").mean()) < 0.05  # the hash knows no labels
    again, _ = split(table, tmp_path / "b")
    assert all(first[side].equals(again[side]) for side in SPLITS)
    other, _ = split(table, tmp_path / "c", seed=8)
    assert not first["test"]["text"].equals(other["test"]["text"])


@pytest.mark.parametrize("max_rows", [None, 700])
def test_the_files_do_not_depend_on_how_the_source_is_chunked_or_partitioned(tmp_path: Path, max_rows: int | None):
    table = pd.concat([reviews(2000), reviews(300, start=100)], ignore_index=True)  # 300 repeated texts
    _, counts = split(table, tmp_path / "one", max_rows=max_rows, partitions=1, chunk_rows=5000)
    assert counts.source == 2300 and counts.unique == 2000 and counts.kept == (max_rows or 2000)
    for partitions, chunk_rows in ((7, 97), (64, 13)):
        folder = tmp_path / f"p{partitions}"
        split(table, folder, max_rows=max_rows, partitions=partitions, chunk_rows=chunk_rows)
        for name in ("train", "val", "test", "rows"):
            assert (folder / f"{name}.parquet").read_bytes() == (tmp_path / "one" / f"{name}.parquet").read_bytes()


def test_within_a_split_rows_follow_the_split_hash_and_rows_parquet_is_sorted_by_id(tmp_path: Path):
    from lmforge.data.splits import row_id, unit_hash

    splits, _ = split(reviews(1000), tmp_path / "s", partitions=9)
    for frame in splits.values():
        draws = [unit_hash("split", 7, text) for text in frame["text"]]
        assert draws == sorted(draws)
    rows = pd.read_parquet(tmp_path / "s" / "rows.parquet")
    assert rows["row_id"].tolist() == sorted(row_id(text) for text in reviews(1000)["text"])
    assert rows["split"].value_counts().to_dict() == {side: len(frame) for side, frame in splits.items()}


def test_duplicates_keep_the_first_copy_and_without_dedupe_all_stay_in_one_split(tmp_path: Path):
    table = pd.DataFrame({"text": ["same", "other", "same"], "label": ["neg", "pos", "pos"]})
    kept, counts = split(table, tmp_path / "d", partitions=3, chunk_rows=1)
    assert counts.unique == 2 and pd.concat(kept.values()).set_index("text").loc["same", "label"] == "neg"
    every, counts = split(table, tmp_path / "e", partitions=3, chunk_rows=1, dedupe=False)
    assert counts.kept == 3 and sum((frame["text"] == "same").sum() > 0 for frame in every.values()) == 1


def test_appending_rows_never_moves_a_row_and_removing_rows_only_removes_them(tmp_path: Path):
    old = reviews(1200)
    before = side_of(split(old, tmp_path / "old", seed=1234)[0])
    grown = pd.concat([old, reviews(400, start=1200)], ignore_index=True)
    after = side_of(split(grown, tmp_path / "grown", seed=1234, partitions=5)[0])
    assert {text: after[text] for text in before} == before
    shrunk = side_of(split(old.iloc[::2], tmp_path / "shrunk", seed=1234)[0])
    assert shrunk == {text: before[text] for text in old["text"].iloc[::2]}
    # The source order does not matter either.
    assert side_of(split(grown.iloc[::-1], tmp_path / "reversed", seed=1234)[0]) == after


def test_the_sample_depends_on_the_texts_not_their_order(tmp_path: Path):
    table = reviews(500)
    kept = side_of(split(table, tmp_path / "a", seed=3, max_rows=100)[0])
    assert len(kept) == 100 and kept == side_of(split(table.iloc[::-1], tmp_path / "b", seed=3, max_rows=100)[0])
    # A sample is not a split's worth of low split hashes: its rows fall into every split.
    assert len(set(kept.values())) == 3


def test_a_sample_keeps_exactly_max_rows_even_when_copies_tie_at_its_edge(tmp_path: Path):
    copies = pd.DataFrame({"text": ["copy"] * 8, "label": ["pos"] * 8})  # one draw, eight rows (dedupe off)
    table = pd.concat([reviews(30), copies], ignore_index=True)
    for max_rows in range(10, 38):
        _, counts = split(table, tmp_path / f"m{max_rows}", max_rows=max_rows, dedupe=False, partitions=3,
                          chunk_rows=4)  # fmt: skip
        assert counts.kept == max_rows


def test_corpus_holdout_depends_on_the_text_only():
    texts = [f"document {i}" for i in range(2000)]
    held = [t for t in texts if in_corpus_val(t, 0.05)]
    assert 50 < len(held) < 150
    assert held == [t for t in reversed(texts) if in_corpus_val(t, 0.05)][::-1]


def test_what_changed_is_counted_one_id_prefix_at_a_time_as_whole_tables_would_count_it(tmp_path: Path):
    from lmforge.data.splits import row_id
    from lmforge.ingest import PreviousIngest, data_changes

    def rows(texts: dict[str, str]) -> pd.DataFrame:
        frame = pd.DataFrame({"row_id": [row_id(text) for text in texts], "split": list(texts.values())})
        return frame.sort_values("row_id", kind="stable").reset_index(drop=True)

    sides = ("train", "val", "test")
    # ids starting with f only now, with 0 only before: prefixes one side lacks
    before = {f"text {i}": sides[i % 3] for i in range(3000) if not row_id(f"text {i}").startswith("f")}
    now = {text: side for text, side in before.items() if int(row_id(text), 16) % 7 and row_id(text)[0] != "0"}
    now.update({text: sides[(sides.index(side) + 1) % 3] for text, side in list(now.items())[::11]})  # some moved
    now.update({f"new {i}": sides[i % 3] for i in range(500) if not row_id(f"new {i}").startswith("0")})
    rows(now).to_parquet(tmp_path / "rows.parquet")
    previous = PreviousIngest({"source": {"sha256": "x"}}, lambda: iter([rows(before).iloc[:1234],
                                                                       rows(before).iloc[1234:]]))  # fmt: skip
    changes = data_changes(previous, tmp_path / "rows.parquet").splits
    for side in sides:
        assert changes[side].new == sum(1 for t, s in now.items() if s == side and t not in before)
        assert changes[side].removed == sum(1 for t, s in before.items() if s == side and t not in now)
        assert changes[side].moved_in == sum(1 for t, s in now.items() if s == side and before.get(t, s) != s)
    assert sum(change.moved_in for change in changes.values()) > 0


def test_a_parquet_file_written_in_pieces_is_the_file_written_at_once(tmp_path: Path):
    from lmforge.data.splits import ROW_GROUP_ROWS, ParquetRows

    words = [[f"w{i}", f"w{i + 1}", "的"] for i in range(ROW_GROUP_ROWS + 5000)]
    frame = pd.DataFrame({"text": ["".join(sequence) * 12 for sequence in words], "tokens": words})  # pages of 1 MB
    with ParquetRows(tmp_path / "once.parquet") as once:
        once.write(frame)
    read = pd.read_parquet(tmp_path / "once.parquet")  # as partitions hand rows over: through Arrow
    with ParquetRows(tmp_path / "pieces.parquet") as pieces:
        for start in range(0, len(read), 7001):
            pieces.write(read.iloc[start : start + 7001])
    assert (tmp_path / "pieces.parquet").read_bytes() == (tmp_path / "once.parquet").read_bytes()
    assert pd.read_parquet(tmp_path / "once.parquet")["text"].tolist() == frame["text"].tolist()
