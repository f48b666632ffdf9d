"""Does preprocess stream, and what does it cost over the tokenizer? 1x, 4x and 16x the bundled corpus.

Ingests and validates the default datasets once into a temporary folder, then makes 4x and 16x
copies of data/raw (the corpus and every train split repeated, each copy's lines rotated so the
text differs), and runs the preprocess stage on each in a fresh process. Beside each, the same
corpus is encoded by the raw `tokenizers` encode_batch with the tokenizer that run trained (batches
of preprocess.batch_size, nothing written): packing's seconds over that is what lmforge adds to
tokenizing. Prints a table and writes bench/results/preprocess_memory.json. Streaming means the
peak RSS stays near flat as the corpus grows.

    python -m bench.preprocess_memory [--factors 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.machine import describe
from lmforge import ingest, validate
from lmforge.ingest import IngestPaths
from lmforge.params import load_params
from lmforge.tokenization import iter_lines
from lmforge.validate import ValidatePaths

REPO = Path(__file__).resolve().parent.parent


def rotate(text: str, shift: int) -> str:
    return text[shift % len(text) :] + text[: shift % len(text)] if text else text


def scale_raw(raw: Path, out: Path, factor: int) -> None:
    """Copy data/raw with the corpus and train splits `factor` times as large (val/test untouched)."""
    shutil.copytree(raw, out)
    lines = (raw / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
    with open(out / "corpus" / "train.txt", "w", encoding="utf-8") as handle:
        for copy in range(factor):
            handle.writelines(rotate(line, 7 * copy) + "\n" for line in lines)
    for train in raw.glob("*/train.parquet"):
        frame = pd.read_parquet(train)
        pd.concat([frame] * factor, ignore_index=True).to_parquet(out / train.parent.name / "train.parquet")


def preprocess(raw: Path, validation: Path, out: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.preprocess",
            "--params",
            str(REPO / "params.yaml"),
            "--raw",
            str(raw),
            "--validation",
            str(validation),
            "--out",
            str(out / "processed"),
            "--report",
            str(out / "stats.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"preprocess failed on {raw}: {result.stderr.strip().splitlines()[-1:]}")
    stats = json.loads((out / "stats.json").read_text())
    stats["wall_seconds"] = round(time.perf_counter() - started, 2)
    return stats


def raw_encode_seconds(tokenizer_file: Path, corpus: Path, batch_size: int) -> float:
    """The corpus through `tokenizers` encode_batch alone, batch by batch, nothing kept or written."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    started = time.perf_counter()
    for batch in iter_lines(corpus, batch_size):
        tokenizer.encode_batch(batch)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        root = Path(tmp)
        ingest.run(params.ingest, IngestPaths(REPO, root / "raw1", root / "ingest.json"))
        validate.run(params.validate_, ValidatePaths(root / "raw1", root / "validation", root / "validate.json"))
        for factor in args.factors:
            if factor != 1:
                scale_raw(root / "raw1", root / f"raw{factor}", factor)
            stats = preprocess(root / f"raw{factor}", root / "validation", root / f"out{factor}")
            train = stats["pretrain"]["train"]
            task_tokens = sum(s["train"]["tokens"] for s in stats["datasets"].values())
            tokenizer = root / f"out{factor}/processed/tokenizer/tokenizer.json"
            corpus = root / f"raw{factor}/corpus/train.txt"
            encode = raw_encode_seconds(tokenizer, corpus, params.preprocess.batch_size)
            rows.append(
                {
                    "corpus": f"{factor}x",
                    "pretrain_tokens": train["tokens"],
                    "task_train_tokens": task_tokens,
                    "seconds": stats["seconds"],
                    "seconds_tokenizer_training": stats["seconds_tokenizer"],
                    "seconds_pack": stats["seconds_pack"],
                    "seconds_raw_encode_batch": round(encode, 2),
                    "tokens_per_second": round((train["tokens"] + task_tokens) / stats["seconds"]),
                    "peak_rss_mb": stats["peak_rss_mb"],
                }
            )
            shutil.rmtree(root / f"out{factor}")
    print(f"{'corpus':>6} {'pretrain tokens':>16} {'seconds':>8} {'train tok.':>10} {'pack':>6} "
          f"{'encode_batch':>12} {'pack/encode':>11} {'peak RSS MB':>12}")  # fmt: skip
    for row in rows:
        print(f"{row['corpus']:>6} {row['pretrain_tokens']:>16,} {row['seconds']:>8} "
              f"{row['seconds_tokenizer_training']:>10} {row['seconds_pack']:>6} {row['seconds_raw_encode_batch']:>12} "
              f"{row['seconds_pack'] / max(row['seconds_raw_encode_batch'], 1e-9):>10.2f}x "
              f"{row['peak_rss_mb']:>12}")  # fmt: skip
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS {rows[-1]['corpus']}/{rows[0]['corpus']}: {ratio:.2f} (1.00: flat memory)")
    out = REPO / "bench" / "results" / "preprocess_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": describe(), "rows": rows, "peak_rss_ratio_last_first": round(ratio, 3)},
                              indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
