"""ingest: sources -> data/raw/<dataset>/{train,val,test}.parquet + manifest.json, and data/raw/corpus/.

The pretraining corpus (data/raw/corpus/{train,val}.txt) holds the train-split text of every
dataset with `in_corpus: true`, so no validation or test text of any task is ever pretrained on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lmforge.data.sources import load_source
from lmforge.data.splits import SPLITS, dedupe, label_counts, sample_rows, split_table, write_corpus, write_parquet
from lmforge.errors import run_main
from lmforge.io import atomic_output_dir, write_json, write_json_atomic
from lmforge.params import DatasetSpec, IngestParams, load_params


def ingest_dataset(name: str, spec: DatasetSpec, params: IngestParams, root: Path, out_dir: Path) -> dict[str, Any]:
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
    manifest = {
        "dataset": name,
        "task": spec.task,
        "source": {"kind": spec.source.kind, "description": source.description, "sha256": source.sha256},
        "seed": params.seed,
        "split_fractions": {"val": params.split.val, "test": params.split.test},
        "rows": {
            "source": n_source,
            "duplicates_dropped": n_source - n_unique,
            "kept": len(table),
            **{split: len(splits[split]) for split in SPLITS},
        },
        "labels": {
            "declared": list(spec.labels) if spec.labels is not None else None,
            "counts": {split: label_counts(splits[split], spec.task) for split in SPLITS},
        },
        "files": files,
        "test_sha256": files["test.parquet"],
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def run(params: IngestParams, root: Path, out_dir: Path) -> dict[str, Any]:
    """Ingest every dataset into `out_dir` (built aside and swapped in only if all succeed)."""
    summary: dict[str, Any] = {"datasets": {}}
    with atomic_output_dir(out_dir) as staging:
        corpus_texts: list[tuple[str, str]] = []
        for name, spec in params.datasets.items():
            started = time.perf_counter()
            manifest = ingest_dataset(name, spec, params, root, staging / name)
            summary["datasets"][name] = {"rows": manifest["rows"], "seconds": round(time.perf_counter() - started, 2)}
            if spec.in_corpus:
                train = pd.read_parquet(staging / name / "train.parquet", columns=["text"])
                corpus_texts.extend((name, text) for text in train["text"])
        corpus = write_corpus(corpus_texts, staging / "corpus", params.corpus_val_fraction)
        write_json(staging / "corpus" / "manifest.json", corpus)
        summary["corpus"] = corpus["documents"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--root", type=Path, default=Path("."), help="resolves relative source paths")
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/ingest.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    started = time.perf_counter()
    summary = run(params.ingest, args.root, args.out)
    write_json_atomic(args.metrics, summary)
    for name, info in summary["datasets"].items():
        rows = info["rows"]
        print(
            f"ingest: {name}: {rows['train']}/{rows['val']}/{rows['test']} train/val/test rows "
            f"({rows['duplicates_dropped']} duplicates dropped) in {info['seconds']}s"
        )
    print(f"ingest: corpus documents {summary['corpus']}; wrote {args.out} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    run_main(main)
