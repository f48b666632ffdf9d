"""preprocess: data/raw + reports/validation -> data/processed/.

- tokenizer/             the tokenizer trained on the pretraining corpus (PreTrainedTokenizerFast)
- pretrain/{train,val}.bin + meta.json   packed token blocks, memory-mappable
- datasets/<dataset>/{train,val,test}.parquet + labels.json   the tokenized datasets fine-tuning reads
A dataset is only processed if its validation report says it passed (or on_failure is warn).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.artifacts import SPLITS, DatasetLabels, DatasetValidation, Manifest, PackedCorpus, PreprocessReport
from lmforge.errors import DataError
from lmforge.io import atomic_output_dir
from lmforge.params import Params
from lmforge.schema import PreprocessParams
from lmforge.stage import Stage, dep, output
from lmforge.tokenization import UNK, pack_corpus, save_hf_tokenizer, tokenize_split, train_tokenizer

UNKNOWN_WARNING = 0.05  # share of a dataset's train tokens that are [UNK] before the summary warns


@dataclass(frozen=True)
class PreprocessPaths:
    raw: Path = dep("data/raw: the ingested datasets and the pretraining corpus")
    validation: Path = dep("reports/validation: only datasets that passed are processed")
    out: Path = output("data/processed: tokenizer/, pretrain/, datasets/")
    report: Path = output("tokenizer, token counts, time and peak memory")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    /proc's VmHWM starts afresh at exec; ru_maxrss does not (Linux carries the parent's peak
    across fork and exec), so a stage started by a big parent would report the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def validated_manifest(raw_dir: Path, validation_dir: Path, dataset: str) -> Manifest:
    """The dataset's manifest, if its validation report covers this very test split and allows going on."""
    manifest = Manifest.of(raw_dir / dataset)
    report_path = validation_dir / f"{dataset}.json"
    if not report_path.is_file():
        raise DataError(f"{report_path}: no validation report for dataset {dataset!r} (run the validate stage)")
    report = DatasetValidation.read(report_path)
    if not report.covers(manifest):
        raise DataError(
            f"{report_path}: validated a different test split than {raw_dir / dataset} holds; re-run validate"
        )
    if not report.success and report.on_failure != "warn":
        raise DataError(
            f"{report_path}: dataset {dataset!r} failed validation; fix the data or set validate.on_failure"
        )
    return manifest


def run(section: PreprocessParams, paths: PreprocessPaths) -> PreprocessReport:
    """Train the tokenizer, pack the pretraining corpus, tokenize every validated dataset."""
    raw_dir, validation_dir = paths.raw, paths.validation
    started = time.perf_counter()
    stats: dict[str, Any] = {"datasets": {}}
    with atomic_output_dir(paths.out) as staging:
        corpus = raw_dir / "corpus"
        tokenizer = train_tokenizer(section.tokenizer, corpus / "train.txt", section.batch_size, section.max_length)
        save_hf_tokenizer(tokenizer, staging / "tokenizer", section.max_length)
        stats["tokenizer"] = {"kind": section.tokenizer.kind, "vocab_size": tokenizer.get_vocab_size()}
        stats["seconds_tokenizer"] = round(time.perf_counter() - started, 2)

        (staging / "pretrain").mkdir()
        packed = {
            side: pack_corpus(
                tokenizer,
                corpus / f"{side}.txt",
                staging / "pretrain" / f"{side}.bin",
                section.block_size,
                section.batch_size,
            )
            for side in ("train", "val")
        }
        PackedCorpus(**packed).write_into(staging / "pretrain" / "meta.json")
        stats["pretrain"] = packed
        stats["seconds_pack"] = round(time.perf_counter() - started - stats["seconds_tokenizer"], 2)

        for manifest_path in sorted(raw_dir.glob("*/manifest.json")):
            dataset = manifest_path.parent.name
            if dataset == "corpus":
                continue
            manifest = validated_manifest(raw_dir, validation_dir, dataset)
            if manifest.kind == "corpus":
                continue
            dataset_dir = staging / "datasets" / dataset
            dataset_dir.mkdir(parents=True)
            labels = manifest.label_set()
            DatasetLabels(kind=manifest.kind, labels=labels, test_sha256=manifest.test_sha256).write_into(
                dataset_dir / "labels.json"
            )
            if manifest.kind == "instruction":  # generation tasks tokenize the raw (prompt, response) pairs
                continue
            stats["datasets"][dataset] = {
                split: tokenize_split(
                    tokenizer,
                    manifest.kind,
                    raw_dir / dataset / f"{split}.parquet",
                    dataset_dir / f"{split}.parquet",
                    labels,
                    section.batch_size,
                )
                for split in SPLITS
            }
        stats["seconds"] = round(time.perf_counter() - started, 2)
        stats["peak_rss_mb"] = peak_rss_mb()
    # Timings and memory go to the report (reports/preprocess.json), never into data/processed: the
    # same corpus and params must give byte-identical outputs, or DVC would re-run everything downstream.
    return PreprocessReport(**stats)


def summary(report: PreprocessReport, paths: PreprocessPaths) -> str:
    train = report.pretrain.train
    lines = [
        f"preprocess: tokenizer {report.tokenizer.kind} vocab {report.tokenizer.vocab_size}; pretrain train: "
        f"{train.tokens} tokens in {train.blocks} blocks of {train.block_size} (padding {train.padding_fraction:.2%}, "
        f"unknown {train.unknown_fraction:.2%})"
    ]
    for dataset, splits in report.datasets.items():
        counts = ", ".join(f"{split} {v.rows} rows/{v.tokens} tokens" for split, v in splits.items())
        lines.append(f"preprocess: {dataset}: {counts}")
        unknown = splits["train"].unknown_fraction
        if unknown > UNKNOWN_WARNING:  # e.g. a script the corpus never showed the tokenizer
            lines.append(f"preprocess: warning: {unknown:.1%} of {dataset}'s train tokens are {UNK}: the tokenizer "
                         f"barely covers its text; keep ingest.datasets.{dataset}.in_corpus: true, raise "
                         f"preprocess.tokenizer.vocab_size, or use preprocess.tokenizer.kind: bpe")  # fmt: skip
    lines.append(f"preprocess: wrote {paths.out} in {report.seconds}s, peak RSS {report.peak_rss_mb} MB")
    return "\n".join(lines)


def section(params: Params, item: str | None) -> PreprocessParams:
    return params.preprocess


STAGE = Stage("preprocess", ("preprocess",), section, PreprocessPaths, run, summary, lambda paths: paths.report)
