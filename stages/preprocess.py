"""preprocess: data/raw + reports/validation -> data/processed/.

- tokenizer/             the tokenizer trained on the pretraining corpus (PreTrainedTokenizerFast)
- pretrain/{train,val}.bin + meta.json   packed token blocks, memory-mappable
- tasks/<dataset>/{train,val,test}.parquet + labels.json   tokenized task datasets
A dataset is only processed if its validation report says it passed (or on_failure is warn).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

from lmforge.data.splits import SPLITS
from lmforge.errors import DataError, run_main
from lmforge.io import atomic_output_dir, read_json, write_json, write_json_atomic
from lmforge.params import PreprocessParams, load_params
from lmforge.tokenization import pack_corpus, save_hf_tokenizer, tokenize_split, train_tokenizer
from lmforge.validation import declared_labels


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


def validated_manifest(raw_dir: Path, validation_dir: Path, dataset: str) -> dict[str, Any]:
    """The dataset's manifest, if its validation report covers this very test split and allows going on."""
    manifest = read_json(raw_dir / dataset / "manifest.json")
    report_path = validation_dir / f"{dataset}.json"
    if not report_path.is_file():
        raise DataError(f"{report_path}: no validation report for dataset {dataset!r} (run the validate stage)")
    report = read_json(report_path)
    if report["test_sha256"] != manifest["test_sha256"]:
        raise DataError(
            f"{report_path}: validated a different test split than {raw_dir / dataset} holds; re-run validate"
        )
    if not report["success"] and report["on_failure"] != "warn":
        raise DataError(
            f"{report_path}: dataset {dataset!r} failed validation; fix the data or set validate.on_failure"
        )
    return manifest


def run(params: PreprocessParams, raw_dir: Path, validation_dir: Path, out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    stats: dict[str, Any] = {"tasks": {}}
    with atomic_output_dir(out_dir) as staging:
        corpus = raw_dir / "corpus"
        tokenizer = train_tokenizer(params.tokenizer, corpus / "train.txt", params.batch_size, params.max_length)
        save_hf_tokenizer(tokenizer, staging / "tokenizer", params.max_length)
        stats["tokenizer"] = {"kind": params.tokenizer.kind, "vocab_size": tokenizer.get_vocab_size()}
        stats["seconds_tokenizer"] = round(time.perf_counter() - started, 2)

        (staging / "pretrain").mkdir()
        packed = {
            side: pack_corpus(
                tokenizer,
                corpus / f"{side}.txt",
                staging / "pretrain" / f"{side}.bin",
                params.block_size,
                params.batch_size,
            )
            for side in ("train", "val")
        }
        write_json(staging / "pretrain" / "meta.json", packed)
        stats["pretrain"] = packed
        stats["seconds_pack"] = round(time.perf_counter() - started - stats["seconds_tokenizer"], 2)

        for manifest_path in sorted(raw_dir.glob("*/manifest.json")):
            dataset = manifest_path.parent.name
            if dataset == "corpus":
                continue
            manifest = validated_manifest(raw_dir, validation_dir, dataset)
            if manifest["task"] == "corpus":
                continue
            task_dir = staging / "tasks" / dataset
            task_dir.mkdir(parents=True)
            labels = declared_labels(manifest, {})
            write_json(
                task_dir / "labels.json",
                {"task": manifest["task"], "labels": labels, "test_sha256": manifest["test_sha256"]},
            )
            stats["tasks"][dataset] = {
                split: tokenize_split(
                    tokenizer,
                    manifest["task"],
                    raw_dir / dataset / f"{split}.parquet",
                    task_dir / f"{split}.parquet",
                    labels,
                    params.batch_size,
                )
                for split in SPLITS
            }
        stats["seconds"] = round(time.perf_counter() - started, 2)
        stats["peak_rss_mb"] = peak_rss_mb()
        write_json(staging / "stats.json", stats)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--validation", type=Path, default=Path("reports/validation"))
    parser.add_argument("--out", type=Path, default=Path("data/processed"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/preprocess.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    stats = run(params.preprocess, args.raw, args.validation, args.out)
    write_json_atomic(args.metrics, stats)
    train = stats["pretrain"]["train"]
    print(
        f"preprocess: tokenizer {stats['tokenizer']}; pretrain train: {train['tokens']} tokens in "
        f"{train['blocks']} blocks of {train['block_size']} (padding {train['padding_fraction']:.2%}, "
        f"unknown {train['unknown_fraction']:.2%})"
    )
    for dataset, splits in stats["tasks"].items():
        print(
            f"preprocess: {dataset}: "
            + ", ".join(f"{s} {v['rows']} rows/{v['tokens']} tokens" for s, v in splits.items())
        )
    print(f"preprocess: wrote {args.out} in {stats['seconds']}s, peak RSS {stats['peak_rss_mb']} MB")


if __name__ == "__main__":
    run_main(main)
